//! The control plane: shifts per second through the API (one client, and eight at once
//! on eight devices), and context signals per second through the rule engine at 1,000
//! and 10,000 rules, on one device and on a hundred. Clients keep their connection, as
//! a feed or an orchestration tool would. Next to them, the disk's own fsync, which every
//! acknowledged write waits for.
use std::{
    io::Write as _,
    os::unix::fs::FileExt as _,
    time::{Duration, Instant},
};

use hyper::{Method, body::Bytes};
use persona::client::{Client, Connection, Target};
use persona_tests::{daemon::Daemon, lab::Site};
use serde_json::{Value, json};

use crate::shifts::percentiles;

/// Devices with a tap each, shifted concurrently.
const TAPS: usize = 8;
const RULE_COUNTS: [usize; 2] = [1_000, 10_000];
const DEVICE_COUNTS: [usize; 3] = [1, 100, 10_000];
/// POSTs per client measured apart, before a case's steady rate.
const FIRST_POSTS: usize = 5;

fn tap(i: usize) -> String {
    format!("pb{i}")
}

/// Personas `a{i}`/`b{i}` and a device on the tap `pb{i}` for each of the first `taps`,
/// and devices without an interface (they wait for it; the engine still decides for
/// them) up to `devices`.
fn objects(taps: usize, devices: usize) -> String {
    let mut m = String::new();
    for i in 0..taps {
        for (p, addr) in [("a", 10 + i), ("b", 40 + i)] {
            m.push_str(&format!(
                "apiVersion: persona.dev/v1\nkind: Persona\nmetadata: {{ name: {p}{i} }}\nspec:\n  addresses: [\"203.0.113.{addr}/24\"]\n---\n"
            ));
        }
    }
    for i in 0..devices.max(taps) {
        // Waiting devices have no persona of their own: no rule matches, so the engine
        // leaves them where they are.
        let (interface, persona) = if i < taps {
            (tap(i), format!("\n  persona: a{i}"))
        } else {
            (format!("pbw{i}"), String::new())
        };
        m.push_str(&format!(
            "apiVersion: persona.dev/v1\nkind: Device\nmetadata: {{ name: d{i} }}\nspec:\n  interface: {interface}\n  innerV4: 198.18.{}.{}{persona}\n  labels: {{ team: bench }}\n---\n",
            1 + i / 250,
            2 + i % 250
        ));
    }
    m
}

/// `n` rules selecting every bench device; one in ten a CEL expression, the rest role
/// conditions; none matches the signals sent, so every rule is evaluated.
fn rules(n: usize) -> String {
    let mut m = String::new();
    for i in 0..n {
        let when = if i % 10 == 0 {
            format!("expression: 'signals.role == \"r{i}\"'")
        } else {
            format!("role: {{ in: [r{i}] }}")
        };
        m.push_str(&format!(
            "apiVersion: persona.dev/v1\nkind: Rule\nmetadata: {{ name: rule-{i} }}\nspec:\n  priority: {i}\n  selector: {{ matchLabels: {{ team: bench }} }}\n  persona: b0\n  when: {{ {when} }}\n---\n"
        ));
    }
    m
}

pub fn apply(d: &Daemon, name: &str, manifests: &str) {
    let file = d.data_dir.join(name);
    std::fs::write(&file, manifests).expect("manifests");
    d.cli_ok(&format!("apply -f {}", file.display()));
}

/// The disk's fsync where the store lives: 4 KiB written and fdatasync'd, 300 times.
pub fn fsync(dir: &std::path::Path) -> Value {
    let path = dir.join("fsync.probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    f.write_all(&[0; 4096]).expect("probe");
    let mut times = Vec::new();
    for i in 0..300u64 {
        f.write_all_at(&[i as u8; 4096], (i % 16) * 4096)
            .expect("probe write");
        let start = Instant::now();
        f.sync_data().expect("fdatasync");
        times.push(start.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    percentiles(times)
}

/// `clients` connections at once, each making `calls` calls that `call(client, i)`
/// describes; total calls per second and each call's latency.
pub fn drive(
    d: &Daemon,
    clients: usize,
    calls: usize,
    call: impl Fn(usize, usize) -> (Method, String, Value) + Sync,
) -> (f64, Vec<Duration>) {
    let client = Client {
        target: Target::Unix(d.socket.clone()),
        token: Some(d.admin.clone()),
        cacert: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The load is made before the clock starts: what is timed is the daemon's.
    let load: Vec<Vec<(Method, String, Bytes)>> = (0..clients)
        .map(|c| {
            (0..calls)
                .map(|i| {
                    let (method, path, body) = call(c, i);
                    let body = serde_json::to_vec(&body).expect("a JSON body");
                    (method, path, Bytes::from(body))
                })
                .collect()
        })
        .collect();
    rt.block_on(async {
        let mut conns: Vec<Connection> = Vec::new();
        for _ in 0..clients {
            conns.push(client.connect().await.expect("connecting"));
        }
        let start = Instant::now();
        let runs = conns
            .into_iter()
            .zip(load)
            .map(|(mut conn, calls)| async move {
                let mut lat = Vec::with_capacity(calls.len());
                for (method, path, body) in calls {
                    let t = Instant::now();
                    let (status, answer) = conn.call_raw(method, &path, body).await.expect("call");
                    lat.push(t.elapsed());
                    assert!(
                        status.is_success(),
                        "{path}: {status} {}",
                        String::from_utf8_lossy(&answer)
                    );
                }
                lat
            });
        let lats: Vec<Duration> = futures::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
            .collect();
        let per_s = lats.len() as f64 / start.elapsed().as_secs_f64();
        (per_s, lats)
    })
}

fn shifts(d: &Daemon) -> Value {
    let shift = |c: usize, i: usize| {
        let to = if i.is_multiple_of(2) { "b" } else { "a" };
        (
            Method::POST,
            "/trigger_shift".to_owned(),
            json!({ "device_id": format!("d{c}"), "persona_id": format!("{to}{c}") }),
        )
    };
    let mut rows = Vec::new();
    for (clients, calls) in [(1, 1000), (TAPS, 250)] {
        let (per_s, lats) = drive(d, clients, calls, shift);
        eprintln!("  {per_s:.0} shifts/s through the API, {clients} client(s)");
        rows.push(json!({ "clients": clients, "shifts": clients * calls, "shifts_per_s": per_s, "latency": percentiles(lats) }));
    }
    json!(rows)
}

fn signals(d: &Daemon, rules: usize, devices: usize) -> Vec<Value> {
    let role = |c: usize, i: usize, j: usize| json!({ "device": format!("d{}", (c * 7919 + i * 31 + j) % devices), "kind": "role", "role": format!("nobody-{}", (i + j) % 2) });
    let mut rows = Vec::new();
    // Single signals, one client and eight; then batches of 1,000 over distinct devices.
    // Each case's first POSTs meet devices the engine has not decided for since they were
    // written: measured apart as first contact, then the steady rate.
    let cases: [(usize, usize, usize); 3] = [(1, 1, 1000), (8, 1, 250), (1, 1000, 100)];
    for (clients, batch, posts) in cases {
        let post = |offset: usize| {
            move |c: usize, i: usize| {
                let body: Vec<Value> = (0..batch).map(|j| role(c, i + offset, j)).collect();
                (Method::POST, "/context".to_owned(), json!(body))
            }
        };
        let first = FIRST_POSTS.min(posts);
        let (_, first_lats) = drive(d, clients, first, post(0));
        let (per_post, lats) = drive(d, clients, posts, post(first));
        let per_s = per_post * batch as f64;
        eprintln!(
            "  {per_s:.0} signals/s, {rules} rules, {devices} devices, {clients} client(s), batches of {batch}"
        );
        rows.push(json!({
            "rules": rules, "devices": devices, "clients": clients, "batch": batch,
            "signals": clients * posts * batch, "signals_per_s": per_s, "post_latency": percentiles(lats),
            "first_posts": clients * first, "first_post_latency": percentiles(first_lats),
        }));
    }
    rows
}

/// Signals that shift: d0's role alternates between one a rule asks for (to `b0`) and
/// one none does (back to its own `a0`). The POST returns after the flip, so its latency
/// bounds signal-to-flip from above; the daemon's own histogram gives the mean.
fn signal_shifts(d: &Daemon) -> Value {
    let (per_s, lats) = drive(d, 1, 200, |_, i| {
        let role = if i % 2 == 0 { "r7" } else { "nobody" };
        (
            Method::POST,
            "/context".to_owned(),
            json!([{ "device": "d0", "kind": "role", "role": role }]),
        )
    });
    let text = d.metrics();
    let read = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let (sum, count) = (
        read("persona_signal_to_flip_seconds_sum"),
        read("persona_signal_to_flip_seconds_count"),
    );
    let (p50, p99) = (
        bucket_quantile(&text, "persona_signal_to_flip_seconds", 0.5),
        bucket_quantile(&text, "persona_signal_to_flip_seconds", 0.99),
    );
    eprintln!(
        "  {per_s:.0} shifting signals/s, {count} flips, mean {:.0} us, p50 <= {p50:.0} us, p99 <= {p99:.0} us",
        sum / count * 1e6
    );
    json!({
        "posts": lats.len(), "post_latency": percentiles(lats), "flips": count,
        "mean_signal_to_flip_us": sum / count * 1e6,
        "signal_to_flip_p50_at_most_us": p50, "signal_to_flip_p99_at_most_us": p99,
    })
}

/// The upper bound, in microseconds, of the histogram bucket holding quantile `q`.
fn bucket_quantile(metrics: &str, name: &str, q: f64) -> f64 {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| {
            let (le, n) = l.strip_prefix(&prefix)?.split_once("\"}")?;
            Some((le.parse().ok()?, n.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(f64::NAN, |(le, _)| le * 1e6)
}

pub fn run() -> Value {
    let site = Site::new();
    for i in 0..TAPS {
        site.host.exec(&format!(
            "ip tuntap add {t} mode tap && ip link set {t} up",
            t = tap(i)
        ));
    }
    let d = Daemon::start_with(&site, &["--min-dwell", "0", "--cooldown", "0"]);
    let disk = fsync(&d.data_dir);
    apply(&d, "objects.yaml", &objects(TAPS, 1));
    let shifted = shifts(&d);
    let mut context = Vec::new();
    // Applying adds and never removes: rules grow from 1,000 to 10,000, and at each
    // the devices from one to a hundred (signals for one name only d0).
    for n in RULE_COUNTS {
        apply(&d, "rules.yaml", &rules(n));
        for devices in DEVICE_COUNTS {
            apply(&d, "objects.yaml", &objects(TAPS, devices));
            context.extend(signals(&d, n, devices));
        }
    }
    let shifting = signal_shifts(&d);
    for i in 0..TAPS {
        let (_, status) = d.admin(Method::GET, &format!("/status/d{i}"), None);
        assert!(
            status["persona"] == format!("a{i}") || status["persona"] == format!("b{i}"),
            "d{i} on a persona of its own: {status}"
        );
    }
    drop(d);
    drop(site);
    json!({ "fsync": disk, "shifts": shifted, "context": context, "signal_shifts": shifting })
}
