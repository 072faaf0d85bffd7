//! A long-lived TCP connection from the VM across a shift through the daemon, in each
//! mode: `keep` finishes every line on the old address while new connections use the
//! new one, and the old address is withdrawn once the connection ends; `move` breaks
//! it (the far end knows the old address); `cut` resets it at once.
use std::time::{Duration, Instant};

use hyper::Method;
use persona_tests::{
    daemon::Daemon,
    lab::{Lab, VmLink, finish_stream, wait_until},
};

const OFFICE: &str = "203.0.113.10";
const TRAVEL: &str = "203.0.113.20";

/// Whether the host still routes, announces or steers `addr` for the VM.
fn wired(lab: &Lab, addr: &str) -> bool {
    let state = lab
        .host
        .exec("ip route show dev pvm1; ip neigh show proxy dev up0; ip rule show");
    state
        .lines()
        .any(|l| l.split_whitespace().any(|w| w == addr))
}

fn draining(d: &Daemon) -> Vec<(String, u64)> {
    let (status, s) = d.admin(Method::GET, "/status/vm1", None);
    assert_eq!(status, 200, "{s}");
    s["draining"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            (
                d["address"].as_str().unwrap_or_default().to_owned(),
                d["flows"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn open_connections_are_kept_moved_or_cut_as_the_shift_says() {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/");
    wait_until("vm1 is seen as office", || {
        lab.seen_from_outside().as_deref() == Some(OFFICE)
    });

    // keep: 20 lines over 4 s, the shift after the first second.
    let stream = lab.start_stream(20, 200);
    std::thread::sleep(Duration::from_secs(1));
    d.cli_ok("shift vm1 travel --flows keep");
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some(TRAVEL),
        "a connection opened after the shift is travel's"
    );
    let held = draining(&d);
    wait_until("the sweep lists office as draining", || {
        draining(&d).iter().any(|(a, n)| a == OFFICE && *n >= 1)
    });
    assert!(
        wired(&lab, OFFICE),
        "office stays routed for its connection"
    );
    let kept = finish_stream(stream);
    assert_eq!(kept.ended, "done", "{kept:?}");
    assert_eq!(kept.seen.len(), 20, "every line answered: {kept:?}");
    assert!(
        kept.seen.iter().all(|a| a == OFFICE),
        "the connection kept office to the end: {kept:?} (draining at the shift: {held:?})"
    );
    wait_until(
        "office is withdrawn once its last connection closed",
        || !wired(&lab, OFFICE) && draining(&d).is_empty(),
    );
    let (_, events) = d.admin(Method::GET, "/events?limit=50", None);
    assert!(
        events.to_string().contains("\"release\"") && events.to_string().contains(OFFICE),
        "the release is audited: {events}"
    );
    assert!(wired(&lab, TRAVEL));

    // move: the connection's packets take office's address at once; the far end
    // knows it by travel's and refuses them.
    let stream = lab.start_stream(20, 200);
    std::thread::sleep(Duration::from_secs(1));
    d.cli_ok("shift vm1 office --flows move");
    let moved = finish_stream(stream);
    assert_ne!(moved.ended, "done", "{moved:?}");
    assert!(
        moved.seen.len() < 20 && moved.seen.iter().all(|a| a == TRAVEL),
        "{moved:?}"
    );

    // cut, hardened's own choice: the VM's connection is reset at once, and the
    // previous address goes with the shift.
    let stream = lab.start_stream(20, 200);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let shifted_at = started.elapsed().as_secs_f64();
    d.cli_ok("shift vm1 hardened");
    let cut = finish_stream(stream);
    assert_eq!(cut.ended, "reset", "{cut:?}");
    assert!(
        cut.at - shifted_at < 1.0,
        "reset {:.2} s after the shift",
        cut.at - shifted_at
    );
    assert!(
        !wired(&lab, OFFICE),
        "a cut withdraws the old address with the shift"
    );
    assert!(!wired(&lab, TRAVEL));
}
