//! A signal read in one pass. Serde's `flatten` of the kind's fields would buffer every
//! field of every signal first; a batch of a thousand is read on each POST /context.
//! The errors are serde's own: a missing, duplicate or unknown field, an unknown kind.
use std::{fmt, net::IpAddr};

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

use super::{AlertState, Severity, Signal, SignalBody};

const KINDS: &[&str] = &["alert", "geo", "app", "role"];
const ALERT: &[&str] = &["id", "severity", "alertKind", "state"];
const GEO: &[&str] = &["country", "region", "lat", "lon", "address"];
const APP: &[&str] = &["app", "active"];
const ROLE: &[&str] = &["role"];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Alert,
    Geo,
    App,
    Role,
}

impl Kind {
    fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Alert => ALERT,
            Kind::Geo => GEO,
            Kind::App => APP,
            Kind::Role => ROLE,
        }
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Kind;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a signal kind")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
                Ok(match v {
                    "alert" => Kind::Alert,
                    "geo" => Kind::Geo,
                    "app" => Kind::App,
                    "role" => Kind::Role,
                    _ => return Err(E::unknown_variant(v, KINDS)),
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// Every field name a signal may have, each once.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    Device,
    Kind,
    Source,
    At,
    Ttl,
    Id,
    Severity,
    AlertKind,
    State,
    Country,
    Region,
    Lat,
    Lon,
    Address,
    App,
    Active,
    Role,
}

const FIELDS: &[&str] = &[
    "device",
    "kind",
    "source",
    "at",
    "ttl",
    "id",
    "severity",
    "alertKind",
    "state",
    "country",
    "region",
    "lat",
    "lon",
    "address",
    "app",
    "active",
    "role",
];

impl Field {
    fn name(self) -> &'static str {
        FIELDS[self as usize]
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                use Field::*;
                Ok(match v {
                    "device" => Device,
                    "kind" => Kind,
                    "source" => Source,
                    "at" => At,
                    "ttl" => Ttl,
                    "id" => Id,
                    "severity" => Severity,
                    "alertKind" => AlertKind,
                    "state" => State,
                    "country" => Country,
                    "region" => Region,
                    "lat" => Lat,
                    "lon" => Lon,
                    "address" => Address,
                    "app" => App,
                    "active" => Active,
                    "role" => Role,
                    _ => return Err(E::unknown_field(v, FIELDS)),
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// The fields as read, whichever kind they turn out to belong to.
#[derive(Default)]
struct Read {
    seen: u32,
    device: Option<String>,
    kind: Option<Kind>,
    source: Option<String>,
    at: Option<jiff::Timestamp>,
    ttl: Option<u64>,
    id: Option<String>,
    severity: Option<Severity>,
    alert_kind: Option<String>,
    state: Option<AlertState>,
    country: Option<String>,
    region: Option<String>,
    lat: Option<f64>,
    lon: Option<f64>,
    address: Option<IpAddr>,
    app: Option<String>,
    active: Option<bool>,
    role: Option<String>,
}

impl Read {
    fn has(&self, f: Field) -> bool {
        self.seen & (1 << f as u32) != 0
    }

    fn body<E: de::Error>(&mut self, kind: Kind) -> Result<SignalBody, E> {
        let own = kind.fields();
        for f in [
            Field::Id,
            Field::Severity,
            Field::AlertKind,
            Field::State,
            Field::Country,
            Field::Region,
            Field::Lat,
            Field::Lon,
            Field::Address,
            Field::App,
            Field::Active,
            Field::Role,
        ] {
            if self.has(f) && !own.contains(&f.name()) {
                return Err(E::unknown_field(f.name(), own));
            }
        }
        let need = |v: Option<String>, f: &'static str| v.ok_or_else(|| E::missing_field(f));
        Ok(match kind {
            Kind::Alert => SignalBody::Alert {
                id: need(self.id.take(), "id")?,
                severity: self.severity.ok_or_else(|| E::missing_field("severity"))?,
                alert_kind: self.alert_kind.take().unwrap_or_default(),
                state: self.state.unwrap_or_default(),
            },
            Kind::Geo => SignalBody::Geo {
                country: self.country.take(),
                region: self.region.take(),
                lat: self.lat,
                lon: self.lon,
                address: self.address,
            },
            Kind::App => SignalBody::App {
                app: need(self.app.take(), "app")?,
                active: self.active.unwrap_or(true),
            },
            Kind::Role => SignalBody::Role {
                role: need(self.role.take(), "role")?,
            },
        })
    }
}

struct SignalVisitor;

impl<'de> Visitor<'de> for SignalVisitor {
    type Value = Signal;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a signal: an object with a device and a kind")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Signal, A::Error> {
        let mut r = Read::default();
        while let Some(field) = map.next_key::<Field>()? {
            if r.has(field) {
                return Err(de::Error::duplicate_field(field.name()));
            }
            r.seen |= 1 << field as u32;
            match field {
                Field::Device => r.device = Some(map.next_value()?),
                Field::Kind => r.kind = Some(map.next_value()?),
                Field::Source => r.source = Some(map.next_value()?),
                Field::At => r.at = map.next_value()?,
                Field::Ttl => r.ttl = map.next_value()?,
                Field::Id => r.id = Some(map.next_value()?),
                Field::Severity => r.severity = Some(map.next_value()?),
                Field::AlertKind => r.alert_kind = Some(map.next_value()?),
                Field::State => r.state = Some(map.next_value()?),
                Field::Country => r.country = map.next_value()?,
                Field::Region => r.region = map.next_value()?,
                Field::Lat => r.lat = map.next_value()?,
                Field::Lon => r.lon = map.next_value()?,
                Field::Address => r.address = map.next_value()?,
                Field::App => r.app = Some(map.next_value()?),
                Field::Active => r.active = Some(map.next_value()?),
                Field::Role => r.role = Some(map.next_value()?),
            }
        }
        let kind = r.kind.ok_or_else(|| de::Error::missing_field("kind"))?;
        let device = r
            .device
            .take()
            .ok_or_else(|| de::Error::missing_field("device"))?;
        Ok(Signal {
            device,
            body: r.body(kind)?,
            source: r.source.take().unwrap_or_else(super::api),
            at: r.at,
            ttl: r.ttl,
        })
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(SignalVisitor)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    /// What serde derives for the same shape: the reference this reader must agree with.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Derived {
        device: String,
        #[serde(flatten)]
        body: SignalBody,
        #[serde(default = "super::super::api")]
        source: String,
        #[serde(default)]
        at: Option<jiff::Timestamp>,
        #[serde(default)]
        ttl: Option<u64>,
    }

    fn both(json: &str) -> (Result<Signal, String>, Result<Signal, String>) {
        let ours = serde_json::from_str::<Signal>(json).map_err(|e| e.to_string());
        let derived = serde_json::from_str::<Derived>(json)
            .map(|d| Signal {
                device: d.device,
                body: d.body,
                source: d.source,
                at: d.at,
                ttl: d.ttl,
            })
            .map_err(|e| e.to_string());
        (ours, derived)
    }

    #[test]
    fn reads_what_the_derived_reader_reads() {
        for json in [
            r#"{"device":"d1","kind":"alert","id":"a1","severity":"high"}"#,
            r#"{"kind":"alert","severity":"low","id":"a","alertKind":"ids","state":"cleared","device":"d"}"#,
            r#"{"device":"d","kind":"geo","country":"DE","lat":52,"lon":13.4,"source":"gps"}"#,
            r#"{"device":"d","kind":"geo","address":"192.0.2.7","country":null}"#,
            r#"{"device":"d","kind":"geo"}"#,
            r#"{"device":"d","kind":"app","app":"ssh"}"#,
            r#"{"device":"d","kind":"app","app":"ssh","active":false,"ttl":30,"at":"2026-12-04T10:00:00Z"}"#,
            r#"{"device":"d","kind":"role","role":"admin","at":null,"ttl":null}"#,
        ] {
            let (ours, derived) = both(json);
            assert_eq!(ours, derived, "{json}");
            assert!(ours.is_ok(), "{json}");
            let again = serde_json::to_string(&ours.unwrap()).unwrap();
            assert_eq!(both(&again).0, both(json).0, "round trip of {json}");
        }
    }

    #[test]
    fn refuses_what_the_derived_reader_refuses_naming_the_field() {
        for (json, names) in [
            (r#"{"kind":"role","role":"x"}"#, "`device`"),
            (r#"{"device":"d","role":"x"}"#, "`kind`"),
            (r#"{"device":"d","kind":"mood"}"#, "`mood`"),
            (r#"{"device":"d","kind":"alert","severity":"high"}"#, "`id`"),
            (r#"{"device":"d","kind":"alert","id":"a"}"#, "`severity`"),
            (
                r#"{"device":"d","kind":"alert","id":"a","severity":"dire"}"#,
                "`dire`",
            ),
            (r#"{"device":"d","kind":"app"}"#, "`app`"),
            (r#"{"device":"d","kind":"role"}"#, "`role`"),
            (
                r#"{"device":"d","kind":"role","role":"x","country":"DE"}"#,
                "`country`",
            ),
            (r#"{"device":"d","kind":"geo","app":"x"}"#, "`app`"),
            (r#"{"device":"d","kind":"geo","colour":"red"}"#, "`colour`"),
            (r#"{"device":"d","kind":"geo","lat":"north"}"#, "f64"),
            (
                r#"{"device":"d","kind":"geo","address":"not-an-ip"}"#,
                "IP address",
            ),
            (r#"{"device":"d","kind":"app","app":"x","ttl":-1}"#, "-1"),
            (r#"{"device":7,"kind":"role","role":"x"}"#, "7"),
            (r#"["d"]"#, "a signal"),
            (r#""d""#, "a signal"),
        ] {
            let (ours, derived) = both(json);
            let (Err(ours), Err(_)) = (&ours, &derived) else {
                panic!("{json}: ours {ours:?}, derived {derived:?}");
            };
            assert!(ours.contains(names), "{json}: {ours}");
        }
        let (ours, _) = both(r#"{"device":"d","kind":"role","role":"x","role":"y"}"#);
        assert!(ours.unwrap_err().contains("duplicate field `role`"));
    }
}
