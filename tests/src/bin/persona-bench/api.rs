//! What the API benchmarks run on: the daemon on a site with one tap, vm1 on it, and two
//! personas, `a` (203.0.113.10) and `b` (203.0.113.20), for it to shift between.
use std::path::PathBuf;

use persona_tests::{
    daemon::Daemon,
    lab::{Site, VM_IFACE},
};
use serde_json::{Value, json};

/// The daemon and, kept alive beside it, its site; the daemon goes first when they are
/// dropped.
pub struct Bench {
    pub daemon: Daemon,
    _site: Site,
}

/// Personas `a` and `b` with `spec` (the YAML of a spec without its addresses, indented
/// by two) and vm1 starting on `a`.
pub fn manifests(spec: &str) -> String {
    let mut m = String::new();
    for (name, addr) in [("a", "203.0.113.10"), ("b", "203.0.113.20")] {
        m.push_str(&format!(
            "apiVersion: persona.dev/v1\nkind: Persona\nmetadata: {{ name: {name} }}\nspec:\n  addresses: [\"{addr}/24\"]\n{spec}---\n"
        ));
    }
    m.push_str(&format!(
        "apiVersion: persona.dev/v1\nkind: Device\nmetadata: {{ name: vm1 }}\nspec:\n  interface: {VM_IFACE}\n  innerV4: 198.18.0.2\n  persona: a\n  labels: {{ team: bench }}\n"
    ));
    m
}

impl Bench {
    /// The daemon keeps its store in `data_dir` when given, else where tests keep it.
    pub fn start(manifests: &str, daemon_args: &[&str], data_dir: Option<PathBuf>) -> Self {
        let site = Site::new();
        site.host.exec(&format!(
            "ip tuntap add {VM_IFACE} mode tap && ip link set {VM_IFACE} up"
        ));
        let bench = Self {
            daemon: Daemon::start_in(&site, daemon_args, &[], data_dir),
            _site: site,
        };
        bench.apply(manifests);
        bench
    }

    pub fn apply(&self, manifests: &str) {
        let file = self.daemon.data_dir.join("bench.yaml");
        std::fs::write(&file, manifests).expect("manifests");
        self.daemon.cli_ok(&format!("apply -f {}", file.display()));
    }
}

/// Shift number `i` of vm1: to `b` when even, back to `a` when odd.
pub fn shift_body(i: usize) -> Value {
    let to = if i.is_multiple_of(2) { "b" } else { "a" };
    json!({ "device_id": "vm1", "persona_id": to })
}
