//! Fleet mode: hosts sharing one etcd store. A device runs on the host its spec names
//! (`host`), and only that host programs it. A shift asked of another host reaches it as
//! a request under `requests/<device>`; its answer comes back under `results/<device>`,
//! both through the watch every host keeps. Each host holds `hosts/<name>` under a
//! lease while it lives: a device whose host holds none is orphaned, and stays where
//! it is until someone moves it.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

pub mod migration;

use crate::{
    model::{DeviceSpec, FlowMode},
    orchestrator::{Asked, Orchestrator, Outcome, ShiftError},
    store::{Kind, Store as _, StoreError, etcd::EtcdStore},
};

/// How long a host waits for the device's host to answer a shift.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// A host that stops renewing its lease is taken for dead after this long.
const LIVENESS_TTL: Duration = Duration::from_secs(5);

/// A shift asked of the device's host by another.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Request {
    id: String,
    /// None: the persona the store says the device runs, applied again.
    persona: Option<String>,
    actor: String,
    dry_run: bool,
    flows: Option<FlowMode>,
    cause: Option<(String, Value)>,
    asked: Timestamp,
    by: String,
}

/// The device's host's answer to the request `id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Answer {
    id: String,
    by: String,
    outcome: Option<Outcome>,
    error: Option<Refusal>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Refusal {
    status: u16,
    message: String,
}

/// A host of a fleet: the store it shares, and its own name there.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub etcd: crate::store::etcd::EtcdConfig,
    pub host: String,
}

pub struct Fleet {
    host: String,
    store: Arc<EtcdStore>,
    /// Requests this host is carrying out, by id.
    running: Mutex<HashSet<String>>,
    /// The devices this host runs, as it last settled them: what to take away when one
    /// is deleted or moved to another host elsewhere.
    mine: Mutex<HashMap<String, DeviceSpec>>,
}

fn store_error(e: StoreError) -> ShiftError {
    ShiftError::Store(e)
}

/// A fresh id for a request or a migration: 16 hex digits.
fn new_id() -> Result<String, ShiftError> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| ShiftError::Failed(e.to_string()))?;
    Ok(id.iter().map(|b| format!("{b:02x}")).collect())
}

impl Fleet {
    pub fn new(host: String, store: Arc<EtcdStore>) -> Self {
        Self {
            host,
            store,
            running: Mutex::new(HashSet::new()),
            mine: Mutex::new(HashMap::new()),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether this host runs the device.
    pub fn runs(&self, spec: &DeviceSpec) -> bool {
        spec.host.as_deref() == Some(self.host.as_str())
    }

    /// Announces this host as alive for as long as it runs.
    pub fn announce(&self) -> Result<(), StoreError> {
        let forgot = self.store.forget_unowned_states()?;
        if forgot > 0 {
            tracing::info!(
                forgot,
                "forgot the state of devices that moved away or were deleted while this host was down"
            );
        }
        self.store.hold(
            &format!("hosts/{}", self.host),
            &json!({ "since": Timestamp::now() }),
            LIVENESS_TTL,
        )
    }

    /// Whether this host follows etcd now: when not, what it reads may be stale.
    pub fn connected(&self) -> bool {
        self.store.is_live()
    }

    /// Whether the device's host is not alive (a device that names none is nobody's).
    pub fn orphaned(&self, spec: &DeviceSpec) -> Result<bool, StoreError> {
        match &spec.host {
            Some(h) => Ok(!self.is_alive(h)?),
            None => Ok(true),
        }
    }

    /// Whether `host` holds its liveness key, as the last state seen says.
    pub fn is_alive(&self, host: &str) -> Result<bool, StoreError> {
        Ok(self.live_hosts()?.iter().any(|h| h == host))
    }

    /// The hosts alive now, as the last state seen says.
    pub fn live_hosts(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .store
            .read_json_under("hosts/")?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// Asks `host` to shift the device and waits for its answer.
    pub async fn shift_on(&self, host: &str, asked: Asked<'_>) -> Result<Outcome, ShiftError> {
        let device = asked.device;
        if !self.is_alive(host).map_err(store_error)? {
            return Err(ShiftError::Remote {
                status: 503,
                message: format!(
                    "device {device:?} runs on host {host:?}, which is not alive: it stays as it is until its host comes back or it is moved"
                ),
            });
        }
        let id = new_id()?;
        let request = Request {
            id: id.clone(),
            persona: asked.persona.map(str::to_owned),
            actor: asked.actor.to_owned(),
            dry_run: asked.dry_run,
            flows: asked.flows,
            cause: asked.cause,
            asked: Timestamp::now(),
            by: self.host.clone(),
        };
        let answer_key = self.store.key(&format!("results/{device}"));
        let mut changes = self.store.subscribe();
        let (store, rest) = (self.store.clone(), format!("requests/{device}"));
        let value = serde_json::to_value(&request).expect("a request serialises");
        tokio::task::spawn_blocking(move || store.write_json(&rest, Some(&value)))
            .await
            .map_err(|e| ShiftError::Failed(e.to_string()))?
            .map_err(store_error)?;
        let waited = tokio::time::timeout(ANSWER_WITHIN, async {
            loop {
                if let Some(a) = self.answer(device)?
                    && a.id == id
                {
                    return Ok(a);
                }
                match changes.recv().await {
                    Ok(k) if k != answer_key => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => {
                        return Err(ShiftError::Failed("the store closed".into()));
                    }
                }
            }
        })
        .await;
        match waited {
            Err(_) => Err(ShiftError::Remote {
                status: 504,
                message: format!(
                    "host {host:?}, which runs device {device:?}, did not answer within {} s",
                    ANSWER_WITHIN.as_secs()
                ),
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Answer {
                outcome: Some(o), ..
            })) => Ok(o),
            Ok(Ok(Answer { error, by, .. })) => {
                let r = error.unwrap_or(Refusal {
                    status: 502,
                    message: "an answer with neither outcome nor error".into(),
                });
                Err(ShiftError::Remote {
                    status: r.status,
                    message: format!("host {by:?}: {}", r.message),
                })
            }
        }
    }

    fn answer(&self, device: &str) -> Result<Option<Answer>, ShiftError> {
        self.store
            .read_json(&format!("results/{device}"))
            .map_err(store_error)?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| ShiftError::Failed(format!("an answer in the store: {e}")))
    }

    /// Follows the store for what this host must do: requests for its devices, and
    /// devices and personas another host changed.
    pub fn serve(self: Arc<Self>, orchestrator: Arc<Orchestrator>) {
        let mut changes = self.store.subscribe();
        let requests = self.store.key("requests/");
        let devices = self.store.key("objects/devices/");
        let personas = self.store.key("objects/personas/");
        let hosts = self.store.key("hosts/");
        let migrating = self.store.key("migrating/");
        tokio::spawn(async move {
            if let Ok(devices) = orchestrator.devices() {
                let mut mine = self.mine.lock().unwrap_or_else(|e| e.into_inner());
                for (name, spec) in devices {
                    if self.runs(&spec) {
                        mine.insert(name, (*spec).clone());
                    }
                }
            }
            self.pending(&orchestrator);
            for (device, _) in self.store.read_json_under("migrating/").unwrap_or_default() {
                self.follow_migration(&orchestrator, &device);
            }
            self.report_hosts(&orchestrator, None).await;
            loop {
                let key = match changes.recv().await {
                    Ok(k) => k,
                    Err(RecvError::Lagged(_)) => {
                        self.pending(&orchestrator);
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                if let Some(device) = key.strip_prefix(&migrating) {
                    self.follow_migration(&orchestrator, device);
                } else if let Some(host) = key.strip_prefix(&hosts) {
                    self.report_hosts(&orchestrator, Some(host)).await;
                } else if let Some(device) = key.strip_prefix(&requests) {
                    self.clone().take(&orchestrator, device);
                } else if let Some(device) = key.strip_prefix(&devices) {
                    let (me, o, d) = (self.clone(), orchestrator.clone(), device.to_owned());
                    tokio::spawn(async move { me.follow_device(&o, &d).await });
                } else if let Some(persona) = key.strip_prefix(&personas) {
                    let (o, p) = (orchestrator.clone(), persona.to_owned());
                    tokio::spawn(async move {
                        let version = o.store().stamp(Kind::Persona, &p).ok().flatten();
                        if let Some(v) = version
                            && let Err(e) = o
                                .reapply_persona(&p, v.version, "fleet:persona-update")
                                .await
                        {
                            tracing::warn!(persona = p, error = %e, "taking the persona's new version");
                        }
                    });
                }
            }
        });
    }

    /// What any host stored goes to this host's rule engine: signals, which it acts on
    /// for its own devices, and rules, applications and devices, which it reads again.
    /// Signals come through etcd: one is acknowledged once it is there, so it outlives
    /// the host that took it in, and every host hears of it on the watch it keeps
    /// anyway.
    pub fn feed(self: &Arc<Self>, engine: Arc<crate::rules::runner::RuleEngine>) {
        let mut changes = self.store.subscribe();
        let store = self.store.clone();
        let signals = store.key("signals/");
        let objects = [Kind::Rule, Kind::Application, Kind::Device]
            .map(|k| (store.key(&format!("objects/{}/", k.plural())), k));
        tokio::spawn(async move {
            loop {
                let mut keys = match changes.recv().await {
                    Ok(k) => vec![k],
                    Err(RecvError::Lagged(_)) => {
                        // Rules read again, and so every device.
                        engine.poke(Kind::Rule, "");
                        // Every stored signal again: those known change nothing.
                        let all = store.read_json_under("signals/").unwrap_or_default();
                        learn(&engine, all.into_iter().map(|(_, v)| v)).await;
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                while let Ok(k) = changes.try_recv() {
                    keys.push(k);
                }
                for (prefix, kind) in &objects {
                    for name in keys.iter().filter_map(|k| k.strip_prefix(prefix.as_str())) {
                        engine.poke(*kind, name);
                    }
                }
                let values = keys.iter().filter_map(|k| {
                    let rest = k.strip_prefix(&signals)?;
                    store.read_json(&format!("signals/{rest}")).ok().flatten()
                });
                learn(&engine, values).await;
            }
        });
    }

    /// After another host wrote or deleted a device: settled here when it runs here;
    /// every trace of it taken away when it ran here and no longer does (deleted, moved
    /// to another host, or onto another interface).
    async fn follow_device(&self, orchestrator: &Arc<Orchestrator>, name: &str) {
        let now = match orchestrator.device(name) {
            Ok(spec) => spec.filter(|s| self.runs(s)),
            Err(e) => {
                tracing::warn!(device = name, error = %e, "reading a device another host wrote");
                return;
            }
        };
        let before = {
            let mut mine = self.mine.lock().unwrap_or_else(|e| e.into_inner());
            match &now {
                Some(spec) => mine.insert(name.to_owned(), (**spec).clone()),
                None => mine.remove(name),
            }
        };
        if let Some(old) =
            before.filter(|o| now.as_ref().is_none_or(|n| n.interface != o.interface))
        {
            match orchestrator.remove(&old).await {
                Ok(()) => tracing::info!(
                    device = name,
                    interface = old.interface,
                    "took away a device that no longer runs here"
                ),
                Err(e) => {
                    tracing::warn!(device = name, error = %e, "taking away a device that no longer runs here")
                }
            }
            // What this host recorded of it would be read as the device's state were it
            // to come back here.
            if now.is_none() {
                let (store, device) = (self.store.clone(), name.to_owned());
                let forgot =
                    tokio::task::spawn_blocking(move || store.set_device_state(&device, None))
                        .await;
                if let Ok(Err(e)) = forgot {
                    tracing::warn!(device = name, error = %e, "forgetting a device's state");
                }
            }
        }
        if now.is_some() {
            let _ = orchestrator.settle_reported(name, "fleet").await;
        }
    }

    /// Records in the audit log, once for the fleet, each device whose host stopped
    /// renewing its liveness, and each whose host is back: of `host`, or of every host.
    async fn report_hosts(self: &Arc<Self>, orchestrator: &Arc<Orchestrator>, host: Option<&str>) {
        let (me, o, host) = (self.clone(), orchestrator.clone(), host.map(str::to_owned));
        let reported = tokio::task::spawn_blocking(move || -> Result<(), ShiftError> {
            let alive = me.live_hosts().map_err(store_error)?;
            for (device, spec) in o.devices()? {
                let Some(h) = spec.host.as_deref() else {
                    continue;
                };
                if host.as_deref().is_some_and(|only| only != h) {
                    continue;
                }
                let gone = !alive.iter().any(|a| a == h);
                let runs = o
                    .store()
                    .device_state(&device)
                    .map_err(store_error)?
                    .map(|s| s.persona);
                let (kind, result) = match gone {
                    true => ("orphaned", format!("host {h} stopped renewing its liveness: the device stays as it was until it is moved")),
                    false => ("returned", format!("host {h} is alive again")),
                };
                let since = json!({ "since": Timestamp::now() });
                let event = me
                    .store
                    .record_marked(
                        &format!("orphans/{h}/{device}"),
                        gone.then_some(&since),
                        crate::store::EventBody {
                            kind: kind.into(),
                            actor: format!("fleet:{}", me.host),
                            device: Some(device.clone()),
                            from: runs.clone(),
                            to: runs,
                            generation: None,
                            result,
                            duration_us: None,
                            detail: json!({ "host": h }),
                        },
                    )
                    .map_err(store_error)?;
                if let Some(e) = event {
                    tracing::info!(device, host = h, kind, "recorded");
                    o.recorded(e);
                }
            }
            Ok(())
        })
        .await;
        match reported {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "recording hosts gone or back"),
            Err(e) => tracing::warn!(error = %e, "recording hosts gone or back"),
        }
    }

    /// Takes every request not answered yet.
    fn pending(self: &Arc<Self>, orchestrator: &Arc<Orchestrator>) {
        match self.store.read_json_under("requests/") {
            Ok(requests) => {
                for (device, _) in requests {
                    self.clone().take(orchestrator, &device);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading shift requests"),
        }
    }

    /// Carries out the request for `device` when the device runs here and the request
    /// is neither answered nor being carried out.
    fn take(self: Arc<Self>, orchestrator: &Arc<Orchestrator>, device: &str) {
        let request: Option<Request> = self
            .store
            .read_json(&format!("requests/{device}"))
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_value(v).ok());
        let Some(request) = request else { return };
        let runs_here = matches!(orchestrator.device(device), Ok(Some(spec)) if self.runs(&spec));
        if !runs_here
            || self
                .answer(device)
                .ok()
                .flatten()
                .is_some_and(|a| a.id == request.id)
        {
            return;
        }
        if !self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request.id.clone())
        {
            return;
        }
        let (o, device) = (orchestrator.clone(), device.to_owned());
        tokio::spawn(async move {
            let late = Timestamp::now()
                .duration_since(request.asked)
                .unsigned_abs()
                > ANSWER_WITHIN;
            let result = if late {
                Err(ShiftError::Remote {
                    status: 504,
                    message: format!(
                        "the request came after the {} s its asker waits",
                        ANSWER_WITHIN.as_secs()
                    ),
                })
            } else {
                match &request.persona {
                    Some(p) => {
                        o.shift_for(
                            &device,
                            p,
                            &request.actor,
                            request.dry_run,
                            request.flows,
                            request.cause.clone(),
                        )
                        .await
                    }
                    None => o.restore(&device, &request.actor).await,
                }
            };
            let answer = Answer {
                id: request.id.clone(),
                by: self.host.clone(),
                error: result.as_ref().err().map(|e| Refusal {
                    status: e.status(),
                    message: e.to_string(),
                }),
                outcome: result.ok(),
            };
            let value = serde_json::to_value(&answer).expect("an answer serialises");
            let (store, rest) = (self.store.clone(), format!("results/{device}"));
            let written =
                tokio::task::spawn_blocking(move || store.write_json(&rest, Some(&value))).await;
            if let Ok(Err(e)) | Err(e) = written.map_err(|e| StoreError::Backend(e.to_string())) {
                tracing::warn!(device, error = %e, "answering a shift request");
            }
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&request.id);
        });
    }
}

async fn learn(engine: &crate::rules::runner::RuleEngine, values: impl Iterator<Item = Value>) {
    let signals: Vec<crate::rules::signals::Signal> = values
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    if let Err(e) = engine.learn(signals).await {
        tracing::warn!(error = %e, "taking in signals another host stored");
    }
}
