//! Throughput through namespaces, same topology and traffic every way: plain routing
//! with no program; the persona programs (daemon, examples' office persona), forwarding
//! by themselves or through the host's stack, and with the flood guard; nftables doing
//! the equivalent NAT and filtering. TCP bulk and small UDP datagrams, iperf3.
use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
};

use persona_tests::{
    daemon::{Daemon, metric_sum},
    lab::{Lab, OUTSIDE, VM_IFACE, VmLink},
};
use serde_json::{Value, json};

const SECONDS: u32 = 5;
/// Each setup is measured this many times, round-robin; figures are medians.
const ROUNDS: usize = 5;

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

/// One round of both measurements.
fn measure(lab: &Lab) -> (f64, f64, f64) {
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
    let lost_percent = sum["lost_percent"].as_f64().unwrap_or(0.0);
    (bulk, (packets - lost) / secs, lost_percent)
}

fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Run count and run time of each program using the lab's pinned maps, by name
/// (kernel.bpf_stats_enabled must be on).
fn program_runs(setup: &Setup) -> Runs {
    let mut runs = BTreeMap::new();
    if setup.daemon.is_none() {
        return runs;
    }
    let active = setup.lab.pin_dir.join("ACTIVE");
    let Some(map) =
        bpftool(&["map", "show", "pinned", active.to_str().unwrap(), "-j"])["id"].as_u64()
    else {
        return runs;
    };
    for p in bpftool(&["prog", "show", "-j"])
        .as_array()
        .into_iter()
        .flatten()
    {
        let ours = p["map_ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|id| id.as_u64() == Some(map)));
        if let (true, Some(name), Some(cnt), Some(ns)) = (
            ours,
            p["name"].as_str(),
            p["run_cnt"].as_u64(),
            p["run_time_ns"].as_u64(),
        ) {
            let e = runs.entry(name.to_owned()).or_insert((0, 0));
            e.0 += cnt;
            e.1 += ns;
        }
    }
    runs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Setup {
    name: &'static str,
    lab: Lab,
    daemon: Option<Daemon>,
}

impl Setup {
    fn persona(name: &'static str, args: &[&str]) -> Self {
        let lab = Lab::new(VmLink::Veth);
        let d = Daemon::start_with(&lab, args);
        d.cli_ok("apply -f examples/");
        Self {
            name,
            lab,
            daemon: Some(d),
        }
    }
}

/// The host as a plain router: the VM's gateway address, forwarding, a route back.
fn route_plainly(lab: &Lab) {
    lab.host.exec(&format!(
        "ip addr add 198.18.0.1/24 dev {VM_IFACE} && sysctl -qw net.ipv4.ip_forward=1"
    ));
}

pub fn run() -> Value {
    let plain = Lab::new(VmLink::Veth);
    route_plainly(&plain);
    plain
        .out
        .exec("ip route add 198.18.0.0/24 via 198.51.100.1");
    let setups = [
        Setup {
            name: "no program",
            lab: plain,
            daemon: None,
        },
        Setup::persona("persona", &[]),
        // Forwarded by the programs themselves instead of the host's stack.
        Setup::persona("persona, BPF routing", &["--host-routing", "bpf"]),
        guarded(),
        nftables(),
    ];
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); setups.len()];
    let before: Vec<_> = setups.iter().map(program_runs).collect();
    // Round-robin, each round starting one setup later, so that a slow minute of a
    // noisy machine, or the wake of the setup before, hits every setup alike.
    let n = setups.len();
    for round in 0..ROUNDS {
        for i in (0..n).map(|k| (k + round) % n) {
            let (setup, r) = (&setups[i], &mut results[i]);
            let (tcp, udp, lost) = measure(&setup.lab);
            eprintln!(
                "  round {round} {:<22} tcp bulk {:>7.2} Gbit/s   udp 18-byte payload {udp:>9.0} pkt/s received ({lost:.1}% lost)",
                setup.name,
                tcp / 1e9
            );
            r.0.push(tcp);
            r.1.push(udp);
            r.2.push(lost);
        }
    }
    let rows: Vec<Value> = setups
        .iter()
        .zip(results)
        .zip(before)
        .map(|((setup, (tcp, udp, lost)), before)| {
            json!({
                "setup": setup.name,
                "tcp_bits_per_s": median(tcp),
                "udp_small_pps_received": median(udp),
                "udp_small_lost_percent": median(lost),
                "programs": runs_since(setup, &before),
            })
        })
        .collect();
    let flood: Vec<Value> = setups
        .iter()
        .filter(|s| s.daemon.is_some())
        .map(spoofed_flood)
        .collect();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    json!({ "seconds_each": SECONDS, "rounds": ROUNDS, "rows": rows, "spoofed_flood": flood })
}

type Runs = BTreeMap<String, (u64, u64)>;

/// Mean run time of each program that ran since `before`.
fn runs_since(setup: &Setup, before: &Runs) -> BTreeMap<String, Value> {
    program_runs(setup)
        .into_iter()
        .filter_map(|(name, (cnt, ns))| {
            let (c0, n0) = before.get(&name).copied().unwrap_or_default();
            let runs = cnt.checked_sub(c0).filter(|r| *r > 0)?;
            Some((
                name,
                json!({ "runs": runs, "ns_per_run": ns.saturating_sub(n0) as f64 / runs as f64 }),
            ))
        })
        .collect()
}

fn spoofed_drops(setup: &Setup) -> u64 {
    let d = setup.daemon.as_ref().expect("a daemon");
    metric_sum(
        &d.metrics(),
        "persona_device_packets_total",
        &[("reason", "drop_spoofed")],
    )
}

/// The VM floods UDP from an address that is not its own, as fast as hping3 sends:
/// how many the programs drop per second, and what each drop costs.
fn spoofed_flood(setup: &Setup) -> Value {
    let before = program_runs(setup);
    let dropped_before = spoofed_drops(setup);
    let out = setup.lab.vm.try_exec(&format!(
        "timeout -s INT {SECONDS} hping3 --flood --udp -a 198.18.0.99 -p 9 {OUTSIDE} 2>&1"
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    let sent: u64 = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("hping3 said: {text}"));
    let dropped = spoofed_drops(setup) - dropped_before;
    let secs = f64::from(SECONDS);
    eprintln!(
        "  spoofed flood {:<22} sent {:>9.0} pkt/s, dropped {:>9.0} pkt/s",
        setup.name,
        sent as f64 / secs,
        dropped as f64 / secs
    );
    json!({
        "setup": setup.name,
        "sent_pps": sent as f64 / secs,
        "dropped_pps": dropped as f64 / secs,
        "programs": runs_since(setup, &before),
    })
}

/// The persona with the XDP flood guard on: it only drops, but attached to a veth it
/// takes the peer's GSO away, so the VM's TCP reaches the host as MTU frames.
fn guarded() -> Setup {
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
    Setup {
        name: "persona + flood guard",
        lab,
        daemon: Some(d),
    }
}

fn nftables() -> Setup {
    let lab = Lab::new(VmLink::Veth);
    route_plainly(&lab);
    lab.out
        .exec("ip route replace 203.0.113.0/24 via 198.51.100.1");
    let file = std::env::temp_dir().join(format!("persona-bench-{}.nft", lab.host.name));
    std::fs::write(&file, NFT_OFFICE).expect("ruleset");
    lab.host.exec(&format!("nft -f {}", file.display()));
    let _ = std::fs::remove_file(&file);
    Setup {
        name: "nftables",
        lab,
        daemon: None,
    }
}
