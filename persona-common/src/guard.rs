//! `GUARD[ifindex]`: the flood guard of a device, present only when it is on.
//!
//! The guard runs at the tap's XDP hook, before the kernel builds an skb, and drops
//! what the tc program would drop anyway: spoofed sources, new flows the active
//! persona's egress rules refuse, and packets over the device's rate cap.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardState {
    /// Packets per second the VM may send; 0 means no cap.
    pub rate_pps: u32,
    pub _pad: u32,
    /// The current one-second window, written by the program.
    pub window_start_ns: u64,
    pub window_packets: u64,
}
const _: () = assert!(core::mem::size_of::<GuardState>() == 24);

pub const GUARD_WINDOW_NS: u64 = 1_000_000_000;
