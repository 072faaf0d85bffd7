//! The embedded store: one redb file. Every write is one ACID transaction committed with
//! `Durability::Immediate` (redb's default), so whatever was acknowledged survives a
//! SIGKILL or a power cut.
use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, RwLock},
};

use redb::{
    Database, ReadableDatabase as _, ReadableTable as _, ReadableTableMetadata as _,
    TableDefinition,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{
    DeviceState, Event, EventBody, Expect, IntentId, Kind, Record, Result, Stamp, Store,
    StoreError, TokenRecord, check,
};
use super::{
    states::States,
    wal::Wal,
    writer::{After, Done, Writer, epoch, next_epoch},
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

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(backend)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(backend)
}

type Index<K, V> = Arc<RwLock<HashMap<K, V>>>;

/// Every record's stamp by kind, and how many writes each kind has had.
#[derive(Default)]
struct Versions {
    stamps: hashbrown::HashMap<Kind, hashbrown::HashMap<String, Stamp>>,
    generations: hashbrown::HashMap<Kind, u64>,
}

impl Versions {
    fn set(&mut self, kind: Kind, name: String, stamp: Option<Stamp>) {
        let stamps = self.stamps.entry(kind).or_default();
        match stamp {
            Some(s) => stamps.insert(name, s),
            None => stamps.remove(&name),
        };
        *self.generations.entry(kind).or_default() += 1;
    }
}

type Shared<T> = Arc<RwLock<T>>;

pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Every write goes through it, grouped into shared transactions.
    writer: Writer,
    /// Every record's stamp, kept beside the file: this process is its only writer
    /// (redb locks it), and the writer updates it in commit order, so it is never stale.
    versions: Shared<Versions>,
    persona_ids: Index<String, u32>,
    /// Every device's state, kept the same way: shifts and the rule engine read them
    /// far more often than they change.
    states: Shared<States>,
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
        let epoch = epoch(&txn)?;
        txn.commit().map_err(backend)?;
        let wal = replay(&db, &path.with_extension("wal"), epoch)?;
        let mut versions = Versions::default();
        let mut persona_ids = HashMap::new();
        let mut states = States::default();
        {
            let txn = db.begin_read().map_err(backend)?;
            for kind in [Kind::Persona, Kind::Device, Kind::Rule, Kind::Application] {
                let t = txn.open_table(table(kind)).map_err(backend)?;
                for row in t.iter().map_err(backend)? {
                    let (k, v) = row.map_err(backend)?;
                    let stamp: Stamp = decode(v.value())?;
                    versions
                        .stamps
                        .entry(kind)
                        .or_default()
                        .insert(k.value().to_owned(), stamp);
                }
            }
            let t = txn.open_table(PERSONA_IDS).map_err(backend)?;
            for row in t.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                persona_ids.insert(k.value().to_owned(), v.value());
            }
            let t = txn.open_table(DEVICE_STATE).map_err(backend)?;
            for row in t.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                states.set(k.value(), Some(decode(v.value())?));
            }
        }
        let db = Arc::new(db);
        Ok(Self {
            writer: Writer::spawn(db.clone(), Some(wal))?,
            db,
            versions: Arc::new(versions.into()),
            persona_ids: Arc::new(persona_ids.into()),
            states: Arc::new(states.into()),
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

    /// Sets or removes one value, in the next group's transaction.
    fn write(
        &self,
        def: TableDefinition<'static, &'static str, &'static [u8]>,
        key: &str,
        value: Option<Vec<u8>>,
    ) -> Result<()> {
        let key = key.to_owned();
        self.writer
            .write(move |txn| Ok((set(txn, def, &key, value.as_deref())?, None)))
    }
}

/// Sets or removes `key`, inside `txn`.
fn set(
    txn: &redb::WriteTransaction,
    def: TableDefinition<&str, &[u8]>,
    key: &str,
    value: Option<&[u8]>,
) -> Result<()> {
    let mut t = txn.open_table(def).map_err(backend)?;
    match value {
        Some(v) => t.insert(key, v).map_err(backend)?,
        None => t.remove(key).map_err(backend)?,
    };
    Ok(())
}

/// Object `name` as the table holds it.
fn current(t: &redb::Table<&'static str, &'static [u8]>, name: &str) -> Result<Option<Record>> {
    match t.get(name).map_err(backend)? {
        Some(v) => Ok(Some(decode(v.value())?)),
        None => Ok(None),
    }
}

/// Stores `spec` as object `name` inside `txn`, unless it holds that already; with the
/// record it replaced.
fn put_in(
    txn: &redb::WriteTransaction,
    (kind, name): (Kind, String),
    spec: Value,
    expect: Expect,
    versions: Shared<Versions>,
) -> Result<(Record, Option<After>, Option<Record>)> {
    let mut t = txn.open_table(table(kind)).map_err(backend)?;
    let current = current(&t, &name)?;
    check(kind, &name, current.as_ref(), expect)?;
    if let Some(cur) = current.as_ref().filter(|c| c.spec == spec) {
        return Ok((cur.clone(), None, current));
    }
    let record = Record {
        kind,
        name: name.clone(),
        version: current.as_ref().map_or(1, |c| c.version + 1),
        updated: jiff::Timestamp::now(),
        spec,
    };
    t.insert(name.as_str(), encode(&record)?.as_slice())
        .map_err(backend)?;
    let stamp = Stamp {
        version: record.version,
        updated: record.updated,
    };
    let after: After = Box::new(move || {
        versions
            .write()
            .expect("versions lock")
            .set(kind, name, Some(stamp));
    });
    Ok((record, Some(after), current))
}

fn delete_in(
    txn: &redb::WriteTransaction,
    (kind, name): (Kind, String),
    expect: Expect,
    versions: Shared<Versions>,
) -> Result<(Record, Option<After>)> {
    let mut t = txn.open_table(table(kind)).map_err(backend)?;
    let Some(current) = current(&t, &name)? else {
        return Err(StoreError::NotFound {
            kind: kind.label(),
            name,
        });
    };
    check(kind, &name, Some(&current), expect)?;
    t.remove(name.as_str()).map_err(backend)?;
    let after: After = Box::new(move || {
        versions
            .write()
            .expect("versions lock")
            .set(kind, name, None);
    });
    Ok((current, Some(after)))
}

/// Appends `body` after a write to object `name`; when that fails, puts the object back
/// as it was (`before`): the group's transaction commits without either.
fn recorded(
    txn: &redb::WriteTransaction,
    body: EventBody,
    (kind, name, before): (Kind, &str, Option<&Record>),
) -> Result<Event> {
    append(txn, body).inspect_err(|_| {
        if let Ok(bytes) = before.map(encode).transpose() {
            let _ = set(txn, table(kind), name, bytes.as_deref());
        }
    })
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

/// A write as the log holds it, to be done again when the store opens after a crash.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Logged {
    State {
        device: String,
        state: Option<Box<DeviceState>>,
        event: Box<Event>,
        /// The intent this record follows, when it covers one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        intent: Option<IntentId>,
    },
    /// A shift's state and record logged before its flip; replayed only when no record
    /// covering it follows.
    Intent {
        id: IntentId,
        device: String,
        state: Box<DeviceState>,
        at: jiff::Timestamp,
        body: Box<EventBody>,
    },
    Signals {
        rows: Vec<(String, Value)>,
    },
}

/// [`Logged::Signals`] of rows already encoded, written around their bytes instead of
/// parsing and encoding each signal again.
fn signals_logged(rows: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut log = Vec::with_capacity(
        rows.iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
            + 32,
    );
    log.extend_from_slice(br#"{"op":"signals","rows":["#);
    for (i, (key, row)) in rows.iter().enumerate() {
        if i > 0 {
            log.push(b',');
        }
        log.push(b'[');
        serde_json::to_writer(&mut log, key).map_err(backend)?;
        log.push(b',');
        log.extend_from_slice(row);
        log.push(b']');
    }
    log.extend_from_slice(b"]}");
    Ok(log)
}

/// Opens the store's log, and does again, durably, what it holds that the file does
/// not: the writes acknowledged after the last durable commit. The log then starts over
/// under a new epoch, even when it held nothing readable: what a torn record hid is
/// never read later.
fn replay(db: &Database, path: &Path, epoch: u64) -> Result<Wal> {
    let io = |e: std::io::Error| backend(format!("{}: {e}", path.display()));
    let (mut wal, records) = Wal::open(path, epoch).map_err(io)?;
    let logged = records
        .iter()
        .map(|r| decode::<Logged>(r))
        .collect::<Result<Vec<_>>>()?;
    let covered: std::collections::HashSet<IntentId> = logged
        .iter()
        .filter_map(|l| match l {
            Logged::State { intent, .. } => *intent,
            _ => None,
        })
        .collect();
    let txn = db.begin_write().map_err(backend)?;
    let last = |txn: &redb::WriteTransaction| -> Result<u64> {
        let events = txn.open_table(EVENTS).map_err(backend)?;
        Ok(events
            .last()
            .map_err(backend)?
            .map_or(0, |(k, _)| k.value()))
    };
    // Records the file holds already are those numbered up to its last event; a
    // recovered intent's event is numbered after every event logged, so that none
    // takes the number of an acknowledged one.
    let held = last(&txn)?;
    let mut recovered = Vec::new();
    for l in logged {
        match l {
            Logged::State {
                device,
                state,
                event,
                ..
            } => {
                if event.seq <= held {
                    continue;
                }
                let mut events = txn.open_table(EVENTS).map_err(backend)?;
                events
                    .insert(event.seq, encode(&event)?.as_slice())
                    .map_err(backend)?;
                drop(events);
                let bytes = state.as_ref().map(encode).transpose()?;
                set(&txn, DEVICE_STATE, &device, bytes.as_deref())?;
            }
            Logged::Intent {
                id,
                device,
                state,
                at,
                mut body,
            } => {
                if covered.contains(&id) {
                    continue;
                }
                // The shift may have been answered: what it logged before its flip
                // stands. Its generation is unknown, so the daemon applies it again.
                body.detail["recovered"] = "from the intent logged before the flip".into();
                recovered.push((at, body));
                set(&txn, DEVICE_STATE, &device, Some(&encode(&state)?))?;
            }
            Logged::Signals { rows } => {
                for (key, signal) in rows {
                    set(&txn, SIGNALS, &key, Some(&encode(&signal)?))?;
                }
            }
        }
    }
    for (at, body) in recovered {
        let seq = last(&txn)? + 1;
        let event = Event {
            seq,
            at,
            body: *body,
        };
        let mut events = txn.open_table(EVENTS).map_err(backend)?;
        events
            .insert(seq, encode(&event)?.as_slice())
            .map_err(backend)?;
    }
    let epoch = next_epoch(&txn)?;
    txn.commit().map_err(backend)?;
    if !records.is_empty() {
        tracing::info!(writes = records.len(), "replayed the store's log");
    }
    wal.reset(epoch).map_err(io)?;
    Ok(wal)
}

/// Writes a device's state inside a transaction; the copy in memory follows once it is
/// committed. Encoded before anything is written: a refused write changes nothing.
fn state_write(
    states: &Shared<States>,
    device: &str,
    state: Option<&DeviceState>,
) -> Result<impl FnOnce(&redb::WriteTransaction) -> Result<After> + Send + 'static> {
    let bytes = state.map(encode).transpose()?;
    let (device, state, states) = (device.to_owned(), state.cloned(), states.clone());
    Ok(move |txn: &redb::WriteTransaction| {
        set(txn, DEVICE_STATE, &device, bytes.as_deref())?;
        let after: After = Box::new(move || {
            states.write().expect("states lock").set(&device, state);
        });
        Ok(after)
    })
}

/// A device's state and the audit event recording it, as one logged write.
fn state_recorded(
    states: &Shared<States>,
    device: &str,
    state: Option<&DeviceState>,
    body: EventBody,
    intent: Option<IntentId>,
) -> Result<impl FnOnce(&redb::WriteTransaction) -> Result<Done<Event>> + Send + 'static> {
    let write = state_write(states, device, state)?;
    let (device, state) = (device.to_owned(), state.cloned());
    Ok(move |txn: &redb::WriteTransaction| {
        let event = append(txn, body)?;
        let after = write(txn)?;
        let log = encode(&Logged::State {
            device,
            state: state.map(Box::new),
            event: Box::new(event.clone()),
            intent,
        })?;
        Ok(Done {
            value: event,
            after: Some(after),
            log: Some(log),
        })
    })
}

impl Store for EmbeddedStore {
    fn persona_id(&self, name: &str) -> Result<u32> {
        if let Some(&id) = self.persona_ids.read().expect("ids lock").get(name) {
            return Ok(id);
        }
        let (name, ids) = (name.to_owned(), self.persona_ids.clone());
        self.writer.write(move |txn| {
            let mut t = txn.open_table(PERSONA_IDS).map_err(backend)?;
            if let Some(id) = t.get(name.as_str()).map_err(backend)? {
                return Ok((id.value(), None));
            }
            let mut next = 1;
            for entry in t.iter().map_err(backend)? {
                next = next.max(entry.map_err(backend)?.1.value() + 1);
            }
            t.insert(name.as_str(), next).map_err(backend)?;
            let after: After = Box::new(move || {
                ids.write().expect("ids lock").insert(name, next);
            });
            Ok((next, Some(after)))
        })
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

    fn generation(&self, kind: Kind) -> Option<u64> {
        let versions = self.versions.read().expect("versions lock");
        Some(versions.generations.get(&kind).copied().unwrap_or_default())
    }

    fn stamp(&self, kind: Kind, name: &str) -> Result<Option<Stamp>> {
        let versions = self.versions.read().expect("versions lock");
        Ok(versions
            .stamps
            .get(&kind)
            .and_then(|v| v.get(name))
            .copied())
    }

    fn stamps(&self, kind: Kind) -> Result<Vec<(String, Stamp)>> {
        let versions = self.versions.read().expect("versions lock");
        Ok(versions.stamps.get(&kind).map_or_else(Vec::new, |v| {
            v.iter()
                .map(|(name, stamp)| (name.clone(), *stamp))
                .collect()
        }))
    }

    fn put(&self, kind: Kind, name: &str, spec: Value, expect: Expect) -> Result<Record> {
        let (name, versions) = (name.to_owned(), self.versions.clone());
        // Read, check and write in one transaction, after the writes queued before it.
        self.writer.write(move |txn| {
            put_in(txn, (kind, name), spec, expect, versions)
                .map(|(record, after, _)| (record, after))
        })
    }

    fn put_recorded(
        &self,
        kind: Kind,
        name: &str,
        spec: Value,
        expect: Expect,
        mut body: EventBody,
    ) -> Result<(Record, Event)> {
        let (name, versions) = (name.to_owned(), self.versions.clone());
        self.writer.write(move |txn| {
            let (record, after, before) =
                put_in(txn, (kind, name.clone()), spec, expect, versions)?;
            body.result = format!("version {}", record.version);
            let event = recorded(txn, body, (kind, &name, before.as_ref()))?;
            Ok(((record, event), after))
        })
    }

    fn delete(&self, kind: Kind, name: &str, expect: Expect) -> Result<Record> {
        let (name, versions) = (name.to_owned(), self.versions.clone());
        self.writer
            .write(move |txn| delete_in(txn, (kind, name), expect, versions))
    }

    fn delete_recorded(
        &self,
        kind: Kind,
        name: &str,
        expect: Expect,
        body: EventBody,
    ) -> Result<(Record, Event)> {
        let (name, versions) = (name.to_owned(), self.versions.clone());
        self.writer.write(move |txn| {
            let (record, after) = delete_in(txn, (kind, name.clone()), expect, versions)?;
            let event = recorded(txn, body, (kind, &name, Some(&record)))?;
            Ok(((record, event), after))
        })
    }

    fn put_token(&self, token: &TokenRecord) -> Result<()> {
        self.write(TOKENS, &token.id, Some(encode(token)?))
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        self.read(TOKENS, id)
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read_all(TOKENS)
    }

    fn device_state(&self, device: &str) -> Result<Option<DeviceState>> {
        Ok(self
            .states
            .read()
            .expect("states lock")
            .get(device)
            .cloned())
    }

    fn device_states(&self) -> Result<Vec<(String, DeviceState)>> {
        Ok(self.states.read().expect("states lock").all())
    }

    fn states_holding(
        &self,
        personas: &[String],
        scope: &crate::model::AddressScope,
    ) -> Result<Vec<(String, DeviceState)>> {
        let states = self.states.read().expect("states lock");
        Ok(states.holding(personas, scope))
    }

    fn set_device_state(&self, device: &str, state: Option<&DeviceState>) -> Result<()> {
        let write = state_write(&self.states, device, state)?;
        self.writer.write(move |txn| Ok(((), Some(write(txn)?))))
    }

    fn commit_stats(&self) -> Option<&super::CommitStats> {
        Some(self.writer.stats())
    }

    fn append_event(&self, body: EventBody) -> Result<Event> {
        self.writer.write(move |txn| Ok((append(txn, body)?, None)))
    }

    fn record_state(
        &self,
        device: &str,
        state: Option<&DeviceState>,
        body: EventBody,
    ) -> Result<Event> {
        self.writer
            .write_logged(state_recorded(&self.states, device, state, body, None)?)
    }

    fn log_intent(&self, device: &str, state: &DeviceState, body: &EventBody) -> Option<IntentId> {
        self.writer.log_intent(|id| {
            encode(&Logged::Intent {
                id,
                device: device.to_owned(),
                state: Box::new(state.clone()),
                at: jiff::Timestamp::now(),
                body: Box::new(body.clone()),
            })
        })
    }

    fn sync_intent(&self, intent: IntentId) -> Result<()> {
        self.writer.sync_intent(intent)
    }

    fn submit_state(
        &self,
        device: &str,
        state: Option<DeviceState>,
        body: EventBody,
        intent: Option<IntentId>,
    ) -> tokio::sync::oneshot::Receiver<Result<Event>> {
        match state_recorded(&self.states, device, state.as_ref(), body, intent) {
            Ok(op) => match intent {
                Some(id) => self.writer.submit_covered(id, op),
                None => self.writer.submit_logged(op),
            },
            Err(e) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let _ = tx.send(Err(e));
                rx
            }
        }
    }

    fn put_signal(&self, key: &str, signal: &Value) -> Result<()> {
        self.write(SIGNALS, key, Some(encode(signal)?))
    }

    fn put_signals(&self, rows: Vec<(String, Vec<u8>)>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let log = signals_logged(&rows)?;
        self.writer.write_logged(move |txn| {
            let mut t = txn.open_table(SIGNALS).map_err(backend)?;
            for (key, signal) in rows {
                t.insert(key.as_str(), signal.as_slice()).map_err(backend)?;
            }
            Ok(Done {
                value: (),
                after: None,
                log: Some(log),
            })
        })
    }

    fn signals(&self) -> Result<Vec<Value>> {
        self.read_all(SIGNALS)
    }

    fn delete_signals(&self, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let keys = keys.to_vec();
        self.writer.write(move |txn| {
            let mut t = txn.open_table(SIGNALS).map_err(backend)?;
            for key in keys {
                t.remove(key.as_str()).map_err(backend)?;
            }
            Ok(((), None))
        })
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
        self.writer.write(move |txn| {
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
            Ok((removed, None))
        })
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

    /// Run in a child process: logs shift records and signals, reports each one
    /// acknowledged, and dies without closing anything.
    #[test]
    fn logged_signals_are_written_around_their_encoded_rows() {
        let rows = vec![
            ("vm1/role".to_owned(), json!({ "role": "a \"quoted\" one" })),
            (
                "vm\\2/geo".to_owned(),
                json!({ "country": "DE", "n": [1, 2] }),
            ),
        ];
        let encoded: Vec<(String, Vec<u8>)> = rows
            .iter()
            .map(|(k, v)| (k.clone(), encode(v).unwrap()))
            .collect();
        let log = signals_logged(&encoded).unwrap();
        match decode::<Logged>(&log).unwrap() {
            Logged::Signals { rows: back } => assert_eq!(back, rows),
            _ => panic!("not a signals record"),
        }
    }

    #[test]
    fn crashing_child() {
        let Some(path) = std::env::var_os("PERSONA_CRASH_STORE") else {
            return;
        };
        let s = EmbeddedStore::open(std::path::Path::new(&path)).expect("open");
        for i in 0..50u64 {
            let (state, body) = shift_to(&format!("p{i}"), i);
            let event = s.record_state("vm1", Some(&state), body).expect("record");
            s.put_signals(vec![(
                format!("vm1/n{i}"),
                encode(&json!({ "n": i })).unwrap(),
            )])
            .expect("signal");
            println!("acknowledged {i} {}", event.seq);
        }
        std::process::abort();
    }

    /// A durable write whose log then fails to start over, a logged write after it,
    /// then a crash.
    #[test]
    fn crashing_stale_log_child() {
        let Some(path) = std::env::var_os("PERSONA_CRASH_STORE") else {
            return;
        };
        let s = EmbeddedStore::open(std::path::Path::new(&path)).expect("open");
        s.writer.fail_log_resets();
        let mut failed = shift_to("p1", 0).1;
        failed.result = "rolled back at flip: test".into();
        s.append_event(failed).expect("a durable write");
        s.put_signals(vec![("vm1/n".into(), encode(&json!({ "n": 1 })).unwrap())])
            .expect("a logged write");
        println!("acknowledged");
        std::process::abort();
    }

    #[test]
    fn a_log_that_failed_to_start_over_takes_no_write_it_would_lose() {
        let (_, dir) = store();
        let path = dir.0.join("crash.redb");
        let out = crashed("crashing_stale_log_child", &path);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("acknowledged"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = EmbeddedStore::open(&path).expect("reopen after the crash");
        assert_eq!(s.signals().unwrap(), [json!({ "n": 1 })]);
    }

    /// Runs the test `child` in a process of its own on a store at `path`, which it
    /// writes to and then aborts; gives its output.
    fn crashed(child: &str, path: &std::path::Path) -> std::process::Output {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("store::embedded::tests::{child}"),
                "--nocapture",
            ])
            .env("PERSONA_CRASH_STORE", path)
            .output()
            .expect("the child");
        assert!(!out.status.success(), "the child was to die");
        out
    }

    #[test]
    fn acknowledged_logged_writes_survive_a_crash() {
        let (_, dir) = store();
        let path = dir.0.join("crash.redb");
        let out = crashed("crashing_child", &path);
        let acked: Vec<(u64, u64)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("acknowledged ")?.split(' ');
                Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
            })
            .collect();
        assert_eq!(acked.len(), 50, "{}", String::from_utf8_lossy(&out.stderr));
        let s = EmbeddedStore::open(&path).expect("reopen after the crash");
        let (last, seq) = *acked.last().unwrap();
        assert_eq!(
            s.device_state("vm1").unwrap().map(|st| st.generation),
            Some(last),
            "the last acknowledged state"
        );
        let events = s.events(0, 1000).unwrap();
        for (i, seq) in &acked {
            let e = events.iter().find(|e| e.seq == *seq);
            assert_eq!(e.and_then(|e| e.body.generation), Some(*i), "event {seq}");
        }
        assert_eq!(events.last().map(|e| e.seq), Some(seq));
        assert_eq!(s.signals().unwrap().len(), 50);
    }

    fn shift_to(persona: &str, generation: u64) -> (DeviceState, EventBody) {
        let state = DeviceState {
            persona: persona.into(),
            persona_version: 1,
            generation,
            since: jiff::Timestamp::now(),
            rule: None,
            leases: Vec::new(),
        };
        let body = EventBody {
            kind: "shift".into(),
            actor: "test".into(),
            device: None,
            from: None,
            to: Some(persona.into()),
            generation: Some(generation),
            result: "ok".into(),
            duration_us: None,
            detail: json!(null),
        };
        (state, body)
    }

    /// An intent, logged once the writer is idle (it logs none while busy), not synced.
    fn intend(s: &EmbeddedStore, device: &str, state: &DeviceState, body: &EventBody) -> u64 {
        for _ in 0..1000 {
            if let Some(id) = s.log_intent(device, state, body) {
                return id;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("the writer never got idle");
    }

    /// Shifts' intents, then a crash: vm3's followed by a failure's durable record
    /// (which drops every intent before it); vm4's alone, its flip still running when
    /// vm1's intent and record follow; vm2's alone (synced by a later write).
    #[test]
    fn crashing_intent_child() {
        let Some(path) = std::env::var_os("PERSONA_CRASH_STORE") else {
            return;
        };
        let s = EmbeddedStore::open(std::path::Path::new(&path)).expect("open");
        let (state, body) = shift_to("p3", 0);
        intend(&s, "vm3", &state, &body);
        let mut failed = shift_to("p3", 0).1;
        failed.result = "rolled back at flip: test".into();
        s.append_event(failed).expect("the failure");
        println!("acknowledged vm3");
        // vm4's flip still running while vm1 shifts.
        let (state, body) = shift_to("p4", 0);
        intend(&s, "vm4", &state, &body);
        let (state, body) = shift_to("p1", 0);
        let id = intend(&s, "vm1", &state, &body);
        s.sync_intent(id).expect("vm1's intent synced");
        let (state, body) = shift_to("p1", 7);
        let event = s
            .submit_state("vm1", Some(state), body, Some(id))
            .blocking_recv()
            .expect("answered")
            .expect("recorded");
        println!("acknowledged vm1 {}", event.seq);
        let (state, body) = shift_to("p2", 0);
        intend(&s, "vm2", &state, &body);
        s.put_signals(vec![("vm2/n".into(), encode(&json!({ "n": 1 })).unwrap())])
            .expect("a logged write after it");
        println!("acknowledged vm2");
        std::process::abort();
    }

    #[test]
    fn an_intent_alone_is_replayed_and_one_followed_or_dropped_is_not() {
        let (_, dir) = store();
        let path = dir.0.join("crash.redb");
        let out = crashed("crashing_intent_child", &path);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("acknowledged vm2"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = EmbeddedStore::open(&path).expect("reopen after the crash");
        let state = |d: &str| s.device_state(d).unwrap();
        assert_eq!(
            state("vm1").map(|st| (st.persona, st.generation)),
            Some(("p1".into(), 7))
        );
        // Replayed from its intent: the daemon, seeing generation 0, applies it again.
        assert_eq!(
            state("vm2").map(|st| (st.persona, st.generation)),
            Some(("p2".into(), 0))
        );
        assert_eq!(state("vm3"), None);
        let events = s.events(0, 100).unwrap();
        let to = |p: &str| {
            events
                .iter()
                .filter(|e| e.body.to.as_deref() == Some(p))
                .collect::<Vec<_>>()
        };
        assert_eq!(to("p1").len(), 1, "{events:?}");
        assert_eq!(to("p1")[0].body.generation, Some(7));
        let acked: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("acknowledged vm1 "))
            .and_then(|seq| seq.parse().ok())
            .expect("vm1's record number");
        assert_eq!(
            to("p1")[0].seq,
            acked,
            "the acknowledged record keeps its number"
        );
        assert_eq!(
            state("vm4").map(|st| (st.persona, st.generation)),
            Some(("p4".into(), 0))
        );
        assert_eq!(to("p4").len(), 1, "{events:?}");
        assert_eq!(to("p2").len(), 1, "{events:?}");
        assert!(
            to("p2")[0].body.detail["recovered"].is_string(),
            "{events:?}"
        );
        assert_eq!(to("p3").len(), 1, "only the failure: {events:?}");
        assert!(to("p3")[0].body.result.starts_with("rolled back"));
    }

    #[test]
    fn concurrent_writes_share_commits_and_each_is_answered_after_its_own() {
        let (s, _dir) = store();
        let s = std::sync::Arc::new(s);
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..40 {
                        let key = format!("t{t}/{i}");
                        s.put_signal(&key, &serde_json::json!({ "n": i })).unwrap();
                        // Answered only once committed: a read sees it at once.
                        assert!(
                            s.signals().unwrap().iter().any(|v| v["n"] == i),
                            "{key} read back"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.signals().unwrap().len(), 16 * 40);
        let stats = s.commit_stats().unwrap();
        let (commits, writes) = (
            stats.commits.load(std::sync::atomic::Ordering::Relaxed),
            stats.writes.load(std::sync::atomic::Ordering::Relaxed),
        );
        assert!(writes >= 16 * 40, "{writes} writes");
        assert!(
            commits < writes,
            "{commits} commits for {writes} writes: none shared"
        );
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
        let generation = || s.generation(Kind::Persona).expect("counted");
        let g0 = generation();
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
        assert_eq!(generation(), g0 + 2, "a change per write, none per refusal");
        let same = s
            .put(Kind::Persona, "office", json!({"a": 2}), Expect::Any)
            .expect("same spec");
        assert_eq!(generation(), g0 + 2, "nothing changed");
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
        assert_eq!(generation(), g0 + 3);
        assert_eq!(s.generation(Kind::Device), Some(0), "counted by kind");
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

    #[test]
    fn an_object_and_its_audit_record_are_written_together_or_not_at_all() {
        let (s, _dir) = store();
        let apply = || EventBody {
            kind: "apply".into(),
            actor: "test".into(),
            device: None,
            from: None,
            to: Some("personas/office".into()),
            generation: None,
            result: String::new(),
            duration_us: None,
            detail: Value::Null,
        };
        let spec = json!({ "addresses": ["203.0.113.10/24"] });
        let (record, recorded) = s
            .put_recorded(
                Kind::Persona,
                "office",
                spec.clone(),
                Expect::Absent,
                apply(),
            )
            .unwrap();
        assert_eq!(recorded.body.result, format!("version {}", record.version));
        let last = s.events(0, 100).unwrap().pop().unwrap();
        assert_eq!(last.seq, recorded.seq);

        let refused = s.put_recorded(Kind::Persona, "office", spec, Expect::Version(7), apply());
        assert!(
            matches!(refused, Err(StoreError::Conflict { .. })),
            "{refused:?}"
        );
        assert_eq!(s.events(0, 100).unwrap().pop().unwrap().seq, last.seq);
        let refused = s.delete_recorded(Kind::Persona, "nothing", Expect::Any, apply());
        assert!(
            matches!(refused, Err(StoreError::NotFound { .. })),
            "{refused:?}"
        );
        let (_, deleted) = s
            .delete_recorded(Kind::Persona, "office", Expect::Any, apply())
            .unwrap();
        assert!(s.get(Kind::Persona, "office").unwrap().is_none());
        assert_eq!(s.events(0, 100).unwrap().pop().unwrap().seq, deleted.seq);
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
