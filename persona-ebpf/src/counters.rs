//! The one place packets are counted.
use persona_common::counters::{
    Counter, CounterKey, HANDSHAKE_BUCKETS, HANDSHAKE_SUM, HandshakeKey, Reason,
};

use crate::maps::{COUNTERS, HANDSHAKES};

#[inline(always)]
pub fn count(ifindex: u32, direction: u8, reason: Reason, bytes: u64) {
    let key = CounterKey {
        ifindex,
        direction,
        reason: reason as u8,
        _pad: [0; 2],
    };
    // Userspace creates every key of a device when attaching it, so the insert only
    // happens for devices it does not know.
    match COUNTERS.get_ptr_mut(key) {
        Some(c) => {
            // SAFETY: per-CPU value, no other writer.
            let c = unsafe { &mut *c };
            c.packets += 1;
            c.bytes += bytes;
        }
        None => {
            let _ = COUNTERS.insert(key, Counter { packets: 1, bytes }, 0);
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
