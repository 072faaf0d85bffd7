//! `GET /metrics`: the Prometheus text exposition.
use axum::{
    extract::{MatchedPath, Request},
    http::header::CONTENT_TYPE,
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{ApiError, State};
use crate::{
    auth::Caller,
    metrics::{
        DeviceLabels, DrainLabels, InfoLabels, MapLabels, OneDevice, QosLabels, RequestLabels,
        Snapshot,
    },
    store::Role,
};

/// Counts every request by its route pattern (not its path: ids would explode the
/// label set) and status.
pub async fn count_requests(state: State, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let response = next.run(req).await;
    state
        .orchestrator
        .metrics()
        .api_requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

/// The metrics (viewer), datapath counters read at this moment.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")), security(("bearer" = [])))]
pub async fn scrape(
    state: State,
    caller: Caller,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let store = state.orchestrator.store().clone();
    let mut devices = Vec::new();
    for (name, spec) in state.orchestrator.devices()? {
        let persona = store.device_state(&name)?.map(|s| s.persona);
        devices.push((name, spec.interface.clone(), persona));
    }
    let names = store.persona_names()?;
    let swept = state.orchestrator.swept();
    let up: Vec<(OneDevice, u64)> = devices
        .iter()
        .map(|(name, iface, _)| {
            let attached = state
                .orchestrator
                .interface_of(iface)
                .is_some_and(|i| crate::datapath::ifindex(iface).ok() == Some(i));
            (
                OneDevice {
                    device: name.clone(),
                },
                u64::from(attached),
            )
        })
        .collect();
    let failing = devices
        .iter()
        .map(|(name, _, _)| {
            let device = OneDevice {
                device: name.clone(),
            };
            (
                device,
                u64::from(state.orchestrator.failure(name).is_some()),
            )
        })
        .collect();
    let snapshot = state
        .orchestrator
        .datapath()
        .on_node(move |node| {
            let classes = node.wiring.classes();
            let dp = node.datapath.as_mut();
            let mut snap = Snapshot {
                up,
                failing,
                ..Snapshot::default()
            };
            let mut counts = dp.counts_all()?;
            for (name, iface, persona) in devices {
                let Ok(ifindex) = crate::datapath::ifindex(&iface) else {
                    continue;
                };
                let counted = counts.remove(&ifindex).unwrap_or_default();
                for ((id, (dir, reason)), c) in counted
                    .by_persona
                    .into_iter()
                    .flat_map(|(id, cs)| cs.into_iter().map(move |(k, c)| ((id, k), c)))
                {
                    let labels = DeviceLabels {
                        device: name.clone(),
                        // Packets handled while the device had no persona.
                        persona: names.get(&id).cloned().unwrap_or_else(|| "none".into()),
                        direction: if dir == persona_common::DIR_EGRESS {
                            "egress"
                        } else {
                            "ingress"
                        }
                        .into(),
                        reason: reason.label().into(),
                        verdict: if reason.passes() { "pass" } else { "drop" }.into(),
                    };
                    snap.counters.push((labels, c.packets, c.bytes));
                }
                let active = dp.active(ifindex)?;
                if let (Some(a), Some(p)) = (active, &persona) {
                    for (egress, direction) in [(true, "egress"), (false, "ingress")] {
                        let mine = classes.iter().filter(|(at, uplink, c)| {
                            c.table == a.table && *uplink == egress && (egress || *at == ifindex)
                        });
                        let (mut backlog, mut dropped, mut any) = (0, 0, false);
                        for (_, _, c) in mine {
                            (backlog, dropped, any) =
                                (backlog + c.backlog_bytes, dropped + c.dropped, true);
                        }
                        if any {
                            snap.qos.push((
                                QosLabels {
                                    device: name.clone(),
                                    persona: p.clone(),
                                    direction: direction.into(),
                                },
                                backlog,
                                dropped,
                            ));
                        }
                    }
                }
                if let (Some(active), Some(persona)) = (active, persona) {
                    snap.info.push((
                        InfoLabels {
                            device: name.clone(),
                            persona,
                            interface: iface.clone(),
                        },
                        active.generation,
                    ));
                }
                let (mut buckets, sum) = counted.handshakes;
                buckets.resize(persona_common::counters::HANDSHAKE_BUCKETS as usize, 0);
                snap.handshakes.push((
                    OneDevice {
                        device: name.clone(),
                    },
                    buckets,
                    sum,
                ));
                for (d, n) in swept.draining.get(&ifindex).into_iter().flatten() {
                    snap.draining.push((
                        DrainLabels {
                            device: name.clone(),
                            persona: names.get(&d.persona).cloned().unwrap_or_default(),
                            address: d.addr.to_string(),
                        },
                        u64::from(*n),
                    ));
                }
                let flows = swept.flows.get(&ifindex).copied().unwrap_or(0);
                snap.flows
                    .push((OneDevice { device: name }, u64::from(flows)));
            }
            for (map, used, cap) in dp.usage()?.maps {
                snap.maps.push((MapLabels { map: map.into() }, used, cap));
            }
            Ok::<_, crate::datapath::DatapathError>(snap)
        })
        .await
        .and_then(|r| r)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut snapshot = snapshot;
    if let Some(fleet) = state.orchestrator.fleet() {
        let alive = fleet.live_hosts()?;
        for (name, spec) in state.orchestrator.devices()? {
            let orphaned = spec.host.as_ref().is_some_and(|h| !alive.contains(h));
            snapshot
                .orphaned
                .push((OneDevice { device: name }, u64::from(orphaned)));
        }
        snapshot.fleet_connected = Some(u64::from(fleet.connected()));
    }
    snapshot.store = store.commit_stats().map(|s| {
        use std::sync::atomic::Ordering::Relaxed;
        crate::metrics::StoreFigures {
            commits: s.commits.load(Relaxed),
            writes: s.writes.load(Relaxed),
            seconds: s.commit_ns.load(Relaxed) as f64 / 1e9,
            largest: s.largest_group.load(Relaxed),
            intents: s.intents.load(Relaxed),
            covered: s.covered.load(Relaxed),
        }
    });
    // Prometheus asks for OpenMetrics; everything else gets the classic text format.
    let openmetrics = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let text = state
        .orchestrator
        .metrics()
        .render(snapshot, openmetrics)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    Ok(([(CONTENT_TYPE, content_type)], text).into_response())
}
