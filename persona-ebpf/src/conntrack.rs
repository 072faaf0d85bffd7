//! Flow tracking: replies and further packets of admitted flows skip the rules, and
//! keep the persona address they were bound to.
//!
//! When the LRU map is full the least recently used flow is evicted; its next packet is
//! judged by the rules again as if new. Each device opens flows within its budget, so
//! one device's spray cannot push out the others' flows.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use persona_common::{
    DIR_EGRESS,
    conntrack::{
        CtEntry, CtKey, TCP_FIN_EGRESS, TCP_FIN_INGRESS, TCP_PICKED_UP, TCP_RESET, TCP_SYN_SENT,
        tcp_closed, timeout_ns,
    },
};

use crate::{
    maps::{CONNTRACK, CT_SCRATCH, FLOW_BUDGET},
    parse::{Kind, L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn key(
    ifindex: u32,
    family: u8,
    proto: u8,
    remote: &[u8; 16],
    rport: u16,
    lport: u16,
) -> CtKey {
    CtKey {
        ifindex,
        remote: *remote,
        remote_port: rport,
        local_port: lport,
        proto,
        family,
        _pad: [0; 2],
    }
}

/// The flow's entry, unless it expired, predates the persona's `ct_floor`, or ended
/// and this bare SYN opens a new connection on its ports.
#[inline(always)]
pub fn live(key: &CtKey, floor: u64, now: u64, tcp_flags: u8) -> Option<*mut CtEntry> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the map value stays valid for the rest of this program run.
    let e = unsafe { &*entry };
    if e.generation < floor || now.saturating_sub(e.last_seen_ns) > timeout_ns(key.proto, e.tcp) {
        return None;
    }
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && tcp_closed(e.tcp) {
        return None;
    }
    Some(entry)
}

/// The TCP state bits a packet adds, going `direction`.
#[inline(always)]
fn tcp_bits(direction: u8, l4: &L4) -> u8 {
    let mut bits = 0;
    if l4.tcp_flags & TCP_FIN != 0 {
        bits |= if direction == DIR_EGRESS {
            TCP_FIN_EGRESS
        } else {
            TCP_FIN_INGRESS
        };
    }
    if l4.tcp_flags & TCP_RST != 0 {
        bits |= TCP_RESET;
    }
    bits
}

/// Marks the flow as seen now, going `direction`, and moves its TCP state on.
#[inline(always)]
pub fn seen(entry: *mut CtEntry, direction: u8, l4: &L4, now: u64) {
    // SAFETY: see `live`; concurrent writers only race on which timestamp wins.
    let e = unsafe { &mut *entry };
    e.last_seen_ns = now;
    if l4.kind != Kind::Tcp {
        return;
    }
    let mut tcp = e.tcp | tcp_bits(direction, l4);
    if direction != e.origin {
        tcp &= !TCP_SYN_SENT;
    }
    if tcp != e.tcp {
        e.tcp = tcp;
    }
    if direction != DIR_EGRESS
        && (e.remote_next == 0 || (l4.seq_end.wrapping_sub(e.remote_next) as i32) > 0)
    {
        e.remote_next = l4.seq_end;
    }
}

/// The address a packet of the flow leaves with: the one it is bound to, unless a
/// `move` shift since moves it to `addr`, the active persona's.
#[inline(always)]
pub fn bind(entry: *mut CtEntry, addr: &[u8; 16], move_floor: u64, generation: u64) -> [u8; 16] {
    // SAFETY: see `live`.
    let e = unsafe { &mut *entry };
    if e.generation < move_floor {
        // Replies in flight to the address it had are still the flow's; moved to the
        // address it has already (shifts back and forth), it keeps the one before.
        if e.binding != *addr {
            e.prev_binding = e.binding;
            e.binding = *addr;
        }
        e.generation = generation;
    }
    e.binding
}

/// The persona address of a live flow, if any.
#[inline(always)]
pub fn binding(entry: Option<*mut CtEntry>) -> Option<[u8; 16]> {
    // SAFETY: see `live`.
    entry.map(|e| unsafe { (*e).binding })
}

/// Whether the device may open one more flow; counts it when it may.
#[inline(always)]
pub fn admit(ifindex: u32) -> bool {
    let Some(budget) = FLOW_BUDGET.get_ptr_mut(ifindex) else {
        return true;
    };
    // SAFETY: map value valid for this program run; `used` is only ever changed
    // atomically here, and set by userspace's sweep.
    unsafe {
        if (*budget).used >= (*budget).limit {
            return false;
        }
        add_one(&raw mut (*budget).used);
    }
    true
}

/// core's atomic types have no read-modify-write on the BPF target; the intrinsic
/// compiles to BPF's atomic add.
#[cfg(target_arch = "bpf")]
#[inline(always)]
unsafe fn add_one(p: *mut u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    // SAFETY: the caller's pointer is valid and aligned.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, 1) };
}

#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
unsafe fn add_one(p: *mut u64) {
    // SAFETY: the caller's pointer is valid and aligned.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }
        .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
}

pub struct NewFlow<'a> {
    pub generation: u64,
    pub now: u64,
    pub binding: &'a [u8; 16],
    pub orig_remote: &'a [u8; 16],
    pub origin: u8,
    pub flags: u8,
}

#[inline(always)]
pub fn open(key: &CtKey, flow: NewFlow<'_>, l4: &L4) {
    let Some(e) = CT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let mut tcp = 0;
    if l4.kind == Kind::Tcp {
        tcp = tcp_bits(flow.origin, l4);
        tcp |= if l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            TCP_SYN_SENT
        } else if l4.tcp_flags & TCP_SYN == 0 {
            TCP_PICKED_UP
        } else {
            0
        };
    }
    // SAFETY: this CPU's scratch slot, used only for the duration of this call.
    let e = unsafe { &mut *e };
    *e = CtEntry {
        generation: flow.generation,
        last_seen_ns: flow.now,
        binding: *flow.binding,
        prev_binding: *flow.binding,
        orig_remote: *flow.orig_remote,
        origin: flow.origin,
        flags: flow.flags,
        tcp,
        _pad: 0,
        remote_next: if flow.origin == DIR_EGRESS {
            0
        } else {
            l4.seq_end
        },
    };
    // A full map evicts; an insert can only fail on memory pressure, and then the flow
    // is simply judged again on its next packet.
    let _ = CONNTRACK.insert(key, *e, 0);
}
