//! The real datapath: the embedded BPF object loaded into this kernel, maps and links
//! pinned under bpffs so that traffic keeps flowing while the process restarts.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{IterableMap as _, MapError, PerCpuValues, lpm_trie::Key},
    programs::TestRunOptions,
    util::nr_cpus,
};
use persona_common::{
    DIR_EGRESS, DIR_INGRESS,
    conntrack::{DEFAULT_FLOW_BUDGET, FlowBudget},
    counters::{Counter, CounterKey, NO_PERSONA, Reason, tracked_slot},
    device::{DEVICE_HAS_V4, DEVICE_HAS_V6, DeviceConfig},
    firewall::{FwKeyV4, FwKeyV6, KEY_HEADER_BITS, MAX_RULESETS, key_header},
    guard::GuardState,
    host::{
        Drain, HostWiring, MAX_UPLINKS, ROUTE_IN_BPF, Routing, WIRED_GATEWAY_V4, WIRED_GATEWAY_V6,
    },
    persona::{Active, MAX_TABLES, PersonaTable},
};
use tracing::info;

use super::{
    ActiveState, Committed, CompiledPersona, Counters, Datapath, DatapathError, DeviceWiring,
    Flipped, Result, Staged,
    compile::Firewall,
    grace::GraceThread,
    maps::Maps,
    programs::{self, Links, Program},
    tables::{META_TABLE, Pair, Prefixes, Tables},
};
mod counters;
mod device;
mod flows;
mod held;
mod introspect;
mod layout;
mod loader;
mod metadata;
mod shift;
mod tables;

pub use layout::remove_pins;

use crate::model::{AddressScope, DeviceSpec, FlowMode};
use held::{Held, read, write};

/// bpf(2)'s flag for "create, never replace".
const BPF_NOEXIST: u64 = 1;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/persona"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/persona";

/// Tables freed per round of housekeeping between jobs: a job arriving meanwhile waits
/// for at most this many.
const TIDY_TABLES: usize = 16;

/// Replaced tables freed per grace period: the wait (~10 ms, on the grace thread) is
/// paid once per batch, not once per shift.
const RECLAIM_BATCH: usize = 64;

#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// Maps are pinned here and links under `links/`.
    pub pin_dir: PathBuf,
    /// The host's interfaces towards the network, which BPF host routing forwards to.
    pub uplinks: Vec<String>,
    /// Set up host routing on the uplinks (off for packet tests).
    pub wire_host: bool,
    /// Hold the pin directory's lock: only one process may change the tables, since
    /// each keeps its own account of free table slots.
    pub exclusive: bool,
    /// Who forwards translated packets between the taps and the uplinks; `None` keeps
    /// what the pinned datapath was last told (the kernel on a fresh one).
    pub routing: Option<HostRouting>,
    /// Devices may reach the metadata service (its daemon serves it).
    pub metadata: bool,
}

/// Who forwards a translated packet between a tap and an uplink. The kernel by
/// default: measured in situ (bpf_stats), the from-VM program's FIB lookup costs more
/// than the host's forwarding it replaces, and throughput is no better (BENCHMARKS.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HostRouting {
    /// The host's IP stack, as for any forwarded packet.
    #[default]
    Kernel,
    /// The programs: a FIB lookup and a redirect, past the host's IP stack (and its
    /// netfilter hooks). What they cannot finish still goes the kernel's way.
    Bpf,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            uplinks: Vec::new(),
            wire_host: true,
            exclusive: true,
            routing: None,
            metadata: true,
        }
    }
}

fn bpf_err(context: &str) -> impl FnOnce(MapError) -> DatapathError + '_ {
    move |e| DatapathError::Bpf(format!("{context}: {e}"))
}

/// Removes `key` from a hash map: one not there is gone already.
fn remove_if_there<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    key: &K,
    name: &str,
) -> Result<()> {
    match map.remove(key) {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() != Some(libc::ENOENT) => {
            Err(DatapathError::Bpf(format!("{name}: {e}")))
        }
        _ => Ok(()),
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Io { context, source }
}

pub struct KernelDatapath {
    ebpf: Ebpf,
    maps: Maps,
    tables: Tables,
    grace: GraceThread,
    config: KernelConfig,
    /// Replaced tables waiting to be handed to the grace thread.
    retired: Vec<u32>,
    /// Handed over, waiting for their grace period to end.
    in_grace: std::collections::HashSet<u32>,
    /// Past their grace period, to be cleared and freed.
    safe: Vec<u32>,
    /// (device, persona) pairs whose last table was freed, to be folded.
    unowned: Vec<Pair>,
    /// `FOLDED` as written, by device.
    folded: counters::Folded,
    /// What each device holds, when this process holds the pin directory's lock: read
    /// by shifts outside this thread, without a job or a syscall per device.
    held: Option<Arc<RwLock<Held>>>,
    /// `COUNTERS` keys at the last full read.
    live_keys: std::cell::Cell<u64>,
    /// Slot 0 as last written, when this process holds the lock: the next generation
    /// without a read.
    meta: Option<PersonaTable>,
    /// The metadata peer slot given last: slots are handed out in turn, so one freed is
    /// not given to the next device while its old connections may still be open.
    metadata_cursor: u32,
    /// `METADATA` as written, when this process holds the lock.
    peers: Option<metadata::Peers>,
    cpus: usize,
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// A per-CPU counter summed over CPUs.
fn summed<'a>(per_cpu: impl IntoIterator<Item = &'a Counter>) -> Counter {
    per_cpu.into_iter().fold(Counter::default(), add)
}

fn add(a: Counter, b: &Counter) -> Counter {
    Counter {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
    }
}

fn lock(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::File::open(dir).map_err(io_err(format!("opening {}", dir.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        DatapathError::Bpf(format!(
            "another persona process holds {} (stop it, or ask it to do this)",
            dir.display()
        ))
    })
}

/// bpffs is not mounted on a fresh machine.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) {
        let mounts = std::fs::read_to_string("/proc/self/mounts")
            .map_err(io_err("reading /proc/self/mounts"))?;
        let mounted = mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
        if !mounted {
            nix::mount::mount(
                Some("bpf"),
                root,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| DatapathError::Bpf(format!("mounting bpffs at /sys/fs/bpf: {e}")))?;
        }
    }
    std::fs::create_dir_all(dir.join("links"))
        .map_err(io_err(format!("creating {}", dir.display())))
}

fn gateways(w: &HostWiring) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if w.flags & WIRED_GATEWAY_V4 != 0 {
        out.push(IpAddr::V4(w.gateway_v4.into()));
    }
    if w.flags & WIRED_GATEWAY_V6 != 0 {
        out.push(IpAddr::V6(w.gateway_v6.into()));
    }
    out
}

impl Datapath for KernelDatapath {
    fn attach(&mut self, device: &DeviceSpec) -> Result<u32> {
        self.attach_device(device)
    }

    fn detach(&mut self, ifindex: u32) -> Result<()> {
        self.detach_device(ifindex)
    }

    fn attached(&self) -> Result<Vec<u32>> {
        Ok(self.maps.devices.keys().flatten().collect())
    }

    fn is_attached(&self, ifindex: u32) -> Result<bool> {
        Ok(self.maps.devices.get(&ifindex, 0).is_ok())
    }

    fn active_addresses(&self, ifindex: u32) -> Result<Vec<IpAddr>> {
        KernelDatapath::active_addresses(self, ifindex)
    }

    fn wiring(&self, ifindex: u32) -> Result<DeviceWiring> {
        self.device_wiring(ifindex)
    }

    fn qos(&self, table: u32) -> Result<Option<persona_common::qos::Qos>> {
        self.maps
            .qos
            .get(&table, 0)
            .map(Some)
            .map_err(bpf_err("QOS"))
    }

    fn metadata_device(&self, peer: std::net::Ipv4Addr) -> Result<Option<u32>> {
        Ok(KernelDatapath::metadata_device(self, peer))
    }

    fn stage(&mut self, persona: &CompiledPersona) -> Result<Staged> {
        self.stage_persona(persona)
    }

    fn prepare(&mut self, persona: &CompiledPersona) -> Result<()> {
        self.resident(&persona.firewall).map(|_| ())
    }

    fn discard(&mut self, staged: Staged) -> Result<()> {
        self.discard_staged(staged)
    }

    fn create_counters(&mut self, ifindex: u32, persona: u32) -> Result<bool> {
        KernelDatapath::create_counters(self, ifindex, persona)
    }

    fn drop_counters(&mut self, ifindex: u32, persona: u32) -> Result<()> {
        KernelDatapath::drop_counters(self, ifindex, persona)
    }

    fn flip(&mut self, ifindex: u32, staged: Staged, flows: FlowMode) -> Result<Flipped> {
        self.flip_to(ifindex, staged, flows)
    }

    fn unflip(&mut self, flipped: &Flipped) -> Result<()> {
        self.unflip_to_previous(flipped)
    }

    fn commit(&mut self, flipped: &Flipped) -> Result<Committed> {
        self.commit_flip(flipped)
    }

    fn forget_drains(&mut self, ifindex: u32, addrs: &[IpAddr]) -> Result<()> {
        self.forget(ifindex, addrs)
    }

    fn active(&self, ifindex: u32) -> Result<Option<ActiveState>> {
        match self.maps.active.get(&ifindex, 0) {
            Ok(a) => Ok(Some(ActiveState {
                table: a.table,
                persona: a.persona,
                generation: a.generation,
            })),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(bpf_err("ACTIVE")(e)),
        }
    }

    fn persona_counters(&self, ifindex: u32) -> Result<BTreeMap<u32, Counters>> {
        self.counters_by_persona(ifindex)
    }

    fn carry_counters(&mut self, ifindex: u32, carried: &BTreeMap<u32, Counters>) -> Result<()> {
        self.carry_counters(ifindex, carried)
    }

    fn handshakes(&self, ifindex: u32) -> Result<(Vec<u64>, u64)> {
        self.handshake_histogram(ifindex)
    }

    fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.maps.events.take()
    }

    fn usage(&self) -> Result<super::Usage> {
        self.map_usage()
    }

    fn flows(&self, ifindex: u32) -> Result<Vec<super::FlowInfo>> {
        self.flow_list(ifindex)
    }

    fn drains_all(&self) -> Result<Vec<(u32, super::DrainInfo)>> {
        KernelDatapath::drains_all(self)
    }

    fn held_addresses(
        &self,
        except: Option<u32>,
        scope: &AddressScope,
    ) -> Result<Vec<super::HeldAddresses>> {
        match &self.held {
            Some(held) => Ok(read(held).within(except, scope)),
            None => super::held_by_lookup(self, except, scope),
        }
    }

    fn held_view(&self) -> Option<super::HeldView> {
        let held = self.held.clone()?;
        Some(Arc::new(move |except, scope| {
            read(&held).within(except, scope)
        }))
    }

    fn sweep(&mut self) -> Result<super::Sweep> {
        KernelDatapath::sweep(self)
    }

    fn tidy(&mut self) -> Result<()> {
        KernelDatapath::tidy(self)
    }

    fn counts_all(&self) -> Result<BTreeMap<u32, super::DeviceCounts>> {
        KernelDatapath::counts_all(self)
    }
}
