//! The flood guard: a drop-only prefilter at the tap's XDP hook. Whatever it lets
//! through, the tc program decides again, so it may only ever drop what tc would drop
//! (plus what is over the rate cap), and it never writes a byte: XDP frames from a VM
//! with offloads carry partial checksums that only tc can update.
use aya_ebpf::bindings::{xdp_action, xdp_md};
use persona_common::{
    DIR_EGRESS, FAMILY_V6,
    counters::Reason,
    guard::{GUARD_WINDOW_NS, GuardState},
};

use crate::{
    conntrack, counters, dns, events, firewall,
    maps::GUARD,
    metadata,
    packet::{Packet, Wire, XdpPacket},
    parse::{self, Kind, L3},
    path::Handled,
    state,
};

#[inline(always)]
pub fn run(raw: *mut xdp_md) -> u32 {
    let p = XdpPacket::from_raw(raw);
    let Some(guard) = GUARD.get_ptr_mut(p.ifindex) else {
        return xdp_action::XDP_PASS;
    };
    let handled = if over_rate(guard) {
        Handled::unattributed(Reason::DropRateLimited)
    } else {
        match judge(&p) {
            Some(judged) => judged,
            None => return xdp_action::XDP_PASS,
        }
    };
    let reason = handled.reason();
    counters::count(p.ifindex, handled, DIR_EGRESS, Wire::new(1, p.len));
    if events::is_reported(reason) {
        events::report_drop::<XdpPacket>(raw, DIR_EGRESS, reason as u8);
    }
    xdp_action::XDP_DROP
}

/// A fixed one-second window. Two CPUs may race on the count and let a few packets
/// more through; a cap is not a meter.
#[inline(always)]
fn over_rate(guard: *mut GuardState) -> bool {
    // SAFETY: the map value stays valid for this program run.
    let g = unsafe { &mut *guard };
    if g.rate_pps == 0 {
        return false;
    }
    let now = conntrack::now();
    if now.wrapping_sub(g.window_start_ns) >= GUARD_WINDOW_NS {
        g.window_start_ns = now;
        g.window_packets = 0;
    }
    g.window_packets += 1;
    g.window_packets > u64::from(g.rate_pps)
}

/// The drop tc would make of this packet and the persona that made it, or `None` when
/// tc should see it. Anything unusual (ARP, ICMP errors, malformed headers, DNS) is
/// left to tc, which counts it.
#[inline(always)]
fn judge(p: &XdpPacket) -> Option<Handled> {
    let ip = match parse::l3(p).ok()? {
        L3::Arp => return None,
        L3::V4 => parse::ipv4(p).ok()?,
        L3::V6 => parse::ipv6(p).ok()?,
    };
    let l4 = parse::transport(p, &ip).ok()?;
    if ip.family == FAMILY_V6 && (l4.kind == Kind::Ndp || parse::is_link_local_v6(&ip.src)) {
        return None;
    }
    if l4.kind == Kind::IcmpError || parse::is_dhcp_client(&ip, &l4) {
        return None;
    }
    let active = state::active(p.ifindex).ok()?;
    let st = state::resolve(&active).ok()?;
    if st.inner(ip.family) != Some(ip.src) {
        return Some(Handled::new(
            Reason::DropSpoofed,
            active.table,
            active.persona,
        ));
    }
    if metadata::is_request(&ip) {
        return None;
    }
    // A persona without this family: tc drops it as `drop_no_persona`, and counts it.
    st.persona_addr(ip.family)?;
    if dns::redirect_target(st.persona, ip.family, &l4).is_some() {
        return None;
    }
    let key = conntrack::key(p.ifindex, ip.family, ip.proto, &ip.dst, l4.dport, l4.sport);
    if conntrack::live(&key, st.persona.ct_floor, conntrack::now(), l4.tcp_flags).is_some() {
        return None;
    }
    let reason = firewall::judge(
        st.persona,
        DIR_EGRESS,
        ip.family,
        &ip.dst,
        ip.proto,
        l4.rule_port(),
    );
    (!reason.passes()).then_some(Handled::new(reason, active.table, active.persona))
}
