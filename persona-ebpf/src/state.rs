//! The device and the persona a packet is handled with, read once per packet.
use persona_common::{
    FAMILY_V4,
    counters::Reason,
    device::{DEVICE_HAS_V4, DEVICE_HAS_V6, DeviceConfig},
    persona::{Active, PERSONA_HAS_V4, PERSONA_HAS_V6, PersonaTable},
};

use crate::{
    maps::{ACTIVE, DEVICES, PERSONAS},
    parse::widen,
};

pub struct State<'a> {
    pub device: &'a DeviceConfig,
    pub persona: &'a PersonaTable,
}

#[inline(always)]
pub fn device<'a>(ifindex: u32) -> Result<&'a DeviceConfig, Reason> {
    // SAFETY: a preallocated hash whose entries userspace writes only while detached.
    unsafe { DEVICES.get(ifindex) }.ok_or(Reason::DropUnknownDevice)
}

/// The single read of `ACTIVE` that pins this packet to one persona. Everything else
/// is looked up from this copy: a table stays unchanged while any program may use it.
#[inline(always)]
pub fn active(ifindex: u32) -> Result<Active, Reason> {
    device(ifindex)?;
    // SAFETY: ACTIVE is not preallocated: the element read stays intact under RCU.
    unsafe { ACTIVE.get(ifindex) }
        .copied()
        .ok_or(Reason::DropNoPersona)
}

#[inline(always)]
pub fn resolve<'a>(ifindex: u32, active: &Active) -> Result<State<'a>, Reason> {
    Ok(State {
        device: device(ifindex)?,
        persona: PERSONAS.get(active.table).ok_or(Reason::DropNoPersona)?,
    })
}

impl State<'_> {
    #[inline(always)]
    pub fn inner(&self, family: u8) -> Option<[u8; 16]> {
        let d = self.device;
        if family == FAMILY_V4 {
            (d.flags & DEVICE_HAS_V4 != 0).then(|| widen(d.inner_v4))
        } else {
            (d.flags & DEVICE_HAS_V6 != 0).then_some(d.inner_v6)
        }
    }

    #[inline(always)]
    pub fn persona_addr(&self, family: u8) -> Option<[u8; 16]> {
        let p = self.persona;
        if family == FAMILY_V4 {
            (p.flags & PERSONA_HAS_V4 != 0).then(|| widen(p.addr_v4))
        } else {
            (p.flags & PERSONA_HAS_V6 != 0).then_some(p.addr_v6)
        }
    }
}
