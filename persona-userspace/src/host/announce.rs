//! Telling the network's neighbours that addresses now live behind this host, as a
//! hypervisor does for a VM that arrived by live migration: a gratuitous ARP for each
//! IPv4 address and an unsolicited neighbour advertisement (override set) for each IPv6
//! one, sent from the uplink's MAC. Neighbours update the entries they hold at once,
//! instead of waiting for them to go stale.
use std::{io, net::IpAddr};

use crate::datapath::reset::{fold, send, sum16};

const BROADCAST: [u8; 6] = [0xff; 6];
/// ff02::1 on the wire.
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const ALL_NODES: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Sends, out of `uplink` (named `name`), one announcement per address.
pub fn tell_neighbours(name: &str, uplink: u32, addrs: &[IpAddr]) -> io::Result<usize> {
    let mac = mac_of(name)?;
    let frames: Vec<Vec<u8>> = addrs
        .iter()
        .map(|a| match a {
            IpAddr::V4(v4) => gratuitous_arp(mac, v4.octets()),
            IpAddr::V6(v6) => unsolicited_na(mac, v6.octets()),
        })
        .collect();
    send(uplink, &frames)
}

/// The interface's Ethernet address, as this process's namespace has it (sysfs may
/// show another's). Asked of the one interface: a list of every interface would grow
/// with the taps, and this is asked at every shift.
pub(crate) fn mac_of(name: &str) -> io::Result<[u8; 6]> {
    crate::datapath::Names::new().mac(name)
}

/// An ARP request for `addr` from `addr`: every neighbour holding an entry for it
/// takes `mac`, however recently it learnt the old one.
pub fn gratuitous_arp(mac: [u8; 6], addr: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&addr);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&addr);
    f
}

/// A neighbour advertisement of `addr` at `mac` to all nodes, with override set and
/// solicited not.
pub fn unsolicited_na(mac: [u8; 6], addr: [u8; 16]) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[136, 0, 0, 0, 0x20, 0, 0, 0]);
    icmp.extend_from_slice(&addr);
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let pseudo = sum16(&addr) + sum16(&ALL_NODES) + icmp.len() as u32 + 58;
    let check = fold(pseudo + sum16(&icmp));
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&ALL_NODES_MAC);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&addr);
    f.extend_from_slice(&ALL_NODES);
    f.extend_from_slice(&icmp);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_asked_of_one_interface_is_the_one_the_full_list_shows() {
        assert!(
            mac_of("lo").is_err(),
            "the loopback has no Ethernet address"
        );
        assert!(mac_of("persona-none0").is_err());
        for a in nix::ifaddrs::getifaddrs().unwrap() {
            let Some(mac) = a.address.and_then(|l| l.as_link_addr()?.addr()) else {
                continue;
            };
            if mac != [0; 6] {
                assert_eq!(
                    mac_of(&a.interface_name).unwrap(),
                    mac,
                    "{}",
                    a.interface_name
                );
            }
        }
    }

    #[test]
    fn an_advertisement_sums_to_zero_with_its_pseudo_header() {
        let addr = "2001:db8:a::10"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let f = unsolicited_na([2, 0, 0, 0, 0, 1], addr);
        let icmp = &f[54..];
        let pseudo = sum16(&addr) + sum16(&ALL_NODES) + icmp.len() as u32 + 58;
        assert_eq!(fold(pseudo + sum16(icmp)), 0);
        assert_eq!((f[20], f[21]), (58, 255), "ICMPv6, hop limit 255");
    }

    #[test]
    fn a_gratuitous_arp_names_the_address_as_sender_and_target() {
        let f = gratuitous_arp([2, 0, 0, 0, 0, 1], [203, 0, 113, 10]);
        assert_eq!(f.len(), 42);
        assert_eq!(&f[28..32], &[203, 0, 113, 10]);
        assert_eq!(&f[38..42], &[203, 0, 113, 10]);
        assert_eq!(&f[22..28], &[2, 0, 0, 0, 0, 1]);
    }
}
