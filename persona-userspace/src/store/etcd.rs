//! The store on etcd v3, shared by the hosts of a fleet.
//!
//! Everything lives under one prefix. What hosts read on every request (objects, device
//! states, tokens, persona numbers, signals) sits under `data/` and is mirrored in
//! memory: listed once, then kept current by a watch from the listed revision, so that
//! reads cost no round trip and go on while etcd cannot be reached. The audit log sits
//! under `log/`, read from etcd when asked for.
//!
//! Every conditional write is a transaction comparing `mod_revision` with the revision
//! the write was decided on; when another host got there first, the transaction reads
//! the key back in its `else` branch and the write is decided again on what it found.
//! An audit event takes the next number by the same kind of comparison on the counter,
//! in the transaction of the change it records.
use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, RwLock},
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{
    DeviceState, Event, EventBody, Expect, Kind, Record, Result, Stamp, Store, StoreError,
    TokenRecord, check,
};

/// How long one call may wait on etcd before the caller hears that it is unreachable.
const DEADLINE: Duration = Duration::from_secs(3);
/// How often a conditional write is decided again after losing a race.
const ATTEMPTS: usize = 16;
/// Keys per transaction; etcd refuses more than 128 operations in one.
const OPS_PER_TXN: usize = 100;

/// Where the store is and how to reach it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// User and password, for etcd with authentication on.
    pub user: Option<(String, String)>,
}

/// Client TLS: the CA that signed the members' certificates, and this host's own.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: Vec<u8>,
    pub cert_key: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdConfig {
    /// `etcd://h1:2379,h2:2379` (plain) or `etcds://...` (TLS, which [`EtcdConfig::tls`]
    /// must then describe).
    pub fn parse(url: &str) -> std::result::Result<Self, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?}: a store is etcd://HOST:PORT[,HOST:PORT...]"))?;
        let http = match scheme {
            "etcd" => "http",
            "etcds" => "https",
            other => return Err(format!("{other:?} is not a store (etcd, etcds)")),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(|h| {
                if h.is_empty() || h.contains(['/', '@', '?', '#', ' ']) {
                    Err(format!("{h:?} is not a HOST:PORT"))
                } else if h
                    .rsplit_once(':')
                    .is_none_or(|(_, p)| p.parse::<u16>().is_err())
                {
                    Err(format!("{h:?} names no port"))
                } else {
                    Ok(format!("{http}://{h}"))
                }
            })
            .collect::<std::result::Result<_, _>>()?;
        let path = path.trim_matches('/');
        let prefix = if path.is_empty() {
            "/persona/v1/".to_owned()
        } else {
            format!("/{path}/")
        };
        Ok(Self {
            endpoints,
            prefix,
            tls: None,
            user: None,
        })
    }
}

/// A key's last known value (`None`: deleted) and the revision that wrote it.
#[derive(Debug, Clone)]
struct Entry {
    value: Option<Vec<u8>>,
    rev: i64,
    /// An object's stamp, read from the value once: caches of parsed objects ask for
    /// every one on each write.
    stamp: std::sync::OnceLock<Option<Stamp>>,
}

impl Entry {
    fn stamp(&self) -> Option<Stamp> {
        *self
            .stamp
            .get_or_init(|| self.value.as_deref().and_then(|v| decode(v).ok()))
    }
}

/// The mirror of `data/`: a key changes only to what a later revision wrote, whichever
/// of the watch and this host's own writes brings it first. A deletion is kept until
/// the watch has passed it, so that no older write seen late brings the key back.
#[derive(Debug)]
struct Mirror {
    entries: BTreeMap<String, Entry>,
    /// The revision the watch has delivered everything up to.
    watched: i64,
    /// Whether the watch is running: when not, reads may be stale.
    live: bool,
    /// Each key whose value changed, as it changes.
    changes: tokio::sync::broadcast::Sender<String>,
    /// Key prefixes, each with how many times a key under it has changed.
    counted: Vec<(String, u64)>,
    /// Key prefixes whose changed keys are kept for an index to take ([`Touched`]).
    tracked: Vec<String>,
    touched: std::sync::Mutex<Touched>,
}

/// Keys under the tracked prefixes changed since an index last took them; past a bound
/// only that everything may have.
#[derive(Debug, Default)]
struct Touched {
    keys: Vec<String>,
    all: bool,
}

/// Keys kept for an index at most: beyond, it is built again from the mirror.
const MAX_TOUCHED: usize = 65_536;

impl Mirror {
    fn new() -> Self {
        Self {
            entries: BTreeMap::new(),
            watched: 0,
            live: false,
            changes: tokio::sync::broadcast::channel(4096).0,
            counted: Vec::new(),
            tracked: Vec::new(),
            touched: Default::default(),
        }
    }

    /// The tracked keys changed since the last call, or `None` when anything may have.
    fn take_touched(&self) -> Option<Vec<String>> {
        let mut t = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        let keys = std::mem::take(&mut t.keys);
        (!std::mem::take(&mut t.all)).then_some(keys)
    }

    fn changes_under(&self, prefix: &str) -> Option<u64> {
        self.counted
            .iter()
            .find_map(|(p, n)| (p == prefix).then_some(*n))
    }

    fn apply(&mut self, key: String, value: Option<Vec<u8>>, rev: i64) {
        match self.entries.get(&key) {
            Some(e) if e.rev >= rev => {}
            old => {
                let changed = old.is_none_or(|e| e.value != value);
                if changed && (old.is_some() || value.is_some()) {
                    let _ = self.changes.send(key.clone());
                    for (_, n) in self.counted.iter_mut().filter(|(p, _)| key.starts_with(p)) {
                        *n += 1;
                    }
                    if self.tracked.iter().any(|p| key.starts_with(p)) {
                        let mut t = self.touched.lock().unwrap_or_else(|e| e.into_inner());
                        if t.keys.len() < MAX_TOUCHED {
                            t.keys.push(key.clone());
                        } else {
                            t.keys.clear();
                            t.all = true;
                        }
                    }
                }
                self.entries.insert(
                    key,
                    Entry {
                        value,
                        rev,
                        stamp: Default::default(),
                    },
                );
            }
        }
    }

    fn get(&self, key: &str) -> Option<(&[u8], i64)> {
        let e = self.entries.get(key)?;
        e.value.as_deref().map(|v| (v, e.rev))
    }

    /// The revision to compare with: 0 for a key that is not there.
    fn rev(&self, key: &str) -> i64 {
        self.get(key).map_or(0, |(_, r)| r)
    }

    fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        self.entries_under(prefix)
            .filter_map(|(k, e)| e.value.as_deref().map(|v| (k, v)))
    }

    /// Every entry under `prefix`, deleted ones too.
    fn entries_under<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Entry)> + 'a {
        self.entries
            .range(prefix.to_owned()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k.as_str(), e))
    }

    fn watched_to(&mut self, rev: i64) {
        self.watched = self.watched.max(rev);
        let watched = self.watched;
        self.entries
            .retain(|_, e| e.value.is_some() || e.rev > watched);
    }

    /// Everything as a listing at `rev` says: what it lacks was deleted.
    fn relist(&mut self, kvs: Vec<(String, Vec<u8>, i64)>, rev: i64) {
        let listed: std::collections::HashSet<String> =
            kvs.iter().map(|(k, _, _)| k.clone()).collect();
        for (k, v, r) in kvs {
            self.apply(k, Some(v), r);
        }
        let gone: Vec<String> = self
            .entries
            .iter()
            .filter(|(k, e)| e.value.is_some() && e.rev <= rev && !listed.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.apply(k, None, rev);
        }
        self.watched_to(rev);
    }
}

pub struct EtcdStore {
    rt: tokio::runtime::Runtime,
    client: Client,
    endpoints: Vec<String>,
    prefix: String,
    mirror: Arc<RwLock<Mirror>>,
    /// This host: the device state it records is kept under its name.
    host: String,
    /// Each device's state as [`EtcdStore::device_states`] resolves it, indexed for a
    /// shift's lease check and kept up to date from the keys the mirror saw change.
    held: std::sync::Mutex<Held>,
}

#[derive(Default)]
struct Held {
    states: super::states::States,
    /// The hosts that recorded any state ("" for the records kept before states were
    /// kept by host).
    hosts: std::collections::BTreeSet<String>,
    /// Whether `states` was built and has followed every change since.
    fresh: bool,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// An error of etcd's: a refusal (too large, not permitted) names what etcd said; no
/// answer (no member reachable, no leader, out of time) is [`StoreError::Unavailable`].
fn unreachable(e: etcd_client::Error) -> StoreError {
    // gRPC's CANCELLED (a client-side timeout), DEADLINE_EXCEEDED and UNAVAILABLE.
    const NO_ANSWER: [i32; 3] = [1, 4, 14];
    const PERMISSION_DENIED: i32 = 7;
    match e {
        etcd_client::Error::GRpcStatus(s) if i32::from(s.code()) == PERMISSION_DENIED => {
            StoreError::Forbidden(format!(
                "etcd: {}: this host's etcd user may not write it (definitions need the fleet's admin user)",
                s.message()
            ))
        }
        etcd_client::Error::GRpcStatus(s) if !NO_ANSWER.contains(&i32::from(s.code())) => {
            StoreError::Backend(format!("etcd: {}", s.message()))
        }
        other => StoreError::Unavailable(format!("etcd: {other}")),
    }
}

/// Whether the request never left: no connection to the member it was sent to (one
/// that is down, while the client still counts it among its endpoints). Sending it
/// again cannot apply it twice.
fn never_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            i32::from(s.code()) == 14 && s.message().contains("connect error")
        }
        _ => false,
    }
}

/// Runs `call` until it is sent: a member that cannot be connected to is passed over
/// for another (the deadline around it bounds the tries).
async fn sent<T, F>(mut call: impl FnMut() -> F) -> Result<T>
where
    F: Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    loop {
        match call().await {
            Err(e) if never_sent(&e) => tokio::time::sleep(Duration::from_millis(20)).await,
            other => return other.map_err(unreachable),
        }
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(backend)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| backend(format!("a stored value: {e}")))
}

fn kind_key(kind: Kind) -> &'static str {
    kind.plural()
}

/// What a write decided on the mirror does: the comparisons it rests on, the keys it
/// writes (`None`: deletes), the keys to read back should a comparison fail, and what
/// the caller hears once it has committed.
struct Plan<T> {
    when: Vec<Compare>,
    writes: Vec<(String, Option<Vec<u8>>)>,
    reread: Vec<String>,
    value: T,
}

enum Decision<T> {
    /// Nothing to write: the answer as it stands.
    Done(T),
    Write(Plan<T>),
}

impl EtcdStore {
    /// Connects, lists `data/` and starts the watch that keeps the mirror current.
    pub fn connect(config: &EtcdConfig, host: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(|e| backend(format!("starting the etcd client: {e}")))?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(DEADLINE)
            .with_timeout(DEADLINE)
            // A connection that stops answering (a member gone, a link down) is given
            // up within seconds, not at TCP's pace; a member without a leader is left
            // for one that has one.
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            use etcd_client::{Certificate, Identity, TlsOptions};
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca));
            if let Some((cert, key)) = &tls.cert_key {
                t = t.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(t);
        }
        if let Some((user, password)) = &config.user {
            // etcd's tokens lapse (5 minutes idle by default, or at any change to its
            // users under JWT): ask for another and retry, not fail every later call.
            options = options
                .with_user(user, password)
                .with_auto_token_refresh(true);
        }
        let endpoints = config.endpoints.clone();
        let client = on(&rt, async move {
            Client::connect(endpoints, Some(options))
                .await
                .map_err(unreachable)
        })?;
        let store = Self {
            rt,
            client,
            endpoints: config.endpoints.clone(),
            prefix: config.prefix.clone(),
            mirror: Arc::new(RwLock::new(Mirror::new())),
            host: host.to_owned(),
            held: Default::default(),
        };
        let kinds = [Kind::Persona, Kind::Device, Kind::Rule, Kind::Application];
        {
            let mut mirror = store.mirror.write().expect("mirror lock");
            mirror.counted = kinds.map(|k| (store.objects(k), 0)).into();
            mirror.tracked = vec![store.data("states/"), store.objects(Kind::Device)];
        }
        let rev = store.relist()?;
        store.rt.spawn(watch(
            store.client.clone(),
            store.data(""),
            store.mirror.clone(),
            rev,
        ));
        Ok(store)
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every key of `data/` whose value changes from now on, as it changes.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.mirror.read().expect("mirror lock").changes.subscribe()
    }

    /// Whether the watch follows etcd now; when not, reads answer from what it last
    /// saw, which may be stale.
    pub fn is_live(&self) -> bool {
        self.mirror.read().expect("mirror lock").live
    }

    /// The key of `rest` under `data/`: what [`EtcdStore::subscribe`] gives.
    pub fn key(&self, rest: &str) -> String {
        self.data(rest)
    }

    pub fn read_json(&self, rest: &str) -> Result<Option<Value>> {
        self.read(&self.data(rest))
    }

    /// Every value under `data/<prefix>`, by the rest of its key.
    pub fn read_json_under(&self, prefix: &str) -> Result<Vec<(String, Value)>> {
        let prefix = self.data(prefix);
        let mirror = self.mirror.read().expect("mirror lock");
        mirror
            .under(&prefix)
            .map(|(k, v)| Ok((k[prefix.len()..].to_owned(), decode(v)?)))
            .collect()
    }

    /// Writes (or, with `None`, deletes) a key under `data/`.
    pub fn write_json(&self, rest: &str, value: Option<&Value>) -> Result<()> {
        self.write_all(vec![(self.data(rest), value.map(encode).transpose()?)])
    }

    /// Writes `value` under `data/<rest>` only if the key holds `expected` now; whether
    /// it did.
    pub fn replace_json(&self, rest: &str, expected: &Value, value: &Value) -> Result<bool> {
        let (key, expected, value) = (self.data(rest), expected.clone(), encode(value)?);
        self.decide(move |mirror| {
            if !holds(mirror, &key, &expected)? {
                return Ok(Decision::Done(false));
            }
            Ok(Decision::Write(Plan {
                when: vec![unchanged(mirror, &key)],
                writes: vec![(key.clone(), Some(value.clone()))],
                reread: vec![key.clone()],
                value: true,
            }))
        })
    }

    /// [`Store::put`], only while `data/<rest>` holds `expected`: in one transaction, so
    /// that nothing changes the key between the check and the write.
    pub fn put_while(
        &self,
        (kind, name): (Kind, &str),
        spec: Value,
        expect: Expect,
        (rest, expected): (&str, &Value),
    ) -> Result<Record> {
        let (key, name) = (self.object(kind, name), name.to_owned());
        let (guard, expected) = (self.data(rest), expected.clone());
        self.decide(move |mirror| {
            if !holds(mirror, &guard, &expected)? {
                return Err(StoreError::Conflict {
                    kind: "Key",
                    name: guard.clone(),
                    expected: 0,
                    actual: 0,
                });
            }
            let mut plan = put_plan(mirror, (kind, &name, &key), &spec, expect)?;
            plan.when.push(unchanged(mirror, &guard));
            plan.reread.push(guard.clone());
            Ok(Decision::Write(plan))
        })
    }

    /// `value` under `data/<rest>` with a lease of `ttl`, kept alive for as long as this
    /// store lives and made again whenever it lapses (etcd lost for longer than `ttl`).
    pub fn hold(&self, rest: &str, value: &Value, ttl: Duration) -> Result<()> {
        let (key, value) = (self.data(rest), encode(value)?);
        let client = self.client.clone();
        let first = self.run(grant_and_put(
            client.clone(),
            key.clone(),
            value.clone(),
            ttl,
        ))?;
        self.rt.spawn(keep_alive(client, key, value, ttl, first));
        Ok(())
    }

    fn data(&self, rest: &str) -> String {
        format!("{}data/{rest}", self.prefix)
    }

    fn log(&self, seq: u64) -> String {
        format!("{}log/{seq:020}", self.prefix)
    }

    fn object(&self, kind: Kind, name: &str) -> String {
        self.data(&format!("objects/{}/{name}", kind_key(kind)))
    }

    fn objects(&self, kind: Kind) -> String {
        self.data(&format!("objects/{}/", kind_key(kind)))
    }

    /// Lists `data/` into the mirror; returns the revision listed at.
    fn relist(&self) -> Result<i64> {
        let (kvs, rev) = self.run(list(self.client.clone(), self.data("")))?;
        self.mirror.write().expect("mirror lock").relist(kvs, rev);
        Ok(rev)
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        on(&self.rt, f)
    }

    fn read<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let mirror = self.mirror.read().expect("mirror lock");
        mirror.get(key).map(|(v, _)| decode(v)).transpose()
    }

    fn read_under<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>> {
        let mirror = self.mirror.read().expect("mirror lock");
        mirror.under(prefix).map(|(_, v)| decode(v)).collect()
    }

    /// What a write needs, to run on the store's runtime.
    fn core(&self) -> Core {
        Core {
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            mirror: self.mirror.clone(),
        }
    }

    /// [`decide`], waited for.
    fn decide<T: Send + 'static>(
        &self,
        f: impl FnMut(&Mirror) -> Result<Decision<T>> + Send + 'static,
    ) -> Result<T> {
        self.run(decide(self.core(), f))
    }

    /// Writes (`Some`) or deletes `marker` with `body` appended to the audit log in the
    /// same transaction, unless the marker is that way already: of hosts that all see
    /// the same thing happen, one records it. The event, when this one did.
    pub fn record_marked(
        &self,
        marker: &str,
        value: Option<&Value>,
        body: EventBody,
    ) -> Result<Option<Event>> {
        let key = self.data(marker);
        let write = (key.clone(), value.map(encode).transpose()?);
        self.run(with_event_unless(self.core(), body, vec![write], Some(key)))
    }

    /// Unconditional writes, in one transaction.
    fn write_all(&self, writes: Vec<(String, Option<Vec<u8>>)>) -> Result<()> {
        let mut plan = Some(Plan {
            when: Vec::new(),
            writes,
            reread: Vec::new(),
            value: (),
        });
        self.decide(move |_| {
            plan.take()
                .map(Decision::Write)
                .ok_or_else(|| backend("an unconditional write failed its comparison"))
        })
    }
}

#[derive(Clone)]
struct Core {
    client: Client,
    prefix: String,
    mirror: Arc<RwLock<Mirror>>,
}

/// Decides a write on what the mirror holds and commits it; decided again, on what etcd
/// read back, each time another writer got there first.
async fn decide<T: Send + 'static>(
    core: Core,
    mut decide: impl FnMut(&Mirror) -> Result<Decision<T>> + Send + 'static,
) -> Result<T> {
    let data = format!("{}data/", core.prefix);
    for _ in 0..ATTEMPTS {
        let plan = match decide(&core.mirror.read().expect("mirror lock"))? {
            Decision::Done(value) => return Ok(value),
            Decision::Write(plan) => plan,
        };
        let ops: Vec<TxnOp> = plan
            .writes
            .iter()
            .map(|(k, v)| match v {
                Some(v) => TxnOp::put(k.as_str(), v.clone(), None),
                None => TxnOp::delete(k.as_str(), None),
            })
            .collect();
        let reads: Vec<TxnOp> = plan
            .reread
            .iter()
            .map(|k| TxnOp::get(k.as_str(), None))
            .collect();
        let txn = Txn::new().when(plan.when).and_then(ops).or_else(reads);
        let kv = core.client.kv_client();
        let resp = sent(|| {
            let (mut kv, txn) = (kv.clone(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let mut mirror = core.mirror.write().expect("mirror lock");
        if resp.succeeded() {
            for (key, value) in plan.writes {
                if key.starts_with(&data) {
                    mirror.apply(key, value, rev);
                }
            }
            return Ok(plan.value);
        }
        for (key, r) in plan.reread.into_iter().zip(resp.op_responses()) {
            if let TxnOpResponse::Get(g) = r {
                match g.kvs().first() {
                    Some(kv) => mirror.apply(key, Some(kv.value().to_vec()), kv.mod_revision()),
                    None => mirror.apply(key, None, rev),
                }
            }
        }
    }
    Err(backend(format!(
        "gave up a write after {ATTEMPTS} attempts, each raced by another writer"
    )))
}

/// `writes` in the transaction that appends `body` as the next event; the event.
async fn with_event(
    core: Core,
    body: EventBody,
    writes: Vec<(String, Option<Vec<u8>>)>,
) -> Result<Event> {
    with_event_unless(core, body, writes, None)
        .await?
        .ok_or_else(|| backend("an unconditional event was not written"))
}

/// [`with_event`], unless the key `done` already holds what its write would leave
/// there (present or absent): then nothing, and `None`.
async fn with_event_unless(
    core: Core,
    body: EventBody,
    writes: Vec<(String, Option<Vec<u8>>)>,
    done: Option<String>,
) -> Result<Option<Event>> {
    let prefix = core.prefix.clone();
    decide(core, move |mirror| {
        let wanted = |key: &str| writes.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        if let Some(key) = &done
            && wanted(key).is_some_and(|v| v.is_some() == mirror.get(key).is_some())
        {
            return Ok(Decision::Done(None));
        }
        let plan = Plan {
            when: done.iter().map(|key| unchanged(mirror, key)).collect(),
            writes: writes.clone(),
            reread: done.iter().cloned().collect(),
            value: (),
        };
        let plan = logged(mirror, &prefix, plan, body.clone())?;
        Ok(Decision::Write(Plan {
            when: plan.when,
            writes: plan.writes,
            reread: plan.reread,
            value: Some(plan.value.1),
        }))
    })
    .await
}

/// `plan`, with `body` appended to the audit log as the next event in the same
/// transaction.
fn logged<T>(
    mirror: &Mirror,
    prefix: &str,
    mut plan: Plan<T>,
    body: EventBody,
) -> Result<Plan<(T, Event)>> {
    let seq_key = format!("{prefix}data/meta/event-seq");
    let last: u64 = match mirror.get(&seq_key) {
        Some((v, _)) => decode(v)?,
        None => 0,
    };
    let event = Event {
        seq: last + 1,
        at: jiff::Timestamp::now(),
        body,
    };
    plan.writes
        .push((seq_key.clone(), Some(encode(&event.seq)?)));
    plan.writes.push((
        format!("{prefix}log/{:020}", event.seq),
        Some(encode(&event)?),
    ));
    plan.when.push(unchanged(mirror, &seq_key));
    plan.reread.push(seq_key);
    Ok(Plan {
        when: plan.when,
        writes: plan.writes,
        reread: plan.reread,
        value: (plan.value, event),
    })
}

async fn grant_and_put(
    mut client: Client,
    key: String,
    value: Vec<u8>,
    ttl: Duration,
) -> Result<i64> {
    let lease = client
        .lease_grant(ttl.as_secs().max(1) as i64, None)
        .await
        .map_err(unreachable)?
        .id();
    client
        .put(
            key,
            value,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(unreachable)?;
    Ok(lease)
}

/// Renews the lease a third of its time before it would lapse; once it has lapsed or
/// the renewals fail, puts the key again under a new one.
async fn keep_alive(client: Client, key: String, value: Vec<u8>, ttl: Duration, mut lease: i64) {
    loop {
        let mut c = client.clone();
        let kept = async {
            let (mut keeper, mut answers) = c.lease_keep_alive(lease).await?;
            loop {
                keeper.keep_alive().await?;
                match answers.message().await? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => return Ok::<(), etcd_client::Error>(()),
                }
                tokio::time::sleep(ttl / 3).await;
            }
        }
        .await;
        if let Err(e) = kept {
            tracing::warn!(key, error = %e, "keeping the lease alive");
        }
        loop {
            tokio::time::sleep(ttl / 3).await;
            match grant_and_put(client.clone(), key.clone(), value.clone(), ttl).await {
                Ok(l) => {
                    lease = l;
                    break;
                }
                Err(e) => tracing::warn!(key, error = %e, "putting the leased key again"),
            }
        }
    }
}

/// Runs `f` on the store's runtime and waits for it on this thread, whichever runtime
/// (if any) this thread belongs to.
fn on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(within_deadline(f).await);
    });
    rx.recv().map_err(|_| backend("the etcd client stopped"))?
}

async fn within_deadline<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(DEADLINE, f).await.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "etcd did not answer within {} s",
            DEADLINE.as_secs()
        )))
    })
}

/// A range read, sent to a member that answers.
async fn get(client: &Client, key: &str, options: GetOptions) -> Result<etcd_client::GetResponse> {
    sent(|| {
        let (mut c, key, options) = (client.clone(), key.to_owned(), options.clone());
        async move { c.get(key, Some(options)).await }
    })
    .await
}

/// Keys per page of a listing: a whole fleet's data in one answer would pass gRPC's
/// 4 MiB limit on a message from a few thousand devices on.
const PAGE: i64 = 1_000;

/// Everything under `prefix`, in pages all read at the revision of the first.
async fn list(client: Client, prefix: String) -> Result<(Vec<(String, Vec<u8>, i64)>, i64)> {
    let mut end = prefix.clone().into_bytes();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let (mut kvs, mut rev, mut from) = (Vec::new(), 0, prefix);
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if rev != 0 {
            options = options.with_revision(rev);
        }
        let resp = get(&client, &from, options).await?;
        if rev == 0 {
            rev = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            if let Ok(key) = kv.key_str() {
                kvs.push((key.to_owned(), kv.value().to_vec(), kv.mod_revision()));
            }
        }
        match (resp.more(), resp.kvs().last()) {
            (true, Some(last)) => {
                let mut next = last.key().to_vec();
                next.push(0);
                from = String::from_utf8(next).map_err(|e| backend(e.to_string()))?;
            }
            _ => return Ok((kvs, rev)),
        }
    }
}

/// Keeps the mirror current from revision `rev` on: re-established after a broken
/// stream with jittered backoff, re-listed when etcd compacted past where it stood.
async fn watch(client: Client, prefix: String, mirror: Arc<RwLock<Mirror>>, mut rev: i64) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match watch_once(client.clone(), &prefix, &mirror, &mut rev).await {
            Ok(Relist::Needed) => match list(client.clone(), prefix.clone()).await {
                Ok((kvs, at)) => {
                    mirror.write().expect("mirror lock").relist(kvs, at);
                    tracing::warn!(
                        revision = at,
                        "the etcd watch fell behind compaction: listed again"
                    );
                    rev = at;
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Err(e) => tracing::warn!(error = %e, "listing etcd again"),
            },
            Ok(Relist::No) => backoff = Duration::from_millis(100),
            Err(e) => tracing::warn!(error = %e, revision = rev, "the etcd watch broke"),
        }
        // Hosts that lost etcd together do not all come back at the same instant.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = backoff.mul_f64(f64::from(nanos % 1000) / 1000.0);
        tokio::time::sleep(backoff / 2 + jitter / 2).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

enum Relist {
    Needed,
    No,
}

async fn watch_once(
    mut client: Client,
    prefix: &str,
    mirror: &RwLock<Mirror>,
    rev: &mut i64,
) -> std::result::Result<Relist, etcd_client::Error> {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*rev + 1)
        .with_progress_notify();
    let mut stream = client.watch(prefix, Some(options)).await?;
    mirror.write().expect("mirror lock").live = true;
    let watched = follow(&mut stream, mirror, rev).await;
    mirror.write().expect("mirror lock").live = false;
    watched
}

async fn follow(
    stream: &mut etcd_client::WatchStream,
    mirror: &RwLock<Mirror>,
    rev: &mut i64,
) -> std::result::Result<Relist, etcd_client::Error> {
    while let Some(resp) = stream.message().await? {
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Ok(Relist::Needed);
            }
            return Ok(Relist::No);
        }
        let mut m = mirror.write().expect("mirror lock");
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            match ev.event_type() {
                EventType::Put => {
                    m.apply(key.to_owned(), Some(kv.value().to_vec()), kv.mod_revision())
                }
                EventType::Delete => m.apply(key.to_owned(), None, kv.mod_revision()),
            }
        }
        if let Some(h) = resp.header() {
            *rev = (*rev).max(h.revision());
            m.watched_to(*rev);
        }
    }
    Ok(Relist::No)
}

impl Store for EtcdStore {
    fn get(&self, kind: Kind, name: &str) -> Result<Option<Record>> {
        self.read(&self.object(kind, name))
    }

    fn list(&self, kind: Kind) -> Result<Vec<Record>> {
        self.read_under(&self.objects(kind))
    }

    fn generation(&self, kind: Kind) -> Option<u64> {
        let mirror = self.mirror.read().expect("mirror lock");
        mirror.changes_under(&self.objects(kind))
    }

    fn stamp(&self, kind: Kind, name: &str) -> Result<Option<Stamp>> {
        let mirror = self.mirror.read().expect("mirror lock");
        Ok(mirror
            .entries
            .get(&self.object(kind, name))
            .and_then(Entry::stamp))
    }

    fn stamps(&self, kind: Kind) -> Result<Vec<(String, Stamp)>> {
        let prefix = self.objects(kind);
        let mirror = self.mirror.read().expect("mirror lock");
        Ok(mirror
            .entries_under(&prefix)
            .filter_map(|(k, e)| Some((k[prefix.len()..].to_owned(), e.stamp()?)))
            .collect())
    }

    fn put(&self, kind: Kind, name: &str, spec: Value, expect: Expect) -> Result<Record> {
        let (key, name) = (self.object(kind, name), name.to_owned());
        self.decide(move |mirror| {
            let plan = put_plan(mirror, (kind, &name, &key), &spec, expect)?;
            Ok(match plan.writes.is_empty() {
                true => Decision::Done(plan.value),
                false => Decision::Write(plan),
            })
        })
    }

    fn put_recorded(
        &self,
        kind: Kind,
        name: &str,
        spec: Value,
        expect: Expect,
        body: EventBody,
    ) -> Result<(Record, Event)> {
        let (key, name, prefix) = (
            self.object(kind, name),
            name.to_owned(),
            self.prefix.clone(),
        );
        self.decide(move |mirror| {
            let plan = put_plan(mirror, (kind, &name, &key), &spec, expect)?;
            let mut body = body.clone();
            body.result = format!("version {}", plan.value.version);
            Ok(Decision::Write(logged(mirror, &prefix, plan, body)?))
        })
    }

    fn delete(&self, kind: Kind, name: &str, expect: Expect) -> Result<Record> {
        let (key, name) = (self.object(kind, name), name.to_owned());
        self.decide(move |mirror| {
            Ok(Decision::Write(delete_plan(
                mirror,
                (kind, &name, &key),
                expect,
            )?))
        })
    }

    fn delete_recorded(
        &self,
        kind: Kind,
        name: &str,
        expect: Expect,
        body: EventBody,
    ) -> Result<(Record, Event)> {
        let (key, name, prefix) = (
            self.object(kind, name),
            name.to_owned(),
            self.prefix.clone(),
        );
        self.decide(move |mirror| {
            let plan = delete_plan(mirror, (kind, &name, &key), expect)?;
            Ok(Decision::Write(logged(
                mirror,
                &prefix,
                plan,
                body.clone(),
            )?))
        })
    }

    fn persona_id(&self, name: &str) -> Result<u32> {
        let key = self.data(&format!("persona-ids/{name}"));
        let last_key = self.data("meta/persona-id");
        self.decide(move |mirror| {
            if let Some((v, _)) = mirror.get(&key) {
                return Ok(Decision::Done(decode::<u32>(v)?));
            }
            let last: u32 = mirror
                .get(&last_key)
                .map(|(v, _)| decode(v))
                .transpose()?
                .unwrap_or(0);
            let next = last + 1;
            Ok(Decision::Write(Plan {
                when: vec![unchanged(mirror, &key), unchanged(mirror, &last_key)],
                writes: vec![
                    (key.clone(), Some(encode(&next)?)),
                    (last_key.clone(), Some(encode(&next)?)),
                ],
                reread: vec![key.clone(), last_key.clone()],
                value: next,
            }))
        })
    }

    fn persona_names(&self) -> Result<BTreeMap<u32, String>> {
        let prefix = self.data("persona-ids/");
        let mirror = self.mirror.read().expect("mirror lock");
        mirror
            .under(&prefix)
            .map(|(k, v)| Ok((decode(v)?, k[prefix.len()..].to_owned())))
            .collect()
    }

    fn put_token(&self, token: &TokenRecord) -> Result<()> {
        let key = self.data(&format!("tokens/{}", token.id));
        self.write_all(vec![(key, Some(encode(token)?))])
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        self.read(&self.data(&format!("tokens/{id}")))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read_under(&self.data("tokens/"))
    }

    fn device_state(&self, device: &str) -> Result<Option<DeviceState>> {
        let mirror = self.mirror.read().expect("mirror lock");
        let owner = self.owner(&mirror, device);
        if let Some((v, _)) = mirror.get(&self.state_key(&owner, device)) {
            return decode(v).map(Some);
        }
        Ok(self
            .states(&mirror)?
            .into_iter()
            .filter(|(_, d, _)| d == device)
            .map(|(_, _, s)| s)
            .max_by_key(|s| s.since))
    }

    fn device_states(&self) -> Result<Vec<(String, DeviceState)>> {
        let mirror = self.mirror.read().expect("mirror lock");
        let records = self.states(&mirror)?;
        Ok(self.resolve_all(&mirror, records))
    }

    fn states_holding(
        &self,
        personas: &[String],
        scope: &crate::model::AddressScope,
    ) -> Result<Vec<(String, DeviceState)>> {
        let mirror = self.mirror.read().expect("mirror lock");
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let touched = mirror.take_touched();
        // A failure part way leaves the index to be built again at the next call.
        let fresh = std::mem::take(&mut held.fresh);
        match touched {
            Some(keys) if fresh => self.follow(&mirror, &mut held, keys)?,
            _ => {
                let records = self.states(&mirror)?;
                held.hosts = records.iter().map(|(h, _, _)| h.clone()).collect();
                let mut states = super::states::States::default();
                for (device, state) in self.resolve_all(&mirror, records) {
                    states.set(&device, Some(state));
                }
                held.states = states;
            }
        }
        held.fresh = true;
        Ok(held.states.holding(personas, scope))
    }

    fn set_device_state(&self, device: &str, state: Option<&DeviceState>) -> Result<()> {
        self.write_all(vec![self.state_write(device, state)?])
    }

    fn forget_device_state(&self, device: &str) -> Result<()> {
        // A key once only: etcd refuses a transaction that names one twice.
        let mut keys = std::collections::BTreeSet::from([self.state_write(device, None)?.0]);
        let mirror = self.mirror.read().expect("mirror lock");
        for (host, d, _) in self.states(&mirror)? {
            if d == device {
                keys.insert(self.state_key(&host, &d));
            }
        }
        drop(mirror);
        self.write_all(keys.into_iter().map(|k| (k, None)).collect())
    }

    fn append_event(&self, body: EventBody) -> Result<Event> {
        self.run(with_event(self.core(), body, Vec::new()))
    }

    fn record_state(
        &self,
        device: &str,
        state: Option<&DeviceState>,
        body: EventBody,
    ) -> Result<Event> {
        self.run(with_event(
            self.core(),
            body,
            vec![self.state_write(device, state)?],
        ))
    }

    fn submit_state(
        &self,
        device: &str,
        state: Option<DeviceState>,
        body: EventBody,
        _intent: Option<super::IntentId>,
    ) -> tokio::sync::oneshot::Receiver<Result<Event>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.state_write(device, state.as_ref()) {
            Ok(write) => {
                let written = with_event(self.core(), body, vec![write]);
                self.rt.spawn(async move {
                    let _ = tx.send(within_deadline(written).await);
                });
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
        rx
    }

    fn put_signal(&self, key: &str, signal: &Value) -> Result<()> {
        self.put_signals(vec![(key.to_owned(), encode(signal)?)])
    }

    fn put_signals(&self, signals: Vec<(String, Vec<u8>)>) -> Result<()> {
        for chunk in signals.chunks(OPS_PER_TXN) {
            let writes = chunk
                .iter()
                .map(|(k, v)| (self.data(&format!("signals/{k}")), Some(v.clone())))
                .collect();
            self.write_all(writes)?;
        }
        Ok(())
    }

    fn delete_signals(&self, keys: &[String]) -> Result<()> {
        for chunk in keys.chunks(OPS_PER_TXN) {
            let writes = chunk
                .iter()
                .map(|k| (self.data(&format!("signals/{k}")), None))
                .collect();
            self.write_all(writes)?;
        }
        Ok(())
    }

    fn signals(&self) -> Result<Vec<Value>> {
        self.read_under(&self.data("signals/"))
    }

    fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        let from = self.log(after.saturating_add(1));
        let end = format!("{}log0", self.prefix);
        let client = self.client.clone();
        let resp = self.run(async move {
            get(
                &client,
                &from,
                GetOptions::new().with_range(end).with_limit(limit as i64),
            )
            .await
        })?;
        resp.kvs().iter().map(|kv| decode(kv.value())).collect()
    }

    fn prune_events(&self, before: jiff::Timestamp, keep: usize, at_most: usize) -> Result<usize> {
        let start = format!("{}log/", self.prefix);
        let end = format!("{}log0", self.prefix);
        let client = self.client.clone();
        let (count, oldest) = {
            let (s, e) = (start.clone(), end.clone());
            self.run(async move {
                let count = get(
                    &client,
                    &s,
                    GetOptions::new().with_range(e.as_str()).with_count_only(),
                )
                .await?
                .count();
                let oldest = get(
                    &client,
                    &s,
                    GetOptions::new().with_range(e).with_limit(at_most as i64),
                )
                .await?;
                Ok((count, oldest.kvs().to_vec()))
            })?
        };
        let mut left = count.max(0) as usize;
        let mut cut: Option<u64> = None;
        let mut removed = 0;
        for kv in &oldest {
            if left <= 1 || removed >= at_most {
                break;
            }
            let event: Event = decode(kv.value())?;
            if left <= keep && event.at >= before {
                break;
            }
            cut = Some(event.seq);
            left -= 1;
            removed += 1;
        }
        if let Some(last) = cut {
            let (from, to) = (start, self.log(last + 1));
            let kv = self.client.kv_client();
            self.run(async move {
                sent(|| {
                    let (mut kv, from, to) = (kv.clone(), from.clone(), to.clone());
                    async move {
                        kv.delete(from, Some(DeleteOptions::new().with_range(to)))
                            .await
                    }
                })
                .await
            })?;
        }
        Ok(removed)
    }
}

/// A device's state is kept under the host that recorded it, `states/HOST/DEVICE`, so
/// that etcd's RBAC can let each host write its own only. The one that counts is its
/// owner's (the host its spec names); until the owner has one (just after a migration)
/// the latest any host recorded.
impl EtcdStore {
    fn state_write(
        &self,
        device: &str,
        state: Option<&DeviceState>,
    ) -> Result<(String, Option<Vec<u8>>)> {
        let key = self.state_key(&self.host, device);
        Ok((key, state.map(encode).transpose()?))
    }

    /// Where `host`'s record of `device`'s state is; host "" is where one was kept
    /// before states were kept by host.
    fn state_key(&self, host: &str, device: &str) -> String {
        match host {
            "" => self.data(&format!("states/{device}")),
            h => self.data(&format!("states/{h}/{device}")),
        }
    }

    /// The host that runs `device`, as its spec says; this one when it names none, or
    /// when there is no such device.
    fn owner(&self, mirror: &Mirror, device: &str) -> String {
        self.defined_owner(mirror, device)
            .unwrap_or_else(|| self.host.clone())
    }

    /// The host that runs `device`, if it is defined.
    fn defined_owner(&self, mirror: &Mirror, device: &str) -> Option<String> {
        let (v, _) = mirror.get(&self.object(Kind::Device, device))?;
        let record = decode::<Record>(v).ok()?;
        Some(match record.spec.get("host").and_then(Value::as_str) {
            Some(h) => h.to_owned(),
            None => self.host.clone(),
        })
    }

    /// Every state recorded, as (host, device, state); one kept before states were
    /// kept by host (`states/DEVICE`) has host "".
    fn states(&self, mirror: &Mirror) -> Result<Vec<(String, String, DeviceState)>> {
        let prefix = self.data("states/");
        mirror
            .under(&prefix)
            .map(|(k, v)| {
                let rest = &k[prefix.len()..];
                let (host, device) = rest.split_once('/').unwrap_or(("", rest));
                decode(v).map(|s| (host.to_owned(), device.to_owned(), s))
            })
            .collect()
    }

    /// Every device's state from the records the hosts made (`states`): its owner's
    /// record when more than one host recorded it (just after a migration), else the
    /// newest.
    fn resolve_all(
        &self,
        mirror: &Mirror,
        records: Vec<(String, String, DeviceState)>,
    ) -> Vec<(String, DeviceState)> {
        let mut by_device: BTreeMap<String, Vec<(String, DeviceState)>> = BTreeMap::new();
        for (host, device, state) in records {
            by_device.entry(device).or_default().push((host, state));
        }
        by_device
            .into_iter()
            .filter_map(|(device, records)| {
                let state = self.resolve(mirror, &device, records)?;
                Some((device, state))
            })
            .collect()
    }

    /// One device's state from the records the hosts made of it.
    fn resolve(
        &self,
        mirror: &Mirror,
        device: &str,
        mut records: Vec<(String, DeviceState)>,
    ) -> Option<DeviceState> {
        if records.len() <= 1 {
            return records.pop().map(|(_, s)| s);
        }
        let owner = self.owner(mirror, device);
        match records.iter().position(|(h, _)| *h == owner) {
            Some(i) => Some(records.swap_remove(i).1),
            None => records.into_iter().map(|(_, s)| s).max_by_key(|s| s.since),
        }
    }

    /// Brings `held` up to date with the state and device keys that changed.
    fn follow(&self, mirror: &Mirror, held: &mut Held, keys: Vec<String>) -> Result<()> {
        let (states, devices) = (self.data("states/"), self.objects(Kind::Device));
        let mut changed = std::collections::BTreeSet::new();
        for key in &keys {
            if let Some(rest) = key.strip_prefix(&states) {
                let (host, device) = rest.split_once('/').unwrap_or(("", rest));
                held.hosts.insert(host.to_owned());
                changed.insert(device.to_owned());
            } else if let Some(device) = key.strip_prefix(&devices) {
                changed.insert(device.to_owned());
            }
        }
        for device in changed {
            let mut records = Vec::new();
            for host in &held.hosts {
                if let Some((v, _)) = mirror.get(&self.state_key(host, &device)) {
                    records.push((host.clone(), decode(v)?));
                }
            }
            let state = self.resolve(mirror, &device, records);
            held.states.set(&device, state);
        }
        Ok(())
    }

    /// Forgets what this host recorded of devices it does not run (it was down when
    /// they moved away or were deleted); returns how many.
    pub fn forget_unowned_states(&self) -> Result<usize> {
        let stale: Vec<(String, Option<Vec<u8>>)> = {
            let mirror = self.mirror.read().expect("mirror lock");
            self.states(&mirror)?
                .into_iter()
                .filter(|(h, d, _)| {
                    *h == self.host && self.defined_owner(&mirror, d).as_ref() != Some(h)
                })
                .map(|(h, d, _)| (self.state_key(&h, &d), None))
                .collect()
        };
        let n = stale.len();
        if n > 0 {
            self.write_all(stale)?;
        }
        Ok(n)
    }
}

/// The write of object `name` (at `key`) that stores `spec`: none when it holds that
/// already.
fn put_plan(
    mirror: &Mirror,
    (kind, name, key): (Kind, &str, &str),
    spec: &Value,
    expect: Expect,
) -> Result<Plan<Record>> {
    let current: Option<Record> = mirror.get(key).map(|(v, _)| decode(v)).transpose()?;
    check(kind, name, current.as_ref(), expect)?;
    let (record, writes) = match current.as_ref().filter(|c| &c.spec == spec) {
        Some(cur) => (cur.clone(), Vec::new()),
        None => {
            let record = Record {
                kind,
                name: name.to_owned(),
                version: current.as_ref().map_or(1, |c| c.version + 1),
                updated: jiff::Timestamp::now(),
                spec: spec.clone(),
            };
            let write = (key.to_owned(), Some(encode(&record)?));
            (record, vec![write])
        }
    };
    Ok(Plan {
        when: vec![unchanged(mirror, key)],
        writes,
        reread: vec![key.to_owned()],
        value: record,
    })
}

fn delete_plan(
    mirror: &Mirror,
    (kind, name, key): (Kind, &str, &str),
    expect: Expect,
) -> Result<Plan<Record>> {
    let current: Option<Record> = mirror.get(key).map(|(v, _)| decode(v)).transpose()?;
    let Some(current) = current else {
        return Err(StoreError::NotFound {
            kind: kind.label(),
            name: name.to_owned(),
        });
    };
    check(kind, name, Some(&current), expect)?;
    Ok(Plan {
        when: vec![unchanged(mirror, key)],
        writes: vec![(key.to_owned(), None)],
        reread: vec![key.to_owned()],
        value: current,
    })
}

/// Whether `key` holds `expected`, as the mirror last saw it.
fn holds(mirror: &Mirror, key: &str, expected: &Value) -> Result<bool> {
    let now: Option<Value> = mirror.get(key).map(|(v, _)| decode(v)).transpose()?;
    Ok(now.as_ref() == Some(expected))
}

/// The comparison that `key` is as the mirror last saw it (absent: never written since
/// it was last deleted).
fn unchanged(mirror: &Mirror, key: &str) -> Compare {
    Compare::mod_revision(key, CompareOp::Equal, mirror.rev(key))
}
