//! Shifts among thousands of devices: one device's shifts through the API with 8 devices
//! beside it, then with 4,096 attached in the same daemon, each on a persona of its own.
//! A shift checks that no other device holds the addresses it takes; what that costs
//! should not grow with the devices beside it. Also the time to apply and attach them.
use std::time::Instant;

use hyper::Method;
use persona_tests::{daemon::Daemon, lab::Site};
use serde_json::{Value, json};

use crate::{
    control::{self, drive},
    scale::DEVICES,
    shifts::percentiles,
};

const FEW: usize = 8;
const SHIFTS: usize = 1000;

fn tap(i: usize) -> String {
    format!("pc{i}")
}

/// Device `c{i}` on tap `pc{i}` with persona `s{i}` of its own, for `range`; persona
/// `s0`'s twin `t0` for the device measured to alternate with.
fn objects(range: std::ops::Range<usize>) -> String {
    let mut m = String::new();
    for i in range {
        let (hi, lo) = (i / 250, i % 250 + 2);
        let persona = |name: &str, net: u8| {
            format!(
                "apiVersion: persona.dev/v1\nkind: Persona\nmetadata: {{ name: {name} }}\nspec:\n  addresses: [\"198.19.{}.{lo}/32\"]\n---\n",
                net as usize + hi
            )
        };
        m.push_str(&persona(&format!("s{i}"), 0));
        if i == 0 {
            m.push_str(&persona("t0", 100));
        }
        m.push_str(&format!(
            "apiVersion: persona.dev/v1\nkind: Device\nmetadata: {{ name: c{i} }}\nspec:\n  interface: {}\n  innerV4: 198.18.{hi}.{lo}\n  persona: s{i}\n---\n",
            tap(i)
        ));
    }
    m
}

/// Applied through the CLI; how long it took, in seconds.
fn apply(d: &Daemon, manifests: &str) -> f64 {
    let start = Instant::now();
    control::apply(d, "crowd.yaml", manifests);
    start.elapsed().as_secs_f64()
}

/// c0 shifted back and forth between `s0` and `t0`, one client.
fn c0_shifts(d: &Daemon, devices: usize) -> Value {
    let (per_s, lats) = drive(d, 1, SHIFTS, |_, i| {
        let to = if i.is_multiple_of(2) { "t0" } else { "s0" };
        (
            Method::POST,
            "/trigger_shift".to_owned(),
            json!({ "device_id": "c0", "persona_id": to }),
        )
    });
    let latency = percentiles(lats);
    eprintln!(
        "  {devices} devices: {per_s:.0} shifts/s, p50 {} us",
        latency["p50_us"]
    );
    json!({ "devices": devices, "shifts": SHIFTS, "shifts_per_s": per_s, "latency": latency })
}

fn attached(d: &Daemon) -> usize {
    d.metrics()
        .lines()
        .filter(|l| l.starts_with("persona_device_generation{"))
        .count()
}

/// `ip -batch` in the host's namespace, with the lines `each` gives for every tap.
fn for_each_tap(site: &Site, each: impl Fn(&str) -> String) {
    let batch: String = (0..DEVICES).map(|i| each(&tap(i))).collect();
    persona_tests::netns::ip_batch(&site.host.name, &batch);
}

pub fn run() -> Value {
    let site = Site::new();
    for_each_tap(&site, |t| {
        format!("tuntap add {t} mode tap\nlink set {t} up\n")
    });
    let d = Daemon::start_with(&site, &["--min-dwell", "0", "--cooldown", "0"]);
    apply(&d, &objects(0..FEW));
    assert_eq!(attached(&d), FEW, "the first devices attached");
    let few = c0_shifts(&d, FEW);
    let apply_s = apply(&d, &objects(FEW..DEVICES));
    assert_eq!(attached(&d), DEVICES, "every device attached");
    eprintln!(
        "  {} more devices applied and attached in {apply_s:.1} s",
        DEVICES - FEW
    );
    let many = c0_shifts(&d, DEVICES);
    let (_, status) = d.admin(Method::GET, &format!("/status/c{}", DEVICES - 1), None);
    assert_eq!(status["persona"], format!("s{}", DEVICES - 1), "{status}");
    drop(d);
    // Deleted here, not by the namespace's end: the kernel tears thousands of taps down
    // in the background for minutes, and would slow the sections after this one.
    for_each_tap(&site, |t| format!("link del {t}\n"));
    drop(site);
    json!({ "rows": [few, many], "apply_s": apply_s, "applied": DEVICES - FEW })
}
