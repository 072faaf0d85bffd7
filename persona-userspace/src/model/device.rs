use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::FieldError;

/// A VM's tap device and the VM's own ("inner") identity, which never changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeviceSpec {
    /// The tap (or veth) interface on the host.
    pub interface: String,
    /// In a fleet, the host that runs the device (its `--host`); others leave it be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_v4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_v6: Option<Ipv6Addr>,
    /// The VM's MAC, "52:54:00:12:34:56".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The gateway the VM is configured with, answered by the host through proxy
    /// ARP/NDP on the tap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_v4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_v6: Option<Ipv6Addr>,
    /// The persona the device starts with when first attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persona: Option<String>,
    /// For selecting devices in rules, as Kubernetes labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The user the VM belongs to, and that user's role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// A drop-only prefilter at the tap's XDP hook; off unless asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flood_guard: Option<FloodGuard>,
    /// How many flows the device may have tracked at once; a new flow over it is
    /// dropped (`drop_flow_budget`). 16384 when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_budget: Option<u32>,
    /// persona makes the interface itself, a persistent tap with the virtio-net header,
    /// and attaches its programs before any VM opens it; deleting the device deletes
    /// the tap. For QEMU's `-netdev tap,ifname=...` or libvirt's `<target dev='...'
    /// managed='no'/>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<TapSpec>,
    /// What the daemon's DHCP answers on the tap tell the VM besides its inner address
    /// and gateway, which it answers with whenever the device has both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpSpec>,
    /// The metadata service at 169.254.169.254, which the VM reaches through its
    /// gateway: on for a device with an inner IPv4 address unless turned off here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MetadataSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetadataSpec {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `false`: the persona's TLS key is never handed to the VM, only its chain.
    #[serde(default = "yes")]
    pub serve_key: bool,
}

impl Default for MetadataSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            serve_key: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DhcpSpec {
    /// `false`: the VM is configured by other means, and its DHCP goes unanswered.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The inner network's prefix length; 24 when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<u8>,
    /// 3600 when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u32>,
    /// 1500 when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

impl Default for DhcpSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            prefix: None,
            lease_seconds: None,
            mtu: None,
        }
    }
}

/// Whether `gateway` is on the network `address/prefix`: one off it would leave the VM
/// with no route.
fn on_link(address: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> bool {
    ipnet::Ipv4Net::new(address, prefix).is_ok_and(|n| n.contains(&gateway))
}

impl DhcpSpec {
    fn lease_seconds(&self) -> u32 {
        self.lease_seconds.unwrap_or(3600)
    }

    fn mtu(&self) -> u16 {
        self.mtu.unwrap_or(1500)
    }
}

impl DeviceSpec {
    fn dhcp(&self) -> DhcpSpec {
        self.dhcp.clone().unwrap_or_default()
    }

    fn metadata(&self) -> MetadataSpec {
        self.metadata.clone().unwrap_or_default()
    }

    /// Whether the VM may reach the metadata service: it needs an IPv4 address.
    pub fn serves_metadata(&self) -> bool {
        self.inner_v4.is_some() && self.metadata().enabled
    }

    /// Whether the metadata service hands the VM its persona's TLS key.
    pub fn serves_key(&self) -> bool {
        self.metadata().serve_key
    }

    /// Whether the guest's DHCP and router solicitations from `mac` are answered: a
    /// device with a MAC answers that MAC only.
    pub fn answers_mac(&self, mac: [u8; 6]) -> bool {
        self.mac_bytes().is_ok_and(|m| m == [0; 6] || m == mac)
    }

    /// The lease the device's DHCP answers give, when it has an inner IPv4 address and
    /// gateway and its DHCP is not turned off.
    pub fn dhcp_lease(&self, server_mac: [u8; 6]) -> Option<crate::guest::dhcp::Lease> {
        let d = self.dhcp();
        let (address, gateway) = (self.inner_v4?, self.gateway_v4?);
        let prefix = d.prefix.unwrap_or(24);
        (d.enabled && on_link(address, prefix, gateway)).then(|| crate::guest::dhcp::Lease {
            address,
            prefix,
            gateway,
            dns: gateway,
            mtu: d.mtu(),
            seconds: d.lease_seconds(),
            server_mac,
        })
    }

    /// What the device's router advertisements and DHCPv6 answers say, when it has an
    /// inner IPv6 address and its DHCP is not turned off. The router is its gateway
    /// when that is link-local, else the tap's own (EUI-64) link-local address.
    pub fn dhcp_lease6(&self, server_mac: [u8; 6]) -> Option<crate::guest::ipv6::Lease6> {
        let d = self.dhcp();
        let address = self.inner_v6.filter(|_| d.enabled)?;
        let router = self
            .gateway_v6
            .filter(Ipv6Addr::is_unicast_link_local)
            .unwrap_or_else(|| {
                let m = server_mac;
                let eui64 = [m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]];
                let mut a = [0u8; 16];
                a[..2].copy_from_slice(&[0xfe, 0x80]);
                a[8..].copy_from_slice(&eui64);
                Ipv6Addr::from(a)
            });
        Some(crate::guest::ipv6::Lease6 {
            address,
            router,
            server_mac,
            mtu: d.mtu(),
            seconds: d.lease_seconds(),
            dns: self.gateway_v6.filter(|g| !g.is_unicast_link_local()),
        })
    }
}

/// A fleet host's name: letters, digits, '-', '.', '_'; at most 253.
pub fn check_host_name(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{host:?} is not a host name (letters, digits, '-', '.', '_'; at most 253)"
        )),
    }
}

/// What Linux accepts as an interface name, less `%`, which the kernel would fill in
/// with a number (`pt%d` makes pt0, then pt1...).
pub fn check_interface_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | ':' | '%'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an interface name (1-15 bytes, no whitespace, '/', ':' or '%')"
        ))
    }
}

/// A tap persona makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TapSpec {
    /// Several queues, for a VM with `queues=N` (libvirt's `<driver queues='N'/>`);
    /// one queue when false. QEMU refuses a tap whose queues differ from its own.
    #[serde(default = "yes")]
    pub multi_queue: bool,
    /// The user and group (numbers) that may open the tap, QEMU's; root only when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
}

fn yes() -> bool {
    true
}

impl Default for TapSpec {
    fn default() -> Self {
        Self {
            multi_queue: true,
            user: None,
            group: None,
        }
    }
}

/// Drops, before the kernel builds an skb, what the tc program would drop anyway:
/// spoofed sources and new flows the active persona's egress rules refuse, plus
/// whatever exceeds a packet-rate cap. The price: the tap hands GSO frames to generic
/// XDP, which linearises and copies them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FloodGuard {
    #[serde(default)]
    pub enabled: bool,
    /// Packets per second the VM may send; no cap when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_packets_per_second: Option<u32>,
}

impl DeviceSpec {
    /// What a pinned `DEVICES` entry tells about a device attached by an earlier run.
    pub fn from_config(interface: String, cfg: &persona_common::device::DeviceConfig) -> Self {
        use persona_common::device::{DEVICE_HAS_V4, DEVICE_HAS_V6};
        let m = cfg.mac;
        Self {
            interface,
            host: None,
            inner_v4: (cfg.flags & DEVICE_HAS_V4 != 0).then(|| Ipv4Addr::from(cfg.inner_v4)),
            inner_v6: (cfg.flags & DEVICE_HAS_V6 != 0).then(|| Ipv6Addr::from(cfg.inner_v6)),
            mac: (m != [0; 6]).then(|| {
                format!(
                    "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                )
            }),
            gateway_v4: None,
            gateway_v6: None,
            persona: None,
            labels: Default::default(),
            owner: None,
            role: None,
            flood_guard: None,
            flow_budget: None,
            tap: None,
            dhcp: None,
            metadata: None,
        }
    }

    /// The flood guard's packet-rate cap (0: none), or `None` when the guard is off.
    pub fn flood_guard_rate(&self) -> Option<u32> {
        self.flood_guard
            .as_ref()
            .filter(|g| g.enabled)
            .map(|g| g.max_packets_per_second.unwrap_or(0))
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        check_interface_name(&self.interface)
            .map_err(|why| FieldError::new("spec.interface", why))?;
        if let Some(host) = &self.host {
            check_host_name(host).map_err(|why| FieldError::new("spec.host", why))?;
        }
        if self.tap.is_some() && self.interface.starts_with("vnet") {
            return Err(FieldError::new(
                "spec.interface",
                "libvirt names its own taps vnetN; a tap persona makes needs another name",
            ));
        }
        if self.inner_v4.is_none() && self.inner_v6.is_none() {
            return Err(FieldError::new(
                "spec.innerV4",
                "the VM needs an inner IPv4 or IPv6 address",
            ));
        }
        self.mac_bytes()?;
        if let Some(FloodGuard {
            max_packets_per_second: Some(0),
            ..
        }) = self.flood_guard
        {
            return Err(FieldError::new(
                "spec.floodGuard.maxPacketsPerSecond",
                "0 would drop everything; leave it out for no cap",
            ));
        }
        if let Some(d) = &self.dhcp {
            if d.prefix.is_some_and(|p| !(1..=30).contains(&p)) {
                return Err(FieldError::new(
                    "spec.dhcp.prefix",
                    "a prefix length from 1 to 30, which leaves room for the VM and its gateway",
                ));
            }
            if d.lease_seconds.is_some_and(|s| s < 10) {
                return Err(FieldError::new(
                    "spec.dhcp.leaseSeconds",
                    "at least 10: a VM renews at half its lease",
                ));
            }
            if d.mtu.is_some_and(|m| m < 576) {
                return Err(FieldError::new(
                    "spec.dhcp.mtu",
                    "at least 576, the least an IPv4 host must take",
                ));
            }
            if let (Some(p), Some(a), Some(g)) = (d.prefix, self.inner_v4, self.gateway_v4)
                && !on_link(a, p, g)
            {
                return Err(FieldError::new(
                    "spec.dhcp.prefix",
                    format!("{a}/{p} does not hold the gateway {g}"),
                ));
            }
        }
        if self.flow_budget == Some(0) {
            return Err(FieldError::new(
                "spec.flowBudget",
                "0 would refuse every flow; leave it out for the default of 16384",
            ));
        }
        for key in self.labels.keys() {
            let ok = !key.is_empty()
                && key.len() <= 63
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
            if !ok {
                return Err(FieldError::new(
                    format!("spec.labels.{key}"),
                    "a label key is 1-63 of [A-Za-z0-9-_./]",
                ));
            }
        }
        Ok(())
    }

    pub fn mac_bytes(&self) -> Result<[u8; 6], FieldError> {
        let Some(mac) = &self.mac else {
            return Ok([0; 6]);
        };
        let bad = || FieldError::new("spec.mac", format!("{mac:?} is not a MAC address"));
        let parts: Vec<&str> = mac.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(parts) {
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(out)
    }

    /// The MAC libvirt gives the VM's tap: the guest's with the first octet 0xfe (0xfa
    /// when the guest's already is 0xfe), so that the host's side never wins a bridge's
    /// choice of address.
    pub fn libvirt_tap_mac(&self) -> Option<[u8; 6]> {
        self.mac.as_ref()?;
        let mut mac = self.mac_bytes().ok()?;
        mac[0] = if mac[0] == 0xfe { 0xfa } else { 0xfe };
        Some(mac)
    }
}
