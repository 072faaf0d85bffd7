//! Applications the datapath can recognise in a device's flows, by protocol, remote
//! port and remote prefix.
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    datapath::FlowInfo,
    model::{FieldError, PortRange, Protocol},
};

/// `kind: Application`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplicationSpec {
    #[serde(default)]
    pub protocol: Protocol,
    /// Remote ports; any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    /// Remote prefixes; any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<IpNet>,
}

impl ApplicationSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.ports.is_empty() && self.cidrs.is_empty() {
            return Err(FieldError::new(
                "spec",
                "give ports or cidrs: an application that matches every flow says nothing",
            ));
        }
        if !self.ports.is_empty()
            && !matches!(self.protocol, Protocol::Any | Protocol::Tcp | Protocol::Udp)
        {
            return Err(FieldError::new(
                "spec.ports",
                format!("{:?} has no ports", self.protocol).to_lowercase(),
            ));
        }
        Ok(())
    }

    pub fn matches(&self, f: &FlowInfo) -> bool {
        let proto = self.protocol == Protocol::Any || self.protocol.number() == f.proto;
        let port = self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|p| p.lo <= f.remote_port && f.remote_port <= p.hi);
        let cidr = self.cidrs.is_empty() || self.cidrs.iter().any(|c| c.contains(&f.remote));
        proto && port && cidr
    }
}
