//! Fleet mode: hosts that share one etcd cluster (three real members) as their store.
use hyper::Method;
use persona_tests::{
    daemon::Daemon,
    etcd::{Etcd, STORE_LINK},
    fleet::{FleetLab, converges},
    lab::{Lab, OUTSIDE, Site, VM_IFACE, VM2_IFACE, VmLink, wait_until},
};
use serde_json::{Value, json};

/// The `persona-stale` header of a GET, which a host cut off from etcd sets.
fn stale(d: &Daemon, path: &str) -> Option<String> {
    let out = std::process::Command::new("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null", "--unix-socket"])
        .arg(&d.socket)
        .args(["-H", &format!("Authorization: Bearer {}", d.admin)])
        .arg(format!("http://persona{path}"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("persona-stale: ").map(str::to_owned))
}

fn persona(name: &str, addr: &str, version: Option<u64>) -> Value {
    json!({ "metadata": { "name": name, "version": version }, "spec": { "addresses": [addr] } })
}

/// Three members, and two hosts on them: A, which made the fleet's admin token, and B.
fn fleet() -> (Etcd, [Site; 2], Daemon, Daemon) {
    let mut etcd = Etcd::start(3);
    let sites = [Site::new(), Site::new()];
    for s in &sites {
        etcd.join(s);
    }
    let a = Daemon::start_in_fleet(&sites[0], &etcd.url(), None, &[]);
    let b = Daemon::start_in_fleet(&sites[1], &etcd.url(), Some(&a.admin), &[]);
    (etcd, sites, a, b)
}

#[test]
fn what_one_host_defines_every_host_sees_and_guards() {
    let (etcd, _sites, a, b) = fleet();

    let (s, v) = a.admin(
        Method::POST,
        "/personas",
        Some(&persona("office", "203.0.113.10/24", None)),
    );
    assert_eq!(s, 201, "{v}");
    wait_until("host B sees the persona host A created", || {
        b.admin(Method::GET, "/personas/office", None).0 == 200
    });
    let (_, v) = b.admin(Method::GET, "/personas/office", None);
    assert_eq!(v["spec"]["addresses"][0], "203.0.113.10/24", "{v}");
    assert_eq!(v["metadata"]["version"], 1, "{v}");

    // B updates what it read; A's write of the version it read before is stale.
    let (s, v) = b.admin(
        Method::PUT,
        "/personas/office",
        Some(&persona("office", "203.0.113.11/24", Some(1))),
    );
    assert_eq!(
        (s, v["metadata"]["version"].as_u64()),
        (200, Some(2)),
        "{v}"
    );
    let (s, v) = a.admin(
        Method::PUT,
        "/personas/office",
        Some(&persona("office", "203.0.113.12/24", Some(1))),
    );
    assert_eq!(s, 409, "a stale version is refused on any host: {v}");
    let (s, _) = a.admin(
        Method::POST,
        "/personas",
        Some(&persona("office", "203.0.113.13/24", None)),
    );
    assert_eq!(s, 409, "a name another host created exists on every host");
    wait_until("host A sees B's update", || {
        a.admin(Method::GET, "/personas/office", None).1["spec"]["addresses"][0]
            == "203.0.113.11/24"
    });

    // What etcd holds is what the hosts say, under persona's own prefix.
    let stored = etcd.ctl("get /persona/v1/data/objects/personas/office --print-value-only");
    let stored: Value = serde_json::from_str(stored.trim()).expect("a JSON record");
    assert_eq!(
        stored["spec"]["addresses"][0], "203.0.113.11/24",
        "{stored}"
    );

    // The audit log is one: B reads the record of A's creation, in order.
    let (_, events) = b.admin(Method::GET, "/events?after=0&limit=1000", None);
    let kinds: Vec<(&str, &str)> = events["items"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["to"] == "personas/office")
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or(""),
                e["result"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("apply", "version 1"), ("apply", "version 2")],
        "A's create and B's update, read on B: {events}"
    );
    let seqs: Vec<u64> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "one numbering for the fleet, without gaps: {seqs:?}"
    );

    let (s, _) = b.admin(Method::DELETE, "/personas/office", None);
    assert_eq!(s, 204);
    wait_until("host A sees the deletion", || {
        a.admin(Method::GET, "/personas/office", None).0 == 404
    });
}

#[test]
fn without_etcd_reads_answer_from_the_last_state_and_writes_are_refused() {
    let (mut etcd, sites, a, _b) = fleet();
    let (s, v) = a.admin(
        Method::POST,
        "/personas",
        Some(&persona("home", "203.0.113.20/24", None)),
    );
    assert_eq!(s, 201, "{v}");

    // Host A is cut off from etcd.
    sites[0]
        .host
        .exec(&format!("ip link set {STORE_LINK} down"));
    let (s, v) = a.admin(Method::GET, "/personas/home", None);
    assert_eq!(s, 200, "a read answers from what A last saw: {v}");
    let (s, v) = a.admin(
        Method::POST,
        "/personas",
        Some(&persona("away", "203.0.113.21/24", None)),
    );
    assert_eq!(
        s, 503,
        "a write without etcd is refused as unavailable: {v}"
    );
    assert!(v["error"].as_str().unwrap_or("").contains("etcd"), "{v}");
    converges("A says its answers may be stale", || {
        stale(&a, "/personas/home").is_some()
    });
    assert!(a.metrics().contains("persona_fleet_store_connected{} 0"));

    // Back: writes go through, and what others wrote meanwhile arrives.
    sites[0].host.exec(&format!("ip link set {STORE_LINK} up"));
    // An attempt answered 503 may still have committed (etcd took it after the
    // deadline): the next one then finds the persona there, as that attempt wrote it.
    converges("A writes again once etcd is back", || {
        match a
            .admin(
                Method::POST,
                "/personas",
                Some(&persona("away", "203.0.113.21/24", None)),
            )
            .0
        {
            201 => true,
            409 => {
                a.admin(Method::GET, "/personas/away", None).1["spec"]["addresses"][0]
                    == "203.0.113.21/24"
            }
            _ => false,
        }
    });

    converges("A follows etcd again", || {
        stale(&a, "/personas/home").is_none()
    });

    // Every member gone: the same, then a restart of the members on their data.
    etcd.kill_all();
    let (s, _) = a.admin(Method::GET, "/personas/away", None);
    assert_eq!(s, 200, "reads go on with no member up");
    etcd.restart_stopped();
    converges("A writes again once the members are back", || {
        // 404: an earlier attempt answered 503 had deleted it.
        matches!(a.admin(Method::DELETE, "/personas/away", None).0, 204 | 404)
    });
    assert_eq!(a.admin(Method::GET, "/personas/away", None).0, 404);
}

/// A's devices and B's hosts: B defines the personas and A's device, and shifts it.
#[test]
fn a_shift_asked_of_any_host_is_made_by_the_host_that_runs_the_device() {
    let mut etcd = Etcd::start(3);
    let lab = Lab::new(VmLink::Veth);
    let b_site = Site::new();
    etcd.join(&lab.site);
    etcd.join(&b_site);
    let a = Daemon::start_in_fleet(&lab.site, &etcd.url(), None, &["--host", "a"]);
    let b = Daemon::start_in_fleet(&b_site, &etcd.url(), Some(&a.admin), &["--host", "b"]);

    // Everything is defined once, through B.
    b.cli_ok("apply -f examples/personas.yaml");
    b.apply_yaml(&format!(
        "apiVersion: persona.dev/v1\nkind: Device\nmetadata: {{ name: vm1 }}\nspec:\n  host: a\n  interface: {VM_IFACE}\n  innerV4: 198.18.0.2\n  gatewayV4: 198.18.0.1\n  persona: office\n"
    ));
    wait_until("host A runs the device B defined for it", || {
        lab.seen_from_outside().as_deref() == Some("203.0.113.10")
    });

    let out = b.cli_ok("shift vm1 travel");
    assert!(out.contains("vm1: travel (generation"), "{out}");
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.20"),
        "the shift asked of B is made on A, before B answers"
    );
    let (_, state) = b.admin(Method::GET, "/devices/vm1", None);
    assert_eq!(
        state["status"]["persona"], "travel",
        "B reads what A applied: {state}"
    );

    let refused = b.cli("shift vm1 nowhere");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("nowhere"),
        "A's refusal reaches B's caller: {}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // A persona changed on B reaches the device on A.
    let travel = b.admin(Method::GET, "/personas/travel", None).1;
    let mut spec = travel["spec"].clone();
    spec["addresses"] = json!(["203.0.113.21/24"]);
    let body = json!({ "metadata": { "name": "travel", "version": travel["metadata"]["version"] }, "spec": spec });
    let (s, v) = b.admin(Method::PUT, "/personas/travel", Some(&body));
    assert_eq!(s, 200, "{v}");
    wait_until("A runs the persona's new version", || {
        lab.seen_from_outside().as_deref() == Some("203.0.113.21")
    });

    // A device of A's deleted through B: A takes every trace of it away.
    b.apply_yaml(&format!(
        "apiVersion: persona.dev/v1\nkind: Device\nmetadata: {{ name: vm2 }}\nspec:\n  host: a\n  interface: {VM2_IFACE}\n  innerV4: 198.18.0.3\n"
    ));
    let attached = || persona_tests::inspect::dump(&lab, "DEVICES", false).len();
    wait_until("A attaches vm2", || attached() == 2);
    // A checks a shift against what etcd holds: travel's new address is vm1's.
    let refused = b.cli("shift vm2 travel");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains("203.0.113.21 is held by device vm1 (persona travel)"),
        "{err}"
    );
    b.cli_ok("delete device vm2");
    wait_until("A detaches the device B deleted", || attached() == 1);

    // A gone: its device is left as it is, and B says why it cannot shift it.
    drop(a);
    wait_until("A's liveness lapses", || {
        !etcd
            .ctl("get --prefix /persona/v1/data/hosts/ --keys-only")
            .contains("hosts/a")
    });
    let out = b.cli("shift vm1 office");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not alive"), "{err}");
    let (_, status) = b.admin(Method::GET, "/status/vm1", None);
    assert_eq!(
        (&status["host"], &status["orphaned"]),
        (&json!("a"), &json!(true)),
        "{status}"
    );
    assert!(
        b.metrics()
            .contains("persona_device_orphaned{device=\"vm1\"} 1"),
        "{}",
        b.metrics()
    );
    let recorded = |kind: &str| {
        let (_, v) = b.admin(Method::GET, "/events?limit=1000", None);
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind && e["device"] == "vm1")
            .map(|e| (e["actor"].clone(), e["detail"]["host"].clone()))
            .collect::<Vec<_>>()
    };
    wait_until("the audit log says vm1 is orphaned", || {
        !recorded("orphaned").is_empty()
    });
    assert_eq!(
        recorded("orphaned"),
        [(json!("fleet:b"), json!("a"))],
        "recorded once, by the host that saw it"
    );

    // A back: it says so itself, and the device is nobody's orphan any more.
    let _a = Daemon::start_in_fleet(&lab.site, &etcd.url(), Some(&b.admin), &["--host", "a"]);
    wait_until("the audit log says A is back", || {
        !recorded("returned").is_empty()
    });
    assert_eq!(recorded("returned").len(), 1);
    assert_eq!(recorded("orphaned").len(), 1);
    let (_, status) = b.admin(Method::GET, "/status/vm1", None);
    assert_eq!(status["orphaned"], json!(false), "{status}");
}

/// 300 shifts through the API while the etcd leader is SIGKILLed: every shift that was
/// acknowledged is in etcd with its audit record, and shifts go on after the election.
#[test]
fn a_leader_killed_during_shifts_loses_no_acknowledged_shift() {
    let mut etcd = Etcd::start(3);
    let lab = Lab::new(VmLink::Veth);
    etcd.join(&lab.site);
    let a = Daemon::start_in_fleet(&lab.site, &etcd.url(), None, &["--host", "a"]);
    a.cli_ok("apply -f examples/personas.yaml");
    a.apply_yaml(&format!(
        "apiVersion: persona.dev/v1\nkind: Device\nmetadata: {{ name: vm1 }}\nspec:\n  host: a\n  interface: {VM_IFACE}\n  innerV4: 198.18.0.2\n  gatewayV4: 198.18.0.1\n  persona: office\n"
    ));

    let mut acknowledged: Vec<(u64, u64, &str)> = Vec::new();
    let mut refused = Vec::new();
    let mut killed = None;
    for i in 0..300 {
        if i == 100 {
            killed = Some(etcd.kill_leader());
        }
        let to = if i % 2 == 0 { "travel" } else { "office" };
        let body = json!({ "device_id": "vm1", "persona_id": to });
        let (s, v) = a.admin(Method::POST, "/trigger_shift", Some(&body));
        match s {
            200 => acknowledged.push((
                v["event"].as_u64().expect("its audit record"),
                v["generation"].as_u64().expect("its generation"),
                to,
            )),
            _ => refused.push((i, s, v)),
        }
    }
    assert!(killed.is_some());
    eprintln!(
        "{} acknowledged, refused: {:?}",
        acknowledged.len(),
        refused.iter().map(|(i, s, _)| (i, s)).collect::<Vec<_>>()
    );
    assert!(
        refused
            .iter()
            .all(|(i, s, _)| (100..200).contains(i) && [502, 503].contains(s)),
        "only shifts around the election fail, each as unavailable or undone: {refused:?}"
    );
    assert!(
        acknowledged.len() >= 250,
        "shifts resume after the election: {} refused",
        refused.len()
    );

    // Every acknowledged shift's record, as etcd holds it.
    let (_, events) = a.admin(Method::GET, "/events?after=0&limit=1000", None);
    let stored: std::collections::HashMap<u64, &Value> = events["items"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| (e["seq"].as_u64().unwrap(), e))
        .collect();
    for (seq, generation, to) in &acknowledged {
        let e = stored
            .get(seq)
            .unwrap_or_else(|| panic!("the acknowledged shift's record {seq} is lost"));
        assert_eq!(
            (
                e["kind"].as_str(),
                e["to"].as_str(),
                e["generation"].as_u64(),
                e["result"].as_str()
            ),
            (Some("shift"), Some(*to), Some(*generation), Some("ok")),
            "{e}"
        );
    }
    let last = acknowledged.last().expect("an acknowledged shift");
    let (_, device) = a.admin(Method::GET, "/devices/vm1", None);
    assert_eq!(
        (
            device["status"]["persona"].as_str(),
            device["status"]["generation"].as_u64()
        ),
        (Some(last.2), Some(last.1)),
        "the stored state is the last acknowledged shift's: {device}"
    );
    let seen = if last.2 == "travel" {
        "203.0.113.20"
    } else {
        "203.0.113.10"
    };
    assert_eq!(lab.seen_from_outside().as_deref(), Some(seen));
}

/// An alert posted to B for A's device hardens it on A, survives A's restart, and its
/// clearing, posted to B again, brings the device back.
#[test]
fn a_signal_posted_to_any_host_counts_where_the_device_runs() {
    let mut etcd = Etcd::start(3);
    let lab = Lab::new(VmLink::Veth);
    let b_site = Site::new();
    etcd.join(&lab.site);
    etcd.join(&b_site);
    let quick = ["--min-dwell", "0", "--cooldown", "0"];
    let mut a = Daemon::start_in_fleet(
        &lab.site,
        &etcd.url(),
        None,
        &[&["--host", "a"][..], &quick].concat(),
    );
    let b = Daemon::start_in_fleet(
        &b_site,
        &etcd.url(),
        Some(&a.admin),
        &[&["--host", "b"][..], &quick].concat(),
    );
    b.cli_ok("apply -f examples/personas.yaml");
    b.cli_ok("apply -f examples/rules/");
    b.apply_yaml(&format!(
        "apiVersion: persona.dev/v1\nkind: Device\nmetadata: {{ name: vm1 }}\nspec:\n  host: a\n  interface: {VM_IFACE}\n  innerV4: 198.18.0.2\n  gatewayV4: 198.18.0.1\n  persona: office\n  labels: {{ site: berlin }}\n"
    ));
    wait_until("A runs vm1 on office", || {
        lab.seen_from_outside().as_deref() == Some("203.0.113.10")
    });

    let alert = |state: &str| json!([{ "device": "vm1", "kind": "alert", "id": "ids-7", "severity": "critical", "alertKind": "malware", "state": state, "source": "ids" }]);
    let (s, v) = b.admin(Method::POST, "/context", Some(&alert("raised")));
    assert_eq!(s, 200, "{v}");
    let hardened =
        || b.admin(Method::GET, "/devices/vm1", None).1["status"]["persona"] == "hardened";
    wait_until("A hardens vm1 on the alert B took in", hardened);
    let seen = lab.seen_from_outside().unwrap_or_default();
    assert!(
        seen.starts_with("203.0.113.6"),
        "a lease of hardened's pool: {seen}"
    );

    // The alert B acknowledged is A's after A restarts: vm1 stays hardened.
    a.restart();
    let (_, why) = a.admin(Method::GET, "/explain/vm1", None);
    assert!(
        why.to_string().contains("lockdown"),
        "A still knows the alert after its restart: {why}"
    );
    assert!(hardened());

    let (s, v) = b.admin(Method::POST, "/context", Some(&alert("cleared")));
    assert_eq!(s, 200, "{v}");
    wait_until("A brings vm1 back once B hears the alert cleared", || {
        lab.seen_from_outside().as_deref() == Some("203.0.113.10")
    });
}

/// B is cut off while A writes and etcd compacts its history past where B's watch
/// stood: back, B lists again and converges on etcd's state.
#[test]
fn a_watch_gap_past_compaction_still_converges() {
    let (etcd, sites, a, b) = fleet();
    let (s, _) = a.admin(
        Method::POST,
        "/personas",
        Some(&persona("gone", "203.0.113.30/24", None)),
    );
    assert_eq!(s, 201);
    wait_until("B sees it", || {
        b.admin(Method::GET, "/personas/gone", None).0 == 200
    });

    sites[1]
        .host
        .exec(&format!("ip link set {STORE_LINK} down"));
    // Until B's watch has given up, etcd would keep its events for it.
    converges("B's watch gives up", || {
        stale(&b, "/personas/gone").is_some()
    });
    let (s, _) = a.admin(Method::DELETE, "/personas/gone", None);
    assert_eq!(s, 204);
    for i in 0..20 {
        let (s, v) = a.admin(
            Method::POST,
            "/personas",
            Some(&persona(
                &format!("p{i}"),
                &format!("203.0.113.{}/24", 100 + i),
                None,
            )),
        );
        assert_eq!(s, 201, "{v}");
    }
    let status: Value = serde_json::from_str(&etcd.ctl("endpoint status -w json")).expect("status");
    let revision = status[0]["Status"]["header"]["revision"]
        .as_u64()
        .expect("a revision");
    etcd.ctl(&format!("compact {revision}"));
    assert_eq!(
        b.admin(Method::GET, "/personas/gone", None).0,
        200,
        "cut off, B still shows what it last saw"
    );

    sites[1].host.exec(&format!("ip link set {STORE_LINK} up"));
    converges("B drops what was deleted while it was away", || {
        b.admin(Method::GET, "/personas/gone", None).0 == 404
    });
    let (_, list) = b.admin(Method::GET, "/personas", None);
    let names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert_eq!(
        names.len(),
        20,
        "B has every persona made while it was away: {names:?}"
    );
    let log = std::fs::read_to_string(b.data_dir.join("daemon.log")).expect("B's log");
    assert!(
        log.contains("fell behind compaction"),
        "B came back through a listing, not the events etcd no longer has"
    );
}

/// Three hosts, each with its own VM, defined once through A: a shift asked of A for
/// the VM on C is made by C, and the outside sees C's VM as the persona.
#[test]
fn three_hosts_share_definitions_and_a_shift_reaches_the_host_of_the_device() {
    let mut fleet = FleetLab::new(&["a", "b", "c"]);
    let [a, b, c] = [&fleet.daemons[0], &fleet.daemons[1], &fleet.daemons[2]];
    a.cli_ok("apply -f examples/personas.yaml");
    a.apply_yaml(&fleet.device(0, "office"));
    a.apply_yaml(&fleet.device(2, "lab"));
    wait_until("C runs its VM as lab", || {
        fleet.seen_from_outside(2).as_deref() == Some("203.0.113.30")
    });
    assert_eq!(fleet.seen_from_outside(0).as_deref(), Some("203.0.113.10"));

    let out = a.cli_ok("shift vm-c travel");
    assert!(out.contains("vm-c: travel (generation"), "{out}");
    assert_eq!(
        fleet.seen_from_outside(2).as_deref(),
        Some("203.0.113.20"),
        "C made the shift A was asked for before A answered"
    );
    for d in [a, b, c] {
        let (_, status) = d.admin(Method::GET, "/status/vm-c", None);
        assert_eq!(
            (&status["persona"], &status["host"]),
            (&json!("travel"), &json!("c")),
            "every host reads what C applied: {status}"
        );
    }
    let (_, events) = b.admin(Method::GET, "/events?limit=1000", None);
    let shifts: Vec<&Value> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "shift" && e["device"] == "vm-c" && e["to"] == "travel")
        .collect();
    assert_eq!(shifts.len(), 1, "one audit record, seen from B: {events}");

    // A migration whose target dies blocks the next one until it is called off, which
    // then ends it at once: nobody is left to let the device go.
    b.cli_ok("migrate vm-c --to b --manual --no-wait");
    wait_until("B is ready", || {
        a.admin(Method::GET, "/devices/vm-c/migration", None).1["phase"] == "ready"
    });
    fleet.daemons[1].kill();
    let a = &fleet.daemons[0];
    converges("B's lease to lapse", || {
        let again = a.cli("migrate vm-c --to b --no-wait");
        String::from_utf8_lossy(&again.stderr).contains("which is not alive")
    });
    let out = a.cli_ok("migrate vm-c --cancel");
    assert!(out.contains("called off by"), "{out}");
    let (_, m) = a.admin(Method::GET, "/devices/vm-c/migration", None);
    assert_eq!(m["phase"], "cancelled", "{m}");
    assert!(
        m["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not alive"),
        "{m}"
    );
    assert_eq!(fleet.seen_from_outside(2).as_deref(), Some("203.0.113.20"));
}

/// A VM moves from host A to host B while it pings the outside: B runs the persona,
/// gated, until the VM's first frame reaches it, then takes ownership and the address.
/// The outside, on one network with both hosts, sees the persona's address in every
/// request and never the inner one, and replies reach the VM on B.
#[test]
fn a_vm_migrates_to_another_host_behind_the_same_persona_address() {
    let fleet = FleetLab::new(&["a", "b"]);
    let (a, b) = (&fleet.daemons[0], &fleet.daemons[1]);
    fleet.link(0, 1);
    a.cli_ok("apply -f examples/personas.yaml");
    a.apply_yaml(&fleet.device(0, "office"));
    wait_until("A runs vm-a", || {
        fleet.seen_from_outside(0).as_deref() == Some("203.0.113.10")
    });

    let refused = b.cli("migrate vm-a --to nowhere");
    assert!(
        !refused.status.success(),
        "a host that is not alive takes nothing"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not alive"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Called off while B waits: B lets the device go, and A keeps it.
    let devices_on = |i: usize| persona_tests::inspect::dump(&fleet.sites[i], "DEVICES", false);
    b.cli_ok("migrate vm-a --to b --manual --no-wait");
    wait_until("B is ready for the migration to be called off", || {
        b.admin(Method::GET, "/devices/vm-a/migration", None).1["phase"] == "ready"
    });
    assert!(!devices_on(1).is_empty(), "B took vm-a in");
    let out = a.cli_ok("migrate vm-a --cancel");
    assert!(out.contains("called off by"), "{out}");
    let (_, m) = b.admin(Method::GET, "/devices/vm-a/migration", None);
    assert_eq!(m["phase"], "cancelled", "{m}");
    wait_until("B let vm-a go", || devices_on(1).is_empty());
    let (_, device) = b.admin(Method::GET, "/devices/vm-a", None);
    assert_eq!(device["spec"]["host"], "a", "{device}");
    assert_eq!(fleet.seen_from_outside(0).as_deref(), Some("203.0.113.10"));
    let too_late = a.cli("migrate vm-a --cancel");
    assert!(
        !too_late.status.success(),
        "nothing is under way to call off"
    );

    let outside = &fleet.sites[0].out.name;
    let capture = persona_tests::capture::Capture::start(outside, "br0", "icmp");
    let ping = std::process::Command::new("ip")
        .args(["netns", "exec", &fleet.vms[0].name])
        .args(["ping", "-n", "-i", "0.05", "-c", "160", "-W", "1", OUTSIDE])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let asked = b.cli_ok("migrate vm-a --to b --no-wait");
    assert!(asked.contains("migrating from \"a\" to \"b\""), "{asked}");
    wait_until("B is ready and waits for the VM", || {
        b.admin(Method::GET, "/devices/vm-a/migration", None).1["phase"] == "ready"
    });
    let again = a.cli("migrate vm-a --to b --no-wait");
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("migrating to \"b\" already"),
        "one migration at a time: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (_, status) = a.admin(Method::GET, "/status/vm-a", None);
    assert_eq!(
        status["host"], "a",
        "A owns vm-a until the VM arrives: {status}"
    );

    fleet.move_over(0);
    wait_until("the migration ends", || {
        b.admin(Method::GET, "/devices/vm-a/migration", None).1["phase"] == "done"
    });
    let (_, m) = a.admin(Method::GET, "/devices/vm-a/migration", None);
    assert_eq!((&m["from"], &m["to"]), (&json!("a"), &json!("b")), "{m}");
    let (_, device) = a.admin(Method::GET, "/devices/vm-a", None);
    assert_eq!(device["spec"]["host"], "b", "ownership moved: {device}");
    wait_until("A let vm-a go", || {
        persona_tests::inspect::dump(&fleet.sites[0], "DEVICES", false).is_empty()
    });
    converges("vm-a's state recorded by B alone", || {
        let keys = fleet
            .etcd
            .ctl("get --prefix /persona/v1/data/states/ --keys-only");
        keys.contains("states/b/vm-a") && !keys.contains("states/a/vm-a")
    });

    let ping = ping.wait_with_output().expect("ping");
    let out = String::from_utf8_lossy(&ping.stdout);
    let replies: Vec<u32> = out
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    eprintln!("{} of 160 replies", replies.len());
    let lines = capture.stop();
    assert!(
        (150..=160).all(|s| replies.contains(&s)),
        "the last requests, sent from B, are answered: {out}"
    );
    let requests: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("echo request"))
        .collect();
    assert!(requests.len() >= 150, "{} requests seen", requests.len());
    for l in &lines {
        assert!(!l.contains("198.18.0.2"), "the inner address went out: {l}");
    }
    for l in &requests {
        assert!(
            l.contains("203.0.113.10 > "),
            "from the persona address: {l}"
        );
    }
    assert_eq!(
        fleet.seen_from_outside(0).as_deref(),
        Some("203.0.113.10"),
        "the VM on B is seen as the same persona"
    );
    let (_, events) = b.admin(Method::GET, "/events?limit=1000", None);
    let migrated: Vec<&Value> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "migrated")
        .collect();
    assert_eq!(migrated.len(), 1, "{events}");
    assert_eq!(migrated[0]["result"], "ok");
    let called_off = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "migrate" && e["result"] == "cancelled")
        .count();
    assert_eq!(called_off, 1, "{events}");
}

/// etcd with authentication on, its users and roles made by `packaging/etcd-rbac.sh`:
/// host A runs as the fleet's admin user, host B as its own. B runs and shifts its VM;
/// a persona defined through B is refused with the reason and nothing is written; B's
/// user may not touch A's liveness key nor a definition; B's etcd token lapsing while
/// it idles does not stop it.
#[test]
fn a_host_on_its_own_etcd_user_runs_its_vms_but_defines_nothing() {
    let fleet = FleetLab::with_etcd_users(&["a", "b"]);
    let (a, b) = (&fleet.daemons[0], &fleet.daemons[1]);
    a.cli_ok("apply -f examples/personas.yaml");
    a.apply_yaml(&fleet.device(1, "office"));
    wait_until("B runs vm-b as office", || {
        fleet.seen_from_outside(1).as_deref() == Some("203.0.113.10")
    });

    let (s, v) = b.admin(
        Method::POST,
        "/personas",
        Some(&persona("rogue", "203.0.113.99/24", None)),
    );
    assert_eq!(s, 403, "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("permission denied") && error.contains("admin user"),
        "{v}"
    );
    assert_eq!(a.admin(Method::GET, "/personas/rogue", None).0, 404);
    let file = std::env::temp_dir().join(format!("rogue-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        "apiVersion: persona.dev/v1\nkind: Persona\nmetadata: { name: rogue }\nspec: { addresses: [203.0.113.99/24] }\n",
    )
    .unwrap();
    let refused = b.cli(&format!("apply -f {}", file.display()));
    let _ = std::fs::remove_file(&file);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("permission denied"),
        "{said}"
    );
    assert_eq!(a.admin(Method::GET, "/personas/rogue", None).0, 404);

    // etcd's tokens lapse after 3 s idle here; B asks for another.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let out = b.cli_ok("shift vm-b travel");
    assert!(out.contains("vm-b: travel (generation"), "{out}");
    assert_eq!(fleet.seen_from_outside(1).as_deref(), Some("203.0.113.20"));
    let out = a.cli_ok("shift vm-b office");
    assert!(out.contains("vm-b: office (generation"), "{out}");
    assert_eq!(fleet.seen_from_outside(1).as_deref(), Some("203.0.113.10"));

    let b_user = "persona-host-b";
    for key in [
        "/persona/v1/data/hosts/a",
        "/persona/v1/data/states/a/vm-a",
        "/persona/v1/data/objects/personas/office",
        "/persona/v1/data/tokens/forged",
        "/persona/v1/data/objects/rules/forged",
    ] {
        let (ok, said) = fleet.etcd.ctl_as(b_user, &format!("put {key} x"));
        assert!(
            !ok && said.contains("permission denied"),
            "{b_user} wrote {key}: {said}"
        );
    }
    let (ok, said) = fleet.etcd.ctl_as(
        b_user,
        "get /persona/v1/data/objects/personas/office --print-value-only",
    );
    assert!(ok && said.contains("203.0.113.10"), "{said}");
    let (ok, said) = fleet
        .etcd
        .ctl_as("persona-admin", "put /persona/v1/probe x");
    assert!(ok, "the admin user writes anything of the fleet's: {said}");
}
