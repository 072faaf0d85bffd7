//! Live migration of a device from its host to another (`persona migrate`). The marker
//! `migrating/<device>` says one is under way; asking writes it (with a `migrate` audit
//! record, in one transaction), and only if none is. The target host then:
//! 1. takes the device in on its own interface with the persona it runs, gated: its
//!    addresses routed to it but not announced, because the source answers for them
//!    until the VM runs here;
//! 2. waits for the VM's first frame on that interface (or an explicit cut-over);
//! 3. moves ownership, the device's `host` and `interface`, in one conditional write;
//! 4. announces the addresses, telling the neighbours at once.
//!
//! The source takes its own copy away only once it sees that write, as for any device
//! moved off it. The outside sees the persona's addresses throughout, answered by
//! one host at a time, and never the inner address: both hosts translate.
use std::{sync::Arc, time::Duration};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Fleet, new_id, store_error};
use crate::{
    model::DeviceSpec,
    orchestrator::{Orchestrator, ShiftError},
    store::{EventBody, Expect, Kind, Store as _, StoreError},
};

/// How often the target looks for the VM's first frame.
const POLL: Duration = Duration::from_millis(2);
/// A migration whose VM never shows up on the target is given up after this long.
pub const ARRIVE_WITHIN: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Cutover {
    /// When the VM's first frame reaches the target's interface.
    FirstFrame,
    /// When asked (`persona migrate DEVICE --cutover`).
    Manual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Asked,
    /// The target runs the persona, gated, and waits for the VM.
    Ready,
    /// A manual cut-over was asked for.
    CutOver,
    /// Asked to be called off: the target lets the device go.
    Cancel,
    Done,
    Failed,
    /// Called off before the cut-over: the device stays where it ran.
    Cancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Migration {
    pub id: String,
    pub device: String,
    pub from: String,
    pub to: String,
    pub interface: String,
    pub cutover: Cutover,
    pub phase: Phase,
    pub actor: String,
    pub asked: Timestamp,
    /// The device's version when asked: ownership moves only if it is unchanged.
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From the target being ready to the cut-over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
    /// Who asked for it to be called off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_by: Option<String>,
}

/// How a migration ended.
enum Outcome {
    Done,
    Failed(String),
    Cancelled,
}

fn marker(device: &str) -> String {
    format!("migrating/{device}")
}

fn last(device: &str) -> String {
    format!("migrations/{device}")
}

fn busy(device: &str, m: &Migration) -> ShiftError {
    ShiftError::Busy(format!(
        "device {device:?} is migrating to {:?} already ({:?})",
        m.to, m.phase
    ))
}

impl Fleet {
    /// The migration under way for the device, or else the last one.
    pub fn migration(&self, device: &str) -> Result<Option<Migration>, ShiftError> {
        match self.under_way(device)? {
            Some(m) => Ok(Some(m)),
            None => self.read_migration(&last(device)),
        }
    }

    /// The migration under way for the device, if any.
    fn under_way(&self, device: &str) -> Result<Option<Migration>, ShiftError> {
        self.read_migration(&marker(device))
    }

    fn read_migration(&self, key: &str) -> Result<Option<Migration>, ShiftError> {
        self.store
            .read_json(key)
            .map_err(store_error)?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| ShiftError::Failed(format!("a migration in the store: {e}")))
    }

    /// Asks for the device to move to `to`, onto its `interface` there (the same name
    /// when not given).
    pub fn migrate(
        &self,
        (device, spec, version): (&str, &DeviceSpec, u64),
        to: &str,
        interface: Option<&str>,
        cutover: Cutover,
        actor: &str,
    ) -> Result<Migration, ShiftError> {
        let invalid = |field: &str, why: String| {
            ShiftError::Invalid(crate::model::FieldError::new(field, why))
        };
        let Some(from) = spec.host.clone() else {
            return Err(invalid(
                "spec.host",
                format!("device {device:?} names no host to move from"),
            ));
        };
        if from == to {
            return Err(invalid(
                "to",
                format!("device {device:?} runs on {to:?} already"),
            ));
        }
        if let Some(now) = self.under_way(device)? {
            return Err(self.taken(device, &now)?);
        }
        if !self.is_alive(to).map_err(store_error)? {
            return Err(ShiftError::Remote {
                status: 503,
                message: format!("host {to:?} is not alive: it cannot take device {device:?}"),
            });
        }
        let m = Migration {
            id: new_id()?,
            device: device.to_owned(),
            from: from.clone(),
            to: to.to_owned(),
            interface: interface.unwrap_or(&spec.interface).to_owned(),
            cutover,
            phase: Phase::Asked,
            actor: actor.to_owned(),
            asked: Timestamp::now(),
            version,
            error: None,
            waited_ms: None,
            cancelled_by: None,
        };
        let event = self
            .store
            .record_marked(
                &marker(device),
                Some(&describe(&m)),
                event(&m, "migrate", "asked".into()),
            )
            .map_err(store_error)?;
        match event {
            Some(_) => Ok(m),
            None => Err(match self.under_way(device)? {
                Some(now) => self.taken(device, &now)?,
                None => ShiftError::Busy(format!("device {device:?} is migrating already")),
            }),
        }
    }

    /// Why the device cannot be asked to migrate while `now` is under way.
    fn taken(&self, device: &str, now: &Migration) -> Result<ShiftError, ShiftError> {
        Ok(match self.is_alive(&now.to).map_err(store_error)? {
            true => busy(device, now),
            false => ShiftError::Busy(format!(
                "device {device:?} is migrating to {:?}, which is not alive: call it off with `persona migrate {device} --cancel`",
                now.to
            )),
        })
    }

    /// Asks the target of the device's manual migration to cut over now.
    pub fn cut_over(&self, device: &str) -> Result<Migration, ShiftError> {
        let m = self
            .under_way(device)?
            .ok_or_else(|| not_under_way(device))?;
        if m.phase != Phase::Ready {
            return Err(busy(device, &m));
        }
        let mut next = m.clone();
        next.phase = Phase::CutOver;
        self.swap_marker(&m, &next)?;
        Ok(next)
    }

    /// Calls the device's migration off before its cut-over. The target lets the device
    /// go; a target that is not alive will not, so the migration ends here, whatever
    /// was last asked of it.
    pub fn cancel(&self, device: &str, actor: &str) -> Result<Migration, ShiftError> {
        let m = self
            .under_way(device)?
            .ok_or_else(|| not_under_way(device))?;
        let mut next = m.clone();
        next.cancelled_by = Some(actor.to_owned());
        if !self.is_alive(&m.to).map_err(store_error)? {
            next.error = Some(format!("host {:?} was not alive", m.to));
            self.end(&mut next, Outcome::Cancelled)?;
            return Ok(next);
        }
        if !matches!(m.phase, Phase::Asked | Phase::Ready) {
            return Err(busy(device, &m));
        }
        next.phase = Phase::Cancel;
        self.swap_marker(&m, &next)?;
        Ok(next)
    }

    /// `next` in place of `now`, only if the marker still is `now`: a cancel, a
    /// cut-over and the target's own progress never overwrite one another.
    fn swap_marker(&self, now: &Migration, next: &Migration) -> Result<(), ShiftError> {
        let swapped = self
            .store
            .replace_json(&marker(&now.device), &describe(now), &describe(next))
            .map_err(store_error)?;
        if swapped {
            return Ok(());
        }
        Err(match self.under_way(&now.device)? {
            Some(changed) => busy(&now.device, &changed),
            None => not_under_way(&now.device),
        })
    }

    /// After `migrating/<device>` changed: carried out here when this host is its target.
    pub(super) fn follow_migration(
        self: &Arc<Self>,
        orchestrator: &Arc<Orchestrator>,
        device: &str,
    ) {
        let Ok(Some(m)) = self.under_way(device) else {
            return;
        };
        // Not only one just asked: a target restarted part-way takes its migration up
        // again (taking the device in again changes nothing).
        if m.to != self.host
            || matches!(m.phase, Phase::Done | Phase::Failed | Phase::Cancelled)
            || !self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(m.id.clone())
        {
            return;
        }
        let (me, o) = (self.clone(), orchestrator.clone());
        tokio::spawn(async move {
            let id = m.id.clone();
            if m.phase == Phase::Cancel {
                // Called off while this host was not running it: nothing was taken in.
                me.finish(m, Outcome::Cancelled).await;
            } else {
                me.carry_out(&o, m).await;
            }
            me.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }

    async fn carry_out(self: &Arc<Self>, o: &Arc<Orchestrator>, mut m: Migration) {
        let device = m.device.clone();
        let ifindex = match o.take_in(&device, &m.interface).await {
            Ok(i) => i,
            Err(e) => {
                return self
                    .finish(m, Outcome::Failed(format!("taking the device in: {e}")))
                    .await;
            }
        };
        if m.phase == Phase::Asked {
            let asked = m.clone();
            m.phase = Phase::Ready;
            // Not over a cancel that came meanwhile: the wait below sees it.
            if let Err(e) = self.swap_marker(&asked, &m) {
                tracing::info!(device, error = %e, "the migration changed before its target was ready");
            }
        }
        let ready = std::time::Instant::now();
        let arrived = self.arrival(&m, ifindex).await;
        m.waited_ms = Some(ready.elapsed().as_millis() as u64);
        let outcome = match arrived {
            Ok(seen) => match self.take_ownership(&m, &seen).await {
                Ok(()) => match o.gate(ifindex, false).await {
                    Ok(()) => Outcome::Done,
                    Err(e) => Outcome::Failed(e.to_string()),
                },
                Err(e) => Outcome::Failed(e),
            },
            Err(ended) => ended,
        };
        if !matches!(outcome, Outcome::Done)
            && let Err(e) = o.let_go(ifindex).await
        {
            tracing::warn!(device, error = %e, "letting go of a device whose migration ended");
        }
        self.finish(m, outcome).await;
    }

    /// Waits for the VM's first frame on the interface, or the cut-over asked for;
    /// a migration called off, or one whose marker is gone, ends the wait.
    async fn arrival(&self, m: &Migration, ifindex: u32) -> Result<Migration, Outcome> {
        let frames = |i| crate::datapath::received_frames(i).unwrap_or(0);
        let before = frames(ifindex);
        let deadline = std::time::Instant::now() + ARRIVE_WITHIN;
        loop {
            let now = match self.under_way(&m.device) {
                Ok(Some(now)) if now.id == m.id => now,
                Ok(_) => return Err(Outcome::Failed("its record is gone".into())),
                Err(_) => m.clone(),
            };
            if now.phase == Phase::Cancel {
                return Err(Outcome::Cancelled);
            }
            let arrived = match m.cutover {
                Cutover::FirstFrame => frames(ifindex) > before,
                Cutover::Manual => now.phase == Phase::CutOver,
            };
            if arrived {
                return Ok(now);
            }
            if std::time::Instant::now() > deadline {
                return Err(Outcome::Failed(format!(
                    "the VM did not arrive within {} s",
                    ARRIVE_WITHIN.as_secs()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The device's `host` and `interface` set to this host's, if the device is as it
    /// was when the migration was asked for and the migration's marker is still as last
    /// `seen` (not called off meanwhile).
    async fn take_ownership(&self, m: &Migration, seen: &Migration) -> Result<(), String> {
        let record = self
            .store
            .get(Kind::Device, &m.device)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the device was deleted".to_owned())?;
        let mut spec = record.spec.clone();
        spec["host"] = json!(m.to);
        spec["interface"] = json!(m.interface);
        let (store, name, version) = (self.store.clone(), m.device.clone(), m.version);
        let seen = describe(seen);
        // The state this host runs the device on, recorded as its own first: the source
        // forgets its record once it sees the device gone.
        tokio::task::spawn_blocking(move || {
            let state = store.device_state(&name)?;
            store.set_device_state(&name, state.as_ref())?;
            let moved = store.put_while(
                (Kind::Device, &name),
                spec,
                Expect::Version(version),
                (&marker(&name), &seen),
            );
            if moved.is_err() {
                store.set_device_state(&name, None)?;
            }
            moved
        })
        .await
        .map_err(|e| e.to_string())?
        .map(|_| ())
        .map_err(|e| match e {
            StoreError::Conflict { kind: "Key", .. } => {
                "called off or changed before the cut-over".to_owned()
            }
            e => format!("moving ownership: {e}"),
        })
    }

    async fn finish(self: &Arc<Self>, mut m: Migration, outcome: Outcome) {
        if let Some(by) = self
            .under_way(&m.device)
            .ok()
            .flatten()
            .and_then(|now| now.cancelled_by)
        {
            m.cancelled_by = Some(by);
        }
        let me = self.clone();
        let written = tokio::task::spawn_blocking(move || me.end(&mut m, outcome)).await;
        if let Ok(Err(e)) | Err(e) = written.map_err(|e| ShiftError::Failed(e.to_string())) {
            tracing::warn!(error = %e, "recording a migration's outcome");
        }
    }

    /// Keeps the outcome as the device's last migration and clears the marker, with
    /// its audit record in the same transaction.
    fn end(&self, m: &mut Migration, outcome: Outcome) -> Result<(), ShiftError> {
        let (kind, result) = match outcome {
            Outcome::Done => {
                m.phase = Phase::Done;
                ("migrated", "ok".to_owned())
            }
            Outcome::Failed(e) => {
                m.phase = Phase::Failed;
                let result = format!("failed: {e}");
                m.error = Some(e);
                ("migrate", result)
            }
            Outcome::Cancelled => {
                m.phase = Phase::Cancelled;
                ("migrate", "cancelled".to_owned())
            }
        };
        tracing::info!(device = m.device, to = m.to, result, "migration");
        self.store
            .write_json(&last(&m.device), Some(&describe(m)))
            .map_err(store_error)?;
        self.store
            .record_marked(&marker(&m.device), None, event(m, kind, result))
            .map_err(store_error)?;
        Ok(())
    }
}

fn not_under_way(device: &str) -> ShiftError {
    ShiftError::Store(StoreError::NotFound {
        kind: "Migration",
        name: device.to_owned(),
    })
}

fn event(m: &Migration, kind: &str, result: String) -> EventBody {
    EventBody {
        kind: kind.into(),
        actor: m.actor.clone(),
        device: Some(m.device.clone()),
        from: None,
        to: None,
        generation: None,
        result,
        duration_us: None,
        detail: json!({
            "id": m.id, "from": m.from, "to": m.to, "interface": m.interface,
            "cutover": m.cutover, "waited_ms": m.waited_ms, "cancelled_by": m.cancelled_by,
        }),
    }
}

pub fn describe(m: &Migration) -> Value {
    serde_json::to_value(m).expect("a migration serialises")
}
