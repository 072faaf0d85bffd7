//! The packet path both programs share: parse, read the active persona once, decide,
//! then rewrite. What differs by direction is behind [`Direction`].
use persona_common::{DIR_EGRESS, FAMILY_V6, counters::Reason, persona::Active};

use crate::{
    counters::UNATTRIBUTED,
    packet::Packet,
    parse::{self, Ip, Kind, L3, L4},
    plan::{self, Plan},
    state,
};

pub trait Direction {
    /// `DIR_EGRESS` for what the VM sends (the tap's ingress), `DIR_INGRESS` for what
    /// it receives.
    const DIRECTION: u8;
    /// The address whose being link-local keeps a packet on the link, untranslated.
    fn local_end(ip: &Ip) -> &[u8; 16];
    /// Decides for an ICMP error, which quotes a datagram of some flow.
    fn icmp_error<P: Packet>(raw: P::Raw, ip: &Ip, active: &Active, plan: &mut Plan) -> Reason;
    /// Decides for any other packet of a flow.
    fn flow(ifindex: u32, ip: &Ip, l4: &L4, active: &Active, plan: &mut Plan) -> Reason;
}

/// The verdict on a packet and the persona and table that decided it, in one
/// register: separate variables would cost main's frame bytes the verifier's 512
/// cannot spare. Reason in bits 0-7, table in 8-31, persona in 32-63.
#[derive(Clone, Copy)]
pub struct Handled(u64);

impl Handled {
    #[inline(always)]
    pub fn new(reason: Reason, table: u32, persona: u32) -> Self {
        Self(reason as u64 | (u64::from(table & 0xff_ffff) << 8) | (u64::from(persona) << 32))
    }

    #[inline(always)]
    fn decided(reason: Reason, plan: &Plan) -> Self {
        Self::new(reason, plan.table, plan.persona)
    }

    #[inline(always)]
    pub fn unattributed(reason: Reason) -> Self {
        Self(reason as u64 | (u64::from(UNATTRIBUTED) << 32))
    }

    /// The same persona and table, another verdict.
    #[inline(always)]
    pub fn with(self, reason: Reason) -> Self {
        Self((self.0 & !0xff) | reason as u64)
    }

    #[inline(always)]
    pub fn reason(self) -> Reason {
        Reason::from_u8(self.0 as u8).unwrap_or(Reason::DropTruncated)
    }

    #[inline(always)]
    pub fn persona(self) -> u32 {
        (self.0 >> 32) as u32
    }

    #[inline(always)]
    pub fn table(self) -> u32 {
        ((self.0 >> 8) & 0xff_ffff) as u32
    }
}

/// Decides and rewrites one packet.
#[inline(always)]
pub fn handle<P: Packet, D: Direction>(p: &mut P) -> Handled {
    match decide::<P, D>(p) {
        Ok(h) => h,
        Err(reason) => Handled::unattributed(reason),
    }
}

#[inline(always)]
fn decide<P: Packet, D: Direction>(p: &mut P) -> Result<Handled, Reason> {
    let ip = match parse::l3(p)? {
        L3::Arp => return Ok(Handled::unattributed(Reason::PassArp)),
        L3::V4 => parse::ipv4(p)?,
        L3::V6 => parse::ipv6(p)?,
    };
    let l4 = parse::transport(p, &ip)?;
    // Before the link-local pass and the spoof check: a DHCP client asks from 0.0.0.0
    // or its link-local address.
    if D::DIRECTION == DIR_EGRESS && parse::is_dhcp_client(&ip, &l4) {
        return Ok(Handled::unattributed(Reason::HostDhcp));
    }
    if ip.family == FAMILY_V6
        && (l4.kind == Kind::Ndp || parse::is_link_local_v6(D::local_end(&ip)))
    {
        return Ok(Handled::unattributed(Reason::PassLinkLocal));
    }
    let active = state::active(p.ifindex())?;
    let mut plan = Plan {
        persona: active.persona,
        table: active.table,
        ..Plan::default()
    };
    let reason = if l4.kind == Kind::IcmpError {
        D::icmp_error::<P>(p.raw(), &ip, &active, &mut plan)
    } else {
        D::flow(p.ifindex(), &ip, &l4, &active, &mut plan)
    };
    if !reason.passes() {
        return Ok(Handled::decided(reason, &plan));
    }
    match plan::apply::<P>(p.raw(), &ip, &l4, &plan) {
        r if r.passes() => Ok(Handled::decided(reason, &plan)),
        failed => Ok(Handled::decided(failed, &plan)),
    }
}
