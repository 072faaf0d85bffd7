//! Group commit: one committer at a time owns the store's write transactions. A caller
//! that waits for its write anyway (a blocking one) commits it on its own thread when
//! no commit is under way, which saves the trip to the writer's thread and back; writes
//! that arrive while a commit is under way, and those of async callers, wait in a queue
//! and all go into the next transaction, committed (one fsync) together by the writer's
//! thread; each caller is answered only after the commit that holds its write, so
//! nothing acknowledged is ever lost. A group of logged writes
//! (shift records, signals) is made durable by the log instead ([`super::wal`]), and a
//! checkpoint now and then makes the file hold them.
use std::{
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

/// Runs after the commit that held the write, in commit order (index updates).
pub type After = Box<dyn FnOnce() + Send>;

/// Writes per transaction at most: a long queue is committed in several.
const MAX_GROUP: usize = 256;

/// How the writer has done since start.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: AtomicU64,
    pub writes: AtomicU64,
    /// Time spent in commits (the fsync, mostly).
    pub commit_ns: AtomicU64,
    pub largest_group: AtomicU64,
}

/// Answers a write's caller once the commit's outcome is known.
type Finish = Box<dyn FnOnce(&Result<()>) + Send>;

trait Job: Send {
    /// Whether the log can make the write durable.
    fn logged(&self) -> bool;
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
    reply: Reply<T>,
}

impl<T: Send + 'static> Job for Pending<T> {
    fn logged(&self) -> bool {
        self.logged
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

pub struct Writer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the callers and the writer's thread share: the writes waiting, and the
/// transaction side (database and log) that one of them at a time commits through.
struct Shared {
    queue: Mutex<Vec<Box<dyn Job>>>,
    core: Mutex<Core>,
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
            queue: Mutex::new(Vec::new()),
            core: Mutex::new(Core {
                db,
                wal,
                pending: None,
            }),
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
        let (reply, answer) = tokio::sync::oneshot::channel();
        // Not queued (the store closed), the reply goes unsent and the caller hears
        // that the channel closed.
        let _ = self.queue(
            Box::new(op),
            true,
            Box::new(move |r| {
                let _ = reply.send(r);
            }),
            false,
        );
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
        lock(&self.shared.queue).push(Box::new(Pending { op, logged, reply }));
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
        if !group.is_empty() {
            core.commit(group, &self.stats);
        }
        let due = core.checkpoint_due();
        drop(core);
        if due || !lock(&self.queue).is_empty() {
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
            let pending = {
                let mut core = lock(&self.core);
                loop {
                    let group = self.take_group();
                    if group.is_empty() {
                        break;
                    }
                    core.commit(group, &self.stats);
                }
                if closing || core.checkpoint_due() {
                    core.checkpoint_logged();
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

/// A durable commit of nothing more: the file then holds every logged write, and the
/// log starts over.
fn checkpoint(db: &Database, wal: &mut Wal) -> Result<()> {
    let backend = |e: redb::Error| StoreError::Backend(e.to_string());
    let txn = db.begin_write().map_err(|e| backend(e.into()))?;
    let epoch = next_epoch(&txn)?;
    txn.commit().map_err(|e| backend(e.into()))?;
    wal.reset(epoch)
        .map_err(|e| StoreError::Backend(format!("starting the log over: {e}")))
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

    /// Makes the file hold every logged write, when some are only in the log.
    fn checkpoint_logged(&mut self) {
        if let (Some(w), Some(_)) = (self.wal.as_mut(), self.pending) {
            match checkpoint(&self.db, w) {
                Ok(()) => self.pending = None,
                Err(e) => tracing::error!(error = %e, "store checkpoint"),
            }
        }
    }

    /// One transaction for the whole group: durable by the log when every write in it
    /// is logged (and the log takes them), else by a durable commit. Each write's
    /// caller is answered after it.
    fn commit(&mut self, group: Vec<Box<dyn Job>>, stats: &CommitStats) {
        let logged = self.wal.is_some() && group.iter().all(|j| j.logged());
        let txn = self.db.begin_write().map(|mut t| {
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
                return;
            }
        };
        let n = group.len() as u64;
        let epoch = if logged { Ok(0) } else { next_epoch(&txn) };
        let (finishers, records): (Vec<_>, Vec<_>) =
            group.into_iter().map(|job| job.apply(&txn)).unzip();
        let start = Instant::now();
        let mut committed = epoch.and_then(|epoch| {
            txn.commit()
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            Ok(epoch)
        });
        match (&mut self.wal, &committed) {
            (Some(w), Ok(_)) if logged => {
                let records: Vec<Vec<u8>> = records.into_iter().flatten().collect();
                // The log full or failing, the writes are made durable the slow way.
                if w.append(&records).is_err() {
                    committed = checkpoint(&self.db, w).map(|()| 0);
                    self.pending = None;
                } else {
                    self.pending.get_or_insert_with(Instant::now);
                }
            }
            (Some(w), Ok(epoch)) => {
                // Durable: the file holds all that was logged before. A log not
                // started over is of an older epoch, and read as empty.
                if let Err(e) = w.reset(*epoch) {
                    tracing::warn!(error = %e, "starting the store's log over");
                }
                self.pending = None;
            }
            _ => {}
        }
        stats
            .commit_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.writes.fetch_add(n, Ordering::Relaxed);
        stats.largest_group.fetch_max(n, Ordering::Relaxed);
        let committed = committed.map(|_| ());
        for finish in finishers {
            finish(&committed);
        }
    }
}
