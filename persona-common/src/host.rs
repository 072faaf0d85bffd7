//! The host around the devices: what userspace wired for each (pinned with the maps so
//! that any later process can undo it; the programs never read it), and how the
//! programs may route.

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

/// `ROUTING[0]`: whether the tc programs forward translated packets themselves (a FIB
/// lookup and a redirect) instead of handing them to the host's IP stack, and to which
/// interfaces a packet from a VM may be redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    pub uplinks: [u32; MAX_UPLINKS],
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Routing>() == 32);

pub const MAX_UPLINKS: usize = 6;
pub const ROUTE_IN_BPF: u32 = 1 << 0;
