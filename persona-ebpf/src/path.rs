//! The packet path both programs share: parse, read the active persona once, decide,
//! then rewrite. What differs by direction is behind [`Direction`].
use persona_common::{FAMILY_V6, counters::Reason, persona::Active};

use crate::{
    packet::Packet,
    parse::{self, Ip, Kind, L3, L4},
    plan::{self, Plan},
    state,
};

pub trait Direction {
    /// The address whose being link-local keeps a packet on the link, untranslated.
    fn local_end(ip: &Ip) -> &[u8; 16];
    /// Decides for an ICMP error, which quotes a datagram of some flow.
    fn icmp_error<P: Packet>(raw: P::Raw, ip: &Ip, active: &Active, plan: &mut Plan) -> Reason;
    /// Decides for any other packet of a flow.
    fn flow(ifindex: u32, ip: &Ip, l4: &L4, active: &Active, plan: &mut Plan) -> Reason;
}

#[inline(always)]
pub fn handle<P: Packet, D: Direction>(p: &mut P) -> Result<Reason, Reason> {
    let ip = match parse::l3(p)? {
        L3::Arp => return Ok(Reason::PassArp),
        L3::V4 => parse::ipv4(p)?,
        L3::V6 => parse::ipv6(p)?,
    };
    let l4 = parse::transport(p, &ip)?;
    if ip.family == FAMILY_V6
        && (l4.kind == Kind::Ndp || parse::is_link_local_v6(D::local_end(&ip)))
    {
        return Ok(Reason::PassLinkLocal);
    }
    let active = state::active(p.ifindex())?;
    let mut plan = Plan::default();
    let reason = if l4.kind == Kind::IcmpError {
        D::icmp_error::<P>(p.raw(), &ip, &active, &mut plan)
    } else {
        D::flow(p.ifindex(), &ip, &l4, &active, &mut plan)
    };
    if !reason.passes() {
        return Ok(reason);
    }
    match plan::apply::<P>(p.raw(), &ip, &l4, &plan) {
        r if r.passes() => Ok(reason),
        failed => Ok(failed),
    }
}
