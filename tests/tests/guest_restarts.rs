//! A real VM restarted as on a hypervisor: QEMU killed and started again on the tap
//! persona made for it, then on a tap someone else made. The guest has its persona back
//! each time, and a capture on the uplink for the whole run never shows its own address.
use persona_tests::{
    capture::Capture,
    daemon::{Daemon, TAP},
    guest::{Guest, GuestSpec, Vm},
    lab::{Site, UPLINK, VM_IFACE},
};

const OFFICE: &str = "203.0.113.10";

/// The examples' vm1, with a tap persona makes when `tap`.
fn vm1(tap: bool) -> String {
    let examples = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/devices.yaml"
    ))
    .expect("the example devices");
    let vm1 = examples.split("---").next().expect("vm1 first").trim_end();
    format!("{vm1}\n{}", if tap { TAP } else { "" })
}

#[test]
fn a_restarted_guest_gets_its_persona_back_and_never_leaks_its_address() {
    let site = Site::new();
    let d = Daemon::start(&site);
    d.cli_ok("apply -f examples/personas.yaml");
    let inner = Capture::start(&site.host.name, UPLINK, "net 198.18.0.0/15");
    let spec = GuestSpec::example("vm1", VM_IFACE, 2);

    d.apply_yaml(&vm1(true));
    for boot in ["on the tap persona made", "again on the same tap"] {
        let mut vm = Guest::boot(&site.host.name, &spec);
        assert_eq!(vm.identity(&site), OFFICE, "{boot}");
        // QEMU killed, as a crashed or destroyed VM: the tap stays, guarded.
        drop(vm);
        let (_, status) = d.admin(hyper::Method::GET, "/status/vm1", None);
        assert_eq!(status["up"], true, "{boot}: {status}");
    }

    // A tap made elsewhere (here by the test, as a hypervisor's own scripts would).
    d.cli_ok("delete device vm1");
    d.apply_yaml(&vm1(false));
    let mut vm = Guest::boot(&site.host.name, &spec);
    assert_eq!(vm.identity(&site), OFFICE, "on a tap persona did not make");
    drop(vm);

    let leaked = inner.stop();
    assert!(
        leaked.is_empty(),
        "the guest's own address on the uplink: {leaked:?}"
    );
}
