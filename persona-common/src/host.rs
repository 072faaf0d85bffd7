//! What userspace wired on the host for a device, pinned with the maps so that any later
//! process can undo it. The programs never read it.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostWiring {
    pub gateway_v4: [u8; 4],
    /// An address of the previous persona, still routed until the next shift.
    pub lingering_v4: [u8; 4],
    pub gateway_v6: [u8; 16],
    pub lingering_v6: [u8; 16],
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<HostWiring>() == 48);

pub const WIRED_GATEWAY_V4: u32 = 1 << 0;
pub const WIRED_GATEWAY_V6: u32 = 1 << 1;
pub const WIRED_LINGERING_V4: u32 = 1 << 2;
pub const WIRED_LINGERING_V6: u32 = 1 << 3;
