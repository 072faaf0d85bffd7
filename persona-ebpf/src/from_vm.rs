//! Egress: a frame the VM sent. Source becomes the persona's address, DNS queries go to
//! the persona's resolver, new flows are judged by the persona's egress rules.
use persona_common::{DIR_EGRESS, conntrack::CT_DNS_REDIRECTED, counters::Reason, persona::Active};

use crate::{
    conntrack::{self, NewFlow},
    dns, firewall, metadata,
    packet::Packet,
    parse::{self, Ip, L4},
    path::Direction,
    plan::{OUTER_DST, OUTER_SRC, Plan, QUOTED_DST},
    state,
};

pub struct FromVm;

impl Direction for FromVm {
    const DIRECTION: u8 = DIR_EGRESS;

    #[inline(always)]
    fn local_end(ip: &Ip) -> &[u8; 16] {
        &ip.src
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

/// The VM reports an error about a datagram it received: that datagram went to the
/// VM's inner address, which the quote must now show as the persona's.
#[inline(always)]
fn try_icmp_error<P: Packet>(
    p: &P,
    ip: &Ip,
    active: &Active,
    plan: &mut Plan,
) -> Result<Reason, Reason> {
    let ifindex = p.ifindex();
    let st = state::resolve(active)?;
    let inner = st.inner(ip.family);
    if inner != Some(ip.src) {
        return Ok(Reason::DropSpoofed);
    }
    plan.src = st.persona_addr(ip.family).ok_or(Reason::DropNoPersona)?;
    let q = parse::quoted(p, ip.family)?;
    if Some(q.dst) != inner {
        return Ok(Reason::DropSpoofed);
    }
    let qkey = conntrack::key(ifindex, ip.family, q.proto, &q.src, q.sport, q.dport);
    let flow = conntrack::binding(conntrack::live(
        &qkey,
        st.persona.ct_floor,
        conntrack::now(),
        0,
    ));
    let reason = if let Some(binding) = flow {
        // The datagram went to the address its flow is bound to.
        plan.src = binding;
        Reason::AllowTracked
    } else {
        firewall::judge(st.persona, DIR_EGRESS, ip.family, &ip.dst, ip.proto, 0)
    };
    plan.flags = OUTER_SRC | QUOTED_DST;
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
    if st.inner(ip.family) != Some(ip.src) {
        return Ok(Reason::DropSpoofed);
    }
    if metadata::is_request(ip) {
        return Ok(metadata::request(ifindex, ip, l4, plan));
    }
    plan.src = st.persona_addr(ip.family).ok_or(Reason::DropNoPersona)?;
    plan.flags = OUTER_SRC;
    let now = conntrack::now();
    let redirect = dns::redirect_target(st.persona, ip.family, l4);
    if let Some(resolver) = redirect {
        plan.dst = resolver;
        plan.flags |= OUTER_DST;
    }
    let remote = if redirect.is_some() {
        &plan.dst
    } else {
        &ip.dst
    };
    let key = conntrack::key(ifindex, ip.family, ip.proto, remote, l4.dport, l4.sport);
    if let Some(entry) = conntrack::live(&key, st.persona.ct_floor, now, l4.tcp_flags) {
        plan.src = conntrack::bind(entry, &plan.src, st.persona.move_floor, active.generation);
        conntrack::seen(entry, DIR_EGRESS, l4, now);
        return Ok(if redirect.is_some() {
            Reason::AllowDns
        } else {
            Reason::AllowTracked
        });
    }
    // Queries to the persona's own resolver are always let through: a persona without
    // working DNS is not a usable identity.
    let reason = if redirect.is_some() {
        Reason::AllowDns
    } else {
        firewall::judge(
            st.persona,
            DIR_EGRESS,
            ip.family,
            remote,
            ip.proto,
            l4.rule_port(),
        )
    };
    if reason.passes() {
        if !conntrack::admit(ifindex) {
            return Ok(Reason::DropFlowBudget);
        }
        conntrack::open(
            &key,
            NewFlow {
                generation: active.generation,
                now,
                binding: &plan.src,
                orig_remote: &ip.dst,
                origin: DIR_EGRESS,
                flags: if redirect.is_some() {
                    CT_DNS_REDIRECTED
                } else {
                    0
                },
            },
            l4,
        );
    }
    Ok(reason)
}
