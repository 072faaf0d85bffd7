//! A VM's tap device, keyed by ifindex in `DEVICES`.

/// The VM's own ("inner") identity. The VM is configured with these and never changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    pub inner_v4: [u8; 4],
    pub flags: u32,
    pub inner_v6: [u8; 16],
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<DeviceConfig>() == 32);

pub const DEVICE_HAS_V4: u32 = 1 << 0;
pub const DEVICE_HAS_V6: u32 = 1 << 1;

pub const MAX_DEVICES: u32 = 4096;
