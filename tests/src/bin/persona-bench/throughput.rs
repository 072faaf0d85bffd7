//! Throughput through namespaces, same topology and traffic three ways: plain routing
//! with no program; the persona programs (daemon, examples' office persona); nftables
//! doing the equivalent NAT and filtering. TCP bulk and small UDP datagrams, iperf3.
use std::process::{Command, Stdio};

use persona_tests::{
    daemon::Daemon,
    lab::{Lab, OUTSIDE, VM_IFACE, VmLink},
};
use serde_json::{Value, json};

const SECONDS: u32 = 5;

/// The office persona as nftables rules: addresses rewritten both ways, smtp out
/// dropped, ssh in from the outside's /24 admitted, replies of admitted flows pass.
const NFT_OFFICE: &str = "flush ruleset
table ip persona {
  chain pre { type nat hook prerouting priority dstnat; ip daddr 203.0.113.10 dnat to 198.18.0.2; }
  chain post { type nat hook postrouting priority srcnat; ip saddr 198.18.0.2 snat to 203.0.113.10; }
  chain filter {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"pvm1\" tcp dport 25 drop
    iifname \"pvm1\" accept
    ip saddr 198.51.100.0/24 tcp dport 22 accept
  }
}
";

fn iperf(lab: &Lab, args: &str) -> Value {
    let server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.out.name,
            "iperf3",
            "-s",
            "-1",
            "-B",
            OUTSIDE,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    let listening = || lab.out.try_exec("ss -ltn | grep -q :5201").status.success();
    for _ in 0..100 {
        if listening() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = lab
        .vm
        .try_exec(&format!("iperf3 -c {OUTSIDE} -t {SECONDS} -J {args}"));
    let mut server = server;
    let _ = server.kill();
    let _ = server.wait();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 {args}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn measure(lab: &Lab, setup: &str) -> Value {
    let tcp = iperf(lab, "");
    let bulk = tcp["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("tcp rate");
    let udp = iperf(lab, "-u -l 18 -b 0");
    let sum = &udp["end"]["sum"];
    let (packets, lost, secs) = (
        sum["packets"].as_f64().unwrap_or(0.0),
        sum["lost_packets"].as_f64().unwrap_or(0.0),
        sum["seconds"].as_f64().unwrap_or(f64::from(SECONDS)),
    );
    let pps = (packets - lost) / secs;
    eprintln!(
        "  {setup:<22} tcp bulk {:>7.2} Gbit/s   udp 18-byte payload {:>9.0} pkt/s received ({:.1}% lost)",
        bulk / 1e9,
        pps,
        sum["lost_percent"].as_f64().unwrap_or(0.0)
    );
    json!({
        "setup": setup,
        "tcp_bits_per_s": bulk,
        "udp_small_pps_received": pps,
        "udp_small_lost_percent": sum["lost_percent"],
    })
}

/// The host as a plain router: the VM's gateway address, forwarding, a route back.
fn route_plainly(lab: &Lab) {
    lab.host.exec(&format!(
        "ip addr add 198.18.0.1/24 dev {VM_IFACE} && sysctl -qw net.ipv4.ip_forward=1"
    ));
}

pub fn run() -> Value {
    let mut rows = Vec::new();
    {
        let lab = Lab::new(VmLink::Veth);
        route_plainly(&lab);
        lab.out.exec("ip route add 198.18.0.0/24 via 198.51.100.1");
        rows.push(measure(&lab, "no program"));
    }
    {
        let lab = Lab::new(VmLink::Veth);
        let d = Daemon::start(&lab);
        d.cli_ok("apply -f examples/");
        rows.push(measure(&lab, "persona"));
    }
    {
        // The same with the XDP flood guard on: it only drops, but attached to a veth it
        // takes the peer's GSO away, so the VM's TCP reaches the host as MTU frames.
        let lab = Lab::new(VmLink::Veth);
        let d = Daemon::start(&lab);
        d.cli_ok("apply -f examples/personas.yaml");
        let devices = std::fs::read_to_string("examples/devices.yaml").expect("devices.yaml");
        let guarded = devices.replacen(
            "  persona: office\n",
            "  persona: office\n  floodGuard: { enabled: true }\n",
            1,
        );
        assert_ne!(guarded, devices, "vm1's device in examples/devices.yaml");
        let file = std::env::temp_dir().join(format!("persona-bench-{}.yaml", lab.host.name));
        std::fs::write(&file, guarded).expect("devices");
        d.cli_ok(&format!("apply -f {}", file.display()));
        let _ = std::fs::remove_file(&file);
        rows.push(measure(&lab, "persona + flood guard"));
    }
    {
        let lab = Lab::new(VmLink::Veth);
        route_plainly(&lab);
        lab.out
            .exec("ip route replace 203.0.113.0/24 via 198.51.100.1");
        let file = std::env::temp_dir().join(format!("persona-bench-{}.nft", lab.host.name));
        std::fs::write(&file, NFT_OFFICE).expect("ruleset");
        lab.host.exec(&format!("nft -f {}", file.display()));
        let _ = std::fs::remove_file(&file);
        rows.push(measure(&lab, "nftables"));
    }
    json!({ "seconds_each": SECONDS, "rows": rows })
}
