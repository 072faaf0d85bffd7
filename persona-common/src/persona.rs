//! The active persona of a device and the persona tables it points at.
//!
//! A persona is staged into a free table slot (`PERSONAS[table]`, naming its resident
//! firewall ruleset), then made active by replacing the device's `ACTIVE` entry: one
//! map update. Programs read `ACTIVE` once per packet and use only
//! that table for the rest of it.

/// `ACTIVE[ifindex]`: which staged table a device uses, and the shift that made it so.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Active {
    pub table: u32,
    /// The control plane's id of the persona staged in `table`; counters are kept by it.
    pub persona: u32,
    pub generation: u64,
}
const _: () = assert!(core::mem::size_of::<Active>() == 16);

/// `PERSONAS[table]`: everything the datapath enforces for one persona on one device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersonaTable {
    pub addr_v4: [u8; 4],
    pub dns_v4: [u8; 4],
    pub addr_v6: [u8; 16],
    pub dns_v6: [u8; 16],
    pub flags: u32,
    /// `firewall::ACTION_*` when no rule matches, indexed by direction.
    pub default_action: [u8; 2],
    pub _pad: [u8; 2],
    /// Connection-tracking entries older than this generation are ignored: a shift that
    /// sets it to its own generation cuts every flow opened before it.
    pub ct_floor: u64,
    /// Flows bound before this generation take the persona's address at their next
    /// packet from the VM (`move`); later ones keep the address they have (`keep`).
    pub move_floor: u64,
    pub generation: u64,
    /// The device's own identity (`device::DEVICE_HAS_*` in `device_flags`), copied in
    /// when the table is flipped in, so that a packet reads one table for both ends.
    pub inner_v4: [u8; 4],
    pub device_flags: u32,
    pub inner_v6: [u8; 16],
    /// The device and persona id the table was flipped in for, whose `TRACKED` counts
    /// it holds; 0 before any flip.
    pub owner_ifindex: u32,
    pub owner_persona: u32,
    /// The resident firewall ruleset the persona's prefixes are keyed by
    /// (`firewall::FwKeyV4::ruleset`), shared by every table of the same firewall.
    pub rules: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<PersonaTable>() == 112);

pub const PERSONA_HAS_V4: u32 = 1 << 0;
pub const PERSONA_HAS_V6: u32 = 1 << 1;
pub const PERSONA_DNS_V4: u32 = 1 << 2;
pub const PERSONA_DNS_V6: u32 = 1 << 3;

/// Table slots. Each device needs one for its active persona and one while staging.
pub const MAX_TABLES: u32 = 8192;
