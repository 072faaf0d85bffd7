//! IPv6 for a VM's inner configuration, answered on its tap: router advertisements
//! (the VM's gateway as its router, its /64 on-link, addresses managed) and DHCPv6
//! (RFC 8415) giving it `innerV6` exactly, as OVN answers both natively. SLAAC would
//! give the VM an address of its own making, which the datapath drops as spoofed.
use std::net::Ipv6Addr;

use crate::datapath::reset::{fold, sum16};

const ETH: usize = 14;
const IP6: usize = 40;
const UDP: usize = 8;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const ROUTER_SOLICIT: u8 = 133;
const ROUTER_ADVERT: u8 = 134;

const SOLICIT: u8 = 1;
const ADVERTISE: u8 = 2;
const REQUEST: u8 = 3;
const CONFIRM: u8 = 4;
const RENEW: u8 = 5;
const REBIND: u8 = 6;
const REPLY: u8 = 7;
const RELEASE: u8 = 8;
const DECLINE: u8 = 9;
const INFORMATION_REQUEST: u8 = 11;

const OPT_CLIENT_ID: u16 = 1;
const OPT_SERVER_ID: u16 = 2;
const OPT_IA_NA: u16 = 3;
const OPT_IAADDR: u16 = 5;
const OPT_STATUS: u16 = 13;
const OPT_RAPID_COMMIT: u16 = 14;
const OPT_DNS: u16 = 23;
const STATUS_NOT_ON_LINK: u16 = 4;

/// Seconds a router advertisement makes the VM's default route last; sent again well
/// before (see [`ADVERTISE_EVERY`]).
const ROUTER_LIFETIME: u16 = 1800;
pub const ADVERTISE_EVERY: std::time::Duration = std::time::Duration::from_secs(200);

/// What a device's IPv6 answers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease6 {
    pub address: Ipv6Addr,
    /// The link-local address the answers come from, which the VM routes by.
    pub router: Ipv6Addr,
    pub server_mac: [u8; 6],
    pub mtu: u16,
    pub seconds: u32,
    pub dns: Option<Ipv6Addr>,
}

/// What a VM asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub mac: [u8; 6],
    pub from: Ipv6Addr,
    pub what: Question,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Question {
    Router,
    Dhcp(Dhcp6),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dhcp6 {
    pub kind: u8,
    pub xid: [u8; 3],
    pub client_id: Option<Vec<u8>>,
    pub server_id: Option<Vec<u8>>,
    pub iaid: Option<[u8; 4]>,
    pub addresses: Vec<Ipv6Addr>,
    pub rapid_commit: bool,
}

impl Asked {
    pub fn label(&self) -> &'static str {
        match &self.what {
            Question::Router => "router-solicit",
            Question::Dhcp(d) => match d.kind {
                SOLICIT => "solicit",
                REQUEST => "request6",
                CONFIRM => "confirm",
                RENEW => "renew",
                REBIND => "rebind",
                RELEASE => "release6",
                DECLINE => "decline6",
                INFORMATION_REQUEST => "information-request",
                _ => "other6",
            },
        }
    }
}

/// The 16-bit-length options of a DHCPv6 message.
fn options(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let code = u16::from_be_bytes([*b.first()?, *b.get(1)?]);
        let len = usize::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?]));
        let value = b.get(4..4 + len)?;
        b = &b[4 + len..];
        Some((code, value))
    })
}

pub fn parse(frame: &[u8]) -> Result<Asked, &'static str> {
    let ip = frame.get(ETH..ETH + IP6).ok_or("short IPv6 header")?;
    if frame[12..14] != [0x86, 0xdd] || ip[0] >> 4 != 6 {
        return Err("not IPv6");
    }
    let mac: [u8; 6] = frame[6..12].try_into().expect("six bytes");
    let from = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).expect("16 bytes"));
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let payload = frame
        .get(ETH + IP6..ETH + IP6 + payload_len)
        .ok_or("payload cut short")?;
    match ip[6] {
        PROTO_ICMPV6 if payload.first() == Some(&ROUTER_SOLICIT) => {
            // RFC 4861 6.1.1: only from the link itself.
            (ip[7] == 255).then_some(()).ok_or("hop limit not 255")?;
            Ok(Asked {
                mac,
                from,
                what: Question::Router,
            })
        }
        PROTO_UDP => {
            let m = payload.get(UDP..).filter(|m| m.len() >= 4).ok_or("short")?;
            let mut d = Dhcp6 {
                kind: m[0],
                xid: [m[1], m[2], m[3]],
                client_id: None,
                server_id: None,
                iaid: None,
                addresses: Vec::new(),
                rapid_commit: false,
            };
            for (code, value) in options(&m[4..]) {
                match code {
                    OPT_CLIENT_ID => d.client_id = Some(value.to_vec()),
                    OPT_SERVER_ID => d.server_id = Some(value.to_vec()),
                    OPT_RAPID_COMMIT => d.rapid_commit = true,
                    OPT_IA_NA if d.iaid.is_none() && value.len() >= 12 => {
                        d.iaid = Some(value[..4].try_into().expect("four bytes"));
                        for (sub, v) in options(&value[12..]) {
                            if sub == OPT_IAADDR && v.len() >= 16 {
                                let a: [u8; 16] = v[..16].try_into().expect("16 bytes");
                                d.addresses.push(Ipv6Addr::from(a));
                            }
                        }
                    }
                    _ => {}
                }
            }
            Ok(Asked {
                mac,
                from,
                what: Question::Dhcp(d),
            })
        }
        _ => Err("neither a router solicitation nor DHCPv6"),
    }
}

/// DUID-LL (type 3, Ethernet) of the tap.
fn server_id(mac: [u8; 6]) -> Vec<u8> {
    let mut id = vec![0, 3, 0, 1];
    id.extend_from_slice(&mac);
    id
}

fn put(b: &mut Vec<u8>, code: u16, value: &[u8]) {
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(value.len() as u16).to_be_bytes());
    b.extend_from_slice(value);
}

/// The answer to what the VM asked, its label, and the frame; `None` when it goes
/// unanswered (another server's, or a message a server never answers).
pub fn answer(asked: &Asked, lease: &Lease6) -> Option<(&'static str, Vec<u8>)> {
    let d = match &asked.what {
        Question::Router => {
            return Some(("advertisement", advertisement(lease, asked.mac, asked.from)));
        }
        Question::Dhcp(d) => d,
    };
    let ours = server_id(lease.server_mac);
    let for_us = d.server_id.as_ref().is_none_or(|s| *s == ours);
    let needs_server_id = matches!(d.kind, REQUEST | RENEW | RELEASE | DECLINE);
    if !for_us || (needs_server_id && d.server_id.is_none()) {
        return None;
    }
    let (kind, label) = match d.kind {
        SOLICIT if d.rapid_commit => (REPLY, "reply"),
        SOLICIT => (ADVERTISE, "advertise"),
        REQUEST | RENEW | REBIND | CONFIRM | RELEASE | DECLINE | INFORMATION_REQUEST => {
            (REPLY, "reply")
        }
        _ => return None,
    };
    let mut m = vec![kind, d.xid[0], d.xid[1], d.xid[2]];
    if let Some(c) = &d.client_id {
        put(&mut m, OPT_CLIENT_ID, c);
    }
    put(&mut m, OPT_SERVER_ID, &ours);
    if kind == REPLY && d.kind == SOLICIT {
        put(&mut m, OPT_RAPID_COMMIT, &[]);
    }
    match d.kind {
        CONFIRM if d.addresses.iter().any(|a| *a != lease.address) => {
            put(&mut m, OPT_STATUS, &STATUS_NOT_ON_LINK.to_be_bytes());
        }
        SOLICIT | REQUEST | RENEW | REBIND => {
            if let Some(iaid) = d.iaid {
                let mut ia = iaid.to_vec();
                ia.extend_from_slice(&(lease.seconds / 2).to_be_bytes());
                ia.extend_from_slice(&(lease.seconds / 5 * 4).to_be_bytes());
                let mut addr = lease.address.octets().to_vec();
                addr.extend_from_slice(&lease.seconds.to_be_bytes());
                addr.extend_from_slice(&lease.seconds.to_be_bytes());
                put(&mut ia, OPT_IAADDR, &addr);
                put(&mut m, OPT_IA_NA, &ia);
            }
        }
        _ => {}
    }
    if let Some(dns) = lease.dns {
        put(&mut m, OPT_DNS, &dns.octets());
    }
    let mut udp = Vec::with_capacity(UDP + m.len());
    udp.extend_from_slice(&547u16.to_be_bytes());
    udp.extend_from_slice(&546u16.to_be_bytes());
    udp.extend_from_slice(&((UDP + m.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&m);
    Some((
        label,
        frame(lease, asked.mac, asked.from, PROTO_UDP, 64, udp),
    ))
}

/// A router advertisement to `dst` (`ff02::1` for every node of the link).
pub fn advertisement(lease: &Lease6, dst_mac: [u8; 6], dst: Ipv6Addr) -> Vec<u8> {
    let mut ra = vec![ROUTER_ADVERT, 0, 0, 0, 64, 0xc0];
    ra.extend_from_slice(&ROUTER_LIFETIME.to_be_bytes());
    ra.extend_from_slice(&[0; 8]);
    ra.extend_from_slice(&[1, 1]);
    ra.extend_from_slice(&lease.server_mac);
    ra.extend_from_slice(&[5, 1, 0, 0]);
    ra.extend_from_slice(&u32::from(lease.mtu).to_be_bytes());
    // On-link, not for autoconfiguration: addresses come by DHCPv6.
    ra.extend_from_slice(&[3, 4, 64, 0x80]);
    ra.extend_from_slice(&lease.seconds.to_be_bytes());
    ra.extend_from_slice(&lease.seconds.to_be_bytes());
    ra.extend_from_slice(&[0; 4]);
    let mut prefix = lease.address.octets();
    prefix[8..].fill(0);
    ra.extend_from_slice(&prefix);
    frame(lease, dst_mac, dst, PROTO_ICMPV6, 255, ra)
}

/// Every node of the link, and its Ethernet group.
pub const ALL_NODES: (Ipv6Addr, [u8; 6]) = (
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
    [0x33, 0x33, 0, 0, 0, 1],
);

/// The Ethernet frame of `payload` (UDP or ICMPv6, its checksum zero) from the router.
fn frame(
    lease: &Lease6,
    dst_mac: [u8; 6],
    dst: Ipv6Addr,
    proto: u8,
    hops: u8,
    mut payload: Vec<u8>,
) -> Vec<u8> {
    let src = lease.router.octets();
    let len = payload.len() as u32;
    let pseudo = sum16(&src) + sum16(&dst.octets()) + len + u32::from(proto);
    // Zero is no checksum, which UDP over IPv6 may not send: all ones says zero.
    let check = match fold(pseudo + sum16(&payload)) {
        0 => 0xffff,
        c => c,
    };
    let at = if proto == PROTO_UDP { 6 } else { 2 };
    payload[at..at + 2].copy_from_slice(&check.to_be_bytes());
    let mut f = Vec::with_capacity(ETH + IP6 + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&lease.server_mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[proto, hops]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    const TAP: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    fn lease() -> Lease6 {
        Lease6 {
            address: "2001:db8:1::2".parse().unwrap(),
            router: "fe80::1".parse().unwrap(),
            server_mac: TAP,
            mtu: 1500,
            seconds: 3600,
            dns: None,
        }
    }

    /// A client's DHCPv6 message as a frame, with its options.
    fn message(kind: u8, opts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut m = vec![kind, 1, 2, 3];
        for (code, v) in opts {
            put(&mut m, *code, v);
        }
        let mut udp = vec![2, 0x22, 2, 0x23];
        udp.extend_from_slice(&((UDP + m.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&m);
        let mut f = vec![0x33, 0x33, 0, 1, 0, 2];
        f.extend_from_slice(&CLIENT);
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[PROTO_UDP, 1]);
        f.extend_from_slice(&"fe80::5054:ff:fe00:2".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&"ff02::1:2".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&udp);
        f
    }

    fn ia_na() -> (u16, Vec<u8>) {
        (OPT_IA_NA, vec![0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0])
    }

    #[test]
    fn a_solicit_is_advertised_the_inner_address_and_a_request_for_another_server_is_not_answered()
    {
        let asked = parse(&message(
            SOLICIT,
            &[(OPT_CLIENT_ID, vec![0, 3, 0, 1, 1, 2, 3, 4, 5, 6]), ia_na()],
        ))
        .unwrap();
        assert_eq!(asked.label(), "solicit");
        let (label, frame) = answer(&asked, &lease()).unwrap();
        assert_eq!(label, "advertise");
        let reply = &frame[ETH + IP6 + UDP..];
        assert_eq!(reply[..4], [ADVERTISE, 1, 2, 3]);
        let ia = options(&reply[4..])
            .find(|(c, _)| *c == OPT_IA_NA)
            .map(|(_, v)| v.to_vec())
            .unwrap();
        assert_eq!(ia[..4], [0, 0, 0, 9], "the client's IAID");
        let (_, addr) = options(&ia[12..]).next().unwrap();
        assert_eq!(addr[..16], lease().address.octets());

        let elsewhere = parse(&message(
            REQUEST,
            &[(OPT_SERVER_ID, vec![0, 3, 0, 1, 9, 9, 9, 9, 9, 9]), ia_na()],
        ))
        .unwrap();
        assert_eq!(answer(&elsewhere, &lease()), None);
        let without = parse(&message(RENEW, &[ia_na()])).unwrap();
        assert_eq!(
            answer(&without, &lease()),
            None,
            "a renewal names its server"
        );
    }
}
