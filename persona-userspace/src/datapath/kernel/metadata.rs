//! Which devices the metadata service answers, and the peer address each is seen from:
//! a slot kept in the pinned `METADATA` map, so a restarted daemon finds it again.
//! Slots are given in turn, not lowest first: connections of a device just gone (a
//! long poll, a key on its way) may still be open to its old peer address.
use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use persona_common::{
    device::MAX_DEVICES,
    metadata::{MetadataPeer, peer, slot_of},
};

use super::*;

/// `METADATA` as written, kept by the process that alone writes it: a device's slot
/// and a slot's device without a walk over the map.
#[derive(Default)]
pub(super) struct Peers {
    by_device: HashMap<u32, u32>,
    by_slot: HashMap<u32, u32>,
}

impl Peers {
    pub(super) fn read(map: &aya::maps::HashMap<aya::maps::MapData, u32, MetadataPeer>) -> Self {
        let mut peers = Self::default();
        for (ifindex, p) in map.iter().flatten() {
            if let Some(slot) = slot_of(p.addr) {
                peers.set(ifindex, Some(slot));
            }
        }
        peers
    }

    fn set(&mut self, ifindex: u32, slot: Option<u32>) {
        if let Some(old) = self.by_device.remove(&ifindex) {
            self.by_slot.remove(&old);
        }
        if let Some(slot) = slot {
            self.by_device.insert(ifindex, slot);
            self.by_slot.insert(slot, ifindex);
        }
    }
}

impl KernelDatapath {
    /// Gives the device a peer address (the one it has, else the next free one in
    /// turn), or takes it away when the device is not to reach the service.
    pub(super) fn assign_metadata(&mut self, ifindex: u32, device: &DeviceSpec) -> Result<()> {
        if !(self.config.metadata && device.serves_metadata()) {
            return self.drop_metadata(ifindex);
        }
        if self.metadata_peer(ifindex).is_some() {
            return Ok(());
        }
        let used: HashSet<u32> = match &self.peers {
            Some(p) => p.by_slot.keys().copied().collect(),
            None => Peers::read(&self.maps.metadata)
                .by_slot
                .into_keys()
                .collect(),
        };
        // After the last given (or, after a restart, the highest in use), in turn.
        let after = self
            .metadata_cursor
            .max(used.iter().copied().max().unwrap_or(0));
        let slot = (1..=MAX_DEVICES)
            .map(|i| (after + i - 1) % MAX_DEVICES + 1)
            .find(|s| !used.contains(s))
            .ok_or_else(|| DatapathError::Bpf("METADATA: every peer address is in use".into()))?;
        self.metadata_cursor = slot;
        self.maps
            .metadata
            .insert(ifindex, MetadataPeer { addr: peer(slot) }, 0)
            .map_err(bpf_err("METADATA"))?;
        if let Some(p) = &mut self.peers {
            p.set(ifindex, Some(slot));
        }
        Ok(())
    }

    pub(super) fn drop_metadata(&mut self, ifindex: u32) -> Result<()> {
        remove_if_there(&mut self.maps.metadata, &ifindex, "METADATA")?;
        if let Some(p) = &mut self.peers {
            p.set(ifindex, None);
        }
        Ok(())
    }

    pub(super) fn metadata_peer(&self, ifindex: u32) -> Option<Ipv4Addr> {
        let addr = match &self.peers {
            Some(p) => peer(*p.by_device.get(&ifindex)?),
            None => self.maps.metadata.get(&ifindex, 0).ok()?.addr,
        };
        Some(Ipv4Addr::from(addr))
    }

    pub(super) fn metadata_device(&self, peer: Ipv4Addr) -> Option<u32> {
        match &self.peers {
            Some(p) => p.by_slot.get(&slot_of(peer.octets())?).copied(),
            None => self
                .maps
                .metadata
                .iter()
                .flatten()
                .find(|(_, p)| p.addr == peer.octets())
                .map(|(ifindex, _)| ifindex),
        }
    }
}
