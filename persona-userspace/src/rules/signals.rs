//! Context signals per device, and the set they form. The set depends only on which
//! signals arrived, never on their order: for one key the newest `at` wins, and equal
//! timestamps are settled by comparing the signals themselves.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::FieldError;

mod parse;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    #[default]
    Raised,
    Cleared,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SignalBody {
    /// A security alert, raised or cleared by its id.
    Alert {
        id: String,
        severity: Severity,
        #[serde(rename = "alertKind", default)]
        alert_kind: String,
        #[serde(default)]
        state: AlertState,
    },
    /// Where the device is: codes, coordinates, or an address to look up.
    Geo {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        country: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lat: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lon: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<IpAddr>,
    },
    /// An application reported running (or stopped) on the device.
    App {
        app: String,
        #[serde(default = "yes")]
        active: bool,
    },
    /// The role of the user using the device now.
    Role { role: String },
}

fn yes() -> bool {
    true
}

/// Read by [`parse`]'s one-pass `Deserialize`, in the shape this `Serialize` writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Signal {
    pub device: String,
    #[serde(flatten)]
    pub body: SignalBody,
    /// `api` when not given.
    pub source: String,
    /// When it was observed; the time of arrival when missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<jiff::Timestamp>,
    /// Seconds after `at` when it stops counting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
}

fn api() -> String {
    "api".into()
}

impl Signal {
    pub fn key(&self) -> String {
        match &self.body {
            SignalBody::Alert { id, .. } => format!("alert/{id}"),
            SignalBody::Geo { .. } => "geo".into(),
            SignalBody::App { app, .. } => format!("app/{app}"),
            SignalBody::Role { .. } => "role".into(),
        }
    }

    pub fn expires(&self) -> Option<jiff::Timestamp> {
        let at = self.at?;
        let ttl = self.ttl?;
        at.checked_add(jiff::SignedDuration::from_secs(ttl as i64))
            .ok()
    }

    pub fn live(&self, now: jiff::Timestamp) -> bool {
        self.expires().is_none_or(|e| now < e)
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        crate::model::validate_name(&self.device)
            .map_err(|e| FieldError::new("device", e.reason))?;
        match &self.body {
            SignalBody::Alert { id, .. } if id.is_empty() => {
                Err(FieldError::new("id", "an alert needs an id"))
            }
            SignalBody::Geo {
                country, lat, lon, ..
            } => {
                if let Some(c) = country
                    && (c.len() != 2 || !c.chars().all(|c| c.is_ascii_uppercase()))
                {
                    return Err(FieldError::new(
                        "country",
                        format!("{c:?} is not an ISO 3166 code like \"DE\""),
                    ));
                }
                if lat.is_some_and(|l| !(-90.0..=90.0).contains(&l))
                    || lon.is_some_and(|l| !(-180.0..=180.0).contains(&l))
                {
                    return Err(FieldError::new("lat", "coordinates out of range"));
                }
                Ok(())
            }
            SignalBody::App { app, .. } if app.is_empty() => {
                Err(FieldError::new("app", "an application needs a name"))
            }
            SignalBody::Role { role } if role.is_empty() => {
                Err(FieldError::new("role", "empty role"))
            }
            _ => Ok(()),
        }
    }

    /// Later observations win; of two at one instant, the one whose text sorts last, so
    /// that the order of arrival never matters.
    fn sorts_after(&self, other: &Signal) -> bool {
        match self.at.cmp(&other.at) {
            std::cmp::Ordering::Equal => {
                let text = |s: &Signal| serde_json::to_string(s).unwrap_or_default();
                text(self) > text(other)
            }
            o => o.is_gt(),
        }
    }
}

/// The parts of a device's signals a rule can read: the fields of `signals` in CEL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Alerts,
    Apps,
    Geo,
    Role,
}

impl Part {
    pub const ALL: [Part; 4] = [Part::Alerts, Part::Apps, Part::Geo, Part::Role];

    pub fn field(self) -> &'static str {
        match self {
            Part::Alerts => "alerts",
            Part::Apps => "apps",
            Part::Geo => "geo",
            Part::Role => "role",
        }
    }

    pub fn of(field: &str) -> Option<Part> {
        Part::ALL.into_iter().find(|p| p.field() == field)
    }
}

/// A signal's key, ordered as its text (`alert/<id>` < `app/<app>` < `geo` < `role`)
/// without building it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    Alert(&'a str),
    App(&'a str),
    Geo,
    Role,
}

impl SignalBody {
    fn key(&self) -> Key<'_> {
        match self {
            SignalBody::Alert { id, .. } => Key::Alert(id),
            SignalBody::App { app, .. } => Key::App(app),
            SignalBody::Geo { .. } => Key::Geo,
            SignalBody::Role { .. } => Key::Role,
        }
    }

    pub fn part(&self) -> Part {
        match self {
            SignalBody::Alert { .. } => Part::Alerts,
            SignalBody::App { .. } => Part::Apps,
            SignalBody::Geo { .. } => Part::Geo,
            SignalBody::Role { .. } => Part::Role,
        }
    }
}

/// When each part of a device's signals last changed, in the set's own count of
/// changes: equal revisions mean the same signals.
pub type Revisions = [u64; 4];

/// One device's signals in key order, and when each part last changed.
#[derive(Debug, Clone, Default)]
pub struct DeviceSignals {
    signals: Vec<Signal>,
    changed: Revisions,
}

const NO_SIGNALS: &DeviceSignals = &DeviceSignals {
    signals: Vec::new(),
    changed: [0; 4],
};

impl DeviceSignals {
    pub fn live(&self, now: jiff::Timestamp) -> impl Iterator<Item = &Signal> {
        self.signals.iter().filter(move |s| s.live(now))
    }

    /// The parts of the live signals that may differ between `then` and `now`: those
    /// changed since `revisions` were taken, and those with a signal expiring in
    /// between. `None` when the clock went back: any part may have.
    pub fn changed_since(
        &self,
        revisions: &Revisions,
        then: jiff::Timestamp,
        now: jiff::Timestamp,
    ) -> Option<[bool; 4]> {
        if now < then {
            return None;
        }
        let mut changed = [0, 1, 2, 3].map(|p| self.changed[p] != revisions[p]);
        for s in &self.signals {
            if s.expires().is_some_and(|e| then < e && e <= now) {
                changed[s.body.part() as usize] = true;
            }
        }
        Some(changed)
    }

    /// When each part last changed; zero for none ever.
    pub fn revisions(&self) -> Revisions {
        self.changed
    }

    /// The earliest time after `now` when a signal expires.
    pub fn next_expiry(&self, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        self.signals
            .iter()
            .filter_map(Signal::expires)
            .filter(|e| *e > now)
            .min()
    }
}

/// The signals of every device, one per key.
#[derive(Debug, Clone, Default)]
pub struct SignalSet {
    by_device: hashbrown::HashMap<String, DeviceSignals>,
    /// Changes so far: a device's part changed last at the count it was given then.
    changes: u64,
}

/// The same signals, whatever order they were merged in.
impl PartialEq for SignalSet {
    fn eq(&self, other: &Self) -> bool {
        self.by_device.len() == other.by_device.len()
            && self
                .by_device
                .iter()
                .all(|(d, a)| a.signals == other.of(d).signals)
    }
}

impl SignalSet {
    /// Keeps `s` unless a signal for its key that sorts after it is already there.
    pub fn merge(&mut self, s: Signal) -> bool {
        let slot = self.by_device.entry_ref(s.device.as_str()).or_default();
        let part = s.body.part() as usize;
        match slot
            .signals
            .binary_search_by(|o| o.body.key().cmp(&s.body.key()))
        {
            Ok(i) if !s.sorts_after(&slot.signals[i]) => return false,
            Ok(i) => slot.signals[i] = s,
            Err(i) => slot.signals.insert(i, s),
        }
        self.changes += 1;
        slot.changed[part] = self.changes;
        true
    }

    /// The signals of `device`, none when it has none.
    pub fn of(&self, device: &str) -> &DeviceSignals {
        self.by_device.get(device).unwrap_or(NO_SIGNALS)
    }

    pub fn live<'a>(
        &'a self,
        device: &str,
        now: jiff::Timestamp,
    ) -> impl Iterator<Item = &'a Signal> {
        self.of(device).live(now)
    }

    /// Drops the signals expired at `now`; returns their store keys (`device/key`).
    pub fn prune(&mut self, now: jiff::Timestamp) -> Vec<String> {
        let mut gone = Vec::new();
        let changes = &mut self.changes;
        for (device, slot) in &mut self.by_device {
            let before = gone.len();
            slot.signals.retain(|s| {
                let live = s.live(now);
                if !live {
                    gone.push(format!("{device}/{}", s.key()));
                }
                live
            });
            if gone.len() > before {
                *changes += 1;
                slot.changed = [*changes; 4];
            }
        }
        self.by_device.retain(|_, slot| !slot.signals.is_empty());
        gone
    }

    pub fn all(&self) -> impl Iterator<Item = &Signal> {
        self.by_device.values().flat_map(|d| &d.signals)
    }
}
