//! `cargo xtask bench`: the datapath and shifts against a baseline and against nftables,
//! in one run. Writes BENCHMARKS.md (method, machine, figures) and benchmarks.json (raw).
//! Nothing here asserts a time; the checks are that each measurement took the path it
//! names.
mod api;
mod control;
mod crowd;
mod fleet;
mod flows;
mod lifecycle;
mod packets;
mod report;
mod scale;
mod shifts;
mod throughput;

use serde_json::json;

type Section = fn() -> serde_json::Value;

fn main() {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let mut results =
        json!({ "machine": report::machine(), "date": jiff::Timestamp::now().to_string() });
    let sections: [(&str, Section); 9] = [
        ("packets", packets::run),
        ("shifts", shifts::run),
        ("flows", flows::run),
        ("lifecycle", lifecycle::run),
        ("control", control::run),
        ("crowd", crowd::run),
        ("throughput", throughput::run),
        ("scale", scale::run),
        ("fleet", fleet::run),
    ];
    for (name, run) in sections {
        if wanted(name) {
            eprintln!("== {name}");
            results[name] = run();
        }
    }
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    std::fs::write(
        root.join("benchmarks.json"),
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    )
    .expect("writing benchmarks.json");
    std::fs::write(root.join("BENCHMARKS.md"), report::markdown(&results))
        .expect("writing BENCHMARKS.md");
    eprintln!("wrote BENCHMARKS.md and benchmarks.json");
}
