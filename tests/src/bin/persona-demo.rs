//! `cargo xtask demo`: a VM namespace behind a veth pair, an outside namespace with a
//! TCP service and a DNS server, two personas, a shift, and the counters. Everything it
//! creates is removed when it ends.
use persona_tests::lab::{Lab, OUTSIDE, VmLink};

fn step(title: &str) {
    println!("\n== {title}");
}

fn main() {
    step("lab: vm 198.18.0.2 ─ host (persona) ─ outside 198.51.100.7, resolver 198.51.100.53");
    let lab = Lab::new(VmLink::Veth);
    print!("{}", lab.persona_ok("datapath attach vm1 -f examples/"));

    step("the VM connects to the outside; the outside answers with the address it saw");
    println!(
        "outside saw: {}",
        lab.seen_from_outside().unwrap_or_else(|| "nothing".into())
    );
    let dns = lab
        .vm
        .exec("dig +short +time=2 +tries=1 @192.0.2.53 persona.test");
    println!(
        "dig @192.0.2.53 persona.test (answered by the persona's resolver): {}",
        dns.trim()
    );
    println!(
        "ssh from outside to 203.0.113.10: {:?}",
        lab.reach_vm("203.0.113.10", 22)
    );
    println!(
        "telnet from outside to 203.0.113.10: {:?} (ingress default: drop)",
        lab.reach_vm("203.0.113.10", 23)
    );

    step("shift vm1 to the travel persona");
    print!(
        "{}",
        lab.persona_ok("datapath shift pvm1 travel -f examples/")
    );
    println!(
        "outside saw: {}",
        lab.seen_from_outside().unwrap_or_else(|| "nothing".into())
    );
    println!(
        "ssh from outside to the old address: {:?}",
        lab.reach_vm("203.0.113.10", 22)
    );

    step("counters");
    print!("{}", lab.persona_ok("datapath status pvm1"));
    lab.persona_ok("datapath detach pvm1");
    println!("\n(outside was {OUTSIDE}; namespaces removed)");
}
