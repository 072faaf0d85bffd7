//! The device's flows as connection tracking holds them: listing, the periodic sweep
//! that ends dead ones, keeps flow budgets exact and releases drained addresses, and
//! the resets a `cut` sends.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Duration,
};

use persona_common::{
    FAMILY_V4, FAMILY_V6, PROTO_TCP,
    conntrack::{CT_DNS_REDIRECTED, CtEntry, CtKey, TCP_PICKED_UP, tcp_closed, timeout_ns},
    device::DeviceConfig,
    host::{Drain, DrainKey},
};

use aya::maps::{HashMap as BpfHash, MapData, MapError};

use super::{BPF_NOEXIST, KernelDatapath, bpf_err};

type DrainsMap = BpfHash<MapData, DrainKey, Drain>;
use crate::datapath::{
    DatapathError, DrainInfo, FlowInfo, Result, Sweep,
    reset::{self, Reset},
};

/// DRAINS as written, kept by the process that alone writes it: a shift reads it
/// without walking the map.
pub(super) type Drains = BTreeMap<(u32, IpAddr), DrainInfo>;

pub(super) fn read_drains(map: &DrainsMap) -> Result<Vec<(u32, DrainInfo)>> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (key, d) = item.map_err(bpf_err("DRAINS"))?;
        out.push((key.ifindex, DrainInfo::of(addr(key.family, &key.addr), &d)));
    }
    Ok(out)
}

impl DrainInfo {
    fn of(addr: IpAddr, d: &Drain) -> Self {
        DrainInfo {
            addr,
            persona: d.persona,
            generation: d.generation,
        }
    }
}

pub fn drain_key(ifindex: u32, addr: IpAddr) -> DrainKey {
    let (family, addr) = match addr {
        IpAddr::V4(a) => (FAMILY_V4, widen(a.octets())),
        IpAddr::V6(a) => (FAMILY_V6, a.octets()),
    };
    DrainKey {
        ifindex,
        family,
        _pad: [0; 3],
        addr,
    }
}

fn widen(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&a);
    out
}

fn addr(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(*a)
    }
}

/// How long after its last packet a moved flow's previous address counts as in use.
const IN_FLIGHT_NS: u64 = 2_000_000_000;

/// Entries carry bpf_ktime_get_ns(), which is CLOCK_MONOTONIC.
fn monotonic_ns() -> Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_err(|e| DatapathError::Bpf(format!("reading the monotonic clock: {e}")))?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

/// Whether the programs would still take `e` for a flow of its device.
fn live(key: &CtKey, e: &CtEntry, floor: Option<u64>, now: u64) -> bool {
    floor.is_some_and(|floor| e.generation >= floor)
        && now.saturating_sub(e.last_seen_ns) <= timeout_ns(key.proto, e.tcp)
}

impl KernelDatapath {
    /// Each attached device's `ct_floor`: flows of other devices are dead.
    fn floors(&self) -> Result<HashMap<u32, u64>> {
        let mut out = HashMap::new();
        for item in self.maps.active.iter() {
            let (ifindex, active) = item.map_err(bpf_err("ACTIVE"))?;
            out.insert(ifindex, self.persona_table(active.table)?.ct_floor);
        }
        Ok(out)
    }

    pub(super) fn flow_list(&self, ifindex: u32) -> Result<Vec<FlowInfo>> {
        let now = monotonic_ns()?;
        let floor = match self.maps.active.get(&ifindex, 0) {
            Ok(a) => Some(self.persona_table(a.table)?.ct_floor),
            Err(_) => None,
        };
        let mut out = Vec::new();
        for item in self.maps.conntrack.iter() {
            let Ok((key, e)) = item else { continue };
            if key.ifindex != ifindex || !live(&key, &e, floor, now) {
                continue;
            }
            out.push(FlowInfo {
                proto: key.proto,
                remote: addr(key.family, &key.remote),
                remote_port: key.remote_port,
                local_port: key.local_port,
                binding: addr(key.family, &e.binding),
                closed: key.proto == PROTO_TCP && tcp_closed(e.tcp),
                idle: Duration::from_nanos(now.saturating_sub(e.last_seen_ns)),
            });
        }
        Ok(out)
    }

    /// The addresses draining for one device.
    pub(super) fn draining(&self, ifindex: u32) -> Result<Vec<IpAddr>> {
        Ok(self
            .drains_all()?
            .into_iter()
            .filter(|(i, _)| *i == ifindex)
            .map(|(_, d)| d.addr)
            .collect())
    }

    pub fn drains_all(&self) -> Result<Vec<(u32, DrainInfo)>> {
        match &self.held {
            Some(h) => Ok(super::read(h)
                .drains()
                .iter()
                .map(|(&(i, _), d)| (i, d.clone()))
                .collect()),
            None => read_drains(&self.maps.drains),
        }
    }

    /// Keeps `addr` routed to the device for its open flows; an address draining already
    /// keeps the shift it drains since.
    pub(super) fn put_drain(&mut self, ifindex: u32, addr: IpAddr, drain: Drain) -> Result<()> {
        if self
            .held
            .as_ref()
            .is_some_and(|h| super::read(h).drains().contains_key(&(ifindex, addr)))
        {
            return Ok(());
        }
        match self
            .maps
            .drains
            .insert(drain_key(ifindex, addr), drain, BPF_NOEXIST)
        {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(bpf_err("DRAINS")(e)),
        }
        if let Some(h) = &self.held {
            super::write(h).put_drain(ifindex, addr, DrainInfo::of(addr, &drain));
        }
        Ok(())
    }

    /// Stops routing `addr` to the device; not draining is not an error.
    pub(super) fn drop_drain(&mut self, ifindex: u32, addr: IpAddr) -> Result<()> {
        if let Some(h) = &self.held
            && super::write(h).drop_drain(ifindex, addr).is_none()
        {
            return Ok(());
        }
        match self.maps.drains.remove(&drain_key(ifindex, addr)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(bpf_err("DRAINS")(e)),
        }
    }

    pub fn sweep(&mut self) -> Result<Sweep> {
        let now = monotonic_ns()?;
        let floors = self.floors()?;
        let mut sweep = Sweep::default();
        let mut dead = Vec::new();
        let mut using: HashMap<(u32, IpAddr), u32> = HashMap::new();
        for item in self.maps.conntrack.iter() {
            let Ok((key, e)) = item else { continue };
            if !live(&key, &e, floors.get(&key.ifindex).copied(), now) {
                dead.push((key, e.last_seen_ns));
                continue;
            }
            *sweep.flows.entry(key.ifindex).or_default() += 1;
            if key.proto == PROTO_TCP && tcp_closed(e.tcp) {
                continue;
            }
            *using
                .entry((key.ifindex, addr(key.family, &e.binding)))
                .or_default() += 1;
            // Moved a moment ago: replies may still be on their way to the old address.
            if e.prev_binding != e.binding && now.saturating_sub(e.last_seen_ns) < IN_FLIGHT_NS {
                using
                    .entry((key.ifindex, addr(key.family, &e.prev_binding)))
                    .or_default();
            }
        }
        for (key, seen) in &dead {
            // Only if no packet touched it since it was judged dead: the VM may have
            // opened a new flow on the same ports meanwhile.
            if self
                .maps
                .conntrack
                .get(key, 0)
                .is_ok_and(|e| e.last_seen_ns == *seen)
            {
                let _ = self.maps.conntrack.remove(key);
                sweep.removed += 1;
            }
        }
        let budgets: Vec<u32> = self.maps.flow_budget.keys().flatten().collect();
        for ifindex in budgets {
            if let Ok(mut b) = self.maps.flow_budget.get(&ifindex, 0) {
                b.used = sweep.flows.get(&ifindex).copied().map_or(0, u64::from);
                self.maps
                    .flow_budget
                    .insert(ifindex, b, 0)
                    .map_err(bpf_err("FLOW_BUDGET"))?;
            }
        }
        let mut drains: BTreeMap<u32, Vec<DrainInfo>> = BTreeMap::new();
        for (ifindex, d) in self.drains_all()? {
            drains.entry(ifindex).or_default().push(d);
        }
        for (ifindex, list) in drains {
            let active = self.active_addresses(ifindex)?;
            let mut gone = Vec::new();
            for d in list {
                match using.get(&(ifindex, d.addr)) {
                    Some(&n) => sweep.draining.entry(ifindex).or_default().push((d, n)),
                    // Active again (the shift back has not committed yet): not released.
                    None if active.contains(&d.addr) => {}
                    None => gone.push(d.addr),
                }
            }
            sweep
                .released
                .extend(gone.into_iter().map(|a| (ifindex, a)));
        }
        Ok(sweep)
    }

    /// Sends the VM a reset for each TCP connection the `cut` of generation `cut`
    /// forgot: those bound under the previous table's `floor` and before the cut, and
    /// those the cut's table picked up in mid-stream since.
    pub(super) fn reset_flows(
        &mut self,
        ifindex: u32,
        device: &DeviceConfig,
        floor: u64,
        cut: u64,
    ) -> Result<usize> {
        if device.mac == [0; 6] {
            tracing::warn!(
                ifindex,
                "the device has no MAC: its connections are forgotten but not reset"
            );
            return Ok(0);
        }
        let now = monotonic_ns()?;
        let mut frames = Vec::new();
        let src_mac = tap_mac(ifindex).unwrap_or([0x02, 0, 0, 0, 0, 1]);
        for item in self.maps.conntrack.iter() {
            let Ok((key, e)) = item else { continue };
            let forgotten = (floor..cut).contains(&e.generation)
                || (e.generation == cut && e.tcp & TCP_PICKED_UP != 0);
            if key.ifindex != ifindex
                || key.proto != PROTO_TCP
                || tcp_closed(e.tcp)
                || !forgotten
                || now.saturating_sub(e.last_seen_ns) > timeout_ns(key.proto, e.tcp)
            {
                continue;
            }
            let inner = if key.family == FAMILY_V4 {
                widen(device.inner_v4)
            } else {
                device.inner_v6
            };
            // A redirected DNS query's answers came from the server the VM asked.
            let remote = if e.flags & CT_DNS_REDIRECTED != 0 {
                e.orig_remote
            } else {
                key.remote
            };
            frames.push(reset::frame(
                device.mac,
                src_mac,
                &Reset {
                    family: key.family,
                    remote,
                    inner,
                    remote_port: key.remote_port,
                    local_port: key.local_port,
                    seq: e.remote_next,
                },
            ));
        }
        if frames.is_empty() {
            return Ok(0);
        }
        reset::send(ifindex, &frames).map_err(|source| DatapathError::Io {
            context: format!("sending TCP resets to the VM on ifindex {ifindex}"),
            source,
        })
    }
}

/// The tap's own MAC, the source of frames the host sends the VM.
fn tap_mac(ifindex: u32) -> Option<[u8; 6]> {
    let name = nix::net::if_::if_indextoname(ifindex).ok()?;
    let text =
        std::fs::read_to_string(format!("/sys/class/net/{}/address", name.to_string_lossy()))
            .ok()?;
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    Some(mac)
}

impl KernelDatapath {
    /// After an undone flip: flows the flipped table moved go back to the address they
    /// had, and flows it opened (or picked up) are forgotten, so none is left bound to
    /// an address the device no longer has.
    pub(super) fn unbind(&mut self, ifindex: u32, generation: u64, keep: &[IpAddr]) -> Result<()> {
        let mut moved = Vec::new();
        let mut opened = Vec::new();
        for item in self.maps.conntrack.iter() {
            let Ok((key, e)) = item else { continue };
            if key.ifindex != ifindex
                || e.generation != generation
                || keep.contains(&addr(key.family, &e.binding))
            {
                continue;
            }
            if keep.contains(&addr(key.family, &e.prev_binding)) {
                moved.push((key, e));
            } else {
                opened.push(key);
            }
        }
        for (key, mut e) in moved {
            e.binding = e.prev_binding;
            let _ = self.maps.conntrack.insert(key, e, 0);
        }
        for key in opened {
            let _ = self.maps.conntrack.remove(&key);
        }
        Ok(())
    }
}
