//! An in-memory datapath for unit tests of the logic above it: it keeps the same
//! bookkeeping (slots, generations, attached devices) without a kernel.
use std::collections::{BTreeSet, HashMap};

use super::{
    ActiveState, CompiledPersona, Counters, Datapath, DatapathError, Result, ShiftOptions, Shifted,
    Staged,
};
use crate::model::DeviceSpec;

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

    fn shift(&mut self, ifindex: u32, staged: Staged, _options: ShiftOptions) -> Result<Shifted> {
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
        let previous = self.active.insert(ifindex, (state, staged.persona));
        Ok(Shifted {
            generation: self.generation,
            table: staged.table,
            previous_table: previous.map(|(p, _)| p.table),
            flip: std::time::Duration::ZERO,
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
}
