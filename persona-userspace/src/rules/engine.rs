//! The decision for one device: a pure function of the rules, the live signals, the
//! clock and the device's recent history, so it can be tested with an injected clock
//! and never depends on the order signals arrived in.
use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    RuleSpec,
    signals::{AlertState, Signal, SignalBody, SignalSet},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Minimum time in a persona before the engine moves the device again.
    pub dwell: SignedDuration,
    /// Minimum time before the engine returns a device to a persona it just left.
    pub cooldown: SignedDuration,
}

/// What the engine needs of a device.
#[derive(Debug, Clone, Default)]
pub struct DeviceView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub owner: Option<String>,
    pub role: Option<String>,
    pub default_persona: Option<String>,
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

/// The live signals of a device as CEL and explain see them.
fn view(device: &DeviceView, signals: &[&Signal]) -> Value {
    let mut alerts = Vec::new();
    let mut apps = Vec::new();
    let mut geo = Value::Null;
    let mut role = device.role.clone().map(Value::from).unwrap_or(Value::Null);
    for s in signals {
        match &s.body {
            SignalBody::Alert {
                id,
                severity,
                alert_kind,
                state: AlertState::Raised,
            } => {
                alerts.push(
                    json!({"id": id, "severity": severity, "kind": alert_kind, "source": s.source}),
                );
            }
            SignalBody::App { app, active: true } => apps.push(json!(app)),
            SignalBody::Geo { .. } => geo = serde_json::to_value(&s.body).unwrap_or(Value::Null),
            SignalBody::Role { role: r } => role = json!(r),
            _ => {}
        }
    }
    json!({"alerts": alerts, "apps": apps, "geo": geo, "role": role})
}

thread_local! {
    /// Expressions compiled once per thread, not at every evaluation of every rule.
    static PROGRAMS: std::cell::RefCell<std::collections::HashMap<String, std::rc::Rc<cel::Program>>> =
        Default::default();
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

struct Eval<'a> {
    device: &'a DeviceView,
    sig: Value,
    now: Timestamp,
}

impl Eval<'_> {
    fn alert(&self, c: &super::AlertCondition) -> (bool, String) {
        let open = self.sig["alerts"].as_array().cloned().unwrap_or_default();
        let hit = open.iter().find(|a| {
            let sev_ok = c.min_severity.is_none_or(|min| {
                serde_json::from_value::<super::signals::Severity>(a["severity"].clone())
                    .is_ok_and(|s| s >= min)
            });
            sev_ok && c.kind.as_deref().is_none_or(|k| a["kind"] == k)
        });
        match hit {
            Some(a) => (
                true,
                format!(
                    "ok: alert {} ({}) is open",
                    a["id"].as_str().unwrap_or("?"),
                    a["severity"].as_str().unwrap_or("?")
                ),
            ),
            None => (
                false,
                format!(
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
            return (false, format!("no: {what} unknown"));
        };
        let v = v.to_owned();
        if !c.any_of.is_empty() && !c.any_of.contains(&v) {
            return (false, format!("no: {what} {v} not in {:?}", c.any_of));
        }
        if c.not_in.contains(&v) {
            return (false, format!("no: {what} {v} is excluded"));
        }
        (true, format!("ok: {what} {v}"))
    }

    fn expression(&self, e: &str) -> (bool, String) {
        let program = match compiled(e) {
            Ok(p) => p,
            Err(err) => return (false, format!("no: expression does not parse: {err}")),
        };
        let mut ctx = cel::Context::default();
        let device = json!({"name": self.device.name, "labels": self.device.labels, "owner": self.device.owner, "role": self.device.role});
        if ctx.add_variable("device", device).is_err()
            || ctx.add_variable("signals", self.sig.clone()).is_err()
        {
            return (false, "no: expression context".into());
        }
        ctx.add_variable_from_value("now", self.now.to_string());
        match program.execute(&ctx) {
            Ok(cel::Value::Bool(true)) => (true, format!("ok: {e}")),
            Ok(cel::Value::Bool(false)) => (false, format!("no: {e} is false")),
            Ok(other) => (false, format!("no: {e} gave {other:?}, not a bool")),
            Err(err) => (false, format!("no: {e}: {err}")),
        }
    }

    fn conditions(&self, rule: &RuleSpec) -> Vec<(bool, String)> {
        let w = &rule.when;
        let mut out = Vec::new();
        if let Some(c) = &w.alert {
            out.push(self.alert(c));
        }
        if let Some(c) = &w.country {
            out.push(self.set("country", self.sig["geo"]["country"].as_str(), c));
        }
        if let Some(s) = &w.schedule {
            out.push(match s.compile("schedule") {
                Ok(c) if c.active(self.now) => (
                    true,
                    format!("ok: within {}-{} {}", s.from, s.to, s.timezone),
                ),
                Ok(_) => (
                    false,
                    format!("no: outside {}-{} {}", s.from, s.to, s.timezone),
                ),
                Err(e) => (false, format!("no: {e}")),
            });
        }
        if let Some(c) = &w.apps {
            let running: Vec<String> = self.sig["apps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            out.push(match c.any_of.iter().find(|a| running.contains(a)) {
                Some(a) => (true, format!("ok: {a} is running")),
                None => (false, format!("no: none of {:?} running", c.any_of)),
            });
        }
        if let Some(c) = &w.role {
            out.push(self.set("role", self.sig["role"].as_str(), c));
        }
        if let Some(e) = &w.expression {
            out.push(self.expression(e));
        }
        if out.is_empty() {
            out.push((true, "ok: no conditions".into()));
        }
        out
    }
}

/// Decides the persona of `device` at `now`.
pub fn decide(
    device: &DeviceView,
    rules: &BTreeMap<String, RuleSpec>,
    signals: &SignalSet,
    history: &History,
    timing: Timing,
    now: Timestamp,
) -> Decision {
    let live: Vec<&Signal> = signals.live(&device.name, now).collect();
    let eval = Eval {
        device,
        sig: view(device, &live),
        now,
    };
    let mut ordered: Vec<(&String, &RuleSpec)> = rules.iter().collect();
    ordered.sort_by(|a, b| b.1.priority.cmp(&a.1.priority).then(a.0.cmp(b.0)));

    let mut explain = Vec::new();
    let mut next_check = signals.next_expiry(&device.name, now);
    let mut earliest = |t: Option<Timestamp>| {
        if let Some(t) = t {
            next_check = Some(next_check.map_or(t, |n| n.min(t)));
        }
    };
    let mut winner: Option<(&String, &RuleSpec)> = None;
    let mut any_selected = false;
    for (name, rule) in &ordered {
        let selected = rule
            .selector
            .match_labels
            .iter()
            .all(|(k, v)| device.labels.get(k) == Some(v));
        if let Some(s) = &rule.when.schedule
            && let Ok(c) = s.compile("schedule")
        {
            earliest(c.next_boundary(now));
        }
        let (matched, reasons) = if selected {
            any_selected = true;
            let results = eval.conditions(rule);
            (
                results.iter().all(|r| r.0),
                results.into_iter().map(|r| r.1).collect(),
            )
        } else {
            let missing: Vec<String> = rule
                .selector
                .match_labels
                .iter()
                .filter(|(k, v)| device.labels.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            (
                false,
                vec![format!("no: not selected (needs {})", missing.join(", "))],
            )
        };
        if matched && winner.is_none() {
            winner = Some((name, rule));
        }
        explain.push(RuleExplain {
            rule: (*name).clone(),
            priority: rule.priority,
            persona: rule.persona.clone(),
            selected,
            matched,
            reasons,
        });
    }
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
        .and_then(|r| rules.get_key_value(r))
        .filter(|(_, r)| {
            r.hold_until_clear
                && history.persona.as_deref() == Some(r.persona.as_str())
                && r.when.alert.as_ref().is_some_and(|c| eval.alert(c).0)
        });
    let (desired, rule, why, immediate) = match (held, winner) {
        (Some((name, r)), _) => (
            Some(r.persona.clone()),
            Some(name.clone()),
            format!("held by {name} until its alert clears"),
            true,
        ),
        (None, Some((name, r))) => (
            Some(r.persona.clone()),
            Some(name.clone()),
            format!("rule {name} matches"),
            r.immediate,
        ),
        (None, None) => (
            device.default_persona.clone(),
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
    earliest(blocked_until);
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
