//! Shift latency: the flip alone, the whole compile-stage-flip, an API call to a
//! flipped datapath, and, for comparison, replacing an equivalent nftables ruleset
//! atomically with `nft -f`.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use hyper::Method;
use persona::model::FlowMode;
use persona_tests::{
    harness::Harness,
    netns::{Netns, sh},
};
use serde_json::{Value, json};

use crate::api::{self, Bench};

pub const RULE_COUNTS: [usize; 3] = [10, 1_000, 10_000];

pub fn percentiles(mut v: Vec<Duration>) -> Value {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    json!({ "n": v.len(), "p50_us": at(0.5), "p90_us": at(0.9), "p99_us": at(0.99), "max_us": at(1.0) })
}

/// `n` ingress rules on their own /32s; two personas differ in address.
fn persona(n: usize, addr: &str) -> String {
    format!("addresses: [\"{addr}/24\"]\n{}", firewall(n))
}

fn firewall(n: usize) -> String {
    let rules: String = (0..n)
        .map(|i| {
            format!(
                "      - {{ cidr: 198.19.{}.{}/32, protocol: tcp, ports: \"443\", action: allow }}\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    format!(
        "firewall:\n  egress: {{ default: allow }}\n  ingress:\n    default: drop\n    rules:\n      - {{ cidr: 198.51.100.0/24, protocol: tcp, ports: \"22\", action: allow }}\n{rules}"
    )
}

fn datapath(n: usize, shifts: usize) -> Value {
    let mut h = Harness::new();
    let (a, b) = (persona(n, "203.0.113.10"), persona(n, "203.0.113.20"));
    let (mut flips, mut whole) = (Vec::new(), Vec::new());
    for i in 0..shifts {
        let start = Instant::now();
        let shifted = h.shift(if i % 2 == 0 { &a } else { &b }, FlowMode::Keep);
        whole.push(start.elapsed());
        flips.push(shifted.flip);
    }
    json!({ "flip": percentiles(flips), "compile_stage_flip": percentiles(whole) })
}

/// The same persona as an nftables ruleset: DNAT in, SNAT out, the rules in a set-free
/// chain (one rule per address, as persona has one LPM entry per prefix).
fn nft_ruleset(n: usize, addr: &str) -> String {
    let mut rules = String::new();
    for i in 0..n {
        rules.push_str(&format!(
            "    ip saddr 198.19.{}.{} tcp dport 443 accept\n",
            i / 256,
            i % 256
        ));
    }
    format!(
        "flush ruleset
table ip persona {{
  chain pre {{ type nat hook prerouting priority dstnat; ip daddr {addr} dnat to 198.18.0.2; }}
  chain post {{ type nat hook postrouting priority srcnat; ip saddr 198.18.0.2 snat to {addr}; }}
  chain filter {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ip saddr 198.18.0.2 accept
    ip saddr 198.51.100.0/24 tcp dport 22 accept
{rules}  }}
}}
"
    )
}

fn nft(n: usize, shifts: usize) -> Value {
    let ns = Netns::new("p-bench-nft");
    let dir = std::env::temp_dir().join(format!("persona-bench-nft-{}", ns.name));
    std::fs::create_dir_all(&dir).expect("nft dir");
    let files: Vec<_> = ["203.0.113.10", "203.0.113.20"]
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let f = dir.join(format!("{i}.nft"));
            std::fs::write(&f, nft_ruleset(n, addr)).expect("ruleset");
            f
        })
        .collect();
    let mut times = Vec::new();
    for i in 0..shifts {
        let f = &files[i % 2];
        let start = Instant::now();
        sh(&format!("ip netns exec {} nft -f {}", ns.name, f.display()));
        times.push(start.elapsed());
    }
    let _ = std::fs::remove_dir_all(&dir);
    json!({ "nft_f": percentiles(times) })
}

/// API shifts per rule count: the call is cheap, and its p99 needs the samples.
const API_SHIFTS: usize = 1_000;

/// POST /trigger_shift to the daemon until the datapath has flipped (the call returns
/// after the flip), vm1 alternating between two personas, on one kept-alive connection
/// as an orchestration tool keeps it; next to it, the disk's own fsync where the store
/// lives, which every acknowledged shift waits for. Then the same with the daemon's
/// store on tmpfs, whose fsync returns at once: what a shift costs but for the disk.
fn api(n: usize, shifts: usize) -> Value {
    let spec: String = firewall(n).lines().map(|l| format!("  {l}\n")).collect();
    let manifests = api::manifests(&spec);
    let bench = Bench::start(&manifests, &[], None);
    let disk = crate::control::fsync(&bench.daemon.data_dir);
    let (client, reported) = api_shifts(&bench, shifts);
    drop(bench);
    let memory = Bench::start(&manifests, &[], Some(PathBuf::from(IN_MEMORY)));
    let (in_memory, _) = api_shifts(&memory, shifts);
    json!({
        "api_call": percentiles(client),
        "daemon_reported": percentiles(reported),
        "fsync": disk,
        "api_call_store_in_memory": percentiles(in_memory),
    })
}

/// A data directory on tmpfs.
const IN_MEMORY: &str = "/dev/shm/persona-bench-data";

/// `shifts` shifts of vm1 through the API: each call's latency, and the duration the
/// daemon reported for it.
fn api_shifts(bench: &Bench, shifts: usize) -> (Vec<Duration>, Vec<Duration>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut conn = bench
            .daemon
            .client(Some(&bench.daemon.admin))
            .connect()
            .await
            .expect("connecting");
        let (mut client, mut reported) = (Vec::new(), Vec::new());
        for i in 0..shifts {
            let start = Instant::now();
            let (status, v) = conn
                .call(Method::POST, "/trigger_shift", Some(&api::shift_body(i)))
                .await
                .expect("POST /trigger_shift");
            client.push(start.elapsed());
            assert_eq!(status, 200, "{v}");
            if let Some(us) = v["duration_us"].as_u64() {
                reported.push(Duration::from_micros(us));
            }
        }
        (client, reported)
    })
}

pub fn run() -> Value {
    let mut rows = Vec::new();
    for &n in &RULE_COUNTS {
        let shifts = if n >= 10_000 { 40 } else { 200 };
        let mut row = json!({ "rules": n, "shifts": shifts });
        for part in [
            datapath(n, shifts),
            api(n, API_SHIFTS),
            nft(n, shifts.min(100)),
        ] {
            row.as_object_mut()
                .unwrap()
                .extend(part.as_object().unwrap().clone());
        }
        eprintln!("  {n:>6} rules  {row}");
        rows.push(row);
    }
    json!({ "rows": rows })
}
