//! Where the metadata service listens: its address on the host's loopback, and a listener that takes connections from devices' peer addresses only (the
//! programs give a VM's requests one); anything else is closed unanswered.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use axum::{extract::connect_info::Connected, serve::IncomingStream};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

/// The host's interface holding the service's address: loopback, which every host
/// has (a dummy interface would need a module some kernels lack).
pub const INTERFACE: &str = "lo";

/// Puts `addr`/32 on [`INTERFACE`]; one there already is kept.
pub async fn ensure_address(addr: Ipv4Addr) -> io::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn = tokio::spawn(conn);
    let added = async {
        let index = nix::net::if_::if_nametoindex(INTERFACE).map_err(io::Error::from)?;
        match handle.address().add(index, addr.into(), 32).execute().await {
            Err(rtnetlink::Error::NetlinkError(m))
                if m.code.is_some_and(|c| -c.get() == libc::EEXIST) =>
            {
                Ok(())
            }
            other => other.map_err(|e| io::Error::other(e.to_string())),
        }
    }
    .await;
    conn.abort();
    added
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
