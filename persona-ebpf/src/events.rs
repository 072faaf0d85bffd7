//! Reports firewall drops to userspace, rate limited per CPU.
use persona_common::{
    DIR_EGRESS, FAMILY_V4,
    counters::Reason,
    events::{DropEvent, MAX_EVENTS_PER_WINDOW, WINDOW_NS},
};

use crate::{
    conntrack,
    maps::{EVENT_RATE, EVENTS},
    packet::Packet,
    parse::{self, L3},
};

#[inline(always)]
pub fn is_reported(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::DropRule | Reason::DropDefault | Reason::DropNotPersona
    )
}

#[inline(always)]
fn allowed() -> bool {
    let Some(w) = EVENT_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot.
    let w = unsafe { &mut *w };
    let now = conntrack::now();
    if now.wrapping_sub(w.start_ns) > WINDOW_NS {
        w.start_ns = now;
        w.sent = 0;
    }
    if w.sent >= MAX_EVENTS_PER_WINDOW {
        return false;
    }
    w.sent += 1;
    true
}

/// Called after the verdict, on the unmodified frame. A subprogram of its own: its stack
/// frame sits beside the deciders', not on top of them.
#[inline(never)]
pub fn report_drop<P: Packet>(raw: P::Raw, direction: u8, reason: u8) {
    let p = P::from_raw(raw);
    let ip = match parse::l3(&p) {
        Ok(L3::V4) => parse::ipv4(&p),
        Ok(L3::V6) => parse::ipv6(&p),
        _ => return,
    };
    let Ok(ip) = ip else { return };
    let Ok(l4) = parse::transport(&p, &ip) else {
        return;
    };
    if !allowed() {
        return;
    }
    let egress = direction == DIR_EGRESS;
    let event = DropEvent {
        ifindex: p.ifindex(),
        direction,
        reason,
        proto: ip.proto,
        family: if ip.family == FAMILY_V4 { 4 } else { 6 },
        remote: if egress { ip.dst } else { ip.src },
        remote_port: if egress { l4.dport } else { l4.sport },
        local_port: if egress { l4.sport } else { l4.dport },
        _pad: [0; 4],
    };
    let _ = EVENTS.output::<DropEvent>(&event, 0);
}
