//! A shift as an explicit plan — stage tables, flip, host routes, DNS, firewall — that
//! can be shown without running it, executed by appliers, rolled back on failure and
//! recorded in the audit log.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Instant,
};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, oneshot};

mod catalog;
mod devices;

use crate::{
    datapath::{Sweep, worker::DatapathHandle},
    model::{AddressScope, DeviceSpec, FlowMode, PersonaSpec},
    node::{Applied, Step as TxStep, StepFailed},
    store::{DeviceState, Event, EventBody, Record, Store, StoreError},
    tls_applier::TlsApplier,
};

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Write the persona's tables into a free slot, invisible to packets.
    StageTables { prefixes: usize },
    /// Route and announce the new addresses before the flip.
    HostRoutes { announce: Vec<IpAddr> },
    /// The one map update after which every packet sees the new persona, and what
    /// becomes of the flows open before it.
    Flip {
        from_generation: Option<u64>,
        flows: FlowMode,
    },
    /// Where the VM's DNS queries go from now on.
    Dns { resolvers: Vec<IpAddr> },
    /// Rule changes, as lines of a diff.
    Firewall { diff: Vec<String> },
    /// The certificate chain and key installed for the device (or removed).
    Tls { names: Vec<String>, install: bool },
    /// WireGuard peer the persona uses (set up by the VPN applier).
    Vpn { endpoint: Option<String> },
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Plan {
    pub device: String,
    pub from: Option<String>,
    pub to: String,
    pub steps: Vec<Step>,
    /// What changes, "-" for what goes and "+" for what comes.
    pub diff: Vec<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Outcome {
    pub plan: Plan,
    pub dry_run: bool,
    pub generation: Option<u64>,
    pub duration_us: u64,
    pub event: u64,
}

/// A shift as asked for; no persona asks for the one the store says the device runs.
pub struct Asked<'a> {
    pub device: &'a str,
    pub persona: Option<&'a str>,
    pub actor: &'a str,
    pub dry_run: bool,
    pub flows: Option<FlowMode>,
    pub cause: Option<(String, Value)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ShiftError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(#[from] crate::model::FieldError),
    #[error("stored {kind} {name:?} does not parse: {reason}")]
    Corrupt {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("{address} is held by {holder}")]
    Held { address: String, holder: String },
    #[error("shift failed, device left on {kept}: {reason}")]
    RolledBack { kept: String, reason: String },
    #[error("shift failed: {0}")]
    Failed(String),
    /// Something on the host refuses it as things are (a VM holds the tap).
    #[error("{0}")]
    Busy(String),
    /// What the host that runs the device answered (fleet mode), with its HTTP status.
    #[error("{message}")]
    Remote { status: u16, message: String },
}

impl ShiftError {
    /// The HTTP status the API answers it with.
    pub fn status(&self) -> u16 {
        match self {
            ShiftError::Store(StoreError::NotFound { .. }) => 404,
            ShiftError::Store(StoreError::Exists { .. } | StoreError::Conflict { .. }) => 409,
            ShiftError::Store(StoreError::Unavailable(_)) => 503,
            ShiftError::Store(StoreError::Forbidden(_)) => 403,
            ShiftError::Store(StoreError::Backend(_)) | ShiftError::Corrupt { .. } => 500,
            ShiftError::Invalid(_) => 422,
            ShiftError::Held { .. } | ShiftError::Busy(_) => 409,
            ShiftError::RolledBack { .. } | ShiftError::Failed(_) => 502,
            ShiftError::Remote { status, .. } => *status,
        }
    }
}

fn lines(prefix: char, items: impl IntoIterator<Item = String>) -> impl Iterator<Item = String> {
    items.into_iter().map(move |i| format!("{prefix} {i}"))
}

fn set_diff(what: &str, old: BTreeSet<String>, new: BTreeSet<String>) -> Vec<String> {
    let gone = old.difference(&new).map(|x| format!("{what} {x}"));
    let come = new.difference(&old).map(|x| format!("{what} {x}"));
    lines('-', gone.collect::<Vec<_>>())
        .chain(lines('+', come.collect::<Vec<_>>()))
        .collect()
}

/// Diff lines kept in a plan's firewall step: a plan is recorded with every shift, and
/// two large personas can differ in every rule.
const FIREWALL_DIFF_LINES: usize = 100;

/// `set_diff` over borrowed sets, at most [`FIREWALL_DIFF_LINES`] lines and a count of
/// the rest.
fn set_diff_ref(what: &str, old: &BTreeSet<String>, new: &BTreeSet<String>) -> Vec<String> {
    let gone = old.difference(new).map(|x| format!("- {what} {x}"));
    let come = new.difference(old).map(|x| format!("+ {what} {x}"));
    let mut all = gone.chain(come);
    let mut out: Vec<String> = all.by_ref().take(FIREWALL_DIFF_LINES).collect();
    let rest = all.count();
    if rest > 0 {
        out.push(format!("… {rest} more {what} lines"));
    }
    out
}

fn rule_lines(spec: &PersonaSpec) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (dir, d) in [
        ("egress", &spec.firewall.egress),
        ("ingress", &spec.firewall.ingress),
    ] {
        out.insert(format!("{dir} default {:?}", d.default).to_lowercase());
        for r in &d.rules {
            let ports = r.ports.map(|p| format!(" ports {p}")).unwrap_or_default();
            out.insert(
                format!("{dir} {:?} {}{ports} {:?}", r.action, r.cidr, r.protocol).to_lowercase(),
            );
        }
    }
    out
}

/// What shifting from `old` to `new` does, step by step.
pub fn plan(
    device: &str,
    old: Option<(&str, &PersonaSpec, u64)>,
    to: &str,
    new: &PersonaSpec,
    compiled: &crate::datapath::CompiledPersona,
    flows: FlowMode,
) -> Result<Plan, ShiftError> {
    let old_rules = old.map(|o| rule_lines(o.1)).unwrap_or_default();
    let fw = set_diff_ref("firewall", &old_rules, &rule_lines(new));
    plan_with(device, old, to, new, compiled, flows, fw)
}

/// [`plan`] with the firewall's diff lines given (from the catalog).
fn plan_with(
    device: &str,
    old: Option<(&str, &PersonaSpec, u64)>,
    to: &str,
    new: &PersonaSpec,
    compiled: &crate::datapath::CompiledPersona,
    flows: FlowMode,
    fw: Vec<String>,
) -> Result<Plan, ShiftError> {
    let addrs = |s: &PersonaSpec| {
        s.addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<BTreeSet<_>>()
    };
    let dns = |s: &PersonaSpec| s.dns.iter().map(|a| a.to_string()).collect::<BTreeSet<_>>();
    let empty = BTreeSet::new;
    let mut diff = set_diff(
        "address",
        old.map_or_else(empty, |o| addrs(o.1)),
        addrs(new),
    );
    diff.extend(set_diff(
        "dns",
        old.map_or_else(empty, |o| dns(o.1)),
        dns(new),
    ));
    diff.extend(fw.iter().cloned());
    Ok(Plan {
        device: device.into(),
        from: old.map(|o| o.0.to_owned()),
        to: to.into(),
        steps: vec![
            Step::StageTables {
                prefixes: compiled.prefix_count(),
            },
            Step::HostRoutes {
                announce: compiled.addresses(),
            },
            Step::Flip {
                from_generation: old.map(|o| o.2),
                flows,
            },
            Step::Dns {
                resolvers: new.dns.clone(),
            },
            Step::Firewall { diff: fw },
            Step::Tls {
                names: new
                    .tls
                    .as_ref()
                    .map(|t| t.names.clone())
                    .unwrap_or_default(),
                install: new.tls.is_some(),
            },
            Step::Vpn {
                endpoint: new.vpn.as_ref().map(|v| v.wireguard.endpoint.clone()),
            },
        ],
        diff,
    })
}

/// The addresses a shift in flight chose, held for it until it returns.
struct Claim {
    claims: Arc<std::sync::Mutex<HashMap<String, Vec<IpAddr>>>>,
    device: String,
}

impl Claim {
    fn new(
        claims: &Arc<std::sync::Mutex<HashMap<String, Vec<IpAddr>>>>,
        device: &str,
        addresses: Vec<IpAddr>,
    ) -> Self {
        claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(device.to_owned(), addresses);
        Self {
            claims: claims.clone(),
            device: device.to_owned(),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.device);
    }
}

pub struct Orchestrator {
    store: Arc<dyn Store>,
    /// Personas parsed and compiled once per stored version.
    catalog: catalog::Catalog,
    tls: TlsApplier,
    metrics: Arc<crate::metrics::Metrics>,
    datapath: DatapathHandle,
    events: broadcast::Sender<Event>,
    /// Shifts hold it shared (and their device's own lock besides); whatever changes
    /// devices or personas, or sweeps, holds it alone.
    lock: tokio::sync::RwLock<()>,
    /// One per device: its shifts never interleave.
    device_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Shifts choose their addresses one at a time...
    leasing: tokio::sync::Mutex<()>,
    /// ...and hold them here, by device, until their state is stored: two devices
    /// shifting at once never take the same address.
    claims: Arc<std::sync::Mutex<HashMap<String, Vec<IpAddr>>>>,
    /// What the last sweep of connection tracking found.
    swept: std::sync::Mutex<Sweep>,
    fault: Option<TxStep>,
    /// The ifindex each attached device's interface had when it was attached.
    interfaces: std::sync::Mutex<HashMap<u32, String>>,
    /// Devices that could not be attached or given their persona, with why.
    failing: std::sync::Mutex<HashMap<String, String>>,
    /// The counts of devices whose interface went, until it comes back.
    carried: std::sync::Mutex<
        HashMap<String, std::collections::BTreeMap<u32, crate::datapath::Counters>>,
    >,
    /// The fleet this host belongs to, in fleet mode: it runs only its own devices.
    fleet: Option<Arc<crate::fleet::Fleet>>,
    /// Shifts under way, waiting for their locks included.
    shifting: std::sync::atomic::AtomicUsize,
}

/// Counts a shift as under way while it lives.
struct Underway<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Underway<'a> {
    /// Counts one more; gives it with the shifts now under way, this one included.
    fn start(count: &'a std::sync::atomic::AtomicUsize) -> (Self, usize) {
        let now = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        (Self(count), now)
    }
}

impl Drop for Underway<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A shift's record, submitted to the store: answered once it is durable.
type Submitted = oneshot::Receiver<Result<Event, StoreError>>;

/// Submits a shift's record given the flip's generation and time, on the datapath's
/// thread right after the flip.
type AfterFlip = Box<dyn FnOnce(u64, std::time::Duration) -> Submitted + Send>;

fn parse<T: serde::de::DeserializeOwned>(r: &Record) -> Result<T, ShiftError> {
    serde_json::from_value(r.spec.clone()).map_err(|e| ShiftError::Corrupt {
        kind: r.kind.label(),
        name: r.name.clone(),
        reason: e.to_string(),
    })
}

fn not_found(kind: &'static str, name: &str) -> ShiftError {
    ShiftError::Store(StoreError::NotFound {
        kind,
        name: name.into(),
    })
}

impl Orchestrator {
    pub fn new(
        store: Arc<dyn Store>,
        datapath: DatapathHandle,
        events: broadcast::Sender<Event>,
        tls: TlsApplier,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            store,
            catalog: Default::default(),
            tls,
            metrics,
            datapath,
            events,
            lock: Default::default(),
            device_locks: Default::default(),
            leasing: Default::default(),
            claims: Default::default(),
            swept: Default::default(),
            fault: None,
            interfaces: Default::default(),
            failing: Default::default(),
            carried: Default::default(),
            shifting: Default::default(),
            fleet: None,
        }
    }

    /// A host of a fleet: it programs only the devices that name it.
    pub fn with_fleet(mut self, fleet: Arc<crate::fleet::Fleet>) -> Self {
        self.fleet = Some(fleet);
        self
    }

    pub fn fleet(&self) -> Option<&Arc<crate::fleet::Fleet>> {
        self.fleet.as_ref()
    }

    /// After a persona changed: the devices here running an older version of it take
    /// `version` (a fleet's other hosts do the same for theirs, from their watch).
    pub async fn reapply_persona(
        self: &Arc<Self>,
        persona: &str,
        version: u64,
        actor: &str,
    ) -> Result<(), ShiftError> {
        // Its rules are written once, now, not by the first shift to it. A failure here
        // only leaves that to the shift.
        let prepared = match self.catalog.persona(&*self.store, persona) {
            Ok(entry) => {
                let compiled = entry.compiled.clone();
                self.datapath
                    .call(move |dp| dp.prepare(&compiled))
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = prepared {
            tracing::warn!(persona, error = %e, "writing the persona's rules ahead");
        }
        // Through the devices that run a persona, not every device defined.
        for (name, s) in self.store.device_states()? {
            if s.persona == persona
                && s.persona_version != version
                && self
                    .device(&name)?
                    .is_some_and(|spec| self.runs_here(&spec))
            {
                self.shift(&name, persona, actor, false, None).await?;
            }
        }
        Ok(())
    }

    /// Whether this host runs the device: every device on its own, its own in a fleet.
    pub fn runs_here(&self, spec: &DeviceSpec) -> bool {
        self.fleet.as_ref().is_none_or(|f| f.runs(spec))
    }

    /// The last sweep's findings: open flows and draining addresses per ifindex.
    pub fn swept(&self) -> Sweep {
        self.swept.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Sweeps connection tracking: dead flows go, flow budgets are recounted, and
    /// addresses of earlier personas no open flow uses are withdrawn, each recorded in
    /// the audit log.
    pub async fn sweep(&self) -> Result<Sweep, ShiftError> {
        // Never between a shift's flip and its commit: an address the shift just made
        // active again still has its drain record until the commit.
        let _guard = self.lock.write().await;
        let sweep = self
            .datapath
            .on_node(|n| n.sweep())
            .await
            .and_then(|r| r)
            .map_err(|e| ShiftError::Failed(e.to_string()))?;
        if !sweep.released.is_empty() {
            let names = self.device_names()?;
            for (ifindex, addr) in &sweep.released {
                self.record(EventBody {
                    kind: "release".into(),
                    actor: "daemon:sweep".into(),
                    device: names.get(ifindex).cloned(),
                    from: None,
                    to: None,
                    generation: None,
                    result: "ok".into(),
                    duration_us: None,
                    detail: json!({ "address": addr, "why": "no open flow uses it any more" }),
                })?;
            }
        }
        if let Ok(mut s) = self.swept.lock() {
            *s = sweep.clone();
        }
        Ok(sweep)
    }

    /// Stored devices by the ifindex of their interface now.
    pub fn device_names(&self) -> Result<std::collections::HashMap<u32, String>, ShiftError> {
        let mut out = std::collections::HashMap::new();
        for (name, spec) in self.devices()? {
            if let Ok(ifindex) = crate::datapath::ifindex(&spec.interface) {
                out.insert(ifindex, name);
            }
        }
        Ok(out)
    }

    /// Every stored device that parses, by name, each parsed once per version.
    pub fn devices(&self) -> Result<Vec<(String, Arc<DeviceSpec>)>, ShiftError> {
        self.catalog.devices(&*self.store)
    }

    /// The stored personas that declare an address in `scope`, fixed or in a pool.
    pub fn personas_overlapping(&self, scope: &AddressScope) -> Result<Vec<String>, ShiftError> {
        self.catalog.overlapping(&*self.store, scope)
    }

    /// One stored device, parsed once per version; `None` when there is none.
    pub fn device(&self, name: &str) -> Result<Option<Arc<DeviceSpec>>, ShiftError> {
        self.catalog.device(&*self.store, name)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Where personas' private keys are read from.
    pub fn keys(&self) -> &crate::keys::KeyDir {
        self.tls.keys()
    }

    /// The device's TLS files in force (see [`TlsApplier::current`]).
    pub fn tls_files(&self, device: &str) -> std::path::PathBuf {
        self.tls.current(device)
    }

    pub fn record(&self, body: EventBody) -> Result<Event, StoreError> {
        let event = self.store.append_event(body)?;
        let _ = self.events.send(event.clone());
        Ok(event)
    }

    /// An event the store recorded by other means, for those following the log.
    pub fn recorded(&self, event: Event) {
        let _ = self.events.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    pub fn datapath(&self) -> &DatapathHandle {
        &self.datapath
    }

    /// Holds off shifts, sweeps and device changes while the caller checks and writes
    /// something they depend on (a persona's addresses).
    pub async fn serialized(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.lock.write().await
    }

    fn device_lock(&self, device: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.device_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(device.to_owned()).or_default().clone()
    }

    /// Fails every shift at `step` (tests of the undo).
    pub fn with_fault(mut self, step: Option<TxStep>) -> Self {
        self.fault = step;
        self
    }

    /// Shifts `device` to `persona`, or only says what that would do.
    pub async fn shift(
        self: &Arc<Self>,
        device: &str,
        persona: &str,
        actor: &str,
        dry_run: bool,
        flows: Option<FlowMode>,
    ) -> Result<Outcome, ShiftError> {
        self.shift_for(device, persona, actor, dry_run, flows, None)
            .await
    }

    /// A shift with its cause recorded: the rule that chose it and the signals behind it.
    /// `flows`, when given, overrides the persona's own choice for open flows.
    ///
    /// The shift runs as a task of its own: a caller that goes away (an HTTP client
    /// hanging up) never leaves it between its flip and its commit or undo.
    pub async fn shift_for(
        self: &Arc<Self>,
        device: &str,
        persona: &str,
        actor: &str,
        dry_run: bool,
        flows: Option<FlowMode>,
        cause: Option<(String, Value)>,
    ) -> Result<Outcome, ShiftError> {
        self.run_shift(device, Some(persona), actor, dry_run, flows, cause)
            .await
    }

    /// Applies again the persona the store says the device runs (its starting persona
    /// when it has none), chosen under the lock: a shift that lands meanwhile is not
    /// undone by a stale choice.
    pub async fn restore(
        self: &Arc<Self>,
        device: &str,
        actor: &str,
    ) -> Result<Outcome, ShiftError> {
        self.run_shift(device, None, actor, false, None, None).await
    }

    async fn run_shift(
        self: &Arc<Self>,
        device: &str,
        persona: Option<&str>,
        actor: &str,
        dry_run: bool,
        flows: Option<FlowMode>,
        cause: Option<(String, Value)>,
    ) -> Result<Outcome, ShiftError> {
        if let (Some(fleet), Some(persona)) = (&self.fleet, persona) {
            let spec = self
                .device(device)?
                .ok_or_else(|| not_found("Device", device))?;
            if !fleet.runs(&spec) {
                let Some(host) = spec.host.as_deref() else {
                    return Err(ShiftError::Invalid(crate::model::FieldError::new(
                        "spec.host",
                        format!("device {device:?} names no host to run on"),
                    )));
                };
                let asked = Asked {
                    device,
                    persona: Some(persona),
                    actor,
                    dry_run,
                    flows,
                    cause,
                };
                return fleet.shift_on(host, asked).await;
            }
        }
        let start = Instant::now();
        let this = self.clone();
        let (d, p, a) = (
            device.to_owned(),
            persona.map(str::to_owned),
            actor.to_owned(),
        );
        let (answer, answered) = oneshot::channel();
        tokio::spawn(async move {
            let mut answer = Some(answer);
            let asked = Asked {
                device: &d,
                persona: p.as_deref(),
                actor: &a,
                dry_run,
                flows,
                cause,
            };
            let result = this.shift_inner(asked, &mut answer).await;
            if let Some(answer) = answer {
                let _ = answer.send(result);
            }
        });
        let result = answered
            .await
            .unwrap_or_else(|_| Err(ShiftError::Failed("the shift task failed".into())));
        let trigger = crate::metrics::trigger(actor).to_owned();
        let outcome = match &result {
            Ok(o) if o.dry_run => "dry_run",
            Ok(_) => "ok",
            Err(ShiftError::RolledBack { .. }) => "rolled_back",
            Err(ShiftError::Held { .. }) => "conflict",
            Err(_) => "refused",
        };
        self.metrics
            .shifts
            .get_or_create(&crate::metrics::ShiftLabels {
                trigger: trigger.clone(),
                result: outcome.into(),
            })
            .inc();
        if outcome == "ok" {
            self.metrics
                .shift_latency
                .get_or_create(&crate::metrics::TriggerLabels { trigger })
                .observe(start.elapsed().as_secs_f64());
        }
        result
    }

    /// The shift, its caller answered through `answer` once it is durable: what is left
    /// then only tidies up.
    async fn shift_inner(
        &self,
        asked: Asked<'_>,
        answer: &mut Option<oneshot::Sender<Result<Outcome, ShiftError>>>,
    ) -> Result<Outcome, ShiftError> {
        let Asked {
            device,
            persona,
            actor,
            dry_run,
            flows,
            cause,
        } = asked;
        let (_underway, underway) = Underway::start(&self.shifting);
        let _shared = self.lock.read().await;
        let own = self.device_lock(device);
        let _own = own.lock().await;
        let start = Instant::now();
        let device_spec = self
            .device(device)?
            .ok_or_else(|| not_found("Device", device))?;
        let persona = match persona {
            Some(p) => p.to_owned(),
            None => self
                .store
                .device_state(device)?
                .map(|s| s.persona)
                .or_else(|| device_spec.persona.clone())
                .ok_or_else(|| {
                    ShiftError::Invalid(crate::model::FieldError::new(
                        "spec.persona",
                        format!("device {device:?} has no persona to run"),
                    ))
                })?,
        };
        let persona = persona.as_str();
        let entry = self.catalog.persona(&*self.store, persona)?;
        let declared = &*entry.spec;
        let state = self.store.device_state(device)?;
        let (leases, _claim) = self
            .lease(
                device,
                persona,
                declared,
                state.as_ref(),
                self.interface_of(&device_spec.interface),
            )
            .await?;
        let (new, compiled) = entry.leased(&leases)?;
        // What the device runs now, when its persona still is there and compiles: its
        // addresses for the plan, its wiring to put back on undo.
        let old_entry = state
            .as_ref()
            .and_then(|s| self.catalog.persona(&*self.store, &s.persona).ok());
        let old_run = match (&state, &old_entry) {
            (Some(s), Some(e)) => e.leased(&s.leases).ok(),
            _ => None,
        };
        let old = match (&state, &old_run) {
            (Some(s), Some((spec, _))) => Some((s.persona.as_str(), &**spec, s.generation)),
            _ => None,
        };
        let flows = flows.or(declared.flows).unwrap_or_default();
        let fw = self.catalog.firewall_diff(
            state
                .as_ref()
                .zip(old_entry.as_deref())
                .map(|(s, e)| (s.persona.as_str(), e)),
            (persona, &entry),
        );
        let plan = plan_with(device, old, persona, &new, &compiled, flows, (*fw).clone())?;
        let mut body = EventBody {
            kind: "shift".into(),
            actor: actor.into(),
            device: Some(device.into()),
            from: state.as_ref().map(|s| s.persona.clone()),
            to: Some(persona.into()),
            generation: None,
            result: String::new(),
            duration_us: None,
            detail: Value::Null,
        };
        let detail = |plan: &Plan| {
            let mut detail = json!({ "plan": plan });
            if let Some((rule, why)) = &cause {
                detail["cause"] = json!({ "rule": rule, "why": why });
            }
            detail
        };
        body.detail = detail(&plan);
        if dry_run {
            body.result = "dry-run".into();
            let event = self.record(body)?;
            return Ok(Outcome {
                plan,
                dry_run,
                generation: None,
                duration_us: 0,
                event: event.seq,
            });
        }

        let kept = || {
            state
                .as_ref()
                .map_or_else(|| "no persona".to_owned(), |s| s.persona.clone())
        };
        let failed = |body: &mut EventBody, f: &StepFailed| {
            body.duration_us = Some(start.elapsed().as_micros() as u64);
            body.result = format!("rolled back at {}: {}", f.step, f.reason);
            body.detail["failed_step"] = json!(f.step);
        };
        // The state and record this shift will write, logged while the datapath flips.
        // A failure's record, a durable write, drops them from the log (should that
        // write fail too, a restart applies the shift again). The plan stays out: a
        // record replayed from it says only what shifted, and why.
        let planned = DeviceState {
            persona: persona.into(),
            persona_version: entry.stamp.version,
            generation: 0,
            since: jiff::Timestamp::now(),
            rule: cause.as_ref().map(|c| c.0.clone()),
            leases,
        };
        let plan_detail = std::mem::take(&mut body.detail);
        // Only a shift alone logs one: its sync then holds up this thread, and under
        // load the store's group commit shares one sync among many shifts anyway.
        let intent = (underway == 1)
            .then(|| {
                self.store.log_intent(
                    device,
                    &planned,
                    &EventBody {
                        result: "ok".into(),
                        detail: plan_detail
                            .get("cause")
                            .map_or(Value::Null, |c| json!({ "cause": c })),
                        ..body.clone()
                    },
                )
            })
            .flatten();
        // The record of success, given the flip's generation and time: the plan's
        // detail moves to it; a failure writes it again.
        let mut done = EventBody {
            detail: plan_detail,
            ..body.clone()
        };
        let succeeded = move |generation: u64, flip: std::time::Duration| {
            done.duration_us = Some(start.elapsed().as_micros() as u64);
            done.generation = Some(generation);
            done.result = "ok".into();
            done.detail["flip_us"] = json!(flip.as_secs_f64() * 1e6);
            (
                DeviceState {
                    generation,
                    ..planned
                },
                done,
            )
        };
        // With no TLS step to run after the flip, the datapath's thread submits the
        // record as soon as it has flipped, while this one syncs the intent.
        let mut succeeded = Some(succeeded);
        let submit: Option<AfterFlip> = match (intent, self.fault) {
            (Some(id), None) if self.tls.unchanged(device, new.tls.as_ref()) => {
                succeeded.take().map(|succeeded| {
                    let (store, device) = (self.store.clone(), device.to_owned());
                    Box::new(move |generation, flip| {
                        let (state, done) = succeeded(generation, flip);
                        store.submit_state(&device, Some(state), done, Some(id))
                    }) as AfterFlip
                })
            }
            _ => None,
        };
        // Only its wiring is put back on undo (addresses, gateway, tunnel).
        let previous = old_run.as_ref().map(|(_, c)| c.clone());
        let applying = self.apply(&device_spec, compiled, previous, flows, submit);
        // The intent's sync, on this thread while the datapath's flips: intents are
        // logged only by a shift alone on an idle store, so this holds up no other
        // write. One that failed leaves the record after the flip to sync on its own.
        if let Some(id) = intent
            && let Err(e) = self.store.sync_intent(id)
        {
            tracing::warn!(device, error = %e, "syncing the shift's intent");
        }
        let applied = applying.await;
        let (applied, submitted) = match applied {
            Ok(a) => a,
            Err(f) => {
                body.detail = detail(&plan);
                failed(&mut body, &f);
                self.record(body)?;
                return Err(ShiftError::RolledBack {
                    kept: kept(),
                    reason: f.to_string(),
                });
            }
        };
        self.attached_at(applied.ifindex, &device_spec.interface);
        let (generation, flip) = applied.flip_outcome();
        let old_tls = old_run.as_ref().and_then(|(o, _)| o.tls.as_ref());
        // The state and the audit record of it in one transaction, waited for off the
        // async threads: other requests go on, and their writes join the same commit.
        let stored = match (submitted, succeeded) {
            (Some(submitted), _) => Ok(submitted),
            (None, Some(succeeded)) => {
                let tls = match self.fault {
                    Some(TxStep::Tls) => Err("injected fault".to_owned()),
                    _ => self
                        .tls
                        .install(device, persona, generation, new.tls.as_ref()),
                }
                .map_err(|why| StepFailed::new(TxStep::Tls, why));
                match (tls, self.fault) {
                    (Err(f), _) => Err(f),
                    (Ok(()), Some(TxStep::Store)) => {
                        Err(StepFailed::new(TxStep::Store, "injected fault"))
                    }
                    (Ok(()), _) => {
                        let (state, done) = succeeded(generation, flip);
                        Ok(self.store.submit_state(device, Some(state), done, intent))
                    }
                }
            }
            (None, None) => Err(StepFailed::new(
                TxStep::Store,
                "the datapath gave no record of the shift",
            )),
        };
        let stored = match stored {
            Ok(submitted) => submitted
                .await
                .map_err(|_| StoreError::Backend("the store's writer dropped the shift".into()))
                .and_then(|r| r)
                .map_err(|e| StepFailed::new(TxStep::Store, e)),
            Err(f) => Err(f),
        };
        if let Err(f) = &stored
            && f.step == TxStep::Store
        {
            // The TLS step ran: the previous persona's identity goes back (none when
            // the device had no persona).
            let (p, g) = state
                .as_ref()
                .map_or((persona, 0), |s| (s.persona.as_str(), s.generation));
            if let Err(e) = self.tls.install(device, p, g, old_tls) {
                tracing::error!(device, error = %e, "restoring the previous TLS identity");
            }
        }
        let event = match stored {
            Ok(event) => event,
            Err(f) => {
                let undone = self.datapath.on_node(move |n| n.undo(applied)).await;
                let reason = match undone {
                    Ok(Ok(())) => f.reason.clone(),
                    Ok(Err(e)) => {
                        format!("{}; undoing the steps before it failed too: {e}", f.reason)
                    }
                    Err(e) => format!("{}; undoing the steps before it failed too: {e}", f.reason),
                };
                let f = StepFailed::new(f.step, reason);
                body.detail = detail(&plan);
                failed(&mut body, &f);
                if f.step == TxStep::Store {
                    // The store may have kept the record it could not make durable: the
                    // state the device keeps goes back, durably, before the failure's.
                    self.store.set_device_state(device, state.as_ref())?;
                }
                self.record(body)?;
                return Err(ShiftError::RolledBack {
                    kept: kept(),
                    reason: f.to_string(),
                });
            }
        };
        let duration_us = event.body.duration_us.unwrap_or_default();
        let seq = event.seq;
        let _ = self.events.send(event);
        let outcome = Outcome {
            plan,
            dry_run,
            generation: Some(generation),
            duration_us,
            event: seq,
        };
        // Past the point of no return: what is left only tidies up after the old persona,
        // queued on the node before the caller hears, so that whatever the caller asks of
        // the datapath next finds it done. A cut's caller hears once its resets are sent.
        // What it did beyond that is rare (a cut's resets, a failure) and recorded apart.
        let committed = self.datapath.queue_on_node(move |n| n.commit(applied));
        if flows != FlowMode::Cut
            && let Some(answer) = answer.take()
        {
            let _ = answer.send(Ok(outcome.clone()));
        }
        let committed = match committed {
            Ok(c) => c.await,
            Err(e) => Err(e),
        };
        let tidied = match committed {
            Ok(Ok(c)) if c.resets > 0 => Some(json!({ "resets": c.resets })),
            Ok(Ok(_)) => None,
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(device, error = %e, "finishing the shift");
                Some(json!({ "commit_error": e.to_string() }))
            }
        };
        if let Some(detail) = tidied {
            self.record(EventBody {
                kind: "commit".into(),
                actor: body.actor,
                device: Some(device.into()),
                from: body.from,
                to: body.to,
                generation: Some(generation),
                result: "ok".into(),
                duration_us: None,
                detail: json!({ "shift": seq, "commit": detail }),
            })?;
        }
        Ok(outcome)
    }

    /// The addresses in `scope` that a device other than `device` (attached at `own`)
    /// holds, with who holds it: those of the persona it runs (its leases for a pooled
    /// one), and those still draining for its open flows. Looked up in indexes by
    /// persona and by address: what it costs grows with what it finds, not with the
    /// number of devices.
    async fn held(
        &self,
        device: &str,
        own: Option<u32>,
        scope: &AddressScope,
    ) -> Result<HashMap<IpAddr, String>, ShiftError> {
        let mut held = HashMap::new();
        let personas = self.catalog.declaring(&*self.store, scope)?;
        for (name, s) in self.store.states_holding(&personas, scope)? {
            if name == device {
                continue;
            }
            for a in self.state_addresses(&s)? {
                if scope.contains(&a) {
                    held.insert(a, format!("device {name} (persona {})", s.persona));
                }
            }
        }
        // What the datapath runs too: a device's store record may lag behind (a
        // persona updated, its device's shift refused) and drains are only there.
        let wired = self
            .datapath
            .held_addresses(own, scope)
            .await
            .map_err(|e| ShiftError::Failed(e.to_string()))?;
        if !wired.is_empty() {
            let interfaces = self.interfaces.lock().unwrap_or_else(|e| e.into_inner());
            for h in wired {
                let active = h.active.into_iter().map(|a| (a, "running it"));
                let draining = h
                    .draining
                    .into_iter()
                    .map(|a| (a, "draining its open flows"));
                for (a, why) in active.chain(draining) {
                    held.entry(a)
                        .or_insert_with(|| match interfaces.get(&h.ifindex) {
                            Some(i) => format!("the device on {i} ({why})"),
                            None => format!("interface {} ({why})", h.ifindex),
                        });
                }
            }
        }
        Ok(held)
    }

    /// The device's own addresses from the persona's pools, after checking that no
    /// other device holds the persona's fixed addresses: the lease it has when it is
    /// on the persona already, else the lowest free address of each pool.
    async fn lease(
        &self,
        device: &str,
        persona: &str,
        declared: &PersonaSpec,
        state: Option<&DeviceState>,
        own: Option<u32>,
    ) -> Result<(Vec<ipnet::IpNet>, Claim), ShiftError> {
        let _one_at_a_time = self.leasing.lock().await;
        // Only who holds an address this persona may take matters here.
        let mut held = self.held(device, own, &AddressScope::of(declared)).await?;
        for (other, addrs) in self.claims.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if other != device {
                for a in addrs {
                    held.entry(*a)
                        .or_insert_with(|| format!("device {other} (shifting to it)"));
                }
            }
        }
        for a in &declared.addresses {
            if let Some(holder) = held.get(&a.addr()) {
                return Err(ShiftError::Held {
                    address: a.addr().to_string(),
                    holder: holder.clone(),
                });
            }
        }
        let current: &[ipnet::IpNet] = match state {
            Some(s) if s.persona == persona => &s.leases,
            _ => &[],
        };
        let mut leases = Vec::new();
        for pool in &declared.address_pool {
            let kept = current
                .iter()
                .find(|l| pool.contains(&l.addr()) && !held.contains_key(&l.addr()));
            // Never the pool's gateway, nor IPv6's subnet-router anycast address.
            let free = || {
                pool.hosts()
                    .filter(|a| Some(*a) != declared.gateway && *a != pool.network())
                    .find(|a| !held.contains_key(a))
                    .map(|a| ipnet::IpNet::new(a, pool.prefix_len()).expect("a pool's own prefix"))
            };
            match kept.copied().or_else(free) {
                Some(lease) => leases.push(lease),
                None => {
                    return Err(ShiftError::Held {
                        address: format!("every address of {pool}"),
                        holder: "other devices".into(),
                    });
                }
            }
        }
        // The old persona's too: until the shift has committed, its flows may still
        // need them to drain.
        let claimed = declared
            .addresses
            .iter()
            .chain(&leases)
            .map(|a| a.addr())
            .chain(
                state
                    .map(|s| self.state_addresses(s))
                    .transpose()?
                    .unwrap_or_default(),
            )
            .collect();
        Ok((leases, Claim::new(&self.claims, device, claimed)))
    }

    /// The addresses a device's stored state holds: its persona's fixed ones (as the
    /// persona is stored now) and its leases.
    fn state_addresses(&self, s: &DeviceState) -> Result<Vec<IpAddr>, ShiftError> {
        let mut addrs = self.catalog.fixed(&*self.store, &s.persona)?;
        addrs.extend(s.leases.iter().map(|l| l.addr()));
        Ok(addrs)
    }

    /// The datapath's and the host's steps of a shift, up to the flip, as one job on
    /// the node, queued before this returns: attached first if need be; on failure,
    /// undone. `then` runs there once it has flipped.
    fn apply(
        &self,
        device: &DeviceSpec,
        persona: crate::datapath::CompiledPersona,
        previous: Option<crate::datapath::CompiledPersona>,
        flows: FlowMode,
        then: Option<AfterFlip>,
    ) -> impl Future<Output = Result<(Applied, Option<Submitted>), StepFailed>> + use<> {
        let device = device.clone();
        let fault = self.fault;
        let known = self.interface_of(&device.interface);
        let queued = self.datapath.queue_on_node(move |node| {
            if fault == Some(TxStep::Attach) {
                return Err(StepFailed::new(TxStep::Attach, "injected fault"));
            }
            let ifindex = node
                .ensure_attached(&device, known)
                .map_err(|e| StepFailed::new(TxStep::Attach, e))?;
            let applied = node.apply(ifindex, persona, previous, flows, fault)?;
            let submitted = then.map(|then| {
                let (generation, flip) = applied.flip_outcome();
                then(generation, flip)
            });
            Ok((applied, submitted))
        });
        async move {
            let failed = |e| StepFailed::new(TxStep::Attach, e);
            queued.map_err(failed)?.await.map_err(failed)?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::{compile, fake::FakeDatapath},
        host::fake::FakeWiring,
        node::Node,
        store::{Expect, Kind},
    };

    fn spec(yaml: &str) -> PersonaSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_plan_lists_steps_and_the_diff() {
        let a = spec(
            "addresses: [203.0.113.10/24]\ndns: [198.51.100.53]\nfirewall:\n  ingress:\n    default: drop\n    rules:\n      - { cidr: 198.51.100.0/24, protocol: tcp, ports: \"22\", action: allow }\n",
        );
        let b = spec("addresses: [203.0.113.20/24]\ndns: [198.51.100.53]\n");
        let p = plan(
            "vm1",
            Some(("office", &a, 7)),
            "travel",
            &b,
            &compile(&b).unwrap(),
            FlowMode::Keep,
        )
        .unwrap();
        assert_eq!(p.from.as_deref(), Some("office"));
        assert!(
            p.diff.contains(&"- address 203.0.113.10/24".to_string()),
            "{:?}",
            p.diff
        );
        assert!(
            p.diff.contains(&"+ address 203.0.113.20/24".to_string()),
            "{:?}",
            p.diff
        );
        assert!(
            p.diff
                .iter()
                .any(|l| l.starts_with("- firewall ingress allow 198.51.100.0/24 ports 22 tcp")),
            "{:?}",
            p.diff
        );
        assert!(
            !p.diff.iter().any(|l| l.contains("dns")),
            "same resolver: no dns line"
        );
        assert!(matches!(
            p.steps[2],
            Step::Flip {
                from_generation: Some(7),
                flows: FlowMode::Keep,
            }
        ));
    }

    /// An embedded store in a directory of its own, made empty.
    fn embedded_store(name: &str) -> (std::path::PathBuf, Arc<dyn Store>) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(&dir.join("store.redb")).unwrap();
        (dir, Arc::new(store))
    }

    /// An orchestrator on the fake datapath and wiring, with a real embedded store.
    fn orchestrator(
        dir: &std::path::Path,
        store: Arc<dyn Store>,
        datapath: DatapathHandle,
        fault: Option<TxStep>,
    ) -> Arc<Orchestrator> {
        let (events, _) = broadcast::channel(16);
        Arc::new(
            Orchestrator::new(
                store,
                datapath,
                events,
                TlsApplier::new(dir.join("tls"), None, Default::default()),
                Arc::new(crate::metrics::Metrics::default()),
            )
            .with_fault(fault),
        )
    }

    #[tokio::test]
    async fn an_address_is_held_by_whoever_runs_it_as_personas_and_states_are_now() {
        let (dir, store) = embedded_store("persona-held");
        let persona = |name: &str, spec: Value| {
            store.put(Kind::Persona, name, spec, Expect::Any).unwrap();
        };
        persona("office", json!({ "addresses": ["203.0.113.10/24"] }));
        persona("twin", json!({ "addresses": ["203.0.113.10/24"] }));
        persona("travel", json!({ "addresses": ["203.0.113.20/24"] }));
        persona("pool", json!({ "addressPool": ["198.51.100.0/30"] }));
        persona("spare", json!({ "addresses": ["203.0.113.30/24"] }));
        for i in 1..=3 {
            store
                .put(
                    Kind::Device,
                    &format!("vm{i}"),
                    json!({ "interface": format!("pvm{i}"), "innerV4": format!("198.18.0.{}", i + 1) }),
                    Expect::Any,
                )
                .unwrap();
        }
        let datapath = DatapathHandle::spawn(move || {
            let mut dp = FakeDatapath::default();
            for i in 1..=3 {
                dp.interfaces.insert(format!("pvm{i}"), 6 + i);
            }
            Ok(Node::new(Box::new(dp), Box::new(FakeWiring::default())))
        })
        .unwrap();
        let o = orchestrator(&dir, store.clone(), datapath, None);
        let shift = |device: &'static str, to: &'static str| {
            let o = o.clone();
            async move {
                o.shift(device, to, "test", false, None)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        };
        shift("vm1", "office").await.unwrap();
        let refused = shift("vm2", "twin").await.unwrap_err();
        assert!(
            refused.contains("203.0.113.10 is held by device vm1 (persona office)"),
            "{refused}"
        );
        // office no longer declares it; vm1 still runs it until it shifts again.
        persona("office", json!({ "addresses": ["203.0.113.11/24"] }));
        let refused = shift("vm2", "twin").await.unwrap_err();
        assert!(
            refused.contains("203.0.113.10 is held by the device on pvm1 (running it)"),
            "{refused}"
        );
        // Its flows keep it while they drain; the sweep frees it once none does.
        shift("vm1", "travel").await.unwrap();
        let refused = shift("vm2", "twin").await.unwrap_err();
        assert!(
            refused
                .contains("203.0.113.10 is held by the device on pvm1 (draining its open flows)"),
            "{refused}"
        );
        o.sweep().await.unwrap();
        shift("vm2", "twin").await.unwrap();
        // travel now declares another: vm1 holds it by its record before it runs it.
        persona("travel", json!({ "addresses": ["203.0.113.30/24"] }));
        let refused = shift("vm3", "spare").await.unwrap_err();
        assert!(
            refused.contains("203.0.113.30 is held by device vm1 (persona travel)"),
            "{refused}"
        );
        let refused = shift("vm3", "office").await;
        assert_eq!(refused, Ok(()), "203.0.113.11 is nobody's");

        // Pools: each device its own lease, until there is none left.
        shift("vm1", "pool").await.unwrap();
        shift("vm3", "pool").await.unwrap();
        let leases = |d: &str| store.device_state(d).unwrap().unwrap().leases;
        assert_eq!(leases("vm1"), ["198.51.100.1/30".parse().unwrap()]);
        assert_eq!(leases("vm3"), ["198.51.100.2/30".parse().unwrap()]);
        let refused = shift("vm2", "pool").await.unwrap_err();
        assert!(
            refused.contains("every address of 198.51.100.0/30 is held by other devices"),
            "{refused}"
        );
        // A lease freed is given again, once drained.
        shift("vm1", "travel").await.unwrap();
        o.sweep().await.unwrap();
        shift("vm2", "pool").await.unwrap();
        assert_eq!(leases("vm2"), ["198.51.100.1/30".parse().unwrap()]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_failure_after_the_flip_leaves_the_device_and_its_record_as_they_were() {
        let (dir, store) = embedded_store("persona-orch");
        for (name, addr) in [("office", "203.0.113.10/24"), ("travel", "203.0.113.20/24")] {
            store
                .put(
                    Kind::Persona,
                    name,
                    json!({ "addresses": [addr] }),
                    Expect::Any,
                )
                .unwrap();
        }
        store
            .put(
                Kind::Device,
                "vm1",
                json!({ "interface": "pvm1", "innerV4": "198.18.0.2" }),
                Expect::Any,
            )
            .unwrap();
        let wiring = FakeWiring::default();
        let w = wiring.clone();
        let datapath = DatapathHandle::spawn(move || {
            let mut dp = FakeDatapath::default();
            dp.interfaces.insert("pvm1".into(), 7);
            Ok(Node::new(Box::new(dp), Box::new(w)))
        })
        .unwrap();
        orchestrator(&dir, store.clone(), datapath.clone(), None)
            .shift("vm1", "office", "test", false, None)
            .await
            .unwrap();
        let before = (
            store.device_state("vm1").unwrap(),
            datapath.call(|dp| dp.active(7)).await.unwrap(),
            wiring.state.lock().unwrap().clone(),
        );
        for step in [TxStep::Tls, TxStep::Store] {
            let failing = orchestrator(&dir, store.clone(), datapath.clone(), Some(step));
            let err = failing
                .shift("vm1", "travel", "test", false, None)
                .await
                .expect_err("the fault fails the shift");
            assert!(
                err.to_string()
                    .contains(&format!("device left on office: {step}: injected fault")),
                "{err}"
            );
            let after = (
                store.device_state("vm1").unwrap(),
                datapath.call(|dp| dp.active(7)).await.unwrap(),
                wiring.state.lock().unwrap().clone(),
            );
            assert_eq!(after, before, "after a fault at {step}");
            let last = store.events(0, 100).unwrap().pop().unwrap();
            assert_eq!(
                last.body.result,
                format!("rolled back at {step}: injected fault")
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
