//! `cargo xtask demo`: the daemon on its default embedded store, a VM namespace behind a
//! veth pair, an outside namespace with a TCP service and a DNS server, the example
//! personas applied, a shift through the API, the counters and the audit log. Everything
//! it creates is removed when it ends.
use persona_tests::{
    daemon::Daemon,
    lab::{Lab, OUTSIDE, VmLink},
};

fn step(title: &str) {
    println!("\n== {title}");
}

fn show(lab: &Lab) {
    println!(
        "outside saw the VM as: {}",
        lab.seen_from_outside().unwrap_or_else(|| "nothing".into())
    );
    let dns = lab
        .vm
        .exec("dig +short +time=2 +tries=1 @192.0.2.53 persona.test");
    println!(
        "dig @192.0.2.53 persona.test, answered by the persona's resolver: {}",
        dns.trim()
    );
    println!(
        "ssh from outside to 203.0.113.10: {:?}",
        lab.reach_vm("203.0.113.10", 22)
    );
}

fn main() {
    step(
        "lab: vm 198.18.0.2 ─ host (persona daemon) ─ outside 198.51.100.7, resolver 198.51.100.53",
    );
    let lab = Lab::new(VmLink::Veth);
    let daemon = Daemon::start(&lab);
    print!("{}", daemon.cli_ok("apply -f examples/"));
    print!("{}", daemon.cli_ok("get personas"));

    step("vm1 on its starting persona");
    show(&lab);

    step("what a shift to travel would do (dry run)");
    print!("{}", daemon.cli_ok("shift vm1 travel --dry-run"));

    step("shift vm1 to travel");
    print!("{}", daemon.cli_ok("shift vm1 travel"));
    show(&lab);

    step("status and audit log");
    print!("{}", daemon.cli_ok("status vm1"));
    print!("{}", daemon.cli_ok("events"));
    println!("\n(outside was {OUTSIDE}; daemon stopped, namespaces removed)");
}
