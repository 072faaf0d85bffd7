//! The one place packets are counted.
use aya_ebpf::bindings::BPF_NOEXIST;
use persona_common::counters::{
    Counter, CounterKey, HANDSHAKE_BUCKETS, HANDSHAKE_SUM, HandshakeKey, NO_PERSONA, Reason,
    tracked_slot,
};

use crate::{
    maps::{COUNTERS, HANDSHAKES, TRACKED},
    packet::Wire,
    path::Handled,
    state,
};

/// A packet decided before any persona was read (ARP, link-local, malformed).
pub const UNATTRIBUTED: u32 = u32::MAX;

#[inline(always)]
fn add_wire(c: *mut Counter, wire: Wire) {
    // SAFETY: a per-CPU map value: no other writer.
    let c = unsafe { &mut *c };
    c.packets += wire.packets();
    c.bytes += wire.bytes();
}

/// A subprogram of its own, so its frame never adds to the deciders'.
#[inline(never)]
pub fn count(ifindex: u32, handled: Handled, direction: u8, wire: Wire) {
    let reason = handled.reason();
    let persona = handled.persona();
    if reason == Reason::AllowTracked && persona != UNATTRIBUTED {
        if let Some(c) = TRACKED.get_ptr_mut(tracked_slot(handled.table(), direction)) {
            add_wire(c, wire);
        }
        return;
    }
    // Traffic no persona handled still happened while one was active: count it there.
    let persona = if persona == UNATTRIBUTED {
        state::active(ifindex).map_or(NO_PERSONA, |a| a.persona)
    } else {
        persona
    };
    let key = CounterKey::new(ifindex, persona, direction, reason);
    // The first packet creates the key; a CPU that loses that race adds to the winner's.
    for _ in 0..2 {
        if let Some(c) = COUNTERS.get_ptr_mut(key) {
            add_wire(c, wire);
            return;
        }
        if COUNTERS
            .insert(
                key,
                Counter {
                    packets: wire.packets(),
                    bytes: wire.bytes(),
                },
                u64::from(BPF_NOEXIST),
            )
            .is_ok()
        {
            return;
        }
    }
}

#[inline(always)]
fn add(key: &HandshakeKey, n: u64) {
    match HANDSHAKES.get_ptr_mut(key) {
        // SAFETY: per-CPU value, no other writer.
        Some(v) => unsafe { *v += n },
        None => {
            let _ = HANDSHAKES.insert(key, n, 0);
        }
    }
}

/// One TCP handshake round trip, in nanoseconds.
#[inline(always)]
pub fn handshake(ifindex: u32, rtt_ns: u64) {
    let us = rtt_ns / 1000;
    let mut bucket = 64 - us.leading_zeros();
    if bucket >= HANDSHAKE_BUCKETS {
        bucket = HANDSHAKE_BUCKETS - 1;
    }
    add(&HandshakeKey { ifindex, bucket }, 1);
    add(
        &HandshakeKey {
            ifindex,
            bucket: HANDSHAKE_SUM,
        },
        us,
    );
}
