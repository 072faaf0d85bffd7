//! Where personas, devices, tokens, device state and the audit log live.
//!
//! [`Store`] is the interface: [`embedded::EmbeddedStore`] (redb, one file, nothing to
//! set up) for one host, [`etcd::EtcdStore`] for a fleet sharing etcd.
pub mod embedded;
pub mod etcd;
mod states;
mod wal;
mod writer;
pub use writer::{CommitStats, IntentId};

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Persona,
    Device,
    Rule,
    Application,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Persona => "Persona",
            Kind::Device => "Device",
            Kind::Rule => "Rule",
            Kind::Application => "Application",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Persona => "personas",
            Kind::Device => "devices",
            Kind::Rule => "rules",
            Kind::Application => "applications",
        }
    }
}

/// A stored object: its spec as written, and a version that grows with every write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub kind: Kind,
    pub name: String,
    pub version: u64,
    pub updated: jiff::Timestamp,
    pub spec: Value,
}

/// One write of a record. The version alone repeats when a deleted name is made again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub struct Stamp {
    pub version: u64,
    pub updated: jiff::Timestamp,
}

/// What a write expects to find, for optimistic concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Create: nothing of that name may exist.
    Absent,
    /// Update: the stored version must be this one.
    Version(u64),
    /// Create or overwrite (apply).
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("{other:?} is not a role (viewer, operator, admin)")),
        }
    }
}

/// A bearer token as stored: only a salted argon2 hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub role: Role,
    pub description: String,
    pub created: jiff::Timestamp,
    pub revoked: bool,
    pub hash: String,
}

/// What a device runs now, as the control plane last applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub persona: String,
    pub persona_version: u64,
    pub generation: u64,
    pub since: jiff::Timestamp,
    /// The rule that chose this persona, when the rule engine did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Addresses the device leased from the persona's pools, for as long as it stays.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<ipnet::IpNet>,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at: jiff::Timestamp,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBody {
    /// "shift", "apply", "delete", "token".
    pub kind: String,
    /// Who or what caused it: "token:abcd1234", "rule:night", "cli".
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// "ok", "dry-run", "rolled back: <why>", "failed: <why>".
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub detail: Value,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    Exists { kind: &'static str, name: String },
    #[error("{kind} {name:?} is at version {actual}, not {expected}: re-read and retry")]
    Conflict {
        kind: &'static str,
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("store: {0}")]
    Backend(String),
    /// The store cannot be reached: nothing was written; reads answer from what was
    /// last seen.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store refused this host's credentials the write (etcd's RBAC).
    #[error("store refused: {0}")]
    Forbidden(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Refuses a write whose expectation the stored record (`current`) does not meet.
fn check(kind: Kind, name: &str, current: Option<&Record>, expect: Expect) -> Result<()> {
    match (expect, current) {
        (Expect::Absent, Some(_)) => Err(StoreError::Exists {
            kind: kind.label(),
            name: name.into(),
        }),
        (Expect::Version(_), None) => Err(StoreError::NotFound {
            kind: kind.label(),
            name: name.into(),
        }),
        (Expect::Version(v), Some(r)) if r.version != v => Err(StoreError::Conflict {
            kind: kind.label(),
            name: name.into(),
            expected: v,
            actual: r.version,
        }),
        _ => Ok(()),
    }
}

pub trait Store: Send + Sync + 'static {
    fn get(&self, kind: Kind, name: &str) -> Result<Option<Record>>;
    /// Which write of the record is stored, without reading the spec: what caches of
    /// parsed records check against.
    fn stamp(&self, kind: Kind, name: &str) -> Result<Option<Stamp>> {
        Ok(self.get(kind, name)?.map(|r| Stamp {
            version: r.version,
            updated: r.updated,
        }))
    }
    /// Every record's stamp, by name.
    fn stamps(&self, kind: Kind) -> Result<Vec<(String, Stamp)>> {
        Ok(self
            .list(kind)?
            .into_iter()
            .map(|r| {
                let stamp = Stamp {
                    version: r.version,
                    updated: r.updated,
                };
                (r.name, stamp)
            })
            .collect())
    }
    /// A number that changes whenever a record of `kind` is written or deleted, for
    /// what is derived from all of them; `None` when the store cannot tell.
    fn generation(&self, kind: Kind) -> Option<u64> {
        let _ = kind;
        None
    }
    fn list(&self, kind: Kind) -> Result<Vec<Record>>;
    fn put(&self, kind: Kind, name: &str, spec: Value, expect: Expect) -> Result<Record>;
    fn delete(&self, kind: Kind, name: &str, expect: Expect) -> Result<Record>;
    /// [`Store::put`] with `body` appended to the audit log in the same transaction, its
    /// result the version stored (`version N`); recorded also when nothing changed.
    fn put_recorded(
        &self,
        kind: Kind,
        name: &str,
        spec: Value,
        expect: Expect,
        body: EventBody,
    ) -> Result<(Record, Event)>;
    /// [`Store::delete`] with `body` appended to the audit log in the same transaction.
    fn delete_recorded(
        &self,
        kind: Kind,
        name: &str,
        expect: Expect,
        body: EventBody,
    ) -> Result<(Record, Event)>;

    /// The persona's number in the datapath's counters: given on first use, kept for
    /// good (a deleted persona's counts stay attributable), never given to another.
    fn persona_id(&self, name: &str) -> Result<u32>;
    /// Every number given, with its persona's name.
    fn persona_names(&self) -> Result<std::collections::BTreeMap<u32, String>>;

    fn put_token(&self, token: &TokenRecord) -> Result<()>;
    fn token(&self, id: &str) -> Result<Option<TokenRecord>>;
    fn tokens(&self) -> Result<Vec<TokenRecord>>;

    fn device_state(&self, device: &str) -> Result<Option<DeviceState>>;
    /// Every device's state, by device name.
    fn device_states(&self) -> Result<Vec<(String, DeviceState)>>;
    /// The states of the devices on one of `personas` or leasing an address in `scope`,
    /// by device name: who may hold an address a shift wants.
    fn states_holding(
        &self,
        personas: &[String],
        scope: &crate::model::AddressScope,
    ) -> Result<Vec<(String, DeviceState)>> {
        let mut out = self.device_states()?;
        out.retain(|(_, s)| {
            personas.contains(&s.persona) || s.leases.iter().any(|l| scope.contains(&l.addr()))
        });
        Ok(out)
    }
    fn set_device_state(&self, device: &str, state: Option<&DeviceState>) -> Result<()>;
    /// Removes every record of the device's state, whichever host made it (the device
    /// is deleted).
    fn forget_device_state(&self, device: &str) -> Result<()> {
        self.set_device_state(device, None)
    }

    fn append_event(&self, body: EventBody) -> Result<Event>;
    /// How group commit has done, for a store that groups its writes.
    fn commit_stats(&self) -> Option<&CommitStats> {
        None
    }
    /// A device's new state and the audit event that records it, in one transaction.
    fn record_state(
        &self,
        device: &str,
        state: Option<&DeviceState>,
        body: EventBody,
    ) -> Result<Event> {
        self.set_device_state(device, state)?;
        self.append_event(body)
    }
    /// Logs, ahead of a shift's flip, the state and the record that the shift will
    /// write once it has flipped, so that the write after it ([`Store::submit_state`]
    /// given the id) needs no sync of its own: the log's sync runs alongside the flip.
    /// An intent left alone (the daemon stopped before the write after it) is replayed
    /// as the shift's record; a durable write (the record of a failed shift) drops it.
    /// `None` when the store keeps no such log.
    fn log_intent(
        &self,
        _device: &str,
        _state: &DeviceState,
        _body: &EventBody,
    ) -> Option<IntentId> {
        None
    }
    /// Makes `intent` durable, on the caller's thread: a blocking call, made while
    /// the flip runs on the datapath's.
    fn sync_intent(&self, _intent: IntentId) -> Result<()> {
        Ok(())
    }
    /// [`Store::record_state`] answered on a channel: an async caller waits without
    /// holding a thread. A store that cannot queue writes answers before it returns.
    /// `intent`, from [`Store::log_intent`], covers the write.
    fn submit_state(
        &self,
        device: &str,
        state: Option<DeviceState>,
        body: EventBody,
        _intent: Option<IntentId>,
    ) -> tokio::sync::oneshot::Receiver<Result<Event>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(self.record_state(device, state.as_ref(), body));
        rx
    }

    /// Context signals, as JSON, one per key; the rule engine owns their meaning.
    fn put_signal(&self, key: &str, signal: &Value) -> Result<()>;
    /// Several signals in one transaction, each given as its JSON (encoded once, by
    /// the engine that took it in).
    fn put_signals(&self, signals: Vec<(String, Vec<u8>)>) -> Result<()>;
    fn signals(&self) -> Result<Vec<Value>>;
    /// Forgets signals by key (those expired).
    fn delete_signals(&self, keys: &[String]) -> Result<()>;
    /// Events with `seq > after`, oldest first, at most `limit`.
    fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>>;
    /// Removes the oldest events, at most `at_most` in one transaction, while there are
    /// more than `keep` or they are older than `before`; the newest always stays, so
    /// numbering goes on. Returns how many went.
    fn prune_events(&self, before: jiff::Timestamp, keep: usize, at_most: usize) -> Result<usize>;
}
