//! Group commit: one committer at a time owns the store's write transactions. A caller
//! that waits for its write anyway (a blocking one) commits it on its own thread when
//! no commit is under way, which saves the trip to the writer's thread and back; writes
//! that arrive while a commit is under way, and those of async callers, wait in a queue
//! and all go into the next transaction, committed (one fsync) together by the writer's
//! thread; each caller is answered only after the commit that holds its write, so
//! nothing acknowledged is ever lost. A group of logged writes
//! (shift records, signals) is made durable by the log instead ([`super::wal`]), and a
//! checkpoint now and then makes the file hold them.
//!
//! A shift writes its intent to the log before the datapath flips and syncs it on its
//! own thread while the flip runs: the record written after the flip (covered by the
//! intent) needs no sync of its own, and is answered once the intent is durable.
use std::{
    collections::HashMap,
    fs::File,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::Instant,
};

use redb::{Database, Durability, ReadableTable as _, TableDefinition, WriteTransaction};

use super::{Result, StoreError, wal::Wal};

/// The store's own bookkeeping: `durable` counts its durable commits, the log's epoch.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DURABLE: &str = "durable";

/// A checkpoint at the latest this long after the first write it would make durable.
const CHECKPOINT_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs after the commit that held the write, once it is durable (index updates); a
/// write waiting for its intent's sync runs it after the commits released before it.
pub type After = Box<dyn FnOnce() + Send>;

/// Writes per transaction at most: a long queue is committed in several.
const MAX_GROUP: usize = 256;

/// How the writer has done since start.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: AtomicU64,
    pub writes: AtomicU64,
    /// Time spent in commits and intents' syncs (the fsync, mostly).
    pub commit_ns: AtomicU64,
    pub largest_group: AtomicU64,
    /// Shift intents logged.
    pub intents: AtomicU64,
    /// Writes answered on their intent's sync, without one of their own.
    pub covered: AtomicU64,
}

/// Answers a write's caller once the commit's outcome is known.
type Finish = Box<dyn FnOnce(&Result<()>) + Send>;

/// A shift's intent, as its log record names it.
pub type IntentId = u64;

trait Job: Send {
    /// Whether the log can make the write durable.
    fn logged(&self) -> bool;
    /// The intent that covers this write, when one does.
    fn covered_by(&self) -> Option<IntentId> {
        None
    }
    /// Does the write inside `txn`; a logged one also gives its record for the log.
    fn apply(self: Box<Self>, txn: &WriteTransaction) -> (Finish, Option<Vec<u8>>);
    fn abort(self: Box<Self>, why: &StoreError);
}

/// What a write did: its answer, what runs after the commit, its record for the log.
pub struct Done<T> {
    pub value: T,
    pub after: Option<After>,
    pub log: Option<Vec<u8>>,
}

type Op<T> = Box<dyn FnOnce(&WriteTransaction) -> Result<Done<T>> + Send>;

type Reply<T> = Box<dyn FnOnce(Result<T>) + Send>;

struct Pending<T> {
    op: Op<T>,
    logged: bool,
    covered: Option<IntentId>,
    reply: Reply<T>,
}

impl<T: Send + 'static> Job for Pending<T> {
    fn logged(&self) -> bool {
        self.logged
    }

    fn covered_by(&self) -> Option<IntentId> {
        self.covered
    }

    fn apply(self: Box<Self>, txn: &WriteTransaction) -> (Finish, Option<Vec<u8>>) {
        // A write that fails changes nothing: each checks before it inserts.
        let (done, log) = match (self.op)(txn) {
            Ok(d) => (Ok((d.value, d.after)), d.log),
            Err(e) => (Err(e), None),
        };
        let reply = self.reply;
        let finish: Finish = Box::new(move |committed| {
            let answer = match (committed, done) {
                (Ok(()), Ok((value, after))) => {
                    if let Some(after) = after {
                        after();
                    }
                    Ok(value)
                }
                (Ok(()), Err(e)) => Err(e),
                (Err(e), _) => Err(e.clone()),
            };
            reply(answer);
        });
        (finish, log)
    }

    fn abort(self: Box<Self>, why: &StoreError) {
        (self.reply)(Err(why.clone()));
    }
}

/// The intents in the log since it last started over, and the covered writes waiting
/// for their sync.
#[derive(Default)]
struct Intents {
    next: IntentId,
    written: HashMap<IntentId, Written>,
    /// Times the log started over: an intent gone since a write's commit went with
    /// a durable commit, which holds the write; one gone otherwise failed.
    started: u64,
}

#[derive(Default)]
struct Written {
    synced: bool,
    waiting: Vec<Finish>,
}

impl Intents {
    /// The log started over after a durable commit, which holds every write committed
    /// before it: the writes waiting for an intent's sync need it no more.
    fn started_over(&mut self) -> Vec<Finish> {
        self.started += 1;
        self.written.drain().flat_map(|(_, w)| w.waiting).collect()
    }

    fn failed(&mut self, ids: &[IntentId]) -> Vec<Finish> {
        ids.iter()
            .filter_map(|id| self.written.remove(id))
            .flat_map(|w| w.waiting)
            .collect()
    }

    fn synced(&mut self, ids: &[IntentId]) -> Vec<Finish> {
        let mut ready = Vec::new();
        for id in ids {
            if let Some(w) = self.written.get_mut(id) {
                w.synced = true;
                ready.append(&mut w.waiting);
            }
        }
        ready
    }
}

pub struct Writer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the callers and the writer's thread share: the writes waiting, and the
/// transaction side (database and log) that one of them at a time commits through.
struct Shared {
    queue: Mutex<Vec<Box<dyn Job>>>,
    core: Mutex<Core>,
    /// Taken inside `core`, never the other way round.
    intents: Mutex<Intents>,
    /// The log's file, for syncing it without holding the transaction side; `None`
    /// when the store keeps no log.
    syncer: Option<Arc<File>>,
    /// Commits under way, from their transaction to their answers.
    committing: AtomicU64,
    /// Set when the thread has work: a queue no caller could commit, a checkpoint
    /// due, or closing.
    wake: Mutex<bool>,
    woken: Condvar,
    closed: AtomicBool,
    stats: CommitStats,
}

struct Core {
    db: Arc<Database>,
    wal: Option<Wal>,
    /// When the oldest logged write the file does not hold yet was committed.
    pending: Option<Instant>,
    /// The log failed to start over after a durable commit: its header still names
    /// an older epoch than the file, and what it took now would be dropped on open.
    /// Writes are made durable by the file alone until it starts over.
    stale: bool,
}

/// A commit once the transaction side is let go: its answers.
struct Tail {
    committed: Result<()>,
    finishers: Vec<Finish>,
    /// The intent covering each write, when the log needs no sync for them, and the
    /// log's start-overs as of the commit.
    covered: Option<(Vec<IntentId>, u64)>,
    /// Answers that a durable commit (the log starting over) released.
    released: Vec<Finish>,
    writes: u64,
    start: Instant,
}

impl Drop for Writer {
    /// Waits for the writes queued to be committed and the file to be let go, so that
    /// it can be opened again at once.
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.nudge();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Writer {
    pub fn spawn(db: Arc<Database>, wal: Option<Wal>) -> Result<Self> {
        let shared = Arc::new(Shared {
            syncer: wal.as_ref().map(Wal::syncer),
            committing: AtomicU64::new(0),
            queue: Mutex::new(Vec::new()),
            core: Mutex::new(Core {
                db,
                wal,
                pending: None,
                stale: false,
            }),
            intents: Mutex::new(Intents::default()),
            wake: Mutex::new(false),
            woken: Condvar::new(),
            closed: AtomicBool::new(false),
            stats: CommitStats::default(),
        });
        let served = shared.clone();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || served.serve())
            .map_err(|e| StoreError::Backend(format!("starting the store's writer: {e}")))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `op` in the next group's transaction; returns once it is committed.
    pub fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&WriteTransaction) -> Result<(T, Option<After>)> + Send + 'static,
    ) -> Result<T> {
        self.wait(unlogged(op), false)
    }

    /// A write whose record `op` gives for the log, which makes it durable, answered
    /// on the channel returned once it is: the writer's thread commits it, and the
    /// caller (async) never blocks.
    pub fn submit_logged<T: Send + 'static>(
        &self,
        op: impl FnOnce(&WriteTransaction) -> Result<Done<T>> + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<Result<T>> {
        let (reply, answer) = oneshot();
        // Not queued (the store closed), the reply goes unsent and the caller hears
        // that the channel closed.
        let _ = self.queue(Box::new(op), true, reply, false);
        answer
    }

    /// Writes `record` (given its id) to the log on this thread, an intent that
    /// replaying the log does unless a write covered by it follows; the caller then
    /// syncs it ([`Writer::sync_intent`]) while the flip runs. `None` when the store
    /// keeps no log, the writer is busy, or the record could not be written.
    pub fn log_intent(&self, record: impl FnOnce(IntentId) -> Result<Vec<u8>>) -> Option<IntentId> {
        // A busy writer groups the record after the flip with others anyway, and an
        // intent would only add a write and a sync.
        if self.shared.syncer.is_none()
            || self.shared.closed.load(Ordering::SeqCst)
            || self.shared.committing.load(Ordering::SeqCst) > 0
            || !lock(&self.shared.queue).is_empty()
        {
            return None;
        }
        let mut core = self.shared.core.try_lock().ok()?;
        if core.stale || core.checkpoint_due() {
            return None;
        }
        let mut intents = lock(&self.shared.intents);
        let id = intents.next + 1;
        let record = record(id).ok()?;
        core.wal.as_mut()?.write(&[record]).ok()?;
        self.shared.arm(&mut core.pending);
        intents.next = id;
        intents.written.insert(id, Written::default());
        self.shared.stats.intents.fetch_add(1, Ordering::Relaxed);
        Some(id)
    }

    /// Syncs the log, which holds `intent`, on this thread, and answers the writes
    /// that waited for it. A failed sync leaves the log's writes to a durable commit;
    /// should that fail too, the writes waiting for the intent fail with it.
    pub fn sync_intent(&self, intent: IntentId) -> Result<()> {
        let Some(file) = &self.shared.syncer else {
            return Ok(());
        };
        let start = Instant::now();
        let synced = file.sync_data();
        self.shared
            .stats
            .commit_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let (committed, ready) = match synced {
            Ok(()) => (Ok(()), lock(&self.shared.intents).synced(&[intent])),
            Err(e) => {
                let (committed, mut ready) =
                    self.shared.sync_failed(&mut lock(&self.shared.core), &e);
                if committed.is_err() {
                    ready.extend(lock(&self.shared.intents).failed(&[intent]));
                }
                (committed, ready)
            }
        };
        release(ready, &committed);
        committed
    }

    /// [`Writer::submit_logged`] for a write that `intent` covers: committed on this
    /// thread when the transaction side is free and the intent is in the log (its
    /// shift may be syncing it meanwhile), else by the next group; answered once the
    /// intent is synced, without a sync of its own while the intent is in the log.
    pub fn submit_covered<T: Send + 'static>(
        &self,
        intent: IntentId,
        op: impl FnOnce(&WriteTransaction) -> Result<Done<T>> + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<Result<T>> {
        let (reply, answer) = oneshot();
        let job: Box<dyn Job> = Box::new(Pending {
            op: Box::new(op),
            logged: true,
            covered: Some(intent),
            reply,
        });
        if self.shared.closed.load(Ordering::SeqCst) {
            job.abort(&StoreError::Backend("the store is closed".into()));
            return answer;
        }
        // Only a write that needs no sync (and no checkpoint) is committed here: an
        // async caller must not wait for the disk.
        if let Ok(mut core) = self.shared.core.try_lock()
            && !core.checkpoint_due()
            && lock(&self.shared.intents).written.contains_key(&intent)
        {
            let tail = self.shared.commit(&mut core, vec![job]);
            drop(core);
            self.shared.finish(tail);
            return answer;
        }
        lock(&self.shared.queue).push(job);
        self.shared.nudge();
        answer
    }

    /// [`Writer::submit_logged`], waited for.
    pub fn write_logged<T: Send + 'static>(
        &self,
        op: impl FnOnce(&WriteTransaction) -> Result<Done<T>> + Send + 'static,
    ) -> Result<T> {
        self.wait(Box::new(op), true)
    }

    fn wait<T: Send + 'static>(&self, op: Op<T>, logged: bool) -> Result<T> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.queue(
            op,
            logged,
            Box::new(move |r| {
                let _ = reply.send(r);
            }),
            true,
        )?;
        answer
            .recv()
            .map_err(|_| StoreError::Backend("the store's writer dropped a write".into()))?
    }

    /// Queues a write; `here` commits it on this thread when no commit is under way.
    fn queue<T: Send + 'static>(
        &self,
        op: Op<T>,
        logged: bool,
        reply: Reply<T>,
        here: bool,
    ) -> Result<()> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("the store is closed".into()));
        }
        lock(&self.shared.queue).push(Box::new(Pending {
            op,
            logged,
            covered: None,
            reply,
        }));
        if here {
            self.shared.commit_here();
        } else {
            self.shared.nudge();
        }
        Ok(())
    }

    pub fn stats(&self) -> &CommitStats {
        &self.shared.stats
    }

    /// Makes the log fail to start over from now on, as a failing disk would.
    #[cfg(test)]
    pub fn fail_log_resets(&self) {
        if let Some(w) = lock(&self.shared.core).wal.as_mut() {
            w.fail_resets = true;
        }
    }
}

/// A reply sent on a tokio channel.
fn oneshot<T: Send + 'static>() -> (Reply<T>, tokio::sync::oneshot::Receiver<Result<T>>) {
    let (reply, answer) = tokio::sync::oneshot::channel();
    (
        Box::new(move |r| {
            let _ = reply.send(r);
        }),
        answer,
    )
}

impl Shared {
    /// Commits one group on this thread when no commit is under way. Whoever holds the
    /// transaction side looks at the queue again once it lets go, so a write queued
    /// meanwhile is never left behind; what is left, and checkpoints, go to the
    /// writer's thread.
    fn commit_here(&self) {
        let Ok(mut core) = self.core.try_lock() else {
            return;
        };
        let group = self.take_group();
        let tail = (!group.is_empty()).then(|| self.commit(&mut core, group));
        let due = core.checkpoint_due();
        drop(core);
        if let Some(tail) = tail {
            self.finish(tail);
        }
        if due || !lock(&self.queue).is_empty() {
            self.nudge();
        }
    }

    /// Notes that the log holds writes the file does not, and has the writer's thread
    /// checkpoint them within [`CHECKPOINT_AFTER`] when it was asleep with none.
    fn arm(&self, pending: &mut Option<Instant>) {
        if pending.is_none() {
            *pending = Some(Instant::now());
            self.nudge();
        }
    }

    fn take_group(&self) -> Vec<Box<dyn Job>> {
        let mut q = lock(&self.queue);
        let n = q.len().min(MAX_GROUP);
        q.drain(..n).collect()
    }

    fn nudge(&self) {
        *lock(&self.wake) = true;
        self.woken.notify_one();
    }

    /// The writer's thread: commits what callers left queued, and makes the file hold
    /// the log's writes (a checkpoint) within a second of the first.
    fn serve(&self) {
        loop {
            let closing = self.closed.load(Ordering::SeqCst);
            loop {
                let mut core = lock(&self.core);
                let group = self.take_group();
                if group.is_empty() {
                    break;
                }
                let tail = self.commit(&mut core, group);
                drop(core);
                self.finish(tail);
            }
            let pending = {
                let mut core = lock(&self.core);
                if closing || core.checkpoint_due() {
                    let released = self.checkpoint(&mut core);
                    drop(core);
                    release(released, &Ok(()));
                    core = lock(&self.core);
                }
                if closing {
                    return;
                }
                core.pending
            };
            let wait = pending.map_or(IDLE, |p| CHECKPOINT_AFTER.saturating_sub(p.elapsed()));
            let mut wake = lock(&self.wake);
            // A write queued while this thread held the transaction side found it busy
            // and left it here.
            if !*wake && lock(&self.queue).is_empty() {
                wake = self
                    .woken
                    .wait_timeout(wake, wait)
                    .map_or_else(|e| e.into_inner().0, |(w, _)| w);
            }
            *wake = false;
        }
    }

    /// Makes the file hold every logged write, when some are only in the log; gives
    /// the answers that waited for an intent's sync, which the file now holds.
    fn checkpoint(&self, core: &mut Core) -> Vec<Finish> {
        if core.pending.is_none() {
            return Vec::new();
        }
        let (done, released) = self.checkpoint_now(core);
        if let Err(e) = done {
            tracing::error!(error = %e, "store checkpoint");
        }
        released
    }

    /// A durable commit now: the log starts over, and the writes that waited for an
    /// intent's sync are held by the file; gives them with the outcome.
    fn checkpoint_now(&self, core: &mut Core) -> (Result<()>, Vec<Finish>) {
        if core.wal.is_none() {
            return (
                Err(StoreError::Backend("the store keeps no log".into())),
                Vec::new(),
            );
        }
        match durable_commit(&core.db) {
            Ok(epoch) => (Ok(()), self.held_by_file(core, epoch)),
            Err(e) => (Err(e), Vec::new()),
        }
    }

    /// After a durable commit that gave `epoch`, the file holds all that was logged:
    /// the log starts over under it, and the writes that waited for an intent's sync
    /// are given back. A log that fails to start over is of an older epoch, read as
    /// empty on open, and takes no write until it does.
    fn held_by_file(&self, core: &mut Core, epoch: u64) -> Vec<Finish> {
        if let Some(w) = core.wal.as_mut() {
            core.stale = w
                .reset(epoch)
                .inspect_err(|e| {
                    tracing::error!(error = %e, "starting the store's log over: writes go to the file alone until it does");
                })
                .is_err();
        }
        core.pending = None;
        lock(&self.intents).started_over()
    }

    /// One transaction for the whole group: durable by the log when every write in it
    /// is logged (and the log takes them), else by a durable commit. The answers are
    /// given once the transaction side is let go. A group of writes whose intents are
    /// all in the log has no sync.
    fn commit(&self, core: &mut Core, group: Vec<Box<dyn Job>>) -> Tail {
        let start = Instant::now();
        self.committing.fetch_add(1, Ordering::SeqCst);
        let logged = core.wal.is_some() && !core.stale && group.iter().all(|j| j.logged());
        let covered = logged
            .then(|| {
                let intents = lock(&self.intents);
                group
                    .iter()
                    .map(|j| j.covered_by().filter(|id| intents.written.contains_key(id)))
                    .collect::<Option<Vec<_>>>()
                    .map(|ids| (ids, intents.started))
            })
            .flatten();
        let mut tail = Tail {
            committed: Ok(()),
            finishers: Vec::new(),
            covered: None,
            released: Vec::new(),
            writes: group.len() as u64,
            start,
        };
        let txn = core.db.begin_write().map(|mut t| {
            if logged {
                let _ = t.set_durability(Durability::None);
            }
            t
        });
        let txn = match txn {
            Ok(t) => t,
            Err(e) => {
                let why = StoreError::Backend(e.to_string());
                for job in group {
                    job.abort(&why);
                }
                tail.committed = Err(why);
                return tail;
            }
        };
        let epoch = if logged { Ok(0) } else { next_epoch(&txn) };
        let (finishers, logs): (Vec<_>, Vec<_>) =
            group.into_iter().map(|job| job.apply(&txn)).unzip();
        tail.finishers = finishers;
        let records: Vec<Vec<u8>> = logs.into_iter().flatten().collect();
        let committed = epoch.and_then(|epoch| {
            txn.commit()
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            Ok(epoch)
        });
        tail.committed = match (&mut core.wal, committed) {
            (Some(w), Ok(_)) if logged => {
                if w.write(&records).is_ok() {
                    self.arm(&mut core.pending);
                    match covered {
                        Some(ids) => tail.covered = Some(ids),
                        // Synced here: writes arriving meanwhile queue up and share
                        // the next sync.
                        None => {
                            if let Err(e) = w.syncer().sync_data() {
                                let (committed, released) = self.sync_failed(core, &e);
                                tail.released = released;
                                return Tail { committed, ..tail };
                            }
                        }
                    }
                    Ok(())
                } else {
                    // The log full or failing, the writes are made durable the slow way.
                    let (done, released) = self.checkpoint_now(core);
                    tail.released = released;
                    done
                }
            }
            (Some(_), Ok(epoch)) => {
                tail.released = self.held_by_file(core, epoch);
                Ok(())
            }
            (_, committed) => committed.map(|_| ()),
        };
        tail
    }

    /// A failed sync of the log leaves the writes to a durable commit; gives its
    /// outcome and the answers that waited for intents, which it holds.
    fn sync_failed(&self, core: &mut Core, e: &std::io::Error) -> (Result<()>, Vec<Finish>) {
        tracing::warn!(error = %e, "syncing the store's log");
        self.checkpoint_now(core)
    }

    /// Answers a commit's writes. Covered writes wait for their intents' sync; an
    /// intent no longer listed went with the log's start over, and the durable commit
    /// that started it holds them, unless the intent failed.
    fn finish(&self, tail: Tail) {
        let Tail {
            committed,
            mut finishers,
            covered,
            released,
            writes,
            start,
        } = tail;
        let mut ready = Vec::new();
        let mut lost = Vec::new();
        if let (Some((ids, started)), Ok(())) = (covered, &committed) {
            self.stats
                .covered
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            let mut intents = lock(&self.intents);
            let durable = intents.started != started;
            for (finish, id) in std::mem::take(&mut finishers).into_iter().zip(ids) {
                match intents.written.get_mut(&id) {
                    Some(w) if !w.synced => w.waiting.push(finish),
                    Some(_) => ready.push(finish),
                    None if durable => ready.push(finish),
                    None => lost.push(finish),
                }
            }
        }
        let stats = &self.stats;
        stats
            .commit_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.writes.fetch_add(writes, Ordering::Relaxed);
        stats.largest_group.fetch_max(writes, Ordering::Relaxed);
        self.committing.fetch_sub(1, Ordering::SeqCst);
        // Earlier commits' answers first: their index updates come before this one's.
        release(released, &Ok(()));
        release(finishers, &committed);
        release(ready, &Ok(()));
        release(
            lost,
            &Err(StoreError::Backend(
                "the log's sync of the shift's intent failed".into(),
            )),
        );
    }
}

fn release(finishers: Vec<Finish>, committed: &Result<()>) {
    for finish in finishers {
        finish(committed);
    }
}

/// How long the writer's thread sleeps with nothing to checkpoint.
const IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

/// A lock whose holder panicked still guards consistent data: a commit either finishes
/// or answers its writes with the error.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unlogged<T: Send + 'static>(
    op: impl FnOnce(&WriteTransaction) -> Result<(T, Option<After>)> + Send + 'static,
) -> Op<T> {
    Box::new(move |txn| {
        let (value, after) = op(txn)?;
        Ok(Done {
            value,
            after,
            log: None,
        })
    })
}

/// The durable commits counted so far: the log's epoch.
pub fn epoch(txn: &WriteTransaction) -> Result<u64> {
    let backend = |e: redb::Error| StoreError::Backend(e.to_string());
    let t = txn.open_table(META).map_err(|e| backend(e.into()))?;
    let epoch = t.get(DURABLE).map_err(|e| backend(e.into()))?;
    Ok(epoch.map_or(0, |v| v.value()))
}

/// Counts a durable commit inside it: the log's epoch from then on.
pub fn next_epoch(txn: &WriteTransaction) -> Result<u64> {
    let epoch = epoch(txn)? + 1;
    let mut t = txn
        .open_table(META)
        .map_err(|e| StoreError::Backend(e.to_string()))?;
    t.insert(DURABLE, epoch)
        .map_err(|e| StoreError::Backend(e.to_string()))?;
    Ok(epoch)
}

/// A durable commit of nothing more: the file then holds every logged write; gives
/// the epoch the log starts over under.
fn durable_commit(db: &Database) -> Result<u64> {
    let backend = |e: redb::Error| StoreError::Backend(e.to_string());
    let txn = db.begin_write().map_err(|e| backend(e.into()))?;
    let epoch = next_epoch(&txn)?;
    txn.commit().map_err(|e| backend(e.into()))?;
    Ok(epoch)
}

impl Core {
    fn checkpoint_due(&self) -> bool {
        match (&self.wal, self.pending) {
            (Some(w), Some(p)) => {
                p.elapsed() >= CHECKPOINT_AFTER || w.used() > super::wal::CAPACITY / 2
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(tag: &str) -> (Writer, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("persona-writer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Arc::new(Database::create(dir.join("s.redb")).unwrap());
        let (wal, _) = Wal::open(&dir.join("s.wal"), 0).unwrap();
        (Writer::spawn(db, Some(wal)).unwrap(), dir)
    }

    /// Waits up to 5 s (the checkpoint is due after one) for the file to hold all
    /// that was logged.
    fn checkpointed(w: &Writer) -> bool {
        (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            lock(&w.shared.core).pending.is_none()
        })
    }

    #[test]
    fn what_is_logged_on_a_callers_thread_is_checkpointed_within_the_second() {
        let (w, dir) = writer("armed");
        // The writer's thread asleep with nothing to checkpoint.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let id = w
            .log_intent(|_| Ok(b"{}".to_vec()))
            .expect("an idle writer");
        w.sync_intent(id).unwrap();
        assert!(checkpointed(&w), "an intent");
        w.write_logged(|_| {
            Ok(Done {
                value: (),
                after: None,
                log: Some(b"{}".to_vec()),
            })
        })
        .unwrap();
        assert!(checkpointed(&w), "a logged write committed by its caller");
        drop(w);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
