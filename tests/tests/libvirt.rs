//! A real libvirt (its own daemon, QEMU under software emulation) with `persona hook
//! libvirt` as its QEMU hook: a domain on a tap persona made, and one on a tap libvirt
//! makes (a vnetN, followed by the guest's MAC), each start held until the device is
//! guarded. The guests are seen as their personas, also after a restart on a new vnetN,
//! and a capture on the uplink for the whole run never shows their own addresses.
use persona_tests::{
    capture::Capture,
    daemon::{Daemon, TAP},
    guest::{GuestSpec, Starting, Vm},
    lab::{Site, UPLINK, VM_IFACE, persona_bin},
    libvirt::{Libvirt, Nic},
};

#[test]
fn libvirt_starts_domains_only_once_persona_guards_them() {
    let site = Site::new();
    let d = Daemon::start(&site);
    d.cli_ok("apply -f examples/personas.yaml");
    let examples = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/devices.yaml"
    ))
    .unwrap();
    let (vm1, vm2) = examples.split_once("---").expect("two devices");
    // vm2's stored interface never appears: libvirt names its tap.
    d.apply_yaml(&format!("{}\n{TAP}---{vm2}", vm1.trim_end()));
    let hook = format!(
        "#!/bin/sh\nexec {} --server unix:{} --data-dir {} hook libvirt \"$@\"\n",
        persona_bin().display(),
        d.socket.display(),
        d.data_dir.display()
    );
    let libvirt = Libvirt::start(&site, &hook);
    let inner = Capture::start(&site.host.name, UPLINK, "net 198.18.0.0/15");

    let spec1 = GuestSpec::example("vm1", VM_IFACE, 2);
    let spec2 = GuestSpec::example("vm2", "-", 3);
    let booting: [Starting; 2] = [
        libvirt.start_guest(&spec1, Nic::Premade(VM_IFACE)),
        libvirt.start_guest(&spec2, Nic::Managed),
    ];
    let [mut vm1, mut vm2] = booting.map(Starting::wait);
    assert_eq!(vm1.identity(&site), "203.0.113.10");
    assert_eq!(vm2.identity(&site), "203.0.113.30");
    let first = libvirt.tap_of("vm2");
    assert!(first.starts_with("vnet"), "{first}");
    let (_, status) = d.admin(hyper::Method::GET, "/status/vm2", None);
    assert_eq!(status["interface"], first.as_str(), "{status}");

    // Destroyed and started again: libvirt makes another tap, the device follows.
    drop(vm2);
    libvirt.destroy("vm2");
    let mut vm2 = libvirt.start_guest(&spec2, Nic::Managed).wait();
    assert_eq!(vm2.identity(&site), "203.0.113.30");
    let second = libvirt.tap_of("vm2");
    assert_ne!(first, second, "a new tap for the new start");
    drop(vm1);
    drop(vm2);

    let leaked = inner.stop();
    assert!(
        leaked.is_empty(),
        "a guest's own address on the uplink: {leaked:?}"
    );
}
