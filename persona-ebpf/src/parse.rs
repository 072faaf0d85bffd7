//! Header parsing. Offsets are constants: IPv4 options and IPv6 extension headers are
//! refused before any transport header is read, so the verifier sees fixed bounds.
use core::mem::offset_of;

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use persona_common::{
    FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, counters::Reason,
};

use crate::packet::{Packet, load, load_u16};

pub const ETH_LEN: usize = EthHdr::LEN;
pub const V4_OFF: usize = ETH_LEN;
pub const V6_OFF: usize = ETH_LEN;
pub const V4_L4: usize = V4_OFF + Ipv4Hdr::LEN;
pub const V6_L4: usize = V6_OFF + Ipv6Hdr::LEN;
pub const V4_SRC: usize = V4_OFF + offset_of!(Ipv4Hdr, src_addr);
pub const V4_DST: usize = V4_OFF + offset_of!(Ipv4Hdr, dst_addr);
pub const V4_CHECK: usize = V4_OFF + offset_of!(Ipv4Hdr, check);
pub const V6_SRC: usize = V6_OFF + offset_of!(Ipv6Hdr, src_addr);
pub const V6_DST: usize = V6_OFF + offset_of!(Ipv6Hdr, dst_addr);
const ICMP_HDR_LEN: usize = 8;
/// The datagram an ICMP error quotes starts right after the ICMP header.
pub const V4_QUOTED: usize = V4_L4 + ICMP_HDR_LEN;
pub const V6_QUOTED: usize = V6_L4 + ICMP_HDR_LEN;

const ETH_P_IP: u16 = 0x0800_u16.to_be();
const ETH_P_IPV6: u16 = 0x86dd_u16.to_be();
const ETH_P_ARP: u16 = 0x0806_u16.to_be();
const ETH_P_8021Q: u16 = 0x8100_u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8_u16.to_be();

pub enum L3 {
    Arp,
    V4,
    V6,
}

#[inline(always)]
pub fn l3<P: Packet>(p: &P) -> Result<L3, Reason> {
    let eth: EthHdr = load(p, 0)?;
    match eth.ether_type {
        ETH_P_IP => Ok(L3::V4),
        ETH_P_IPV6 => Ok(L3::V6),
        ETH_P_ARP => Ok(L3::Arp),
        ETH_P_8021Q | ETH_P_8021AD => Err(Reason::DropVlan),
        _ => Err(Reason::DropNotIp),
    }
}

/// An IP header; IPv4 addresses sit in the first four bytes.
pub struct Ip {
    pub family: u8,
    pub proto: u8,
    /// Bytes after the IP header, as the header says (a GSO skb's whole payload).
    pub payload_len: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[inline(always)]
pub fn widen(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0] = a[0];
    out[1] = a[1];
    out[2] = a[2];
    out[3] = a[3];
    out
}

#[inline(always)]
pub fn narrow(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

#[inline(always)]
pub fn ipv4<P: Packet>(p: &P) -> Result<Ip, Reason> {
    let h: Ipv4Hdr = load(p, V4_OFF)?;
    if h.version() != 4 || h.ihl() < Ipv4Hdr::LEN as u8 || h.tot_len() < Ipv4Hdr::LEN as u16 {
        return Err(Reason::DropTruncated);
    }
    if h.ihl() != Ipv4Hdr::LEN as u8 {
        return Err(Reason::DropIpOptions);
    }
    // More-fragments flag or a non-zero offset: any fragment of a datagram.
    if u16::from_be_bytes(h.frags) & 0x3fff != 0 {
        return Err(Reason::DropFragment);
    }
    Ok(Ip {
        family: FAMILY_V4,
        proto: h.proto,
        payload_len: h.tot_len() - Ipv4Hdr::LEN as u16,
        src: widen(h.src_addr),
        dst: widen(h.dst_addr),
    })
}

#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

#[inline(always)]
pub fn ipv6<P: Packet>(p: &P) -> Result<Ip, Reason> {
    let h: Ipv6Hdr = load(p, V6_OFF)?;
    if h.version() != 6 {
        return Err(Reason::DropTruncated);
    }
    let next = h.next_hdr;
    let ip = Ip {
        family: FAMILY_V6,
        proto: next,
        payload_len: h.payload_len(),
        src: h.src_addr,
        dst: h.dst_addr,
    };
    if is_extension_header(next) {
        // MLD reports carry a hop-by-hop header; like everything that never leaves the
        // link, they pass untranslated.
        if link_scoped(&ip.src) || link_scoped(&ip.dst) {
            return Err(Reason::PassLinkLocal);
        }
        return Err(Reason::DropIpv6ExtHeader);
    }
    Ok(ip)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Udp,
    /// Echo request or reply: the identifier stands in for both ports.
    IcmpEcho,
    /// Destination unreachable, time exceeded and the like: quotes a datagram.
    IcmpError,
    /// Neighbour discovery: stays on the link.
    Ndp,
    IcmpOther,
    Other,
}

/// A DHCPv4 (port 68 to 67) or DHCPv6 (546 to 547) client's message, which the daemon
/// answers on the tap.
#[inline(always)]
pub fn is_dhcp_client(ip: &Ip, l4: &L4) -> bool {
    ip.proto == PROTO_UDP
        && if ip.family == FAMILY_V4 {
            l4.sport == 68 && l4.dport == 67
        } else {
            l4.sport == 546 && l4.dport == 547
        }
}

pub struct L4 {
    pub kind: Kind,
    pub sport: u16,
    pub dport: u16,
    pub csum_off: usize,
    /// TCP only: `TCP_SYN`, `TCP_ACK`, `TCP_FIN` and `TCP_RST` as seen.
    pub tcp_flags: u8,
    /// TCP only: the sequence number just after this segment (its data, SYN and FIN),
    /// which the receiver acknowledges next.
    pub seq_end: u32,
}

pub const TCP_SYN: u8 = 1;
pub const TCP_ACK: u8 = 2;
pub const TCP_FIN: u8 = 4;
pub const TCP_RST: u8 = 8;

impl L4 {
    /// The port firewall rules match: the destination port, for protocols that have one.
    #[inline(always)]
    pub fn rule_port(&self) -> u16 {
        match self.kind {
            Kind::Tcp | Kind::Udp => self.dport,
            _ => 0,
        }
    }
}

#[inline(always)]
fn icmp_kind(family: u8, ty: u8) -> Kind {
    if family == FAMILY_V4 {
        match ty {
            0 | 8 => Kind::IcmpEcho,
            3 | 11 | 12 => Kind::IcmpError,
            _ => Kind::IcmpOther,
        }
    } else {
        match ty {
            128 | 129 => Kind::IcmpEcho,
            1..=4 => Kind::IcmpError,
            133..=137 => Kind::Ndp,
            _ => Kind::IcmpOther,
        }
    }
}

#[inline(always)]
pub fn transport<P: Packet>(p: &P, ip: &Ip) -> Result<L4, Reason> {
    let l4 = if ip.family == FAMILY_V4 { V4_L4 } else { V6_L4 };
    match ip.proto {
        PROTO_TCP => {
            let h: TcpHdr = load(p, l4)?;
            Ok(L4 {
                kind: Kind::Tcp,
                sport: u16::from_be_bytes(h.source),
                dport: u16::from_be_bytes(h.dest),
                csum_off: l4 + offset_of!(TcpHdr, check),
                tcp_flags: (if h.syn() != 0 { TCP_SYN } else { 0 })
                    | (if h.ack() != 0 { TCP_ACK } else { 0 })
                    | (if h.fin() != 0 { TCP_FIN } else { 0 })
                    | (if h.rst() != 0 { TCP_RST } else { 0 }),
                seq_end: u32::from_be_bytes(h.seq)
                    .wrapping_add(u32::from(ip.payload_len.saturating_sub(h.doff() * 4)))
                    .wrapping_add(u32::from(h.syn() != 0) + u32::from(h.fin() != 0)),
            })
        }
        PROTO_UDP => {
            let h: UdpHdr = load(p, l4)?;
            Ok(L4 {
                kind: Kind::Udp,
                sport: u16::from_be_bytes(h.src),
                dport: u16::from_be_bytes(h.dst),
                csum_off: l4 + offset_of!(UdpHdr, check),
                tcp_flags: 0,
                seq_end: 0,
            })
        }
        PROTO_ICMP | PROTO_ICMPV6 if (ip.proto == PROTO_ICMP) == (ip.family == FAMILY_V4) => {
            let h: [u8; ICMP_HDR_LEN] = load(p, l4)?;
            let id = u16::from_be_bytes([h[4], h[5]]);
            Ok(L4 {
                kind: icmp_kind(ip.family, h[0]),
                sport: id,
                dport: id,
                csum_off: l4 + 2,
                tcp_flags: 0,
                seq_end: 0,
            })
        }
        _ => Ok(L4 {
            kind: Kind::Other,
            sport: 0,
            dport: 0,
            csum_off: 0,
            tcp_flags: 0,
            seq_end: 0,
        }),
    }
}

/// The start of the datagram quoted by an ICMP error: enough to find its flow.
pub struct Quoted {
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

pub const V4_QUOTED_L4: usize = V4_QUOTED + Ipv4Hdr::LEN;
pub const V6_QUOTED_L4: usize = V6_QUOTED + Ipv6Hdr::LEN;

#[inline(always)]
pub fn quoted<P: Packet>(p: &P, family: u8) -> Result<Quoted, Reason> {
    let (proto, src, dst, l4) = if family == FAMILY_V4 {
        let h: Ipv4Hdr = load(p, V4_QUOTED)?;
        if h.ihl() != Ipv4Hdr::LEN as u8 {
            return Err(Reason::DropIpOptions);
        }
        (h.proto, widen(h.src_addr), widen(h.dst_addr), V4_QUOTED_L4)
    } else {
        let h: Ipv6Hdr = load(p, V6_QUOTED)?;
        (h.next_hdr, h.src_addr, h.dst_addr, V6_QUOTED_L4)
    };
    let (sport, dport) = match proto {
        PROTO_TCP | PROTO_UDP => (load_u16(p, l4)?, load_u16(p, l4 + 2)?),
        PROTO_ICMP | PROTO_ICMPV6 => {
            let id = load_u16(p, l4 + 4)?;
            (id, id)
        }
        _ => (0, 0),
    };
    Ok(Quoted {
        proto,
        src,
        dst,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
    })
}

/// Link-local unicast, the unspecified address (before DAD) or link-scope multicast.
#[inline(always)]
fn link_scoped(a: &[u8; 16]) -> bool {
    is_link_local_v6(a) || *a == [0; 16] || (a[0] == 0xff && (a[1] & 0x0f) == 0x02)
}

#[inline(always)]
pub fn is_link_local_v6(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && (a[1] & 0xc0) == 0x80
}

/// Ethernet, IP and transport headers, which each segment of a GSO skb repeats. Reads
/// the IPv4 header length itself: it runs on every packet, options or not.
#[inline(always)]
pub fn headers_len<P: Packet>(p: &P) -> Result<usize, Reason> {
    let eth: EthHdr = load(p, 0)?;
    let (l4, proto) = if eth.ether_type == ETH_P_IP {
        let h: Ipv4Hdr = load(p, V4_OFF)?;
        (V4_OFF + usize::from(h.ihl()), h.proto)
    } else {
        (V6_L4, load::<Ipv6Hdr, P>(p, V6_OFF)?.next_hdr)
    };
    match proto {
        PROTO_TCP => Ok(l4 + usize::from(load::<TcpHdr, P>(p, l4)?.doff()) * 4),
        PROTO_UDP => Ok(l4 + UdpHdr::LEN),
        _ => Ok(l4),
    }
}
