//! Address rewriting with incremental checksum updates, including the datagram an ICMP
//! error quotes, so the remote end can match the error to its flow.
use persona_common::{FAMILY_V4, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, counters::Reason};

use crate::{
    csum,
    packet::{L4Csum, Packet, load_u16},
    parse::{
        Ip, Kind, L4, Quoted, V4_CHECK, V4_DST, V4_L4, V4_QUOTED, V4_QUOTED_L4, V4_SRC, V6_DST,
        V6_L4, V6_QUOTED, V6_QUOTED_L4, V6_SRC, narrow,
    },
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Src,
    Dst,
}

/// Replaces the outer source or destination address.
#[inline(always)]
pub fn rewrite<P: Packet>(
    p: &mut P,
    ip: &Ip,
    l4: &L4,
    field: Field,
    new: &[u8; 16],
) -> Result<(), Reason> {
    let old = if field == Field::Src {
        &ip.src
    } else {
        &ip.dst
    };
    if ip.family == FAMILY_V4 {
        let (old, new) = (narrow(old), narrow(new));
        let d = csum::diff(&old, &new);
        p.store(if field == Field::Src { V4_SRC } else { V4_DST }, &new)?;
        p.fix_l3_csum(V4_CHECK, d)?;
        match l4.kind {
            Kind::Tcp => p.fix_l4_csum(l4.csum_off, d, L4Csum::Pseudo),
            Kind::Udp => p.fix_l4_csum(l4.csum_off, d, L4Csum::UdpPseudo),
            // ICMPv4 has no pseudo-header.
            _ => Ok(()),
        }
    } else {
        let d = csum::diff(old, new);
        p.store(if field == Field::Src { V6_SRC } else { V6_DST }, new)?;
        match l4.kind {
            Kind::Tcp | Kind::IcmpEcho | Kind::IcmpError | Kind::IcmpOther | Kind::Ndp => {
                p.fix_l4_csum(l4.csum_off, d, L4Csum::Pseudo)
            }
            Kind::Udp => p.fix_l4_csum(l4.csum_off, d, L4Csum::UdpPseudo),
            Kind::Other => Ok(()),
        }
    }
}

/// Replaces an address of the quoted datagram of an ICMP error, the quoted checksums
/// that cover it, and the ICMP checksum that covers all of them.
#[inline(always)]
pub fn rewrite_quoted<P: Packet>(
    p: &mut P,
    family: u8,
    q: &Quoted,
    field: Field,
    new: &[u8; 16],
) -> Result<(), Reason> {
    let old = if field == Field::Src { &q.src } else { &q.dst };
    let (d_addr, ql4, icmp_csum) = if family == FAMILY_V4 {
        let (old, new) = (narrow(old), narrow(new));
        let d = csum::diff(&old, &new);
        let off = if field == Field::Src {
            V4_QUOTED + 12
        } else {
            V4_QUOTED + 16
        };
        p.store(off, &new)?;
        // A valid IPv4 header sums to 0xffff whatever its addresses, so changing an address
        // and the header checksum together leaves the ICMP checksum's share unchanged; the
        // update is still applied field by field so a header with a bad checksum stays bad.
        let qcheck_off = V4_QUOTED + 10;
        let old_check = load_u16(p, qcheck_off)?;
        let new_check = csum::apply(old_check, d);
        p.store(qcheck_off, &new_check.to_ne_bytes())?;
        let icmp = csum::add(d, csum::diff16(old_check, new_check));
        (d, V4_QUOTED_L4, (icmp, V4_L4 + 2))
    } else {
        let d = csum::diff(old, new);
        let off = if field == Field::Src {
            V6_QUOTED + 8
        } else {
            V6_QUOTED + 24
        };
        p.store(off, new)?;
        (d, V6_QUOTED_L4, (d, V6_L4 + 2))
    };
    let (mut icmp_diff, icmp_off) = icmp_csum;
    // The quoted transport checksum is only there if enough of the datagram was quoted.
    let quoted_check = match q.proto {
        PROTO_TCP => Some((ql4 + 16, false)),
        PROTO_UDP => Some((ql4 + 6, true)),
        PROTO_ICMPV6 => Some((ql4 + 2, false)),
        _ => None,
    };
    if let Some((off, udp)) = quoted_check
        && let Ok(old_check) = load_u16(p, off)
        && !(udp && old_check == 0)
    {
        let mut new_check = csum::apply(old_check, d_addr);
        if udp && new_check == 0 {
            new_check = 0xffff;
        }
        p.store(off, &new_check.to_ne_bytes())?;
        icmp_diff = csum::add(icmp_diff, csum::diff16(old_check, new_check));
    }
    p.fix_l4_csum(icmp_off, icmp_diff, L4Csum::Plain)
}
