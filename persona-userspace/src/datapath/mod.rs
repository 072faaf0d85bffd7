//! The datapath: BPF programs on tap devices and the tables they read.
//!
//! [`Datapath`] is what the control plane drives; [`kernel::KernelDatapath`] is the real
//! one, [`fake::FakeDatapath`] stands in for it in unit tests of logic above it.
pub mod batch;
pub mod compile;
pub mod fake;
mod grace;
pub mod kernel;
pub mod maps;
mod names;
pub mod programs;
pub(crate) mod reset;
mod tables;
pub mod worker;

use std::collections::BTreeMap;

pub use compile::{CompiledPersona, compile};
pub use names::Names;
use persona_common::counters::{Counter, Reason};

use crate::model::{AddressScope, DeviceSpec, FlowMode};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("interface {0:?} not found")]
    NoSuchInterface(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("device {0} is not attached")]
    NotAttached(u32),
    #[error("all {0} persona table slots are in use")]
    TablesExhausted(u32),
    #[error("{0}")]
    Invalid(#[from] crate::model::FieldError),
    #[error("BPF: {0}")]
    Bpf(String),
    #[error("{0}")]
    Layout(String),
    #[error("host wiring: {0}")]
    Host(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// The ifindex of an interface in this network namespace.
pub fn ifindex(interface: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(interface)
        .map_err(|_| DatapathError::NoSuchInterface(interface.to_owned()))
}

/// Frames the interface has taken in from its VM since it was made, as the kernel
/// counts them (`/proc/net/dev` is of this process's namespace, whatever sysfs shows).
pub fn received_frames(ifindex: u32) -> Result<u64> {
    let gone = || DatapathError::NoSuchInterface(ifindex.to_string());
    let name = nix::net::if_::if_indextoname(ifindex).map_err(|_| gone())?;
    let name = name.to_string_lossy();
    let table = std::fs::read_to_string("/proc/net/dev").map_err(|_| gone())?;
    table
        .lines()
        .find_map(|l| {
            let (iface, counts) = l.split_once(':')?;
            (iface.trim() == name).then(|| counts.split_whitespace().nth(1)?.parse().ok())?
        })
        .ok_or_else(gone)
}

/// A persona written into a free table slot, not yet visible to any packet.
#[derive(Debug)]
#[must_use = "a staged persona holds a table slot until it is shifted to or discarded"]
pub struct Staged {
    pub(crate) table: u32,
    /// The resident firewall ruleset the table names.
    pub(crate) rules: u32,
    pub(crate) persona: CompiledPersona,
}

impl Staged {
    pub fn table(&self) -> u32 {
        self.table
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShiftOptions {
    /// What happens to the flows the device has open.
    pub flows: FlowMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shifted {
    pub generation: u64,
    pub table: u32,
    pub previous_table: Option<u32>,
    /// Time spent in the one map update that made the persona active.
    pub flip: std::time::Duration,
    /// TCP connections of the VM reset by a `cut`.
    pub resets: usize,
}

/// Packets and bytes per direction and reason, summed over CPUs.
pub type Counters = BTreeMap<(u8, Reason), Counter>;

/// What a device counted: by persona id, and its TCP handshake histogram.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    pub by_persona: BTreeMap<u32, Counters>,
    pub handshakes: (Vec<u64>, u64),
}

/// A tracked flow of a device, seen from the VM: the remote end, the persona address
/// the flow uses, and how long ago the last packet went either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    pub proto: u8,
    pub remote: std::net::IpAddr,
    pub remote_port: u16,
    pub local_port: u16,
    pub binding: std::net::IpAddr,
    /// TCP: both ends closed, or reset; the entry only waits for stragglers.
    pub closed: bool,
    pub idle: std::time::Duration,
}

/// [`Datapath::held_addresses`] asked of each device in turn.
pub fn held_by_lookup<D: Datapath + ?Sized>(
    dp: &D,
    except: Option<u32>,
    scope: &AddressScope,
) -> Result<Vec<HeldAddresses>> {
    let mut draining: std::collections::HashMap<u32, Vec<std::net::IpAddr>> = Default::default();
    for (i, d) in dp.drains_all()? {
        if scope.contains(&d.addr) {
            draining.entry(i).or_default().push(d.addr);
        }
    }
    let mut held = Vec::new();
    for ifindex in dp.attached()?.into_iter().filter(|&i| Some(i) != except) {
        let mut active = dp.active_addresses(ifindex)?;
        active.retain(|a| scope.contains(a));
        active.sort();
        let mut draining = draining.remove(&ifindex).unwrap_or_default();
        draining.sort();
        if !active.is_empty() || !draining.is_empty() {
            held.push(HeldAddresses {
                ifindex,
                active,
                draining,
            });
        }
    }
    Ok(held)
}

/// [`Datapath::held_addresses`] answered outside the datapath's thread.
pub type HeldView =
    std::sync::Arc<dyn Fn(Option<u32>, &AddressScope) -> Vec<HeldAddresses> + Send + Sync>;

/// The addresses one device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldAddresses {
    pub ifindex: u32,
    pub active: Vec<std::net::IpAddr>,
    pub draining: Vec<std::net::IpAddr>,
}

/// An address of an earlier persona still routed to a device for the flows using it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainInfo {
    pub addr: std::net::IpAddr,
    /// The id of the persona it belonged to.
    pub persona: u32,
    /// The generation of the shift away from it.
    pub generation: u64,
}

/// What one sweep of connection tracking found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Live flows per device (ifindex).
    pub flows: BTreeMap<u32, u32>,
    /// Per device, each draining address with the number of open flows using it.
    pub draining: BTreeMap<u32, Vec<(DrainInfo, u32)>>,
    /// Addresses whose last flow ended, to be withdrawn.
    pub released: Vec<(u32, std::net::IpAddr)>,
    /// Dead entries removed.
    pub removed: usize,
}

/// Entries in use and capacity, per map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub maps: Vec<(&'static str, u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveState {
    pub table: u32,
    /// The persona's id ([`CompiledPersona::id`]), which its counters are kept by.
    pub persona: u32,
    pub generation: u64,
}

/// A flip done but not yet committed: everything needed to undo it, or to finish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flipped {
    pub ifindex: u32,
    pub generation: u64,
    pub table: u32,
    /// The persona id flipped in.
    pub persona: u32,
    /// What the device ran before, `None` when nothing.
    pub previous: Option<ActiveState>,
    pub flows: FlowMode,
    pub flip: std::time::Duration,
    /// The table flipped in and the one it replaced, as written: the commit's to read
    /// without a map lookup. None from a datapath without tables.
    pub(crate) tables: Option<Box<[persona_common::persona::PersonaTable; 2]>>,
}

/// What committing a flip left for the host: addresses to withdraw now (a `cut`'s).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    pub resets: usize,
    pub release: Vec<std::net::IpAddr>,
}

/// What the host has wired for a device, as the datapath records it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceWiring {
    /// The VM's own addresses, which persona addresses are routed via.
    pub inner: Vec<std::net::IpAddr>,
    /// The active persona's addresses.
    pub active: Vec<std::net::IpAddr>,
    /// Earlier personas' addresses still draining.
    pub draining: Vec<std::net::IpAddr>,
    pub gateways: Vec<std::net::IpAddr>,
    /// The address the device's requests to the metadata service come from.
    pub metadata: Option<std::net::Ipv4Addr>,
}

/// BPF maps and programs only: the host around them (routes, proxies, tunnels) is
/// [`crate::host::Wiring`]'s, and the shift transaction ([`crate::node`]) drives both.
pub trait Datapath {
    /// Configures the device and attaches both programs. Until a shift, the device's
    /// IP traffic is dropped (`drop_no_persona`): nothing leaves with the VM's own
    /// address.
    fn attach(&mut self, device: &DeviceSpec) -> Result<u32>;
    fn detach(&mut self, ifindex: u32) -> Result<()>;
    /// The ifindexes of every attached device, as the maps record them (some may be of
    /// interfaces gone while no daemon watched).
    fn attached(&self) -> Result<Vec<u32>>;
    fn is_attached(&self, ifindex: u32) -> Result<bool> {
        Ok(self.attached()?.contains(&ifindex))
    }
    /// The host wiring the device's state calls for.
    fn wiring(&self, ifindex: u32) -> Result<DeviceWiring>;
    /// The addresses of the persona the device runs.
    fn active_addresses(&self, ifindex: u32) -> Result<Vec<std::net::IpAddr>> {
        Ok(self.wiring(ifindex)?.active)
    }
    fn stage(&mut self, persona: &CompiledPersona) -> Result<Staged>;
    /// Writes ahead what every device's stage of this persona shares (its firewall), so
    /// that a shift to it stages a table, not its rules.
    fn prepare(&mut self, _persona: &CompiledPersona) -> Result<()> {
        Ok(())
    }
    fn discard(&mut self, staged: Staged) -> Result<()>;
    /// Creates the device's counters for a persona; true when they did not exist.
    fn create_counters(&mut self, ifindex: u32, persona: u32) -> Result<bool>;
    fn drop_counters(&mut self, ifindex: u32, persona: u32) -> Result<()>;
    /// Makes a staged persona the device's active one with a single map update. The
    /// previous table stays intact until [`commit`](Self::commit).
    fn flip(&mut self, ifindex: u32, staged: Staged, flows: FlowMode) -> Result<Flipped>;
    /// Puts the previous table back in force; the flipped one is retired.
    fn unflip(&mut self, flipped: &Flipped) -> Result<()>;
    /// Retires the previous table and records which of its addresses drain (a `cut`
    /// resets the VM's connections and has them all released at once).
    fn commit(&mut self, flipped: &Flipped) -> Result<Committed>;
    /// Forgets that `addrs` drain for the device, once the host withdrew them.
    fn forget_drains(&mut self, ifindex: u32, addrs: &[std::net::IpAddr]) -> Result<()>;
    /// Stage, counters, flip and commit at once, without the host: for tests and
    /// benchmarks of the datapath alone.
    fn shift(&mut self, ifindex: u32, staged: Staged, options: ShiftOptions) -> Result<Shifted> {
        let persona = staged.persona.id;
        self.create_counters(ifindex, persona)?;
        let flipped = self.flip(ifindex, staged, options.flows)?;
        let committed = self.commit(&flipped)?;
        self.forget_drains(ifindex, &committed.release)?;
        Ok(Shifted {
            generation: flipped.generation,
            table: flipped.table,
            previous_table: flipped.previous.map(|p| p.table),
            flip: flipped.flip,
            resets: committed.resets,
        })
    }
    fn active(&self, ifindex: u32) -> Result<Option<ActiveState>>;
    /// The device's counters, by the id of the persona each packet was handled with.
    fn persona_counters(&self, ifindex: u32) -> Result<BTreeMap<u32, Counters>>;
    /// Adds counts a device had under another ifindex to its counters here.
    fn carry_counters(&mut self, _ifindex: u32, _carried: &BTreeMap<u32, Counters>) -> Result<()> {
        Ok(())
    }
    /// Every attached device's counts, by ifindex: what a scrape reads.
    fn counts_all(&self) -> Result<BTreeMap<u32, DeviceCounts>> {
        self.attached()?
            .into_iter()
            .map(|i| {
                Ok((
                    i,
                    DeviceCounts {
                        by_persona: self.persona_counters(i)?,
                        handshakes: self.handshakes(i)?,
                    },
                ))
            })
            .collect()
    }
    /// The device's counters, whatever the persona.
    fn counters(&self, ifindex: u32) -> Result<Counters> {
        let mut total = Counters::new();
        for counters in self.persona_counters(ifindex)?.into_values() {
            for (k, c) in counters {
                let t = total.entry(k).or_default();
                t.packets += c.packets;
                t.bytes += c.bytes;
            }
        }
        Ok(total)
    }
    /// The device's live tracked flows, as connection tracking has them now.
    fn flows(&self, ifindex: u32) -> Result<Vec<FlowInfo>>;
    /// Addresses of earlier personas that devices' flows still use, by ifindex.
    fn drains_all(&self) -> Result<Vec<(u32, DrainInfo)>>;
    /// Every attached device but `except` holding an address in `scope`, with those
    /// addresses: its persona's, and those draining for its open flows.
    fn held_addresses(
        &self,
        except: Option<u32>,
        scope: &AddressScope,
    ) -> Result<Vec<HeldAddresses>> {
        held_by_lookup(self, except, scope)
    }
    /// The same answer read from any thread, when the datapath keeps one to share.
    fn held_view(&self) -> Option<HeldView> {
        None
    }
    /// Those of one device.
    fn drains(&self, ifindex: u32) -> Result<Vec<DrainInfo>> {
        Ok(self
            .drains_all()?
            .into_iter()
            .filter(|(i, _)| *i == ifindex)
            .map(|(_, d)| d)
            .collect())
    }
    /// Removes dead flows, recounts each device's flow budget, and lists the draining
    /// addresses no open flow uses any more, for the host to withdraw.
    fn sweep(&mut self) -> Result<Sweep>;
    /// How full the tables are.
    fn usage(&self) -> Result<Usage>;
    /// Housekeeping for when no job waits (freeing replaced tables whose grace period
    /// ended): kept off the shifts' path.
    fn tidy(&mut self) -> Result<()> {
        Ok(())
    }
    /// TCP handshake round trips of a device: per log2 bucket of microseconds (below
    /// 2^b us), and their sum in microseconds.
    fn handshakes(&self, _ifindex: u32) -> Result<(Vec<u64>, u64)> {
        Ok((Vec::new(), 0))
    }
    /// The QoS staged with a table.
    fn qos(&self, _table: u32) -> Result<Option<persona_common::qos::Qos>> {
        Ok(None)
    }
    /// The device whose requests to the metadata service come from `peer`.
    fn metadata_device(&self, _peer: std::net::Ipv4Addr) -> Result<Option<u32>> {
        Ok(None)
    }
    /// The ring buffer of firewall drops, to the first caller.
    fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        None
    }
}
