//! Programs that do next to nothing, measured beside the real ones in the same run.
use aya_ebpf::bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT};

use crate::maps::ACTIVE;

#[inline(always)]
pub fn one_lookup(skb: *mut __sk_buff) -> i32 {
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: read once and only compared against null.
    if unsafe { ACTIVE.get(ifindex) }.is_some() {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}
