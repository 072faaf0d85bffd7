//! Every device's state in memory, indexed by what a shift's lease check asks: which
//! devices run a persona, and which lease an address. That check then costs what it
//! finds, not the number of devices.
use std::{collections::BTreeSet, net::IpAddr};

use super::DeviceState;
use crate::{model::AddressScope, multimap::MultiMap};

#[derive(Debug, Default)]
pub struct States {
    by_device: hashbrown::HashMap<String, DeviceState>,
    on_persona: MultiMap<String, String>,
    leased: MultiMap<IpAddr, String>,
}

impl States {
    pub fn get(&self, device: &str) -> Option<&DeviceState> {
        self.by_device.get(device)
    }

    pub fn set(&mut self, device: &str, state: Option<DeviceState>) {
        if let Some(old) = self.by_device.remove(device) {
            self.on_persona.remove(&old.persona, device);
            for l in &old.leases {
                self.leased.remove(&l.addr(), device);
            }
        }
        if let Some(state) = state {
            self.on_persona
                .insert(state.persona.clone(), device.to_owned());
            for l in &state.leases {
                self.leased.insert(l.addr(), device.to_owned());
            }
            self.by_device.insert(device.to_owned(), state);
        }
    }

    /// Every state, by device name.
    pub fn all(&self) -> Vec<(String, DeviceState)> {
        let mut out: Vec<_> = self
            .by_device
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The states of the devices on one of `personas`, or leasing an address in
    /// `scope`, by device name.
    pub fn holding(&self, personas: &[String], scope: &AddressScope) -> Vec<(String, DeviceState)> {
        let on = personas.iter().filter_map(|p| self.on_persona.get(p));
        let leasing = scope.within(self.leased.as_map()).map(|(_, d)| d);
        let devices: BTreeSet<&String> = on.chain(leasing).flatten().collect();
        devices
            .into_iter()
            .filter_map(|d| Some((d.clone(), self.by_device.get(d)?.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(persona: &str, leases: &[&str]) -> DeviceState {
        DeviceState {
            persona: persona.into(),
            persona_version: 1,
            generation: 1,
            since: jiff::Timestamp::UNIX_EPOCH,
            rule: None,
            leases: leases.iter().map(|l| l.parse().unwrap()).collect(),
        }
    }

    fn names(found: Vec<(String, DeviceState)>) -> Vec<String> {
        found.into_iter().map(|(d, _)| d).collect()
    }

    #[test]
    fn holders_are_found_by_persona_and_by_lease_and_forgotten_when_they_move() {
        let mut s = States::default();
        s.set("vm1", Some(state("office", &[])));
        s.set("vm2", Some(state("pool", &["198.51.100.2/24"])));
        s.set("vm3", Some(state("pool", &["198.51.100.3/24"])));
        s.set("vm4", Some(state("travel", &[])));
        let scope = AddressScope::of_net(&"198.51.100.0/30".parse().unwrap());
        assert_eq!(
            names(s.holding(&["office".into()], &scope)),
            ["vm1", "vm2", "vm3"]
        );
        assert_eq!(names(s.holding(&[], &AddressScope::default())), [""; 0]);

        // vm2 leaves the pool, vm1 leaves office; vm3's lease moves out of the scope.
        s.set("vm2", Some(state("office", &[])));
        s.set("vm1", None);
        s.set("vm3", Some(state("pool", &["198.51.100.9/24"])));
        assert_eq!(names(s.holding(&["office".into()], &scope)), ["vm2"]);
        assert_eq!(names(s.holding(&["pool".into()], &scope)), ["vm3"]);
        assert_eq!(s.by_device.len(), 3);
        assert_eq!(s.on_persona.len(), 3, "no empty entry stays behind");
        assert_eq!(s.leased.len(), 1);
    }
}
