//! Context signals per device, and the set they form. The set depends only on which
//! signals arrived, never on their order: for one key the newest `at` wins, and equal
//! timestamps are settled by comparing the signals themselves.
use std::{collections::BTreeMap, net::IpAddr};

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

/// The signals of every device, one per key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SignalSet {
    by_device: BTreeMap<String, BTreeMap<String, Signal>>,
}

impl SignalSet {
    /// Keeps `s` unless a signal for its key that sorts after it is already there.
    pub fn merge(&mut self, s: Signal) -> bool {
        if !self.by_device.contains_key(&s.device) {
            self.by_device.insert(s.device.clone(), BTreeMap::new());
        }
        let slot = self.by_device.get_mut(&s.device).expect("just inserted");
        let key = s.key();
        match slot.get(&key) {
            Some(old) if !s.sorts_after(old) => false,
            _ => {
                slot.insert(key, s);
                true
            }
        }
    }

    pub fn live<'a>(
        &'a self,
        device: &str,
        now: jiff::Timestamp,
    ) -> impl Iterator<Item = &'a Signal> {
        self.by_device
            .get(device)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(move |s| s.live(now))
    }

    /// The earliest time after `now` when a signal of `device` expires.
    pub fn next_expiry(&self, device: &str, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        self.by_device
            .get(device)?
            .values()
            .filter_map(Signal::expires)
            .filter(|e| *e > now)
            .min()
    }

    /// Drops the signals expired at `now`; returns their store keys (`device/key`).
    pub fn prune(&mut self, now: jiff::Timestamp) -> Vec<String> {
        let mut gone = Vec::new();
        for (device, slot) in &mut self.by_device {
            slot.retain(|key, s| {
                let live = s.live(now);
                if !live {
                    gone.push(format!("{device}/{key}"));
                }
                live
            });
        }
        self.by_device.retain(|_, slot| !slot.is_empty());
        gone
    }

    pub fn all(&self) -> impl Iterator<Item = &Signal> {
        self.by_device.values().flat_map(|m| m.values())
    }
}
