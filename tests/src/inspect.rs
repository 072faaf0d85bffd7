//! What the datapath and the host hold, as an operator would look: the pinned maps as
//! bpftool dumps them, routes, rules, neighbour proxies, links, pins and the kernel
//! settings persona touches. Two snapshots compare equal when nothing changed.
use serde_json::Value;

use crate::{lab::Lab, netns::sh};

/// `bpftool map dump` of a pinned map as (key, value) pairs, values left out for
/// maps that traffic keeps changing.
pub fn dump(lab: &crate::lab::Site, map: &str, values: bool) -> Vec<String> {
    let path = lab.pin_dir.join(map);
    // Not through `ip netns exec`, which remounts /sys and hides the pins.
    let out = sh(&format!("bpftool -j map dump pinned {}", path.display()));
    let entries: Vec<Value> = serde_json::from_str(&out).expect("bpftool's JSON");
    let mut rows: Vec<String> = entries
        .iter()
        .filter(|e| values || e.get("key").is_some())
        .map(|e| {
            if values {
                e.to_string()
            } else {
                e["key"].to_string()
            }
        })
        .collect();
    rows.sort();
    rows
}

/// PERSONAS without slot 0, whose generation counter only ever grows, and without
/// the slots that hold nothing.
fn tables(lab: &Lab) -> Vec<String> {
    let zero = |v: &Value| {
        v.as_array()
            .is_some_and(|b| b.iter().all(|x| x.as_str() == Some("0x00")))
    };
    let path = lab.pin_dir.join("PERSONAS");
    let out = sh(&format!("bpftool -j map dump pinned {}", path.display()));
    let entries: Vec<Value> = serde_json::from_str(&out).expect("bpftool's JSON");
    entries
        .iter()
        .filter(|e| !zero(&e["value"]) && !zero(&e["key"]))
        .map(|e| e.to_string())
        .collect()
}

/// The bytes of a bpftool key or value.
fn bytes(v: &Value) -> Vec<u8> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |x| u32::from_le_bytes(x.try_into().unwrap()))
}

/// The (device, persona) pairs with counts, live or folded, other than each device's
/// active persona's: keys are made by the first packet of each kind, whenever traffic
/// brings it, so only a pair that should not be there says something changed.
fn counted_pairs(lab: &Lab) -> Vec<String> {
    let active: std::collections::HashSet<(u32, u32)> = dump(lab, "ACTIVE", true)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .map(|e| (u32_at(&bytes(&e["key"]), 0), u32_at(&bytes(&e["value"]), 4)))
        .collect();
    let mut pairs: Vec<String> = ["COUNTERS", "FOLDED"]
        .iter()
        .flat_map(|map| dump(lab, map, false))
        .filter_map(|k| serde_json::from_str::<Value>(&k).ok())
        .map(|k| {
            let b = bytes(&k);
            (u32_at(&b, 0), u32_at(&b, 4))
        })
        .filter(|&(ifindex, persona)| persona != 0 && !active.contains(&(ifindex, persona)))
        .map(|(ifindex, persona)| format!("{ifindex}/{persona}"))
        .collect();
    pairs.sort();
    pairs.dedup();
    pairs
}

/// The program a pinned link runs, by its id; `None` when the pin holds no live link.
pub fn link_program(pin: &std::path::Path) -> Option<u64> {
    let out = crate::netns::try_sh(&format!("bpftool -j link show pinned {}", pin.display()));
    let info: Value = serde_json::from_slice(&out.stdout).ok()?;
    info["prog_id"].as_u64()
}

pub fn snapshot(lab: &Lab) -> Vec<(String, Vec<String>)> {
    let mut out = vec![
        ("ACTIVE".into(), dump(lab, "ACTIVE", true)),
        ("DEVICES".into(), dump(lab, "DEVICES", true)),
        ("HOST_WIRING".into(), dump(lab, "HOST_WIRING", true)),
        ("DRAINS".into(), dump(lab, "DRAINS", true)),
        ("FLOW_BUDGET".into(), dump(lab, "FLOW_BUDGET", false)),
        ("FW_V4".into(), dump(lab, "FW_V4", true)),
        ("FW_V6".into(), dump(lab, "FW_V6", true)),
        ("counted pairs".into(), counted_pairs(lab)),
        ("PERSONAS".into(), tables(lab)),
    ];
    for (what, cmd) in [
        (
            "routes",
            "ip -4 route show table all; ip -6 route show table all",
        ),
        ("rules", "ip rule show; ip -6 rule show"),
        ("proxies", "ip neigh show proxy"),
        ("links", "ip -o link show | awk '{print $2}'"),
        (
            "settings",
            "sysctl -a 2>/dev/null | grep -E 'forwarding|proxy_arp|proxy_ndp|proxy_delay|rp_filter|accept_ra ' | grep -v -E '\\.(default|lo)\\.'",
        ),
    ] {
        // The kernel's own routes (link-local addresses appear when they like) are not
        // the shift's.
        let mut lines: Vec<String> = lab
            .host
            .exec(cmd)
            .lines()
            .filter(|l| !l.contains("proto kernel"))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines.dedup();
        out.push((what.into(), lines));
    }
    let pins = sh(&format!("find {} | sort", lab.pin_dir.display()));
    out.push(("pins".into(), pins.lines().map(str::to_owned).collect()));
    out
}
