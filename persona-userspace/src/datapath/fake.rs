//! An in-memory datapath for unit tests of the logic above it: it keeps the same
//! bookkeeping (slots, generations, attached devices) without a kernel.
use std::collections::{BTreeSet, HashMap};

use super::{ActiveState, CompiledPersona, Counters, Datapath, DatapathError, Result, Staged};
use crate::model::{DeviceSpec, FlowMode};

#[derive(Default)]
pub struct FakeDatapath {
    pub devices: HashMap<u32, DeviceSpec>,
    pub active: HashMap<u32, (ActiveState, CompiledPersona)>,
    staged: BTreeSet<u32>,
    next_table: u32,
    generation: u64,
    /// Interface names the fake pretends exist, with their ifindex.
    pub interfaces: HashMap<String, u32>,
    pub flows: HashMap<u32, Vec<super::FlowInfo>>,
    pub drains: HashMap<u32, Vec<super::DrainInfo>>,
    /// Counter sets created, by device and persona.
    pub counters: BTreeSet<(u32, u32)>,
    /// Tables flipped away from but not yet committed.
    retained: HashMap<u32, CompiledPersona>,
}

impl Datapath for FakeDatapath {
    fn attach(&mut self, device: &DeviceSpec) -> Result<u32> {
        device.validate()?;
        let ifindex = *self
            .interfaces
            .get(&device.interface)
            .ok_or_else(|| DatapathError::NoSuchInterface(device.interface.clone()))?;
        self.devices.insert(ifindex, device.clone());
        Ok(ifindex)
    }

    fn detach(&mut self, ifindex: u32) -> Result<()> {
        self.devices
            .remove(&ifindex)
            .ok_or(DatapathError::NotAttached(ifindex))?;
        self.active.remove(&ifindex);
        Ok(())
    }

    fn attached(&self) -> Result<Vec<u32>> {
        Ok(self.devices.keys().copied().collect())
    }

    fn stage(&mut self, _persona: &CompiledPersona) -> Result<Staged> {
        self.next_table += 1;
        self.staged.insert(self.next_table);
        Ok(Staged {
            rules: 0,
            table: self.next_table,
            persona: _persona.clone(),
        })
    }

    fn discard(&mut self, staged: Staged) -> Result<()> {
        self.staged.remove(&staged.table);
        Ok(())
    }

    fn wiring(&self, ifindex: u32) -> Result<super::DeviceWiring> {
        Ok(super::DeviceWiring {
            metadata: None,
            inner: self
                .devices
                .get(&ifindex)
                .map(|d| {
                    d.inner_v4
                        .map(std::net::IpAddr::V4)
                        .into_iter()
                        .chain(d.inner_v6.map(std::net::IpAddr::V6))
                        .collect()
                })
                .unwrap_or_default(),
            active: self
                .active
                .get(&ifindex)
                .map(|(_, p)| p.addresses())
                .unwrap_or_default(),
            draining: self
                .drains
                .get(&ifindex)
                .into_iter()
                .flatten()
                .map(|d| d.addr)
                .collect(),
            gateways: Vec::new(),
        })
    }

    fn create_counters(&mut self, ifindex: u32, persona: u32) -> Result<bool> {
        Ok(self.counters.insert((ifindex, persona)))
    }

    fn drop_counters(&mut self, ifindex: u32, persona: u32) -> Result<()> {
        self.counters.remove(&(ifindex, persona));
        Ok(())
    }

    fn flip(&mut self, ifindex: u32, staged: Staged, flows: FlowMode) -> Result<super::Flipped> {
        if !self.devices.contains_key(&ifindex) {
            self.staged.remove(&staged.table);
            return Err(DatapathError::NotAttached(ifindex));
        }
        self.staged.remove(&staged.table);
        self.generation += 1;
        let state = ActiveState {
            table: staged.table,
            persona: staged.persona.id,
            generation: self.generation,
        };
        let previous = self.active.insert(ifindex, (state, staged.persona));
        if let Some(p) = &previous {
            self.retained.insert(p.0.table, p.1.clone());
        }
        Ok(super::Flipped {
            ifindex,
            generation: self.generation,
            table: state.table,
            persona: state.persona,
            previous: previous.map(|(p, _)| p),
            flows,
            flip: std::time::Duration::ZERO,
            tables: None,
        })
    }

    fn unflip(&mut self, f: &super::Flipped) -> Result<()> {
        match f.previous {
            Some(p) => {
                let compiled = self
                    .retained
                    .remove(&p.table)
                    .ok_or_else(|| DatapathError::Bpf(format!("table {} is gone", p.table)))?;
                self.active.insert(f.ifindex, (p, compiled));
            }
            None => {
                self.active.remove(&f.ifindex);
            }
        }
        Ok(())
    }

    fn commit(&mut self, f: &super::Flipped) -> Result<super::Committed> {
        let new_addrs = self
            .active
            .get(&f.ifindex)
            .map(|(_, p)| p.addresses())
            .unwrap_or_default();
        let previous = f.previous.and_then(|p| self.retained.remove(&p.table));
        let drains = self.drains.entry(f.ifindex).or_default();
        drains.retain(|d| !new_addrs.contains(&d.addr));
        let mut committed = super::Committed::default();
        if let (Some(prev), Some(compiled)) = (f.previous, previous) {
            for addr in compiled.addresses() {
                if !new_addrs.contains(&addr) && !drains.iter().any(|d| d.addr == addr) {
                    drains.push(super::DrainInfo {
                        addr,
                        persona: prev.persona,
                        generation: f.generation,
                    });
                }
            }
            if f.flows == FlowMode::Cut {
                committed.resets = self.flows.remove(&f.ifindex).map_or(0, |f| f.len());
                committed.release = drains.iter().map(|d| d.addr).collect();
            }
        }
        Ok(committed)
    }

    fn forget_drains(&mut self, ifindex: u32, addrs: &[std::net::IpAddr]) -> Result<()> {
        if let Some(d) = self.drains.get_mut(&ifindex) {
            d.retain(|d| !addrs.contains(&d.addr));
        }
        Ok(())
    }

    fn active(&self, ifindex: u32) -> Result<Option<ActiveState>> {
        Ok(self.active.get(&ifindex).map(|(a, _)| *a))
    }

    fn persona_counters(&self, _ifindex: u32) -> Result<std::collections::BTreeMap<u32, Counters>> {
        Ok(Default::default())
    }

    fn usage(&self) -> Result<super::Usage> {
        Ok(super::Usage::default())
    }

    fn flows(&self, ifindex: u32) -> Result<Vec<super::FlowInfo>> {
        Ok(self.flows.get(&ifindex).cloned().unwrap_or_default())
    }

    fn drains_all(&self) -> Result<Vec<(u32, super::DrainInfo)>> {
        Ok(self
            .drains
            .iter()
            .flat_map(|(&i, ds)| ds.iter().map(move |d| (i, d.clone())))
            .collect())
    }

    fn sweep(&mut self) -> Result<super::Sweep> {
        let mut sweep = super::Sweep::default();
        for (&ifindex, drains) in &self.drains {
            let flows = self.flows.get(&ifindex).map_or(&[][..], |f| f.as_slice());
            sweep.flows.insert(ifindex, flows.len() as u32);
            for d in drains {
                let using = flows
                    .iter()
                    .filter(|f| f.binding == d.addr && !f.closed)
                    .count() as u32;
                if using == 0 {
                    sweep.released.push((ifindex, d.addr));
                } else {
                    sweep
                        .draining
                        .entry(ifindex)
                        .or_default()
                        .push((d.clone(), using));
                }
            }
        }
        Ok(sweep)
    }
}
