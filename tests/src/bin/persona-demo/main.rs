//! `cargo xtask demo`: the persona daemon on its embedded store, two QEMU guests on
//! taps (namespaces when no guest can boot), the example personas, devices and rules,
//! then a short scenario: a time-of-day change, an application starting, a security
//! alert. Each step shows the shift, what the outside sees, and the counters. Everything
//! it creates is removed when it ends, also on Ctrl-C. With `--fleet`, three hosts on
//! etcd instead ([`fleet`]).
mod fleet;

use std::time::{Duration, Instant};

use persona_tests::{
    daemon::Daemon,
    guest::{self, Guest, GuestSpec, NsVm, Vm},
    lab::{OUTSIDE, Site, VM_IFACE, VM2_IFACE},
    netns::try_sh,
};
use serde_json::Value;

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

/// Removes every namespace, pin and file this process made; safe to run twice.
fn clean_up() {
    let pid = std::process::id();
    let _ = try_sh(&format!(
        "for ns in $(ip netns list | awk '{{print $1}}' | grep -- '-{pid}-'); do ip netns pids $ns | xargs -r kill -9; ip netns del $ns; done; rm -rf /tmp/persona-*-p-*-{pid}-* /sys/fs/bpf/persona-test-*-{pid}-*"
    ));
}

struct Scenario {
    site: Site,
    daemon: Daemon,
    vms: Vec<Box<dyn Vm>>,
    seen: u64,
}

impl Scenario {
    fn vm(&mut self, name: &str) -> &mut dyn Vm {
        self.vms
            .iter_mut()
            .find(|v| v.name() == name)
            .expect("a VM of that name")
            .as_mut()
    }

    /// What the outside sees of each VM, and what each VM sees of itself.
    fn show(&mut self) {
        let site = &self.site;
        for vm in &mut self.vms {
            let inner = vm.ok("ip -4 -o addr show dev eth0 | awk '{print $4}'");
            let dns = vm.run("nslookup -type=a persona.test | tail -n +4 | grep Address");
            let seen = vm.identity(site);
            println!(
                "  {}: configured as {:<15} outside sees {:<14} DNS for persona.test: {}",
                vm.name(),
                inner.trim(),
                seen,
                dns.1.trim().trim_start_matches("Address: ")
            );
        }
    }

    /// Audit-log entries since the last call.
    fn events(&mut self) {
        let out = self.daemon.cli_ok("events -o json");
        for e in out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            let seq = e["seq"].as_u64().unwrap_or(0);
            if seq <= self.seen {
                continue;
            }
            self.seen = seq;
            let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
            let at = s("at");
            let at = at.get(11..23).unwrap_or(&at);
            match s("kind").as_str() {
                "shift" => println!(
                    "  {at} audit #{seq}: shift {} {} -> {} by {} ({})",
                    s("device"),
                    s("from"),
                    s("to"),
                    s("actor"),
                    s("result")
                ),
                "security" => println!(
                    "  {at} audit #{seq}: security: {} {} {}, {} port(s) {}",
                    s("device"),
                    e["detail"]["direction"].as_str().unwrap_or("-"),
                    s("from"),
                    s("result"),
                    e["detail"]["ports"]
                ),
                _ => {}
            }
        }
    }

    /// Waits for the daemon to move `device` to `persona` by itself.
    fn wait_for(&self, device: &str, persona: &str, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let status = self.daemon.cli_ok(&format!("status {device} -o json"));
            let v: Value = serde_json::from_str(&status).unwrap_or_default();
            if v["persona"] == persona {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{device} did not move to {persona}; it runs {}",
                v["persona"]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn counters(&self) {
        for device in ["vm1", "vm2"] {
            print!("{}", self.daemon.cli_ok(&format!("status {device}")));
        }
        let metrics = self.daemon.metrics();
        println!("  from /metrics:");
        for l in metrics.lines().filter(|l| {
            (l.starts_with("persona_device_packets_total") && !l.ends_with(" 0"))
                || l.starts_with("persona_shifts_total")
                || l.starts_with("persona_device_generation")
        }) {
            println!("    {l}");
        }
    }
}

/// Boots the two example VMs as QEMU guests; namespaces stand in when they cannot boot.
fn boot(site: &Site) -> Vec<Box<dyn Vm>> {
    let specs = [
        GuestSpec::example("vm1", VM_IFACE, 2),
        GuestSpec::example("vm2", VM2_IFACE, 3),
    ];
    if guest::available() {
        let host = site.host.name.clone();
        let specs2 = specs.clone();
        let booted = std::panic::catch_unwind(move || {
            let starting: Vec<_> = specs2.iter().map(|s| Guest::start(&host, s)).collect();
            starting.into_iter().map(|s| s.wait()).collect::<Vec<_>>()
        });
        match booted {
            Ok(guests) => {
                for g in &guests {
                    println!("  {} booted in {:.1?}", g.name, g.booted_in);
                }
                return guests
                    .into_iter()
                    .map(|g| Box::new(g) as Box<dyn Vm>)
                    .collect();
            }
            Err(_) => println!("  the guests did not boot (above); namespaces stand in for them"),
        }
    } else {
        println!(
            "  no guest images in {} (cargo xtask guest builds them); namespaces stand in for the VMs",
            guest::image_dir().display()
        );
    }
    specs
        .iter()
        .map(|s| {
            let _ = try_sh(&format!("ip -n {} link del {}", site.host.name, s.tap));
            Box::new(NsVm::start(site, s)) as Box<dyn Vm>
        })
        .collect()
}

/// The examples, with the after-hours window moved to start `lead` from now (UTC), so
/// the time-of-day change happens while you watch.
fn examples_with_evening_in(lead: Duration) -> (std::path::PathBuf, String) {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let dir =
        std::env::temp_dir().join(format!("persona-examples-p-demo-{}-0", std::process::id()));
    let _ = try_sh(&format!("rm -rf {d} && cp -r {src} {d}", d = dir.display()));
    let now = jiff::Timestamp::now();
    let at = |d: Duration| {
        (now + jiff::SignedDuration::try_from(d).unwrap())
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .strftime("%H:%M:%S")
            .to_string()
    };
    let rules = dir.join("rules/rules.yaml");
    let text = std::fs::read_to_string(&rules).expect("example rules");
    let original = r#"schedule: { timezone: Europe/Berlin, from: "19:00", to: "07:00" }"#;
    assert!(
        text.contains(original),
        "the example after-hours rule changed"
    );
    let (from, to) = (at(lead), at(lead + Duration::from_secs(3600)));
    std::fs::write(
        &rules,
        text.replace(
            original,
            &format!(r#"schedule: {{ timezone: UTC, from: "{from}", to: "{to}" }}"#),
        ),
    )
    .expect("writing the demo rules");
    println!(
        "  (for the demo, after-hours starts at {from} UTC, {}s from now, instead of 19:00 Berlin)",
        lead.as_secs()
    );
    (dir, from)
}

fn main() {
    ctrlc::set_handler(|| {
        println!("\ninterrupted: stopping the guests and the daemon, removing namespaces and pins");
        clean_up();
        std::process::exit(130);
    })
    .expect("installing the Ctrl-C handler");
    let fleet = std::env::args().any(|a| a == "--fleet");
    let result = std::panic::catch_unwind(if fleet { fleet::run } else { run });
    clean_up();
    if result.is_err() {
        std::process::exit(1);
    }
}

fn run() {
    step("the lab");
    println!(
        "  vm1 (guest 198.18.0.2) ─ pvm1 ┐\n  vm2 (guest 198.18.0.3) ─ pvm2 ┴─ host: persona daemon, tc (tcx) on each tap ─ up0 ─ outside {OUTSIDE} (HTTP :8000, DNS 198.51.100.53)"
    );
    let site = Site::new();
    println!("  QEMU accelerator: {}", guest::accelerator().1);
    let daemon = Daemon::start_with(
        &site,
        // Short dwell and cool-down so the scenario fits in a minute.
        &[
            "--min-dwell",
            "2",
            "--cooldown",
            "5",
            "--app-observe-secs",
            "1",
        ],
    );
    let vms = boot(&site);
    let mut s = Scenario {
        site,
        daemon,
        vms,
        seen: 0,
    };

    step("apply the example personas, devices, applications and rules");
    let lead = Duration::from_secs(20);
    let (examples, evening) = examples_with_evening_in(lead);
    for dir in [examples.clone(), examples.join("rules")] {
        print!(
            "{}",
            s.daemon.cli_ok(&format!("apply -f {}", dir.display()))
        );
    }
    print!("{}", s.daemon.cli_ok("get personas"));
    s.events();

    step("each VM on its starting persona");
    s.show();
    let (_, smtp) = s.vm("vm2").run(&format!("nc -w 3 {OUTSIDE} 25 </dev/null"));
    println!("  vm2 to smtp on the outside: {:?}", smtp.trim());

    step("time of day: after-hours begins for the research team (vm2)");
    s.wait_for("vm2", "lab-night", lead + Duration::from_secs(30));
    println!("  the window opened at {evening} UTC; the rule engine woke at that instant:");
    s.events();
    s.show();
    let (rc, _) = s.vm("vm2").run(&format!("nc -w 3 {OUTSIDE} 25 </dev/null"));
    println!(
        "  vm2 to smtp now: {}",
        if rc == 0 {
            "connected"
        } else {
            "blocked by lab-night's egress rules"
        }
    );

    step("an application starts: vm1 joins a video call (zoom, port 8801)");
    let answer = s
        .vm("vm1")
        .ok(&format!("nc -w 3 {OUTSIDE} 8801 </dev/null"));
    println!("  zoom server answered {:?}", answer.trim());
    let took = s.wait_for("vm1", "travel", Duration::from_secs(30));
    println!("  the datapath saw the flow; the rule engine shifted vm1 within {took:.1?}");
    s.events();
    s.show();

    step("a security alert: someone scans vm1's address from the outside");
    let scan = s.site.out.try_exec(
        "for p in $(seq 20 49); do timeout 0.3 bash -c \"</dev/tcp/203.0.113.20/$p\" 2>/dev/null; done",
    );
    drop(scan);
    println!("  198.51.100.7 tried 30 ports of 203.0.113.20, one every 0.3 s at most");
    s.wait_for("vm1", "hardened", Duration::from_secs(30));
    println!(
        "  the datapath reported the drops, the daemon raised a port-scan alert, lockdown moved vm1 to hardened"
    );
    s.events();
    s.show();

    step("counters");
    s.counters();
    println!("\n(cleaning up: guests, daemon, namespaces and pins)");
}
