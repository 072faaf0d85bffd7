//! Host wiring as a record, for unit tests of the shift transaction.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use super::Wiring;
use crate::{
    datapath::{CompiledPersona, DatapathError, Result},
    model::DeviceSpec,
};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Wired {
    pub routes: BTreeSet<(u32, IpAddr)>,
    pub tunnels: BTreeSet<IpAddr>,
    pub prepared: BTreeSet<u32>,
}

/// Shares its record with the test through `state`; `fail_announce` makes the
/// next announcement fail after wiring its first address.
#[derive(Default, Clone)]
pub struct FakeWiring {
    pub state: Arc<Mutex<Wired>>,
    pub fail_announce: Arc<Mutex<bool>>,
}

impl Wiring for FakeWiring {
    fn prepare_device(&self, ifindex: u32, _device: &DeviceSpec) -> Result<()> {
        self.state.lock().unwrap().prepared.insert(ifindex);
        Ok(())
    }

    fn release_device(&self, ifindex: u32, _gateways: &[IpAddr]) -> Result<()> {
        self.state.lock().unwrap().prepared.remove(&ifindex);
        Ok(())
    }

    fn announce(
        &self,
        ifindex: u32,
        addrs: &[IpAddr],
        _inner: &[IpAddr],
        _persona: &CompiledPersona,
    ) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        for (i, &a) in addrs.iter().enumerate() {
            if i > 0 && std::mem::take(&mut *self.fail_announce.lock().unwrap()) {
                return Err(DatapathError::Host(format!("adding route {a}: injected")));
            }
            state.routes.insert((ifindex, a));
        }
        Ok(())
    }

    fn withdraw(&self, ifindex: u32, addrs: &[IpAddr]) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        for a in addrs {
            state.routes.remove(&(ifindex, *a));
            state.tunnels.remove(a);
        }
        Ok(())
    }

    fn tunnel(&self, addrs: &[IpAddr], persona: &CompiledPersona) -> Result<Vec<IpAddr>> {
        let mut state = self.state.lock().unwrap();
        Ok(addrs
            .iter()
            .filter(|_| persona.vpn.is_some())
            .filter(|a| state.tunnels.insert(**a))
            .copied()
            .collect())
    }

    fn untunnel(&self, addrs: &[IpAddr]) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        for a in addrs {
            state.tunnels.remove(a);
        }
        Ok(())
    }

    fn routed(&self, ifindex: u32) -> Result<Vec<IpAddr>> {
        let state = self.state.lock().unwrap();
        Ok(state
            .routes
            .iter()
            .filter(|(i, _)| *i == ifindex)
            .map(|(_, a)| *a)
            .collect())
    }
}
