//! Fleet mode: three hosts on three etcd members (data on tmpfs, as in the tests). A
//! shift through one host's API of a device another host runs, next to the same shift
//! asked of its own host; a host starting over 3 × N devices; how long a write takes to
//! reach the other hosts' reads; etcd's database per device and per persona.
use std::time::{Duration, Instant};

use hyper::Method;
use persona::client::{Client, Target};
use persona_tests::{daemon::Daemon, fleet::FleetLab};
use serde_json::{Value, json};

use crate::{control::drive, shifts::percentiles};

const SHIFTS: usize = 200;
const DEVICE_COUNTS: [usize; 2] = [1_000, 10_000];
const FAN_OUT_WRITES: usize = 50;
const PERSONAS: usize = 200;

fn devices(host: &str, from: usize, to: usize) -> String {
    (from..to)
        .map(|i| {
            format!(
                "apiVersion: persona.dev/v1\nkind: Device\nmetadata: {{ name: {host}-{i} }}\nspec:\n  host: {host}\n  interface: pf{i}\n  innerV4: 198.18.{}.{}\n  labels: {{ team: bench }}\n---\n",
                1 + i / 250,
                2 + i % 250
            )
        })
        .collect()
}

fn personas(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: persona.dev/v1\nkind: Persona\nmetadata: {{ name: p{i} }}\nspec:\n  addresses: [\"2001:db8:b::{:x}/64\"]\n  firewall: {{ egress: {{ default: allow, rules: [ {{ cidr: 192.0.2.0/24, protocol: tcp, ports: \"25\", action: drop }} ] }} }}\n---\n",
                i + 1
            )
        })
        .collect()
}

fn apply(d: &Daemon, name: &str, manifests: &str) -> Duration {
    let file = d.data_dir.join(name);
    std::fs::write(&file, manifests).expect("manifests");
    let start = Instant::now();
    d.cli_ok(&format!("apply -f {}", file.display()));
    start.elapsed()
}

/// etcd's database: allocated, and in use, bytes (the first member's view).
fn db_size(fleet: &FleetLab) -> (f64, f64) {
    let out = fleet.etcd.ctl("endpoint status -w json");
    let status: Value = serde_json::from_str(&out).expect("endpoint status");
    let first = &status[0]["Status"];
    let f = |k: &str| first[k].as_f64().unwrap_or(f64::NAN);
    (f("dbSize"), f("dbSizeInUse"))
}

/// `d` alternating `device` between two personas through its API.
fn shifts(d: &Daemon, device: &str) -> Value {
    let (per_s, lats) = drive(d, 1, SHIFTS, |_, i| {
        let to = if i % 2 == 0 { "lab-night" } else { "lab" };
        (
            Method::POST,
            "/trigger_shift".to_owned(),
            json!({ "device_id": device, "persona_id": to }),
        )
    });
    json!({ "shifts_per_s": per_s, "latency": percentiles(lats) })
}

/// A persona updated through A: the PUT's own latency, and from its start until B and C
/// each read the new version.
fn fan_out(fleet: &FleetLab) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = |d: &Daemon| Client {
        target: Target::Unix(d.socket.clone()),
        token: Some(d.admin.clone()),
        cacert: None,
    };
    rt.block_on(async {
        let mut writer = client(&fleet.daemons[0]).connect().await.expect("A");
        let mut readers = Vec::new();
        for d in &fleet.daemons[1..] {
            readers.push(client(d).connect().await.expect("reader"));
        }
        let (mut lats, mut puts) = (Vec::new(), Vec::new());
        for k in 0..FAN_OUT_WRITES {
            let (_, now) = writer
                .call(Method::GET, "/personas/p0", None)
                .await
                .expect("p0");
            let mut spec = now["spec"].clone();
            spec["firewall"]["egress"]["rules"][0]["ports"] = json!((1000 + k).to_string());
            let body = json!({ "metadata": { "name": "p0", "version": now["metadata"]["version"] }, "spec": spec });
            let start = Instant::now();
            let (s, written) = writer
                .call(Method::PUT, "/personas/p0", Some(&body))
                .await
                .expect("PUT");
            assert_eq!(s, 200, "{written}");
            puts.push(start.elapsed());
            let version = written["metadata"]["version"].clone();
            for r in &mut readers {
                loop {
                    let (_, seen) = r
                        .call(Method::GET, "/personas/p0", None)
                        .await
                        .expect("GET");
                    if seen["metadata"]["version"] == version {
                        break;
                    }
                    assert!(start.elapsed() < Duration::from_secs(10), "never seen");
                }
            }
            lats.push(start.elapsed());
        }
        json!({ "put": percentiles(puts), "seen_everywhere": percentiles(lats) })
    })
}

pub fn run() -> Value {
    let mut fleet = FleetLab::new(&["a", "b", "c"]);
    let (a, b) = (&fleet.daemons[0], &fleet.daemons[1]);
    a.cli_ok("apply -f examples/personas.yaml");
    a.apply_yaml(&fleet.device(1, "lab"));
    let local = shifts(b, "vm-b");
    let remote = shifts(a, "vm-b");
    eprintln!(
        "  shift of a device on B: asked of B p50 {:.0} us, of A p50 {:.0} us",
        local["latency"]["p50_us"].as_f64().unwrap_or(0.0),
        remote["latency"]["p50_us"].as_f64().unwrap_or(0.0)
    );

    let before = db_size(&fleet);
    let took = apply(a, "personas.yaml", &personas(PERSONAS));
    let after = db_size(&fleet);
    let per_persona = json!({
        "personas": PERSONAS, "apply_s": took.as_secs_f64(),
        "db_bytes": (after.0 - before.0) / PERSONAS as f64,
        "db_in_use_bytes": (after.1 - before.1) / PERSONAS as f64,
    });
    eprintln!("  {PERSONAS} personas: {per_persona}");
    let fanned = fan_out(&fleet);
    eprintln!("  fan-out with few devices: {fanned}");

    let mut scales = Vec::new();
    let mut have = 0;
    for n in DEVICE_COUNTS {
        let before = db_size(&fleet);
        // Each host's devices through its own API, the three at once.
        let start = Instant::now();
        std::thread::scope(|s| {
            for (h, d) in fleet.hosts.iter().zip(&fleet.daemons) {
                s.spawn(move || apply(d, &format!("devices-{h}.yaml"), &devices(h, have, n)));
            }
        });
        let took = start.elapsed();
        let after = db_size(&fleet);
        let added = 3 * (n - have);
        have = n;
        let start = Instant::now();
        fleet.daemons[2].restart();
        let sync = start.elapsed();
        let fanned = fan_out(&fleet);
        let row = json!({
            "devices_per_host": n, "hosts": 3,
            "apply_s": took.as_secs_f64(), "creates_per_s": added as f64 / took.as_secs_f64(),
            "sync_s": sync.as_secs_f64(), "fan_out": fanned,
            "db_bytes_per_device": (after.0 - before.0) / added as f64,
            "db_in_use_bytes_per_device": (after.1 - before.1) / added as f64,
            "db_bytes": after.0, "db_in_use_bytes": after.1,
            "rss_kib": fleet.daemons[2].rss_kib(),
        });
        eprintln!("  3 x {n} devices: {row}");
        scales.push(row);
    }
    json!({ "shift_local": local, "shift_remote": remote, "personas": per_persona, "fan_out": fanned, "scale": scales })
}
