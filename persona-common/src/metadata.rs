//! The metadata service: a VM's requests to `METADATA_V4:METADATA_PORT` are handed to
//! the host with the device's own peer address as their source (`METADATA[ifindex]`),
//! so the daemon knows the device from the connection alone, and a VM can never pose
//! as another. The answers come back to that peer address and are handed to the VM
//! from the metadata address.

pub const METADATA_V4: [u8; 4] = [169, 254, 169, 254];
pub const METADATA_PORT: u16 = 80;

/// Peer addresses are 169.254.128.1 onwards, one per device slot.
pub const PEER_BASE: u32 = u32::from_be_bytes([169, 254, 128, 0]);

/// The peer address of slot `slot` (1-based).
pub const fn peer(slot: u32) -> [u8; 4] {
    (PEER_BASE + slot).to_be_bytes()
}

/// The slot of a peer address, `None` for any other address.
pub const fn slot_of(addr: [u8; 4]) -> Option<u32> {
    let a = u32::from_be_bytes(addr);
    if a > PEER_BASE && a <= PEER_BASE + crate::device::MAX_DEVICES {
        Some(a - PEER_BASE)
    } else {
        None
    }
}

/// `METADATA[ifindex]`: the device's peer address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetadataPeer {
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<MetadataPeer>() == 4);
