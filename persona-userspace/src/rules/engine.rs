//! The decision for one device: a pure function of the rules, the live signals, the
//! clock and the device's recent history, so it can be tested with an injected clock
//! and never depends on the order signals arrived in.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use serde_json::{Value, json};

use fixedbitset::FixedBitSet;

use super::{
    RuleSpec,
    index::Index,
    signals::{AlertState, Revisions, Severity, Signal, SignalBody, SignalSet},
};
use crate::model::DeviceSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Minimum time in a persona before the engine moves the device again.
    pub dwell: SignedDuration,
    /// Minimum time before the engine returns a device to a persona it just left.
    pub cooldown: SignedDuration,
}

/// What the engine needs of a device: its name and its spec as the catalog holds it
/// (shared, not copied, at every evaluation).
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub name: String,
    pub spec: Arc<DeviceSpec>,
}

impl PartialEq for DeviceView {
    /// The same when what the engine reads of them is; an unchanged spec is the same
    /// `Arc`, and compares in one step.
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&*self.spec, &*other.spec);
        self.name == other.name
            && (Arc::ptr_eq(&self.spec, &other.spec)
                || (a.labels == b.labels
                    && a.owner == b.owner
                    && a.role == b.role
                    && a.persona == b.persona))
    }
}

/// What the device runs and how it got there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    pub persona: Option<String>,
    /// The rule that put it there, if the engine did.
    pub rule: Option<String>,
    pub since: Option<Timestamp>,
    /// When the device last left each persona.
    pub left: BTreeMap<String, Timestamp>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RuleExplain {
    pub rule: String,
    pub priority: i32,
    pub persona: String,
    pub selected: bool,
    pub matched: bool,
    /// One line per condition, "ok: ..." or "no: ...".
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Decision {
    /// None when no rule selects the device: the engine leaves it alone.
    pub desired: Option<String>,
    pub rule: Option<String>,
    pub shift: bool,
    pub blocked_until: Option<Timestamp>,
    pub why: String,
    pub rules: Vec<RuleExplain>,
    /// When this decision may change without any new signal.
    #[serde(skip)]
    pub next_check: Option<Timestamp>,
}

/// The live signals of a device as the conditions read them.
pub(crate) struct Facts<'a> {
    alerts: Vec<OpenAlert<'a>>,
    apps: Vec<&'a str>,
    geo: Option<&'a SignalBody>,
    role: Option<&'a str>,
}

struct OpenAlert<'a> {
    id: &'a str,
    severity: Severity,
    kind: &'a str,
    source: &'a str,
}

impl<'a> Facts<'a> {
    fn of(device: &'a DeviceView, signals: impl IntoIterator<Item = &'a Signal>) -> Self {
        let mut facts = Facts {
            alerts: Vec::new(),
            apps: Vec::new(),
            geo: None,
            role: device.spec.role.as_deref(),
        };
        for s in signals {
            match &s.body {
                SignalBody::Alert {
                    id,
                    severity,
                    alert_kind,
                    state: AlertState::Raised,
                } => facts.alerts.push(OpenAlert {
                    id,
                    severity: *severity,
                    kind: alert_kind,
                    source: &s.source,
                }),
                SignalBody::App { app, active: true } => facts.apps.push(app),
                SignalBody::Geo { .. } => facts.geo = Some(&s.body),
                SignalBody::Role { role } => facts.role = Some(role),
                _ => {}
            }
        }
        facts
    }

    pub(crate) fn country(&self) -> Option<&'a str> {
        match self.geo {
            Some(SignalBody::Geo { country, .. }) => country.as_deref(),
            _ => None,
        }
    }

    pub(crate) fn role(&self) -> Option<&'a str> {
        self.role
    }

    pub(crate) fn apps(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.apps.iter().copied()
    }

    pub(crate) fn alert_kinds(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.alerts.iter().map(|a| a.kind)
    }

    pub(crate) fn any_alert(&self) -> bool {
        !self.alerts.is_empty()
    }

    /// As CEL sees them (`signals`).
    fn json(&self) -> Value {
        let alerts: Vec<Value> = self
            .alerts
            .iter()
            .map(
                |a| json!({"id": a.id, "severity": a.severity, "kind": a.kind, "source": a.source}),
            )
            .collect();
        let geo = self.geo.map_or(Value::Null, |g| {
            serde_json::to_value(g).unwrap_or(Value::Null)
        });
        json!({"alerts": alerts, "apps": self.apps, "geo": geo, "role": self.role})
    }
}

thread_local! {
    /// Expressions compiled once per thread, not at every evaluation of every rule.
    static PROGRAMS: std::cell::RefCell<std::collections::HashMap<String, std::rc::Rc<cel::Program>>> =
        Default::default();
    /// The standard library, built once per thread (~30 us each time otherwise); each
    /// evaluation binds its variables in a scope of its own on top.
    static CEL_ROOT: cel::Context<'static, 'static> = cel::Context::default();
}

/// Bound on the cache: rules come and go, expressions with them.
const MAX_PROGRAMS: usize = 4096;

fn compiled(e: &str) -> Result<std::rc::Rc<cel::Program>, String> {
    PROGRAMS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(p) = cache.get(e) {
            return Ok(p.clone());
        }
        let p = std::rc::Rc::new(cel::Program::compile(e).map_err(|err| err.to_string())?);
        if cache.len() >= MAX_PROGRAMS {
            cache.clear();
        }
        cache.insert(e.to_owned(), p.clone());
        Ok(p)
    })
}

/// One rule as the engine evaluates it: its schedule compiled once.
struct CompiledRule {
    name: String,
    spec: RuleSpec,
    schedule: Option<Result<super::schedule::Compiled, String>>,
}

/// The stored rules, compiled once per change: ordered by priority (then name), the
/// schedules parsed, and whether any rule needs CEL at all.
pub struct CompiledRules {
    ordered: Vec<CompiledRule>,
    by_name: HashMap<String, usize>,
    expressions: bool,
    index: Index,
    /// Tells this compilation from any other: a device's memo is of one.
    generation: u64,
    /// The rules selecting each set of labels seen: devices mostly share a few.
    selections: std::sync::Mutex<HashMap<BTreeMap<String, String>, std::sync::Arc<FixedBitSet>>>,
}

static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl CompiledRules {
    pub fn new(rules: &BTreeMap<String, RuleSpec>) -> Self {
        let mut ordered: Vec<CompiledRule> = rules
            .iter()
            .map(|(name, spec)| CompiledRule {
                name: name.clone(),
                schedule: spec
                    .when
                    .schedule
                    .as_ref()
                    .map(|s| s.compile("schedule").map_err(|e| e.to_string())),
                spec: spec.clone(),
            })
            .collect();
        ordered.sort_by(|a, b| {
            b.spec
                .priority
                .cmp(&a.spec.priority)
                .then(a.name.cmp(&b.name))
        });
        let by_name = ordered
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i))
            .collect();
        let expressions = ordered.iter().any(|r| r.spec.when.expression.is_some());
        let index = Index::new(ordered.iter().map(|r| &r.spec));
        Self {
            ordered,
            by_name,
            expressions,
            index,
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            selections: Default::default(),
        }
    }

    /// The rules whose selector `labels` satisfy.
    fn selecting(&self, labels: &BTreeMap<String, String>) -> std::sync::Arc<FixedBitSet> {
        let mut seen = self.selections.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = seen.get(labels) {
            return s.clone();
        }
        let mut selected = FixedBitSet::with_capacity(self.ordered.len());
        for (i, r) in self.ordered.iter().enumerate() {
            selected.set(i, selects(&r.spec, labels));
        }
        let selected = std::sync::Arc::new(selected);
        seen.insert(labels.clone(), selected.clone());
        selected
    }

    pub fn get(&self, name: &str) -> Option<&RuleSpec> {
        self.by_name.get(name).map(|&i| &self.ordered[i].spec)
    }
}

/// A reason line, built only when an explanation was asked for: the engine's own
/// evaluations build no strings.
macro_rules! say {
    ($explain:expr, $($fmt:tt)*) => {
        if $explain { format!($($fmt)*) } else { String::new() }
    };
}

struct Eval<'a> {
    device: &'a DeviceView,
    facts: Facts<'a>,
    now: Timestamp,
    explain: bool,
    /// The device, its signals and the time bound for CEL, when a rule needs them.
    cel: Option<&'a cel::Context<'a, 'static>>,
}

impl Eval<'_> {
    fn alert(&self, c: &super::AlertCondition) -> (bool, String) {
        let hit = self.facts.alerts.iter().find(|a| {
            c.min_severity.is_none_or(|min| a.severity >= min)
                && c.kind.as_deref().is_none_or(|k| a.kind == k)
        });
        match hit {
            Some(a) => (
                true,
                say!(
                    self.explain,
                    "ok: alert {} ({}) is open",
                    a.id,
                    format!("{:?}", a.severity).to_lowercase()
                ),
            ),
            None => (
                false,
                say!(
                    self.explain,
                    "no: no open alert{}{}",
                    c.min_severity
                        .map(|s| format!(" of severity >= {s:?}").to_lowercase())
                        .unwrap_or_default(),
                    c.kind
                        .as_ref()
                        .map(|k| format!(" of kind {k}"))
                        .unwrap_or_default()
                ),
            ),
        }
    }

    fn set(&self, what: &str, value: Option<&str>, c: &super::SetCondition) -> (bool, String) {
        let Some(v) = value else {
            return (false, say!(self.explain, "no: {what} unknown"));
        };
        if !c.any_of.is_empty() && !c.any_of.iter().any(|a| a == v) {
            return (
                false,
                say!(self.explain, "no: {what} {v} not in {:?}", c.any_of),
            );
        }
        if c.not_in.iter().any(|a| a == v) {
            return (false, say!(self.explain, "no: {what} {v} is excluded"));
        }
        (true, say!(self.explain, "ok: {what} {v}"))
    }

    fn expression(&self, e: &str) -> (bool, String) {
        let program = match compiled(e) {
            Ok(p) => p,
            Err(err) => {
                return (
                    false,
                    say!(self.explain, "no: expression does not parse: {err}"),
                );
            }
        };
        let Some(ctx) = self.cel else {
            return (false, say!(self.explain, "no: expression context"));
        };
        match program.execute(ctx) {
            Ok(cel::Value::Bool(true)) => (true, say!(self.explain, "ok: {e}")),
            Ok(cel::Value::Bool(false)) => (false, say!(self.explain, "no: {e} is false")),
            Ok(other) => (
                false,
                say!(self.explain, "no: {e} gave {other:?}, not a bool"),
            ),
            Err(err) => (false, say!(self.explain, "no: {e}: {err}")),
        }
    }

    /// Each condition's verdict and reason; without an explanation, up to the first
    /// that fails.
    fn conditions(&self, rule: &CompiledRule) -> Vec<(bool, String)> {
        let w = &rule.spec.when;
        let mut out = Vec::new();
        let mut check = |r: (bool, String)| {
            let failed = !r.0;
            out.push(r);
            failed && !self.explain
        };
        if let Some(c) = &w.alert
            && check(self.alert(c))
        {
            return out;
        }
        if let Some(c) = &w.country
            && check(self.set("country", self.facts.country(), c))
        {
            return out;
        }
        if let (Some(s), Some(compiled)) = (&w.schedule, &rule.schedule) {
            let verdict = match compiled {
                Ok(c) if c.active(self.now) => (
                    true,
                    say!(
                        self.explain,
                        "ok: within {}-{} {}",
                        s.from,
                        s.to,
                        s.timezone
                    ),
                ),
                Ok(_) => (
                    false,
                    say!(
                        self.explain,
                        "no: outside {}-{} {}",
                        s.from,
                        s.to,
                        s.timezone
                    ),
                ),
                Err(e) => (false, say!(self.explain, "no: {e}")),
            };
            if check(verdict) {
                return out;
            }
        }
        if let Some(c) = &w.apps {
            let hit = c
                .any_of
                .iter()
                .find(|a| self.facts.apps.contains(&a.as_str()));
            let verdict = match hit {
                Some(a) => (true, say!(self.explain, "ok: {a} is running")),
                None => (
                    false,
                    say!(self.explain, "no: none of {:?} running", c.any_of),
                ),
            };
            if check(verdict) {
                return out;
            }
        }
        if let Some(c) = &w.role
            && check(self.set("role", self.facts.role, c))
        {
            return out;
        }
        if let Some(e) = &w.expression
            && check(self.expression(e))
        {
            return out;
        }
        if out.is_empty() {
            out.push((true, say!(self.explain, "ok: no conditions")));
        }
        out
    }
}

/// Decides the persona of `device` at `now`, with every rule's verdict and why: the
/// reference the engine's own evaluations must agree with.
pub fn decide(
    device: &DeviceView,
    rules: &BTreeMap<String, RuleSpec>,
    signals: &SignalSet,
    history: &History,
    timing: Timing,
    now: Timestamp,
) -> Decision {
    decide_with(
        device,
        &CompiledRules::new(rules),
        signals,
        history,
        timing,
        now,
        true,
    )
}

/// [`decide`] on compiled rules; without `explain`, no reason is put into words and
/// rules below the winner are not evaluated (they cannot change the decision).
pub fn decide_with(
    device: &DeviceView,
    rules: &CompiledRules,
    signals: &SignalSet,
    history: &History,
    timing: Timing,
    now: Timestamp,
    explain: bool,
) -> Decision {
    let facts = Facts::of(device, signals.of(&device.name).live(now));
    with_eval(device, rules.expressions, facts, now, explain, |eval| {
        decide_in(eval, rules, signals, history, timing)
    })
}

/// What the engine knew of a device at its last evaluation, for the next to redo only
/// what changed since.
pub struct Memo {
    generation: u64,
    device: DeviceView,
    /// The device's signals as they were at `evaluated`.
    revisions: Revisions,
    evaluated: Timestamp,
    selected: std::sync::Arc<FixedBitSet>,
    /// The selected rules whose conditions held.
    holds: FixedBitSet,
    /// When the schedules' next edges were taken, each scheduled rule's, and the first.
    at: Timestamp,
    edges: Vec<(usize, Timestamp)>,
    until: Timestamp,
}

impl Memo {
    fn new(rules: &CompiledRules, device: &DeviceView, now: Timestamp) -> Self {
        Self {
            generation: rules.generation,
            device: device.clone(),
            revisions: [0; 4],
            evaluated: now,
            selected: rules.selecting(&device.spec.labels),
            holds: FixedBitSet::with_capacity(rules.ordered.len()),
            at: now,
            edges: Vec::new(),
            // Taken at the first evaluation.
            until: now,
        }
    }

    /// Takes the schedules' edges at `now`; a schedule with none left is taken again
    /// at every evaluation.
    fn take_edges(&mut self, rules: &CompiledRules, now: Timestamp) {
        self.edges.clear();
        self.until = Timestamp::MAX;
        for i in rules.index.scheduled().ones() {
            if let Some(Ok(c)) = &rules.ordered[i].schedule {
                match c.next_boundary(now) {
                    Some(t) => {
                        self.edges.push((i, t));
                        self.until = self.until.min(t);
                    }
                    None => self.until = now,
                }
            }
        }
        self.at = now;
    }
}

/// [`decide_with`] without an explanation, evaluating again only the rules whose
/// verdict can have changed since `memo` was taken: those reading a part of the signals
/// that changed, those on the clock, the scheduled ones past an edge; all of them when
/// the device or the rules changed. The index leaves out those that cannot hold.
pub fn decide_incremental(
    device: &DeviceView,
    rules: &CompiledRules,
    signals: &SignalSet,
    history: &History,
    timing: Timing,
    now: Timestamp,
    memo: &mut Option<Memo>,
) -> Decision {
    let mine = signals.of(&device.name);
    let facts = Facts::of(device, mine.live(now));
    let index = &rules.index;
    let kept = memo
        .take()
        .filter(|m| m.generation == rules.generation && m.device == *device)
        .and_then(|m| {
            let changed = mine.changed_since(&m.revisions, m.evaluated, now)?;
            Some((m, changed))
        });
    // `None`: every rule selecting the device is evaluated afresh.
    let (mut m, changed) = match kept {
        Some((m, changed)) => (m, Some(changed)),
        None => (Memo::new(rules, device, now), None),
    };
    let edge = now < m.at || now >= m.until;
    if edge {
        m.take_edges(rules, now);
    }
    // Held rules are few: each is looked at alone, not the dense sets.
    if let Some(changed) = &changed {
        let stale: Vec<usize> = m
            .holds
            .ones()
            .filter(|&i| index.dirty(i, changed, edge))
            .collect();
        for i in stale {
            m.holds.set(i, false);
        }
    }
    let candidates = match &changed {
        Some(c) if !index.may_change(c, edge) => None,
        _ => index.possible(&facts),
    }
    .map(|mut possible| {
        possible.intersect_with(&m.selected);
        if let Some(c) = &changed {
            possible.intersect_with(&index.dirty_set(c, edge));
        }
        possible
    })
    .unwrap_or_default();
    let cel = !candidates.is_disjoint(index.cel());
    let decision = with_eval(device, cel, facts, now, false, |eval| {
        for i in candidates.ones() {
            if eval.conditions(&rules.ordered[i]).iter().all(|r| r.0) {
                m.holds.insert(i);
            }
        }
        let winner = m.holds.minimum();
        let next_check = m
            .edges
            .iter()
            .filter(|(i, _)| winner.is_none_or(|w| *i <= w))
            .map(|(_, t)| *t)
            .chain(mine.next_expiry(now))
            .min();
        let found = Found {
            winner: winner.map(|w| &rules.ordered[w]),
            any_selected: !m.selected.is_clear(),
            next_check,
            rules: Vec::new(),
        };
        conclude(eval, rules, history, timing, found)
    });
    m.revisions = mine.revisions();
    m.evaluated = now;
    *memo = Some(m);
    decision
}

/// Runs `f` with the device's signals bound, and for CEL when `cel` says a rule needs it.
fn with_eval<'a, R>(
    device: &'a DeviceView,
    cel: bool,
    facts: Facts<'a>,
    now: Timestamp,
    explain: bool,
    f: impl FnOnce(&Eval<'_>) -> R,
) -> R {
    if !cel {
        return f(&Eval {
            device,
            facts,
            now,
            explain,
            cel: None,
        });
    }
    CEL_ROOT.with(|root| {
        let mut scope = root.new_inner_scope();
        let d = json!({"name": device.name, "labels": device.spec.labels, "owner": device.spec.owner, "role": device.spec.role});
        let bound = scope.add_variable("device", d).is_ok()
            && scope.add_variable("signals", facts.json()).is_ok();
        scope.add_variable_from_value("now", now.to_string());
        f(&Eval {
            device,
            facts,
            now,
            explain,
            cel: bound.then_some(&scope),
        })
    })
}

fn selects(spec: &RuleSpec, labels: &BTreeMap<String, String>) -> bool {
    spec.selector
        .match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// What evaluating the rules found, before holds, dwell and cool-down have their say.
struct Found<'r> {
    winner: Option<&'r CompiledRule>,
    any_selected: bool,
    next_check: Option<Timestamp>,
    rules: Vec<RuleExplain>,
}

fn decide_in(
    eval: &Eval<'_>,
    rules: &CompiledRules,
    signals: &SignalSet,
    history: &History,
    timing: Timing,
) -> Decision {
    let (device, now, explain) = (eval.device, eval.now, eval.explain);
    let mut explained = Vec::new();
    let mut next_check = signals.of(&device.name).next_expiry(now);
    let mut earliest = |t: Option<Timestamp>| {
        if let Some(t) = t {
            next_check = Some(next_check.map_or(t, |n| n.min(t)));
        }
    };
    let mut winner: Option<&CompiledRule> = None;
    let mut any_selected = false;
    for rule in &rules.ordered {
        if winner.is_some() && !explain {
            break;
        }
        let spec = &rule.spec;
        let selected = selects(spec, &device.spec.labels);
        if let Some(Ok(c)) = &rule.schedule {
            earliest(c.next_boundary(now));
        }
        let (matched, reasons) = if selected {
            any_selected = true;
            let results = eval.conditions(rule);
            (
                results.iter().all(|r| r.0),
                results.into_iter().map(|r| r.1).collect(),
            )
        } else if explain {
            let missing: Vec<String> = spec
                .selector
                .match_labels
                .iter()
                .filter(|(k, v)| device.spec.labels.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            (
                false,
                vec![format!("no: not selected (needs {})", missing.join(", "))],
            )
        } else {
            (false, Vec::new())
        };
        if matched && winner.is_none() {
            winner = Some(rule);
        }
        if explain {
            explained.push(RuleExplain {
                rule: rule.name.clone(),
                priority: spec.priority,
                persona: spec.persona.clone(),
                selected,
                matched,
                reasons,
            });
        }
    }
    let found = Found {
        winner,
        any_selected,
        next_check,
        rules: explained,
    };
    conclude(eval, rules, history, timing, found)
}

fn conclude(
    eval: &Eval<'_>,
    rules: &CompiledRules,
    history: &History,
    timing: Timing,
    found: Found<'_>,
) -> Decision {
    let (device, now) = (eval.device, eval.now);
    let Found {
        winner,
        any_selected,
        mut next_check,
        rules: explain,
    } = found;
    if !any_selected {
        return Decision {
            desired: None,
            rule: None,
            shift: false,
            blocked_until: None,
            why: "no rule selects this device".into(),
            rules: explain,
            next_check,
        };
    }

    // A holding rule keeps the device while its alert is open, whatever else matches.
    let held = history
        .rule
        .as_ref()
        .and_then(|r| rules.by_name.get(r))
        .map(|&i| &rules.ordered[i])
        .filter(|r| {
            r.spec.hold_until_clear
                && history.persona.as_deref() == Some(r.spec.persona.as_str())
                && r.spec.when.alert.as_ref().is_some_and(|c| eval.alert(c).0)
        });
    let (desired, rule, why, immediate) = match (held, winner) {
        (Some(r), _) => (
            Some(r.spec.persona.clone()),
            Some(r.name.clone()),
            format!("held by {} until its alert clears", r.name),
            true,
        ),
        (None, Some(r)) => (
            Some(r.spec.persona.clone()),
            Some(r.name.clone()),
            format!("rule {} matches", r.name),
            r.spec.immediate,
        ),
        (None, None) => (
            device.spec.persona.clone(),
            None,
            "no rule matches: the device's default persona".into(),
            false,
        ),
    };
    let Some(desired) = desired else {
        return Decision {
            desired: None,
            rule,
            shift: false,
            blocked_until: None,
            why: "no rule matches and the device has no default persona".into(),
            rules: explain,
            next_check,
        };
    };
    if history.persona.as_deref() == Some(desired.as_str()) {
        return Decision {
            desired: Some(desired),
            rule,
            shift: false,
            blocked_until: None,
            why: format!("{why}; already there"),
            rules: explain,
            next_check,
        };
    }
    let mut blocked_until: Option<Timestamp> = None;
    if !immediate {
        if let Some(since) = history.since {
            let t = since.saturating_add(timing.dwell).unwrap_or(Timestamp::MAX);
            if t > now {
                blocked_until = Some(t);
            }
        }
        if let Some(left) = history.left.get(&desired) {
            let t = left
                .saturating_add(timing.cooldown)
                .unwrap_or(Timestamp::MAX);
            if t > now {
                blocked_until = Some(blocked_until.map_or(t, |b| b.max(t)));
            }
        }
    }
    if let Some(t) = blocked_until {
        next_check = Some(next_check.map_or(t, |n| n.min(t)));
    }
    let shift = blocked_until.is_none();
    let why = match blocked_until {
        Some(t) => format!("{why}; waiting for dwell/cool-down until {t}"),
        None => why,
    };
    Decision {
        desired: Some(desired),
        rule,
        shift,
        blocked_until,
        why,
        rules: explain,
        next_check,
    }
}
