//! A shift that fails at any of its steps changes nothing: the maps (as bpftool dumps
//! them), routes, rules, neighbour proxies, links and pins are exactly as before, the
//! VM is still seen as its persona, and the audit log names the step that failed.
use persona_tests::{
    daemon::Daemon,
    inspect::snapshot,
    lab::{Lab, VmLink},
};
use serde_json::Value;

const OFFICE: &str = "203.0.113.10";

fn last_shift(d: &Daemon) -> Value {
    d.cli_ok("events -o json")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("an event"))
        .rfind(|e| e["kind"] == "shift" && e["device"] == "vm1")
        .expect("a shift event")
}

#[test]
fn a_shift_failing_at_any_step_changes_nothing() {
    let lab = Lab::new(VmLink::Veth);
    let mut d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/personas.yaml");
    d.cli_ok("apply -f examples/devices.yaml");
    assert_eq!(lab.seen_from_outside().as_deref(), Some(OFFICE));
    let before = snapshot(&lab);
    for step in [
        "attach",
        "stage",
        "counters",
        "host_routes",
        "tunnel",
        "flip",
        "tls",
        "store",
    ] {
        d.restart_with(&["--fault-at", step]);
        let out = d.cli("shift vm1 travel");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a fault at {step} fails the shift");
        assert!(
            err.contains(&format!("device left on office: {step}: injected fault")),
            "{err}"
        );
        let after = snapshot(&lab);
        for ((what, was), (_, is)) in before.iter().zip(&after) {
            assert_eq!(was, is, "{what} after a fault at {step}");
        }
        assert_eq!(lab.seen_from_outside().as_deref(), Some(OFFICE));
        let event = last_shift(&d);
        assert_eq!(
            event["result"],
            format!("rolled back at {step}: injected fault"),
            "{event}"
        );
        assert_eq!(event["detail"]["failed_step"], step);
    }
    // Without the fault the same shift goes through.
    d.restart_with(&[]);
    d.cli_ok("shift vm1 travel");
    assert_eq!(lab.seen_from_outside().as_deref(), Some("203.0.113.20"));
}
