//! Ingress: a frame on its way to the VM. It must be addressed to the active persona, or
//! be a reply to a flow that left through an earlier one; the destination becomes the
//! VM's own address and DNS replies get back the source the VM asked.
use persona_common::{
    DIR_EGRESS, DIR_INGRESS,
    conntrack::{CT_DNS_REDIRECTED, CtEntry},
    counters::Reason,
    persona::Active,
};

use crate::{
    conntrack::{self, NewFlow},
    counters, firewall, metadata,
    packet::Packet,
    parse::{self, Ip, L4, TCP_ACK, TCP_SYN},
    path::Direction,
    plan::{OUTER_DST, OUTER_SRC, Plan, QUOTED_SRC},
    state,
};

/// A packet of a tracked flow must be addressed to the persona address the flow is
/// bound to (or was, before a move); any other packet to the active persona's.
#[inline(always)]
fn addressed(entry: Option<*mut CtEntry>, dst: &[u8; 16], persona: &[u8; 16]) -> bool {
    match entry {
        // SAFETY: map value valid for this program run.
        Some(e) => unsafe { (*e).binding == *dst || (*e).prev_binding == *dst },
        None => dst == persona,
    }
}

pub struct ToVm;

impl Direction for ToVm {
    const DIRECTION: u8 = DIR_INGRESS;

    #[inline(always)]
    fn local_end(ip: &Ip) -> &[u8; 16] {
        &ip.dst
    }

    // Both deciders are BPF subprograms of their own: their stack frames then never add
    // up with the rewrite's.
    #[inline(never)]
    fn icmp_error<P: Packet>(raw: P::Raw, ip: &Ip, active: &Active, plan: &mut Plan) -> Reason {
        try_icmp_error(&P::from_raw(raw), ip, active, plan).unwrap_or_else(|reason| reason)
    }

    #[inline(never)]
    fn flow(ifindex: u32, ip: &Ip, l4: &L4, active: &Active, plan: &mut Plan) -> Reason {
        try_flow(ifindex, ip, l4, active, plan).unwrap_or_else(|reason| reason)
    }
}

/// An error about a datagram the VM sent: the quote shows the persona's address as its
/// source, which the VM must see as its own.
#[inline(always)]
fn try_icmp_error<P: Packet>(
    p: &P,
    ip: &Ip,
    active: &Active,
    plan: &mut Plan,
) -> Result<Reason, Reason> {
    let ifindex = p.ifindex();
    let st = state::resolve(active)?;
    let persona_addr = st.persona_addr(ip.family).ok_or(Reason::DropNoPersona)?;
    plan.dst = st.inner(ip.family).ok_or(Reason::DropNoPersona)?;
    let q = parse::quoted(p, ip.family)?;
    let qkey = conntrack::key(ifindex, ip.family, q.proto, &q.dst, q.dport, q.sport);
    let entry = conntrack::live(&qkey, st.persona.ct_floor, conntrack::now(), 0);
    if !addressed(entry, &ip.dst, &persona_addr) {
        return Ok(Reason::DropNotPersona);
    }
    let reason = if entry.is_some() {
        Reason::AllowTracked
    } else {
        firewall::judge(st.persona, DIR_INGRESS, ip.family, &ip.src, ip.proto, 0)
    };
    plan.flags = OUTER_DST | QUOTED_SRC;
    Ok(reason)
}

#[inline(always)]
fn try_flow(
    ifindex: u32,
    ip: &Ip,
    l4: &L4,
    active: &Active,
    plan: &mut Plan,
) -> Result<Reason, Reason> {
    let st = state::resolve(active)?;
    let inner = st.inner(ip.family).ok_or(Reason::DropNoPersona)?;
    if let Some(reason) = metadata::answer(ifindex, ip, l4, inner, plan) {
        return Ok(reason);
    }
    let persona_addr = st.persona_addr(ip.family).ok_or(Reason::DropNoPersona)?;
    plan.dst = inner;
    plan.flags = OUTER_DST;
    let now = conntrack::now();
    let key = conntrack::key(ifindex, ip.family, ip.proto, &ip.src, l4.sport, l4.dport);
    let entry = conntrack::live(&key, st.persona.ct_floor, now, l4.tcp_flags);
    if !addressed(entry, &ip.dst, &persona_addr) {
        return Ok(Reason::DropNotPersona);
    }
    if let Some(e) = entry {
        // A SYN-ACK answering the VM's SYN: the entry was last touched by that SYN.
        // SAFETY: map value valid for this program run.
        let (origin, last) = unsafe { ((*e).origin, (*e).last_seen_ns) };
        if l4.tcp_flags == TCP_SYN | TCP_ACK && origin == DIR_EGRESS {
            counters::handshake(ifindex, now.saturating_sub(last));
        }
        conntrack::seen(e, DIR_INGRESS, l4, now);
        // SAFETY: map value valid for this program run.
        let e = unsafe { &*e };
        if e.flags & CT_DNS_REDIRECTED != 0 {
            plan.src = e.orig_remote;
            plan.flags |= OUTER_SRC;
            return Ok(Reason::AllowDns);
        }
        return Ok(Reason::AllowTracked);
    }
    let reason = firewall::judge(
        st.persona,
        DIR_INGRESS,
        ip.family,
        &ip.src,
        ip.proto,
        l4.rule_port(),
    );
    if reason.passes() {
        if !conntrack::admit(ifindex) {
            return Ok(Reason::DropFlowBudget);
        }
        conntrack::open(
            &key,
            NewFlow {
                generation: active.generation,
                now,
                binding: &ip.dst,
                orig_remote: &ip.src,
                origin: DIR_INGRESS,
                flags: 0,
            },
            l4,
        );
    }
    Ok(reason)
}
