//! Every map of the datapath; userspace wrappers live in `persona-userspace/src/datapath/maps`.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use persona_common::{
    conntrack::{CT_MAX_ENTRIES, CtEntry, CtKey, FlowBudget},
    counters::{
        Counter, CounterKey, HandshakeKey, MAX_COUNTER_KEYS, MAX_FOLDED_KEYS, MAX_HANDSHAKE_KEYS,
        TRACKED_SLOTS,
    },
    device::{DeviceConfig, MAX_DEVICES},
    events::{RING_BYTES, RateWindow},
    firewall::{FwKeyV4, FwKeyV6, MAX_PREFIXES, RuleSet},
    guard::GuardState,
    host::{Drain, DrainKey, HostWiring, MAX_DRAINS, Routing},
    metadata::MetadataPeer,
    persona::{Active, MAX_TABLES, PersonaTable},
    qos::Qos,
};

#[map]
pub static DEVICES: HashMap<u32, DeviceConfig> = HashMap::pinned(MAX_DEVICES, 0);

/// Not preallocated: an update then swaps the element under RCU, so a program sees the
/// old or the new `Active` whole, never a mix.
#[map]
pub static ACTIVE: HashMap<u32, Active> = HashMap::pinned(MAX_DEVICES, BPF_F_NO_PREALLOC);

#[map]
pub static PERSONAS: Array<PersonaTable> = Array::pinned(MAX_TABLES, 0);

#[map]
pub static FW_V4: LpmTrie<FwKeyV4, RuleSet> = LpmTrie::pinned(MAX_PREFIXES, 0);

#[map]
pub static FW_V6: LpmTrie<FwKeyV6, RuleSet> = LpmTrie::pinned(MAX_PREFIXES, 0);

#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CT_MAX_ENTRIES, 0);

#[map]
pub static COUNTERS: PerCpuHashMap<CounterKey, Counter> =
    PerCpuHashMap::pinned(MAX_COUNTER_KEYS, 0);

/// Counts of pairs no table owns any more, moved out of `COUNTERS` by userspace; never
/// read here, kept in the object so it is pinned beside the others.
#[map]
pub static FOLDED: HashMap<CounterKey, Counter> =
    HashMap::pinned(MAX_FOLDED_KEYS, BPF_F_NO_PREALLOC);

#[map]
pub static TRACKED: PerCpuArray<Counter> = PerCpuArray::pinned(TRACKED_SLOTS, 0);

/// Devices' flow budgets; a device without an entry has none.
#[map]
pub static FLOW_BUDGET: HashMap<u32, FlowBudget> = HashMap::pinned(MAX_DEVICES, 0);

/// Where a new conntrack entry is built: the BPF stack is too small to hold it as well.
#[map]
pub static CT_SCRATCH: PerCpuArray<CtEntry> = PerCpuArray::with_max_entries(1, 0);

/// Userspace's record of the host wiring of each device; never read here, kept in the
/// object so it is pinned beside the others.
#[map]
pub static HOST_WIRING: HashMap<u32, HostWiring> = HashMap::pinned(MAX_DEVICES, 0);

/// Userspace's record of the earlier personas' addresses still in use; never read here.
#[map]
pub static DRAINS: HashMap<DrainKey, Drain> = HashMap::pinned(MAX_DRAINS, 0);

/// Firewall drops for userspace. Pinned: after a restart the daemon must read the ring
/// the running programs write to.
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(RING_BYTES, 0);

#[map]
pub static EVENT_RATE: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static HANDSHAKES: PerCpuHashMap<HandshakeKey, u64> =
    PerCpuHashMap::pinned(MAX_HANDSHAKE_KEYS, 0);

/// Devices whose flood guard is on, and its rate window.
#[map]
pub static GUARD: HashMap<u32, GuardState> = HashMap::pinned(MAX_DEVICES, 0);

/// Whether and where the programs forward by themselves; written by userspace at start.
#[map]
pub static ROUTING: Array<Routing> = Array::pinned(1, 0);

/// Devices served by the metadata service, and the peer address each is seen from.
#[map]
pub static METADATA: HashMap<u32, MetadataPeer> = HashMap::pinned(MAX_DEVICES, 0);

/// A persona's QoS by table, beside `PERSONAS`.
#[map]
pub static QOS: Array<Qos> = Array::pinned(MAX_TABLES, 0);
