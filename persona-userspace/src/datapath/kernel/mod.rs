//! The real datapath: the embedded BPF object loaded into this kernel, maps and links
//! pinned under bpffs so that traffic keeps flowing while the process restarts.
use std::{
    collections::BTreeMap,
    collections::HashMap as StdHashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapError, PerCpuValues, lpm_trie::Key},
    programs::TestRunOptions,
    util::nr_cpus,
};
use persona_common::{
    DIR_EGRESS, DIR_INGRESS,
    conntrack::{DEFAULT_FLOW_BUDGET, FlowBudget},
    counters::{Counter, CounterKey, NO_PERSONA, Reason, tracked_slot},
    device::{DEVICE_HAS_V4, DEVICE_HAS_V6, DeviceConfig},
    firewall::{FwKeyV4, FwKeyV6, KEY_HEADER_BITS, RuleSet, key_header},
    guard::GuardState,
    host::{
        Drain, HostWiring, MAX_UPLINKS, ROUTE_IN_BPF, Routing, WIRED_GATEWAY_V4, WIRED_GATEWAY_V6,
    },
    persona::{Active, MAX_TABLES, PersonaTable},
};
use tracing::info;

use super::{
    ActiveState, CompiledPersona, Counters, Datapath, DatapathError, Result, ShiftOptions, Shifted,
    Staged,
    grace::GraceBarrier,
    maps::Maps,
    programs::{self, Links, Program},
    tables::{META_TABLE, Prefixes, Tables},
};
mod flows;

use flows::drain_key;

use crate::{
    host::Host,
    model::{DeviceSpec, FlowMode},
};

/// bpf(2)'s flag for "create, never replace".
const BPF_NOEXIST: u64 = 1;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/persona"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/persona";

/// Replaced tables freed per grace period: the wait (~10 ms) is paid once per batch,
/// not once per shift.
const RECLAIM_BATCH: usize = 64;

#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// Maps are pinned here and links under `links/`.
    pub pin_dir: PathBuf,
    /// The host's interfaces towards the network, where the persona addresses are
    /// announced by proxy ARP/NDP. Without one only routes are installed.
    pub uplinks: Vec<String>,
    /// Leave the host's routes and neighbour proxies alone (packet tests).
    pub wire_host: bool,
    /// Hold the pin directory's lock: only one process may change the tables, since
    /// each keeps its own account of free table slots.
    pub exclusive: bool,
    /// Who forwards translated packets between the taps and the uplinks; `None` keeps
    /// what the pinned datapath was last told (the kernel on a fresh one).
    pub routing: Option<HostRouting>,
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
        }
    }
}

fn bpf_err(context: &str) -> impl FnOnce(MapError) -> DatapathError + '_ {
    move |e| DatapathError::Bpf(format!("{context}: {e}"))
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Io { context, source }
}

pub struct KernelDatapath {
    ebpf: Ebpf,
    maps: Maps,
    tables: Tables,
    grace: GraceBarrier,
    host: Option<Host>,
    config: KernelConfig,
    retired: Vec<u32>,
    cpus: usize,
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// Copies each prefix under the key `moved` gives it, recording each in `written` as it
/// goes.
fn copy_prefixes<K: aya::Pod>(
    map: &mut aya::maps::LpmTrie<aya::maps::MapData, K, RuleSet>,
    from: &[(u32, K)],
    moved: impl Fn(K) -> K,
    written: &mut Vec<(u32, K)>,
) -> Result<()> {
    for &(len, key) in from {
        let rules = map
            .get(&Key::new(len, key), 0)
            .map_err(bpf_err("firewall prefix"))?;
        let to = moved(key);
        map.insert(&Key::new(len, to), rules, 0)
            .map_err(bpf_err("firewall prefix"))?;
        written.push((len, to));
    }
    Ok(())
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

impl KernelDatapath {
    /// Loads the programs and opens the maps, re-using pinned ones: after a restart the
    /// devices, active personas, flows and counters are all still there.
    pub fn open(config: KernelConfig) -> Result<Self> {
        programs::check_kernel()?;
        ensure_bpffs(&config.pin_dir)?;
        let lock = if config.exclusive {
            Some(lock(&config.pin_dir)?)
        } else {
            None
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&config.pin_dir)
            .load(EBPF_OBJECT)
            .map_err(|e| DatapathError::Bpf(format!("loading the BPF object: {e}")))?;
        programs::load(&mut ebpf)?;
        let maps = Maps::take(&mut ebpf)?;
        let in_use: Vec<u32> = maps
            .active
            .iter()
            .filter_map(|r| r.ok().map(|(_, a)| a.table))
            .collect();
        let mut found: StdHashMap<u32, Prefixes> = StdHashMap::new();
        for key in maps.fw_v4.keys().flatten() {
            let table = u32::from_be_bytes(key.data().table);
            found
                .entry(table)
                .or_default()
                .v4
                .push((key.prefix_len(), key.data()));
        }
        for key in maps.fw_v6.keys().flatten() {
            let table = u32::from_be_bytes(key.data().table);
            found
                .entry(table)
                .or_default()
                .v6
                .push((key.prefix_len(), key.data()));
        }
        if !in_use.is_empty() {
            info!(devices = in_use.len(), pin_dir = %config.pin_dir.display(), "re-using pinned datapath");
        }
        let host = if config.wire_host {
            Some(Host::new(&config.uplinks)?)
        } else {
            None
        };
        let mut dp = Self {
            ebpf,
            maps,
            tables: Tables::recover(in_use, found),
            grace: GraceBarrier::new().map_err(io_err("creating the grace-period map"))?,
            host,
            config,
            retired: Vec::new(),
            cpus: nr_cpus().map_err(|(_, e)| io_err("counting CPUs")(e))?,
            _lock: lock,
        };
        if dp.config.wire_host {
            dp.route()?;
        }
        // Tables retired but not freed when the last process stopped still hold counts;
        // only a table that was flipped in can have any.
        if dp.config.exclusive {
            let free: Vec<u32> = dp.tables.free().collect();
            for table in free {
                if dp.persona_table(table)?.owner_ifindex != 0 {
                    dp.harvest(table)?;
                }
            }
        }
        Ok(dp)
    }

    /// Tells the programs who forwards, and attaches (or removes) the uplinks' program.
    fn route(&mut self) -> Result<()> {
        let uplinks = self
            .config
            .uplinks
            .iter()
            .map(|name| super::ifindex(name))
            .collect::<Result<Vec<u32>>>()?;
        // Without uplinks there is nothing to route to: a maintenance command leaves
        // whatever the daemon set alone.
        if uplinks.is_empty() {
            return Ok(());
        }
        if uplinks.len() > MAX_UPLINKS {
            return Err(DatapathError::Bpf(format!(
                "at most {MAX_UPLINKS} uplinks, {} given",
                uplinks.len()
            )));
        }
        let before = self.maps.routing.get(&0, 0).map_err(bpf_err("ROUTING"))?;
        let mode = self
            .config
            .routing
            .unwrap_or(if before.flags & ROUTE_IN_BPF != 0 {
                HostRouting::Bpf
            } else {
                HostRouting::Kernel
            });
        let on = mode == HostRouting::Bpf;
        let mut routing = Routing {
            flags: if on { ROUTE_IN_BPF } else { 0 },
            ..Routing::default()
        };
        routing.uplinks[..uplinks.len()].copy_from_slice(&uplinks);
        for &ifindex in &uplinks {
            Links::new(&self.config.pin_dir, ifindex).route_from_uplink(&mut self.ebpf, on)?;
        }
        for &gone in before
            .uplinks
            .iter()
            .filter(|&&u| u != 0 && !uplinks.contains(&u))
        {
            Links::new(&self.config.pin_dir, gone).route_from_uplink(&mut self.ebpf, false)?;
        }
        self.maps
            .routing
            .set(0, routing, 0)
            .map_err(bpf_err("ROUTING"))?;
        info!(routing = ?mode, uplinks = uplinks.len(), "host routing");
        Ok(())
    }

    /// Creates the device's counters for a persona, keeping those that exist. Every key
    /// exists before the first packet, so the kernel only ever increments and no count
    /// is lost to two CPUs creating the same key at once.
    fn create_counters(&mut self, ifindex: u32, persona: u32) -> Result<()> {
        let key = |direction, reason: Reason| CounterKey {
            ifindex,
            persona,
            direction,
            reason: reason as u8,
            _pad: [0; 2],
        };
        // Keys are created in order, the last one last: when it exists, all do, and a
        // shift back to a persona costs one lookup here, not one insert per key.
        let last = *Reason::ALL.last().expect("reasons");
        if self.maps.counters.get(&key(DIR_INGRESS, last), 0).is_ok() {
            return Ok(());
        }
        for direction in [DIR_EGRESS, DIR_INGRESS] {
            for reason in Reason::ALL {
                let key = key(direction, *reason);
                match self.maps.counters.insert(key, self.zeroed()?, BPF_NOEXIST) {
                    Ok(()) => {}
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(bpf_err("COUNTERS")(e)),
                }
            }
        }
        Ok(())
    }

    /// Writes the device's identity and zeroed counters without attaching anything:
    /// enough for BPF_PROG_TEST_RUN, which runs as if on the loopback device.
    pub fn configure_device(&mut self, ifindex: u32, device: &DeviceSpec) -> Result<()> {
        device.validate()?;
        let mut cfg = DeviceConfig {
            mac: device.mac_bytes()?,
            ..Default::default()
        };
        if let Some(a) = device.inner_v4 {
            cfg.inner_v4 = a.octets();
            cfg.flags |= DEVICE_HAS_V4;
        }
        if let Some(a) = device.inner_v6 {
            cfg.inner_v6 = a.octets();
            cfg.flags |= DEVICE_HAS_V6;
        }
        self.maps
            .devices
            .insert(ifindex, cfg, 0)
            .map_err(bpf_err("DEVICES"))?;
        self.restamp(ifindex, &cfg)?;
        self.create_counters(ifindex, NO_PERSONA)?;
        match device.flood_guard_rate() {
            Some(rate_pps) => self
                .maps
                .guard
                .insert(
                    ifindex,
                    GuardState {
                        rate_pps,
                        ..Default::default()
                    },
                    0,
                )
                .map_err(bpf_err("GUARD"))?,
            None => match self.maps.guard.remove(&ifindex) {
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() != Some(libc::ENOENT) =>
                {
                    return Err(DatapathError::Bpf(format!("GUARD: {e}")));
                }
                _ => {}
            },
        }
        let budget = FlowBudget {
            limit: u64::from(device.flow_budget.unwrap_or(DEFAULT_FLOW_BUDGET)),
            used: self.maps.flow_budget.get(&ifindex, 0).map_or(0, |b| b.used),
        };
        self.maps
            .flow_budget
            .insert(ifindex, budget, 0)
            .map_err(bpf_err("FLOW_BUDGET"))?;
        let mut wiring = HostWiring::default();
        if let Some(gw) = device.gateway_v4 {
            wiring.gateway_v4 = gw.octets();
            wiring.flags |= WIRED_GATEWAY_V4;
        }
        if let Some(gw) = device.gateway_v6 {
            wiring.gateway_v6 = gw.octets();
            wiring.flags |= WIRED_GATEWAY_V6;
        }
        self.maps
            .host_wiring
            .insert(ifindex, wiring, 0)
            .map_err(bpf_err("HOST_WIRING"))?;
        Ok(())
    }

    /// A device whose own addresses changed while a persona is active gets a copy of
    /// its table with the new identity, flipped in like a shift: a table is never
    /// rewritten while a program may read it.
    fn restamp(&mut self, ifindex: u32, cfg: &DeviceConfig) -> Result<()> {
        let Ok(active) = self.maps.active.get(&ifindex, 0) else {
            return Ok(());
        };
        let mut table = self.persona_table(active.table)?;
        if (table.inner_v4, table.inner_v6, table.device_flags)
            == (cfg.inner_v4, cfg.inner_v6, cfg.flags)
        {
            return Ok(());
        }
        table.inner_v4 = cfg.inner_v4;
        table.inner_v6 = cfg.inner_v6;
        table.device_flags = cfg.flags;
        let slot = self.alloc_table()?;
        if let Err(e) = self.copy_into(active.table, slot, table) {
            let _ = self.clear_table(slot);
            self.tables.release(slot);
            return Err(e);
        }
        self.maps
            .active
            .insert(
                ifindex,
                Active {
                    table: slot,
                    ..active
                },
                0,
            )
            .map_err(bpf_err("ACTIVE"))?;
        info!(
            ifindex,
            "the device's own addresses changed: its table was copied"
        );
        self.retire(active.table)
    }

    /// `table` with `from`'s firewall prefixes, written into the free slot `to`.
    fn copy_into(&mut self, from: u32, to: u32, table: PersonaTable) -> Result<()> {
        self.clear_table(to)?;
        let old = self.tables.take_prefixes(from);
        let (t, _) = key_header(to, 0);
        let mut written = Prefixes::default();
        let result = copy_prefixes(
            &mut self.maps.fw_v4,
            &old.v4,
            |k| FwKeyV4 { table: t, ..k },
            &mut written.v4,
        )
        .and_then(|()| {
            copy_prefixes(
                &mut self.maps.fw_v6,
                &old.v6,
                |k| FwKeyV6 { table: t, ..k },
                &mut written.v6,
            )
        });
        self.tables.set_prefixes(from, old);
        self.tables.set_prefixes(to, written);
        result?;
        self.maps
            .personas
            .set(to, table, 0)
            .map_err(bpf_err("PERSONAS"))
    }

    /// Writes the persona's prefixes under `table`, recording each in `written` as it
    /// goes, so that a failure part-way leaves a record of what to remove.
    fn write_prefixes(
        &mut self,
        table: u32,
        persona: &CompiledPersona,
        written: &mut Prefixes,
    ) -> Result<()> {
        for p in &persona.v4 {
            let (t, d) = key_header(table, p.direction);
            let data = FwKeyV4 {
                table: t,
                direction: d,
                addr: p.net.network().octets(),
            };
            let len = KEY_HEADER_BITS + p.net.prefix_len() as u32;
            self.maps
                .fw_v4
                .insert(&Key::new(len, data), p.rules, 0)
                .map_err(bpf_err("FW_V4"))?;
            written.v4.push((len, data));
        }
        for p in &persona.v6 {
            let (t, d) = key_header(table, p.direction);
            let data = FwKeyV6 {
                table: t,
                direction: d,
                addr: p.net.network().octets(),
            };
            let len = KEY_HEADER_BITS + p.net.prefix_len() as u32;
            self.maps
                .fw_v6
                .insert(&Key::new(len, data), p.rules, 0)
                .map_err(bpf_err("FW_V6"))?;
            written.v6.push((len, data));
        }
        Ok(())
    }

    /// Writes the prefixes into `table`, or leaves it empty.
    fn write_into(&mut self, table: u32, persona: &CompiledPersona) -> Result<()> {
        let mut written = Prefixes::default();
        let result = self.write_prefixes(table, persona, &mut written);
        self.tables.set_prefixes(table, written);
        if result.is_err() {
            let _ = self.clear_table(table);
        }
        result
    }

    fn clear_table(&mut self, table: u32) -> Result<()> {
        self.harvest(table)?;
        let old = self.tables.take_prefixes(table);
        for (len, data) in old.v4 {
            let _ = self.maps.fw_v4.remove(&Key::new(len, data));
        }
        for (len, data) in old.v6 {
            let _ = self.maps.fw_v6.remove(&Key::new(len, data));
        }
        self.maps
            .personas
            .set(table, PersonaTable::default(), 0)
            .map_err(bpf_err("PERSONAS"))
    }

    /// The tracked-flow packets a table counted, per direction and summed over CPUs.
    fn tracked(&self, table: u32) -> Result<[(u8, Counter); 2]> {
        let read = |direction| -> Result<(u8, Counter)> {
            let values = self
                .maps
                .tracked
                .get(&tracked_slot(table, direction), 0)
                .map_err(bpf_err("TRACKED"))?;
            Ok((direction, values.iter().fold(Counter::default(), add)))
        };
        Ok([read(DIR_EGRESS)?, read(DIR_INGRESS)?])
    }

    /// Moves a freed table's tracked-flow counts into its device's `allow_tracked` keys
    /// (which only userspace writes), and zeroes them for the slot's next owner. Safe
    /// only once no program can be using the table.
    fn harvest(&mut self, table: u32) -> Result<()> {
        let owner = self.persona_table(table)?;
        let attached =
            owner.owner_ifindex != 0 && self.maps.devices.get(&owner.owner_ifindex, 0).is_ok();
        for direction in [DIR_EGRESS, DIR_INGRESS] {
            let slot = tracked_slot(table, direction);
            let counted = self
                .maps
                .tracked
                .get(&slot, 0)
                .map_err(bpf_err("TRACKED"))?;
            if counted.iter().all(|c| c.packets == 0) {
                continue;
            }
            if attached {
                let key = CounterKey {
                    ifindex: owner.owner_ifindex,
                    persona: owner.owner_persona,
                    direction,
                    reason: Reason::AllowTracked as u8,
                    _pad: [0; 2],
                };
                let before = match self.maps.counters.get(&key, 0) {
                    Ok(v) => v,
                    Err(_) => self.zeroed()?,
                };
                let sum: Vec<Counter> = before
                    .iter()
                    .zip(counted.iter())
                    .map(|(b, c)| add(*b, c))
                    .collect();
                let sum = PerCpuValues::try_from(sum)
                    .map_err(|e| DatapathError::Bpf(format!("COUNTERS: {e}")))?;
                self.maps
                    .counters
                    .insert(key, sum, 0)
                    .map_err(bpf_err("COUNTERS"))?;
            }
            self.maps
                .tracked
                .set(slot, self.zeroed()?, 0)
                .map_err(bpf_err("TRACKED"))?;
        }
        Ok(())
    }

    /// A free table slot, freeing the retired ones first when none is left.
    fn alloc_table(&mut self) -> Result<u32> {
        match self.tables.alloc() {
            Err(DatapathError::TablesExhausted(_)) if !self.retired.is_empty() => {
                self.reclaim()?;
                self.tables.alloc()
            }
            other => other,
        }
    }

    /// A counter of zeros for every CPU.
    fn zeroed(&self) -> Result<PerCpuValues<Counter>> {
        PerCpuValues::try_from(vec![Counter::default(); self.cpus])
            .map_err(|e| DatapathError::Bpf(format!("per-CPU counter: {e}")))
    }

    /// Queues a table no device points at any more. It is freed by the next
    /// [`reclaim`](Self::reclaim), which one grace period makes safe for the whole batch.
    fn retire(&mut self, table: u32) -> Result<()> {
        self.retired.push(table);
        if self.retired.len() >= RECLAIM_BATCH {
            self.reclaim()?;
        }
        Ok(())
    }

    /// Frees every retired table once no program run can still be reading any of them.
    pub fn reclaim(&mut self) -> Result<()> {
        if self.retired.is_empty() {
            return Ok(());
        }
        self.grace
            .wait()
            .map_err(io_err("waiting for an RCU grace period"))?;
        // One at a time: a failure leaves the rest listed, to be freed next time.
        while let Some(&table) = self.retired.last() {
            self.clear_table(table)?;
            self.retired.pop();
            self.tables.release(table);
        }
        Ok(())
    }

    fn persona_table(&self, table: u32) -> Result<PersonaTable> {
        self.maps
            .personas
            .get(&table, 0)
            .map_err(bpf_err("PERSONAS"))
    }

    fn next_generation(&mut self) -> Result<u64> {
        let mut meta = self.persona_table(META_TABLE)?;
        meta.generation += 1;
        self.maps
            .personas
            .set(META_TABLE, meta, 0)
            .map_err(bpf_err("PERSONAS"))?;
        Ok(meta.generation)
    }

    fn host_addresses(table: &PersonaTable) -> Vec<IpAddr> {
        let compiled = CompiledPersona {
            id: 0,
            table: *table,
            gateways: vec![],
            vpn: None,
            v4: vec![],
            v6: vec![],
        };
        compiled.addresses()
    }

    fn wiring(&self, ifindex: u32) -> HostWiring {
        self.maps.host_wiring.get(&ifindex, 0).unwrap_or_default()
    }

    fn inner_addresses(&self, ifindex: u32) -> Result<Vec<IpAddr>> {
        let cfg = self
            .maps
            .devices
            .get(&ifindex, 0)
            .map_err(|_| DatapathError::NotAttached(ifindex))?;
        let d = DeviceSpec::from_config(String::new(), &cfg);
        Ok(d.inner_v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(d.inner_v6.map(IpAddr::V6))
            .collect())
    }

    /// The addresses the network sees for a device right now.
    pub fn active_addresses(&self, ifindex: u32) -> Result<Vec<IpAddr>> {
        match self.active(ifindex)? {
            Some(a) => Ok(Self::host_addresses(&self.persona_table(a.table)?)),
            None => Ok(Vec::new()),
        }
    }

    pub fn host(&self) -> Option<&Host> {
        self.host.as_ref()
    }

    pub fn tables_in_use(&self) -> usize {
        self.tables.in_use()
    }

    /// Runs a program once on `frame` through BPF_PROG_TEST_RUN, as if on the loopback
    /// device; returns the program's verdict and the frame as it left.
    pub fn test_run(&mut self, program: Program, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        };
        let result = programs::test_run(&mut self.ebpf, program, opts)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Runs a tc program once on `frame` as if it were a GSO skb of `segs` segments of
    /// `size` payload bytes; returns the verdict.
    pub fn test_run_gso(
        &mut self,
        program: Program,
        frame: &[u8],
        segs: u32,
        size: u32,
    ) -> Result<u32> {
        // struct __sk_buff (include/uapi/linux/bpf.h): the only fields a test run may
        // set besides a few others left zero.
        const SIZE: usize = 192;
        const GSO_SEGS: usize = 164;
        const GSO_SIZE: usize = 176;
        let mut ctx = [0u8; SIZE];
        ctx[GSO_SEGS..GSO_SEGS + 4].copy_from_slice(&segs.to_ne_bytes());
        ctx[GSO_SIZE..GSO_SIZE + 4].copy_from_slice(&size.to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        };
        Ok(programs::test_run(&mut self.ebpf, program, opts)?.return_value)
    }

    /// Average time per run over `repeat` runs of the same frame.
    pub fn bench(
        &mut self,
        program: Program,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::new()
        };
        Ok(programs::test_run(&mut self.ebpf, program, opts)?.duration)
    }
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
        device.validate()?;
        let ifindex = super::ifindex(&device.interface)?;
        self.configure_device(ifindex, device)?;
        if let Some(host) = &self.host {
            host.prepare_device(ifindex, device)?;
        }
        Links::new(&self.config.pin_dir, ifindex)
            .attach(&mut self.ebpf, device.flood_guard_rate().is_some())?;
        info!(interface = %device.interface, ifindex, "attached");
        Ok(ifindex)
    }

    fn detach(&mut self, ifindex: u32) -> Result<()> {
        if self.maps.devices.get(&ifindex, 0).is_err() {
            return Err(DatapathError::NotAttached(ifindex));
        }
        Links::new(&self.config.pin_dir, ifindex).detach()?;
        let _ = self.maps.guard.remove(&ifindex);
        let active = self.maps.active.get(&ifindex, 0).ok();
        let _ = self.maps.active.remove(&ifindex);
        let wiring = self.wiring(ifindex);
        let drains = Datapath::drains(self, ifindex)?;
        if let Some(host) = &self.host {
            let mut addrs: Vec<IpAddr> = drains.iter().map(|d| d.addr).collect();
            if let Some(a) = active {
                addrs.extend(Self::host_addresses(&self.persona_table(a.table)?));
            }
            host.withdraw_persona(ifindex, &addrs)?;
            host.release_device(ifindex, &gateways(&wiring))?;
        }
        for d in drains {
            let _ = self.maps.drains.remove(&drain_key(ifindex, d.addr));
        }
        let _ = self.maps.flow_budget.remove(&ifindex);
        let _ = self.maps.host_wiring.remove(&ifindex);
        let _ = self.maps.devices.remove(&ifindex);
        let keys: Vec<CounterKey> = self
            .maps
            .counters
            .keys()
            .flatten()
            .filter(|k| k.ifindex == ifindex)
            .collect();
        for k in keys {
            let _ = self.maps.counters.remove(&k);
        }
        let flows: Vec<_> = self
            .maps
            .conntrack
            .keys()
            .flatten()
            .filter(|k| k.ifindex == ifindex)
            .collect();
        for k in flows {
            let _ = self.maps.conntrack.remove(&k);
        }
        if let Some(a) = active {
            self.retire(a.table)?;
        }
        self.reclaim()?;
        info!(ifindex, "detached");
        Ok(())
    }

    fn stage(&mut self, persona: &CompiledPersona) -> Result<Staged> {
        let table = self.alloc_table()?;
        // A slot may hold leftovers of a stage a crash cut short.
        if let Err(e) = self.clear_table(table) {
            self.tables.release(table);
            return Err(e);
        }
        let mut result = self.write_into(table, persona);
        if result.is_err() && !self.retired.is_empty() {
            // The firewall maps may be full of retired tables' prefixes: free them now
            // rather than at the end of the batch, and try once more.
            self.reclaim()?;
            result = self.write_into(table, persona);
        }
        if let Err(e) = result {
            self.tables.release(table);
            return Err(e);
        }
        if let Err(e) = self
            .maps
            .personas
            .set(table, persona.table, 0)
            .map_err(bpf_err("PERSONAS"))
        {
            let _ = self.clear_table(table);
            self.tables.release(table);
            return Err(e);
        }
        Ok(Staged {
            table,
            persona: persona.clone(),
        })
    }

    fn discard(&mut self, staged: Staged) -> Result<()> {
        // Never visible to a program: no grace period needed.
        self.clear_table(staged.table)?;
        self.tables.release(staged.table);
        Ok(())
    }

    fn shift(&mut self, ifindex: u32, staged: Staged, options: ShiftOptions) -> Result<Shifted> {
        let Ok(device) = self.maps.devices.get(&ifindex, 0) else {
            self.discard(staged)?;
            return Err(DatapathError::NotAttached(ifindex));
        };
        let previous = self.maps.active.get(&ifindex, 0).ok();
        let previous_table = match previous {
            Some(a) => Some(self.persona_table(a.table)?),
            None => None,
        };
        let generation = self.next_generation()?;
        let mut table = staged.persona.table;
        table.generation = generation;
        table.inner_v4 = device.inner_v4;
        table.inner_v6 = device.inner_v6;
        table.device_flags = device.flags;
        table.owner_ifindex = ifindex;
        table.owner_persona = staged.persona.id;
        let inherited = previous_table.unwrap_or_default();
        (table.ct_floor, table.move_floor) = match options.flows {
            FlowMode::Keep => (inherited.ct_floor, inherited.move_floor),
            FlowMode::Move => (inherited.ct_floor, generation),
            FlowMode::Cut => (generation, generation),
        };
        self.maps
            .personas
            .set(staged.table, table, 0)
            .map_err(bpf_err("PERSONAS"))?;
        let new_addrs = staged.persona.addresses();
        if let Some(host) = &self.host {
            let inner = self.inner_addresses(ifindex)?;
            host.announce_persona(ifindex, &new_addrs, &inner, &staged.persona)?;
        }

        self.create_counters(ifindex, staged.persona.id)?;
        let start = Instant::now();
        self.maps
            .active
            .insert(
                ifindex,
                Active {
                    table: staged.table,
                    persona: staged.persona.id,
                    generation,
                },
                0,
            )
            .map_err(bpf_err("ACTIVE"))?;
        let flip = start.elapsed();

        // The new persona's addresses are its own again, draining no more.
        for &addr in &new_addrs {
            let _ = self.maps.drains.remove(&drain_key(ifindex, addr));
        }
        let mut resets = 0;
        if let (Some(prev), Some(prev_table)) = (previous, previous_table) {
            let prev_addrs: Vec<IpAddr> = Self::host_addresses(&prev_table)
                .into_iter()
                .filter(|a| !new_addrs.contains(a))
                .collect();
            if options.flows == FlowMode::Cut {
                resets = self.reset_flows(ifindex, &device, prev_table.ct_floor, generation)?;
                let mut gone: Vec<IpAddr> = Datapath::drains(self, ifindex)?
                    .iter()
                    .map(|d| d.addr)
                    .collect();
                gone.extend(prev_addrs);
                self.withdraw(ifindex, &gone)?;
            } else {
                // Flows bound to the previous addresses keep them routed until the sweep
                // finds none left.
                for addr in prev_addrs {
                    let drain = Drain {
                        persona: prev.persona,
                        _pad: 0,
                        generation,
                    };
                    self.maps
                        .drains
                        .insert(drain_key(ifindex, addr), drain, BPF_NOEXIST)
                        .or_else(|e| match e {
                            MapError::SyscallError(ref s)
                                if s.io_error.raw_os_error() == Some(libc::EEXIST) =>
                            {
                                Ok(())
                            }
                            e => Err(bpf_err("DRAINS")(e)),
                        })?;
                }
            }
            self.retire(prev.table)?;
        }
        Ok(Shifted {
            generation,
            table: staged.table,
            previous_table: previous.map(|p| p.table),
            flip,
            resets,
        })
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

    fn handshakes(&self, ifindex: u32) -> Result<(Vec<u64>, u64)> {
        use persona_common::counters::{HANDSHAKE_BUCKETS, HANDSHAKE_SUM, HandshakeKey};
        let read = |bucket: u32| -> u64 {
            self.maps
                .handshakes
                .get(&HandshakeKey { ifindex, bucket }, 0)
                .map_or(0, |per_cpu| per_cpu.iter().sum())
        };
        Ok((
            (0..HANDSHAKE_BUCKETS).map(read).collect(),
            read(HANDSHAKE_SUM),
        ))
    }

    fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.maps.events.take()
    }

    fn usage(&self) -> Result<super::Usage> {
        use persona_common::{
            conntrack::CT_MAX_ENTRIES, device::MAX_DEVICES, firewall::MAX_PREFIXES,
            persona::MAX_TABLES,
        };
        let count = |n: usize| n as u64;
        Ok(super::Usage {
            maps: vec![
                (
                    "devices",
                    count(self.maps.devices.keys().count()),
                    MAX_DEVICES as u64,
                ),
                (
                    "persona_tables",
                    count(self.tables.in_use()),
                    (MAX_TABLES - 1) as u64,
                ),
                (
                    "fw_v4",
                    count(self.maps.fw_v4.keys().count()),
                    MAX_PREFIXES as u64,
                ),
                (
                    "fw_v6",
                    count(self.maps.fw_v6.keys().count()),
                    MAX_PREFIXES as u64,
                ),
                (
                    "conntrack",
                    count(self.maps.conntrack.keys().count()),
                    CT_MAX_ENTRIES as u64,
                ),
            ],
        })
    }

    fn flows(&self, ifindex: u32) -> Result<Vec<super::FlowInfo>> {
        self.flow_list(ifindex)
    }

    fn drains_all(&self) -> Result<Vec<(u32, super::DrainInfo)>> {
        KernelDatapath::drains_all(self)
    }

    fn sweep(&mut self) -> Result<super::Sweep> {
        KernelDatapath::sweep(self)
    }

    fn persona_counters(&self, ifindex: u32) -> Result<BTreeMap<u32, Counters>> {
        let mut out: BTreeMap<u32, Counters> = BTreeMap::new();
        for key in self.maps.counters.keys() {
            let key = key.map_err(bpf_err("COUNTERS"))?;
            if key.ifindex != ifindex {
                continue;
            }
            let Some(reason) = Reason::from_u8(key.reason) else {
                continue;
            };
            let values = self
                .maps
                .counters
                .get(&key, 0)
                .map_err(bpf_err("COUNTERS"))?;
            let sum = values.iter().fold(Counter::default(), add);
            out.entry(key.persona)
                .or_default()
                .insert((key.direction, reason), sum);
        }
        // Tracked flows of the tables still live: the active one, and those retired
        // but not yet freed, which only the process holding the lock knows of; any other
        // reads every slot (a freed one holds no counts).
        let tables: Vec<u32> = if self.config.exclusive {
            let active = self.maps.active.get(&ifindex, 0).ok().map(|a| a.table);
            active
                .into_iter()
                .chain(self.retired.iter().copied())
                .collect()
        } else {
            (META_TABLE + 1..MAX_TABLES).collect()
        };
        for table in tables {
            let owner = self.persona_table(table)?;
            if owner.owner_ifindex != ifindex {
                continue;
            }
            for (direction, counted) in self.tracked(table)? {
                let c = out
                    .entry(owner.owner_persona)
                    .or_default()
                    .entry((direction, Reason::AllowTracked))
                    .or_default();
                *c = add(*c, &counted);
            }
        }
        Ok(out)
    }
}
