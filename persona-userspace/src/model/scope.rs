//! A set of addresses as disjoint ranges: what a persona may take (its fixed addresses
//! and its pools), looked up in indexes ordered by address instead of tested against
//! every address held.
use std::{collections::BTreeMap, net::IpAddr, ops::RangeInclusive};

use ipnet::IpNet;

use super::PersonaSpec;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressScope {
    /// Sorted, none overlapping another.
    ranges: Vec<RangeInclusive<IpAddr>>,
}

impl AddressScope {
    pub fn new(ranges: impl IntoIterator<Item = RangeInclusive<IpAddr>>) -> Self {
        let mut sorted: Vec<_> = ranges.into_iter().filter(|r| !r.is_empty()).collect();
        sorted.sort_by_key(|r| *r.start());
        let mut ranges: Vec<RangeInclusive<IpAddr>> = Vec::with_capacity(sorted.len());
        for r in sorted {
            match ranges.last_mut() {
                Some(last) if r.start() <= last.end() => {
                    if r.end() > last.end() {
                        *last = *last.start()..=*r.end();
                    }
                }
                _ => ranges.push(r),
            }
        }
        Self { ranges }
    }

    /// The persona's fixed addresses and every address of its pools.
    pub fn of(spec: &PersonaSpec) -> Self {
        let fixed = spec.addresses.iter().map(|a| a.addr()..=a.addr());
        let pools = spec.address_pool.iter().map(span);
        Self::new(fixed.chain(pools))
    }

    /// Every address of a prefix, network and broadcast included.
    pub fn of_net(net: &IpNet) -> Self {
        Self::new([span(net)])
    }

    /// Whether any address is in both.
    pub fn overlaps(&self, other: &AddressScope) -> bool {
        other.ranges.iter().any(|r| {
            let i = self.ranges.partition_point(|s| s.end() < r.start());
            self.ranges.get(i).is_some_and(|s| s.start() <= r.end())
        })
    }

    pub fn contains(&self, a: &IpAddr) -> bool {
        let i = self.ranges.partition_point(|r| r.end() < a);
        self.ranges.get(i).is_some_and(|r| r.contains(a))
    }

    pub fn ranges(&self) -> &[RangeInclusive<IpAddr>] {
        &self.ranges
    }

    /// The entries of `index` whose address is in the scope, in address order.
    pub fn within<'a, V>(
        &'a self,
        index: &'a BTreeMap<IpAddr, V>,
    ) -> impl Iterator<Item = (&'a IpAddr, &'a V)> + 'a {
        self.ranges.iter().flat_map(|r| index.range(r.clone()))
    }
}

/// Every address of a prefix, network and broadcast included.
fn span(net: &IpNet) -> RangeInclusive<IpAddr> {
    match net {
        IpNet::V4(n) => IpAddr::V4(n.network())..=IpAddr::V4(n.broadcast()),
        IpNet::V6(n) => IpAddr::V6(n.network())..=IpAddr::V6(n.broadcast()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> PersonaSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_scope_holds_the_fixed_addresses_and_the_pools_and_nothing_else() {
        let s = AddressScope::of(&spec(
            "addresses: [203.0.113.10/24, \"2001:db8::10/64\"]\naddressPool: [198.51.100.0/30, 198.51.100.2/31, \"2001:db8:1::/126\"]\n",
        ));
        for a in [
            "203.0.113.10",
            "2001:db8::10",
            "198.51.100.0",
            "198.51.100.3",
            "2001:db8:1::3",
        ] {
            assert!(s.contains(&ip(a)), "{a}");
        }
        for a in [
            "203.0.113.11",
            "203.0.113.9",
            "198.51.100.4",
            "2001:db8::11",
            "2001:db8:1::4",
            "0.0.0.0",
        ] {
            assert!(!s.contains(&ip(a)), "{a}");
        }
        // The overlapping pools are one range: nothing is found twice.
        assert_eq!(s.ranges().len(), 4);
        let index: BTreeMap<IpAddr, &str> = [
            ("198.51.100.1", "a"),
            ("198.51.100.9", "b"),
            ("203.0.113.10", "c"),
            ("2001:db8:1::2", "d"),
            ("10.0.0.1", "e"),
        ]
        .into_iter()
        .map(|(a, v)| (ip(a), v))
        .collect();
        let found: Vec<&str> = s.within(&index).map(|(_, v)| *v).collect();
        assert_eq!(found, ["a", "c", "d"]);
        let net = |n: &str| AddressScope::of_net(&n.parse().unwrap());
        assert!(s.overlaps(&net("198.51.100.0/24")));
        assert!(s.overlaps(&net("203.0.113.10/32")));
        assert!(net("198.51.100.3/32").overlaps(&s));
        assert!(!s.overlaps(&net("198.51.100.4/30")));
        assert!(!s.overlaps(&net("203.0.113.0/29")));
    }

    #[test]
    fn an_empty_persona_has_an_empty_scope() {
        let s = AddressScope::of(&spec("{}"));
        assert!(s.ranges().is_empty());
        assert!(!s.contains(&ip("203.0.113.10")));
    }
}
