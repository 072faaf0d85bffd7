//! A device's life on the host: attached when its interface is there, detached (every
//! trace of it) when the interface or the device goes, and left waiting, not failing,
//! while its interface is missing.
use std::{net::IpAddr, sync::Arc};

use serde_json::json;
use tracing::warn;

use super::{Orchestrator, ShiftError};
use crate::{
    datapath::DatapathError,
    model::{DeviceSpec, FieldError},
    store::{EventBody, Kind, StoreError},
};

impl Orchestrator {
    /// Attaches every stored device whose interface is there and gives it the persona
    /// the store says, after detaching what earlier runs left of interfaces that went.
    /// A device that fails is reported and does not hold up the others.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), ShiftError> {
        match self.prune().await {
            Ok(pruned) => {
                for ifindex in pruned {
                    warn!(
                        ifindex,
                        "detached what an earlier run left of a vanished interface"
                    );
                }
            }
            Err(e) => warn!(error = %e, "cleaning up after vanished interfaces"),
        }
        for d in self.store.list(Kind::Device)? {
            let _ = self.settle_reported(&d.name, "daemon:reconcile").await;
        }
        Ok(())
    }

    /// [`settle`](Self::settle), with a failure kept for status and metrics and
    /// recorded in the audit log; a success clears it.
    pub async fn settle_reported(
        self: &Arc<Self>,
        name: &str,
        actor: &str,
    ) -> Result<(), ShiftError> {
        let result = self.settle(name, actor).await;
        let failure = result.as_ref().err().map(|e| e.to_string());
        let changed = {
            let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
            match &failure {
                Some(why) => failing.insert(name.to_owned(), why.clone()).as_ref() != Some(why),
                None => failing.remove(name).is_some(),
            }
        };
        if let Some(why) = &failure {
            warn!(device = %name, error = %why, "device not settled");
        }
        if changed {
            self.record(EventBody {
                kind: "attach".into(),
                actor: actor.into(),
                device: Some(name.to_owned()),
                from: None,
                to: None,
                generation: None,
                result: if failure.is_some() { "failed" } else { "ok" }.into(),
                duration_us: None,
                detail: failure.map_or(serde_json::Value::Null, |why| json!({ "error": why })),
            })?;
        }
        result
    }

    /// Why the device could not be attached or given its persona, if it could not.
    pub fn failure(&self, name: &str) -> Option<String> {
        self.failing.lock().ok()?.get(name).cloned()
    }

    /// Attaches a stored device when its interface is there and runs the persona the
    /// store says (its starting persona on first sight), withdrawing what a shift cut
    /// short left wired. A device whose interface is missing waits for it.
    pub async fn settle(self: &Arc<Self>, name: &str, actor: &str) -> Result<(), ShiftError> {
        let ifindex = {
            // Read under the lock: a device deleted meanwhile is not attached again.
            let _guard = self.lock.write().await;
            let Some(record) = self.store.get(Kind::Device, name)? else {
                return Ok(());
            };
            let spec: DeviceSpec = super::parse(&record)?;
            if !self.runs_here(&spec) {
                return Ok(());
            }
            let Some(i) = self.attach_locked(&spec).await? else {
                return Ok(());
            };
            let carried = self.carried.lock().ok().and_then(|mut c| c.remove(name));
            if let Some(counts) = carried {
                self.datapath
                    .call(move |dp| dp.carry_counters(i, &counts))
                    .await
                    .map_err(|e| ShiftError::Failed(e.to_string()))?;
            }
            (i, spec)
        };
        let (ifindex, spec) = ifindex;
        let stray = self.repair(ifindex).await?;
        if !stray.is_empty() {
            warn!(device = %name, ?stray, "withdrew addresses a cut-short shift left wired");
        }
        let active = self
            .datapath
            .call(move |dp| dp.active(ifindex))
            .await
            .map_err(|e| ShiftError::Failed(e.to_string()))?;
        let current = match self.store.device_state(name)? {
            Some(s) => active.is_some_and(|a| a.generation == s.generation),
            None => spec.persona.is_none(),
        };
        if !current {
            self.restore(name, actor).await?;
        }
        Ok(())
    }

    /// Refuses a device on an interface that must not carry the programs (an uplink,
    /// anything but a tap or a veth).
    pub async fn admit(&self, spec: &DeviceSpec) -> Result<(), ShiftError> {
        let interface = spec.interface.clone();
        self.datapath
            .on_node(move |n| n.wiring.admit(&interface))
            .await
            .and_then(|r| r)
            .map_err(|e| match e {
                DatapathError::Refused(why) => FieldError::new("spec.interface", why).into(),
                e => ShiftError::Failed(e.to_string()),
            })
    }

    /// Attaches a stored device (idempotently) and returns its ifindex; `None` when its
    /// interface is not there (yet).
    pub async fn attach(&self, spec: &DeviceSpec) -> Result<Option<u32>, ShiftError> {
        let _guard = self.lock.write().await;
        self.attach_locked(spec).await
    }

    async fn attach_locked(&self, spec: &DeviceSpec) -> Result<Option<u32>, ShiftError> {
        let device = spec.clone();
        let ifindex = match self
            .datapath
            .on_node(move |n| n.attach(&device))
            .await
            .and_then(|r| r)
        {
            Ok(i) => i,
            Err(DatapathError::NoSuchInterface(_)) => return Ok(None),
            Err(DatapathError::Refused(why)) => {
                return Err(FieldError::new("spec.interface", why).into());
            }
            Err(e) => return Err(ShiftError::Failed(e.to_string())),
        };
        // The same name at another ifindex is a tap made again before its removal was
        // heard of: what is left at the old one goes now.
        let displaced: Vec<u32> = self
            .interfaces
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(i, n)| **n == spec.interface && **i != ifindex)
                    .map(|(i, _)| *i)
                    .collect()
            })
            .unwrap_or_default();
        for old in displaced {
            self.detach_at(old).await?;
        }
        self.attached_at(ifindex, &spec.interface);
        Ok(Some(ifindex))
    }

    /// Every ifindex the maps hold a device at.
    async fn attached(&self) -> Result<Vec<u32>, ShiftError> {
        self.datapath
            .call(|dp| dp.attached())
            .await
            .map_err(|e| ShiftError::Failed(e.to_string()))
    }

    /// Records that the device on `interface` is attached at `ifindex`.
    pub(super) fn attached_at(&self, ifindex: u32, interface: &str) {
        if let Ok(mut m) = self.interfaces.lock() {
            m.insert(ifindex, interface.to_owned());
        }
    }

    /// Detaches what the maps hold of interfaces that are gone, or that no stored
    /// device is on (left by a run that stopped before it could clean up): their
    /// programs, tables, routes, proxies and tunnels. Returns the ifindexes.
    pub async fn prune(&self) -> Result<Vec<u32>, ShiftError> {
        let mut wanted = std::collections::HashSet::new();
        for d in self.store.list(Kind::Device)? {
            if let Ok(spec) = serde_json::from_value::<DeviceSpec>(d.spec)
                && let Ok(i) = crate::datapath::ifindex(&spec.interface)
            {
                wanted.insert(i);
            }
        }
        let _guard = self.lock.write().await;
        let attached = self.attached().await?;
        let mut pruned = Vec::new();
        for ifindex in attached.into_iter().filter(|i| !wanted.contains(i)) {
            match self.detach_at(ifindex).await {
                Ok(()) => pruned.push(ifindex),
                Err(e) => warn!(ifindex, error = %e, "detaching a vanished interface's remains"),
            }
        }
        Ok(pruned)
    }

    /// A device taken off the host: detached, and its tap deleted when persona made it.
    pub async fn remove(&self, spec: &DeviceSpec) -> Result<(), ShiftError> {
        let _guard = self.lock.write().await;
        self.remove_locked(spec).await
    }

    /// [`Orchestrator::remove`] where the device runs; elsewhere in a fleet, its host
    /// takes it away when it sees it go.
    pub async fn remove_if_here(&self, spec: &DeviceSpec) -> Result<(), ShiftError> {
        if !self.runs_here(spec) {
            return Ok(());
        }
        self.remove(spec).await
    }

    /// Deletes a stored device and every trace of it. Nothing attaches it meanwhile: a
    /// settle that raced the delete finds it gone.
    pub async fn delete_device(
        &self,
        name: &str,
        expect: crate::store::Expect,
        body: EventBody,
    ) -> Result<(), ShiftError> {
        let _guard = self.lock.write().await;
        let Some(record) = self.store.get(Kind::Device, name)? else {
            return Err(StoreError::NotFound {
                kind: "Device",
                name: name.to_owned(),
            }
            .into());
        };
        let spec: DeviceSpec = super::parse(&record)?;
        // A device whose removal failed stays, to be deleted again: its record says
        // what is left.
        if self.runs_here(&spec) {
            self.remove_locked(&spec).await?;
        }
        self.store.forget_device_state(name)?;
        let (_, recorded) = self
            .store
            .delete_recorded(Kind::Device, name, expect, body)?;
        self.recorded(recorded);
        if let Ok(mut failing) = self.failing.lock() {
            failing.remove(name);
        }
        if let Ok(mut carried) = self.carried.lock() {
            carried.remove(name);
        }
        Ok(())
    }

    async fn remove_locked(&self, spec: &DeviceSpec) -> Result<(), ShiftError> {
        let Some(tap) = spec.tap.clone() else {
            return self.detach_locked(spec).await;
        };
        let name = spec.interface.clone();
        // The tap is opened first: one a running VM holds and that cannot be deleted
        // refuses the removal while the device is still guarded.
        let removal = self
            .datapath
            .on_node(move |n| n.wiring.open_tap(&name, &tap))
            .await
            .and_then(|r| r)
            .map_err(|e| match e {
                DatapathError::Refused(why) => ShiftError::Busy(why),
                e => ShiftError::Failed(e.to_string()),
            })?;
        self.detach_locked(spec).await?;
        self.datapath
            .on_node(move |n| n.wiring.remove_tap(removal))
            .await
            .and_then(|r| r)
            .map_err(|e| ShiftError::Failed(e.to_string()))
    }

    /// Detaches the device from the ifindex it was attached at, whether or not its
    /// interface is still there.
    pub async fn detach(&self, spec: &DeviceSpec) -> Result<(), ShiftError> {
        let _guard = self.lock.write().await;
        self.detach_locked(spec).await
    }

    async fn detach_locked(&self, spec: &DeviceSpec) -> Result<(), ShiftError> {
        let ifindex = match self.interface_of(&spec.interface) {
            Some(i) => i,
            None => match crate::datapath::ifindex(&spec.interface) {
                Ok(i) => i,
                // Gone, and its wiring with it when it went.
                Err(_) => return Ok(()),
            },
        };
        self.detach_at(ifindex).await
    }

    /// Detaches whatever is at `ifindex` (nothing is success); the caller holds the
    /// lock.
    async fn detach_at(&self, ifindex: u32) -> Result<(), ShiftError> {
        match self
            .datapath
            .on_node(move |n| n.detach(ifindex))
            .await
            .and_then(|r| r)
        {
            Ok(()) | Err(DatapathError::NotAttached(_)) => {}
            Err(e) => return Err(ShiftError::Failed(e.to_string())),
        }
        if let Ok(mut m) = self.interfaces.lock() {
            m.remove(&ifindex);
        }
        Ok(())
    }

    /// The stored device on `interface`, if any.
    pub fn device_on(&self, interface: &str) -> Result<Option<String>, ShiftError> {
        Ok(self
            .devices()?
            .into_iter()
            .find_map(|(name, spec)| (spec.interface == interface).then_some(name)))
    }

    /// A tap named unlike any device's interface whose MAC says it is a device's VM
    /// (libvirt names its taps vnetN, a new one each start): the device follows it, its
    /// stored interface renamed, when its old one is gone. Returns the device.
    pub fn follow_mac(&self, interface: &str, mac: [u8; 6]) -> Result<Option<String>, ShiftError> {
        for d in self.store.list(Kind::Device)? {
            let Ok(mut spec) = serde_json::from_value::<DeviceSpec>(d.spec.clone()) else {
                continue;
            };
            if spec.libvirt_tap_mac() != Some(mac)
                || spec.interface == interface
                || crate::datapath::ifindex(&spec.interface).is_ok()
            {
                continue;
            }
            let from = std::mem::replace(&mut spec.interface, interface.to_owned());
            let value =
                serde_json::to_value(&spec).map_err(|e| ShiftError::Failed(e.to_string()))?;
            self.store.put(
                Kind::Device,
                &d.name,
                value,
                crate::store::Expect::Version(d.version),
            )?;
            self.record(EventBody {
                kind: "interface".into(),
                actor: "daemon:links".into(),
                device: Some(d.name.clone()),
                from: Some(from.clone()),
                to: Some(interface.to_owned()),
                generation: None,
                result: "moved".into(),
                duration_us: None,
                detail: json!({ "from": from, "to": interface, "why": "the tap's MAC is the VM's" }),
            })?;
            return Ok(Some(d.name));
        }
        Ok(None)
    }

    /// The ifindex the device on `interface` is attached at, if it is.
    pub fn interface_of(&self, interface: &str) -> Option<u32> {
        let m = self.interfaces.lock().ok()?;
        m.iter().find(|(_, n)| **n == interface).map(|(i, _)| *i)
    }

    /// The device attached at `ifindex` on this host.
    pub fn device_at(&self, ifindex: u32) -> Option<(String, Arc<DeviceSpec>)> {
        let interface = self.interfaces.lock().ok()?.get(&ifindex)?.clone();
        self.devices()
            .ok()?
            .into_iter()
            .find(|(_, d)| d.interface == interface && self.runs_here(d))
    }

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.interfaces
            .lock()
            .is_ok_and(|m| m.contains_key(&ifindex))
    }

    /// A device's interface went away (its VM stopped): the wiring of its old ifindex
    /// goes, programs, maps and host alike; the device and its state stay stored, to be
    /// attached again when the interface comes back. Returns the device's name.
    pub async fn interface_gone(&self, ifindex: u32) -> Result<Option<String>, ShiftError> {
        let Some(interface) = self
            .interfaces
            .lock()
            .ok()
            .and_then(|m| m.get(&ifindex).cloned())
        else {
            // Attached by no device this process knows of (an earlier run's): cleaned
            // up all the same.
            let _guard = self.lock.write().await;
            if self.attached().await?.contains(&ifindex) {
                self.detach_at(ifindex).await?;
            }
            return Ok(None);
        };
        let device = self.device_on(&interface)?;
        {
            let _guard = self.lock.write().await;
            // Its counts go with the device, to go on under the ifindex it comes back at.
            let counts = self
                .datapath
                .call(move |dp| dp.persona_counters(ifindex))
                .await
                .map_err(|e| ShiftError::Failed(e.to_string()))?;
            if let (Some(d), Ok(mut carried)) = (&device, self.carried.lock()) {
                carried.insert(d.clone(), counts);
            }
            self.detach_at(ifindex).await?;
        }
        self.record(EventBody {
            kind: "interface".into(),
            actor: "daemon:links".into(),
            device: device.clone(),
            from: None,
            to: None,
            generation: None,
            result: "gone".into(),
            duration_us: None,
            detail: json!({ "interface": interface, "ifindex": ifindex }),
        })?;
        Ok(device)
    }

    /// Withdraws what the host routes to the device beyond what its state calls for
    /// (left by a shift a crash cut short); returns those addresses.
    pub async fn repair(&self, ifindex: u32) -> Result<Vec<IpAddr>, ShiftError> {
        let _guard = self.lock.write().await;
        self.datapath
            .on_node(move |n| n.repair(ifindex))
            .await
            .and_then(|r| r)
            .map_err(|e| ShiftError::Failed(e.to_string()))
    }
}

/// A device arriving by live migration, before it is this host's.
impl Orchestrator {
    /// Attaches the device on `interface` here and gives it the persona it runs on its
    /// host now, with the same leases, its addresses routed to it but not announced
    /// (gated): its host answers for them until the VM runs here. Nothing is stored.
    /// Returns the ifindex.
    pub async fn take_in(&self, name: &str, interface: &str) -> Result<u32, ShiftError> {
        let mut spec = (*self
            .device(name)?
            .ok_or_else(|| super::not_found("Device", name))?)
        .clone();
        spec.interface = interface.to_owned();
        let state = self.store.device_state(name)?;
        let persona = state
            .as_ref()
            .map(|s| s.persona.clone())
            .or_else(|| spec.persona.clone());
        let ifindex = {
            let _guard = self.lock.write().await;
            self.attach_locked(&spec).await?.ok_or_else(|| {
                ShiftError::Invalid(FieldError::new(
                    "interface",
                    format!("there is no interface {interface:?} on this host"),
                ))
            })?
        };
        let given = async {
            self.gate(ifindex, true).await?;
            let Some(persona) = persona else {
                return Ok(());
            };
            let entry = self.catalog.persona(&*self.store, &persona)?;
            let leases = state
                .filter(|s| s.persona == persona)
                .map(|s| s.leases)
                .unwrap_or_default();
            let (_, compiled) = entry.leased(&leases)?;
            let (applied, _) = self
                .apply(
                    &spec,
                    compiled,
                    None,
                    crate::model::FlowMode::default(),
                    None,
                )
                .await
                .map_err(|f| ShiftError::Failed(f.to_string()))?;
            self.datapath
                .on_node(move |n| n.commit(applied))
                .await
                .and_then(|r| r)
                .map(|_| ())
                .map_err(|e| ShiftError::Failed(e.to_string()))
        };
        match given.await {
            Ok(()) => Ok(ifindex),
            // Not left attached and gated here: the caller only hears of the failure.
            Err(e) => {
                if let Err(undo) = self.let_go(ifindex).await {
                    warn!(device = name, error = %undo, "letting go of a device not taken in");
                }
                Err(e)
            }
        }
    }

    /// Announces (or stops announcing) a taken-in device's addresses on the uplinks.
    pub async fn gate(&self, ifindex: u32, gated: bool) -> Result<(), ShiftError> {
        self.datapath
            .on_node(move |n| n.wiring.gate(ifindex, gated))
            .await
            .and_then(|r| r)
            .map_err(|e| ShiftError::Failed(e.to_string()))
    }

    /// Lets a taken-in device go when its migration fails: detached, nothing announced.
    pub async fn let_go(&self, ifindex: u32) -> Result<(), ShiftError> {
        let _guard = self.lock.write().await;
        self.detach_at(ifindex).await?;
        self.gate(ifindex, false).await
    }
}
