//! What the host needs so a persona's addresses are reachable through the VM's tap:
//! a host route per persona address out of the tap, proxy ARP/NDP entries on the uplinks
//! so the network's neighbours find the address, and proxy ARP/NDP on the tap so the VM
//! finds its gateway. A persona's gateway is its next hop by policy routing: the
//! programs pass translated packets to the host's stack, so a rule on the persona's
//! address picks a table whose default route is the persona's gateway, and the kernel's
//! FIB and neighbour code do the rest (no FIB lookup or redirect in the programs). Routes,
//! rules and neighbour entries go through rtnetlink.
use std::{
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
    },
};
use tokio::runtime::Runtime;

use ipnet::IpNet;

use crate::{
    datapath::{CompiledPersona, DatapathError, Result},
    model::{DeviceSpec, TapSpec},
};
use sysctl::Sysctls;

/// The kernel's main routing table.
const RT_TABLE_MAIN: u8 = 254;

pub struct Host {
    rt: Runtime,
    handle: Handle,
    /// Strictly checked (`NETLINK_GET_STRICT_CHK`): the kernel filters its dumps.
    filtered: Handle,
    uplinks: Vec<(String, u32)>,
    settings: Mutex<Sysctls>,
    /// Whether this process set the host up for devices (see [`Wiring::put_back`]).
    set_up: AtomicBool,
    /// What this process announced for each persona address, so that announcing it
    /// again unchanged (a shift back while it drains) costs no netlink round trip.
    announced: Mutex<std::collections::HashMap<IpAddr, Announced>>,
    /// Devices whose addresses are not announced on the uplinks (see [`Wiring::gate`]).
    gated: Mutex<std::collections::HashSet<u32>>,
    /// Addresses this process left with no rule, default route or tunnel of their own:
    /// unsteering them again costs nothing.
    unsteered: Mutex<std::collections::HashSet<IpAddr>>,
    /// Where VPN personas' private keys are read from.
    keys: crate::keys::KeyDir,
    /// Interfaces (name, ifindex) that shape, with persona's HTB (it goes with the last
    /// device), or not (an operator's own queueing).
    shaping: Mutex<std::collections::HashMap<(String, u32), bool>>,
    /// The rate of each table's class on each of them.
    classes: Mutex<std::collections::HashMap<(u32, u32), u64>>,
}

/// The wiring of one announced address: routed via `via` on the tap `ifindex`, leaving
/// by `gateway` or through a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Announced {
    ifindex: u32,
    via: IpAddr,
    gateway: Option<IpAddr>,
    tunnelled: bool,
}

/// Rules on persona addresses sit after this one, which sends every packet whose main
/// table route is a host route (another VM's persona address, a gateway) the usual way.
/// Everything else a persona sends, even to a network the host is attached to, leaves
/// through the persona's gateway: the persona's identity decides, not the host's.
const RULE_MAIN_SPECIFIC: u32 = 9_000;
const RULE_PERSONA: u32 = 9_001;

/// The WireGuard interface of a VPN persona's address.
pub fn tunnel_name(addr: IpAddr) -> String {
    format!("pwg{:08x}", table_of(addr))
}

/// The routing table of a persona address: an IPv4 address is its own number (no two
/// persona addresses share one); an IPv6 address is hashed (the family is in the rule).
pub fn table_of(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(a) => u32::from(a).max(256),
        IpAddr::V6(a) => {
            let h = a.octets().iter().fold(0x811c_9dc5u32, |h, b| {
                (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
            });
            h | 0x8000_0000
        }
    }
}

fn host_err(context: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> DatapathError {
    let context = context.to_string();
    move |e| DatapathError::Host(format!("{context}: {e}"))
}

/// Deleting what is already gone (with its interface, too), or adding what is already
/// there, is success.
fn tolerate(
    res: std::result::Result<(), rtnetlink::Error>,
    codes: &[i32],
) -> std::result::Result<(), rtnetlink::Error> {
    match res {
        Err(rtnetlink::Error::NetlinkError(ref m))
            if m.code.is_some_and(|c| codes.contains(&-c.get())) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// What an interface persona forwards through, tap or uplink, needs: forwarding on it
/// alone, never the host-wide switches, and proxied ARP/NDP answered at once (by default
/// they wait up to 0.8 s, and all but `unres_qlen` packets waiting are dropped).
fn forward_through(settings: &mut Sysctls, name: &str) -> Result<()> {
    settings.set(&format!("net/ipv4/conf/{name}/forwarding"), "1")?;
    // Proxy NDP answers only on an interface that forwards.
    settings.set(&format!("net/ipv6/conf/{name}/forwarding"), "1")?;
    let force = format!("net/ipv6/conf/{name}/force_forwarding");
    if sysctl::exists(&force) {
        settings.set(&force, "1")?;
    } else {
        // Before Linux 6.17, IPv6 forwards only when every interface does.
        settings.set("net/ipv6/conf/all/forwarding", "1")?;
    }
    settings.set(&format!("net/ipv6/conf/{name}/proxy_ndp"), "1")?;
    settings.set(&format!("net/ipv4/neigh/{name}/proxy_delay"), "0")?;
    settings.set(&format!("net/ipv6/neigh/{name}/proxy_delay"), "0")
}

fn ifname(ifindex: u32) -> Result<String> {
    nix::net::if_::if_indextoname(ifindex)
        .map(|n| n.to_string_lossy().into_owned())
        .map_err(|_| DatapathError::NoSuchInterface(ifindex.to_string()))
}

impl Host {
    fn is_gated(&self, ifindex: u32) -> bool {
        self.gated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&ifindex)
    }

    fn announced(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<IpAddr, Announced>> {
        self.announced.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `record` is where the host settings persona changes are kept with their old
    /// values (see [`sysctl`]).
    pub fn new(uplinks: &[String], record: Option<std::path::PathBuf>) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| DatapathError::Io {
                context: "starting the netlink runtime".into(),
                source,
            })?;
        let (handle, filtered) = rt
            .block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection()?;
                tokio::spawn(conn);
                let (conn, filtered, _) = rtnetlink::new_connection_with_strict_check()?;
                tokio::spawn(conn);
                Ok::<_, std::io::Error>((handle, filtered))
            })
            .map_err(|source| DatapathError::Io {
                context: "opening rtnetlink".into(),
                source,
            })?;
        let uplinks = uplinks
            .iter()
            .map(|name| {
                nix::net::if_::if_nametoindex(name.as_str())
                    .map(|index| (name.clone(), index))
                    .map_err(|_| DatapathError::NoSuchInterface(name.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            rt,
            handle,
            filtered,
            uplinks,
            settings: Mutex::new(Sysctls::open(record)?),
            set_up: AtomicBool::new(false),
            announced: Default::default(),
            gated: Default::default(),
            unsteered: Default::default(),
            keys: Default::default(),
            shaping: Default::default(),
            classes: Default::default(),
        })
    }

    pub fn with_keys(self, keys: crate::keys::KeyDir) -> Self {
        Self { keys, ..self }
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, Sysctls> {
        self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses what must never carry the programs: an uplink (XDP and tc there would
    /// cut the host off), and anything but a tap or a veth.
    pub fn admit(&self, interface: &str) -> Result<()> {
        if self.uplinks.iter().any(|(u, _)| u == interface) {
            return Err(refused(interface, "it is an uplink"));
        }
        let Ok(ifindex) = crate::datapath::ifindex(interface) else {
            return Ok(());
        };
        let (kind, ethernet) = self.kind(ifindex)?;
        match kind.as_deref() {
            Some("veth") => Ok(()),
            Some("tun") if ethernet => Ok(()),
            Some("tun") => Err(refused(interface, "it is a tun device, not a tap")),
            Some(kind) => Err(refused(interface, &format!("it is a {kind} device"))),
            None => Err(refused(interface, "it is not a tap or veth")),
        }
    }

    /// The link kind rtnetlink reports ("tun" for taps and tuns, "veth", "bridge"...),
    /// and whether it carries Ethernet frames (a tap does, a tun does not).
    fn kind(&self, ifindex: u32) -> Result<(Option<String>, bool)> {
        use rtnetlink::packet_route::link::{LinkAttribute, LinkInfo, LinkLayerType};
        let handle = self.handle.clone();
        let link = self
            .rt
            .block_on(async move {
                handle
                    .link()
                    .get()
                    .match_index(ifindex)
                    .execute()
                    .try_next()
                    .await
            })
            .map_err(host_err(format_args!("reading link {ifindex}")))?;
        let Some(link) = link else {
            return Ok((None, false));
        };
        let ethernet = link.header.link_layer_type == LinkLayerType::Ether;
        let kind = link.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.into_iter().find_map(|i| match i {
                LinkInfo::Kind(k) => Some(k.to_string()),
                _ => None,
            }),
            _ => None,
        });
        Ok((kind, ethernet))
    }

    /// Once, before the first device: the uplinks forward and proxy, and the rule that
    /// keeps host routes ahead of persona gateways goes in.
    fn set_up(&self) -> Result<()> {
        if self.set_up.load(Ordering::Relaxed) {
            return Ok(());
        }
        {
            let mut settings = self.settings();
            for (name, _) in &self.uplinks {
                forward_through(&mut settings, name)?;
                // Forwarding would stop the uplink learning its routes from router
                // advertisements; 2 accepts them on a forwarding interface.
                let accept_ra = format!("net/ipv6/conf/{name}/accept_ra");
                if sysctl::read(&accept_ra).as_deref() == Some("1") {
                    settings.set(&accept_ra, "2")?;
                }
            }
        }
        for v6 in [false, true] {
            self.rule(v6, None, RULE_MAIN_SPECIFIC, true)?;
        }
        self.set_up.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The address's rule and table go, and its tunnel with them (the kernel drops the
    /// routes through a deleted link).
    fn unsteer(&self, addr: IpAddr) -> Result<()> {
        if self.unsteered().contains(&addr) {
            return Ok(());
        }
        self.rule(addr.is_ipv6(), Some(addr), RULE_PERSONA, false)?;
        self.default_route(addr, None)?;
        self.tunnel_down(addr)?;
        self.unsteered().insert(addr);
        Ok(())
    }

    fn unsteered(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<IpAddr>> {
        self.unsteered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tunnel goes, and what was set for it is forgotten with it.
    fn tunnel_down(&self, addr: IpAddr) -> Result<()> {
        let name = tunnel_name(addr);
        crate::tunnel::down(&name)?;
        self.settings().restore_interface(&name)
    }

    /// `net dev TUNNEL` in the address's table.
    fn tunnel_route(&self, addr: IpAddr, net: IpNet, tunnel: u32) -> Result<()> {
        let table = table_of(addr);
        let bad = |e| DatapathError::Host(format!("route {net} through the tunnel: {e}"));
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .map_err(bad)?
            .output_interface(tunnel)
            .table_id(table)
            .build();
        let handle = self.handle.clone();
        self.rt
            .block_on(async move { handle.route().add(msg).replace().execute().await })
            .map_err(host_err(format_args!(
                "adding route {net} dev {tunnel} table {table}"
            )))
    }

    /// `from ADDR lookup table_of(ADDR)` with `Some(addr)`; the main-table rule for host
    /// routes of the family `v6` says with `None`. Added or deleted, idempotently.
    fn rule(&self, v6: bool, from: Option<IpAddr>, priority: u32, add: bool) -> Result<()> {
        let handle = self.handle.clone();
        let what = match from {
            Some(a) => format!("rule from {a}"),
            None => "rule lookup main for host routes only".into(),
        };
        self.rt
            .block_on(async move {
                let mut req = handle.rule().add().priority(priority);
                req = match from {
                    Some(a) => req.table_id(table_of(a)),
                    None => req.table_id(RT_TABLE_MAIN.into()),
                };
                req = req.action(rtnetlink::packet_route::rule::RuleAction::ToTable);
                let mut msg = match from {
                    Some(IpAddr::V4(a)) => {
                        std::mem::take(req.v4().source_prefix(a, 32).message_mut())
                    }
                    Some(IpAddr::V6(a)) => {
                        std::mem::take(req.v6().source_prefix(a, 128).message_mut())
                    }
                    None if v6 => std::mem::take(req.v6().message_mut()),
                    None => std::mem::take(req.v4().message_mut()),
                };
                if from.is_none() {
                    let shorter_than_host = if v6 { 127 } else { 31 };
                    msg.attributes.push(
                        rtnetlink::packet_route::rule::RuleAttribute::SuppressPrefixLen(
                            shorter_than_host,
                        ),
                    );
                }
                if add {
                    let mut req = handle.rule().add();
                    *req.message_mut() = msg;
                    tolerate(req.execute().await, &[libc::EEXIST])
                } else {
                    tolerate(
                        handle.rule().del(msg).execute().await,
                        &[libc::ENOENT, libc::ESRCH, libc::ENODEV],
                    )
                }
            })
            .map_err(host_err(format_args!(
                "{} {what}",
                if add { "adding" } else { "deleting" }
            )))
    }

    /// The default route of `addr`'s table: via `gw` when given, none otherwise.
    fn default_route(&self, addr: IpAddr, gw: Option<IpAddr>) -> Result<()> {
        let handle = self.handle.clone();
        let table = table_of(addr);
        let unspecified = if addr.is_ipv6() {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        };
        let bad = |e| DatapathError::Host(format!("default route of table {table}: {e}"));
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(unspecified, 0)
            .map_err(bad)?
            .table_id(table);
        if let Some(gw) = gw {
            builder = builder.gateway(gw).map_err(bad)?;
        }
        let msg = builder.build();
        self.rt
            .block_on(async move {
                match gw {
                    Some(_) => handle.route().add(msg).replace().execute().await,
                    None => tolerate(
                        handle.route().del(msg).execute().await,
                        &[libc::ESRCH, libc::ENOENT, libc::ENODEV],
                    ),
                }
            })
            .map_err(host_err(format_args!(
                "{} default route of table {table}",
                if gw.is_some() { "setting" } else { "deleting" }
            )))
    }

    /// Adds the route when `via` is given, deletes it otherwise.
    fn route(&self, ifindex: u32, addr: IpAddr, via: Option<IpAddr>) -> Result<()> {
        let add = via.is_some();
        let len = if addr.is_ipv4() { 32 } else { 128 };
        let bad = |e| DatapathError::Host(format!("route to {addr}: {e}"));
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(addr, len)
            .map_err(bad)?
            .output_interface(ifindex);
        if let Some(via) = via {
            builder = builder.gateway(via).map_err(bad)?.onlink();
        }
        let msg = builder.build();
        let handle = self.handle.clone();
        self.rt
            .block_on(async move {
                if add {
                    handle.route().add(msg).replace().execute().await
                } else {
                    tolerate(
                        handle.route().del(msg).execute().await,
                        &[libc::ESRCH, libc::ENOENT, libc::ENODEV],
                    )
                }
            })
            .map_err(host_err(format_args!(
                "{} route {addr}/{len} dev {ifindex}",
                if add { "adding" } else { "deleting" }
            )))
    }

    fn proxy(&self, ifindex: u32, addr: IpAddr, add: bool) -> Result<()> {
        let handle = self.handle.clone();
        self.rt
            .block_on(async move {
                if add {
                    let req = handle
                        .neighbours()
                        .add(ifindex, addr)
                        .flags(NeighbourFlags::Proxy)
                        .replace();
                    req.execute().await
                } else {
                    let mut msg = NeighbourMessage::default();
                    msg.header.family = if addr.is_ipv4() {
                        rtnetlink::packet_route::AddressFamily::Inet
                    } else {
                        rtnetlink::packet_route::AddressFamily::Inet6
                    };
                    msg.header.ifindex = ifindex;
                    msg.header.flags = NeighbourFlags::Proxy;
                    msg.attributes
                        .push(NeighbourAttribute::Destination(match addr {
                            IpAddr::V4(a) => NeighbourAddress::Inet(a),
                            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
                        }));
                    tolerate(
                        handle.neighbours().del(msg).execute().await,
                        &[libc::ENOENT, libc::ESRCH, libc::ENODEV],
                    )
                }
            })
            .map_err(host_err(format_args!(
                "{} proxy neighbour {addr} dev {ifindex}",
                if add { "adding" } else { "deleting" }
            )))
    }

    /// Proxy entries currently on an interface, for tests and status.
    pub fn proxies(&self, ifindex: u32) -> Result<Vec<IpAddr>> {
        let handle = self.handle.clone();
        self.rt
            .block_on(async move {
                let mut req = handle.neighbours().get().proxies();
                req.message_mut().header.ifindex = ifindex;
                let mut out = Vec::new();
                let mut stream = req.execute();
                while let Some(msg) = stream.try_next().await? {
                    if msg.header.ifindex != ifindex {
                        continue;
                    }
                    for attr in msg.attributes {
                        match attr {
                            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                                out.push(IpAddr::V4(a))
                            }
                            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                                out.push(IpAddr::V6(a))
                            }
                            _ => {}
                        }
                    }
                }
                Ok(out)
            })
            .map_err(host_err("listing proxy neighbours"))
    }
}

fn tunnelled(persona: &CompiledPersona, addr: IpAddr) -> Vec<IpNet> {
    persona
        .vpn
        .iter()
        .flat_map(|v| v.allowed_ips.iter().copied())
        .filter(|n| n.addr().is_ipv4() == addr.is_ipv4())
        .collect()
}

/// What the host around the datapath must do for devices and shifts: routes, neighbour
/// proxies, policy rules and tunnels. [`Host`] does it through rtnetlink;
/// [`fake::FakeWiring`] records it for unit tests.
pub trait Wiring: Send {
    /// Refuses an interface that must not be a device.
    fn admit(&self, _interface: &str) -> Result<()> {
        Ok(())
    }
    /// Makes the device's tap when persona is to make it and it is not there.
    fn make_tap(&self, _name: &str, _spec: &TapSpec) -> Result<()> {
        Ok(())
    }
    /// Opens the tap persona made, to delete it: fails, changing nothing, when it
    /// cannot be deleted; `None` when it is not there.
    fn open_tap(&self, _name: &str, _spec: &TapSpec) -> Result<Option<tap::Removal>> {
        Ok(None)
    }
    fn remove_tap(&self, removal: Option<tap::Removal>) -> Result<()> {
        removal.map_or(Ok(()), tap::Removal::delete)
    }
    /// The VM finds its gateway through the tap.
    fn prepare_device(&self, ifindex: u32, device: &DeviceSpec) -> Result<()>;
    fn release_device(&self, ifindex: u32, gateways: &[IpAddr]) -> Result<()>;
    /// The device's metadata peer address routes to its tap via the VM's own address
    /// (`via`), or no longer does (`None`).
    fn route_metadata(
        &self,
        _ifindex: u32,
        _peer: std::net::Ipv4Addr,
        _via: Option<std::net::Ipv4Addr>,
    ) -> Result<()> {
        Ok(())
    }
    /// Routes and announces the persona's addresses to the device, each steered out
    /// through the persona's gateway or tunnel.
    fn announce(
        &self,
        ifindex: u32,
        addrs: &[IpAddr],
        inner: &[IpAddr],
        persona: &CompiledPersona,
    ) -> Result<()>;
    fn withdraw(&self, ifindex: u32, addrs: &[IpAddr]) -> Result<()>;
    /// Gated, the device's addresses are routed to it but not announced on the uplinks:
    /// a VM arriving by live migration, whose addresses another host answers for until
    /// it runs here. Ungated, they are announced, and neighbours told at once.
    fn gate(&self, _ifindex: u32, _gated: bool) -> Result<()> {
        Ok(())
    }
    /// The tunnel of each address the persona sends through its VPN, with the routes
    /// into it; returns the addresses whose tunnel was made now.
    fn tunnel(&self, addrs: &[IpAddr], persona: &CompiledPersona) -> Result<Vec<IpAddr>>;
    fn untunnel(&self, addrs: &[IpAddr]) -> Result<()>;
    /// The persona addresses routed to the device now.
    fn routed(&self, ifindex: u32) -> Result<Vec<IpAddr>>;
    /// The HTB class of a staged table, where its persona's rates are shaped.
    fn shape(&self, _ifindex: u32, _table: u32, _qos: &persona_common::qos::Qos) -> Result<()> {
        Ok(())
    }
    /// The HTB classes shaping now, by the interface they are on and whether it is an
    /// uplink (what VMs send) or a tap (what it receives).
    fn classes(&self) -> Vec<(u32, bool, qdisc::ClassStats)> {
        Vec::new()
    }
    /// After the last device: what was changed on the host for devices is put back.
    fn put_back(&self) -> Result<()> {
        Ok(())
    }
}

impl Wiring for Host {
    fn admit(&self, interface: &str) -> Result<()> {
        Host::admit(self, interface)
    }

    fn make_tap(&self, name: &str, spec: &TapSpec) -> Result<()> {
        if tap::create(name, spec)? {
            tracing::info!(tap = name, "made the device's tap");
        }
        Ok(())
    }

    fn open_tap(&self, name: &str, spec: &TapSpec) -> Result<Option<tap::Removal>> {
        tap::open(name, spec)
    }

    /// The VM resolves its gateway through the tap: proxy ARP answers for any address
    /// the host routes elsewhere; IPv6 needs an explicit proxy entry.
    fn prepare_device(&self, ifindex: u32, device: &DeviceSpec) -> Result<()> {
        let name = ifname(ifindex)?;
        self.set_up()?;
        {
            let mut settings = self.settings();
            forward_through(&mut settings, &name)?;
            settings.set(&format!("net/ipv4/conf/{name}/proxy_arp"), "1")?;
            // The tap's own address is the persona's from the host's point of view,
            // reached by route; reverse-path filtering must not refuse the translated
            // source.
            settings.set(&format!("net/ipv4/conf/{name}/rp_filter"), "0")?;
        }
        if let Some(gw) = device.gateway_v6 {
            self.proxy(ifindex, IpAddr::V6(gw), true)?;
        }
        if let Some(gw) = device.gateway_v4 {
            self.proxy(ifindex, IpAddr::V4(gw), true)?;
        }
        Ok(())
    }

    /// What was set for the tap goes back (when the tap is gone, it went with it).
    fn release_device(&self, ifindex: u32, gateways: &[IpAddr]) -> Result<()> {
        for &gw in gateways {
            self.proxy(ifindex, gw, false)?;
        }
        if let Ok(name) = ifname(ifindex) {
            self.settings().restore_interface(&name)?;
        }
        Ok(())
    }

    fn route_metadata(
        &self,
        ifindex: u32,
        peer: std::net::Ipv4Addr,
        via: Option<std::net::Ipv4Addr>,
    ) -> Result<()> {
        self.route(ifindex, IpAddr::V4(peer), via.map(IpAddr::V4))
    }

    fn shape(&self, ifindex: u32, table: u32, qos: &persona_common::qos::Qos) -> Result<()> {
        let mut through: Vec<((String, u32), u64)> = Vec::new();
        if qos.rate[0] != 0 {
            through.extend(self.uplinks.iter().map(|u| (u.clone(), qos.rate[0])));
        }
        if qos.rate[1] != 0 {
            through.push(((ifname(ifindex)?, ifindex), qos.rate[1]));
        }
        for (dev, rate) in through {
            let ours = {
                let mut shaping = self.shaping.lock().unwrap_or_else(|e| e.into_inner());
                match shaping.get(&dev) {
                    Some(&ours) => ours,
                    None => {
                        let ours = qdisc::ensure_htb(&dev.0)?;
                        shaping.insert(dev.clone(), ours);
                        ours
                    }
                }
            };
            let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
            if ours && classes.get(&(dev.1, table)) != Some(&rate) {
                qdisc::shape(&dev.0, table, rate)?;
                classes.insert((dev.1, table), rate);
            }
        }
        Ok(())
    }

    fn classes(&self) -> Vec<(u32, bool, qdisc::ClassStats)> {
        let shaping: Vec<(String, u32)> = self
            .shaping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, ours)| **ours)
            .map(|(dev, _)| dev.clone())
            .collect();
        shaping
            .into_iter()
            .flat_map(|(dev, ifindex)| {
                let uplink = self.uplinks.iter().any(|(_, u)| *u == ifindex);
                // A tap that went with its VM has nothing to say.
                qdisc::stats(&dev)
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |c| (ifindex, uplink, c))
            })
            .collect()
    }

    fn put_back(&self) -> Result<()> {
        self.classes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let shaping = std::mem::take(&mut *self.shaping.lock().unwrap_or_else(|e| e.into_inner()));
        for ((dev, ifindex), ours) in shaping {
            // Best effort: what cannot be removed is said, and the rest is still put back.
            if ours
                && ifname(ifindex).is_ok_and(|n| n == dev)
                && let Err(e) = qdisc::remove(&dev)
            {
                tracing::warn!(interface = dev, error = %e, "removing persona's HTB");
            }
        }
        self.announced().clear();
        self.unsteered().clear();
        for v6 in [false, true] {
            self.rule(v6, None, RULE_MAIN_SPECIFIC, false)?;
        }
        self.set_up.store(false, Ordering::Relaxed);
        self.settings().restore_all()
    }

    /// Before a flip: the persona's addresses route to the tap, via the VM's own address
    /// of the same family (which the VM answers ARP/NDP for), are announced on every
    /// uplink, and leave through the persona's gateway (or tunnel) of their family.
    fn announce(
        &self,
        ifindex: u32,
        addrs: &[IpAddr],
        inner: &[IpAddr],
        persona: &CompiledPersona,
    ) -> Result<()> {
        for &addr in addrs {
            let Some(&via) = inner.iter().find(|i| i.is_ipv4() == addr.is_ipv4()) else {
                continue;
            };
            let wanted = Announced {
                ifindex,
                via,
                gateway: persona
                    .gateways
                    .iter()
                    .copied()
                    .find(|g| g.is_ipv4() == addr.is_ipv4()),
                tunnelled: !tunnelled(persona, addr).is_empty(),
            };
            if self.announced().get(&addr) == Some(&wanted) {
                continue;
            }
            // Forgotten first: a failure part-way leaves it to be announced in full.
            self.announced().remove(&addr);
            self.route(ifindex, addr, Some(via))?;
            if !self.is_gated(ifindex) {
                for &(_, uplink) in &self.uplinks {
                    self.proxy(uplink, addr, true)?;
                }
            }
            let gateway = persona
                .gateways
                .iter()
                .copied()
                .find(|g| g.is_ipv4() == addr.is_ipv4());
            if gateway.is_none() && tunnelled(persona, addr).is_empty() {
                self.unsteer(addr)?;
            } else {
                self.unsteered().remove(&addr);
                if let Some(gw) = gateway {
                    self.default_route(addr, Some(gw))?;
                }
                self.rule(addr.is_ipv6(), Some(addr), RULE_PERSONA, true)?;
            }
            self.announced().insert(addr, wanted);
        }
        Ok(())
    }

    /// After a flip: addresses the device no longer uses stop routing to it.
    fn withdraw(&self, ifindex: u32, addrs: &[IpAddr]) -> Result<()> {
        for &addr in addrs {
            self.announced().remove(&addr);
            self.route(ifindex, addr, None)?;
            for &(_, uplink) in &self.uplinks {
                self.proxy(uplink, addr, false)?;
            }
            self.unsteer(addr)?;
        }
        Ok(())
    }

    fn gate(&self, ifindex: u32, gated: bool) -> Result<()> {
        let mut set = self.gated.lock().unwrap_or_else(|e| e.into_inner());
        if gated {
            set.insert(ifindex);
            return Ok(());
        }
        if !set.remove(&ifindex) {
            return Ok(());
        }
        drop(set);
        let addrs: Vec<IpAddr> = self
            .announced()
            .iter()
            .filter(|(_, a)| a.ifindex == ifindex)
            .map(|(addr, _)| *addr)
            .collect();
        // A device let go was withdrawn first: nothing to announce, nobody to tell.
        if addrs.is_empty() {
            return Ok(());
        }
        for &(ref name, uplink) in &self.uplinks {
            for &addr in &addrs {
                self.proxy(uplink, addr, true)?;
            }
            if let Err(e) = announce::tell_neighbours(name, uplink, &addrs) {
                tracing::warn!(uplink = name, error = %e, "telling neighbours where the addresses moved");
            }
        }
        Ok(())
    }

    fn tunnel(&self, addrs: &[IpAddr], persona: &CompiledPersona) -> Result<Vec<IpAddr>> {
        let Some(vpn) = &persona.vpn else {
            return Ok(Vec::new());
        };
        let mut made = Vec::new();
        for &addr in addrs {
            let nets = tunnelled(persona, addr);
            if nets.is_empty() {
                continue;
            }
            let name = tunnel_name(addr);
            self.unsteered().remove(&addr);
            if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
                made.push(addr);
            }
            let tunnel = crate::tunnel::up(&name, vpn, &self.keys)?;
            // What comes back out of the tunnel is forwarded to the VM.
            forward_through(&mut self.settings(), &name)?;
            for net in nets {
                self.tunnel_route(addr, net, tunnel)?;
            }
        }
        Ok(made)
    }

    fn untunnel(&self, addrs: &[IpAddr]) -> Result<()> {
        for &addr in addrs {
            self.announced().remove(&addr);
            self.tunnel_down(addr)?;
        }
        Ok(())
    }

    /// The host routes out of the tap (the persona addresses it is wired for). The
    /// kernel filters the dump to the main table's routes out of the tap: the answer is
    /// as long as what the tap has, not as the host's routing table.
    fn routed(&self, ifindex: u32) -> Result<Vec<IpAddr>> {
        use rtnetlink::packet_route::{
            AddressFamily,
            route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
        };
        let handle = self.filtered.clone();
        self.rt
            .block_on(async move {
                let mut out = Vec::new();
                for family in [AddressFamily::Inet, AddressFamily::Inet6] {
                    let mut msg = RouteMessage::default();
                    msg.header.address_family = family;
                    msg.header.table = RT_TABLE_MAIN;
                    msg.header.protocol = RouteProtocol::Unspec;
                    msg.header.kind = RouteType::Unspec;
                    msg.attributes.push(RouteAttribute::Oif(ifindex));
                    let host_len = if family == AddressFamily::Inet {
                        32
                    } else {
                        128
                    };
                    let mut stream = handle.route().get(msg).execute();
                    loop {
                        let route = match stream.try_next().await {
                            Ok(Some(route)) => route,
                            Ok(None) => break,
                            // Filtered by a tap that is gone, the dump is refused: it
                            // routes nothing any more.
                            Err(rtnetlink::Error::NetlinkError(m))
                                if m.raw_code() == -libc::ENODEV =>
                            {
                                return Ok(Vec::new());
                            }
                            Err(e) => return Err(e),
                        };
                        // The filter checked again: a multipath route matches it by
                        // any of its next hops, and only routes out of the tap count.
                        let host = route.header.destination_prefix_length == host_len
                            && route.header.table == RT_TABLE_MAIN;
                        let out_of_tap = route
                            .attributes
                            .iter()
                            .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == ifindex));
                        if !(host && out_of_tap) {
                            continue;
                        }
                        for a in &route.attributes {
                            match a {
                                RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                                    out.push(IpAddr::V4(*d))
                                }
                                RouteAttribute::Destination(RouteAddress::Inet6(d)) => {
                                    out.push(IpAddr::V6(*d))
                                }
                                _ => {}
                            }
                        }
                    }
                }
                Ok(out)
            })
            .map_err(host_err("listing routes"))
    }
}

fn refused(interface: &str, why: &str) -> DatapathError {
    DatapathError::Refused(format!("interface {interface:?}: {why}"))
}

pub(crate) mod announce;
pub mod fake;
pub mod qdisc;
pub mod sysctl;
pub mod tap;
