//! DNS redirect: queries to port 53 go to the persona's resolver.
use persona_common::{
    FAMILY_V4,
    persona::{PERSONA_DNS_V4, PERSONA_DNS_V6, PersonaTable},
};

use crate::parse::{Kind, L4, widen};

pub const DNS_PORT: u16 = 53;

/// The persona's resolver, if this packet is a DNS query that should go there.
#[inline(always)]
pub fn redirect_target(persona: &PersonaTable, family: u8, l4: &L4) -> Option<[u8; 16]> {
    if !matches!(l4.kind, Kind::Tcp | Kind::Udp) || l4.dport != DNS_PORT {
        return None;
    }
    if family == FAMILY_V4 {
        (persona.flags & PERSONA_DNS_V4 != 0).then(|| widen(persona.dns_v4))
    } else {
        (persona.flags & PERSONA_DNS_V6 != 0).then_some(persona.dns_v6)
    }
}
