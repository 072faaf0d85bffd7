//! An in-memory datapath for unit tests of the logic above it: it keeps the same
//! bookkeeping (slots, generations, attached devices) without a kernel.
use std::collections::{BTreeSet, HashMap};

use super::{
    ActiveState, CompiledPersona, Counters, Datapath, DatapathError, Result, ShiftOptions, Shifted,
    Staged,
};
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

    fn stage(&mut self, _persona: &CompiledPersona) -> Result<Staged> {
        self.next_table += 1;
        self.staged.insert(self.next_table);
        Ok(Staged {
            table: self.next_table,
            persona: _persona.clone(),
        })
    }

    fn discard(&mut self, staged: Staged) -> Result<()> {
        self.staged.remove(&staged.table);
        Ok(())
    }

    fn shift(&mut self, ifindex: u32, staged: Staged, options: ShiftOptions) -> Result<Shifted> {
        if !self.devices.contains_key(&ifindex) {
            return Err(DatapathError::NotAttached(ifindex));
        }
        self.staged.remove(&staged.table);
        self.generation += 1;
        let state = ActiveState {
            table: staged.table,
            persona: staged.persona.id,
            generation: self.generation,
        };
        let new_addrs = staged.persona.addresses();
        let previous = self.active.insert(ifindex, (state, staged.persona));
        let drains = self.drains.entry(ifindex).or_default();
        drains.retain(|d| !new_addrs.contains(&d.addr));
        let mut resets = 0;
        if options.flows == FlowMode::Cut {
            drains.clear();
            resets = self.flows.remove(&ifindex).map_or(0, |f| f.len());
        } else if let Some((prev, compiled)) = &previous {
            for addr in compiled.addresses() {
                if !new_addrs.contains(&addr) && !drains.iter().any(|d| d.addr == addr) {
                    drains.push(super::DrainInfo {
                        addr,
                        persona: prev.persona,
                        generation: self.generation,
                    });
                }
            }
        }
        Ok(Shifted {
            generation: self.generation,
            table: staged.table,
            previous_table: previous.map(|(p, _)| p.table),
            flip: std::time::Duration::ZERO,
            resets,
        })
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
        for (&ifindex, drains) in &mut self.drains {
            let flows = self.flows.get(&ifindex).map_or(&[][..], |f| f.as_slice());
            sweep.flows.insert(ifindex, flows.len() as u32);
            drains.retain(|d| {
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
                using > 0
            });
        }
        Ok(sweep)
    }
}
