//! Which devices the metadata service answers, and the peer address each is seen from:
//! a slot kept in the pinned `METADATA` map, so a restarted daemon finds it again.
//! Slots are given in turn, not lowest first: connections of a device just gone (a
//! long poll, a key on its way) may still be open to its old peer address.
use std::net::Ipv4Addr;

use persona_common::{
    device::MAX_DEVICES,
    metadata::{MetadataPeer, peer, slot_of},
};

use super::*;

impl KernelDatapath {
    /// Gives the device a peer address (the one it has, else the next free one in
    /// turn), or takes it away when the device is not to reach the service.
    pub(super) fn assign_metadata(&mut self, ifindex: u32, device: &DeviceSpec) -> Result<()> {
        if !(self.config.metadata && device.serves_metadata()) {
            return remove_if_there(&mut self.maps.metadata, &ifindex, "METADATA");
        }
        if self.maps.metadata.get(&ifindex, 0).is_ok() {
            return Ok(());
        }
        let used: std::collections::HashSet<u32> = self
            .maps
            .metadata
            .iter()
            .flatten()
            .filter_map(|(_, p)| slot_of(p.addr))
            .collect();
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
            .map_err(bpf_err("METADATA"))
    }

    pub(super) fn metadata_peer(&self, ifindex: u32) -> Option<Ipv4Addr> {
        self.maps
            .metadata
            .get(&ifindex, 0)
            .ok()
            .map(|p| Ipv4Addr::from(p.addr))
    }

    pub(super) fn metadata_device(&self, peer: Ipv4Addr) -> Option<u32> {
        self.maps
            .metadata
            .iter()
            .flatten()
            .find(|(_, p)| p.addr == peer.octets())
            .map(|(ifindex, _)| ifindex)
    }
}
