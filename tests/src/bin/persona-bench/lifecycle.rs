//! A VM's interface coming back (what a VM restart does): from `ip link set up` to the
//! device's programs attached under the new ifindex, and to its persona active again,
//! with the daemon following link events. Baselines from the same run: the `ip link
//! set up` command alone, and an API shift of the same device.
use std::time::{Duration, Instant};

use hyper::Method;
use persona_tests::{
    daemon::Daemon,
    lab::{Lab, VM_IFACE, VmLink},
};
use serde_json::{Value, json};

use crate::shifts::percentiles;

const ROUNDS: usize = 40;

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let since = Instant::now();
    while !ok() {
        assert!(since.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn run() -> Value {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/personas.yaml");
    d.cli_ok("apply -f examples/devices.yaml");
    let status = || d.admin(Method::GET, "/status/vm1", None).1;
    let (mut command, mut guarded, mut persona) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        lab.unlink();
        wait("the interface is gone", || status()["up"] == false);
        let before = status()["generation"].as_u64().unwrap_or(0);
        lab.relink_down(VM_IFACE);
        let ifindex: Value =
            serde_json::from_str(&lab.host.exec(&format!("ip -j link show {VM_IFACE}"))).unwrap();
        let pin = lab
            .pin_dir
            .join("links")
            .join(format!("{}-tc-in", ifindex[0]["ifindex"]));
        let start = Instant::now();
        lab.host.exec(&format!("ip link set {VM_IFACE} up"));
        command.push(start.elapsed());
        wait("the programs are attached", || pin.exists());
        guarded.push(start.elapsed());
        wait("the persona is back", || {
            let s = status();
            s["up"] == true && s["generation"].as_u64().is_some_and(|g| g > before)
        });
        persona.push(start.elapsed());
    }
    let mut shifts = Vec::new();
    for i in 0..ROUNDS {
        let to = if i % 2 == 0 { "travel" } else { "office" };
        let start = Instant::now();
        let (code, _) = d.admin(
            Method::POST,
            "/trigger_shift",
            Some(&json!({"device_id": "vm1", "persona_id": to})),
        );
        shifts.push(start.elapsed());
        assert_eq!(code, 200);
    }
    let out = json!({
        "rounds": ROUNDS,
        "link_up_command": percentiles(command),
        "appear_to_guarded": percentiles(guarded),
        "appear_to_persona": percentiles(persona),
        "api_shift": percentiles(shifts),
    });
    eprintln!("  {out}");
    out
}
