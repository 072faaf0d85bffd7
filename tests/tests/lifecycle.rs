//! Devices that come and go: a VM restart deletes its interface and makes it again under a
//! new ifindex. The daemon cleans up the old ifindex's wiring when the interface goes and
//! attaches the device again, on the persona the store says, when it comes back.

use hyper::Method;
use persona_tests::{
    daemon::Daemon,
    lab::{Lab, VmLink, wait_until},
};

const OFFICE: &str = "203.0.113.10";

fn announced(lab: &Lab) -> bool {
    let state = lab.host.exec("ip neigh show proxy dev up0; ip rule show");
    state
        .lines()
        .any(|l| l.split_whitespace().any(|w| w == OFFICE))
}

#[test]
fn a_restarted_vm_gets_its_persona_back() {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/personas.yaml");
    d.cli_ok("apply -f examples/devices.yaml");
    assert_eq!(lab.seen_from_outside().as_deref(), Some(OFFICE));
    d.cli_ok("shift vm1 travel");
    d.cli_ok("shift vm1 office");
    let before: u64 = d.admin(Method::GET, "/status/vm1", None).1["generation"]
        .as_u64()
        .expect("a generation");

    lab.unlink();
    wait_until("office is withdrawn with the interface", || {
        !announced(&lab)
    });
    let events = d.cli_ok("events -o json");
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"interface\"") && l.contains("\"gone\"") && l.contains("vm1")),
        "{events}"
    );

    let (_, status) = d.admin(Method::GET, "/status/vm1", None);
    assert_eq!(status["up"], false, "{status}");
    assert_eq!(
        status["persona"], "office",
        "the device and its state stay: {status}"
    );
    assert!(d.metrics().contains("persona_device_up{device=\"vm1\"} 0"));

    lab.relink();
    wait_until("vm1 is seen as office again", || {
        lab.seen_from_outside().as_deref() == Some(OFFICE)
    });
    assert!(announced(&lab));
    let (_, status) = d.admin(Method::GET, "/status/vm1", None);
    assert_eq!(status["persona"], "office", "{status}");
    assert_eq!(status["up"], true, "{status}");
    assert!(d.metrics().contains("persona_device_up{device=\"vm1\"} 1"));
    assert!(
        status["generation"].as_u64().unwrap() > before,
        "a new generation on the new interface: {status}"
    );
    // Inbound as office allows: ssh to the VM.
    assert_eq!(lab.reach_vm(OFFICE, 22).as_deref(), Some("ssh-ok"));
}
