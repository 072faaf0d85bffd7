//! Security events: firewall drops arrive through the ring buffer, are summed per
//! device and source into the audit log once a second, and a source that probes many
//! ports in a short time raises a `port-scan` alert for the rule engine.
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
    model::DeviceSpec,
    orchestrator::Orchestrator,
    rules::{
        runner::RuleEngine,
        signals::{AlertState, Severity, Signal, SignalBody},
    },
    store::{EventBody, Kind},
};

/// Distinct ports one source must hit within `SCAN_WINDOW` to count as a scan.
const SCAN_PORTS: usize = 10;
const SCAN_WINDOW: Duration = Duration::from_secs(10);
/// How long a scan alert stays open without new evidence.
const SCAN_ALERT_TTL: u64 = 600;

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
    pending: BTreeMap<(String, IpAddr, &'static str), Summary>,
    recent: HashMap<(String, IpAddr), VecDeque<(Instant, u16)>>,
    alerted: HashMap<(String, IpAddr), Instant>,
    names: HashMap<u32, String>,
}

fn decode(bytes: &[u8]) -> Option<DropEvent> {
    (bytes.len() >= size_of::<DropEvent>())
        // SAFETY: the kernel wrote a DropEvent; read it without assuming alignment.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
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
        self.names.clear();
        let Ok(devices) = self.orchestrator.store().list(Kind::Device) else {
            return;
        };
        for d in devices {
            if let Ok(spec) = serde_json::from_value::<DeviceSpec>(d.spec)
                && let Ok(ifindex) = crate::datapath::ifindex(&spec.interface)
            {
                self.names.insert(ifindex, d.name);
            }
        }
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
        let s = self
            .pending
            .entry((device.clone(), remote, reason))
            .or_default();
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
        if e.direction != DIR_EGRESS {
            let now = Instant::now();
            let window = self.recent.entry((device, remote)).or_default();
            window.push_back((now, port));
            while window
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > SCAN_WINDOW)
            {
                window.pop_front();
            }
        }
    }

    /// Writes the summaries and raises the alerts the last second's drops call for.
    async fn flush(&mut self) {
        for ((device, remote, reason), s) in std::mem::take(&mut self.pending) {
            let ports: Vec<u16> = s.ports.iter().copied().take(32).collect();
            let body = EventBody {
                kind: "security".into(),
                actor: "datapath".into(),
                device: Some(device),
                from: Some(remote.to_string()),
                to: None,
                generation: None,
                result: format!("{} dropped ({reason})", s.dropped),
                duration_us: None,
                detail: json!({
                    "direction": if s.direction == DIR_EGRESS { "egress" } else { "ingress" },
                    "proto": s.proto,
                    "ports": ports,
                }),
            };
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
                .get(&(device.clone(), *remote))
                .is_none_or(|t| now.duration_since(*t) > Duration::from_secs(SCAN_ALERT_TTL / 2));
            if ports.len() >= SCAN_PORTS && fresh {
                signals.push(Signal {
                    device: device.clone(),
                    body: SignalBody::Alert {
                        id: format!("scan-{remote}"),
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
        for s in &signals {
            if let SignalBody::Alert { id, .. } = &s.body
                && let Some(remote) = id.strip_prefix("scan-").and_then(|r| r.parse().ok())
            {
                self.alerted.insert((s.device.clone(), remote), now);
            }
        }
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
