//! Loading: the embedded object into this kernel, its maps pinned (or the pins
//! re-used), and the uplinks' routing program.
use std::collections::HashMap as StdHashMap;

use super::*;
use crate::datapath::compile::{Firewall, Prefix};

/// The rulesets the pinned tries hold, read back with their keys: a ruleset a table
/// still names must be known to be freed, and one equal to a persona's firewall is
/// used again instead of written twice.
fn resident_rulesets(maps: &Maps) -> Vec<(u32, Firewall, Prefixes)> {
    type Found = (
        Vec<Prefix<ipnet::Ipv4Net>>,
        Vec<Prefix<ipnet::Ipv6Net>>,
        Prefixes,
    );
    let mut found: StdHashMap<u32, Found> = StdHashMap::new();
    for (key, rules) in maps.fw_v4.iter().flatten() {
        let data = key.data();
        let len = key.prefix_len();
        let Ok(net) = ipnet::Ipv4Net::new(
            data.addr.into(),
            len.checked_sub(KEY_HEADER_BITS).unwrap_or(u32::MAX) as u8,
        ) else {
            continue;
        };
        let entry = found.entry(u32::from_be_bytes(data.ruleset)).or_default();
        entry.0.push(Prefix {
            direction: u32::from_be_bytes(data.direction) as u8,
            net,
            rules,
        });
        entry.2.v4.push((len, data));
    }
    for (key, rules) in maps.fw_v6.iter().flatten() {
        let data = key.data();
        let len = key.prefix_len();
        let Ok(net) = ipnet::Ipv6Net::new(
            data.addr.into(),
            len.checked_sub(KEY_HEADER_BITS).unwrap_or(u32::MAX) as u8,
        ) else {
            continue;
        };
        let entry = found.entry(u32::from_be_bytes(data.ruleset)).or_default();
        entry.1.push(Prefix {
            direction: u32::from_be_bytes(data.direction) as u8,
            net,
            rules,
        });
        entry.2.v6.push((len, data));
    }
    found
        .into_iter()
        .map(|(id, (v4, v6, keys))| (id, Firewall::new(v4, v6), keys))
        .collect()
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
        layout::check(EBPF_OBJECT, &config.pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&config.pin_dir)
            .load(EBPF_OBJECT)
            .map_err(|e| DatapathError::Bpf(format!("loading the BPF object: {e}")))?;
        programs::load(&mut ebpf)?;
        let maps = Maps::take(&mut ebpf)?;
        let in_use: Vec<(u32, u32)> = maps
            .active
            .iter()
            .filter_map(|r| r.ok().map(|(_, a)| a.table))
            .map(|t| (t, maps.personas.get(&t, 0).map_or(0, |p| p.rules)))
            .collect();
        let found = resident_rulesets(&maps);
        let owners: Vec<(u32, Pair)> = in_use
            .iter()
            .filter_map(|&(t, _)| maps.personas.get(&t, 0).ok().map(|p| (t, p)))
            .filter(|(_, p)| p.owner_ifindex != 0)
            .map(|(t, p)| (t, (p.owner_ifindex, p.owner_persona)))
            .collect();
        let folded = Self::load_folded(&maps)?;
        let hosts = match config.exclusive {
            true => Some(
                maps.devices
                    .keys()
                    .flatten()
                    .map(|i| {
                        let active = maps.active.get(&i, 0).ok();
                        let table = active.and_then(|a| maps.personas.get(&a.table, 0).ok());
                        (
                            i,
                            table.map(|t| Self::host_addresses(&t)).unwrap_or_default(),
                        )
                    })
                    .collect(),
            ),
            false => None,
        };
        let held = match (hosts, config.exclusive) {
            (Some(hosts), true) => {
                let drains = flows::read_drains(&maps.drains)?
                    .into_iter()
                    .map(|(i, d)| ((i, d.addr), d))
                    .collect();
                Some(Arc::new(RwLock::new(Held::new(hosts, drains))))
            }
            _ => None,
        };
        if !in_use.is_empty() {
            info!(devices = in_use.len(), pin_dir = %config.pin_dir.display(), "re-using pinned datapath");
        }
        let peers = config
            .exclusive
            .then(|| super::metadata::Peers::read(&maps.metadata));
        let mut dp = Self {
            ebpf,
            maps,
            tables: Tables::recover(in_use, found),
            grace: GraceThread::spawn().map_err(io_err("starting the grace-period thread"))?,
            config,
            retired: Vec::new(),
            in_grace: Default::default(),
            safe: Vec::new(),
            unowned: Vec::new(),
            folded,
            held,
            live_keys: Default::default(),
            meta: None,
            metadata_cursor: 0,
            peers,
            cpus: nr_cpus().map_err(|(_, e)| io_err("counting CPUs")(e))?,
            _lock: lock,
        };
        for (table, pair) in owners {
            dp.tables.set_owner(table, pair);
        }
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
            dp.unowned = dp.stray_pairs()?;
            dp.fold_unowned();
        }
        Ok(dp)
    }

    /// Tells the programs who forwards, and attaches (or removes) the uplinks' program.
    pub(super) fn route(&mut self) -> Result<()> {
        let uplinks = self
            .config
            .uplinks
            .iter()
            .map(|name| crate::datapath::ifindex(name))
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
            let links = Links::new(&self.config.pin_dir, ifindex);
            links.route_from_uplink(&mut self.ebpf, on)?;
            links.shape_to_uplink(&mut self.ebpf, true)?;
        }
        for &gone in before
            .uplinks
            .iter()
            .filter(|&&u| u != 0 && !uplinks.contains(&u))
        {
            let links = Links::new(&self.config.pin_dir, gone);
            links.route_from_uplink(&mut self.ebpf, false)?;
            links.shape_to_uplink(&mut self.ebpf, false)?;
        }
        self.maps
            .routing
            .set(0, routing, 0)
            .map_err(bpf_err("ROUTING"))?;
        info!(routing = ?mode, uplinks = uplinks.len(), "host routing");
        Ok(())
    }
}
