//! Per-packet cost through BPF_PROG_TEST_RUN, next to an XDP_PASS program run in the
//! same process on the same frames.
//!
//! With `repeat` > 1 the kernel runs a program again on the frame it rewrote: a
//! translated source is then the persona's address and every later run is a spoofing
//! drop (measured: 999 of 1000). So the measured persona's addresses are the VM's own:
//! every rewrite still happens, with the same instructions, but it writes the bytes that
//! were there and the next run sees the same frame. Each case checks afterwards, from
//! the counters, that the runs took the path it names.
use std::net::IpAddr;

use persona::datapath::programs::Program;
use persona_common::{DIR_EGRESS, DIR_INGRESS, counters::Reason};
use persona_tests::{
    frames::{ACK, L4, SYN, frame},
    harness::{Harness, INNER_V4, INNER_V6},
};
use serde_json::{Value, json};

pub const REPEAT: u32 = 1_000_000;
pub const RULE_COUNTS: [usize; 4] = [0, 100, 1_000, 10_000];

/// `n` rules per direction and family, each on its own /32 (/128) in the benchmarking
/// range, plus the few the cases below meet.
pub fn persona(n: usize, v4: &str, v6: &str) -> String {
    let v4_rule = |i: usize, action: &str| {
        format!(
            "      - {{ cidr: 198.19.{}.{}/32, protocol: tcp, ports: \"443\", action: {action} }}\n",
            i / 256,
            i % 256
        )
    };
    let v6_rule = |i: usize| {
        format!(
            "      - {{ cidr: \"2001:db8:ffff:{:x}::/64\", protocol: tcp, ports: \"443\", action: allow }}\n",
            i
        )
    };
    let many = |f: &dyn Fn(usize) -> String| (0..n).map(f).collect::<String>();
    format!(
        r#"addresses: ["{v4}/24", "{v6}/64"]
dns: ["198.51.100.53"]
firewall:
  egress:
    default: allow
    rules:
      - {{ cidr: 198.51.100.0/24, protocol: tcp, ports: "25", action: drop }}
{}  ingress:
    default: drop
    rules:
      - {{ cidr: 198.51.100.0/24, protocol: tcp, ports: "22", action: allow }}
      - {{ cidr: "2001:db8:ffff::/64", protocol: tcp, ports: "22", action: allow }}
{}{}"#,
        many(&|i| v4_rule(i, "drop")),
        many(&|i| v4_rule(i, "allow")),
        many(&v6_rule),
    )
}

struct Case {
    name: &'static str,
    direction: u8,
    frame: Vec<u8>,
    /// What every run but the first must count.
    reason: Reason,
}

fn cases() -> Vec<Case> {
    let inner = IpAddr::V4(INNER_V4);
    let inner6 = IpAddr::V6(INNER_V6);
    let remote: IpAddr = "198.51.100.7".parse().unwrap();
    let remote6: IpAddr = "2001:db8:ffff::7".parse().unwrap();
    let tcp = |sport, dport, flags, len: usize| L4::Tcp {
        sport,
        dport,
        flags,
        payload: vec![0; len],
    };
    // Ethernet + IPv4 + TCP headers: 54 bytes; payloads fill the frame to its size.
    vec![
        Case {
            name: "tcp syn out, judged (egress rule drops it)",
            direction: DIR_EGRESS,
            frame: frame(inner, remote, &tcp(40000, 25, SYN, 10)),
            reason: Reason::DropRule,
        },
        Case {
            name: "tcp syn in, judged (no rule admits it)",
            direction: DIR_INGRESS,
            frame: frame(remote, inner, &tcp(50000, 23, SYN, 10)),
            reason: Reason::DropDefault,
        },
        Case {
            name: "tcp data out, 64-byte frame, tracked",
            direction: DIR_EGRESS,
            frame: frame(inner, remote, &tcp(40001, 443, ACK, 10)),
            reason: Reason::AllowTracked,
        },
        Case {
            name: "tcp data out, 1500-byte frame, tracked",
            direction: DIR_EGRESS,
            frame: frame(inner, remote, &tcp(40002, 443, ACK, 1500 - 54)),
            reason: Reason::AllowTracked,
        },
        Case {
            name: "udp dns query out, redirected",
            direction: DIR_EGRESS,
            frame: frame(
                inner,
                "192.0.2.53".parse().unwrap(),
                &L4::Udp {
                    sport: 33000,
                    dport: 53,
                    payload: vec![0; 40],
                    zero_checksum: false,
                },
            ),
            reason: Reason::AllowDns,
        },
        Case {
            name: "ipv6 tcp syn in, judged",
            direction: DIR_INGRESS,
            frame: frame(remote6, inner6, &tcp(50000, 23, SYN, 0)),
            reason: Reason::DropDefault,
        },
        Case {
            name: "ipv6 tcp data out, 1500-byte frame, tracked",
            direction: DIR_EGRESS,
            frame: frame(inner6, remote6, &tcp(40003, 443, ACK, 1500 - 74)),
            reason: Reason::AllowTracked,
        },
    ]
}

pub fn run() -> Value {
    let mut rows = Vec::new();
    for &n in &RULE_COUNTS {
        let mut h = Harness::with_persona(&persona(n, "198.18.0.2", "2001:db8:1::2"));
        for case in cases() {
            let before = h.count(case.direction, case.reason);
            let program = if case.direction == DIR_EGRESS {
                Program::FromVm
            } else {
                Program::ToVm
            };
            let time = |h: &mut Harness, p: Program| {
                h.dp.bench(p, &case.frame, REPEAT)
                    .unwrap_or_else(|e| panic!("bench run of {p:?}: {e}"))
                    .as_nanos() as f64
            };
            let pass = time(&mut h, Program::TcPass);
            let lookup = time(&mut h, Program::TcLookup);
            let ns = time(&mut h, program);
            let on_path = h.count(case.direction, case.reason) - before;
            assert!(
                on_path + 1 >= u64::from(REPEAT),
                "{}: only {on_path} of {REPEAT} runs counted as {}",
                case.name,
                case.reason.label()
            );
            eprintln!(
                "  {n:>6} rules  {:<45} {ns:>7.1} ns  tc_pass {pass:>5.1} ns  one lookup {lookup:>5.1} ns  {:>5.2}x of one lookup",
                case.name,
                ns / lookup.max(1.0)
            );
            rows.push(json!({
                "rules": n,
                "case": case.name,
                "frame_bytes": case.frame.len(),
                "direction": if case.direction == DIR_EGRESS { "from_vm (tcx ingress)" } else { "to_vm (tcx egress)" },
                "ns": ns,
                "tc_pass_ns": pass,
                "tc_lookup_ns": lookup,
                "ratio_to_pass": ns / pass.max(1.0),
                "ratio_to_lookup": ns / lookup.max(1.0),
                "runs_on_path": on_path,
                "reason": case.reason.label(),
            }));
        }
    }
    json!({ "repeat": REPEAT, "rows": rows })
}
