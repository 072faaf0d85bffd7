//! Security events: packets the firewall refused, sent to userspace through a ring
//! buffer, at most `MAX_EVENTS_PER_WINDOW` per CPU per window so a flood cannot swamp it.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub ifindex: u32,
    pub direction: u8,
    pub reason: u8,
    pub proto: u8,
    pub family: u8,
    pub remote: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<DropEvent>() == 32);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    pub start_ns: u64,
    pub sent: u64,
}

pub const WINDOW_NS: u64 = 100_000_000;
pub const MAX_EVENTS_PER_WINDOW: u64 = 50;
pub const RING_BYTES: u32 = 256 * 1024;
