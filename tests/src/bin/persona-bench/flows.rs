//! Shifts that keep open flows: latency with 10,000 established flows next to an idle
//! device (the flip does no per-flow work), and how long a drained address takes to be
//! released once its last flow ended.
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use persona::{datapath::Datapath as _, model::FlowMode};
use persona_tests::{
    daemon::Daemon,
    frames::{L4, frame},
    harness::{Harness, INNER_V4, TC_ACT_OK},
    lab::{Lab, VmLink, finish_stream},
};
use serde_json::{Value, json};

use crate::shifts::percentiles;

const FLOWS: u32 = 10_000;
const SHIFTS: usize = 200;
const A: &str = "addresses: [203.0.113.10/24]\n";
const B: &str = "addresses: [203.0.113.20/24]\n";

/// Keep-mode shifts of a device with `flows` open UDP flows.
fn keep_shifts(flows: u32) -> Value {
    let mut h = Harness::with_persona(A);
    for i in 0..flows {
        let remote = IpAddr::from([198, 51, 100, (i % 200) as u8 + 1]);
        let l4 = L4::Udp {
            sport: 10_000 + (i / 200) as u16,
            dport: 9000,
            payload: b"flow".to_vec(),
            zero_checksum: false,
        };
        let (verdict, _) = h.from_vm(&frame(IpAddr::V4(INNER_V4), remote, &l4));
        assert_eq!(verdict, TC_ACT_OK, "flow {i} opens");
    }
    let open =
        h.dp.flows(persona_tests::harness::LOOPBACK)
            .expect("flows")
            .len();
    assert_eq!(open, flows as usize, "every flow is tracked");
    let (mut flips, mut whole) = (Vec::new(), Vec::new());
    for i in 0..SHIFTS {
        let start = Instant::now();
        let shifted = h.shift(if i % 2 == 0 { B } else { A }, FlowMode::Keep);
        whole.push(start.elapsed());
        flips.push(shifted.flip);
    }
    json!({ "flows": flows, "flip": percentiles(flips), "compile_stage_flip": percentiles(whole) })
}

/// Through the daemon: a kept TCP connection closes, and the time until the host no
/// longer routes its address to the tap.
fn release(rounds: usize) -> Value {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/personas.yaml");
    d.cli_ok("apply -f examples/devices.yaml");
    let mut times = Vec::new();
    for i in 0..rounds {
        let (from, to) = if i % 2 == 0 {
            ("203.0.113.10", "travel")
        } else {
            ("203.0.113.20", "office")
        };
        let stream = lab.start_stream(4, 150);
        std::thread::sleep(Duration::from_millis(200));
        d.cli_ok(&format!("shift vm1 {to} --flows keep"));
        let ended = finish_stream(stream);
        assert_eq!(ended.ended, "done", "{ended:?}");
        let closed = Instant::now();
        let routed = || {
            lab.host
                .exec("ip route show dev pvm1")
                .split_whitespace()
                .any(|w| w == from)
        };
        while routed() {
            assert!(
                closed.elapsed() < Duration::from_secs(10),
                "{from} never released"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        times.push(closed.elapsed());
    }
    json!({ "rounds": rounds, "release": percentiles(times) })
}

pub fn run() -> Value {
    let idle = keep_shifts(0);
    let busy = keep_shifts(FLOWS);
    eprintln!("  idle {idle}\n  busy {busy}");
    let release = release(6);
    eprintln!("  release {release}");
    json!({ "idle": idle, "busy": busy, "release": release })
}
