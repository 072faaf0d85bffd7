//! The host's wiring as the kernel holds it, read back in a namespace of its own.
use std::net::IpAddr;

use persona::host::{Host, Wiring as _};
use persona_tests::netns::Netns;

/// What a device's attach withdraws as stray is what `routed` finds: the main table's
/// host routes out of its tap, and nothing the host routes elsewhere or otherwise.
#[test]
fn the_host_routes_out_of_a_tap_are_found_among_many_others() {
    let ns = Netns::new("p-host");
    ns.exec(
        "for t in t1 t2; do ip link add $t type veth peer name ${t}p && ip link set $t up && ip link set ${t}p up; done",
    );
    let mut batch = String::new();
    // A host's table as thousands of devices make it: host routes out of other taps.
    for i in 0..2000 {
        batch.push_str(&format!(
            "route add 198.18.{}.{}/32 dev t2\n",
            i / 250,
            i % 250 + 1
        ));
    }
    for route in [
        "203.0.113.77/32 dev t1",
        "203.0.113.78/32 dev t1 proto static",
        "203.0.113.0/24 dev t1",
        "203.0.113.79/32 dev t1 table 100",
        "203.0.113.80/32 dev t2",
        "2001:db8::77/128 dev t1",
        "2001:db8::78/128 dev t2",
    ] {
        batch.push_str(&format!("route add {route}\n"));
    }
    persona_tests::netns::ip_batch(&ns.name, &batch);

    let name = ns.name.clone();
    let routed = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{name}")).expect("netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let t1 = nix::net::if_::if_nametoindex("t1").expect("t1");
        let host = Host::new(&[], None).expect("host wiring");
        // A tap gone by the time it is asked about routes nothing; it is no error.
        assert!(host.routed(t1 + 1000).expect("a tap gone").is_empty());
        host.routed(t1).expect("routed")
    })
    .join()
    .expect("the namespace's thread");
    let mut routed: Vec<IpAddr> = routed;
    routed.sort();
    let expected: Vec<IpAddr> = ["203.0.113.77", "203.0.113.78", "2001:db8::77"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(routed, expected);
}
