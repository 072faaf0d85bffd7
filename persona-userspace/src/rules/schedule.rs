//! Time-of-day windows in an IANA time zone, correct across daylight-saving changes.
use jiff::{
    Timestamp,
    civil::{Time, Weekday},
    tz::TimeZone,
};
use serde::{Deserialize, Serialize};

use crate::model::FieldError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Schedule {
    /// e.g. "Europe/Berlin".
    pub timezone: String,
    /// "mon".."sun"; every day when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<String>,
    /// "HH:MM" or "HH:MM:SS" local time; `to` before `from` spans midnight.
    pub from: String,
    pub to: String,
}

fn weekday(s: &str) -> Option<Weekday> {
    Some(match s {
        "mon" => Weekday::Monday,
        "tue" => Weekday::Tuesday,
        "wed" => Weekday::Wednesday,
        "thu" => Weekday::Thursday,
        "fri" => Weekday::Friday,
        "sat" => Weekday::Saturday,
        "sun" => Weekday::Sunday,
        _ => return None,
    })
}

/// "HH:MM" or "HH:MM:SS".
fn clock_time(s: &str) -> Option<Time> {
    let mut parts = s.split(':');
    let mut field = |required: bool| match parts.next() {
        Some(p) if p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok(),
        None if !required => Some(0),
        _ => None,
    };
    let (h, m, sec) = (field(true)?, field(true)?, field(false)?);
    if parts.next().is_some() {
        return None;
    }
    Time::new(h, m, sec, 0).ok()
}

pub struct Compiled {
    tz: TimeZone,
    days: Vec<Weekday>,
    from: Time,
    to: Time,
}

impl Schedule {
    pub fn compile(&self, field: &str) -> Result<Compiled, FieldError> {
        let tz = TimeZone::get(&self.timezone).map_err(|_| {
            FieldError::new(
                format!("{field}.timezone"),
                format!("{:?} is not an IANA time zone", self.timezone),
            )
        })?;
        let mut days = Vec::new();
        for (i, d) in self.days.iter().enumerate() {
            days.push(weekday(d).ok_or_else(|| {
                FieldError::new(
                    format!("{field}.days[{i}]"),
                    format!("{d:?} is not mon..sun"),
                )
            })?);
        }
        let time = |s: &str, f: &str| {
            clock_time(s).ok_or_else(|| {
                FieldError::new(
                    format!("{field}.{f}"),
                    format!("{s:?} is not HH:MM or HH:MM:SS"),
                )
            })
        };
        let (from, to) = (time(&self.from, "from")?, time(&self.to, "to")?);
        if from == to {
            return Err(FieldError::new(
                format!("{field}.to"),
                "equals from: the window would be empty",
            ));
        }
        Ok(Compiled { tz, days, from, to })
    }
}

impl Compiled {
    pub fn active(&self, now: Timestamp) -> bool {
        let z = now.to_zoned_datetime(self.tz.clone());
        let t = z.time();
        let (in_window, day) = if self.from < self.to {
            (self.from <= t && t < self.to, z.weekday())
        } else if t >= self.from {
            (true, z.weekday())
        } else {
            // After midnight, the window belongs to the day it started on.
            (t < self.to, z.weekday().previous())
        };
        in_window && (self.days.is_empty() || self.days.contains(&day))
    }

    /// The first instant after `now` at which `active` can change.
    pub fn next_boundary(&self, now: Timestamp) -> Option<Timestamp> {
        let today = now.to_zoned_datetime(self.tz.clone()).date();
        (0..9)
            .flat_map(|offset| {
                let date = today.checked_add(jiff::Span::new().days(offset)).ok();
                [self.from, self.to].into_iter().filter_map(move |t| {
                    // A local time inside a DST gap resolves to the instant after it.
                    let z = date?
                        .to_datetime(t)
                        .to_zoned_datetime(self.tz.clone())
                        .ok()?;
                    Some(z.timestamp())
                })
            })
            .filter(|ts| *ts > now)
            .min()
    }
}
