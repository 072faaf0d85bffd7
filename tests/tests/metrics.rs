//! /metrics on the real daemon: valid for promtool, and exact for traffic of known
//! size and count.
use std::io::Write as _;

use hyper::Method;
use persona_tests::{
    daemon::{Daemon, metric, metric_sum},
    lab::{Lab, OUTSIDE, VmLink},
};

#[test]
fn promtool_accepts_the_metrics_and_they_count_exactly() {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/");
    let shifts = "persona_shifts_total{trigger=\"api\",result=\"ok\"}";
    let applied = metric(&d.metrics(), shifts);
    d.cli_ok("shift vm1 travel");
    d.cli_ok("shift vm1 office");

    let before = d.metrics();
    // UDP datagrams of 100 bytes of payload to a port nobody listens on, each
    // 14 + 20 + 8 + 100 = 142 bytes on the tap: 50 as office, then 30 as travel.
    let send = |n: u32| {
        let sent = lab.vm.try_exec(&format!(
            "python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); [s.sendto(bytes(100), (\"{OUTSIDE}\", 9999)) for _ in range({n})]'"
        ));
        assert!(sent.status.success());
    };
    send(50);
    d.cli_ok("shift vm1 travel");
    send(30);
    let after = d.metrics();
    let delta = |what: &str, persona: &str| -> u64 {
        let name = format!("persona_device_{what}_total");
        ["allow_default", "allow_tracked"]
            .iter()
            .map(|reason| {
                let labels = [
                    ("device", "vm1"),
                    ("persona", persona),
                    ("direction", "egress"),
                    ("reason", reason),
                ];
                metric_sum(&after, &name, &labels) - metric_sum(&before, &name, &labels)
            })
            .sum()
    };
    assert_eq!(delta("packets", "office"), 50, "{after}");
    assert_eq!(delta("bytes", "office"), 50 * 142);
    assert_eq!(
        delta("packets", "travel"),
        30,
        "counted as the persona that sent them"
    );
    assert_eq!(delta("bytes", "travel"), 30 * 142);
    assert_eq!(metric(&after, shifts) - applied, 3, "the three shifts");
    assert!(metric(&after, "persona_map_capacity{map=\"conntrack\"}") >= 65_536);
    assert!(
        after.contains(
            "persona_device_generation{device=\"vm1\",persona=\"travel\",interface=\"pvm1\"} "
        ),
        "{after}"
    );
    assert!(
        after.contains(
            "persona_api_requests_total{route=\"/trigger_shift\",method=\"POST\",status=\"200\"} 3"
        ),
        "{after}"
    );

    // One TCP connection from the VM: its handshake round trip lands in the histogram.
    assert!(lab.seen_from_outside().is_some());
    let after = d.metrics();
    assert!(
        metric(
            &after,
            "persona_tcp_handshake_seconds_count{device=\"vm1\"}"
        ) >= 1,
        "{after}"
    );

    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .output_with_stdin(after.as_bytes());
    assert!(
        promtool.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );

    // Prometheus itself asks for OpenMetrics, and gets it.
    let om = std::process::Command::new("curl")
        .args(["-sS", "--unix-socket", d.socket.to_str().unwrap()])
        .args(["-H", &format!("Authorization: Bearer {}", d.admin)])
        .args([
            "-H",
            "Accept: application/openmetrics-text; version=1.0.0",
            "http://persona/metrics",
        ])
        .output()
        .expect("curl");
    let om = String::from_utf8(om.stdout).unwrap();
    assert!(
        om.trim_end().ends_with("# EOF") && om.contains("# TYPE persona_shifts counter"),
        "{om}"
    );

    let (s, _) = d.call(None, Method::GET, "/metrics", None);
    assert_eq!(s, 401, "metrics need a token like every other endpoint");
}

trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output;
}

impl OutputWithStdin for std::process::Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output {
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }
}

/// `persona top` in a real terminal (tmux), while the VM sends a bounded UDP stream.
#[test]
fn persona_top_shows_live_rates_in_a_terminal() {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/");
    let session = format!("persona-top-{}", std::process::id());
    let cmd = format!(
        "{} --server unix:{} --data-dir {} top --interval 0.5",
        persona_tests::lab::persona_bin().display(),
        d.socket.display(),
        d.data_dir.display()
    );
    persona_tests::netns::sh(&format!(
        "tmux new-session -d -s {session} -x 130 -y 12 '{cmd}'"
    ));
    let traffic = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.vm.name, "python3", "-c"])
        .arg(format!(
            "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor _ in range(3000):\n    s.sendto(bytes(200), ('{OUTSIDE}', 9999)); time.sleep(0.001)"
        ))
        .spawn()
        .expect("traffic");
    std::thread::sleep(std::time::Duration::from_millis(2000));
    let screen = persona_tests::netns::sh(&format!("tmux capture-pane -p -t {session}"));
    let _ = persona_tests::netns::try_sh(&format!("tmux kill-session -t {session}"));
    let _ = traffic.wait_with_output();
    assert!(
        screen.contains("persona top - every 0.5s, 2 devices"),
        "{screen}"
    );
    let row = screen
        .lines()
        .find(|l| l.starts_with("vm1"))
        .unwrap_or_else(|| panic!("no vm1 row:\n{screen}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "office", "{row}");
    let out_pps: f64 = cols[3].parse().unwrap();
    assert!(out_pps > 50.0, "outbound packets per second shown: {row}");
}

/// The examples and their rules, with no dwell or cooldown to wait out.
fn with_example_rules() -> (Lab, Daemon) {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start_with(&lab, &["--min-dwell", "0", "--cooldown", "0"]);
    d.cli_ok("apply -f examples/");
    d.cli_ok("apply -f examples/rules/");
    (lab, d)
}

/// A port scan the firewall blocks: counted, reported through the ring buffer into the
/// audit log and the metrics, and turned into a port-scan alert that the lockdown rule
/// answers by hardening the device.
#[test]
fn a_blocked_port_scan_is_counted_logged_and_raises_an_alert() {
    let (lab, d) = with_example_rules();
    let before = d.metrics();
    // 30 ports, one SYN each, nothing listens and office's ingress drops them all.
    lab.out.exec(
        "for p in $(seq 1000 1029); do timeout 0.4 socat -T0.2 - TCP:203.0.113.10:$p,connect-timeout=0.2 </dev/null >/dev/null 2>&1; done; true",
    );
    let start = std::time::Instant::now();
    loop {
        let (_, s) = d.admin(Method::GET, "/status/vm1", None);
        if s["persona"] == "hardened" {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(8),
            "no hardening after the scan: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // hardened cuts: office's address is withdrawn with the shift, so the rest of the
    // scan never reaches the host. What reached it was counted and reported, at least
    // the ten probes that make a scan.
    let after = d.metrics();
    let drops = |reason: &str| {
        let labels = [
            ("device", "vm1"),
            ("direction", "ingress"),
            ("reason", reason),
        ];
        metric_sum(&after, "persona_device_packets_total", &labels)
            - metric_sum(&before, "persona_device_packets_total", &labels)
    };
    let reported = |reason: &str| {
        after
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "persona_security_events_total{{device=\"vm1\",reason=\"{reason}\"}} "
                ))
            })
            .map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    let (dropped, told) = (drops("drop_default"), reported("drop_default"));
    assert!((10..=30).contains(&dropped), "{dropped} counted: {after}");
    assert!(told >= 10, "{told} reported: {after}");
    assert!(
        !lab.host
            .exec("ip neigh show proxy")
            .contains("203.0.113.10 "),
        "office withdrawn"
    );

    let events = d.cli_ok("events -o json");
    let events: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let security: Vec<_> = events.iter().filter(|e| e["kind"] == "security").collect();
    assert!(!security.is_empty(), "security events in the log");
    assert!(
        security.iter().all(|e| e["from"] == "198.51.100.7"),
        "{security:?}"
    );
    let hardening = events
        .iter()
        .find(|e| e["actor"] == "rule:lockdown")
        .expect("the lockdown shift");
    assert_eq!(
        hardening["detail"]["cause"]["why"]["signals"][0]["alertKind"], "port-scan",
        "{hardening}"
    );
}

/// A scan from 10,000 spoofed, rotating sources: what the daemon keeps of it is
/// bounded (audit records per device and second, memory and store size), and the
/// device shifts at most once.
#[test]
fn a_spoofed_scan_from_rotating_sources_is_bounded() {
    let (lab, d) = with_example_rules();
    // Settled first: what follows is what the scan adds.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (rss, disk) = (d.rss_kib(), d.store_bytes());
    let (_, v) = d.admin(Method::GET, "/events?after=0&limit=1000", None);
    let before = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0);
    let started = std::time::Instant::now();
    let sent = lab.out.exec(&format!(
        "python3 {} 203.0.113.10 10000",
        persona_tests::lab::script("syn_scan.py")
    ));
    assert_eq!(sent.trim(), "10000");
    let seconds = started.elapsed().as_secs() + 3;
    std::thread::sleep(std::time::Duration::from_secs(3));

    let (_, v) = d.admin(
        Method::GET,
        &format!("/events?after={before}&limit=1000"),
        None,
    );
    let events: Vec<&serde_json::Value> = v["items"].as_array().unwrap().iter().collect();
    assert!(events.len() < 1000, "all of the scan's records in one page");
    let security = events.iter().filter(|e| e["kind"] == "security").count();
    // Per device, reason and second: 16 sources one by one and one record for the rest.
    assert!(
        security as u64 <= 17 * 2 * (seconds + 1),
        "{security} security records in {seconds} s"
    );
    assert!(security > 0, "the scan was reported");
    let shifts = events
        .iter()
        .filter(|e| e["kind"] == "shift" && e["actor"] == "rule:lockdown")
        .count();
    assert!(shifts <= 1, "{shifts} shifts: {events:?}");
    let (rss_after, disk_after) = (d.rss_kib(), d.store_bytes());
    eprintln!(
        "10,000 spoofed SYNs: {security} security records, {shifts} shift, memory {rss} -> {rss_after} KiB, store {disk} -> {disk_after} bytes"
    );
    assert!(
        rss_after < rss + 32 * 1024,
        "memory {rss} KiB -> {rss_after} KiB"
    );
    assert!(
        disk_after < disk + (8 << 20),
        "store {disk} -> {disk_after} bytes"
    );
}
