//! Prometheus metrics. Long-lived ones (shifts, latency, rule evaluations, API requests)
//! are updated where things happen; the datapath's counters and fill levels are read at
//! scrape time and encoded by a collector, so they are exact and survive restarts (they
//! live in the pinned maps).
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShiftLabels {
    pub trigger: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: String,
}

fn latency_histogram() -> Histogram {
    // 100 us to ~13 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Finer, for a figure with a target of a few milliseconds: bounds at the round numbers
/// an operator compares against (a p99 under 2 ms reads off the `le="0.002"` bucket).
fn fine_latency_histogram() -> Histogram {
    const BOUNDS_US: [u32; 30] = [
        100, 150, 200, 250, 300, 400, 500, 600, 700, 800, 900, 1_000, 1_250, 1_500, 1_750, 2_000,
        2_500, 3_000, 4_000, 5_000, 7_500, 10_000, 15_000, 20_000, 30_000, 50_000, 100_000,
        200_000, 500_000, 1_000_000,
    ];
    Histogram::new(BOUNDS_US.iter().map(|&us| f64::from(us) / 1e6))
}

#[derive(Clone)]
pub struct Metrics {
    pub shifts: Family<ShiftLabels, Counter>,
    pub shift_latency: Family<TriggerLabels, Histogram, fn() -> Histogram>,
    pub rule_evaluations: Counter,
    /// From a POST /context taken in to the flip of the shift it caused.
    pub signal_to_flip: Histogram,
    pub api_requests: Family<RequestLabels, Counter>,
    pub security_events: Family<SecurityLabels, Counter>,
    pub dhcp: Family<DhcpLabels, Counter>,
    pub metadata_requests: Family<MetadataLabels, Counter>,
    pub metadata_keys: Family<KeyLabels, Counter>,
    /// Connections to the metadata service from anything but a device's peer address.
    pub metadata_refused: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MetadataLabels {
    pub device: String,
    pub path: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub device: String,
    pub persona: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DhcpLabels {
    pub device: String,
    /// What the VM sent: discover, request, inform...
    pub message: String,
    /// offer, ack, nak, or none.
    pub answer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecurityLabels {
    pub device: String,
    pub reason: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            shifts: Family::default(),
            shift_latency: Family::new_with_constructor(latency_histogram),
            rule_evaluations: Counter::default(),
            signal_to_flip: fine_latency_histogram(),
            api_requests: Family::default(),
            security_events: Family::default(),
            dhcp: Family::default(),
            metadata_requests: Family::default(),
            metadata_keys: Family::default(),
            metadata_refused: Counter::default(),
        }
    }
}

/// What caused a shift, from the audit log's actor.
pub fn trigger(actor: &str) -> &'static str {
    match actor.split(':').next() {
        Some("rule") => "rule",
        Some("token") => "api",
        Some("daemon") => "reconcile",
        _ => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device: String,
    pub persona: String,
    pub direction: String,
    pub reason: String,
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabels {
    pub device: String,
    pub persona: String,
    pub interface: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

/// An address of an earlier persona that open flows of the device still use.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DrainLabels {
    pub device: String,
    pub persona: String,
    pub address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OneDevice {
    pub device: String,
}

/// A metric without labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NoLabels {}

/// The datapath as one scrape saw it.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub counters: Vec<(DeviceLabels, u64, u64)>,
    pub info: Vec<(InfoLabels, u64)>,
    pub flows: Vec<(OneDevice, u64)>,
    /// 1 while the device's interface is there and attached.
    pub up: Vec<(OneDevice, u64)>,
    pub failing: Vec<(OneDevice, u64)>,
    pub draining: Vec<(DrainLabels, u64)>,
    pub maps: Vec<(MapLabels, u64, u64)>,
    /// Per device: handshake counts per log2 microsecond bucket, and their sum.
    pub handshakes: Vec<(OneDevice, Vec<u64>, u64)>,
    /// How group commit has done, for a store that groups its writes.
    pub store: Option<StoreFigures>,
    /// Fleet mode: 1 per device whose host is not alive; and whether etcd is followed.
    pub orphaned: Vec<(OneDevice, u64)>,
    pub fleet_connected: Option<u64>,
    /// Per device and direction, the HTB class of its persona: bytes waiting, and
    /// packets dropped since the class was made.
    pub qos: Vec<(QosLabels, u64, u64)>,
}

#[derive(Debug, Default)]
pub struct StoreFigures {
    pub commits: u64,
    pub writes: u64,
    pub seconds: f64,
    pub largest: u64,
    pub intents: u64,
    pub covered: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QosLabels {
    pub device: String,
    pub persona: String,
    pub direction: String,
}

/// One gauge family, a value per label set.
fn gauge<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(L, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, n) in rows {
        ConstGauge::new(*n as i64).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut counter = |name: &str,
                           help: &str,
                           rows: Vec<(&DeviceLabels, u64)>|
         -> Result<(), std::fmt::Error> {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, v) in rows {
                ConstCounter::new(v).encode(family.encode_family(labels)?)?;
            }
            Ok(())
        };
        counter(
            "persona_device_packets",
            "Packets the persona programs handled, by device, the persona they were handled with, direction (egress = from the VM), reason and verdict",
            self.counters.iter().map(|(l, p, _)| (l, *p)).collect(),
        )?;
        counter(
            "persona_device_bytes",
            "Bytes the persona programs handled, by device, persona, direction, reason and verdict",
            self.counters.iter().map(|(l, _, b)| (l, *b)).collect(),
        )?;
        gauge(
            &mut encoder,
            "persona_qos_backlog_bytes",
            "Bytes waiting in the HTB class of the device's persona (over the uplinks for egress): its queueing delay is this over the rate",
            &self
                .qos
                .iter()
                .map(|(l, b, _)| (l.clone(), *b))
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut encoder,
            "persona_qos_dropped_packets",
            "Packets the HTB class of the device's persona dropped for a full queue, since the class was made",
            &self
                .qos
                .iter()
                .map(|(l, _, d)| (l.clone(), *d))
                .collect::<Vec<_>>(),
        )?;
        let mut info = encoder.encode_descriptor(
            "persona_device_generation",
            "The generation of the active persona, labelled with the persona: join on device",
            None,
            MetricType::Gauge,
        )?;
        for (l, g) in &self.info {
            ConstGauge::new(*g as i64).encode(info.encode_family(l)?)?;
        }
        gauge(
            &mut encoder,
            "persona_device_tracked_flows",
            "Live flows in connection tracking, by device, as of the last sweep (each second)",
            &self.flows,
        )?;
        if let Some(connected) = self.fleet_connected {
            gauge(
                &mut encoder,
                "persona_device_orphaned",
                "Fleet mode: 1 while the host the device names is not alive (its liveness lease lapsed); nobody moves it by itself",
                &self.orphaned,
            )?;
            gauge(
                &mut encoder,
                "persona_fleet_store_connected",
                "Fleet mode: 1 while this host follows etcd; 0 while it answers from what it last saw",
                &[(NoLabels {}, connected)],
            )?;
        }
        gauge(
            &mut encoder,
            "persona_device_up",
            "1 while the device's interface exists and is attached, 0 while it is gone (its VM stopped)",
            &self.up,
        )?;
        gauge(
            &mut encoder,
            "persona_device_failing",
            "1 while the device could not be attached or given its persona (status says why)",
            &self.failing,
        )?;
        gauge(
            &mut encoder,
            "persona_device_draining_flows",
            "Open flows still using an address of an earlier persona, which stays routed to the device until they end",
            &self.draining,
        )?;
        let mut rtt = encoder.encode_descriptor(
            "persona_tcp_handshake_seconds",
            "TCP handshake round trips seen on the tap, from the VM's SYN to the SYN-ACK",
            None,
            MetricType::Histogram,
        )?;
        for (l, buckets, sum_us) in &self.handshakes {
            let bounds: Vec<(f64, u64)> = buckets
                .iter()
                .enumerate()
                .map(|(b, n)| ((1u64 << b) as f64 / 1e6, *n))
                .collect();
            let count = buckets.iter().sum();
            rtt.encode_family(l)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    *sum_us as f64 / 1e6,
                    count,
                    &bounds,
                    None,
                )?;
        }
        if let Some(f) = &self.store {
            let counters = [
                (
                    "persona_store_commits",
                    "Store transactions committed (each syncs the disk once, but a covered write's)",
                    f.commits,
                ),
                (
                    "persona_store_writes",
                    "Writes committed: writes / commits is the mean group size",
                    f.writes,
                ),
                (
                    "persona_store_intents",
                    "Shift intents logged, their sync alongside the flip",
                    f.intents,
                ),
                (
                    "persona_store_covered_writes",
                    "Shift records answered on their intent's sync, without one of their own",
                    f.covered,
                ),
            ];
            for (name, help, n) in counters {
                let mut c = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(n).encode(c.encode_family(&NoLabels {})?)?;
            }
            let mut s = encoder.encode_descriptor(
                "persona_store_commit_seconds",
                "Time spent committing (mostly the disk's fsync)",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(f.seconds).encode(s.encode_family(&NoLabels {})?)?;
            gauge(
                &mut encoder,
                "persona_store_largest_group",
                "The most writes one commit has held",
                &[(NoLabels {}, f.largest)],
            )?;
        }
        let mut used = encoder.encode_descriptor(
            "persona_map_entries",
            "Entries in use in a datapath map",
            None,
            MetricType::Gauge,
        )?;
        for (l, n, _) in &self.maps {
            ConstGauge::new(*n as i64).encode(used.encode_family(l)?)?;
        }
        let mut cap = encoder.encode_descriptor(
            "persona_map_capacity",
            "Entries a datapath map can hold",
            None,
            MetricType::Gauge,
        )?;
        for (l, _, c) in &self.maps {
            ConstGauge::new(*c as i64).encode(cap.encode_family(l)?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// The text exposition: these metrics and the datapath snapshot, in one registry;
    /// OpenMetrics, or the classic Prometheus text format when `openmetrics` is false.
    pub fn render(&self, snapshot: Snapshot, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register(
            "persona_shifts",
            "Shifts, by what triggered them and how they ended",
            self.shifts.clone(),
        );
        registry.register(
            "persona_shift_duration_seconds",
            "Time from a shift's trigger to the flipped datapath (and the steps after it)",
            self.shift_latency.clone(),
        );
        registry.register(
            "persona_rule_evaluations",
            "Device evaluations by the rule engine",
            self.rule_evaluations.clone(),
        );
        registry.register(
            "persona_signal_to_flip_seconds",
            "From context signals taken in to the flipped datapath of the shift they caused (stored, decided, shifted)",
            self.signal_to_flip.clone(),
        );
        registry.register(
            "persona_api_requests",
            "API requests, by route, method and status",
            self.api_requests.clone(),
        );
        registry.register(
            "persona_security_events",
            "Firewall drops reported to userspace (rate limited in the kernel), by device and reason",
            self.security_events.clone(),
        );
        registry.register(
            "persona_dhcp_messages",
            "DHCP messages from VMs answered on their taps, by device, message and answer",
            self.dhcp.clone(),
        );
        registry.register(
            "persona_metadata_requests",
            "Requests to the metadata service, by device, path and status",
            self.metadata_requests.clone(),
        );
        registry.register(
            "persona_metadata_keys_served",
            "TLS private keys the metadata service handed to a device's VM, by device and persona",
            self.metadata_keys.clone(),
        );
        registry.register(
            "persona_metadata_refused",
            "Connections to the metadata service refused for not coming from a device",
            self.metadata_refused.clone(),
        );
        registry.register_collector(Box::new(snapshot));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(if openmetrics { out } else { classic(&out) })
    }
}

/// OpenMetrics text to the Prometheus 0.0.4 text format: counter families are named
/// with their `_total` suffix, and `# EOF` and `# UNIT` lines go.
fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT") {
            continue;
        }
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let family = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(h) = help.take() {
                let text = h
                    .strip_prefix("# HELP ")
                    .and_then(|r| r.split_once(' '))
                    .map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
