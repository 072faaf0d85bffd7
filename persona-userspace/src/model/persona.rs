use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::FieldError;

/// A complete network identity. Only what the datapath enforces today is here; VPN and
/// TLS settings arrive with the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PersonaSpec {
    /// The addresses the network sees, with their prefix: at most one per family, held
    /// by one device at a time.
    #[serde(default)]
    pub addresses: Vec<IpNet>,
    /// Instead of an address, a pool per family: each device on the persona leases its
    /// own address from it for as long as it stays.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub address_pool: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Resolvers the VM's DNS queries are redirected to: the first of each family.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
    #[serde(default)]
    pub firewall: FirewallSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpn: Option<super::vpn::VpnSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::TlsSpec>,
    /// Rates its traffic is paced to, and how what the VM sends is marked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<super::qos::QosSpec>,
    /// What a shift to this persona does to open flows, unless the rule or the call
    /// that shifts says otherwise; `keep` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<super::FlowMode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FirewallSpec {
    /// Traffic leaving the VM; matched on the destination.
    #[serde(default = "DirectionSpec::allow_all")]
    pub egress: DirectionSpec,
    /// Traffic to the VM; matched on the source. Replies of allowed flows need no rule.
    #[serde(default = "DirectionSpec::drop_all")]
    pub ingress: DirectionSpec,
}

impl Default for FirewallSpec {
    fn default() -> Self {
        Self {
            egress: DirectionSpec::allow_all(),
            ingress: DirectionSpec::drop_all(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DirectionSpec {
    pub default: Action,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

impl DirectionSpec {
    pub fn allow_all() -> Self {
        Self {
            default: Action::Allow,
            rules: Vec::new(),
        }
    }
    pub fn drop_all() -> Self {
        Self {
            default: Action::Drop,
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    pub cidr: IpNet,
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination ports, "80" or "8000-8080"; only for tcp, udp or any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Drop,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Any => 0,
            Protocol::Tcp => persona_common::PROTO_TCP,
            Protocol::Udp => persona_common::PROTO_UDP,
            Protocol::Icmp => persona_common::PROTO_ICMP,
            Protocol::Icmpv6 => persona_common::PROTO_ICMPV6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u32>() {
                Ok(n @ 1..=65535) => Ok(n as u16),
                Ok(n) => Err(format!("{n} is not a port")),
                Err(_) => Err(format!("{:?} is not a port", p.trim())),
            }
        };
        let (lo, hi) = match s.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("range {lo}-{hi} is empty"));
        }
        Ok(PortRange { lo, hi })
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(i64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Num(n) => n.to_string(),
            Raw::Text(s) => s,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl PersonaSpec {
    pub fn address_v4(&self) -> Option<IpNet> {
        self.addresses.iter().copied().find(|a| a.addr().is_ipv4())
    }
    pub fn address_v6(&self) -> Option<IpNet> {
        self.addresses.iter().copied().find(|a| a.addr().is_ipv6())
    }

    /// The persona's addresses and pools: what its traffic may come from.
    pub fn prefixes(&self) -> impl Iterator<Item = &IpNet> {
        self.addresses.iter().chain(&self.address_pool)
    }

    /// The persona as one device runs it: its pools replaced by the device's leases.
    pub fn leased(&self, leases: &[IpNet]) -> PersonaSpec {
        let mut spec = self.clone();
        spec.addresses.extend_from_slice(leases);
        spec.address_pool.clear();
        spec
    }

    /// Why this persona and `other` cannot both exist: an address of one that the other
    /// has too or pools, or pools that overlap.
    pub fn clashes_with(&self, other: &PersonaSpec) -> Option<String> {
        let covers = |a: &IpNet, b: &IpNet| a.contains(&b.network()) || b.contains(&a.network());
        for a in &self.addresses {
            if other.addresses.iter().any(|b| a.addr() == b.addr()) {
                return Some(format!("{} is its address too", a.addr()));
            }
            if let Some(p) = other.address_pool.iter().find(|p| p.contains(&a.addr())) {
                return Some(format!("{} is in its pool {p}", a.addr()));
            }
        }
        for p in &self.address_pool {
            if let Some(b) = other.addresses.iter().find(|b| p.contains(&b.addr())) {
                return Some(format!("pool {p} holds its address {}", b.addr()));
            }
            if let Some(q) = other.address_pool.iter().find(|q| covers(p, q)) {
                return Some(format!("pool {p} overlaps its pool {q}"));
            }
        }
        None
    }

    /// Checks what the types cannot: every error names its field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.addresses.is_empty() && self.address_pool.is_empty() {
            return Err(FieldError::new(
                "spec.addresses",
                "at least one address (or an addressPool) is required",
            ));
        }
        for family_v4 in [true, false] {
            let n = self
                .prefixes()
                .filter(|a| a.addr().is_ipv4() == family_v4)
                .count();
            if n > 1 {
                let fam = if family_v4 { "IPv4" } else { "IPv6" };
                return Err(FieldError::new(
                    "spec.addresses",
                    format!(
                        "{n} {fam} addresses or pools given; a persona has at most one per family"
                    ),
                ));
            }
        }
        for (i, a) in self.addresses.iter().enumerate() {
            let ip = a.addr();
            if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                return Err(FieldError::new(
                    format!("spec.addresses[{i}]"),
                    format!("{ip} cannot be a host address"),
                ));
            }
        }
        for (i, p) in self.address_pool.iter().enumerate() {
            let ip = p.network();
            if p.addr() != ip {
                return Err(FieldError::new(
                    format!("spec.addressPool[{i}]"),
                    format!("{p} is not a network: write {}/{}", ip, p.prefix_len()),
                ));
            }
            if ip.is_multicast() || ip.is_loopback() || (ip.is_unspecified() && p.prefix_len() == 0)
            {
                return Err(FieldError::new(
                    format!("spec.addressPool[{i}]"),
                    format!("{p} cannot hold host addresses"),
                ));
            }
        }
        if let Some(gw) = self.gateway {
            let on_link = self.prefixes().any(|a| a.contains(&gw) && a.addr() != gw);
            if !on_link {
                return Err(FieldError::new(
                    "spec.gateway",
                    format!("{gw} is not inside any of the persona's prefixes"),
                ));
            }
        }
        for (i, d) in self.dns.iter().enumerate() {
            let family_has_address = self.prefixes().any(|a| a.addr().is_ipv4() == d.is_ipv4());
            if !family_has_address {
                return Err(FieldError::new(
                    format!("spec.dns[{i}]"),
                    format!("{d}: the persona has no address of this family to send queries from"),
                ));
            }
        }
        for (dir, spec) in [
            ("egress", &self.firewall.egress),
            ("ingress", &self.firewall.ingress),
        ] {
            for (i, rule) in spec.rules.iter().enumerate() {
                let field = format!("spec.firewall.{dir}.rules[{i}]");
                if rule.ports.is_some()
                    && !matches!(rule.protocol, Protocol::Any | Protocol::Tcp | Protocol::Udp)
                {
                    return Err(FieldError::new(
                        format!("{field}.ports"),
                        format!("{:?} has no ports", rule.protocol).to_lowercase(),
                    ));
                }
                let v4 = rule.cidr.addr().is_ipv4();
                if (rule.protocol == Protocol::Icmp && !v4)
                    || (rule.protocol == Protocol::Icmpv6 && v4)
                {
                    return Err(FieldError::new(
                        format!("{field}.protocol"),
                        format!(
                            "{:?} does not match the family of {}",
                            rule.protocol, rule.cidr
                        )
                        .to_lowercase(),
                    ));
                }
                if rule.cidr != rule.cidr.trunc() {
                    return Err(FieldError::new(
                        format!("{field}.cidr"),
                        format!(
                            "{} has host bits set; did you mean {}?",
                            rule.cidr,
                            rule.cidr.trunc()
                        ),
                    ));
                }
                let same = spec.rules[..i].iter().position(|r| {
                    r.cidr == rule.cidr && r.protocol == rule.protocol && r.ports == rule.ports
                });
                if let Some(earlier) = same {
                    let what = if spec.rules[earlier].action == rule.action {
                        "repeats"
                    } else {
                        "contradicts"
                    };
                    return Err(FieldError::new(
                        field.clone(),
                        format!("{what} rules[{earlier}] (same cidr, protocol and ports)"),
                    ));
                }
            }
        }
        if let Some(vpn) = &self.vpn {
            vpn.wireguard.validate()?;
        }
        if let Some(tls) = &self.tls {
            let addrs: Vec<IpAddr> = self.addresses.iter().map(|a| a.addr()).collect();
            super::tls::check_certificate(tls, &addrs, jiff::Timestamp::now())?;
        }
        if let Some(qos) = &self.qos {
            qos.compile()?;
            if self.vpn.is_some() && qos.egress_rate.is_some() {
                return Err(FieldError::new(
                    "spec.qos.egressRate",
                    "a VPN persona's traffic leaves through its tunnel, which does not carry the class the uplink shapes by; give the rate on the tunnel's way instead",
                ));
            }
        }
        Ok(())
    }

    /// Checks the files the persona refers to (keys): where the daemon runs.
    pub fn validate_secrets(&self, keys: &crate::keys::KeyDir) -> Result<(), FieldError> {
        if let Some(vpn) = &self.vpn {
            vpn.wireguard.key(keys)?;
        }
        if let Some(tls) = &self.tls {
            super::tls::check_key(tls, keys)?;
        }
        Ok(())
    }
}
