//! `cargo xtask demo --fleet`: three hosts on one etcd cluster of three members, each
//! with a VM namespace, on one outside network. Personas are defined once, on host a;
//! the VM on host c is shifted from host a's CLI; the VM on host a migrates to host b
//! while it pings the outside.
use std::time::Duration;

use persona_tests::{
    fleet::{FleetLab, converges},
    lab::OUTSIDE,
};

use super::step;

fn show(fleet: &FleetLab, vms: &[usize]) {
    for &i in vms {
        let seen = fleet
            .seen_from_outside(i)
            .unwrap_or_else(|| "nothing".into());
        println!(
            "  vm-{} (configured as 198.18.0.2): outside sees {seen}",
            fleet.hosts[i]
        );
    }
}

pub fn run() {
    step("three hosts, one etcd cluster (three members), one outside network");
    println!(
        "  etcd ×3 ─ 198.19.250.0/24 ─ hosts a, b, c (persona daemon --store etcd://... --host NAME)\n  vm-a ─ a ┐\n  vm-b ─ b ┼─ bridge ─ outside {OUTSIDE}\n  vm-c ─ c ┘"
    );
    let fleet = FleetLab::new(&["a", "b", "c"]);
    let [a, b, c] = [&fleet.daemons[0], &fleet.daemons[1], &fleet.daemons[2]];

    step("personas defined once, through host a; host c reads them");
    print!("{}", a.cli_ok("apply -f examples/personas.yaml"));
    a.apply_yaml(&fleet.device(0, "office"));
    a.apply_yaml(&fleet.device(2, "lab"));
    print!("{}", c.cli_ok("get personas"));
    converges("the VMs on their personas", || {
        fleet.seen_from_outside(0).as_deref() == Some("203.0.113.10")
            && fleet.seen_from_outside(2).as_deref() == Some("203.0.113.30")
    });
    show(&fleet, &[0, 2]);

    step("vm-c runs on host c; host a's CLI shifts it");
    print!("{}", a.cli_ok("shift vm-c travel"));
    show(&fleet, &[2]);
    print!("{}", b.cli_ok("status vm-c"));

    step("vm-a migrates from host a to host b while it pings the outside");
    fleet.link(0, 1);
    let ping = std::process::Command::new("ip")
        .args(["netns", "exec", &fleet.vms[0].name])
        .args([
            "ping", "-n", "-q", "-i", "0.05", "-c", "100", "-W", "1", OUTSIDE,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_secs(1));
    print!("{}", a.cli_ok("migrate vm-a --to b --no-wait"));
    converges("host b ready", || {
        b.admin(hyper::Method::GET, "/devices/vm-a/migration", None)
            .1["phase"]
            == "ready"
    });
    println!("  host b runs office for vm-a, gated; host a still answers for 203.0.113.10");
    std::thread::sleep(Duration::from_secs(1));
    println!("  the hypervisor moves the VM: its link to a goes quiet, it comes up on b");
    fleet.move_over(0);
    converges("the migration done", || {
        b.admin(hyper::Method::GET, "/devices/vm-a/migration", None)
            .1["phase"]
            == "done"
    });
    let (_, m) = a.admin(hyper::Method::GET, "/devices/vm-a/migration", None);
    println!(
        "  cut over at the VM's first frame on b, {} ms after b was ready",
        m["waitedMs"]
    );
    let out = ping.wait_with_output().expect("ping");
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(2) {
        println!("  ping: {line}");
    }
    show(&fleet, &[0]);
    print!("{}", c.cli_ok("status vm-a"));

    step("the audit log: one for the fleet, read here from host c");
    let events = c.cli_ok("events");
    for line in events
        .lines()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("  {line}");
    }
    println!("\n(cleaning up: daemons, etcd, namespaces and pins)");
}
