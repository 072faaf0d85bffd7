//! Per-packet cost of the persona programs next to an XDP_PASS program, all measured in
//! the same run with BPF_PROG_TEST_RUN (repeat 1e6), reported as ratios to the baseline.
use std::net::IpAddr;

use persona_common::{DIR_EGRESS, DIR_INGRESS};
use persona_tests::{
    frames::{L4, SYN, frame},
    harness::{Harness, INNER_V4},
};

const REPEAT: u32 = 1_000_000;
const PERSONA: &str = r#"
addresses: ["203.0.113.10/24", "2001:db8:a::10/64"]
dns: ["198.51.100.53"]
firewall:
  egress: { default: allow }
  ingress:
    default: drop
    rules:
      - { cidr: 198.51.100.0/24, protocol: tcp, ports: "22", action: allow }
"#;

/// Percentiles of a set of durations, in microseconds.
fn percentiles(mut v: Vec<std::time::Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    format!(
        "p50 {:>8.1} us  p99 {:>8.1} us  max {:>8.1} us",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

fn shift_latency(h: &mut Harness, rules: usize) {
    // Distinct /25s inside 198.18.0.0/15: 1024 of them.
    let rule_list: String = (0..rules)
        .map(|i| {
            format!(
                "      - {{ cidr: 198.{}.{}.{}/25, protocol: tcp, ports: \"443\", action: allow }}\n",
                18 + i / 512,
                (i / 2) % 256,
                (i % 2) * 128
            )
        })
        .collect();
    let spec = |addr: &str| {
        format!(
            "addresses: [\"{addr}/24\"]\nfirewall:\n  egress: {{ default: allow }}\n  ingress:\n    default: drop\n    rules:\n{rule_list}"
        )
    };
    let (a, b) = (spec("203.0.113.10"), spec("203.0.113.20"));
    let mut flips = Vec::new();
    let mut whole = Vec::new();
    for i in 0..200 {
        let start = std::time::Instant::now();
        let shifted = h.shift(if i % 2 == 0 { &a } else { &b }, false);
        whole.push(start.elapsed());
        flips.push(shifted.flip);
    }
    println!(
        "{rules:>6} rules  flip (one map update): {}",
        percentiles(flips)
    );
    println!(
        "{rules:>6} rules  compile+stage+flip:    {}",
        percentiles(whole)
    );
}

fn main() {
    let mut h = Harness::with_persona(PERSONA);
    let inner = IpAddr::V4(INNER_V4);
    let remote: IpAddr = "198.51.100.7".parse().unwrap();
    let persona: IpAddr = "203.0.113.10".parse().unwrap();
    let udp = |s, d| L4::Udp {
        sport: s,
        dport: d,
        payload: vec![0; 18],
        zero_checksum: false,
    };
    let out_udp = frame(inner, remote, &udp(5000, 9000));
    let syn_in = frame(
        remote,
        persona,
        &L4::Tcp {
            sport: 50000,
            dport: 22,
            flags: SYN,
            payload: vec![],
        },
    );
    let dns = frame(inner, "192.0.2.53".parse().unwrap(), &udp(33000, 53));

    let baseline = h.dp.bench(None, &out_udp, REPEAT).expect("baseline run");
    println!("BPF_PROG_TEST_RUN, repeat {REPEAT}, ns per packet (ratio to XDP_PASS)");
    println!(
        "{:<40} {:>8.1} ns  1.00x",
        "xdp_pass baseline (64-byte udp)",
        baseline.as_nanos() as f64
    );
    let cases: [(&str, Option<u8>, &[u8]); 3] = [
        (
            "from_vm xdp: udp, tracked after first",
            Some(DIR_EGRESS),
            &out_udp,
        ),
        ("from_vm xdp: dns redirect", Some(DIR_EGRESS), &dns),
        (
            "to_vm tc: tcp syn judged by rules",
            Some(DIR_INGRESS),
            &syn_in,
        ),
    ];
    for (name, dir, f) in cases {
        let t = h.dp.bench(dir, f, REPEAT).expect("bench run");
        println!(
            "{name:<40} {:>8.1} ns  {:.2}x",
            t.as_nanos() as f64,
            t.as_nanos() as f64 / baseline.as_nanos().max(1) as f64
        );
    }

    println!("\nshift latency, 200 shifts each, no host wiring (userspace wall clock)");
    for rules in [10, 1000] {
        shift_latency(&mut h, rules);
    }
}
