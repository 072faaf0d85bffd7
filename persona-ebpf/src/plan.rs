//! What a verdict asks to be rewritten, decided first and applied after: deciding and
//! rewriting run as separate BPF subprograms so their stack frames never add up.
use persona_common::counters::Reason;

use crate::{
    nat::{self, Field},
    packet::Packet,
    parse::{self, Ip, Kind, L4},
};

pub const OUTER_SRC: u8 = 1 << 0;
pub const OUTER_DST: u8 = 1 << 1;
/// The datagram an ICMP error quotes travelled the other way: its destination is
/// rewritten like the outer source, its source like the outer destination.
pub const QUOTED_DST: u8 = 1 << 2;
pub const QUOTED_SRC: u8 = 1 << 3;

#[derive(Default)]
pub struct Plan {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub flags: u8,
    /// The persona and table that decided: kept here, in the padding, because main's
    /// frame cannot grow by another slot.
    pub persona: u32,
    pub table: u32,
}

#[inline(never)]
pub fn apply<P: Packet>(raw: P::Raw, ip: &Ip, l4: &L4, plan: &Plan) -> Reason {
    match try_apply(&mut P::from_raw(raw), ip, l4, plan) {
        Ok(()) => Reason::AllowRule,
        Err(reason) => reason,
    }
}

#[inline(always)]
fn try_apply<P: Packet>(p: &mut P, ip: &Ip, l4: &L4, plan: &Plan) -> Result<(), Reason> {
    if l4.kind == Kind::IcmpError {
        let q = parse::quoted(p, ip.family)?;
        if plan.flags & QUOTED_DST != 0 {
            nat::rewrite_quoted(p, ip.family, &q, Field::Dst, &plan.src)?;
        }
        if plan.flags & QUOTED_SRC != 0 {
            nat::rewrite_quoted(p, ip.family, &q, Field::Src, &plan.dst)?;
        }
    }
    if plan.flags & OUTER_SRC != 0 {
        nat::rewrite(p, ip, l4, Field::Src, &plan.src)?;
    }
    if plan.flags & OUTER_DST != 0 {
        nat::rewrite(p, ip, l4, Field::Dst, &plan.dst)?;
    }
    Ok(())
}
