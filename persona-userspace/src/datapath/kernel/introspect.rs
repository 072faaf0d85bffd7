//! Reading the datapath back: counters, usage, handshakes, addresses, and test runs of
//! the programs.
use super::*;

impl KernelDatapath {
    pub(super) fn counters_by_persona(&self, ifindex: u32) -> Result<BTreeMap<u32, Counters>> {
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
            out.entry(key.persona)
                .or_default()
                .insert((key.direction, reason), summed(values.iter()));
        }
        // Tracked flows of the tables still live: the active one, and those retired
        // but not yet freed, which only the process holding the lock knows of; any other
        // reads every slot (a freed one holds no counts).
        let tables: Vec<u32> = if self.config.exclusive {
            let active = self.maps.active.get(&ifindex, 0).ok().map(|a| a.table);
            active.into_iter().chain(self.retiring()).collect()
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
        self.add_folded_into(ifindex, &mut out);
        Ok(out)
    }

    pub(super) fn map_usage(&self) -> Result<crate::datapath::Usage> {
        use persona_common::{
            conntrack::CT_MAX_ENTRIES,
            counters::{MAX_COUNTER_KEYS, MAX_FOLDED_KEYS},
            device::MAX_DEVICES,
            firewall::{MAX_PREFIXES, MAX_RULESETS},
            persona::MAX_TABLES,
        };
        let count = |n: usize| n as u64;
        let (rulesets, fw_v4, fw_v6) = self.tables.ruleset_usage();
        Ok(crate::datapath::Usage {
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
                ("rulesets", count(rulesets), (MAX_RULESETS - 1) as u64),
                ("counters", self.live_keys.get(), MAX_COUNTER_KEYS as u64),
                (
                    "folded",
                    count(
                        self.folded
                            .values()
                            .flat_map(|p| p.values())
                            .map(|c| c.len())
                            .sum(),
                    ),
                    MAX_FOLDED_KEYS as u64,
                ),
                ("fw_v4", count(fw_v4), MAX_PREFIXES as u64),
                ("fw_v6", count(fw_v6), MAX_PREFIXES as u64),
                (
                    "conntrack",
                    count(self.maps.conntrack.keys().count()),
                    CT_MAX_ENTRIES as u64,
                ),
            ],
        })
    }

    pub(super) fn handshake_histogram(&self, ifindex: u32) -> Result<(Vec<u64>, u64)> {
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

    /// The tracked-flow packets a table counted, per direction and summed over CPUs.
    pub(super) fn tracked(&self, table: u32) -> Result<[(u8, Counter); 2]> {
        let read = |direction| -> Result<(u8, Counter)> {
            let values = self
                .maps
                .tracked
                .get(&tracked_slot(table, direction), 0)
                .map_err(bpf_err("TRACKED"))?;
            Ok((direction, summed(values.iter())))
        };
        Ok([read(DIR_EGRESS)?, read(DIR_INGRESS)?])
    }

    pub(super) fn host_addresses(table: &PersonaTable) -> Vec<IpAddr> {
        let compiled = CompiledPersona {
            id: 0,
            table: *table,
            gateways: vec![],
            vpn: None,
            firewall: Default::default(),
            qos: Default::default(),
        };
        compiled.addresses()
    }

    pub(super) fn inner_of(cfg: &DeviceConfig) -> Vec<IpAddr> {
        let d = DeviceSpec::from_config(String::new(), cfg);
        d.inner_v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(d.inner_v6.map(IpAddr::V6))
            .collect()
    }

    /// The addresses the network sees for a device right now.
    pub fn active_addresses(&self, ifindex: u32) -> Result<Vec<IpAddr>> {
        match self.active(ifindex)? {
            Some(a) => Ok(Self::host_addresses(&self.persona_table(a.table)?)),
            None => Ok(Vec::new()),
        }
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
