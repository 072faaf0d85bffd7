//! The one place packets are counted.
use persona_common::counters::{Counter, CounterKey, Reason};

use crate::maps::COUNTERS;

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
