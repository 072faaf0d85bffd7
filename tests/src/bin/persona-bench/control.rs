//! The control plane: shifts per second through the API, and context signals per second
//! through the rule engine with 1,000 rules.
use std::time::Instant;

use hyper::Method;
use serde_json::{Value, json};

use crate::api::{self, Bench};

pub const RULES: usize = 1_000;

fn manifests(rules: usize) -> String {
    let mut m = api::manifests("");
    // Every tenth rule is a CEL expression, the rest role conditions; none matches the
    // signals sent, so the engine evaluates all of them and shifts nothing.
    for i in 0..rules {
        let when = if i % 10 == 0 {
            format!("expression: 'signals.role == \"r{i}\"'")
        } else {
            format!("role: {{ in: [r{i}] }}")
        };
        m.push_str(&format!(
            "---\napiVersion: persona.dev/v1\nkind: Rule\nmetadata: {{ name: rule-{i} }}\nspec:\n  priority: {i}\n  selector: {{ matchLabels: {{ team: bench }} }}\n  persona: b\n  when: {{ {when} }}\n"
        ));
    }
    m
}

pub fn run() -> Value {
    let bench = Bench::start(&manifests(0), &["--min-dwell", "0", "--cooldown", "0"]);
    let d = &bench.daemon;

    let shifts: u32 = 500;
    let start = Instant::now();
    for i in 0..shifts {
        bench.shift(i as usize);
    }
    let shifts_per_s = f64::from(shifts) / start.elapsed().as_secs_f64();
    eprintln!("  {shifts_per_s:.0} shifts/s through the API (one client, sequential)");

    bench.apply(&manifests(RULES));
    let mut by_batch = Vec::new();
    for batch in [1usize, 100] {
        let posts = if batch == 1 { 1000 } else { 50 };
        let start = Instant::now();
        for i in 0..posts {
            let signals: Vec<Value> = (0..batch)
                .map(|j| json!({ "device": "vm1", "kind": "role", "role": format!("nobody-{}", (i * batch + j) % 2) }))
                .collect();
            let (s, v) = d.admin(Method::POST, "/context", Some(&json!(signals)));
            assert_eq!(s, 200, "{v}");
        }
        let secs = start.elapsed().as_secs_f64();
        let per_s = (posts * batch) as f64 / secs;
        eprintln!(
            "  {per_s:.0} signals/s with {RULES} rules, batches of {batch} ({:.2} ms per POST)",
            secs * 1e3 / posts as f64
        );
        by_batch.push(json!({ "batch": batch, "posts": posts, "signals_per_s": per_s, "ms_per_post": secs * 1e3 / posts as f64 }));
    }
    let (_, status) = d.admin(Method::GET, "/status/vm1", None);
    assert_eq!(status["persona"], "a", "no signal should have moved vm1");
    json!({
        "api_shifts_per_s": shifts_per_s,
        "api_shifts": shifts,
        "rules": RULES,
        "context": by_batch,
    })
}
