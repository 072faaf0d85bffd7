//! Security events: firewall drops arrive through the ring buffer, are summed per
//! device and source into the audit log once a second, and a source that probes many
//! ports in a short time raises the device's `port-scan` alert for the rule engine.
//!
//! Sources are whatever the outside writes in its packets, spoofed ones included, so
//! nothing here grows with their number: per device and second, the busiest sources are
//! logged one by one and the rest together; the sources whose ports are watched, and
//! the summaries waiting for the next second, are capped; a device has one scan alert,
//! whatever the sources behind it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use persona_common::{DIR_EGRESS, counters::Reason, events::DropEvent};
use serde_json::json;
use tokio::io::unix::AsyncFd;
use tracing::warn;

use crate::{
    orchestrator::Orchestrator,
    rules::{
        runner::RuleEngine,
        signals::{AlertState, Severity, Signal, SignalBody},
    },
    store::EventBody,
};

/// Distinct ports one source must hit within `SCAN_WINDOW` to count as a scan.
const SCAN_PORTS: usize = 10;
const SCAN_WINDOW: Duration = Duration::from_secs(10);
/// How long a scan alert stays open without new evidence.
const SCAN_ALERT_TTL: u64 = 600;
/// Sources logged one by one per device and second; the others in one record.
const SOURCES_LOGGED: usize = 16;
/// Summaries waiting for the next second, and sources whose ports are watched, at most.
const PENDING_MAX: usize = 4096;
const WATCHED_MAX: usize = 16_384;
/// Ports remembered per watched source: enough to tell a scan.
const PORTS_WATCHED: usize = 4 * SCAN_PORTS;

/// One second's drops by device, source (`None`: those past the cap) and reason.
type Pending = BTreeMap<(String, Option<IpAddr>, &'static str), Summary>;

#[derive(Default)]
struct Summary {
    dropped: u64,
    ports: BTreeSet<u16>,
    proto: u8,
    direction: u8,
}

pub struct Watcher {
    orchestrator: Arc<Orchestrator>,
    engine: Arc<RuleEngine>,
    pending: Pending,
    recent: HashMap<(String, IpAddr), VecDeque<(Instant, u16)>>,
    /// When each device's scan alert was last raised.
    alerted: HashMap<String, Instant>,
    names: HashMap<u32, String>,
}

fn decode(bytes: &[u8]) -> Option<DropEvent> {
    (bytes.len() >= size_of::<DropEvent>())
        // SAFETY: the kernel wrote a DropEvent; read it without assuming alignment.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
}

/// The audit records for one second's drops: per device, its busiest sources one by
/// one, then the rest (and those past the cap) in one record.
fn summaries(pending: Pending) -> Vec<EventBody> {
    let record = |device: &str, from: String, reason: &str, s: &Summary, sources: usize| {
        let ports: Vec<u16> = s.ports.iter().copied().take(32).collect();
        EventBody {
            kind: "security".into(),
            actor: "datapath".into(),
            device: Some(device.to_owned()),
            from: Some(from),
            to: None,
            generation: None,
            result: format!("{} dropped ({reason})", s.dropped),
            duration_us: None,
            detail: json!({
                "direction": if s.direction == DIR_EGRESS { "egress" } else { "ingress" },
                "proto": s.proto,
                "ports": ports,
                "sources": sources,
            }),
        }
    };
    type Sources = Vec<(Option<IpAddr>, Summary)>;
    let mut by_device: BTreeMap<(String, &'static str), Sources> = BTreeMap::new();
    for ((device, remote, reason), s) in pending {
        by_device
            .entry((device, reason))
            .or_default()
            .push((remote, s));
    }
    let mut out = Vec::new();
    for ((device, reason), mut sources) in by_device {
        sources.sort_by_key(|(r, s)| (r.is_none(), std::cmp::Reverse(s.dropped)));
        let mut rest = Summary::default();
        let mut others = 0;
        for (i, (remote, s)) in sources.into_iter().enumerate() {
            match remote {
                Some(r) if i < SOURCES_LOGGED => {
                    out.push(record(&device, r.to_string(), reason, &s, 1));
                }
                _ => {
                    // Those past the cap were never told apart: at least one more.
                    others += usize::from(remote.is_some()).max(1);
                    rest.dropped += s.dropped;
                    rest.ports.extend(s.ports);
                    (rest.proto, rest.direction) = (s.proto, s.direction);
                }
            }
        }
        if rest.dropped > 0 {
            out.push(record(
                &device,
                "other sources".into(),
                reason,
                &rest,
                others,
            ));
        }
    }
    out
}

impl Watcher {
    pub fn new(orchestrator: Arc<Orchestrator>, engine: Arc<RuleEngine>) -> Self {
        Self {
            orchestrator,
            engine,
            pending: BTreeMap::new(),
            recent: HashMap::new(),
            alerted: HashMap::new(),
            names: HashMap::new(),
        }
    }

    fn refresh_names(&mut self) {
        self.names = self.orchestrator.device_names().unwrap_or_default();
    }

    fn take(&mut self, e: DropEvent) {
        if !self.names.contains_key(&e.ifindex) {
            self.refresh_names();
        }
        let Some(device) = self.names.get(&e.ifindex).cloned() else {
            return;
        };
        let remote = if e.family == 4 {
            IpAddr::from([e.remote[0], e.remote[1], e.remote[2], e.remote[3]])
        } else {
            IpAddr::from(e.remote)
        };
        let reason = Reason::from_u8(e.reason).map_or("unknown", Reason::label);
        self.orchestrator
            .metrics()
            .security_events
            .get_or_create(&crate::metrics::SecurityLabels {
                device: device.clone(),
                reason: reason.into(),
            })
            .inc();
        let mut key = (device.clone(), Some(remote), reason);
        if self.pending.len() >= PENDING_MAX && !self.pending.contains_key(&key) {
            key.1 = None;
        }
        let s = self.pending.entry(key).or_default();
        // The port that says what happened: the service a VM tried to reach, or the one
        // of the VM's that was probed.
        let port = if e.direction == DIR_EGRESS {
            e.remote_port
        } else {
            e.local_port
        };
        s.dropped += 1;
        s.ports.insert(port);
        s.proto = e.proto;
        s.direction = e.direction;
        let key = (device, remote);
        let watched = self.recent.len() < WATCHED_MAX || self.recent.contains_key(&key);
        if e.direction != DIR_EGRESS && watched {
            let now = Instant::now();
            let window = self.recent.entry(key).or_default();
            window.push_back((now, port));
            while window.len() > PORTS_WATCHED
                || window
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > SCAN_WINDOW)
            {
                window.pop_front();
            }
        }
    }

    /// Writes the summaries and raises the alerts the last second's drops call for.
    async fn flush(&mut self) {
        for body in summaries(std::mem::take(&mut self.pending)) {
            if let Err(e) = self.orchestrator.record(body) {
                warn!(error = %e, "recording a security event");
            }
        }
        let now = Instant::now();
        let mut signals = Vec::new();
        for ((device, remote), window) in &self.recent {
            let ports: BTreeSet<u16> = window.iter().map(|(_, p)| *p).collect();
            let fresh = self
                .alerted
                .get(device)
                .is_none_or(|t| now.duration_since(*t) > Duration::from_secs(SCAN_ALERT_TTL / 2));
            if ports.len() >= SCAN_PORTS && fresh {
                tracing::info!(device, %remote, ports = ports.len(), "port scan");
                self.alerted.insert(device.clone(), now);
                signals.push(Signal {
                    device: device.clone(),
                    body: SignalBody::Alert {
                        id: "port-scan".into(),
                        severity: Severity::High,
                        alert_kind: "port-scan".into(),
                        state: AlertState::Raised,
                    },
                    source: "datapath".into(),
                    at: Some(jiff::Timestamp::now()),
                    ttl: Some(SCAN_ALERT_TTL),
                });
            }
        }
        self.alerted
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(SCAN_ALERT_TTL));
        self.recent.retain(|_, w| {
            w.back()
                .is_some_and(|(t, _)| now.duration_since(*t) <= SCAN_WINDOW)
        });
        if !signals.is_empty()
            && let Err(e) = self.engine.ingest(signals).await
        {
            warn!(error = %e, "raising a port-scan alert");
        }
    }

    pub async fn run(mut self, ring: RingBuf<MapData>) {
        // SAFETY: the ring buffer owns its descriptor and lives inside the AsyncFd for as
        // long as it is registered; nothing else closes it.
        let mut fd = match unsafe { AsyncFd::register(ring) } {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "cannot watch the events ring buffer");
                return;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                guard = fd.readable_mut() => {
                    let Ok(mut guard) = guard else { return };
                    let ring = guard.get_inner_mut();
                    let mut events = Vec::new();
                    while let Some(item) = ring.next() {
                        if let Some(e) = decode(&item) {
                            events.push(e);
                        }
                    }
                    guard.clear_ready();
                    for e in events {
                        self.take(e);
                    }
                }
                _ = tick.tick() => self.flush().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_sources_makes_a_bounded_number_of_records() {
        let mut pending = BTreeMap::new();
        for i in 0..200u32 {
            let remote = IpAddr::from([198, 51, 100, (i % 250) as u8]);
            let remote = if i < 100 { Some(remote) } else { None };
            let s = pending
                .entry(("vm1".to_owned(), remote, "drop_default"))
                .or_insert_with(Summary::default);
            s.dropped += u64::from(i % 7 + 1);
            s.ports.insert(1000 + i as u16);
        }
        let total: u64 = pending.values().map(|s| s.dropped).sum();
        let busiest = pending
            .iter()
            .filter(|(k, _)| k.1.is_some())
            .map(|(_, s)| s.dropped)
            .max()
            .unwrap();
        let records = summaries(pending);
        assert_eq!(records.len(), SOURCES_LOGGED + 1, "{records:?}");
        assert!(records[0].result.starts_with(&format!("{busiest} dropped")));
        let logged: u64 = records
            .iter()
            .map(|r| r.result.split(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(logged, total, "every drop is in some record");
        let rest = records.last().unwrap();
        assert_eq!(rest.from.as_deref(), Some("other sources"));
        assert!(rest.detail["sources"].as_u64().unwrap() >= 100 - SOURCES_LOGGED as u64);
    }
}
