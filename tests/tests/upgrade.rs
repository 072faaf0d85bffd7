//! Upgrades: a new daemon's programs replace the running ones through BPF_LINK_UPDATE,
//! with the traffic flowing, and maps pinned with another layout are refused with what
//! to do about them.
use persona_tests::{
    daemon::Daemon,
    inspect::link_program,
    lab::{Lab, Site, VmLink, finish_probe},
    netns::sh,
};

const OFFICE: &str = "203.0.113.10";

/// The program each pinned link runs, by pin.
fn link_programs(site: &Site) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(site.pin_dir.join("links"))
        .expect("the link pins")
        .map(|e| e.expect("a pin").path())
        .map(|pin| {
            let name = pin.file_name().unwrap().to_string_lossy().into_owned();
            (name, link_program(&pin).expect("a program id"))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_new_daemon_replaces_the_programs_under_traffic_and_loses_nothing() {
    let lab = Lab::new(VmLink::Veth);
    let mut d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/personas.yaml");
    d.cli_ok("apply -f examples/devices.yaml");
    assert_eq!(lab.seen_from_outside().as_deref(), Some(OFFICE));
    let before = link_programs(&lab);
    assert!(before.len() >= 2, "{before:?}");

    let probe = lab.start_probe(3000, 1.0);
    std::thread::sleep(std::time::Duration::from_millis(700));
    // The old daemon goes without a word, as an upgrade's stop may; the new one loads
    // its own programs and swaps them in.
    d.kill();
    d.restart();
    let probe = finish_probe(probe);
    let after = link_programs(&lab);

    assert_eq!(
        before.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        after.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        "the same links, pinned where they were"
    );
    for ((pin, was), (_, is)) in before.iter().zip(&after) {
        assert_ne!(was, is, "{pin} runs the new daemon's program");
    }
    assert_eq!(
        probe.received, probe.sent,
        "lost across the swap: {:?}",
        probe.missing
    );
    assert_eq!(
        probe.by_addr.keys().collect::<Vec<_>>(),
        [OFFICE],
        "{:?}",
        probe.by_addr
    );
}

#[test]
fn maps_pinned_with_another_layout_are_refused_with_what_to_do() {
    let site = Site::new();
    std::fs::create_dir_all(&site.pin_dir).expect("the pin directory");
    // ACTIVE as an older release might have had it: a smaller value.
    sh(&format!(
        "bpftool map create {}/ACTIVE type hash key 4 value 8 entries 4096 name ACTIVE flags 1",
        site.pin_dir.display()
    ));
    let data = format!("/tmp/persona-test-layout-{}", std::process::id());
    let out = site
        .persona(&format!(
            "--data-dir {data} daemon --socket {data}/persona.sock"
        ))
        .output()
        .expect("running persona");
    let _ = std::fs::remove_dir_all(&data);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("ACTIVE: pinned type 1, key 4 B, value 8 B")
            && err.contains("persona datapath reset"),
        "{err}"
    );

    let reset = site.persona_ok("datapath reset");
    assert!(reset.contains("1 maps unpinned"), "{reset}");
    // The daemon starts on fresh maps.
    let d = Daemon::start(&site);
    d.cli_ok("get devices");
}
