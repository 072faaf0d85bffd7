//! The datapath and the host wiring of one hypervisor, driven together: device
//! lifecycle, and a shift as a transaction whose steps each have their undo. A failure
//! at any step undoes the steps before it, so the device is left exactly on its
//! previous persona with nothing of the new one behind.
use std::net::IpAddr;

use serde::Serialize;

use crate::{
    datapath::{
        Committed, CompiledPersona, Datapath, DatapathError, Flipped, Result, Staged, Sweep,
    },
    host::Wiring,
    model::{DeviceSpec, FlowMode},
};

/// The steps of a shift, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Step {
    /// The device configured and its programs attached (a no-op when they are).
    Attach,
    /// The persona's tables written into a free slot, invisible to packets.
    Stage,
    /// The device's counters for the persona.
    Counters,
    /// Routes, neighbour proxies and policy rules for the new addresses.
    HostRoutes,
    /// The VPN tunnel of each address that has one.
    Tunnel,
    /// The one map update after which every packet sees the new persona.
    Flip,
    /// The device's certificate and key.
    Tls,
    /// The device's new state in the store.
    Store,
}

impl Step {
    pub fn label(self) -> &'static str {
        match self {
            Step::Attach => "attach",
            Step::Stage => "stage",
            Step::Counters => "counters",
            Step::HostRoutes => "host_routes",
            Step::Tunnel => "tunnel",
            Step::Flip => "flip",
            Step::Tls => "tls",
            Step::Store => "store",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{step}: {reason}")]
pub struct StepFailed {
    pub step: Step,
    pub reason: String,
}

impl StepFailed {
    pub fn new(step: Step, reason: impl std::fmt::Display) -> Self {
        Self {
            step,
            reason: reason.to_string(),
        }
    }
}

/// What a shift has done so far: enough to undo it, or to commit it.
#[derive(Debug)]
#[must_use = "an applied shift is undone or committed"]
pub struct Applied {
    pub ifindex: u32,
    staged: Option<Staged>,
    /// The persona whose counters this shift created.
    counters: Option<u32>,
    /// Addresses this shift wired that were not wired before.
    announced: Vec<IpAddr>,
    /// Addresses it wired again that the previous persona had, with how the previous
    /// persona wired them (its gateway, its tunnel).
    rewired: Option<(Vec<IpAddr>, Vec<IpAddr>, CompiledPersona)>,
    tunnels: Vec<IpAddr>,
    flipped: Option<Flipped>,
}

impl Applied {
    pub fn flipped(&self) -> Option<&Flipped> {
        self.flipped.as_ref()
    }

    /// The generation it flipped to and how long the flip took: 0 and no time when
    /// nothing flipped.
    pub fn flip_outcome(&self) -> (u64, std::time::Duration) {
        self.flipped
            .as_ref()
            .map_or((0, Default::default()), |f| (f.generation, f.flip))
    }
}

pub struct Node {
    pub datapath: Box<dyn Datapath>,
    pub wiring: Box<dyn Wiring>,
    names: crate::datapath::Names,
}

/// The wiring of a datapath that never leaves the maps (tests, maintenance commands).
pub struct NoWiring;

impl Wiring for NoWiring {
    fn prepare_device(&self, _: u32, _: &DeviceSpec) -> Result<()> {
        Ok(())
    }
    fn release_device(&self, _: u32, _: &[IpAddr]) -> Result<()> {
        Ok(())
    }
    fn announce(&self, _: u32, _: &[IpAddr], _: &[IpAddr], _: &CompiledPersona) -> Result<()> {
        Ok(())
    }
    fn withdraw(&self, _: u32, _: &[IpAddr]) -> Result<()> {
        Ok(())
    }
    fn tunnel(&self, _: &[IpAddr], _: &CompiledPersona) -> Result<Vec<IpAddr>> {
        Ok(Vec::new())
    }
    fn untunnel(&self, _: &[IpAddr]) -> Result<()> {
        Ok(())
    }
    fn routed(&self, _: u32) -> Result<Vec<IpAddr>> {
        Ok(Vec::new())
    }
}

impl Node {
    pub fn new(datapath: Box<dyn Datapath>, wiring: Box<dyn Wiring>) -> Self {
        Self {
            datapath,
            wiring,
            names: Default::default(),
        }
    }

    /// The device's ifindex: `known` when the device is attached there and its interface
    /// still has it (a shift's usual case: nothing to write), else attached now.
    pub fn ensure_attached(&mut self, device: &DeviceSpec, known: Option<u32>) -> Result<u32> {
        if let Some(i) = known
            && self.names.index(&device.interface) == Some(i)
            && self.datapath.is_attached(i)?
        {
            return Ok(i);
        }
        self.attach(device)
    }

    /// Attaches the device (idempotently) and lets the VM find its gateway.
    pub fn attach(&mut self, device: &DeviceSpec) -> Result<u32> {
        if let Some(tap) = &device.tap {
            self.wiring.make_tap(&device.interface, tap)?;
        }
        self.wiring.admit(&device.interface)?;
        let before = crate::datapath::ifindex(&device.interface)
            .ok()
            .filter(|&i| self.datapath.is_attached(i).unwrap_or(false))
            .and_then(|i| Some((i, self.datapath.wiring(i).ok()?.metadata?)));
        let ifindex = self.datapath.attach(device)?;
        self.wiring.prepare_device(ifindex, device)?;
        let peer = self.datapath.wiring(ifindex)?.metadata;
        if let Some((was, old)) = before
            && (was, Some(old)) != (ifindex, peer)
        {
            self.wiring.route_metadata(was, old, None)?;
        }
        if let Some(peer) = peer {
            self.wiring.route_metadata(ifindex, peer, device.inner_v4)?;
        }
        // A device whose identity changed runs a copy of its table, in a slot of its
        // own: its rates need that slot's class (a tap made again, the tap's class).
        if let Some(active) = self.datapath.active(ifindex)?
            && let Some(qos) = self.datapath.qos(active.table)?
        {
            self.wiring.shape(ifindex, active.table, &qos)?;
        }
        Ok(ifindex)
    }

    /// The host's wiring goes first: when it fails, the device is still attached and
    /// its record says what to withdraw next time.
    pub fn detach(&mut self, ifindex: u32) -> Result<()> {
        let wired = self.datapath.wiring(ifindex)?;
        let addrs: Vec<IpAddr> = wired
            .active
            .iter()
            .chain(&wired.draining)
            .copied()
            .collect();
        self.wiring.withdraw(ifindex, &addrs)?;
        if let Some(peer) = wired.metadata {
            self.wiring.route_metadata(ifindex, peer, None)?;
        }
        self.wiring.release_device(ifindex, &wired.gateways)?;
        self.datapath.detach(ifindex)?;
        if self.datapath.attached()?.is_empty() {
            self.wiring.put_back()?;
        }
        Ok(())
    }

    /// Runs the datapath's and the host's steps of a shift up to the flip; on failure,
    /// undoes what ran. `previous` is the persona the device runs, when known, whose
    /// wiring of an address both share is put back on undo. `fault` fails that step on
    /// purpose (tests).
    pub fn apply(
        &mut self,
        ifindex: u32,
        persona: CompiledPersona,
        previous: Option<CompiledPersona>,
        flows: FlowMode,
        fault: Option<Step>,
    ) -> Result<Applied, StepFailed> {
        let mut done = Applied {
            ifindex,
            staged: None,
            counters: None,
            announced: Vec::new(),
            rewired: None,
            tunnels: Vec::new(),
            flipped: None,
        };
        match self.steps(&mut done, persona, previous, flows, fault) {
            Ok(()) => Ok(done),
            Err(failed) => match self.undo(done) {
                Ok(()) => Err(failed),
                Err(e) => Err(StepFailed::new(
                    failed.step,
                    format!(
                        "{}; undoing the steps before it failed too: {e}",
                        failed.reason
                    ),
                )),
            },
        }
    }

    fn steps(
        &mut self,
        done: &mut Applied,
        persona: CompiledPersona,
        previous: Option<CompiledPersona>,
        flows: FlowMode,
        fault: Option<Step>,
    ) -> Result<(), StepFailed> {
        let ifindex = done.ifindex;
        let check = |step: Step| match fault {
            Some(f) if f == step => Err(StepFailed::new(step, "injected fault")),
            _ => Ok(()),
        };
        let at = |step: Step| move |e: DatapathError| StepFailed::new(step, e);
        let before = self.datapath.wiring(ifindex).map_err(at(Step::Stage))?;
        let addrs = persona.addresses();

        check(Step::Stage)?;
        done.staged = Some(self.datapath.stage(&persona).map_err(at(Step::Stage))?);

        check(Step::Counters)?;
        if self
            .datapath
            .create_counters(ifindex, persona.id)
            .map_err(at(Step::Counters))?
        {
            done.counters = Some(persona.id);
        }

        check(Step::HostRoutes)?;
        // Recorded before the host is touched: a failure part-way withdraws them all.
        done.announced = addrs
            .iter()
            .filter(|a| !before.active.contains(a) && !before.draining.contains(a))
            .copied()
            .collect();
        let shared: Vec<IpAddr> = addrs
            .iter()
            .filter(|a| before.active.contains(a))
            .copied()
            .collect();
        if let Some(p) = previous.filter(|_| !shared.is_empty()) {
            done.rewired = Some((shared, before.inner.clone(), p));
        }
        self.wiring
            .announce(ifindex, &addrs, &before.inner, &persona)
            .map_err(at(Step::HostRoutes))?;
        if let Some(staged) = &done.staged {
            self.wiring
                .shape(ifindex, staged.table(), &persona.qos)
                .map_err(at(Step::HostRoutes))?;
        }

        check(Step::Tunnel)?;
        for &addr in &addrs {
            let made = self
                .wiring
                .tunnel(&[addr], &persona)
                .map_err(at(Step::Tunnel))?;
            done.tunnels.extend(made);
        }

        check(Step::Flip)?;
        let staged = done.staged.take().expect("staged above");
        done.flipped = Some(
            self.datapath
                .flip(ifindex, staged, flows)
                .map_err(at(Step::Flip))?,
        );
        Ok(())
    }

    /// Undoes an applied shift, last step first.
    pub fn undo(&mut self, done: Applied) -> Result<()> {
        if let Some(f) = &done.flipped {
            self.datapath.unflip(f)?;
        }
        if !done.tunnels.is_empty() {
            self.wiring.untunnel(&done.tunnels)?;
        }
        if !done.announced.is_empty() {
            self.wiring.withdraw(done.ifindex, &done.announced)?;
        }
        if let Some((addrs, inner, previous)) = &done.rewired {
            self.wiring.announce(done.ifindex, addrs, inner, previous)?;
            self.wiring.tunnel(addrs, previous)?;
        }
        if let Some(persona) = done.counters {
            self.datapath.drop_counters(done.ifindex, persona)?;
        }
        if let Some(staged) = done.staged {
            self.datapath.discard(staged)?;
        }
        Ok(())
    }

    /// Makes an applied shift final: the previous table retired, its addresses left
    /// draining (or, for a cut, withdrawn now).
    pub fn commit(&mut self, done: Applied) -> Result<Committed> {
        let flipped = done.flipped.expect("a shift is committed after its flip");
        let committed = self.datapath.commit(&flipped)?;
        self.release(done.ifindex, &committed.release)?;
        Ok(committed)
    }

    /// Withdraws addresses no flow of the device uses any more.
    pub fn release(&mut self, ifindex: u32, addrs: &[IpAddr]) -> Result<()> {
        if addrs.is_empty() {
            return Ok(());
        }
        self.wiring.withdraw(ifindex, addrs)?;
        self.datapath.forget_drains(ifindex, addrs)
    }

    /// Sweeps connection tracking and releases what it found drained; an address the
    /// host fails to withdraw stays draining, to be tried again next time.
    pub fn sweep(&mut self) -> Result<Sweep> {
        let mut sweep = self.datapath.sweep()?;
        let mut by_device: std::collections::BTreeMap<u32, Vec<IpAddr>> = Default::default();
        for &(ifindex, addr) in &sweep.released {
            by_device.entry(ifindex).or_default().push(addr);
        }
        for (ifindex, addrs) in by_device {
            if let Err(e) = self.release(ifindex, &addrs) {
                tracing::warn!(ifindex, error = %e, "releasing drained addresses");
                sweep
                    .released
                    .retain(|(i, a)| *i != ifindex || !addrs.contains(a));
            }
        }
        Ok(sweep)
    }

    /// Withdraws persona addresses routed to the device that its state does not call
    /// for: what a shift cut short by a crash left behind.
    pub fn repair(&mut self, ifindex: u32) -> Result<Vec<IpAddr>> {
        let wired = self.datapath.wiring(ifindex)?;
        let stray: Vec<IpAddr> = self
            .wiring
            .routed(ifindex)?
            .into_iter()
            .filter(|a| {
                !wired.active.contains(a)
                    && !wired.draining.contains(a)
                    && wired.metadata.map(IpAddr::V4) != Some(*a)
            })
            .collect();
        if !stray.is_empty() {
            self.wiring.withdraw(ifindex, &stray)?;
        }
        Ok(stray)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::{compile, fake::FakeDatapath},
        host::fake::{FakeWiring, Wired},
        model::PersonaSpec,
    };

    const IFINDEX: u32 = 7;

    fn persona(yaml: &str, id: u32) -> CompiledPersona {
        let spec: PersonaSpec = serde_yaml::from_str(yaml).unwrap();
        let mut c = compile(&spec).unwrap();
        c.id = id;
        c
    }

    fn office() -> CompiledPersona {
        persona("addresses: [203.0.113.10/24, 2001:db8:a::10/64]", 1)
    }

    fn travel() -> CompiledPersona {
        persona("addresses: [203.0.113.20/24, 2001:db8:b::20/64]", 2)
    }

    fn node_on_office() -> (Node, FakeWiring) {
        let mut dp = FakeDatapath::default();
        dp.interfaces.insert("pvm1".into(), IFINDEX);
        let wiring = FakeWiring::default();
        let mut node = Node::new(Box::new(dp), Box::new(wiring.clone()));
        let device: DeviceSpec =
            serde_yaml::from_str("interface: pvm1\ninnerV4: 198.18.0.2").unwrap();
        node.attach(&device).unwrap();
        let applied = node
            .apply(IFINDEX, office(), None, FlowMode::Keep, None)
            .unwrap();
        node.commit(applied).unwrap();
        (node, wiring)
    }

    /// Everything a failed shift must leave as it found it.
    fn state(node: &Node, wiring: &FakeWiring) -> (String, Wired) {
        let dp = &node.datapath;
        let seen = format!(
            "{:?} {:?} {:?}",
            dp.active(IFINDEX).unwrap().map(|a| (a.table, a.persona)),
            dp.wiring(IFINDEX).unwrap(),
            dp.drains(IFINDEX).unwrap(),
        );
        (seen, wiring.state.lock().unwrap().clone())
    }

    #[test]
    fn a_fault_at_any_step_leaves_the_device_on_its_persona_with_nothing_behind() {
        for step in [
            Step::Stage,
            Step::Counters,
            Step::HostRoutes,
            Step::Tunnel,
            Step::Flip,
        ] {
            let (mut node, wiring) = node_on_office();
            let before = state(&node, &wiring);
            let failed = node
                .apply(
                    IFINDEX,
                    travel(),
                    Some(office()),
                    FlowMode::Keep,
                    Some(step),
                )
                .expect_err("the fault fails the shift");
            assert_eq!(failed.step, step);
            assert_eq!(state(&node, &wiring), before, "after a fault at {step}");
        }
    }

    #[test]
    fn an_undone_flip_puts_the_previous_persona_back() {
        let (mut node, wiring) = node_on_office();
        let before = state(&node, &wiring);
        let applied = node
            .apply(IFINDEX, travel(), Some(office()), FlowMode::Keep, None)
            .unwrap();
        assert_eq!(
            node.datapath.active(IFINDEX).unwrap().map(|a| a.persona),
            Some(2)
        );
        node.undo(applied).unwrap();
        assert_eq!(state(&node, &wiring), before);
    }

    #[test]
    fn an_undone_shift_to_a_shared_address_puts_the_previous_wiring_back() {
        let (mut node, wiring) = node_on_office();
        let office_v2 = persona("addresses: [203.0.113.10/24, 2001:db8:c::10/64]", 4);
        let applied = node
            .apply(IFINDEX, office_v2, Some(office()), FlowMode::Keep, None)
            .unwrap();
        wiring.state.lock().unwrap().routes.clear();
        node.undo(applied).unwrap();
        let routes = node.wiring.routed(IFINDEX).unwrap();
        assert!(
            routes.contains(&"203.0.113.10".parse().unwrap()),
            "the shared address is wired again as office had it: {routes:?}"
        );
    }

    #[test]
    fn a_host_failure_part_way_withdraws_what_it_wired() {
        let (mut node, wiring) = node_on_office();
        let before = state(&node, &wiring);
        *wiring.fail_announce.lock().unwrap() = true;
        let failed = node
            .apply(IFINDEX, travel(), Some(office()), FlowMode::Keep, None)
            .expect_err("the host fails");
        assert_eq!(failed.step, Step::HostRoutes);
        assert_eq!(state(&node, &wiring), before);
    }

    #[test]
    fn a_commit_leaves_old_addresses_draining_and_a_cut_releases_them() {
        let (mut node, wiring) = node_on_office();
        let applied = node
            .apply(IFINDEX, travel(), Some(office()), FlowMode::Keep, None)
            .unwrap();
        node.commit(applied).unwrap();
        let routes = wiring.state.lock().unwrap().routes.len();
        assert_eq!(routes, 4, "office drains beside travel");
        assert_eq!(node.datapath.drains(IFINDEX).unwrap().len(), 2);
        let applied = node
            .apply(
                IFINDEX,
                persona("addresses: [203.0.113.30/24]", 3),
                Some(travel()),
                FlowMode::Cut,
                None,
            )
            .unwrap();
        node.commit(applied).unwrap();
        let routes: Vec<IpAddr> = node.wiring.routed(IFINDEX).unwrap();
        assert_eq!(routes, vec!["203.0.113.30".parse::<IpAddr>().unwrap()]);
        assert!(node.datapath.drains(IFINDEX).unwrap().is_empty());
    }
}
