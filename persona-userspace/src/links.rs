//! Following the host's interfaces: a VM's tap vanishes when the VM stops and comes back,
//! under a new ifindex, when it starts. A device whose interface goes has its wiring of
//! the old ifindex cleaned up; one whose interface appears is attached and gets the
//! persona the store says, as at the daemon's start.
use std::sync::Arc;

use futures::StreamExt as _;
use rtnetlink::{
    constants::RTMGRP_LINK,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkFlags, LinkMessage},
    },
    sys::{AsyncSocket as _, SocketAddr},
};
use tracing::{info, warn};

use crate::orchestrator::Orchestrator;

fn name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => m.as_slice().try_into().ok(),
        _ => None,
    })
}

/// Follows the host's interfaces for as long as the daemon runs. A daemon that can no
/// longer follow them exits (its service manager starts it again, and the programs keep
/// the traffic going meanwhile): running on would leave restarted VMs unattached.
pub async fn follow(orchestrator: Arc<Orchestrator>) {
    let why = match watch(&orchestrator).await {
        Ok(()) => "the netlink socket closed".to_owned(),
        Err(e) => e.to_string(),
    };
    tracing::error!(error = %why, "following interfaces stopped; exiting");
    std::process::exit(1);
}

async fn watch(orchestrator: &Arc<Orchestrator>) -> anyhow::Result<()> {
    let (mut connection, _, mut messages) = rtnetlink::new_connection()?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK))?;
    tokio::spawn(connection);
    while let Some((message, _)) = messages.next().await {
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                let ifindex = link.header.index;
                match orchestrator.interface_gone(ifindex).await {
                    Ok(Some(device)) => info!(device, ifindex, "interface gone: wiring removed"),
                    Ok(None) => {}
                    Err(e) => warn!(ifindex, error = %e, "cleaning up after a vanished interface"),
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                let ifindex = link.header.index;
                let Some(interface) = name(&link) else {
                    continue;
                };
                // A new link is down at first: routes through it cannot be added yet,
                // and nothing can pass it. Another message says when it is up.
                if !link.header.flags.contains(LinkFlags::Up) {
                    continue;
                }
                let device = match orchestrator.device_on(interface) {
                    Ok(Some(d)) => d,
                    Ok(None) => match mac(&link).map(|m| orchestrator.follow_mac(interface, m)) {
                        Some(Ok(Some(d))) => {
                            info!(device = d, interface, "a device's VM is on a new tap");
                            d
                        }
                        Some(Err(e)) => {
                            warn!(interface, error = %e, "following a tap by its MAC");
                            continue;
                        }
                        _ => continue,
                    },
                    Err(_) => continue,
                };
                let settled = orchestrator.is_attached(ifindex)
                    && orchestrator
                        .datapath()
                        .call(move |dp| dp.active(ifindex))
                        .await
                        .is_ok_and(|a| a.is_some());
                if settled {
                    continue;
                }
                info!(device, interface, ifindex, "interface appeared: attaching");
                let _ = orchestrator.settle_reported(&device, "daemon:links").await;
            }
            // The kernel dropped link messages (the socket's buffer overran): what they
            // said is read back from the interfaces themselves.
            NetlinkPayload::Overrun(_) => {
                warn!("link messages lost; reconciling every device");
                if let Err(e) = orchestrator.reconcile().await {
                    warn!(error = %e, "reconciling after lost link messages");
                }
            }
            _ => {}
        }
    }
    Ok(())
}
