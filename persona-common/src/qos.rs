//! A persona's QoS, by table (`QOS[table]`, written when the table is staged, so a
//! shift changes it with everything else).
//!
//! Rates are shaped by HTB (this kernel family builds no `fq`, which earliest-departure
//! pacing needs): each table with a rate has an HTB class of its own, `5e5e:(table + 1)`,
//! on the tap for what the VM receives and on the uplinks for what it sends, and the
//! programs put a packet in its class by `skb->priority`, which HTB reads first. What
//! the VM sends is forwarded by the host's stack, which sets `skb->priority` again, so
//! the from-VM program hands the class over in `skb->mark` ([`SHAPE_MARK`]) and the
//! uplink's egress program moves it to `skb->priority`.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Qos {
    /// Bytes per second, by direction (`DIR_EGRESS` from the VM); 0 unshaped.
    pub rate: [u64; 2],
    /// `skb->priority` of packets from the VM, with `QOS_PRIORITY` (and no egress rate).
    pub priority: u32,
    /// The DSCP of packets from the VM, with `QOS_DSCP`.
    pub dscp: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Qos>() == 24);

pub const QOS_DSCP: u8 = 1 << 0;
pub const QOS_PRIORITY: u8 = 1 << 1;

/// The HTB handle of the qdiscs persona puts on taps and uplinks (`5e5e:`): one an
/// operator is unlikely to use, so that a qdisc of that handle is persona's.
pub const HTB_MAJOR: u32 = 0x5e5e;

/// The HTB class of a table: `5e5e:(table + 1)`, as `skb->priority`.
pub const fn class_of(table: u32) -> u32 {
    (HTB_MAJOR << 16) | (table + 1)
}

/// `skb->mark` of a packet from a VM that carries its priority to the uplink: these
/// bits over the 16-bit minor of its class (with [`MARK_CLASS`]) or its priority.
pub const SHAPE_MARK: u32 = 0x5e5e_0000;
pub const SHAPE_MARK_MASK: u32 = 0xffff_0000;
pub const MARK_CLASS: u32 = 0x8000;
pub const MARK_VALUE: u32 = 0x7fff;

/// The largest priority a persona may give (what fits beside [`MARK_CLASS`]).
pub const MAX_PRIORITY: u32 = MARK_VALUE;
