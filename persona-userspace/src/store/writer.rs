//! Group commit: one thread owns the store's write transactions. Writes that arrive
//! while a commit is under way wait in a queue and all go into the next transaction,
//! committed (one fsync) together; each caller is answered only after the commit that
//! holds its write, so nothing acknowledged is ever lost. A group of logged writes
//! (shift records, signals) is made durable by the log instead ([`super::wal`]), and a
//! checkpoint now and then makes the file hold them.
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
    mpsc,
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
    /// `None` once dropped: the thread then ends, and with it its handle on the file.
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<CommitStats>,
}

impl Drop for Writer {
    /// Waits for the writes queued to be committed and the file to be let go, so that
    /// it can be opened again at once.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Writer {
    pub fn spawn(db: Arc<Database>, wal: Option<Wal>) -> Result<Self> {
        let (jobs, rx) = mpsc::channel::<Box<dyn Job>>();
        let stats = Arc::new(CommitStats::default());
        let counted = stats.clone();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || serve(&db, wal, &rx, &counted))
            .map_err(|e| StoreError::Backend(format!("starting the store's writer: {e}")))?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
            stats,
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
    /// on the channel returned once it is: no thread is kept waiting for it.
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
        )?;
        answer
            .recv()
            .map_err(|_| StoreError::Backend("the store's writer dropped a write".into()))?
    }

    fn queue<T: Send + 'static>(&self, op: Op<T>, logged: bool, reply: Reply<T>) -> Result<()> {
        self.jobs
            .as_ref()
            .ok_or_else(|| StoreError::Backend("the store is closed".into()))?
            .send(Box::new(Pending { op, logged, reply }))
            .map_err(|_| StoreError::Backend("the store's writer is gone".into()))
    }

    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }
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

fn serve(
    db: &Database,
    mut wal: Option<Wal>,
    rx: &mpsc::Receiver<Box<dyn Job>>,
    stats: &CommitStats,
) {
    // When the oldest logged write the file does not hold yet was committed.
    let mut pending: Option<std::time::Instant> = None;
    loop {
        let wait = pending.map_or(std::time::Duration::from_secs(3600), |p| {
            CHECKPOINT_AFTER.saturating_sub(p.elapsed())
        });
        let first = match rx.recv_timeout(wait) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(w) = wal.as_mut()
                    && pending.take().is_some()
                    && let Err(e) = checkpoint(db, w)
                {
                    tracing::error!(error = %e, "store checkpoint");
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let logged = wal.is_some() && group.iter().all(|j| j.logged());
        let txn = db.begin_write().map(|mut t| {
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
                continue;
            }
        };
        let n = group.len() as u64;
        let epoch = if logged { Ok(0) } else { next_epoch(&txn) };
        let (finishers, records): (Vec<_>, Vec<_>) =
            group.into_iter().map(|job| job.apply(&txn)).unzip();
        let start = std::time::Instant::now();
        let mut committed = epoch.and_then(|epoch| {
            txn.commit()
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            Ok(epoch)
        });
        match (&mut wal, &committed) {
            (Some(w), Ok(_)) if logged => {
                let records: Vec<Vec<u8>> = records.into_iter().flatten().collect();
                // The log full or failing, the writes are made durable the slow way.
                if w.append(&records).is_err() {
                    committed = checkpoint(db, w).map(|()| 0);
                    pending = None;
                } else {
                    pending.get_or_insert_with(std::time::Instant::now);
                }
            }
            (Some(w), Ok(epoch)) => {
                // Durable: the file holds all that was logged before. A log not
                // started over is of an older epoch, and read as empty.
                if let Err(e) = w.reset(*epoch) {
                    tracing::warn!(error = %e, "starting the store's log over");
                }
                pending = None;
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
        if let (Some(w), Some(p)) = (wal.as_mut(), pending)
            && (p.elapsed() >= CHECKPOINT_AFTER || w.used() > super::wal::CAPACITY / 2)
        {
            match checkpoint(db, w) {
                Ok(()) => pending = None,
                Err(e) => tracing::error!(error = %e, "store checkpoint"),
            }
        }
    }
    // Closing: the file holds everything, and the log is empty.
    if let (Some(w), Some(_)) = (wal.as_mut(), pending)
        && let Err(e) = checkpoint(db, w)
    {
        tracing::error!(error = %e, "store checkpoint at close");
    }
}
