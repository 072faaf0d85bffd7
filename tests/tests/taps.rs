//! Taps persona makes and the libvirt hook: a device's tap exists, persistent and
//! guarded, before any VM opens it, and goes with the device; libvirt's hook holds a
//! starting domain until its devices are guarded, and fails the start when they cannot
//! be.
use std::{
    io::Write as _,
    process::{Output, Stdio},
};

use persona_tests::{
    daemon::{Daemon, TAP},
    inspect::link_program,
    lab::Site,
};
use serde_json::Value;

const MADE: &str = "pt-made1";

fn device_yaml(name: &str, interface: &str, tap: bool) -> String {
    format!(
        "apiVersion: persona.dev/v1\nkind: Device\nmetadata:\n  name: {name}\nspec:\n  interface: {interface}\n  innerV4: 198.18.0.9\n  mac: \"52:54:00:12:34:56\"\n  gatewayV4: 198.18.0.1\n  persona: office\n{}",
        if tap { TAP } else { "" }
    )
}

/// The programs running on an interface's tcx hooks, by the link pins the daemon keeps
/// for its ifindex (this bpftool predates tcx in `bpftool net`).
fn tc_programs(site: &Site, interface: &str) -> Vec<String> {
    let link: Value =
        serde_json::from_str(&site.host.exec(&format!("ip -j link show {interface}")))
            .expect("ip's JSON");
    let ifindex = link[0]["ifindex"].as_u64().expect("an ifindex");
    ["tc-in", "tc"]
        .iter()
        .filter_map(|hook| {
            let pin = site.pin_dir.join("links").join(format!("{ifindex}-{hook}"));
            link_program(&pin).map(|id| format!("{hook} prog {id}"))
        })
        .collect()
}

fn gone(site: &Site, interface: &str) -> bool {
    !site
        .host
        .try_exec(&format!("ip link show {interface}"))
        .status
        .success()
}

#[test]
fn a_tap_persona_makes_is_guarded_before_any_vm_opens_it_and_goes_with_its_device() {
    let site = Site::new();
    let d = Daemon::start(&site);
    d.cli_ok("apply -f examples/personas.yaml");
    d.apply_yaml(&device_yaml("vm9", MADE, true));

    let details = site.host.exec(&format!("ip -d link show {MADE}"));
    for what in [
        "tun type tap",
        "vnet_hdr on",
        "multi_queue",
        "persist on",
        ",UP",
    ] {
        assert!(details.contains(what), "{what}: {details}");
    }
    let programs = tc_programs(&site, MADE);
    assert_eq!(
        programs.len(),
        2,
        "both directions guarded with no VM on the tap: {programs:?}"
    );
    let (_, status) = d.admin(hyper::Method::GET, "/status/vm9", None);
    assert_eq!(status["up"], true, "{status}");
    assert_eq!(status["persona"], "office", "{status}");

    d.cli_ok("delete device vm9");
    assert!(gone(&site, MADE), "the tap went with its device");
}

#[test]
fn persona_tap_makes_and_deletes_persistent_taps() {
    let site = Site::new();
    let made = site.persona_ok("tap create pt-cli1 --single-queue");
    assert!(made.contains("pt-cli1: made"), "{made}");
    let details = site.host.exec("ip -d link show pt-cli1");
    assert!(
        details.contains("persist on") && details.contains("vnet_hdr on"),
        "{details}"
    );
    assert!(!details.contains("multi_queue"), "{details}");
    assert!(
        site.persona_ok("tap create pt-cli1")
            .contains("already there")
    );
    site.persona_ok("tap delete pt-cli1");
    assert!(gone(&site, "pt-cli1"));
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/fixtures/libvirt/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("a libvirt fixture")
}

/// `persona hook libvirt DOMAIN OPERATION SUBOP -` as libvirt runs it.
fn hook(site: &Site, d: &Daemon, operation: &str, subop: &str, xml: &str) -> Output {
    let mut child = site
        .persona(&format!(
            "--server unix:{} --data-dir {} hook libvirt pt-lv-premade {operation} {subop} - --timeout-secs 2",
            d.socket.display(),
            d.data_dir.display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("persona hook");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    child.wait_with_output().expect("the hook")
}

#[test]
fn the_libvirt_hook_holds_a_domain_until_its_devices_are_guarded() {
    let site = Site::new();
    let d = Daemon::start(&site);
    d.cli_ok("apply -f examples/personas.yaml");
    let start = fixture("premade/start-begin.xml");

    // No device is any of the domain's interfaces: nothing to wait for.
    let out = hook(&site, &d, "start", "begin", &start);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A device on the domain's tap, which is not there: the start fails, and says why.
    d.apply_yaml(&device_yaml("vm9", "pt-lv1", false));
    let out = hook(&site, &d, "start", "begin", &start);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("device vm9 on pt-lv1 is not guarded after 2s"),
        "{err}"
    );
    // Operations that start nothing never wait.
    for (op, sub, file) in [
        ("stopped", "end", "premade/stopped-end.xml"),
        ("release", "end", "premade/release-end.xml"),
    ] {
        assert!(hook(&site, &d, op, sub, &fixture(file)).status.success());
    }

    // persona makes the tap: guarded at prepare already, before libvirt opens it.
    d.apply_yaml(&device_yaml("vm9", "pt-lv1", true));
    for (op, file) in [
        ("prepare", "premade/prepare-begin.xml"),
        ("start", "premade/start-begin.xml"),
        ("started", "premade/started-begin.xml"),
    ] {
        let out = hook(&site, &d, op, "begin", &fixture(file));
        assert!(
            out.status.success(),
            "{op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    d.cli_ok("delete device vm9");

    // Not a domain: refused, naming what it got.
    let out = hook(&site, &d, "start", "begin", "<network/>");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a <domain>"));
}

#[test]
fn a_tap_a_running_vm_holds_is_not_deleted_from_under_it() {
    let site = Site::new();
    let d = Daemon::start(&site);
    d.cli_ok("apply -f examples/personas.yaml");
    d.apply_yaml(&device_yaml("vm9", MADE, true).replace("multiQueue: true", "multiQueue: false"));
    // The VM: QEMU holding the tap's only queue.
    let vm = persona_tests::tap::open_tap(&site.host.name, MADE);
    let out = d.cli("delete device vm9");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("held by a running VM"), "{err}");
    let (_, status) = d.admin(hyper::Method::GET, "/status/vm9", None);
    assert_eq!(status["up"], true, "still guarded: {status}");
    assert_eq!(tc_programs(&site, MADE).len(), 2);

    // The VM stopped: the device and its tap go.
    drop(vm);
    d.cli_ok("delete device vm9");
    assert!(gone(&site, MADE));
}
