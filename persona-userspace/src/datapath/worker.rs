//! One thread owns the node (the datapath and the host wiring); async code sends it
//! jobs. The host drives netlink through a runtime of its own and must not be called
//! from inside another, and a single owner also serialises shifts.
use std::{panic::AssertUnwindSafe, sync::mpsc, thread, time::Duration};

use tokio::sync::oneshot;

use super::{Datapath, DatapathError, Result};
use crate::{model::AddressScope, node::Node};

type Job = Box<dyn FnOnce(&mut Node) + Send>;

/// How often housekeeping looks for finished grace periods while no job comes.
const IDLE_TICK: Duration = Duration::from_millis(50);

/// Runs jobs as they come; when none waits, tidies up.
fn serve(node: &mut Node, rx: &mpsc::Receiver<Job>) {
    loop {
        let job = match rx.try_recv() {
            Ok(job) => job,
            Err(mpsc::TryRecvError::Disconnected) => return,
            Err(mpsc::TryRecvError::Empty) => {
                if let Err(e) = node.datapath.tidy() {
                    tracing::warn!(error = %e, "freeing replaced tables");
                }
                match rx.recv_timeout(IDLE_TICK) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        };
        // A job that panics fails alone: its caller's answer is dropped, and the node
        // serves the next job, where a dead thread would fail every call after it.
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| job(node))) {
            tracing::error!(
                panic = panic_message(panic.as_ref()),
                "a datapath job panicked; the datapath serves on"
            );
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

#[derive(Clone)]
pub struct DatapathHandle {
    jobs: mpsc::Sender<Job>,
    held: Option<super::HeldView>,
}

impl DatapathHandle {
    /// Starts the worker; `open` runs on it and builds the node there.
    pub fn spawn<F>(open: F) -> Result<Self>
    where
        F: FnOnce() -> Result<Node> + Send + 'static,
    {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        thread::Builder::new()
            .name("datapath".into())
            .spawn(move || match open() {
                Ok(mut node) => {
                    let _ = ready_tx.send(Ok(node.datapath.held_view()));
                    serve(&mut node, &rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|source| DatapathError::Io {
                context: "starting the datapath thread".into(),
                source,
            })?;
        let held = ready_rx
            .recv()
            .map_err(|_| DatapathError::Bpf("the datapath thread died while opening".into()))??;
        Ok(Self { jobs, held })
    }

    /// Runs `f` on the datapath alone.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Datapath) -> Result<T> + Send + 'static,
    {
        self.on_node(move |node| f(node.datapath.as_mut())).await?
    }

    /// Every attached device but `except` holding an address in `scope`, with those
    /// addresses: read where the datapath shares them, else asked of its thread.
    pub async fn held_addresses(
        &self,
        except: Option<u32>,
        scope: &AddressScope,
    ) -> Result<Vec<super::HeldAddresses>> {
        match &self.held {
            Some(view) => Ok(view(except, scope)),
            None => {
                let scope = scope.clone();
                self.call(move |dp| dp.held_addresses(except, &scope)).await
            }
        }
    }

    /// Runs `f` on the whole node, as one job: nothing else runs in between.
    pub async fn on_node<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Node) -> T + Send + 'static,
    {
        self.queue_on_node(f)?.await
    }

    /// Queues `f` now, ahead of any job sent after this returns; its result comes
    /// from the future returned.
    pub fn queue_on_node<T, F>(&self, f: F) -> Result<impl Future<Output = Result<T>> + use<T, F>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Node) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |node| {
                let _ = tx.send(f(node));
            }))
            .map_err(|_| DatapathError::Bpf("the datapath thread is gone".into()))?;
        Ok(async move {
            rx.await
                .map_err(|_| DatapathError::Bpf("the datapath thread dropped a job".into()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{datapath::fake::FakeDatapath, host::fake::FakeWiring};

    #[tokio::test]
    async fn a_job_that_panics_fails_alone() {
        let datapath = DatapathHandle::spawn(|| {
            Ok(Node::new(
                Box::new(FakeDatapath::default()),
                Box::new(FakeWiring::default()),
            ))
        })
        .unwrap();
        let failed = datapath
            .on_node(|_| -> u32 { panic!("a bug in a job") })
            .await;
        assert!(
            matches!(&failed, Err(e) if e.to_string().contains("dropped a job")),
            "{failed:?}"
        );
        assert_eq!(datapath.on_node(|_| 7).await.unwrap(), 7);
    }
}
