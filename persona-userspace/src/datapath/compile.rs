//! A persona spec turned into the exact rows the kernel tables will hold.
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use persona_common::{
    DIR_EGRESS, DIR_INGRESS,
    firewall::{ACTION_ALLOW, ACTION_DROP, MAX_RULES_PER_PREFIX, PortRule, RuleSet},
    persona::{PERSONA_DNS_V4, PERSONA_DNS_V6, PERSONA_HAS_V4, PERSONA_HAS_V6, PersonaTable},
};

use crate::model::{Action, DirectionSpec, FieldError, PersonaSpec, PortRange};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix<N> {
    pub direction: u8,
    pub net: N,
    pub rules: RuleSet,
}

/// A persona's firewall prefixes, in one canonical order (direction, then network), so
/// that equal firewalls compare and fingerprint equal however their rules were written
/// or read back from the kernel. The datapath keeps one resident ruleset per distinct
/// firewall.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Firewall {
    pub v4: Vec<Prefix<Ipv4Net>>,
    pub v6: Vec<Prefix<Ipv6Net>>,
    fingerprint: u64,
}

impl Firewall {
    pub fn new(mut v4: Vec<Prefix<Ipv4Net>>, mut v6: Vec<Prefix<Ipv6Net>>) -> Self {
        v4.sort_by_key(|p| (p.direction, p.net));
        v6.sort_by_key(|p| (p.direction, p.net));
        let mut h = std::hash::DefaultHasher::new();
        for p in &v4 {
            (p.direction, p.net).hash(&mut h);
            hash_rules(&p.rules, &mut h);
        }
        for p in &v6 {
            (p.direction, p.net).hash(&mut h);
            hash_rules(&p.rules, &mut h);
        }
        Self {
            v4,
            v6,
            fingerprint: h.finish(),
        }
    }

    /// Equal firewalls have equal fingerprints; a match is confirmed by comparing them.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

fn hash_rules(set: &RuleSet, h: &mut impl Hasher) {
    set.count.hash(h);
    for r in set.rules.iter().take(set.count as usize) {
        (r.proto, r.action, r.port_lo, r.port_hi).hash(h);
    }
}

/// Everything a shift writes for one persona. `table.generation` and `table.ct_floor`
/// are filled in by the shift itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPersona {
    /// The control plane's id for the persona (0 until it gives one); the datapath
    /// counts the packets it handles under it.
    pub id: u32,
    pub table: PersonaTable,
    /// Next hops on the host: the persona's traffic leaves through these.
    pub gateways: Vec<IpAddr>,
    /// The persona's WireGuard peer: what its allowed IPs name goes through the tunnel.
    pub vpn: Option<crate::model::vpn::WireguardSpec>,
    /// Shared: a compiled persona is cloned into every shift to it.
    pub firewall: Arc<Firewall>,
    pub qos: persona_common::qos::Qos,
}

impl CompiledPersona {
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        if self.table.flags & PERSONA_HAS_V4 != 0 {
            out.push(IpAddr::V4(Ipv4Addr::from(self.table.addr_v4)));
        }
        if self.table.flags & PERSONA_HAS_V6 != 0 {
            out.push(IpAddr::V6(Ipv6Addr::from(self.table.addr_v6)));
        }
        out
    }

    pub fn prefix_count(&self) -> usize {
        self.firewall.len()
    }
}

fn action(a: Action) -> u8 {
    match a {
        Action::Allow => ACTION_ALLOW,
        Action::Drop => ACTION_DROP,
    }
}

pub fn compile(spec: &PersonaSpec) -> Result<CompiledPersona, FieldError> {
    spec.validate()?;
    let mut table = PersonaTable::default();
    if let Some(IpAddr::V4(a)) = spec.address_v4().map(|n| n.addr()) {
        table.addr_v4 = a.octets();
        table.flags |= PERSONA_HAS_V4;
    }
    if let Some(IpAddr::V6(a)) = spec.address_v6().map(|n| n.addr()) {
        table.addr_v6 = a.octets();
        table.flags |= PERSONA_HAS_V6;
    }
    if let Some(IpAddr::V4(d)) = spec.dns.iter().find(|d| d.is_ipv4()) {
        table.dns_v4 = d.octets();
        table.flags |= PERSONA_DNS_V4;
    }
    if let Some(IpAddr::V6(d)) = spec.dns.iter().find(|d| d.is_ipv6()) {
        table.dns_v6 = d.octets();
        table.flags |= PERSONA_DNS_V6;
    }
    let fw = &spec.firewall;
    table.default_action[DIR_EGRESS as usize] = action(fw.egress.default);
    table.default_action[DIR_INGRESS as usize] = action(fw.ingress.default);

    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for (direction, name, dir) in [
        (DIR_EGRESS, "egress", &fw.egress),
        (DIR_INGRESS, "ingress", &fw.ingress),
    ] {
        for (net, rules) in fold(dir, name)? {
            match net {
                IpNet::V4(net) => v4.push(Prefix {
                    direction,
                    net,
                    rules,
                }),
                IpNet::V6(net) => v6.push(Prefix {
                    direction,
                    net,
                    rules,
                }),
            }
        }
    }
    Ok(CompiledPersona {
        id: 0,
        table,
        gateways: spec.gateway.into_iter().collect(),
        vpn: spec.vpn.as_ref().map(|v| v.wireguard.clone()),
        firewall: Arc::new(Firewall::new(v4, v6)),
        qos: spec
            .qos
            .as_ref()
            .map(|q| q.compile())
            .transpose()?
            .unwrap_or_default(),
    })
}

/// For every prefix named by a rule, the rules that apply to an address whose longest
/// match is that prefix: its own, then those of each wider prefix, in written order.
fn fold(dir: &DirectionSpec, name: &str) -> Result<Vec<(IpNet, RuleSet)>, FieldError> {
    let mut by_net: HashMap<IpNet, Vec<PortRule>> = HashMap::new();
    let mut order = Vec::new();
    for r in &dir.rules {
        let ports = r.ports.unwrap_or(PortRange::ALL);
        let rule = PortRule {
            proto: r.protocol.number(),
            action: action(r.action),
            _pad: [0; 2],
            port_lo: ports.lo,
            port_hi: ports.hi,
        };
        let net = r.cidr.trunc();
        by_net
            .entry(net)
            .or_insert_with(|| {
                order.push(net);
                Vec::new()
            })
            .push(rule);
    }
    let mut out = Vec::with_capacity(order.len());
    for net in order {
        let mut rules: Vec<PortRule> = Vec::new();
        let mut cur = Some(net);
        while let Some(n) = cur {
            if let Some(own) = by_net.get(&n) {
                rules.extend(own);
            }
            cur = n.supernet();
        }
        if rules.len() > MAX_RULES_PER_PREFIX {
            return Err(FieldError::new(
                format!("spec.firewall.{name}.rules"),
                format!(
                    "{} rules apply to {net} (its own and those of wider prefixes); the datapath holds at most {MAX_RULES_PER_PREFIX}",
                    rules.len()
                ),
            ));
        }
        let mut set = RuleSet {
            count: rules.len() as u32,
            ..Default::default()
        };
        set.rules[..rules.len()].copy_from_slice(&rules);
        out.push((net, set));
    }
    Ok(out)
}
