//! The rule engine end to end: context posted to the API moves a device between personas
//! in the real datapath, with the audit log saying which rule and why.
use std::time::{Duration, Instant};

use hyper::Method;
use persona_tests::{
    daemon::Daemon,
    lab::{Lab, VmLink, wait_until},
};
use serde_json::{Value, json};

fn alert(state: &str) -> Value {
    alert_on("vm1", state)
}

fn alert_on(device: &str, state: &str) -> Value {
    json!({"device": device, "kind": "alert", "id": "ids-7", "severity": "critical", "alertKind": "malware", "state": state, "source": "ids"})
}

fn start(extra: &[&str]) -> (Lab, Daemon) {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start_with(&lab, extra);
    d.cli_ok("apply -f examples/");
    d.cli_ok("apply -f examples/rules/");
    (lab, d)
}

#[test]
fn a_security_alert_hardens_the_device_and_clearing_it_restores_it() {
    let (lab, d) = start(&["--min-dwell", "0", "--cooldown", "0"]);
    assert_eq!(lab.seen_from_outside().as_deref(), Some("203.0.113.10"));

    let (s, v) = d.admin(Method::POST, "/context", Some(&alert("raised")));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["devices"][0]["decision"]["desired"], "hardened", "{v}");
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.65"),
        "the datapath runs the hardened persona"
    );
    assert_eq!(
        lab.reach_vm("203.0.113.65", 22),
        None,
        "hardened admits nothing in"
    );

    // The rule selects vm2 too: it gets an address of its own from hardened's pool.
    let (s, v) = d.admin(Method::POST, "/context", Some(&alert_on("vm2", "raised")));
    assert_eq!(s, 200, "{v}");
    let leases = |device: &str| {
        let (_, st) = d.admin(Method::GET, &format!("/status/{device}"), None);
        assert_eq!(st["persona"], "hardened", "{st}");
        st["leases"].clone()
    };
    assert_eq!(leases("vm1"), json!(["203.0.113.65/28"]));
    assert_eq!(leases("vm2"), json!(["203.0.113.66/28"]));
    assert_eq!(lab.seen_from_outside().as_deref(), Some("203.0.113.65"));
    let (s, v) = d.admin(Method::POST, "/context", Some(&alert_on("vm2", "cleared")));
    assert_eq!(s, 200, "{v}");

    // While the alert is open, a video call does not take the device out of hardened.
    d.cli_ok("context vm1 --app zoom");
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.65"),
        "held until the alert clears"
    );
    let explain = d.cli_ok("explain vm1");
    assert!(explain.contains("held by lockdown"), "{explain}");

    d.cli_ok("context vm1 --clear ids-7 --app-stopped zoom");
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.10"),
        "back to the default persona"
    );

    let events = d.cli_ok("events -o json");
    let shifts: Vec<Value> = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["kind"] == "shift" && e["device"] == "vm1")
        .collect();
    let by_rule: Vec<(&str, &str, &str)> = shifts
        .iter()
        .filter(|e| e["actor"].as_str().unwrap().starts_with("rule:"))
        .map(|e| {
            (
                e["actor"].as_str().unwrap(),
                e["to"].as_str().unwrap(),
                e["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        by_rule,
        [
            ("rule:lockdown", "hardened", "ok"),
            ("rule:default", "office", "ok")
        ],
        "{events}"
    );
    let hardened = shifts
        .iter()
        .find(|e| e["actor"] == "rule:lockdown")
        .unwrap();
    assert_eq!(
        hardened["detail"]["cause"]["why"]["signals"][0]["id"], "ids-7",
        "the signal behind it is recorded"
    );
}

#[test]
fn bad_context_changes_nothing_and_names_the_field() {
    let (_lab, d) = start(&["--min-dwell", "0", "--cooldown", "0"]);
    let batch = json!([alert("raised"), {"device": "vm1", "kind": "geo", "country": "Germany"}]);
    let (s, v) = d.admin(Method::POST, "/context", Some(&batch));
    assert_eq!(
        (s, v["field"].as_str()),
        (422, Some("signals[1].country")),
        "{v}"
    );
    let (_, explain) = d.admin(Method::GET, "/explain/vm1", None);
    assert_eq!(
        explain["desired"], "office",
        "the good signal in a bad batch was not taken either"
    );
    let (s, v) = d.admin(
        Method::POST,
        "/context",
        Some(&json!({"device": "ghost", "kind": "role", "role": "admin"})),
    );
    assert_eq!(
        (s, v["field"].as_str()),
        (422, Some("signals[0].device")),
        "{v}"
    );
    let (s, _) = d.call(None, Method::POST, "/context", Some(&alert("raised")));
    assert_eq!(s, 401);
}

/// A device's own fields count as much as its signals: an edit of the device alone (its
/// role), with no signal after it, moves it once a rule matches.
#[test]
fn a_device_edited_is_decided_for_again() {
    let (lab, d) = start(&["--min-dwell", "0", "--cooldown", "0"]);
    let abroad = json!({"device": "vm1", "kind": "geo", "country": "FR"});
    let (s, v) = d.admin(Method::POST, "/context", Some(&abroad));
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.10"),
        "an analyst abroad stays on office"
    );
    let (_, device) = d.admin(Method::GET, "/devices/vm1", None);
    let mut spec = device["spec"].clone();
    spec["role"] = json!("admin");
    let body = json!({ "metadata": { "name": "vm1", "version": device["metadata"]["version"] }, "spec": spec });
    let (s, v) = d.admin(Method::PUT, "/devices/vm1", Some(&body));
    assert_eq!(s, 200, "{v}");
    wait_until("the engine moves the admin abroad to travel", || {
        lab.seen_from_outside().as_deref() == Some("203.0.113.20")
    });
    let (_, events) = d.admin(Method::GET, "/events?limit=1000", None);
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "shift"
                && e["actor"] == "rule:admins-abroad"
                && e["to"] == "travel"),
        "{events}"
    );
}

#[test]
fn a_feed_of_json_lines_and_the_dry_run_mode() {
    let (lab, d) = start(&["--min-dwell", "0", "--cooldown", "0", "--rules-dry-run"]);
    let feed = d.data_dir.join("feed.jsonl");
    std::fs::write(
        &feed,
        format!(
            "{}\n{}\n",
            json!({"device": "vm1", "kind": "geo", "country": "FR"}),
            alert("raised")
        ),
    )
    .unwrap();
    let out = d.cli_ok(&format!("context --feed {}", feed.display()));
    assert!(out.contains("rule lockdown matches"), "{out}");
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.10"),
        "dry run: nothing shifted"
    );
    let events = d.cli_ok("events");
    assert!(
        events
            .lines()
            .any(|l| l.contains("rule:lockdown") && l.contains("dry-run (rule engine)")),
        "{events}"
    );
}

/// Time from `POST /context` to the flipped datapath: the request returns after the
/// flip, so its duration is the figure. Reported, not asserted.
#[test]
fn context_to_flipped_datapath_latency() {
    let (_lab, d) = start(&["--min-dwell", "0", "--cooldown", "0"]);
    let mut samples = Vec::new();
    let mut generation = 0;
    for i in 0..40 {
        let state = if i % 2 == 0 { "raised" } else { "cleared" };
        let start = Instant::now();
        let (s, v) = d.admin(Method::POST, "/context", Some(&alert(state)));
        samples.push(start.elapsed());
        assert_eq!(s, 200, "{v}");
        let g = v["devices"][0]["outcome"]["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("every alert change shifts: {v}"));
        assert!(g > generation, "generations increase");
        generation = g;
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "POST /context -> flipped datapath over {} runs: p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        samples.len(),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() * 9 / 10]),
        ms(samples[samples.len() - 1])
    );
}

/// A geolocation signal with only an address gets its country from a MaxMind-format
/// database the test writes itself; the admins-abroad rule (CEL) reacts to it.
#[test]
fn an_address_is_located_with_a_geoip_database() {
    let db = std::path::PathBuf::from(format!("/tmp/persona-geo-{}.mmdb", std::process::id()));
    let script = persona_tests::lab::script("write_mmdb.pl");
    persona_tests::netns::sh(&format!(
        "perl {script} {} 192.0.2.0/24=FR 198.51.100.0/24=DE",
        db.display()
    ));
    let (lab, d) = start(&[
        "--min-dwell",
        "0",
        "--cooldown",
        "0",
        "--geoip-db",
        db.to_str().unwrap(),
    ]);

    let abroad = json!([
        {"device": "vm1", "kind": "role", "role": "admin"},
        {"device": "vm1", "kind": "geo", "address": "192.0.2.77"},
    ]);
    let (s, v) = d.admin(Method::POST, "/context", Some(&abroad));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["devices"][0]["decision"]["rule"], "admins-abroad", "{v}");
    assert_eq!(lab.seen_from_outside().as_deref(), Some("203.0.113.20"));

    let home = json!({"device": "vm1", "kind": "geo", "address": "198.51.100.77"});
    let (_, v) = d.admin(Method::POST, "/context", Some(&home));
    assert_eq!(v["devices"][0]["decision"]["desired"], "office", "{v}");
    assert_eq!(lab.seen_from_outside().as_deref(), Some("203.0.113.10"));
    let _ = std::fs::remove_file(&db);
}

/// An application defined by port and prefix is recognised in the device's real flows;
/// a rule on it moves the device while the flow is fresh and lets it go when it idles.
#[test]
fn applications_seen_in_the_datapath_trigger_rules() {
    let (lab, d) = start(&[
        "--min-dwell",
        "0",
        "--cooldown",
        "0",
        "--app-observe-secs",
        "1",
        "--app-idle-secs",
        "3",
    ]);
    let app = json!({"metadata": {"name": "web-admin"}, "spec": {"protocol": "tcp", "ports": ["8080"], "cidrs": ["198.51.100.0/24"]}});
    assert_eq!(d.admin(Method::POST, "/applications", Some(&app)).0, 201);
    let rule = json!({"metadata": {"name": "browsing"}, "spec": {
        "priority": 30, "selector": {"matchLabels": {"team": "finance"}}, "persona": "travel",
        "when": {"apps": {"anyOf": ["web-admin"]}},
    }});
    assert_eq!(d.admin(Method::POST, "/rules", Some(&rule)).0, 201);

    let persona = || {
        d.admin(Method::GET, "/status/vm1", None).1["persona"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    let wait_for = |want: &str, secs: u64| {
        let start = Instant::now();
        while persona() != want {
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "vm1 never became {want}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        start.elapsed()
    };
    assert_eq!(persona(), "office");
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.10"),
        "a flow to 198.51.100.7:8080"
    );
    let took = wait_for("travel", 8);
    eprintln!("flow seen -> shifted in {took:?}");
    wait_for("office", 12);

    let events = d.cli_ok("events -o json");
    let browsing = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["actor"] == "rule:browsing")
        .expect("a shift by the browsing rule");
    assert_eq!(browsing["to"], "travel");
    let signals = &browsing["detail"]["cause"]["why"]["signals"];
    assert!(
        signals
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["source"] == "datapath" && s["app"] == "web-admin"),
        "{signals}"
    );
}
