//! Ethernet frames built and checked from scratch: no incremental arithmetic here, so a
//! checksum the datapath got wrong cannot be matched by the same mistake.
use std::net::IpAddr;

pub const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x02];
pub const HOST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x01];

pub fn ones_sum(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    sum
}

pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend([0, proto]);
            p.extend((len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend((len as u32).to_be_bytes());
            p.extend([0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    p
}

/// The L4 checksum of `segment` (checksum field included as it is) sums to zero when valid.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let mut data = if proto == 1 {
        Vec::new()
    } else {
        pseudo(src, dst, proto, segment.len())
    };
    data.extend_from_slice(segment);
    fold(ones_sum(&data))
}

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
        zero_checksum: bool,
    },
    /// ICMP / ICMPv6 message: type, code, the 4 bytes after the checksum, and the rest.
    Icmp {
        ty: u8,
        code: u8,
        rest: [u8; 4],
        payload: Vec<u8>,
    },
}

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

fn l4_bytes(src: IpAddr, dst: IpAddr, l4: &L4) -> (u8, Vec<u8>) {
    let v4 = src.is_ipv4();
    let (proto, mut seg, csum_at) = match l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            payload,
        } => {
            let mut s = Vec::new();
            s.extend(sport.to_be_bytes());
            s.extend(dport.to_be_bytes());
            s.extend(1000u32.to_be_bytes());
            s.extend(0u32.to_be_bytes());
            s.extend([0x50, *flags]);
            s.extend(64240u16.to_be_bytes());
            s.extend([0, 0, 0, 0]);
            s.extend(payload);
            (6, s, Some(16))
        }
        L4::Udp {
            sport,
            dport,
            payload,
            zero_checksum,
        } => {
            let mut s = Vec::new();
            s.extend(sport.to_be_bytes());
            s.extend(dport.to_be_bytes());
            s.extend(((8 + payload.len()) as u16).to_be_bytes());
            s.extend([0, 0]);
            s.extend(payload);
            (17, s, (!zero_checksum).then_some(6))
        }
        L4::Icmp {
            ty,
            code,
            rest,
            payload,
        } => {
            let mut s = vec![*ty, *code, 0, 0];
            s.extend(rest);
            s.extend(payload);
            (if v4 { 1 } else { 58 }, s, Some(2))
        }
    };
    if let Some(at) = csum_at {
        let mut c = l4_checksum(src, dst, proto, &seg);
        if proto == 17 && c == 0 {
            c = 0xffff;
        }
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    (proto, seg)
}

/// An IP packet without the Ethernet header.
pub fn ip_packet(src: IpAddr, dst: IpAddr, l4: &L4) -> Vec<u8> {
    let (proto, seg) = l4_bytes(src, dst, l4);
    ip_with_payload(src, dst, proto, &seg)
}

pub fn ip_with_payload(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend([0x45, 0]);
            p.extend(((20 + seg.len()) as u16).to_be_bytes());
            p.extend([0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
            p.extend(s.octets());
            p.extend(d.octets());
            let c = fold(ones_sum(&p));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend([0x60, 0, 0, 0]);
            p.extend((seg.len() as u16).to_be_bytes());
            p.extend([proto, 64]);
            p.extend(s.octets());
            p.extend(d.octets());
        }
        _ => panic!("mixed families"),
    }
    p.extend(seg);
    p
}

pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(HOST_MAC);
    f.extend(VM_MAC);
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

pub fn frame(src: IpAddr, dst: IpAddr, l4: &L4) -> Vec<u8> {
    ethernet(
        if src.is_ipv4() { 0x0800 } else { 0x86dd },
        &ip_packet(src, dst, l4),
    )
}

/// An ICMP error from `src` to `dst` quoting `quoted` (an IP packet).
pub fn icmp_error(src: IpAddr, dst: IpAddr, quoted: &[u8]) -> Vec<u8> {
    let (ty, code) = if src.is_ipv4() { (3, 3) } else { (1, 4) };
    frame(
        src,
        dst,
        &L4::Icmp {
            ty,
            code,
            rest: [0; 4],
            payload: quoted.to_vec(),
        },
    )
}

/// A parsed view of a frame the datapath let through.
#[derive(Debug)]
pub struct Seen {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub l4: Vec<u8>,
}

impl Seen {
    pub fn ports(&self) -> (u16, u16) {
        (
            u16::from_be_bytes([self.l4[0], self.l4[1]]),
            u16::from_be_bytes([self.l4[2], self.l4[3]]),
        )
    }
    pub fn l4_checksum_field(&self) -> u16 {
        let at = match self.proto {
            6 => 16,
            17 => 6,
            _ => 2,
        };
        u16::from_be_bytes([self.l4[at], self.l4[at + 1]])
    }
}

/// Parses an IP packet and checks every checksum from scratch.
pub fn check_ip(packet: &[u8]) -> Seen {
    let v4 = packet[0] >> 4 == 4;
    let (src, dst, proto, l4) = if v4 {
        let ihl = (packet[0] & 0xf) as usize * 4;
        assert_eq!(
            fold(ones_sum(&packet[..ihl])),
            0,
            "IPv4 header checksum invalid: {packet:02x?}"
        );
        let s: [u8; 4] = packet[12..16].try_into().unwrap();
        let d: [u8; 4] = packet[16..20].try_into().unwrap();
        (
            IpAddr::from(s),
            IpAddr::from(d),
            packet[9],
            packet[ihl..].to_vec(),
        )
    } else {
        let s: [u8; 16] = packet[8..24].try_into().unwrap();
        let d: [u8; 16] = packet[24..40].try_into().unwrap();
        (
            IpAddr::from(s),
            IpAddr::from(d),
            packet[6],
            packet[40..].to_vec(),
        )
    };
    let seen = Seen {
        src,
        dst,
        proto,
        l4,
    };
    let zero_udp = proto == 17 && seen.l4_checksum_field() == 0;
    if !zero_udp && matches!(proto, 1 | 6 | 17 | 58) {
        assert_eq!(
            l4_checksum(src, dst, proto, &seen.l4),
            0,
            "L4 checksum (proto {proto}) invalid for {src} -> {dst}"
        );
    }
    seen
}

pub fn check_frame(frame: &[u8]) -> Seen {
    check_ip(&frame[14..])
}
