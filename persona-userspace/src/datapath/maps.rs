//! Typed handles on the datapath's maps. Each must stay in sync with the kernel's
//! definition in persona-ebpf/src/maps.rs and the types in persona-common.
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
};
use persona_common::{
    conntrack::{CtEntry, CtKey, FlowBudget},
    counters::{Counter, CounterKey},
    device::DeviceConfig,
    firewall::{FwKeyV4, FwKeyV6, RuleSet},
    guard::GuardState,
    host::{Drain, DrainKey, HostWiring, Routing},
    map_names,
    metadata::MetadataPeer,
    persona::{Active, PersonaTable},
    qos::Qos,
};

use super::{DatapathError, Result};

pub struct Maps {
    /// `DEVICES`: ifindex → the VM's inner identity.
    pub devices: HashMap<MapData, u32, DeviceConfig>,
    /// `ACTIVE`: ifindex → the table in force; the map a shift updates.
    pub active: HashMap<MapData, u32, Active>,
    /// `PERSONAS`: table → addresses, resolvers, default verdicts.
    pub personas: Array<MapData, PersonaTable>,
    pub fw_v4: LpmTrie<MapData, FwKeyV4, RuleSet>,
    pub fw_v6: LpmTrie<MapData, FwKeyV6, RuleSet>,
    /// `CONNTRACK` (LRU hash).
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    /// `COUNTERS` (per-CPU hash).
    pub counters: PerCpuHashMap<MapData, CounterKey, Counter>,
    /// `FOLDED`: counts of pairs no table owns any more; userspace only.
    pub folded: HashMap<MapData, CounterKey, Counter>,
    /// `TRACKED` (per-CPU array): tracked-flow packets by table and direction.
    pub tracked: PerCpuArray<MapData, Counter>,
    /// `HOST_WIRING`: userspace only.
    pub host_wiring: HashMap<MapData, u32, HostWiring>,
    /// `DRAINS`: earlier personas' addresses still in use; userspace only.
    pub drains: HashMap<MapData, DrainKey, Drain>,
    /// `FLOW_BUDGET`: ifindex → flows the device may have, and has.
    pub flow_budget: HashMap<MapData, u32, FlowBudget>,
    /// `HANDSHAKES` (per-CPU hash): TCP handshake RTT histogram per device.
    pub handshakes: PerCpuHashMap<MapData, persona_common::counters::HandshakeKey, u64>,
    /// `GUARD`: devices whose flood guard is on, and its rate window.
    pub guard: HashMap<MapData, u32, GuardState>,
    /// `ROUTING`: whether the programs forward by themselves, and to which uplinks.
    pub routing: Array<MapData, Routing>,
    /// `METADATA`: devices the metadata service answers, and their peer addresses.
    pub metadata: HashMap<MapData, u32, MetadataPeer>,
    /// `QOS`: table → the persona's QoS, beside `PERSONAS`.
    pub qos: Array<MapData, Qos>,
    /// `EVENTS`: firewall drops; handed to whoever reads them.
    pub events: Option<RingBuf<MapData>>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| DatapathError::Bpf(format!("map {name} missing from the object")))?;
    T::try_from(map).map_err(|e| DatapathError::Bpf(format!("map {name}: {e}")))
}

impl Maps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            devices: take(ebpf, map_names::DEVICES)?,
            active: take(ebpf, map_names::ACTIVE)?,
            personas: take(ebpf, map_names::PERSONAS)?,
            fw_v4: take(ebpf, map_names::FW_V4)?,
            fw_v6: take(ebpf, map_names::FW_V6)?,
            conntrack: take(ebpf, map_names::CONNTRACK)?,
            counters: take(ebpf, map_names::COUNTERS)?,
            folded: take(ebpf, map_names::FOLDED)?,
            tracked: take(ebpf, map_names::TRACKED)?,
            host_wiring: take(ebpf, map_names::HOST_WIRING)?,
            drains: take(ebpf, map_names::DRAINS)?,
            flow_budget: take(ebpf, map_names::FLOW_BUDGET)?,
            events: Some(take(ebpf, map_names::EVENTS)?),
            handshakes: take(ebpf, map_names::HANDSHAKES)?,
            guard: take(ebpf, map_names::GUARD)?,
            routing: take(ebpf, map_names::ROUTING)?,
            metadata: take(ebpf, map_names::METADATA)?,
            qos: take(ebpf, map_names::QOS)?,
        })
    }
}
