//! Scale: 4,096 tap devices (the datapath's limit) attached, each with its own persona,
//! in one namespace; the cost of each attach and shift as the count grows; then each
//! device shifted through 16 personas of its own (65,536 device-persona pairs), with
//! every map's fill; a scrape's one pass over the counters; the maps' memory as the
//! kernel accounts it; personas stored in the embedded store.
use std::time::{Duration, Instant};

use persona::{
    datapath::{
        Datapath, ShiftOptions,
        compile::compile,
        kernel::{KernelConfig, KernelDatapath},
    },
    model::{DeviceSpec, PersonaSpec},
    store::{Expect, Kind, Store, embedded::EmbeddedStore},
};
use persona_tests::{
    harness::{self, unique_pin_dir},
    netns::{Netns, ip_batch, sh},
};
use serde_json::{Value, json};

pub const DEVICES: usize = persona_common::device::MAX_DEVICES as usize;
/// Personas each device goes through after its first.
pub const ROUNDS: usize = 16;
pub const STORED: usize = 10_000;

fn device(i: usize) -> DeviceSpec {
    DeviceSpec {
        interface: format!("t{i}"),
        inner_v4: Some(std::net::Ipv4Addr::new(
            198,
            18,
            (i / 250) as u8,
            (i % 250 + 2) as u8,
        )),
        inner_v6: None,
        mac: Some(format!("52:54:00:00:{:02x}:{:02x}", i / 256, i % 256)),
        ..harness::device()
    }
}

/// Persona `k` (0..65,536) has the address 198.19.k/256.k%256; all share one firewall.
fn persona(k: usize) -> PersonaSpec {
    serde_yaml::from_str(&format!(
        "addresses: [\"198.19.{}.{}/16\"]\nfirewall:\n  egress: {{ default: allow }}\n  ingress:\n    default: drop\n    rules:\n      - {{ cidr: 198.51.100.0/24, protocol: tcp, ports: \"22\", action: allow }}\n",
        k / 256,
        k % 256
    ))
    .expect("persona")
}

/// The persona of device `i` in round `r`, with its counter id.
fn compiled(i: usize, r: usize) -> persona::datapath::CompiledPersona {
    let k = i * ROUNDS + r;
    let mut c = compile(&persona(k)).expect("compiles");
    c.id = k as u32 + 1;
    c
}

/// A scrape's read of every device's counters: p50 of five.
fn scrape(dp: &KernelDatapath) -> (f64, usize) {
    let mut times = Vec::new();
    let mut n = 0;
    for _ in 0..5 {
        let t = Instant::now();
        n = dp.counts_all().expect("counts").len();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times[2], n)
}

/// Kernel-accounted memory (bytes_memlock) of every map pinned in `dir`.
fn map_memory(dir: &std::path::Path) -> (u64, Vec<(String, u64)>) {
    let mut maps = Vec::new();
    for e in std::fs::read_dir(dir).expect("pin dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            continue;
        }
        let out = sh(&format!("bpftool -j map show pinned {}", p.display()));
        let v: Value = serde_json::from_str(&out).unwrap_or_default();
        maps.push((
            e.file_name().to_string_lossy().into_owned(),
            v["bytes_memlock"].as_u64().unwrap_or(0),
        ));
    }
    maps.sort();
    (maps.iter().map(|(_, b)| b).sum(), maps)
}

fn devices() -> Value {
    let ns = Netns::new("p-bench-scale");
    let batch: String = (0..DEVICES)
        .map(|i| format!("tuntap add t{i} mode tap\nlink set t{i} up\n"))
        .collect();
    ip_batch(&ns.name, &batch);
    let pin_dir = unique_pin_dir("scale");
    let name = ns.name.clone();
    let dir = pin_dir.clone();
    let result = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{name}")).expect("netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut dp = KernelDatapath::open(KernelConfig {
            pin_dir: dir.clone(),
            uplinks: Vec::new(),
            wire_host: true,
            ..KernelConfig::default()
        })
        .expect("datapath");
        let (empty, _) = map_memory(&dir);
        let mut steps = Vec::new();
        let (mut attach, mut shift) = (Duration::ZERO, Duration::ZERO);
        let mut last = 0;
        for i in 0..DEVICES {
            let t = Instant::now();
            let ifindex = dp.attach(&device(i)).expect("attach");
            attach += t.elapsed();
            let t = Instant::now();
            let staged = dp.stage(&compiled(i, 0)).expect("stage");
            let shifted = dp.shift(ifindex, staged, ShiftOptions::default()).expect("shift");
            shift += t.elapsed();
            let n = i + 1;
            if [1, 10, 100, 1000, 2000, 3000, DEVICES].contains(&n) {
                let k = (n - last) as u32;
                steps.push(json!({
                    "devices": n,
                    "attach_us_each": attach.as_secs_f64() * 1e6 / f64::from(k),
                    "stage_shift_us_each": shift.as_secs_f64() * 1e6 / f64::from(k),
                    "last_flip_us": shifted.flip.as_secs_f64() * 1e6,
                }));
                eprintln!("  {n:>5} devices: {}", steps.last().unwrap());
                (attach, shift, last) = (Duration::ZERO, Duration::ZERO, n);
            }
        }
        let (full, maps) = map_memory(&dir);
        let (scrape_one_ms, counted) = scrape(&dp);
        eprintln!("  a scrape's pass over {counted} devices' counters: {scrape_one_ms:.1} ms");
        // Every device through 16 more personas: 65,536 pairs, no map may fill up.
        let t = Instant::now();
        for r in 1..=ROUNDS {
            for i in 0..DEVICES {
                let ifindex = persona::datapath::ifindex(&format!("t{i}")).expect("ifindex");
                let staged = dp.stage(&compiled(i, r % ROUNDS)).expect("stage");
                dp.shift(ifindex, staged, ShiftOptions::default())
                    .unwrap_or_else(|e| panic!("round {r}, device {i}: {e}"));
            }
            // What the daemon does each second: addresses no flow uses are released.
            let swept = dp.sweep().expect("sweep");
            for (ifindex, addr) in swept.released {
                dp.forget_drains(ifindex, &[addr]).expect("forget drains");
            }
            dp.reclaim().expect("reclaim");
        }
        let rounds_s = t.elapsed().as_secs_f64();
        let (after, _) = map_memory(&dir);
        let (scrape_ms, _) = scrape(&dp);
        let active = dp.usage().expect("usage");
        eprintln!(
            "  {} shifts through {} pairs in {rounds_s:.1} s; scrape {scrape_ms:.1} ms; {:?}",
            DEVICES * ROUNDS,
            DEVICES * ROUNDS,
            active.maps
        );
        for i in 0..DEVICES {
            let ifindex = persona::datapath::ifindex(&format!("t{i}")).expect("ifindex");
            dp.detach(ifindex).expect("detach");
        }
        json!({
            "devices": DEVICES,
            "steps": steps,
            "map_memory_bytes_empty": empty,
            "map_memory_bytes_full": full,
            "rounds": ROUNDS,
            "round_shifts": DEVICES * ROUNDS,
            "rounds_s": rounds_s,
            "map_memory_bytes_after_rounds": after,
            "scrape_ms_one_persona": scrape_one_ms,
            "scrape_ms_after_rounds": scrape_ms,
            "map_memory_by_map": maps.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "map_entries": active.maps.iter().map(|(m, used, cap)| json!({"map": m, "used": used, "capacity": cap})).collect::<Vec<_>>(),
        })
    })
    .join()
    .expect("scale thread");
    let _ = std::fs::remove_dir_all(&pin_dir);
    result
}

fn stored() -> Value {
    let dir = std::env::temp_dir().join(format!("persona-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("store.redb");
    let store = EmbeddedStore::open(&path).expect("store");
    let mut steps = Vec::new();
    let t = Instant::now();
    let mut last = Instant::now();
    for i in 0..STORED {
        let spec = serde_json::to_value(persona(i % DEVICES)).expect("json");
        store
            .put(Kind::Persona, &format!("p{i}"), spec, Expect::Absent)
            .expect("put");
        if [1_000, 5_000, 10_000].contains(&(i + 1)) {
            let took = last.elapsed();
            let list = Instant::now();
            let n = store.list(Kind::Persona).expect("list").len();
            steps.push(json!({
                "personas": n,
                "put_us_each_since_last": took.as_secs_f64() * 1e6 / if i < 1000 { 1000.0 } else if i < 5000 { 4000.0 } else { 5000.0 },
                "list_all_ms": list.elapsed().as_secs_f64() * 1e3,
                "file_bytes": std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            }));
            eprintln!("  {}", steps.last().unwrap());
            last = Instant::now();
        }
    }
    let total = t.elapsed();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    json!({ "personas": STORED, "total_s": total.as_secs_f64(), "steps": steps })
}

pub fn run() -> Value {
    json!({ "devices": devices(), "store": stored() })
}
