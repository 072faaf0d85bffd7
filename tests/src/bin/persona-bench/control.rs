//! The control plane: shifts per second through the API, and context signals per second
//! through the rule engine with 1,000 rules.
use std::time::Instant;

use hyper::Method;
use persona_tests::{
    daemon::Daemon,
    lab::{Site, VM_IFACE},
};
use serde_json::{Value, json};

pub const RULES: usize = 1_000;

fn manifests(rules: usize) -> String {
    let mut m = String::new();
    for (name, addr) in [("a", "203.0.113.10"), ("b", "203.0.113.20")] {
        m.push_str(&format!(
            "apiVersion: persona.dev/v1\nkind: Persona\nmetadata: {{ name: {name} }}\nspec:\n  addresses: [\"{addr}/24\"]\n---\n"
        ));
    }
    m.push_str(&format!(
        "apiVersion: persona.dev/v1\nkind: Device\nmetadata: {{ name: vm1 }}\nspec:\n  interface: {VM_IFACE}\n  innerV4: 198.18.0.2\n  persona: a\n  labels: {{ team: bench }}\n"
    ));
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
    let site = Site::new();
    site.host.exec(&format!(
        "ip tuntap add {VM_IFACE} mode tap && ip link set {VM_IFACE} up"
    ));
    let d = Daemon::start_with(&site, &["--min-dwell", "0", "--cooldown", "0"]);
    let file = std::env::temp_dir().join(format!("persona-bench-control-{}.yaml", site.host.name));
    std::fs::write(&file, manifests(0)).expect("manifests");
    d.cli_ok(&format!("apply -f {}", file.display()));

    let shifts = 500;
    let start = Instant::now();
    for i in 0..shifts {
        let to = if i % 2 == 0 { "b" } else { "a" };
        let (s, v) = d.admin(
            Method::POST,
            "/trigger_shift",
            Some(&json!({ "device_id": "vm1", "persona_id": to })),
        );
        assert_eq!(s, 200, "{v}");
    }
    let shifts_per_s = f64::from(shifts) / start.elapsed().as_secs_f64();
    eprintln!("  {shifts_per_s:.0} shifts/s through the API (one client, sequential)");

    std::fs::write(&file, manifests(RULES)).expect("manifests");
    d.cli_ok(&format!("apply -f {}", file.display()));
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
    let _ = std::fs::remove_file(&file);
    json!({
        "api_shifts_per_s": shifts_per_s,
        "api_shifts": shifts,
        "rules": RULES,
        "context": by_batch,
    })
}
