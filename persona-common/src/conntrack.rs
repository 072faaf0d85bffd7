//! Connection tracking, one LRU map for every device.
//!
//! A flow is keyed by what does not change across a shift: the device, the protocol and
//! the remote end. The persona address a flow was seen with is kept in the entry so that
//! replies addressed to the persona that was active a moment ago are still delivered.

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
    pub generation: u64,
    pub last_seen_ns: u64,
    /// Persona address the flow was last seen with, and the one before it.
    pub binding: [u8; 16],
    pub prev_binding: [u8; 16],
    /// For redirected DNS: the server the VM asked, restored on replies.
    pub orig_remote: [u8; 16],
    pub origin: u8,
    pub flags: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 72);

pub const CT_DNS_REDIRECTED: u8 = 1 << 0;

pub const CT_MAX_ENTRIES: u32 = 65_536;

pub const TIMEOUT_TCP_NS: u64 = 3_600 * 1_000_000_000;
pub const TIMEOUT_UDP_NS: u64 = 120 * 1_000_000_000;
pub const TIMEOUT_OTHER_NS: u64 = 30 * 1_000_000_000;

#[inline(always)]
pub const fn timeout_ns(proto: u8) -> u64 {
    match proto {
        crate::PROTO_TCP => TIMEOUT_TCP_NS,
        crate::PROTO_UDP => TIMEOUT_UDP_NS,
        _ => TIMEOUT_OTHER_NS,
    }
}
