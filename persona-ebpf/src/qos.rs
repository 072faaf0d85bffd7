//! A persona's QoS on the packets it passes: what leaves the VM gets its DSCP, and its
//! HTB class (or priority) in `skb->mark` for the uplink; what reaches the VM gets its
//! class in `skb->priority`, which the tap's HTB reads.
use aya_ebpf::bindings::{__sk_buff, TC_ACT_OK};
use persona_common::{
    DIR_EGRESS,
    counters::Reason,
    qos::{
        HTB_MAJOR, MARK_CLASS, MARK_VALUE, QOS_DSCP, QOS_PRIORITY, SHAPE_MARK, SHAPE_MARK_MASK,
        class_of,
    },
};

use crate::{
    csum,
    maps::QOS,
    packet::{Packet, TcPacket, load},
    parse::{self, L3, V4_CHECK, V4_OFF, V6_OFF},
};

/// Applies the QoS of `table` to a packet it passed.
#[inline(never)]
pub fn apply(skb: *mut __sk_buff, table: u32, direction: u8) -> Reason {
    match try_apply(skb, table, direction) {
        Ok(()) => Reason::AllowRule,
        Err(reason) => reason,
    }
}

#[inline(always)]
fn try_apply(skb: *mut __sk_buff, table: u32, direction: u8) -> Result<(), Reason> {
    let Some(q) = QOS.get(table) else {
        return Ok(());
    };
    if direction != DIR_EGRESS {
        if q.rate[1] != 0 {
            // SAFETY: tc programs may write the skb's priority.
            unsafe { (*skb).priority = class_of(table) };
        }
        return Ok(());
    }
    if q.flags & QOS_DSCP != 0 {
        mark_dscp(&mut TcPacket::from_raw(skb), q.dscp)?;
    }
    let handed = if q.rate[0] != 0 {
        Some(MARK_CLASS | (class_of(table) & MARK_VALUE))
    } else if q.flags & QOS_PRIORITY != 0 {
        Some(q.priority & MARK_VALUE)
    } else {
        None
    };
    if let Some(v) = handed {
        // SAFETY: tc programs may write the skb's mark.
        unsafe { (*skb).mark = SHAPE_MARK | v };
    }
    Ok(())
}

/// The DSCP bits of the IPv4 TOS or IPv6 traffic class; ECN's two bits are kept.
#[inline(always)]
fn mark_dscp(p: &mut TcPacket, dscp: u8) -> Result<(), Reason> {
    match parse::l3(p)? {
        L3::V4 => {
            let old: [u8; 2] = load(p, V4_OFF)?;
            let new = [old[0], (dscp << 2) | (old[1] & 0x3)];
            if new != old {
                p.store(V4_OFF, &new)?;
                p.fix_l3_csum(V4_CHECK, csum::diff(&old, &new))?;
            }
        }
        L3::V6 => {
            let old: [u8; 2] = load(p, V6_OFF)?;
            // The version and the class's top four bits, then its low four and the
            // flow label's top four.
            let class = (dscp << 2) | ((old[1] >> 4) & 0x3);
            let new = [
                (old[0] & 0xf0) | (class >> 4),
                (class << 4) | (old[1] & 0x0f),
            ];
            p.store(V6_OFF, &new)?;
        }
        L3::Arp => {}
    }
    Ok(())
}

/// On an uplink's egress, past the host's forwarding: the class (or priority) a VM's
/// packet was handed moves from the mark to `skb->priority`, and the mark is cleared.
#[inline(always)]
pub fn to_uplink(skb: *mut __sk_buff) -> i32 {
    // SAFETY: reading and writing fields tc programs may.
    unsafe {
        let mark = (*skb).mark;
        if mark & SHAPE_MARK_MASK == SHAPE_MARK {
            let v = mark & MARK_VALUE;
            (*skb).priority = if mark & MARK_CLASS != 0 {
                (HTB_MAJOR << 16) | v
            } else {
                v
            };
            (*skb).mark = 0;
        }
    }
    TC_ACT_OK
}
