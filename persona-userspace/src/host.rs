//! What the host needs so a persona's addresses are reachable through the VM's tap:
//! a host route per persona address out of the tap, proxy ARP/NDP entries on the uplink
//! so the network's neighbours find the address, and proxy ARP/NDP on the tap so the VM
//! finds its gateway. Routes and neighbour entries go through rtnetlink.
use std::net::IpAddr;

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
    },
};
use tokio::runtime::Runtime;

use crate::{
    datapath::{DatapathError, Result},
    model::DeviceSpec,
};

pub struct Host {
    rt: Runtime,
    handle: Handle,
    uplink: Option<(String, u32)>,
}

fn host_err(context: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> DatapathError {
    let context = context.to_string();
    move |e| DatapathError::Host(format!("{context}: {e}"))
}

/// Deleting what is already gone, or adding what is already there, is success.
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

fn sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| DatapathError::Io {
        context: format!("writing {path}"),
        source,
    })
}

/// Proxied ARP/NDP answers are delayed by up to 0.8 s by default, during which at most
/// `unres_qlen` packets wait and the rest are dropped: a host answering for its VMs
/// should answer at once.
fn answer_proxied_at_once(ifname: &str) -> Result<()> {
    sysctl(
        &format!("/proc/sys/net/ipv4/neigh/{ifname}/proxy_delay"),
        "0",
    )?;
    sysctl(
        &format!("/proc/sys/net/ipv6/neigh/{ifname}/proxy_delay"),
        "0",
    )
}

fn ifname(ifindex: u32) -> Result<String> {
    nix::net::if_::if_indextoname(ifindex)
        .map(|n| n.to_string_lossy().into_owned())
        .map_err(|_| DatapathError::NoSuchInterface(ifindex.to_string()))
}

impl Host {
    pub fn new(uplink: Option<&str>) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| DatapathError::Io {
                context: "starting the netlink runtime".into(),
                source,
            })?;
        let handle = rt
            .block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection()?;
                tokio::spawn(conn);
                Ok::<_, std::io::Error>(handle)
            })
            .map_err(|source| DatapathError::Io {
                context: "opening rtnetlink".into(),
                source,
            })?;
        let uplink = match uplink {
            Some(name) => {
                let index = nix::net::if_::if_nametoindex(name)
                    .map_err(|_| DatapathError::NoSuchInterface(name.into()))?;
                Some((name.to_owned(), index))
            }
            None => None,
        };
        let host = Self { rt, handle, uplink };
        // A hypervisor host forwards between its taps and its uplink.
        sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
        if let Some((name, _)) = &host.uplink {
            sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/proxy_ndp"), "1")?;
            answer_proxied_at_once(name)?;
        }
        Ok(host)
    }

    /// The VM resolves its gateway through the tap: proxy ARP answers for any address
    /// the host routes elsewhere; IPv6 needs an explicit proxy entry.
    pub fn prepare_device(&self, ifindex: u32, device: &DeviceSpec) -> Result<()> {
        let name = ifname(ifindex)?;
        sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/proxy_arp"), "1")?;
        answer_proxied_at_once(&name)?;
        // The tap's own address is the persona's from the host's point of view, reached by
        // route; reverse-path filtering must not refuse the translated source.
        sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "0")?;
        if let Some(gw) = device.gateway_v6 {
            sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/proxy_ndp"), "1")?;
            self.proxy(ifindex, IpAddr::V6(gw), true)?;
        }
        if let Some(gw) = device.gateway_v4 {
            self.proxy(ifindex, IpAddr::V4(gw), true)?;
        }
        Ok(())
    }

    pub fn release_device(&self, ifindex: u32, gateways: &[IpAddr]) -> Result<()> {
        for &gw in gateways {
            self.proxy(ifindex, gw, false)?;
        }
        Ok(())
    }

    /// Before a flip: the persona's addresses route to the tap, via the VM's own address
    /// of the same family (which the VM answers ARP/NDP for), and are announced.
    pub fn announce_persona(&self, ifindex: u32, addrs: &[IpAddr], inner: &[IpAddr]) -> Result<()> {
        for &addr in addrs {
            let Some(&via) = inner.iter().find(|i| i.is_ipv4() == addr.is_ipv4()) else {
                continue;
            };
            self.route(ifindex, addr, Some(via))?;
            if let Some((_, uplink)) = self.uplink {
                self.proxy(uplink, addr, true)?;
            }
        }
        Ok(())
    }

    /// After a flip: addresses the device no longer uses stop routing to it.
    pub fn withdraw_persona(&self, ifindex: u32, addrs: &[IpAddr]) -> Result<()> {
        for &addr in addrs {
            self.route(ifindex, addr, None)?;
            if let Some((_, uplink)) = self.uplink {
                self.proxy(uplink, addr, false)?;
            }
        }
        Ok(())
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
                        &[libc::ESRCH, libc::ENOENT],
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
                        &[libc::ENOENT, libc::ESRCH],
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
