//! The rule engine: context signals about devices, rules over them, and the decision
//! which persona each device should have, with the reasons.
pub mod apps;
pub mod engine;
pub mod geoip;
pub mod index;
pub mod runner;
pub mod schedule;
pub mod signals;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::FieldError;
use schedule::Schedule;
use signals::Severity;

/// `kind: Rule`: for the selected devices, when the conditions hold, this persona.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    /// Higher wins; equal priorities are settled by rule name.
    pub priority: i32,
    #[serde(default)]
    pub selector: Selector,
    pub persona: String,
    /// Every condition given must hold.
    #[serde(default)]
    pub when: Conditions,
    /// Once this rule put a device in its persona, keep it there while an alert that
    /// matches `when.alert` is open, whatever else changes.
    #[serde(default)]
    pub hold_until_clear: bool,
    /// Shift at once, ignoring dwell time and cool-down (for hardening).
    #[serde(default)]
    pub immediate: bool,
    /// What this rule's shifts do to open flows, over the persona's own choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<crate::model::FlowMode>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Conditions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<SetCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apps: Option<AppsCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<SetCondition>,
    /// CEL over `device` (name, labels, owner, role) and `signals` (alerts, geo, apps,
    /// role) and `now` (RFC 3339 text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AlertCondition {
    /// An open alert at least this severe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_severity: Option<Severity>,
    /// ...and of this kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SetCondition {
    #[serde(default, rename = "in", skip_serializing_if = "Vec::is_empty")]
    pub any_of: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_in: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AppsCondition {
    pub any_of: Vec<String>,
}

impl RuleSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        crate::model::validate_name(&self.persona)
            .map_err(|e| FieldError::new("spec.persona", e.reason))?;
        let w = &self.when;
        if let Some(s) = &w.schedule {
            s.compile("spec.when.schedule")?;
        }
        if let Some(e) = &w.expression {
            cel::Program::compile(e).map_err(|err| {
                FieldError::new("spec.when.expression", format!("does not parse: {err}"))
            })?;
        }
        for (name, c) in [("country", &w.country), ("role", &w.role)] {
            if let Some(c) = c
                && c.any_of.is_empty()
                && c.not_in.is_empty()
            {
                return Err(FieldError::new(
                    format!("spec.when.{name}"),
                    "give `in` or `notIn`",
                ));
            }
        }
        if self.hold_until_clear && w.alert.is_none() {
            return Err(FieldError::new(
                "spec.holdUntilClear",
                "needs a `when.alert` condition to wait for",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
