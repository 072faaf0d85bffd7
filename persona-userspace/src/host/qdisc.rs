//! HTB where shaped packets leave: the tap for what a VM receives, the uplinks for what
//! it sends. The kernel's default queueing disciplines are replaced (an `mq` whole, as
//! HTB shapes across queues); one an operator chose is left alone, and rates are then
//! not enforced there (said in the log). Each table with a rate has its class,
//! `5e5e:(table + 1)`, which the programs put its packets in.
use std::process::Command;

use persona_common::qos::{HTB_MAJOR, class_of};

use crate::datapath::{DatapathError, Result};

/// What the kernel sets up by itself, which HTB may replace.
const DEFAULTS: [&str; 6] = ["noqueue", "pfifo_fast", "fq_codel", "pfifo", "noop", "mq"];

fn tc(args: &[&str]) -> Result<String> {
    let out = Command::new("tc")
        .args(args)
        .output()
        .map_err(|source| DatapathError::Io {
            context: "running tc".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(DatapathError::Host(format!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A line of `tc qdisc show`: its kind and its parent (`None` for the root).
fn parse(line: &str) -> Option<(&str, Option<&str>)> {
    let mut words = line.split_whitespace();
    (words.next()? == "qdisc").then_some(())?;
    let kind = words.next()?;
    let _handle = words.next()?;
    match words.next()? {
        "root" => Some((kind, None)),
        "parent" => Some((kind, Some(words.next()?))),
        _ => None,
    }
}

/// Puts persona's HTB on `dev` (its handle says it is persona's, whichever run put it
/// there): `true` when it is there, `false` when the operator's own queueing is.
pub fn ensure_htb(dev: &str) -> Result<bool> {
    let shown = tc(&["qdisc", "show", "dev", dev, "root"])?;
    let root = shown.lines().find_map(parse);
    let handle = format!("{HTB_MAJOR:x}:");
    match root {
        Some(("htb", None)) if shown.split_whitespace().nth(2) == Some(handle.as_str()) => Ok(true),
        Some((kind, None)) if !DEFAULTS.contains(&kind) => {
            tracing::warn!(
                interface = dev,
                qdisc = kind,
                "its queueing discipline is not the kernel's default: left alone, and QoS rates are not enforced through it"
            );
            Ok(false)
        }
        // A direct queue of its own length: an uplink's may be 0, which leaves HTB
        // two packets for everything it does not shape.
        _ => tc(&[
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "handle",
            &handle,
            "htb",
            "direct_qlen",
            "1000",
        ])
        .map(|_| true),
    }
}

/// The class of `table` on `dev`, at `bytes_per_second`.
pub fn shape(dev: &str, table: u32, bytes_per_second: u64) -> Result<()> {
    let class = class_of(table);
    let classid = format!("{:x}:{:x}", class >> 16, class & 0xffff);
    let rate = format!("{}bit", bytes_per_second * 8);
    tc(&[
        "class",
        "replace",
        "dev",
        dev,
        "parent",
        &format!("{HTB_MAJOR:x}:"),
        "classid",
        &classid,
        "htb",
        "rate",
        &rate,
        "ceil",
        &rate,
    ])
    .map(|_| ())
}

/// The kernel's default comes back.
pub fn remove(dev: &str) -> Result<()> {
    tc(&["qdisc", "del", "dev", dev, "root"]).map(|_| ())
}

/// What an HTB class of persona's has done since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassStats {
    /// The table the class is of.
    pub table: u32,
    pub bytes: u64,
    pub packets: u64,
    /// Dropped for a full queue: the flow sent faster than its rate for too long.
    pub dropped: u64,
    /// Waiting now.
    pub backlog_bytes: u64,
}

/// The classes of persona's HTB on `dev`, as `tc -s class show` gives them.
pub fn stats(dev: &str) -> Result<Vec<ClassStats>> {
    Ok(parse_stats(&tc(&["-s", "class", "show", "dev", dev])?))
}

fn parse_stats(text: &str) -> Vec<ClassStats> {
    let number = |w: Option<&str>| -> u64 {
        w.map(|w| w.trim_end_matches([',', 'b', 'p', ')']))
            .and_then(|w| w.parse().ok())
            .unwrap_or(0)
    };
    let mut out: Vec<ClassStats> = Vec::new();
    // Whether the lines read now are of a class of persona's.
    let mut ours = false;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["class", "htb", handle, ..] => {
                let table = handle
                    .strip_prefix(&format!("{HTB_MAJOR:x}:"))
                    .and_then(|m| u32::from_str_radix(m, 16).ok())
                    .and_then(|m| m.checked_sub(1));
                ours = table.is_some();
                if let Some(table) = table {
                    out.push(ClassStats {
                        table,
                        ..Default::default()
                    });
                }
            }
            ["Sent", ..] if ours => {
                if let Some(c) = out.last_mut() {
                    c.bytes = number(words.get(1).copied());
                    c.packets = number(words.get(3).copied());
                    c.dropped = number(words.get(6).copied());
                }
            }
            ["backlog", ..] if ours => {
                if let Some(c) = out.last_mut() {
                    c.backlog_bytes = number(words.get(1).copied());
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_statistics_are_read_as_tc_prints_them() {
        let text = "class htb 5e5e:5 root prio 0 rate 20Mbit ceil 20Mbit burst 1600b cburst 1600b \n Sent 2107314 bytes 1392 pkt (dropped 17, overlimits 2044 requeues 0) \n backlog 30280b 20p requeues 0\n lended: 0 borrowed: 0 giants: 0\n tokens: 10000 ctokens: 10000\n\nclass htb 2:3 root prio 0 rate 1Mbit\n Sent 9 bytes 1 pkt (dropped 0, overlimits 0 requeues 0)\n";
        assert_eq!(
            parse_stats(text),
            vec![ClassStats {
                table: 4,
                bytes: 2_107_314,
                packets: 1392,
                dropped: 17,
                backlog_bytes: 30_280,
            }]
        );
    }

    #[test]
    fn tc_lines_give_kind_and_parent() {
        assert_eq!(
            parse("qdisc noqueue 0: root refcnt 2"),
            Some(("noqueue", None))
        );
        assert_eq!(
            parse("qdisc fq_codel 0: parent :3 limit 10240p flows 1024"),
            Some(("fq_codel", Some(":3")))
        );
        assert_eq!(
            parse("qdisc ingress ffff: parent ffff:fff1 ----------------"),
            Some(("ingress", Some("ffff:fff1")))
        );
        assert_eq!(parse("garbage"), None);
    }
}
