//! The rule engine at work in the daemon: it evaluates devices when signals arrive
//! (before the request that brought them returns), when rules or devices change, and at
//! the next instant a decision can change by itself (a schedule edge, an expiry, the end
//! of a dwell time): at the boundary, not at a poll.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};
use tracing::{info, warn};

use super::{
    engine::{
        CompiledRules, Decision, DeviceView, History, Memo, Timing, decide_incremental, decide_with,
    },
    signals::{Signal, SignalSet},
};
use crate::{
    model::DeviceSpec,
    orchestrator::{Orchestrator, ShiftError},
    store::{EventBody, Kind, StoreError},
};

pub struct RuleEngine {
    orchestrator: Arc<Orchestrator>,
    geoip: Option<super::geoip::GeoIp>,
    timing: Timing,
    dry_run: bool,
    state: Mutex<State>,
    wake: Notify,
    /// The stored rules, parsed and compiled; dropped by `poke` whenever a rule changes
    /// through the API (the daemon is the store's only writer).
    rules: std::sync::Mutex<Option<Arc<CompiledRules>>>,
    /// When the loop wakes next by itself: a signal whose decision may change earlier
    /// wakes it, any other does not.
    next_wake: std::sync::Mutex<Option<Timestamp>>,
    /// Devices with signals taken in but not yet stored: the request that brought them
    /// evaluates them once they are, so a pass leaves them alone (it would act on a
    /// signal not yet durable, and leave that request to report that nothing changed).
    /// Outside `state`: a request dropped midway (its client gone) unmarks them in `Drop`.
    storing: std::sync::Mutex<hashbrown::HashMap<String, usize>>,
    due: std::sync::Mutex<Due>,
}

/// The mark [`RuleEngine::ingest`] puts on its devices until it has evaluated them.
/// Dropped unsettled (an error, or the request dropped with its client), it wakes the
/// loop, which evaluates them in its stead.
struct Storing<'a> {
    engine: &'a RuleEngine,
    devices: &'a [String],
    settled: bool,
}

impl<'a> Storing<'a> {
    fn mark(engine: &'a RuleEngine, devices: &'a [String]) -> Self {
        let mut m = engine.storing.lock().unwrap_or_else(|e| e.into_inner());
        for d in devices {
            *m.entry(d.clone()).or_default() += 1;
        }
        Self {
            engine,
            devices,
            settled: false,
        }
    }
}

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        {
            let mut m = self
                .engine
                .storing
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for d in self.devices {
                if let Some(n) = m.get_mut(d) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(d);
                    }
                }
            }
        }
        // Unmarked first: the pass this asks for must not skip them.
        if !self.settled {
            self.engine.due(self.devices.iter().cloned());
        }
    }
}

/// What the loop's next pass covers beyond what its clock asks for: every device, or
/// those written or left undecided since the last pass.
#[derive(Default)]
struct Due {
    all: bool,
    devices: hashbrown::HashSet<String>,
}

#[derive(Default)]
struct State {
    signals: SignalSet,
    devices: hashbrown::HashMap<String, Slot>,
    /// The soonest instant a request's evaluation asked for since the last pass ended:
    /// a pass that left its device alone must still wake for it.
    asked: Option<Timestamp>,
}

/// What the engine keeps of a device between evaluations.
#[derive(Default)]
struct Slot {
    /// What its last evaluation found, for the next to redo only what changed.
    memo: Option<Memo>,
    /// When it last left each persona.
    left: BTreeMap<String, Timestamp>,
    /// Its spec as last looked up, and the store's device generation then: the lookup
    /// is not made again until that moves.
    spec: Option<(u64, Arc<DeviceSpec>)>,
}

/// The slot of `device`, made when it has none.
fn slot<'a>(devices: &'a mut hashbrown::HashMap<String, Slot>, device: &str) -> &'a mut Slot {
    devices.entry_ref(device).or_default()
}

/// Drops the slot of a name that is no device here, unless it remembers departures
/// (a device deleted and made again keeps its cool-down).
fn unslot(devices: &mut hashbrown::HashMap<String, Slot>, device: &str) {
    if devices.get(device).is_some_and(|s| s.left.is_empty()) {
        devices.remove(device);
    }
}

/// What the engine did for one device.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub device: String,
    pub decision: Decision,
    /// The generation a shift produced, or the dry-run/failure note.
    pub outcome: Option<Value>,
}

impl RuleEngine {
    pub fn new(
        orchestrator: Arc<Orchestrator>,
        timing: Timing,
        dry_run: bool,
        geoip: Option<super::geoip::GeoIp>,
    ) -> Result<Arc<Self>, StoreError> {
        let mut state = State::default();
        for v in orchestrator.store().signals()? {
            match serde_json::from_value::<Signal>(v) {
                Ok(s) => {
                    state.signals.merge(s);
                }
                Err(e) => warn!(error = %e, "skipping a stored signal that no longer parses"),
            }
        }
        Ok(Arc::new(Self {
            orchestrator,
            geoip,
            timing,
            dry_run,
            state: Mutex::new(state),
            wake: Notify::new(),
            rules: Default::default(),
            next_wake: Default::default(),
            storing: Default::default(),
            due: Default::default(),
        }))
    }

    /// The object `name` of `kind` changed: a device is evaluated again soon, and for
    /// anything else every device, with the rules compiled again when they were what
    /// changed.
    pub fn poke(&self, kind: Kind, name: &str) {
        match kind {
            Kind::Device => return self.due([name.to_owned()]),
            Kind::Rule => *self.rules.lock().unwrap_or_else(|e| e.into_inner()) = None,
            _ => {}
        }
        self.due_lock().all = true;
        self.wake.notify_one();
    }

    fn due_lock(&self) -> std::sync::MutexGuard<'_, Due> {
        self.due.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loop evaluates `devices` soon.
    fn due(&self, devices: impl IntoIterator<Item = String>) {
        self.due_lock().devices.extend(devices);
        self.wake.notify_one();
    }

    fn rules(&self) -> Result<Arc<CompiledRules>, StoreError> {
        if let Some(r) = &*self.rules.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(r.clone());
        }
        let mut out = BTreeMap::new();
        for r in self.orchestrator.store().list(Kind::Rule)? {
            match serde_json::from_value(r.spec) {
                Ok(spec) => {
                    out.insert(r.name, spec);
                }
                Err(e) => warn!(rule = %r.name, error = %e, "stored rule does not parse"),
            }
        }
        let out = Arc::new(CompiledRules::new(&out));
        *self.rules.lock().unwrap_or_else(|e| e.into_inner()) = Some(out.clone());
        Ok(out)
    }

    /// The device as the engine sees it (from the orchestrator's catalog: parsed once
    /// per stored version); `None`, and what the engine knew of it gone, when it is not
    /// there, does not parse or runs on another host.
    fn view(&self, slot: &mut Slot, device: &str) -> Result<Option<DeviceView>, StoreError> {
        let generation = self.orchestrator.store().generation(Kind::Device);
        let known = match (&slot.spec, generation) {
            (Some((at, spec)), Some(g)) if *at == g => Some(spec.clone()),
            _ => None,
        };
        let found = match known {
            Some(spec) => Ok(Some(spec)),
            None => self.orchestrator.device(device),
        };
        let spec = match found {
            Ok(Some(spec)) if self.orchestrator.runs_here(&spec) => spec,
            Err(ShiftError::Store(e)) => return Err(e),
            Ok(_) | Err(_) => {
                slot.memo = None;
                slot.spec = None;
                return Ok(None);
            }
        };
        slot.spec = generation.map(|g| (g, spec.clone()));
        Ok(Some(DeviceView {
            name: device.to_owned(),
            spec,
        }))
    }

    fn history(&self, slot: &Slot, device: &str) -> Result<History, StoreError> {
        let (persona, rule, since) = match self.orchestrator.store().device_state(device)? {
            Some(s) => (Some(s.persona), s.rule, Some(s.since)),
            None => (None, None, None),
        };
        Ok(History {
            persona,
            rule,
            since,
            left: slot.left.clone(),
        })
    }

    /// The decision for a device right now, with every rule's verdict, changing nothing.
    pub async fn explain(&self, device: &str) -> Result<Option<Decision>, StoreError> {
        let mut state = self.state.lock().await;
        let slot = slot(&mut state.devices, device);
        let Some(view) = self.view(slot, device)? else {
            unslot(&mut state.devices, device);
            return Ok(None);
        };
        let hist = self.history(slot, device)?;
        let rules = self.rules()?;
        Ok(Some(decide_with(
            &view,
            &rules,
            &state.signals,
            &hist,
            self.timing,
            Timestamp::now(),
            true,
        )))
    }

    /// Takes in signals another host of the fleet stored, for devices that run here;
    /// those already known change nothing.
    pub async fn learn(&self, signals: Vec<Signal>) -> Result<(), StoreError> {
        let now = Timestamp::now();
        let mut state = self.state.lock().await;
        let mut devices: Vec<String> = Vec::new();
        for s in signals {
            let device = s.device.clone();
            if state.signals.merge(s) && !devices.contains(&device) {
                devices.push(device);
            }
        }
        if devices.is_empty() {
            return Ok(());
        }
        let rules = self.rules()?;
        for d in &devices {
            self.evaluate(&mut state, &rules, d, now, None).await?;
        }
        // What they decided may have a time of its own (a dwell, an expiry).
        self.wake.notify_one();
        Ok(())
    }

    /// Takes in signals (all were validated) and acts on the devices they concern.
    pub async fn ingest(&self, signals: Vec<Signal>) -> Result<Vec<Applied>, StoreError> {
        let received = std::time::Instant::now();
        let now = Timestamp::now();
        let mut state = self.state.lock().await;
        let mut devices: Vec<String> = Vec::new();
        let mut seen: hashbrown::HashSet<String> = Default::default();
        let mut changed = Vec::new();
        for mut s in signals {
            s.at.get_or_insert(now);
            // An address without a country is looked up when a database was given.
            if let (
                Some(db),
                super::signals::SignalBody::Geo {
                    country: country @ None,
                    address: Some(ip),
                    ..
                },
            ) = (&self.geoip, &mut s.body)
            {
                *country = db.country(*ip);
            }
            let key = format!("{}/{}", s.device, s.key());
            let json = serde_json::to_vec(&s).map_err(|e| StoreError::Backend(e.to_string()))?;
            if seen.insert(s.device.clone()) {
                devices.push(s.device.clone());
            }
            if state.signals.merge(s) {
                changed.push((key, json));
            }
        }
        let mut storing = Storing::mark(self, &devices);
        // Stored (in one transaction, shared with whatever else is being written) before
        // anything is acted on or acknowledged; the devices are decided for meanwhile.
        let store = self.orchestrator.store().clone();
        let storing_signals = tokio::task::spawn_blocking(move || store.put_signals(changed));
        let rules = self.rules()?;
        let mut decided = Vec::with_capacity(devices.len());
        for d in &devices {
            if let Some((_, decision)) = self.decide(&mut state, &rules, d, now)? {
                decided.push((d, decision));
            }
        }
        drop(state);
        let stored = storing_signals
            .await
            .map_err(|e| StoreError::Backend(format!("storing signals: {e}")));
        let mut state = self.state.lock().await;
        stored??;
        let mut out = Vec::with_capacity(decided.len());
        let mut soonest: Option<Timestamp> = None;
        for (d, decision) in decided {
            // One that would shift is decided again: other requests may have moved it
            // since, or changed its signals.
            let applied = if decision.shift {
                self.evaluate(&mut state, &rules, d, now, Some(received))
                    .await?
            } else {
                Some(Applied {
                    device: d.clone(),
                    decision,
                    outcome: None,
                })
            };
            if let Some(a) = applied {
                if let Some(t) = a.decision.next_check {
                    soonest = Some(soonest.map_or(t, |s| s.min(t)));
                }
                out.push(a);
            }
        }
        // The devices concerned were just evaluated: the loop needs to hear only of an
        // instant earlier than the one it sleeps until.
        if let Some(t) = soonest {
            state.asked = Some(state.asked.map_or(t, |a| a.min(t)));
            let wake = self.next_wake.lock().unwrap_or_else(|e| e.into_inner());
            if wake.is_none_or(|w| t < w) {
                self.wake.notify_one();
            }
        }
        // Unmarked under the engine's lock, held since they were stored: no pass came
        // between.
        storing.settled = true;
        drop(storing);
        Ok(out)
    }

    /// What the rules want for a device now, acting on nothing.
    fn decide(
        &self,
        state: &mut State,
        rules: &CompiledRules,
        device: &str,
        now: Timestamp,
    ) -> Result<Option<(History, Decision)>, StoreError> {
        let State {
            signals, devices, ..
        } = state;
        let slot = slot(devices, device);
        let Some(view) = self.view(slot, device)? else {
            unslot(devices, device);
            return Ok(None);
        };
        let hist = self.history(slot, device)?;
        self.orchestrator.metrics().rule_evaluations.inc();
        let decision = decide_incremental(
            &view,
            rules,
            signals,
            &hist,
            self.timing,
            now,
            &mut slot.memo,
        );
        Ok(Some((hist, decision)))
    }

    async fn evaluate(
        &self,
        state: &mut State,
        rules: &CompiledRules,
        device: &str,
        now: Timestamp,
        received: Option<std::time::Instant>,
    ) -> Result<Option<Applied>, StoreError> {
        let Some((hist, decision)) = self.decide(state, rules, device, now)? else {
            return Ok(None);
        };
        let mut outcome = None;
        if decision.shift
            && let Some(persona) = &decision.desired
        {
            let rule = decision.rule.clone().unwrap_or_else(|| "default".into());
            let live: Vec<&Signal> = state.signals.live(device, now).collect();
            let why = json!({ "why": decision.why, "signals": live });
            if self.dry_run {
                self.orchestrator.record(EventBody {
                    kind: "shift".into(),
                    actor: format!("rule:{rule}"),
                    device: Some(device.into()),
                    from: hist.persona.clone(),
                    to: Some(persona.clone()),
                    generation: None,
                    result: "dry-run (rule engine)".into(),
                    duration_us: None,
                    detail: json!({ "cause": why }),
                })?;
                outcome = Some(json!("dry-run"));
            } else {
                let result = self
                    .orchestrator
                    .shift_for(
                        device,
                        persona,
                        &format!("rule:{rule}"),
                        false,
                        rules.get(&rule).and_then(|r| r.flows),
                        Some((rule.clone(), why)),
                    )
                    .await;
                match result {
                    Ok(o) => {
                        info!(
                            device,
                            persona,
                            rule,
                            generation = o.generation,
                            "rule engine shifted"
                        );
                        if let Some(old) = &hist.persona {
                            slot(&mut state.devices, device)
                                .left
                                .insert(old.clone(), now);
                        }
                        if let Some(r) = received {
                            self.orchestrator
                                .metrics()
                                .signal_to_flip
                                .observe(r.elapsed().as_secs_f64());
                        }
                        outcome = Some(json!({ "generation": o.generation }));
                    }
                    Err(ShiftError::Store(e)) => return Err(e),
                    Err(e) => {
                        warn!(device, persona, error = %e, "rule engine shift failed");
                        outcome = Some(json!({ "error": e.to_string() }));
                    }
                }
            }
        }
        Ok(Some(Applied {
            device: device.into(),
            decision,
            outcome,
        }))
    }

    /// Evaluates every device; returns when the next one may change by itself.
    async fn evaluate_all(&self) -> Result<Option<Timestamp>, StoreError> {
        let now = Timestamp::now();
        let rules = self.rules()?;
        let devices = self.orchestrator.store().stamps(Kind::Device)?;
        let names: std::collections::HashSet<&str> =
            devices.iter().map(|(name, _)| name.as_str()).collect();
        let expired = {
            let mut state = self.state.lock().await;
            state.devices.retain(|d, slot| {
                names.contains(d.as_str()) || {
                    slot.memo = None;
                    slot.spec = None;
                    !slot.left.is_empty()
                }
            });
            state.signals.prune(now)
        };
        // Expired signals count for nothing; kept, they would only grow.
        if !expired.is_empty() {
            let store = self.orchestrator.store().clone();
            tokio::task::spawn_blocking(move || store.delete_signals(&expired))
                .await
                .map_err(|e| StoreError::Backend(format!("forgetting signals: {e}")))??;
        }
        let names: Vec<&String> = devices.iter().map(|(name, _)| name).collect();
        self.evaluate_each(names, &rules, now, None).await
    }

    /// Evaluates `devices` only; returns when the next one may change by itself, the
    /// other devices' next instant included.
    async fn evaluate_some(
        &self,
        devices: hashbrown::HashSet<String>,
    ) -> Result<Option<Timestamp>, StoreError> {
        let next = *self.next_wake.lock().unwrap_or_else(|e| e.into_inner());
        let rules = self.rules()?;
        self.evaluate_each(&devices, &rules, Timestamp::now(), next)
            .await
    }

    /// Evaluates each of `names` that no request is storing signals for, taking the
    /// engine's state one device at a time: signals arriving meanwhile wait for one
    /// evaluation, not for all of them. The earliest of `next` and their next instants.
    async fn evaluate_each<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
        rules: &CompiledRules,
        now: Timestamp,
        mut next: Option<Timestamp>,
    ) -> Result<Option<Timestamp>, StoreError> {
        for name in names {
            let mut state = self.state.lock().await;
            if self
                .storing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(name)
            {
                continue;
            }
            if let Some(a) = self.evaluate(&mut state, rules, name, now, None).await?
                && let Some(t) = a.decision.next_check
            {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        Ok(next)
    }

    /// The engine's loop: evaluate, then sleep until the next boundary or a poke.
    pub async fn run(self: Arc<Self>) {
        // The first pass, and each at a time the clock set, takes every device.
        let mut clocked = true;
        loop {
            let due = std::mem::take(&mut *self.due_lock());
            let pass = match clocked || due.all {
                true => self.evaluate_all().await,
                false => self.evaluate_some(due.devices).await,
            };
            let next = match pass {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "rule evaluation failed");
                    Some(Timestamp::now() + jiff::SignedDuration::from_secs(5))
                }
            };
            let next = {
                let mut state = self.state.lock().await;
                let next = match (next, state.asked.take()) {
                    (Some(n), Some(a)) => Some(n.min(a)),
                    (n, a) => n.or(a),
                };
                *self.next_wake.lock().unwrap_or_else(|e| e.into_inner()) = next;
                next
            };
            let sleep = next.map(|t| {
                let d = t.duration_since(Timestamp::now());
                std::time::Duration::from_millis(d.as_millis().clamp(0, 86_400_000) as u64 + 1)
            });
            match sleep {
                Some(d) => {
                    clocked = tokio::select! {
                        _ = tokio::time::sleep(d) => true,
                        _ = self.wake.notified() => false,
                    }
                }
                None => {
                    self.wake.notified().await;
                    clocked = false;
                }
            }
        }
    }

    /// Every `every`, reads each device's flows from the datapath and reports the
    /// applications seen in them (a flow idle less than `idle`) as app signals with
    /// source "datapath", when that changes.
    pub async fn observe_applications(
        self: Arc<Self>,
        every: std::time::Duration,
        idle: std::time::Duration,
    ) {
        let mut seen: HashMap<String, std::collections::BTreeSet<String>> = HashMap::new();
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.observe_once(&mut seen, idle).await {
                warn!(error = %e, "observing applications failed");
            }
        }
    }

    async fn observe_once(
        &self,
        seen: &mut HashMap<String, std::collections::BTreeSet<String>>,
        idle: std::time::Duration,
    ) -> Result<(), StoreError> {
        let store = self.orchestrator.store().clone();
        let apps: Vec<(String, super::apps::ApplicationSpec)> = store
            .list(Kind::Application)?
            .into_iter()
            .filter_map(|r| serde_json::from_value(r.spec).ok().map(|s| (r.name, s)))
            .collect();
        if apps.is_empty() {
            return Ok(());
        }
        let mut signals = Vec::new();
        for d in store.list(Kind::Device)? {
            let Ok(spec) = serde_json::from_value::<DeviceSpec>(d.spec) else {
                continue;
            };
            let iface = spec.interface.clone();
            let flows = self
                .orchestrator
                .datapath()
                .call(move |dp| dp.flows(crate::datapath::ifindex(&iface)?))
                .await;
            let Ok(flows) = flows else { continue };
            let active: std::collections::BTreeSet<String> = apps
                .iter()
                .filter(|(_, a)| flows.iter().any(|f| f.idle < idle && a.matches(f)))
                .map(|(n, _)| n.clone())
                .collect();
            let before = seen.entry(d.name.clone()).or_default();
            let changes = active
                .difference(before)
                .map(|a| (a.clone(), true))
                .chain(before.difference(&active).map(|a| (a.clone(), false)))
                .collect::<Vec<_>>();
            for (app, on) in changes {
                signals.push(Signal {
                    device: d.name.clone(),
                    body: super::signals::SignalBody::App { app, active: on },
                    source: "datapath".into(),
                    at: Some(Timestamp::now()),
                    ttl: None,
                });
            }
            *before = active;
        }
        if !signals.is_empty() {
            self.ingest(signals).await?;
        }
        Ok(())
    }
}
