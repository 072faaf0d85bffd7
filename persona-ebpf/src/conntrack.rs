//! Flow tracking: replies and further packets of admitted flows skip the rules.
//!
//! When the LRU map is full the least recently used flow is evicted; its next packet is
//! judged by the rules again as if new, so an idle flow may need to be opened anew.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use persona_common::conntrack::{CtEntry, CtKey, timeout_ns};

use crate::maps::{CONNTRACK, CT_SCRATCH};

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

/// The flow's entry, unless it expired or predates the persona's `ct_floor`.
#[inline(always)]
pub fn live(key: &CtKey, floor: u64, now: u64) -> Option<*mut CtEntry> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the map value stays valid for the rest of this program run.
    let e = unsafe { &*entry };
    if e.generation < floor || now.saturating_sub(e.last_seen_ns) > timeout_ns(key.proto) {
        return None;
    }
    Some(entry)
}

/// Marks the flow as seen now, through `binding` if it left the VM.
#[inline(always)]
pub fn refresh(entry: *mut CtEntry, binding: Option<&[u8; 16]>, generation: u64, now: u64) {
    // SAFETY: see `live`; concurrent writers only race on which timestamp wins.
    let e = unsafe { &mut *entry };
    e.last_seen_ns = now;
    if let Some(binding) = binding {
        if e.binding != *binding {
            e.prev_binding = e.binding;
            e.binding = *binding;
        }
        e.generation = generation;
    }
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
pub fn open(key: &CtKey, flow: NewFlow<'_>) {
    let Some(e) = CT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
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
        _pad: [0; 6],
    };
    // A full map evicts; an insert can only fail on memory pressure, and then the flow
    // is simply judged again on its next packet.
    let _ = CONNTRACK.insert(key, *e, 0);
}
