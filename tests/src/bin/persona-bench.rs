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
}
