//! The end-to-end lab: a hypervisor host namespace running persona, a VM namespace behind
//! a veth pair or a real tap device, and an outside namespace with the servers.
//!
//! ```text
//!  vm (198.18.0.2) ─eth0══pvm1─ host ─up0══eth0─ out (198.51.100.7, resolver .53)
//! ```
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    harness::unique_pin_dir,
    netns::{Netns, sh},
    tap,
};

pub const VM_IFACE: &str = "pvm1";
pub const VM2_IFACE: &str = "pvm2";
pub const UPLINK: &str = "up0";
pub const OUTSIDE: &str = "198.51.100.7";
pub const RESOLVER: &str = "198.51.100.53";
pub const OUTSIDE_V6: &str = "2001:db8:ffff::7";
/// The examples' personas' gateway: the outside router, reached on the uplink.
pub const PERSONA_GATEWAY: &str = "203.0.113.1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmLink {
    Veth,
    Tap,
    /// A tap with two queues, as libvirt creates one for `<driver queues='2'/>`; the
    /// VM's frames go into them in turn.
    MultiQueueTap,
}

/// The hypervisor host namespace and the outside world with its servers; the VMs come
/// on top: a namespace ([`Lab`]) or QEMU guests ([`crate::guest::Guest`]).
pub struct Site {
    pub host: Netns,
    pub out: Netns,
    pub pin_dir: PathBuf,
    /// The HTTP server's access log: one line per request, the client's address first.
    pub http_log: PathBuf,
    children: Vec<Child>,
}

/// A site with one VM namespace behind a veth pair or a real tap device.
pub struct Lab {
    pub site: Site,
    pub vm: Netns,
    /// Frames written into each queue of a multiqueue tap.
    pub queue_frames: Vec<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl std::ops::Deref for Lab {
    type Target = Site;
    fn deref(&self) -> &Site {
        &self.site
    }
}

/// The `persona` binary built with this test run.
pub fn persona_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PERSONA_BIN") {
        return PathBuf::from(p);
    }
    let mut dir = std::env::current_exe().expect("current exe");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("persona");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` first (cargo xtask test does)",
        bin.display()
    );
    bin
}

impl Default for Site {
    fn default() -> Self {
        Self::new()
    }
}

impl Site {
    pub fn new() -> Self {
        let host = Netns::new("p-host");
        let out = Netns::new("p-out");
        let (h, o) = (host.name.clone(), out.name.clone());
        sh(&format!(
            "ip link add {UPLINK} netns {h} type veth peer name eth0 netns {o}"
        ));
        host.exec(&format!(
            "ip addr add 198.51.100.1/24 dev {UPLINK} && ip -6 addr add 2001:db8:ffff::1/64 dev {UPLINK} nodad && ip link set {UPLINK} up && ip route add default via {OUTSIDE} && ip -6 route add default via {OUTSIDE_V6} && ip route add {PERSONA_GATEWAY} dev {UPLINK}"
        ));
        out.exec(&format!(
            "ip addr add {OUTSIDE}/24 dev eth0 && ip addr add {RESOLVER}/24 dev eth0 && ip link set eth0 up && ip addr add {PERSONA_GATEWAY}/32 dev eth0 && ip route add 203.0.113.0/24 dev eth0 src {OUTSIDE} && ip -6 addr add {OUTSIDE_V6}/64 dev eth0 nodad && ip -6 route add 2001:db8:a::/64 dev eth0"
        ));
        let mut site = Self {
            http_log: PathBuf::from(format!("/tmp/persona-http-{o}.log")),
            host,
            out,
            pin_dir: unique_pin_dir("e2e"),
            children: Vec::new(),
        };
        site.start_servers();
        site
    }

    fn spawn(&mut self, ns: &str, cmd: &str) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", cmd])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning a server");
        self.children.push(child);
    }

    /// Outside: TCP and UDP services that answer with the address they saw, an HTTP
    /// server, and a DNS server with a name only it knows.
    fn start_servers(&mut self) {
        let out = self.out.name.clone();
        self.spawn(
            &out,
            "exec socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo $SOCAT_PEERADDR'",
        );
        self.spawn(
            &out,
            "exec socat TCP6-LISTEN:8080,reuseaddr,fork,ipv6only=1 SYSTEM:'echo $SOCAT_PEERADDR'",
        );
        self.spawn(
            &out,
            "exec socat TCP-LISTEN:25,reuseaddr,fork SYSTEM:'echo smtp'",
        );
        self.spawn(
            &out,
            "exec socat TCP-LISTEN:8801,reuseaddr,fork SYSTEM:'echo zoom'",
        );
        self.spawn(
            &out,
            &format!("exec python3 {} 9000", script("udp_echo.py")),
        );
        self.spawn(
            &out,
            &format!("exec python3 {} {LINE_ECHO_PORT}", script("line_echo.py")),
        );
        let www = format!("/tmp/persona-www-{out}");
        sh(&format!(
            "mkdir -p {www} && echo 'hello from outside' > {www}/hello.txt"
        ));
        self.spawn(
            &out,
            &format!(
                "exec python3 -u -m http.server 8000 --bind {OUTSIDE} --directory {www} 2>{}",
                self.http_log.display()
            ),
        );
        self.spawn(
            &out,
            &format!(
                "exec dnsmasq --no-daemon --no-resolv --no-hosts --bind-interfaces --listen-address={RESOLVER} --address=/persona.test/192.0.2.80 --pid-file= --log-facility=-"
            ),
        );
        wait_for(|| {
            self.out
                .try_exec("ss -ltn | grep -q 0.0.0.0:8080 && ss -ltn | grep -q '\\[::\\]:8080' && ss -ltn | grep -q :8000 && ss -lun | grep -q 198.51.100.53:53 && ss -lun | grep -q :9000 && ss -ltn | grep -q :7000")
                .status
                .success()
        });
    }

    /// The client addresses in the HTTP server's access log, oldest first.
    pub fn http_clients(&self) -> Vec<String> {
        std::fs::read_to_string(&self.http_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    /// Runs `persona` in the host's network namespace only (not `ip netns exec`, which
    /// would remount /sys and hide the bpffs holding the pins).
    pub fn persona(&self, args: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host.name))
            .arg(persona_bin())
            .args([
                "--pin-dir",
                self.pin_dir.to_str().unwrap(),
                "--uplink",
                UPLINK,
            ])
            .args(persona_args(args));
        c
    }

    pub fn persona_ok(&self, args: &str) -> String {
        stdout_of_success(args, self.persona(args).output().expect("running persona"))
    }

    /// Whether a TCP connection from outside to `addr:port` got the service's answer.
    pub fn reach_vm(&self, addr: &str, port: u16) -> Option<String> {
        let out = self.out.try_exec(&format!(
            "socat -T2 - TCP:{addr}:{port},connect-timeout=2 </dev/null"
        ));
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !text.is_empty()).then_some(text)
    }
}

/// `persona` arguments from a test's command line; `examples/` means the repository's
/// example manifests.
pub fn persona_args(args: &str) -> Vec<String> {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/");
    args.replace("examples/", examples)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The standard output of `persona ARGS`, which must have succeeded.
pub fn stdout_of_success(args: &str, out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "persona {args} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Schemathesis, installed by `cargo xtask setup`.
pub fn schemathesis() -> String {
    format!(
        "{}/../target/tools/schemathesis/bin/st",
        env!("CARGO_MANIFEST_DIR")
    )
}

pub fn script(name: &str) -> String {
    format!("{}/scripts/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// What `udp_probe.py` saw: how many replies, and the source address the outside
/// reported for each.
#[derive(Debug, serde::Deserialize)]
pub struct Probe {
    pub sent: u64,
    pub received: u64,
    pub by_addr: std::collections::BTreeMap<String, u64>,
    pub missing: Vec<u64>,
}

/// The VM's own configuration of its side of the link.
pub const VM_CONFIG: &str = "ip link set eth0 address 52:54:00:00:00:02 && ip addr add 198.18.0.2/24 dev eth0 && ip -6 addr add 2001:db8:1::2/64 dev eth0 nodad && ip link set eth0 up && ip route add default via 198.18.0.1 && ip -6 route add default via fe80::1 dev eth0";

impl Lab {
    /// What a VM restart does to a veth lab: the link is deleted (both ends) and made
    /// again under the same names, with a new ifindex.
    pub fn unlink(&self) {
        self.host.exec(&format!("ip link del {VM_IFACE}"));
    }

    pub fn relink(&self) {
        self.relink_as(VM_IFACE, None);
    }

    /// The VM back on a host interface of another name (libvirt's vnetN), with the
    /// host side's MAC given.
    pub fn relink_as(&self, interface: &str, mac: Option<&str>) {
        self.relink_down_as(interface, mac);
        self.host.exec(&format!("ip link set {interface} up"));
    }

    /// The VM's link made again with its host side still down.
    pub fn relink_down(&self, interface: &str) {
        self.relink_down_as(interface, None);
    }

    fn relink_down_as(&self, interface: &str, mac: Option<&str>) {
        let (h, v) = (&self.host.name, &self.vm.name);
        let address = mac.map(|m| format!(" address {m}")).unwrap_or_default();
        sh(&format!(
            "ip link add {interface}{address} netns {h} type veth peer name eth0 netns {v}"
        ));
        self.vm.exec(VM_CONFIG);
    }

    pub fn new(link: VmLink) -> Self {
        let mut site = Site::new();
        let vm = Netns::new("p-vm");
        let (h, v) = (site.host.name.clone(), vm.name.clone());
        let mut queue_frames = Vec::new();
        match link {
            VmLink::Veth => {
                sh(&format!(
                    "ip link add {VM_IFACE} netns {h} type veth peer name eth0 netns {v}"
                ));
            }
            VmLink::Tap => {
                let host_side = tap::open_tap(&h, VM_IFACE);
                let vm_side = tap::open_tap(&v, "eth0");
                tap::relay(vm_side, vec![host_side]);
            }
            VmLink::MultiQueueTap => {
                let queues = tap::open_multiqueue_tap(&h, VM_IFACE, 2);
                let vm_side = tap::open_tap(&v, "eth0");
                queue_frames = tap::relay(vm_side, queues);
            }
        }
        // The examples' second VM has its tap here too, with no guest behind it.
        site.host.exec(&format!(
            "ip link set {VM_IFACE} up && ip tuntap add {VM2_IFACE} mode tap && ip link set {VM2_IFACE} up"
        ));
        vm.exec(VM_CONFIG);
        site.spawn(
            &v,
            "exec socat TCP-LISTEN:22,reuseaddr,fork SYSTEM:'echo ssh-ok'",
        );
        site.spawn(
            &v,
            "exec socat TCP-LISTEN:23,reuseaddr,fork SYSTEM:'echo telnet-ok'",
        );
        wait_for(|| vm.try_exec("ss -ltn | grep -q :23").status.success());
        Self {
            site,
            vm,
            queue_frames,
        }
    }

    /// The address the outside saw a TCP connection from the VM come from.
    pub fn seen_from_outside(&self) -> Option<String> {
        let out = self.vm.try_exec(&format!(
            "socat -T2 - TCP:{OUTSIDE}:8080,connect-timeout=2 </dev/null"
        ));
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !text.is_empty()).then_some(text)
    }

    /// The address the outside saw a TCP connection over IPv6 from the VM come from.
    pub fn seen_from_outside_v6(&self) -> Option<String> {
        let out = self.vm.try_exec(&format!(
            "socat -T2 - TCP6:[{OUTSIDE_V6}]:8080,connect-timeout=2 </dev/null"
        ));
        // socat writes the address in full ([2001:0db8:...]): read back in short form.
        let text = String::from_utf8_lossy(&out.stdout);
        let addr: std::net::Ipv6Addr = text.trim().trim_matches(['[', ']']).parse().ok()?;
        out.status.success().then(|| addr.to_string())
    }

    /// One long-lived TCP connection from the VM to the outside's line echo, a line
    /// every `interval_ms`; [`finish_stream`] says what became of it.
    pub fn start_stream(&self, lines: u32, interval_ms: u32) -> Child {
        self.vm_script(
            "stream.py",
            &[
                OUTSIDE.into(),
                LINE_ECHO_PORT.to_string(),
                lines.to_string(),
                (f64::from(interval_ms) / 1000.0).to_string(),
            ],
        )
    }

    /// Starts `count` numbered UDP round trips from the VM, one every `interval_ms`.
    pub fn start_probe(&self, count: u32, interval_ms: f64) -> Child {
        self.vm_script(
            "udp_probe.py",
            &[
                OUTSIDE.into(),
                "9000".into(),
                count.to_string(),
                (interval_ms / 1000.0).to_string(),
            ],
        )
    }

    /// Datagrams from the VM to the outside every millisecond for `seconds`, sent
    /// while its interface is gone too; the child prints how many left the VM.
    pub fn start_spray(&self, seconds: u32) -> Child {
        self.vm_script(
            "udp_spray.py",
            &[
                OUTSIDE.into(),
                "9000".into(),
                seconds.to_string(),
                "0.001".into(),
            ],
        )
    }

    /// One of the test scripts, run in the VM with its output piped back.
    fn vm_script(&self, name: &str, args: &[String]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.vm.name, "python3", &script(name)])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"))
    }
}

pub const LINE_ECHO_PORT: u16 = 7000;

/// What became of a [`Lab::start_stream`] connection: the address the outside saw for
/// each answered line, how it ended (`done`, `reset`, `closed` or `timeout`) and
/// when, in seconds from its start.
#[derive(Debug, serde::Deserialize)]
pub struct Stream {
    pub seen: Vec<String>,
    pub ended: String,
    pub at: f64,
}

pub fn finish_stream(child: Child) -> Stream {
    let out = child.wait_with_output().expect("stream");
    assert!(out.status.success(), "stream failed");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stream output {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

pub fn finish_probe(child: Child) -> Probe {
    let out = child.wait_with_output().expect("probe");
    assert!(out.status.success(), "probe failed");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("probe output {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn wait_for(ok: impl FnMut() -> bool) {
    wait_until("the lab", ok);
}

/// Polls `ok` until it holds, for at most ten seconds.
pub fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_file(&self.http_log);
        let _ = std::fs::remove_dir_all(format!("/tmp/persona-www-{}", self.out.name));
    }
}
