//! A persona's QoS: rates its traffic is paced to, and how its packets are marked.
use persona_common::qos::{MAX_PRIORITY, QOS_DSCP, QOS_PRIORITY, Qos};
use serde::{Deserialize, Serialize};

use super::FieldError;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct QosSpec {
    /// What the VM sends, at most: "20mbit" (bit, kbit, mbit or gbit per second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_rate: Option<String>,
    /// What reaches the VM, at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_rate: Option<String>,
    /// The DSCP of what the VM sends: a name (`ef`, `af41`, `cs1`...) or 0 to 63.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dscp: Option<Dscp>,
    /// The kernel's priority of what the VM sends on the uplink, which its queueing
    /// discipline may class it by (0 to 15 for `pfifo_fast` bands; up to 32767). An
    /// `egressRate` takes its place: the priority is then the rate's HTB class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dscp {
    Code(u64),
    Name(String),
}

fn err(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError::new(format!("spec.qos.{field}"), reason)
}

/// Bytes per second of a rate written as tc writes it.
fn rate(field: &str, text: &str) -> Result<u64, FieldError> {
    let bad = || {
        err(
            field,
            format!("{text:?} is not a rate: a number of bit, kbit, mbit or gbit, e.g. \"20mbit\""),
        )
    };
    let lower = text.trim().to_ascii_lowercase();
    let (number, unit) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .into_iter()
        .find_map(|(suffix, unit)| Some((lower.strip_suffix(suffix)?, unit)))
        .ok_or_else(bad)?;
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    let bits = value * unit;
    if !bits.is_finite() || !(8_000.0..=400e9).contains(&bits) {
        return Err(err(field, format!("{text:?} is outside 8kbit to 400gbit")));
    }
    Ok((bits / 8.0) as u64)
}

/// RFC 2474/2597/3246/5865 names.
fn dscp(d: &Dscp) -> Result<u8, FieldError> {
    match d {
        Dscp::Code(c) if *c <= 63 => Ok(*c as u8),
        Dscp::Code(c) => Err(err("dscp", format!("{c} is not a DSCP (0 to 63)"))),
        Dscp::Name(name) => {
            let n = name.to_ascii_lowercase();
            let code = match n.as_str() {
                "be" | "default" => Some(0),
                "ef" => Some(46),
                "va" | "voice-admit" => Some(44),
                _ => n
                    .strip_prefix("cs")
                    .and_then(|c| c.parse::<u8>().ok())
                    .filter(|c| *c <= 7)
                    .map(|c| c << 3)
                    .or_else(|| {
                        let rest = n.strip_prefix("af")?.as_bytes();
                        let (class, drop) = match rest {
                            [c, d] => (c.checked_sub(b'0')?, d.checked_sub(b'0')?),
                            _ => return None,
                        };
                        ((1..=4).contains(&class) && (1..=3).contains(&drop))
                            .then_some((class << 3) | (drop << 1))
                    }),
            };
            code.ok_or_else(|| {
                err(
                    "dscp",
                    format!("{name:?} is not a DSCP name (ef, af11 to af43, cs0 to cs7, va, be) or 0 to 63"),
                )
            })
        }
    }
}

impl QosSpec {
    /// What the datapath enforces; every bad field refused by its path.
    pub fn compile(&self) -> Result<Qos, FieldError> {
        let mut q = Qos::default();
        if let Some(r) = &self.egress_rate {
            q.rate[0] = rate("egressRate", r)?;
        }
        if let Some(r) = &self.ingress_rate {
            q.rate[1] = rate("ingressRate", r)?;
        }
        if let Some(d) = &self.dscp {
            q.dscp = dscp(d)?;
            q.flags |= QOS_DSCP;
        }
        if let Some(p) = self.priority {
            if p > MAX_PRIORITY {
                return Err(err("priority", format!("{p} is over {MAX_PRIORITY}")));
            }
            q.priority = p;
            q.flags |= QOS_PRIORITY;
        }
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<Qos, FieldError> {
        serde_yaml::from_str::<QosSpec>(yaml).unwrap().compile()
    }

    #[test]
    fn rates_and_marks_compile_as_tc_and_the_rfcs_write_them() {
        let q =
            spec("{egressRate: 20mbit, ingressRate: 1.5Gbit, dscp: af41, priority: 6}").unwrap();
        assert_eq!(q.rate, [2_500_000, 187_500_000]);
        assert_eq!((q.dscp, q.priority), (34, 6));
        assert_eq!(q.flags, QOS_DSCP | QOS_PRIORITY);
        assert_eq!(spec("{dscp: ef}").unwrap().dscp, 46);
        assert_eq!(spec("{dscp: cs6}").unwrap().dscp, 48);
        assert_eq!(spec("{dscp: 10}").unwrap().dscp, 10);
        assert_eq!(spec("{}").unwrap(), Qos::default());
    }

    #[test]
    fn a_bad_value_is_refused_by_its_field() {
        for (yaml, field) in [
            ("{egressRate: fast}", "spec.qos.egressRate"),
            ("{egressRate: 20}", "spec.qos.egressRate"),
            ("{ingressRate: 1kbit}", "spec.qos.ingressRate"),
            ("{ingressRate: -5mbit}", "spec.qos.ingressRate"),
            ("{dscp: 64}", "spec.qos.dscp"),
            ("{dscp: af51}", "spec.qos.dscp"),
            ("{dscp: cs8}", "spec.qos.dscp"),
            ("{priority: 40000}", "spec.qos.priority"),
        ] {
            let e = spec(yaml).unwrap_err();
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
    }
}
