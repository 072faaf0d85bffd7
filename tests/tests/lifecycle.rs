//! Devices that come and go: a VM restart deletes its interface and makes it again under a
//! new ifindex. The daemon cleans up the old ifindex's wiring when the interface goes and
//! attaches the device again, on the persona the store says, when it comes back.

use hyper::Method;
use persona_tests::{
    capture::Capture,
    daemon::{Daemon, metric_sum},
    inspect::snapshot,
    lab::{Lab, UPLINK, VM_IFACE, VmLink, wait_until},
};

const OFFICE: &str = "203.0.113.10";

fn announced(lab: &Lab) -> bool {
    let state = lab.host.exec("ip neigh show proxy dev up0; ip rule show");
    state
        .lines()
        .any(|l| l.split_whitespace().any(|w| w == OFFICE))
}

/// The daemon, with the examples' personas and devices applied.
fn with_examples(lab: &Lab) -> Daemon {
    let d = Daemon::start(lab);
    d.cli_ok("apply -f examples/personas.yaml");
    d.cli_ok("apply -f examples/devices.yaml");
    d
}

/// The VM's interface deleted, and seen gone by the daemon.
fn unlink(lab: &Lab, d: &Daemon) {
    lab.unlink();
    wait_until("vm1's interface is gone", || {
        d.admin(Method::GET, "/status/vm1", None).1["up"] == false
    });
}

#[test]
fn a_restarted_vm_gets_its_persona_back() {
    let lab = Lab::new(VmLink::Veth);
    let d = with_examples(&lab);
    assert_eq!(lab.seen_from_outside().as_deref(), Some(OFFICE));
    d.cli_ok("shift vm1 travel");
    d.cli_ok("shift vm1 office");
    let before: u64 = d.admin(Method::GET, "/status/vm1", None).1["generation"]
        .as_u64()
        .expect("a generation");
    // Telnet from outside is refused by office's default: counted before the restart
    // only.
    assert_eq!(lab.reach_vm(OFFICE, 23), None);
    let refused = || {
        metric_sum(
            &d.metrics(),
            "persona_device_packets_total",
            &[("device", "vm1"), ("reason", "drop_default")],
        )
    };
    let counted = refused();
    assert!(counted > 0);

    lab.unlink();
    wait_until("office is withdrawn with the interface", || {
        !announced(&lab)
    });
    // Audited once the whole of it is gone, a moment after the routes.
    wait_until("the interface's going is audited", || {
        d.cli_ok("events -o json")
            .lines()
            .any(|l| l.contains("\"interface\"") && l.contains("\"gone\"") && l.contains("vm1"))
    });

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
    assert_eq!(
        refused(),
        counted,
        "the counters go on under the new ifindex"
    );
    // Inbound as office allows: ssh to the VM.
    assert_eq!(lab.reach_vm(OFFICE, 22).as_deref(), Some("ssh-ok"));
}

/// A snapshot without what belongs to the VM's own interface (gone in one of the two).
fn without_vm_interface(lab: &Lab) -> Vec<(String, Vec<String>)> {
    snapshot(lab)
        .into_iter()
        .map(|(what, lines)| {
            let lines = lines
                .into_iter()
                .filter(|l| !l.contains(VM_IFACE))
                .collect();
            (what, lines)
        })
        .collect()
}

#[test]
fn deleted_devices_leave_nothing_behind_with_or_without_their_tap() {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start(&lab);
    let pristine = without_vm_interface(&lab);
    d.cli_ok("apply -f examples/personas.yaml");
    d.cli_ok("apply -f examples/devices.yaml");
    assert_eq!(lab.seen_from_outside().as_deref(), Some(OFFICE));
    let settings = lab.host.exec("sysctl -n net.ipv4.conf.up0.forwarding net.ipv6.conf.up0.force_forwarding net.ipv4.ip_forward net.ipv6.conf.all.forwarding");
    assert_eq!(
        settings.split_whitespace().collect::<Vec<_>>(),
        ["1", "1", "0", "0"],
        "forwarding on the interfaces persona uses, not host-wide"
    );

    unlink(&lab, &d);
    d.cli_ok("delete device vm1");
    // vm2's tap is still there: deleted with it.
    d.cli_ok("delete device vm2");
    let after = without_vm_interface(&lab);
    for ((what, was), (_, is)) in pristine.iter().zip(&after) {
        assert_eq!(was, is, "{what}: the host as before the devices");
    }
}

#[test]
fn a_device_whose_interface_is_not_there_yet_is_attached_when_it_appears() {
    let lab = Lab::new(VmLink::Veth);
    lab.unlink();
    let d = with_examples(&lab);
    let (_, status) = d.admin(Method::GET, "/status/vm1", None);
    assert_eq!(status["up"], false, "{status}");
    assert_eq!(status["error"], serde_json::Value::Null, "{status}");

    // The VM sends from the moment its interface exists: nothing may leave with its
    // own address before the programs guard it.
    let capture = Capture::start(&lab.host.name, UPLINK, "ip and not arp");
    let sender = lab.start_spray(8);
    std::thread::sleep(std::time::Duration::from_millis(500));
    lab.relink();
    wait_until("vm1 is seen as office", || {
        lab.seen_from_outside().as_deref() == Some(OFFICE)
    });
    let _ = sender.wait_with_output();
    let packets = capture.stop();
    assert!(
        packets.iter().any(|p| p.contains(&format!("{OFFICE}."))),
        "the capture saw the VM's traffic as office: {packets:?}"
    );
    let leaked: Vec<&String> = packets.iter().filter(|p| p.contains(" 198.18.")).collect();
    assert!(
        leaked.is_empty(),
        "inner addresses on the uplink: {leaked:?}"
    );
}

#[test]
fn a_daemon_started_after_a_tap_vanished_cleans_up_and_attaches_it_again() {
    let lab = Lab::new(VmLink::Veth);
    let mut d = with_examples(&lab);
    assert!(announced(&lab));
    d.kill();
    lab.unlink();
    d.restart();
    assert!(!announced(&lab), "the old ifindex's wiring is gone");
    let (_, status) = d.admin(Method::GET, "/status/vm1", None);
    assert_eq!(status["up"], false, "{status}");
    lab.relink();
    wait_until("vm1 is seen as office again", || {
        lab.seen_from_outside().as_deref() == Some(OFFICE)
    });
}

#[test]
fn interfaces_that_must_not_carry_a_device_are_refused() {
    let lab = Lab::new(VmLink::Veth);
    let d = with_examples(&lab);
    lab.host
        .exec("ip link add pbr0 type bridge && ip tuntap add ptun0 mode tun");
    let before = snapshot(&lab);
    let devices = d.admin(Method::GET, "/devices", None).1;
    for (interface, why) in [
        (UPLINK, "it is an uplink"),
        ("pbr0", "it is a bridge device"),
        ("ptun0", "it is a tun device, not a tap"),
        (VM_IFACE, "Device \"vm1\" is on \"pvm1\""),
    ] {
        let body = serde_json::json!({
            "metadata": {"name": "intruder"},
            "spec": {"interface": interface, "innerV4": "198.18.0.9"}
        });
        let (code, err) = d.admin(Method::POST, "/devices", Some(&body));
        assert_eq!(code, 422, "{interface}: {err}");
        let text = err["error"].as_str().unwrap_or_default();
        assert!(
            text.contains("spec.interface") && text.contains(why),
            "{interface}: {text}"
        );
    }
    assert_eq!(d.admin(Method::GET, "/devices", None).1, devices);
    let after = snapshot(&lab);
    for ((what, was), (_, is)) in before.iter().zip(&after) {
        assert_eq!(was, is, "{what} after refused devices");
    }
}

#[test]
fn a_device_follows_its_vm_to_a_tap_of_another_name_by_mac() {
    let lab = Lab::new(VmLink::Veth);
    let d = with_examples(&lab);
    unlink(&lab, &d);
    // libvirt's tap for the guest 52:54:00:00:00:02, under a name of its choosing.
    lab.relink_as("vnet7", Some("fe:54:00:00:00:02"));
    wait_until("vm1 is seen as office on vnet7", || {
        lab.seen_from_outside().as_deref() == Some(OFFICE)
    });
    let (_, status) = d.admin(Method::GET, "/status/vm1", None);
    assert_eq!(status["interface"], "vnet7", "{status}");
    assert_eq!(status["up"], true, "{status}");
    let events = d.cli_ok("events -o json");
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"moved\"") && l.contains("vnet7")),
        "{events}"
    );
    // A tap whose MAC is no device's VM is left alone.
    lab.host
        .exec("ip link add vnet8 address fe:54:00:00:00:99 type veth peer name vnet8p && ip link set vnet8 up");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let devices = d.admin(Method::GET, "/devices", None).1.to_string();
    assert!(!devices.contains("vnet8"), "{devices}");
}
