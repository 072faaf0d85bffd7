//! The persona a packet is handled with, read once per packet: one hash lookup for the
//! device's `ACTIVE` entry, then its table, an array slot that also holds the device's
//! own identity.
use persona_common::{
    FAMILY_V4,
    counters::Reason,
    device::{DEVICE_HAS_V4, DEVICE_HAS_V6},
    persona::{Active, PERSONA_HAS_V4, PERSONA_HAS_V6, PersonaTable},
};

use crate::{
    maps::{ACTIVE, DEVICES, PERSONAS},
    parse::widen,
};

pub struct State<'a> {
    pub persona: &'a PersonaTable,
}

/// The single read of `ACTIVE` that pins this packet to one persona. Everything else
/// is looked up from this copy: a table stays unchanged while any program may use it.
#[inline(always)]
pub fn active(ifindex: u32) -> Result<Active, Reason> {
    // SAFETY: ACTIVE is not preallocated: the element read stays intact under RCU.
    match unsafe { ACTIVE.get(ifindex) } {
        Some(a) => Ok(*a),
        // SAFETY: only compared against null.
        None if unsafe { DEVICES.get(ifindex) }.is_some() => Err(Reason::DropNoPersona),
        None => Err(Reason::DropUnknownDevice),
    }
}

#[inline(always)]
pub fn resolve<'a>(active: &Active) -> Result<State<'a>, Reason> {
    Ok(State {
        persona: PERSONAS.get(active.table).ok_or(Reason::DropNoPersona)?,
    })
}

impl State<'_> {
    #[inline(always)]
    pub fn inner(&self, family: u8) -> Option<[u8; 16]> {
        let p = self.persona;
        if family == FAMILY_V4 {
            (p.device_flags & DEVICE_HAS_V4 != 0).then(|| widen(p.inner_v4))
        } else {
            (p.device_flags & DEVICE_HAS_V6 != 0).then_some(p.inner_v6)
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
