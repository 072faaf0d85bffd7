//! A shift that fails at any of its steps changes nothing: the maps (as bpftool dumps
//! them), routes, rules, neighbour proxies, links and pins are exactly as before, the
//! VM is still seen as its persona, and the audit log names the step that failed.
use persona_tests::{
    daemon::Daemon,
    lab::{Lab, VmLink},
    netns::sh,
};
use serde_json::Value;

const OFFICE: &str = "203.0.113.10";

/// `bpftool map dump` of a pinned map as (key, value) pairs, values left out for
/// maps that traffic keeps changing.
fn dump(lab: &Lab, map: &str, values: bool) -> Vec<String> {
    let path = lab.pin_dir.join(map);
    // Not through `ip netns exec`, which remounts /sys and hides the pins.
    let out = sh(&format!("bpftool -j map dump pinned {}", path.display()));
    let entries: Vec<Value> = serde_json::from_str(&out).expect("bpftool's JSON");
    let mut rows: Vec<String> = entries
        .iter()
        .filter(|e| values || e.get("key").is_some())
        .map(|e| {
            if values {
                e.to_string()
            } else {
                e["key"].to_string()
            }
        })
        .collect();
    rows.sort();
    rows
}

/// PERSONAS without slot 0, whose generation counter only ever grows, and without
/// the slots that hold nothing.
fn tables(lab: &Lab) -> Vec<String> {
    let zero = |v: &Value| {
        v.as_array()
            .is_some_and(|b| b.iter().all(|x| x.as_str() == Some("0x00")))
    };
    let path = lab.pin_dir.join("PERSONAS");
    let out = sh(&format!("bpftool -j map dump pinned {}", path.display()));
    let entries: Vec<Value> = serde_json::from_str(&out).expect("bpftool's JSON");
    entries
        .iter()
        .filter(|e| !zero(&e["value"]) && !zero(&e["key"]))
        .map(|e| e.to_string())
        .collect()
}

fn snapshot(lab: &Lab) -> Vec<(String, Vec<String>)> {
    let mut out = vec![
        ("ACTIVE".into(), dump(lab, "ACTIVE", true)),
        ("DEVICES".into(), dump(lab, "DEVICES", true)),
        ("HOST_WIRING".into(), dump(lab, "HOST_WIRING", true)),
        ("DRAINS".into(), dump(lab, "DRAINS", true)),
        ("FLOW_BUDGET".into(), dump(lab, "FLOW_BUDGET", false)),
        ("FW_V4".into(), dump(lab, "FW_V4", true)),
        ("FW_V6".into(), dump(lab, "FW_V6", true)),
        ("COUNTERS".into(), dump(lab, "COUNTERS", false)),
        ("PERSONAS".into(), tables(lab)),
    ];
    for (what, cmd) in [
        (
            "routes",
            "ip -4 route show table all; ip -6 route show table all",
        ),
        ("rules", "ip rule show; ip -6 rule show"),
        ("proxies", "ip neigh show proxy"),
        ("links", "ip -o link show | awk '{print $2}'"),
    ] {
        // The kernel's own routes (link-local addresses appear when they like) are not
        // the shift's.
        let mut lines: Vec<String> = lab
            .host
            .exec(cmd)
            .lines()
            .filter(|l| !l.contains("proto kernel"))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines.dedup();
        out.push((what.into(), lines));
    }
    let pins = sh(&format!("find {} | sort", lab.pin_dir.display()));
    out.push(("pins".into(), pins.lines().map(str::to_owned).collect()));
    out
}

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
