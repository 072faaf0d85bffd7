//! Group commit: one thread owns the store's write transactions. Writes that arrive
//! while a commit is under way wait in a queue and all go into the next transaction,
//! committed (one fsync) together; each caller is answered only after the commit that
//! holds its write, so nothing acknowledged is ever lost.
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
    mpsc,
};

use redb::{Database, WriteTransaction};

use super::{Result, StoreError};

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
    /// Does the write inside `txn`.
    fn apply(self: Box<Self>, txn: &WriteTransaction) -> Finish;
    fn abort(self: Box<Self>, why: &StoreError);
}

type Op<T> = Box<dyn FnOnce(&WriteTransaction) -> Result<(T, Option<After>)> + Send>;

type Reply<T> = Box<dyn FnOnce(Result<T>) + Send>;

struct Pending<T> {
    op: Op<T>,
    reply: Reply<T>,
}

impl<T: Send + 'static> Job for Pending<T> {
    fn apply(self: Box<Self>, txn: &WriteTransaction) -> Finish {
        // A write that fails changes nothing: each checks before it inserts.
        let done = (self.op)(txn);
        let reply = self.reply;
        Box::new(move |committed| {
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
        })
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
    pub fn spawn(db: Arc<Database>) -> Result<Self> {
        let (jobs, rx) = mpsc::channel::<Box<dyn Job>>();
        let stats = Arc::new(CommitStats::default());
        let counted = stats.clone();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || serve(&db, &rx, &counted))
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
        let (reply, answer) = mpsc::sync_channel(1);
        self.queue(
            Box::new(op),
            Box::new(move |r| {
                let _ = reply.send(r);
            }),
        )?;
        answer
            .recv()
            .map_err(|_| StoreError::Backend("the store's writer dropped a write".into()))?
    }

    /// [`Writer::write`] for an async caller: the answer comes on the channel returned,
    /// once committed, and no thread is kept waiting for it.
    pub fn submit<T: Send + 'static>(
        &self,
        op: impl FnOnce(&WriteTransaction) -> Result<(T, Option<After>)> + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<Result<T>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        // Not queued (the store closed), the reply goes unsent and the caller hears
        // that the channel closed.
        let _ = self.queue(
            Box::new(op),
            Box::new(move |r| {
                let _ = reply.send(r);
            }),
        );
        answer
    }

    fn queue<T: Send + 'static>(&self, op: Op<T>, reply: Reply<T>) -> Result<()> {
        self.jobs
            .as_ref()
            .ok_or_else(|| StoreError::Backend("the store is closed".into()))?
            .send(Box::new(Pending { op, reply }))
            .map_err(|_| StoreError::Backend("the store's writer is gone".into()))
    }

    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }
}

fn serve(db: &Database, rx: &mpsc::Receiver<Box<dyn Job>>, stats: &CommitStats) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let txn = match db.begin_write() {
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
        let finishers: Vec<_> = group.into_iter().map(|job| job.apply(&txn)).collect();
        let start = std::time::Instant::now();
        let committed = txn.commit().map_err(|e| StoreError::Backend(e.to_string()));
        stats
            .commit_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.writes.fetch_add(n, Ordering::Relaxed);
        stats.largest_group.fetch_max(n, Ordering::Relaxed);
        for finish in finishers {
            finish(&committed);
        }
    }
}
