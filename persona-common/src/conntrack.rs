//! Connection tracking, one LRU map for every device, each device within a flow budget.
//!
//! A flow is keyed by what the VM sees, which does not change across a shift: the
//! device, the protocol and the remote end (the VM has one address per family, so its
//! side is the ports). The persona-side address is the flow's `binding`: a packet to the
//! device matches a flow only when addressed to it.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtKey {
    pub ifindex: u32,
    pub remote: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 28);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// The generation the flow was bound to `binding` at: when it opened, or when a
    /// `move` shift moved it to the persona active then.
    pub generation: u64,
    pub last_seen_ns: u64,
    /// The persona address the flow uses, and the one before a move (replies in flight
    /// to it are still the flow's).
    pub binding: [u8; 16],
    pub prev_binding: [u8; 16],
    /// For redirected DNS: the server the VM asked, restored on replies.
    pub orig_remote: [u8; 16],
    pub origin: u8,
    pub flags: u8,
    /// TCP: the `TCP_*` state bits seen so far.
    pub tcp: u8,
    pub _pad: u8,
    /// TCP: the sequence number the VM expects next from the remote end (where the
    /// last segment towards the VM ended); a reset the VM accepts carries it.
    pub remote_next: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 72);

pub const CT_DNS_REDIRECTED: u8 = 1 << 0;

/// The flow opened with a bare SYN and nothing came back yet.
pub const TCP_SYN_SENT: u8 = 1 << 0;
pub const TCP_FIN_EGRESS: u8 = 1 << 1;
pub const TCP_FIN_INGRESS: u8 = 1 << 2;
pub const TCP_RESET: u8 = 1 << 3;
/// Tracked from a segment in mid-stream, not from its SYN: a connection that was open
/// before (a `cut` forgot it, or an eviction did).
pub const TCP_PICKED_UP: u8 = 1 << 4;

/// Both ends closed, or one reset it: the flow is over, its entry only waits for
/// stragglers and no longer holds its persona address.
#[inline(always)]
pub const fn tcp_closed(tcp: u8) -> bool {
    tcp & TCP_RESET != 0
        || tcp & (TCP_FIN_EGRESS | TCP_FIN_INGRESS) == TCP_FIN_EGRESS | TCP_FIN_INGRESS
}

pub const CT_MAX_ENTRIES: u32 = 262_144;

const SECOND: u64 = 1_000_000_000;
pub const TIMEOUT_TCP_NS: u64 = 3_600 * SECOND;
pub const TIMEOUT_TCP_SYN_SENT_NS: u64 = 60 * SECOND;
/// One side closed: netfilter's FIN_WAIT/CLOSE_WAIT.
pub const TIMEOUT_TCP_CLOSING_NS: u64 = 120 * SECOND;
/// Both closed or reset: long enough for the last ACK and retransmitted FINs.
pub const TIMEOUT_TCP_CLOSED_NS: u64 = 10 * SECOND;
pub const TIMEOUT_UDP_NS: u64 = 120 * SECOND;
pub const TIMEOUT_OTHER_NS: u64 = 30 * SECOND;

#[inline(always)]
pub const fn timeout_ns(proto: u8, tcp: u8) -> u64 {
    match proto {
        crate::PROTO_TCP if tcp_closed(tcp) => TIMEOUT_TCP_CLOSED_NS,
        crate::PROTO_TCP if tcp & (TCP_FIN_EGRESS | TCP_FIN_INGRESS) != 0 => TIMEOUT_TCP_CLOSING_NS,
        crate::PROTO_TCP if tcp & TCP_SYN_SENT != 0 => TIMEOUT_TCP_SYN_SENT_NS,
        crate::PROTO_TCP => TIMEOUT_TCP_NS,
        crate::PROTO_UDP => TIMEOUT_UDP_NS,
        _ => TIMEOUT_OTHER_NS,
    }
}

/// `FLOW_BUDGET[ifindex]`: how many flows a device may have tracked at once, so that one
/// VM's spray cannot evict the others' flows from the shared map. `used` is raised by
/// the programs as flows open and set to the live count by userspace's sweep.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBudget {
    pub limit: u64,
    /// 64 bits: BPF's atomic add needs them.
    pub used: u64,
}
const _: () = assert!(core::mem::size_of::<FlowBudget>() == 16);

pub const DEFAULT_FLOW_BUDGET: u32 = 16_384;
