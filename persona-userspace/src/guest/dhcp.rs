//! DHCPv4 (RFC 2131, 2132) for a VM's inner configuration, answered on its tap: the
//! address and prefix it is configured with, its gateway, a resolver (any address will
//! do: the persona redirects every port-53 query) and the MTU. A message is read from
//! the client's whole Ethernet frame, and the answer is a whole frame to send back.
use std::net::Ipv4Addr;

use crate::datapath::reset::{fold, sum16};

const ETH: usize = 14;
const BOOTP: usize = 236;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const BROADCAST_FLAG: u16 = 0x8000;

const SUBNET_MASK: u8 = 1;
const ROUTER: u8 = 3;
const DNS: u8 = 6;
const MTU: u8 = 26;
const REQUESTED_IP: u8 = 50;
const LEASE_TIME: u8 = 51;
const MESSAGE_TYPE: u8 = 53;
const SERVER_ID: u8 = 54;
const RENEWAL_TIME: u8 = 58;
const REBINDING_TIME: u8 = 59;
const END: u8 = 255;
const PAD: u8 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Discover => "discover",
            Self::Offer => "offer",
            Self::Request => "request",
            Self::Decline => "decline",
            Self::Ack => "ack",
            Self::Nak => "nak",
            Self::Release => "release",
            Self::Inform => "inform",
        }
    }
}

/// A client's message, as much of it as the answer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub xid: [u8; 4],
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    /// A relay's address: none on a tap, where the client is on the link.
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    pub requested: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
}

/// What a VM is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub mtu: u16,
    pub seconds: u32,
    /// The host side of the tap: the frame's source.
    pub server_mac: [u8; 6],
}

/// A client's message out of its frame (Ethernet, IPv4 without options or with, UDP to
/// port 67); `Err` says what is wrong with it.
pub fn parse(frame: &[u8]) -> Result<Message, &'static str> {
    let ip = frame.get(ETH..).ok_or("shorter than an Ethernet header")?;
    if frame[12..14] != [8, 0] {
        return Err("not IPv4");
    }
    let ihl = usize::from(*ip.first().ok_or("no IPv4 header")? & 0x0f) * 4;
    if ip.len() < ihl + 8 || ihl < 20 || ip[9] != 17 {
        return Err("not UDP");
    }
    let udp = &ip[ihl..];
    if udp[2..4] != [0, 67] {
        return Err("not to port 67");
    }
    let b = udp.get(8..).ok_or("no BOOTP message")?;
    if b.len() < BOOTP + 4 || b[0] != 1 || b[1] != 1 || b[2] != 6 {
        return Err("not a BOOTP request over Ethernet");
    }
    if b[BOOTP..BOOTP + 4] != MAGIC {
        return Err("no DHCP magic cookie");
    }
    let mut kind = None;
    let (mut requested, mut server_id) = (None, None);
    let mut opts = &b[BOOTP + 4..];
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            PAD => {
                opts = rest;
                continue;
            }
            END => break,
            _ => {}
        }
        let (&len, rest) = rest.split_first().ok_or("an option cut short")?;
        let value = rest.get(..usize::from(len)).ok_or("an option cut short")?;
        let addr = || <[u8; 4]>::try_from(value).ok().map(Ipv4Addr::from);
        match code {
            MESSAGE_TYPE => kind = value.first().copied().and_then(Kind::from_u8),
            REQUESTED_IP => requested = addr(),
            SERVER_ID => server_id = addr(),
            _ => {}
        }
        opts = &rest[usize::from(len)..];
    }
    Ok(Message {
        kind: kind.ok_or("no DHCP message type")?,
        xid: b[4..8].try_into().expect("4 bytes"),
        flags: u16::from_be_bytes([b[10], b[11]]),
        ciaddr: Ipv4Addr::from(<[u8; 4]>::try_from(&b[12..16]).expect("4 bytes")),
        giaddr: Ipv4Addr::from(<[u8; 4]>::try_from(&b[24..28]).expect("4 bytes")),
        chaddr: b[28..34].try_into().expect("6 bytes"),
        requested,
        server_id,
    })
}

/// The kind of answer `m` gets under `lease`, if any: an offer to a discover; an ack to
/// a request for the lease's address (selecting this server, rebooting, renewing or
/// rebinding), a nak to one for any other; an ack without an address to an inform.
/// Nothing through a relay: a VM's tap has none.
pub fn decide(m: &Message, lease: &Lease) -> Option<Kind> {
    if !m.giaddr.is_unspecified() {
        return None;
    }
    match m.kind {
        Kind::Discover => Some(Kind::Offer),
        Kind::Request => {
            if m.server_id.is_some_and(|s| s != lease.gateway) {
                return None;
            }
            let asked = m.requested.unwrap_or(m.ciaddr);
            Some(if asked == lease.address {
                Kind::Ack
            } else {
                Kind::Nak
            })
        }
        Kind::Inform => Some(Kind::Ack),
        _ => None,
    }
}

/// The frame answering `m` with `kind`.
pub fn answer(m: &Message, kind: Kind, lease: &Lease) -> Vec<u8> {
    let inform = m.kind == Kind::Inform;
    let yiaddr = match kind {
        Kind::Offer | Kind::Ack if !inform => lease.address,
        _ => Ipv4Addr::UNSPECIFIED,
    };
    let mut b = vec![0u8; BOOTP];
    b[0] = 2;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&m.xid);
    b[10..12].copy_from_slice(&m.flags.to_be_bytes());
    // A nak leaves ciaddr empty (RFC 2131, table 3).
    if kind != Kind::Nak {
        b[12..16].copy_from_slice(&m.ciaddr.octets());
    }
    b[16..20].copy_from_slice(&yiaddr.octets());
    b[28..34].copy_from_slice(&m.chaddr);
    b.extend_from_slice(&MAGIC);
    let mut opt = |code: u8, value: &[u8]| {
        b.push(code);
        b.push(value.len() as u8);
        b.extend_from_slice(value);
    };
    opt(MESSAGE_TYPE, &[kind.code()]);
    opt(SERVER_ID, &lease.gateway.octets());
    if kind != Kind::Nak {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(lease.prefix))
            .unwrap_or(0);
        opt(SUBNET_MASK, &mask.to_be_bytes());
        opt(ROUTER, &lease.gateway.octets());
        opt(DNS, &lease.dns.octets());
        opt(MTU, &lease.mtu.to_be_bytes());
        if !inform {
            opt(LEASE_TIME, &lease.seconds.to_be_bytes());
            opt(RENEWAL_TIME, &(lease.seconds / 2).to_be_bytes());
            opt(REBINDING_TIME, &(lease.seconds / 8 * 7).to_be_bytes());
        }
    }
    b.push(END);
    // Some clients take no message shorter than BOOTP's 300 bytes.
    b.resize(b.len().max(300), PAD);
    // RFC 2131 4.1: a nak is broadcast; else to the client's address when it has one,
    // else broadcast when it asked for that or there is no address to send to, else to
    // its hardware address and the offered address.
    let (dst_mac, dst_ip) = if kind == Kind::Nak {
        ([0xff; 6], Ipv4Addr::BROADCAST)
    } else if !m.ciaddr.is_unspecified() {
        (m.chaddr, m.ciaddr)
    } else if m.flags & BROADCAST_FLAG != 0 || yiaddr.is_unspecified() {
        ([0xff; 6], Ipv4Addr::BROADCAST)
    } else {
        (m.chaddr, yiaddr)
    };
    frame(lease, dst_mac, dst_ip, &b)
}

fn frame(lease: &Lease, dst_mac: [u8; 6], dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let src = lease.gateway.octets();
    let udp_len = (8 + payload.len()) as u16;
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&67u16.to_be_bytes());
    udp.extend_from_slice(&68u16.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo = sum16(&src) + sum16(&dst.octets()) + 17 + u32::from(udp_len);
    let check = match fold(pseudo + sum16(&udp)) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&check.to_be_bytes());
    let mut ip = Vec::with_capacity(20);
    ip.extend_from_slice(&[0x45, 0x10]);
    ip.extend_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst.octets());
    let check = fold(sum16(&ip));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    let mut f = Vec::with_capacity(ETH + ip.len() + udp.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&lease.server_mac);
    f.extend_from_slice(&[8, 0]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&udp);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    fn lease() -> Lease {
        Lease {
            address: Ipv4Addr::new(198, 18, 0, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(198, 18, 0, 1),
            dns: Ipv4Addr::new(198, 18, 0, 1),
            mtu: 1500,
            seconds: 3600,
            server_mac: [2, 0, 0, 0, 0, 1],
        }
    }

    /// A client's message as its frame, from 0.0.0.0 (or `ciaddr`) to broadcast.
    fn request(kind: Kind, ciaddr: Ipv4Addr, options: &[(u8, &[u8])]) -> Vec<u8> {
        let m = Message {
            kind,
            xid: [1, 2, 3, 4],
            flags: 0,
            ciaddr,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: CLIENT,
            requested: None,
            server_id: None,
        };
        let mut b = vec![0u8; BOOTP];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&m.xid);
        b[12..16].copy_from_slice(&ciaddr.octets());
        b[28..34].copy_from_slice(&CLIENT);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&[MESSAGE_TYPE, 1, kind.code(), PAD]);
        for (code, value) in options {
            b.push(*code);
            b.push(value.len() as u8);
            b.extend_from_slice(value);
        }
        b.push(END);
        let mut f = frame(
            &Lease {
                gateway: ciaddr,
                server_mac: CLIENT,
                ..lease()
            },
            [0xff; 6],
            Ipv4Addr::BROADCAST,
            &b,
        );
        // As a client sends it: from port 68 to 67.
        f[34..38].copy_from_slice(&[0, 68, 0, 67]);
        f
    }

    fn options(frame: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut o = &frame[ETH + 20 + 8 + BOOTP + 4..];
        while let [code, len, rest @ ..] = o {
            if *code == END {
                break;
            }
            out.push((*code, rest[..usize::from(*len)].to_vec()));
            o = &rest[usize::from(*len)..];
        }
        out
    }

    #[test]
    fn a_discover_is_offered_the_devices_address_gateway_and_prefix() {
        let frame = request(Kind::Discover, Ipv4Addr::UNSPECIFIED, &[]);
        let m = parse(&frame).unwrap();
        assert_eq!((m.kind, m.chaddr), (Kind::Discover, CLIENT));
        let kind = decide(&m, &lease()).unwrap();
        assert_eq!(kind, Kind::Offer);
        let offer = answer(&m, kind, &lease());
        assert_eq!(&offer[..6], &CLIENT, "unicast to the client's MAC");
        assert_eq!(&offer[6..12], &lease().server_mac);
        assert_eq!(&offer[ETH + 12..ETH + 20], &[198, 18, 0, 1, 198, 18, 0, 2]);
        assert_eq!(
            &offer[ETH + 20 + 8 + 16..ETH + 20 + 8 + 20],
            &[198, 18, 0, 2]
        );
        assert_eq!(
            fold(sum16(&offer[ETH..ETH + 20])),
            0,
            "IPv4 header checksum"
        );
        assert!(
            offer.len() >= ETH + 20 + 8 + 300,
            "BOOTP's 300 bytes at least"
        );
        let udp = &offer[ETH + 20..];
        let pseudo = sum16(&[198, 18, 0, 1]) + sum16(&[198, 18, 0, 2]) + 17 + udp.len() as u32;
        assert_eq!(fold(pseudo + sum16(udp)), 0, "UDP checksum");
        let o = options(&offer);
        assert!(o.contains(&(MESSAGE_TYPE, vec![2])));
        assert!(o.contains(&(SUBNET_MASK, vec![255, 255, 255, 0])));
        assert!(o.contains(&(ROUTER, vec![198, 18, 0, 1])));
        assert!(o.contains(&(MTU, vec![5, 220])));
        assert!(o.contains(&(LEASE_TIME, 3600u32.to_be_bytes().to_vec())));
    }

    #[test]
    fn a_request_for_the_lease_is_acked_and_for_another_address_refused() {
        let lease = lease();
        let ours = [198, 18, 0, 2];
        let selecting = request(
            Kind::Request,
            Ipv4Addr::UNSPECIFIED,
            &[(REQUESTED_IP, &ours), (SERVER_ID, &[198, 18, 0, 1])],
        );
        assert_eq!(decide(&parse(&selecting).unwrap(), &lease), Some(Kind::Ack));
        let renewing = request(Kind::Request, Ipv4Addr::new(198, 18, 0, 2), &[]);
        let m = parse(&renewing).unwrap();
        assert_eq!(decide(&m, &lease), Some(Kind::Ack));
        let ack = answer(&m, Kind::Ack, &lease);
        assert_eq!(
            &ack[ETH + 16..ETH + 20],
            &ours,
            "a renewal is answered unicast"
        );
        let elsewhere = request(
            Kind::Request,
            Ipv4Addr::UNSPECIFIED,
            &[(REQUESTED_IP, &[10, 0, 0, 9])],
        );
        let m = parse(&elsewhere).unwrap();
        assert_eq!(decide(&m, &lease), Some(Kind::Nak));
        let nak = answer(&m, Kind::Nak, &lease);
        assert_eq!(&nak[..6], &[0xff; 6], "a nak is broadcast");
        let wrong_renewal = request(Kind::Request, Ipv4Addr::new(198, 18, 0, 77), &[]);
        let m = parse(&wrong_renewal).unwrap();
        assert_eq!(decide(&m, &lease), Some(Kind::Nak));
        let nak = answer(&m, Kind::Nak, &lease);
        assert_eq!(
            &nak[..6],
            &[0xff; 6],
            "a nak is broadcast, even to a client with an address"
        );
        assert_eq!(
            &nak[ETH + 20 + 8 + 12..ETH + 20 + 8 + 16],
            &[0; 4],
            "and names none"
        );
        let mut relayed = parse(&selecting).unwrap();
        relayed.giaddr = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(decide(&relayed, &lease), None, "no relay on a tap");
        let other_server = request(
            Kind::Request,
            Ipv4Addr::UNSPECIFIED,
            &[(REQUESTED_IP, &ours), (SERVER_ID, &[198, 18, 0, 9])],
        );
        assert_eq!(decide(&parse(&other_server).unwrap(), &lease), None);
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason_and_never_panic() {
        let good = request(Kind::Discover, Ipv4Addr::UNSPECIFIED, &[]);
        for cut in 0..good.len() {
            let _ = parse(&good[..cut]);
        }
        let mut no_type = good.clone();
        let at = ETH + 20 + 8 + BOOTP + 4;
        no_type[at] = PAD;
        no_type[at + 1] = PAD;
        no_type[at + 2] = PAD;
        assert_eq!(parse(&no_type), Err("no DHCP message type"));
        let mut long_option = good.clone();
        long_option[at + 1] = 200;
        assert_eq!(parse(&long_option), Err("an option cut short"));
        let mut cookie = good;
        cookie[at - 1] = 0;
        assert_eq!(parse(&cookie), Err("no DHCP magic cookie"));
    }
}
