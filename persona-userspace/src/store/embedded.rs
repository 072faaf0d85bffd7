//! The embedded store: one redb file. Every write is one ACID transaction committed with
//! `Durability::Immediate` (redb's default), so whatever was acknowledged survives a
//! SIGKILL or a power cut.
use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use redb::{
    Database, ReadableDatabase as _, ReadableTable as _, ReadableTableMetadata as _,
    TableDefinition,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{
    DeviceState, Event, EventBody, Expect, Kind, Record, Result, Stamp, Store, StoreError,
    TokenRecord,
};

const PERSONAS: TableDefinition<&str, &[u8]> = TableDefinition::new("personas");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const DEVICE_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("device_state");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const RULES: TableDefinition<&str, &[u8]> = TableDefinition::new("rules");
const APPLICATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("applications");
const SIGNALS: TableDefinition<&str, &[u8]> = TableDefinition::new("signals");
/// Persona name -> the number the datapath counts it by; never reused.
const PERSONA_IDS: TableDefinition<&str, u32> = TableDefinition::new("persona_ids");

fn table(kind: Kind) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match kind {
        Kind::Persona => PERSONAS,
        Kind::Device => DEVICES,
        Kind::Rule => RULES,
        Kind::Application => APPLICATIONS,
    }
}

fn label(kind: Kind) -> &'static str {
    match kind {
        Kind::Persona => "Persona",
        Kind::Device => "Device",
        Kind::Rule => "Rule",
        Kind::Application => "Application",
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(backend)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(backend)
}

pub struct EmbeddedStore {
    db: Database,
    /// Every record's version, kept beside the file: this process is its only writer
    /// (redb locks it), so the index is never stale.
    versions: std::sync::RwLock<HashMap<(Kind, String), Stamp>>,
    /// Held across a record's write transaction and its index update.
    record_writes: std::sync::Mutex<()>,
    persona_ids: std::sync::RwLock<HashMap<String, u32>>,
}

impl EmbeddedStore {
    /// Opens the store at `path`, creating the file and its tables when missing.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| backend(format!("{}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(backend)?;
        for t in [
            PERSONAS,
            DEVICES,
            TOKENS,
            DEVICE_STATE,
            RULES,
            SIGNALS,
            APPLICATIONS,
        ] {
            txn.open_table(t).map_err(backend)?;
        }
        txn.open_table(EVENTS).map_err(backend)?;
        txn.open_table(PERSONA_IDS).map_err(backend)?;
        txn.commit().map_err(backend)?;
        let mut versions = HashMap::new();
        let mut persona_ids = HashMap::new();
        {
            let txn = db.begin_read().map_err(backend)?;
            for kind in [Kind::Persona, Kind::Device, Kind::Rule, Kind::Application] {
                let t = txn.open_table(table(kind)).map_err(backend)?;
                for row in t.iter().map_err(backend)? {
                    let (k, v) = row.map_err(backend)?;
                    let stamp: Stamp = decode(v.value())?;
                    versions.insert((kind, k.value().to_owned()), stamp);
                }
            }
            let t = txn.open_table(PERSONA_IDS).map_err(backend)?;
            for row in t.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                persona_ids.insert(k.value().to_owned(), v.value());
            }
        }
        Ok(Self {
            db,
            versions: versions.into(),
            record_writes: Default::default(),
            persona_ids: persona_ids.into(),
        })
    }

    fn read<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(def).map_err(backend)?;
        match t.get(key).map_err(backend)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn read_all<T: DeserializeOwned>(&self, def: TableDefinition<&str, &[u8]>) -> Result<Vec<T>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(def).map_err(backend)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(backend)? {
            let (_, v) = row.map_err(backend)?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    fn write(
        &self,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<()> {
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut t = txn.open_table(def).map_err(backend)?;
            match value {
                Some(v) => {
                    t.insert(key, v).map_err(backend)?;
                }
                None => {
                    t.remove(key).map_err(backend)?;
                }
            }
        }
        txn.commit().map_err(backend)
    }
}

/// Appends an event numbered after the last, inside `txn`.
fn append(txn: &redb::WriteTransaction, body: EventBody) -> Result<Event> {
    let mut t = txn.open_table(EVENTS).map_err(backend)?;
    let last = t.last().map_err(backend)?.map_or(0, |(k, _)| k.value());
    let event = Event {
        seq: last + 1,
        at: jiff::Timestamp::now(),
        body,
    };
    t.insert(event.seq, encode(&event)?.as_slice())
        .map_err(backend)?;
    Ok(event)
}

fn check(kind: Kind, name: &str, current: Option<&Record>, expect: Expect) -> Result<()> {
    match (expect, current) {
        (Expect::Absent, Some(_)) => Err(StoreError::Exists {
            kind: label(kind),
            name: name.into(),
        }),
        (Expect::Version(_), None) => Err(StoreError::NotFound {
            kind: label(kind),
            name: name.into(),
        }),
        (Expect::Version(v), Some(r)) if r.version != v => Err(StoreError::Conflict {
            kind: label(kind),
            name: name.into(),
            expected: v,
            actual: r.version,
        }),
        _ => Ok(()),
    }
}

impl Store for EmbeddedStore {
    fn persona_id(&self, name: &str) -> Result<u32> {
        if let Some(&id) = self.persona_ids.read().expect("ids lock").get(name) {
            return Ok(id);
        }
        let mut ids = self.persona_ids.write().expect("ids lock");
        let txn = self.db.begin_write().map_err(backend)?;
        let id = {
            let mut t = txn.open_table(PERSONA_IDS).map_err(backend)?;
            if let Some(id) = t.get(name).map_err(backend)? {
                return Ok(id.value());
            }
            let mut next = 1;
            for entry in t.iter().map_err(backend)? {
                next = next.max(entry.map_err(backend)?.1.value() + 1);
            }
            t.insert(name, next).map_err(backend)?;
            next
        };
        txn.commit().map_err(backend)?;
        ids.insert(name.to_owned(), id);
        Ok(id)
    }

    fn persona_names(&self) -> Result<BTreeMap<u32, String>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(PERSONA_IDS).map_err(backend)?;
        let mut out = BTreeMap::new();
        for entry in t.iter().map_err(backend)? {
            let (name, id) = entry.map_err(backend)?;
            out.insert(id.value(), name.value().to_owned());
        }
        Ok(out)
    }

    fn get(&self, kind: Kind, name: &str) -> Result<Option<Record>> {
        self.read(table(kind), name)
    }

    fn list(&self, kind: Kind) -> Result<Vec<Record>> {
        self.read_all(table(kind))
    }

    fn stamp(&self, kind: Kind, name: &str) -> Result<Option<Stamp>> {
        let versions = self.versions.read().expect("versions lock");
        Ok(versions.get(&(kind, name.to_owned())).copied())
    }

    fn put(&self, kind: Kind, name: &str, spec: Value, expect: Expect) -> Result<Record> {
        let _writing = self.record_writes.lock().expect("record writes lock");
        // Read, check and write in one write transaction: no other writer in between.
        let txn = self.db.begin_write().map_err(backend)?;
        let record = {
            let mut t = txn.open_table(table(kind)).map_err(backend)?;
            let current: Option<Record> = match t.get(name).map_err(backend)? {
                Some(v) => Some(decode(v.value())?),
                None => None,
            };
            check(kind, name, current.as_ref(), expect)?;
            if let Some(cur) = &current
                && cur.spec == spec
            {
                return Ok(cur.clone());
            }
            let record = Record {
                kind,
                name: name.into(),
                version: current.map_or(1, |c| c.version + 1),
                updated: jiff::Timestamp::now(),
                spec,
            };
            t.insert(name, encode(&record)?.as_slice())
                .map_err(backend)?;
            record
        };
        txn.commit().map_err(backend)?;
        self.versions.write().expect("versions lock").insert(
            (kind, name.to_owned()),
            Stamp {
                version: record.version,
                updated: record.updated,
            },
        );
        Ok(record)
    }

    fn delete(&self, kind: Kind, name: &str, expect: Expect) -> Result<Record> {
        let _writing = self.record_writes.lock().expect("record writes lock");
        let txn = self.db.begin_write().map_err(backend)?;
        let record = {
            let mut t = txn.open_table(table(kind)).map_err(backend)?;
            let current: Option<Record> = match t.get(name).map_err(backend)? {
                Some(v) => Some(decode(v.value())?),
                None => None,
            };
            let Some(current) = current else {
                return Err(StoreError::NotFound {
                    kind: label(kind),
                    name: name.into(),
                });
            };
            check(kind, name, Some(&current), expect)?;
            t.remove(name).map_err(backend)?;
            current
        };
        txn.commit().map_err(backend)?;
        self.versions
            .write()
            .expect("versions lock")
            .remove(&(kind, name.to_owned()));
        Ok(record)
    }

    fn put_token(&self, token: &TokenRecord) -> Result<()> {
        self.write(TOKENS, &token.id, Some(&encode(token)?))
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        self.read(TOKENS, id)
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read_all(TOKENS)
    }

    fn device_state(&self, device: &str) -> Result<Option<DeviceState>> {
        self.read(DEVICE_STATE, device)
    }

    fn device_states(&self) -> Result<Vec<(String, DeviceState)>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(DEVICE_STATE).map_err(backend)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            out.push((k.value().to_owned(), decode(v.value())?));
        }
        Ok(out)
    }

    fn set_device_state(&self, device: &str, state: Option<&DeviceState>) -> Result<()> {
        let bytes = state.map(encode).transpose()?;
        self.write(DEVICE_STATE, device, bytes.as_deref())
    }

    fn append_event(&self, body: EventBody) -> Result<Event> {
        let txn = self.db.begin_write().map_err(backend)?;
        let event = append(&txn, body)?;
        txn.commit().map_err(backend)?;
        Ok(event)
    }

    fn record_state(
        &self,
        device: &str,
        state: Option<&DeviceState>,
        body: EventBody,
    ) -> Result<Event> {
        let bytes = state.map(encode).transpose()?;
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut t = txn.open_table(DEVICE_STATE).map_err(backend)?;
            match &bytes {
                Some(v) => t.insert(device, v.as_slice()).map_err(backend)?,
                None => t.remove(device).map_err(backend)?,
            };
        }
        let event = append(&txn, body)?;
        txn.commit().map_err(backend)?;
        Ok(event)
    }

    fn put_signal(&self, key: &str, signal: &Value) -> Result<()> {
        self.write(SIGNALS, key, Some(&encode(signal)?))
    }

    fn put_signals(&self, signals: &[(String, Value)]) -> Result<()> {
        if signals.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut t = txn.open_table(SIGNALS).map_err(backend)?;
            for (key, signal) in signals {
                t.insert(key.as_str(), encode(signal)?.as_slice())
                    .map_err(backend)?;
            }
        }
        txn.commit().map_err(backend)
    }

    fn signals(&self) -> Result<Vec<Value>> {
        self.read_all(SIGNALS)
    }

    fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(EVENTS).map_err(backend)?;
        let mut out = Vec::new();
        for row in t
            .range(after.saturating_add(1)..)
            .map_err(backend)?
            .take(limit)
        {
            let (_, v) = row.map_err(backend)?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    fn prune_events(&self, before: jiff::Timestamp, keep: usize, at_most: usize) -> Result<usize> {
        let txn = self.db.begin_write().map_err(backend)?;
        let mut removed = 0;
        {
            let mut t = txn.open_table(EVENTS).map_err(backend)?;
            let mut left = t.len().map_err(backend)?;
            while left > 1 && removed < at_most {
                let at = match t.first().map_err(backend)? {
                    Some((_, v)) => decode::<Event>(v.value())?.at,
                    None => break,
                };
                if left <= keep as u64 && at >= before {
                    break;
                }
                t.pop_first().map_err(backend)?;
                left -= 1;
                removed += 1;
            }
        }
        txn.commit().map_err(backend)?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A directory removed when the test ends.
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store() -> (EmbeddedStore, Scratch) {
        let dir = std::env::temp_dir().join(format!(
            "persona-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        (
            EmbeddedStore::open(&dir.join("store.redb")).expect("open"),
            Scratch(dir),
        )
    }

    #[test]
    fn persona_ids_are_given_once_and_kept() {
        let (s, dir) = store();
        let office = s.persona_id("office").unwrap();
        let travel = s.persona_id("travel").unwrap();
        assert_ne!(office, travel);
        assert_ne!(office, persona_common::counters::NO_PERSONA);
        assert_eq!(s.persona_id("office").unwrap(), office, "asked again");
        drop(s);
        let s = EmbeddedStore::open(&dir.0.join("store.redb")).unwrap();
        assert_eq!(s.persona_id("travel").unwrap(), travel, "after a reopen");
        let third = s.persona_id("hardened").unwrap();
        assert!(third > office && third > travel, "never given twice");
        assert_eq!(
            s.persona_names().unwrap().into_iter().collect::<Vec<_>>(),
            [
                (office, "office".to_owned()),
                (travel, "travel".to_owned()),
                (third, "hardened".to_owned())
            ]
        );
    }

    #[test]
    fn versions_grow_and_stale_writes_are_refused() {
        let (s, _dir) = store();
        let r1 = s
            .put(Kind::Persona, "office", json!({"a": 1}), Expect::Absent)
            .expect("create");
        assert_eq!(r1.version, 1);
        assert!(matches!(
            s.put(Kind::Persona, "office", json!({"a": 2}), Expect::Absent),
            Err(StoreError::Exists { .. })
        ));
        let r2 = s
            .put(Kind::Persona, "office", json!({"a": 2}), Expect::Version(1))
            .expect("update");
        assert_eq!(r2.version, 2);
        let stale = s.put(Kind::Persona, "office", json!({"a": 3}), Expect::Version(1));
        assert!(
            matches!(
                stale,
                Err(StoreError::Conflict {
                    expected: 1,
                    actual: 2,
                    ..
                })
            ),
            "{stale:?}"
        );
        assert_eq!(
            s.get(Kind::Persona, "office").unwrap().unwrap().spec,
            json!({"a": 2}),
            "a refused write changes nothing"
        );
        let same = s
            .put(Kind::Persona, "office", json!({"a": 2}), Expect::Any)
            .expect("same spec");
        assert_eq!(
            same.version, 2,
            "re-applying the same spec is not a new version"
        );
        assert!(matches!(
            s.delete(Kind::Persona, "office", Expect::Version(1)),
            Err(StoreError::Conflict { .. })
        ));
        s.delete(Kind::Persona, "office", Expect::Version(2))
            .expect("delete");
        assert!(s.get(Kind::Persona, "office").unwrap().is_none());
    }

    #[test]
    fn events_are_numbered_and_read_in_order() {
        let (s, _dir) = store();
        for _ in 0..5 {
            event(&s);
        }
        let tail: Vec<u64> = s.events(2, 10).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(tail, [3, 4, 5]);
        assert_eq!(s.events(0, 2).unwrap().len(), 2);
    }

    fn event(s: &EmbeddedStore) -> Event {
        s.append_event(EventBody {
            kind: "shift".into(),
            actor: "test".into(),
            device: None,
            from: None,
            to: None,
            generation: None,
            result: "ok".into(),
            duration_us: None,
            detail: Value::Null,
        })
        .expect("append")
    }

    #[test]
    fn events_are_pruned_by_count_and_age_and_numbering_goes_on() {
        let (s, _dir) = store();
        for _ in 0..10 {
            event(&s);
        }
        let long_ago = jiff::Timestamp::UNIX_EPOCH;
        // In batches: two, then the rest.
        assert_eq!(s.prune_events(long_ago, 4, 2).unwrap(), 2);
        assert_eq!(s.prune_events(long_ago, 4, 100).unwrap(), 4);
        let seqs: Vec<u64> = s.events(0, 100).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [7, 8, 9, 10]);
        // Everything is too old: the newest stays all the same.
        let future = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
        assert_eq!(s.prune_events(future, 100, 100).unwrap(), 3);
        assert_eq!(event(&s).seq, 11);
        assert_eq!(s.prune_events(long_ago, 100, 100).unwrap(), 0);
    }
}
