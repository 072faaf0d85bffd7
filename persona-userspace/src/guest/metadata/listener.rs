//! Where the metadata service listens. Its address is local to the devices' requests
//! alone: a policy rule sends what comes from a peer address (which only the programs
//! give a VM's request) to a table where 169.254.169.254 is local, and the service's
//! socket is transparent, bound to an address the host does not otherwise have. The
//! host's own 169.254.169.254 (a cloud's metadata service) stays what it was, and the
//! host answers no ARP for it. Peer addresses no device has are unreachable, never sent
//! out by the default route. The listener takes connections from peer addresses only;
//! anything else is reset unanswered.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _},
    sync::Arc,
};

use axum::{extract::connect_info::Connected, serve::IncomingStream};
use persona_common::metadata::PEER_BASE;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        route::{RouteScope, RouteType},
        rule::RuleAction,
    },
};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

/// The table where the service's address is local, and the rule's priority (before
/// persona's own rules, after the kernel's local table).
const TABLE: u32 = 8999;
const RULE_PRIORITY: u32 = 8999;
/// Every peer address: 169.254.128.0/20.
const PEERS_PREFIX: u8 = 20;

fn exists_ok(r: Result<(), rtnetlink::Error>) -> io::Result<()> {
    match r {
        Err(rtnetlink::Error::NetlinkError(m))
            if m.code.is_some_and(|c| -c.get() == libc::EEXIST) =>
        {
            Ok(())
        }
        other => other.map_err(|e| io::Error::other(e.to_string())),
    }
}

/// The rule, the local route and the unreachable peer range; what is there already is
/// kept.
pub async fn route_to_service(addr: Ipv4Addr) -> io::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn = tokio::spawn(conn);
    let peers = Ipv4Addr::from(PEER_BASE);
    let made = async {
        let lo = nix::net::if_::if_nametoindex("lo").map_err(io::Error::from)?;
        let local = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(addr, 32)
            .output_interface(lo)
            .table_id(TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build();
        exists_ok(handle.route().add(local).execute().await)?;
        let unreachable = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(peers, PEERS_PREFIX)
            .kind(RouteType::Unreachable)
            .build();
        exists_ok(handle.route().add(unreachable).execute().await)?;
        let rule = handle
            .rule()
            .add()
            .priority(RULE_PRIORITY)
            .table_id(TABLE)
            .action(RuleAction::ToTable)
            .v4()
            .source_prefix(peers, PEERS_PREFIX);
        exists_ok(rule.execute().await)
    }
    .await;
    conn.abort();
    made
}

/// A listening socket on `addr`, which the host need not have: transparent.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen as listen_on,
        setsockopt, socket, sockopt,
    };
    let SocketAddr::V4(v4) = addr else {
        return Err(io::Error::other("the metadata service listens on IPv4"));
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::IpTransparent, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(v4))?;
    listen_on(&fd, Backlog::new(128).map_err(io::Error::from)?)?;
    // SAFETY: the descriptor was made here and is handed over whole.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd.into_raw_fd()) };
    TcpListener::from_std(std)
}

/// The device's peer address a connection came from.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub Ipv4Addr);

pub struct Peers {
    listener: TcpListener,
    metrics: Arc<Metrics>,
}

impl Peers {
    pub fn new(listener: TcpListener, metrics: Arc<Metrics>) -> Self {
        Self { listener, metrics }
    }
}

fn peer_of(addr: SocketAddr) -> Option<Ipv4Addr> {
    match addr {
        SocketAddr::V4(a) => persona_common::metadata::slot_of(a.ip().octets()).map(|_| *a.ip()),
        SocketAddr::V6(_) => None,
    }
}

impl axum::serve::Listener for Peers {
    type Io = TcpStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (TcpStream, Peer) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => match peer_of(addr) {
                    Some(peer) => return (stream, Peer(peer)),
                    None => {
                        self.metrics.metadata_refused.inc();
                        tracing::debug!(%addr, "metadata: refused a connection from no device");
                        // Reset, not closed: nothing is said to it.
                        let _ = stream.set_zero_linger();
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "metadata: accepting");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        match self.listener.local_addr()? {
            SocketAddr::V4(a) => Ok(Peer(*a.ip())),
            SocketAddr::V6(_) => Err(io::Error::other("the metadata service listens on IPv4")),
        }
    }
}

impl Connected<IncomingStream<'_, Peers>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Peers>) -> Self {
        *stream.remote_addr()
    }
}
