//! What each attached device holds, kept by the process that alone writes the maps:
//! its persona's addresses and `DRAINS` as written, each also by address, so that a
//! shift's lease check reads those in its scope without a job, a syscall, or a walk
//! over every device. A flip adds the new addresses to the old until the commit has
//! put the old ones draining, so no reader ever sees an address of a shifting device
//! as free.
use std::{collections::BTreeMap, net::IpAddr, sync::RwLock};

use super::flows::Drains;
use crate::{
    datapath::{DrainInfo, HeldAddresses},
    model::AddressScope,
    multimap::MultiMap,
};

type ByAddress = MultiMap<IpAddr, u32>;

#[derive(Default)]
pub(in crate::datapath) struct Held {
    hosts: BTreeMap<u32, Vec<IpAddr>>,
    active: ByAddress,
    drains: Drains,
    draining: ByAddress,
}

impl Held {
    pub fn new(hosts: BTreeMap<u32, Vec<IpAddr>>, drains: Drains) -> Self {
        let mut held = Self::default();
        for (ifindex, addrs) in hosts {
            held.set(ifindex, addrs);
        }
        for ((ifindex, addr), d) in drains {
            held.put_drain(ifindex, addr, d);
        }
        held
    }

    /// Attached, holding nothing yet.
    pub fn attach(&mut self, ifindex: u32) {
        self.hosts.entry(ifindex).or_default();
    }

    /// Detached: its active addresses go; its drains go with its `DRAINS` entries.
    pub fn detach(&mut self, ifindex: u32) {
        self.set(ifindex, Vec::new());
        self.hosts.remove(&ifindex);
    }

    /// The device's active addresses are `addrs` from now on.
    pub fn set(&mut self, ifindex: u32, addrs: Vec<IpAddr>) {
        for a in self.hosts.remove(&ifindex).unwrap_or_default() {
            self.active.remove(&a, &ifindex);
        }
        for &a in &addrs {
            self.active.insert(a, ifindex);
        }
        self.hosts.insert(ifindex, addrs);
    }

    /// The device holds `addrs` as well as what it held.
    pub fn add(&mut self, ifindex: u32, addrs: impl IntoIterator<Item = IpAddr>) {
        let now = self.hosts.entry(ifindex).or_default();
        for a in addrs {
            if !now.contains(&a) {
                now.push(a);
                self.active.insert(a, ifindex);
            }
        }
    }

    pub fn drains(&self) -> &Drains {
        &self.drains
    }

    pub fn put_drain(&mut self, ifindex: u32, addr: IpAddr, drain: DrainInfo) {
        self.draining.insert(addr, ifindex);
        self.drains.insert((ifindex, addr), drain);
    }

    pub fn drop_drain(&mut self, ifindex: u32, addr: IpAddr) -> Option<DrainInfo> {
        let d = self.drains.remove(&(ifindex, addr))?;
        self.draining.remove(&addr, &ifindex);
        Some(d)
    }

    /// Every attached device but `except` holding an address in `scope`, with those
    /// addresses.
    pub fn within(&self, except: Option<u32>, scope: &AddressScope) -> Vec<HeldAddresses> {
        let mut held: BTreeMap<u32, HeldAddresses> = BTreeMap::new();
        for (i, a) in found(&self.active, scope, except) {
            held.entry(i).or_insert_with(|| empty(i)).active.push(a);
        }
        for (i, a) in found(&self.draining, scope, except) {
            held.entry(i).or_insert_with(|| empty(i)).draining.push(a);
        }
        held.into_values().collect()
    }
}

/// Each (device, address) of `by` in `scope`, but those of `except`.
fn found<'a>(
    by: &'a ByAddress,
    scope: &'a AddressScope,
    except: Option<u32>,
) -> impl Iterator<Item = (u32, IpAddr)> + 'a {
    scope.within(by.as_map()).flat_map(move |(a, set)| {
        set.iter()
            .filter(move |&&i| Some(i) != except)
            .map(move |&i| (i, *a))
    })
}

fn empty(ifindex: u32) -> HeldAddresses {
    HeldAddresses {
        ifindex,
        active: Vec::new(),
        draining: Vec::new(),
    }
}

pub(super) fn read(held: &RwLock<Held>) -> std::sync::RwLockReadGuard<'_, Held> {
    held.read().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn write(held: &RwLock<Held>) -> std::sync::RwLockWriteGuard<'_, Held> {
    held.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn drain(addr: &str) -> DrainInfo {
        DrainInfo {
            addr: ip(addr),
            persona: 1,
            generation: 1,
        }
    }

    /// (ifindex, active, draining) of each device found.
    fn found(held: &Held, except: Option<u32>, net: &str) -> Vec<(u32, Vec<IpAddr>, Vec<IpAddr>)> {
        let scope = AddressScope::of_net(&net.parse().unwrap());
        held.within(except, &scope)
            .into_iter()
            .map(|h| (h.ifindex, h.active, h.draining))
            .collect()
    }

    #[test]
    fn what_a_device_holds_is_found_by_address_until_it_lets_go() {
        let mut held = Held::new(
            [(7, vec![ip("203.0.113.10")])].into(),
            [((7, ip("203.0.113.9")), drain("203.0.113.9"))].into(),
        );
        held.attach(8);
        held.set(8, vec![ip("203.0.113.20"), ip("198.51.100.1")]);
        assert_eq!(
            found(&held, None, "203.0.113.0/24"),
            [
                (7, vec![ip("203.0.113.10")], vec![ip("203.0.113.9")]),
                (8, vec![ip("203.0.113.20")], vec![]),
            ]
        );
        assert_eq!(found(&held, Some(7), "203.0.113.8/29").len(), 0);
        assert_eq!(found(&held, None, "192.0.2.0/24").len(), 0);

        // A flip adds, the commit sets what stays and drains the rest.
        held.add(7, [ip("203.0.113.11"), ip("203.0.113.10")]);
        assert_eq!(
            found(&held, None, "203.0.113.8/29")[0].1,
            [ip("203.0.113.10"), ip("203.0.113.11")]
        );
        held.set(7, vec![ip("203.0.113.11")]);
        held.put_drain(7, ip("203.0.113.10"), drain("203.0.113.10"));
        assert_eq!(
            found(&held, None, "203.0.113.8/29"),
            [(
                7,
                vec![ip("203.0.113.11")],
                vec![ip("203.0.113.9"), ip("203.0.113.10")]
            )]
        );
        assert!(held.drop_drain(7, ip("203.0.113.9")).is_some());
        assert!(held.drop_drain(7, ip("203.0.113.9")).is_none());
        held.detach(8);
        held.drop_drain(7, ip("203.0.113.10"));
        held.detach(7);
        assert_eq!(found(&held, None, "0.0.0.0/0").len(), 0);
        assert!(held.active.is_empty() && held.draining.is_empty());
    }
}
