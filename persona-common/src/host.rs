//! The host around the devices: what userspace wired for each (pinned with the maps so
//! that any later process can undo it; the programs never read it), and how the
//! programs may route.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostWiring {
    pub gateway_v4: [u8; 4],
    pub flags: u32,
    pub gateway_v6: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<HostWiring>() == 24);

pub const WIRED_GATEWAY_V4: u32 = 1 << 0;
pub const WIRED_GATEWAY_V6: u32 = 1 << 1;

/// `DRAINS`: an address of an earlier persona that flows of the device still use, so
/// still routed and announced for it until the last of them ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainKey {
    pub ifindex: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<DrainKey>() == 24);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drain {
    /// The persona id the address belonged to, and the generation that shifted away.
    pub persona: u32,
    pub _pad: u32,
    pub generation: u64,
}
const _: () = assert!(core::mem::size_of::<Drain>() == 16);

/// Earlier personas' addresses draining at once, over all devices.
pub const MAX_DRAINS: u32 = 16_384;

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
