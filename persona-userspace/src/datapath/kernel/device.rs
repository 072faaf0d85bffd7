//! A device's configuration in the maps, its programs, and its counters.
use super::*;

impl KernelDatapath {
    pub(super) fn attach_device(&mut self, device: &DeviceSpec) -> Result<u32> {
        device.validate()?;
        let ifindex = crate::datapath::ifindex(&device.interface)?;
        self.configure_device(ifindex, device)?;
        Links::new(&self.config.pin_dir, ifindex)
            .attach(&mut self.ebpf, device.flood_guard_rate().is_some())?;
        info!(interface = %device.interface, ifindex, "attached");
        Ok(ifindex)
    }

    pub(super) fn detach_device(&mut self, ifindex: u32) -> Result<()> {
        if self.maps.devices.get(&ifindex, 0).is_err() {
            return Err(DatapathError::NotAttached(ifindex));
        }
        Links::new(&self.config.pin_dir, ifindex).detach()?;
        let _ = self.maps.guard.remove(&ifindex);
        let active = self.maps.active.get(&ifindex, 0).ok();
        let _ = self.maps.active.remove(&ifindex);
        if let Some(h) = &self.held {
            super::write(h).detach(ifindex);
        }
        for addr in self.draining(ifindex)? {
            let _ = self.drop_drain(ifindex, addr);
        }
        let _ = self.maps.flow_budget.remove(&ifindex);
        let _ = self.maps.host_wiring.remove(&ifindex);
        let _ = self.drop_metadata(ifindex);
        let _ = self.maps.devices.remove(&ifindex);
        self.forget_counts(ifindex);
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
        if self.maps.devices.keys().next().is_none() {
            // Resident rulesets serve devices: with none left, the maps are left empty.
            self.evict_rulesets();
        }
        info!(ifindex, "detached");
        Ok(())
    }

    /// Every counter key of a device for a persona, the last one created last.
    pub(super) fn counter_keys(ifindex: u32, persona: u32) -> impl Iterator<Item = CounterKey> {
        [DIR_EGRESS, DIR_INGRESS]
            .into_iter()
            .flat_map(move |direction| {
                Reason::ALL
                    .iter()
                    .map(move |reason| CounterKey::new(ifindex, persona, direction, *reason))
            })
    }

    /// Nothing to create: a key is made by the first packet that counts under it (a
    /// CPU that loses the race to make it adds to the winner's), so a shift writes no
    /// counter and a pair holds keys only for what it counted.
    pub(super) fn create_counters(&mut self, _ifindex: u32, _persona: u32) -> Result<bool> {
        Ok(false)
    }

    /// Removes the counters [`create_counters`](Self::create_counters) made, when a
    /// shift that made them is undone.
    pub(super) fn drop_counters(&mut self, ifindex: u32, persona: u32) -> Result<()> {
        for key in Self::counter_keys(ifindex, persona) {
            match self.maps.counters.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(bpf_err("COUNTERS")(e)),
            }
        }
        Ok(())
    }

    /// Counts the device had under an earlier ifindex (its VM's previous tap), added to
    /// its folded counts here: they go on from where they were.
    pub(super) fn carry_counters(
        &mut self,
        ifindex: u32,
        carried: &BTreeMap<u32, Counters>,
    ) -> Result<()> {
        for (&persona, counters) in carried {
            for (&(direction, reason), c) in counters {
                let key = CounterKey::new(ifindex, persona, direction, reason);
                self.add_folded(key, *c)?;
            }
        }
        Ok(())
    }

    /// Adds counts per CPU (the first CPUs, when fewer) to a counter, creating it.
    pub(super) fn add_to_counter(&mut self, key: CounterKey, counts: &[Counter]) -> Result<()> {
        let mut values: Vec<Counter> = match self.maps.counters.get(&key, 0) {
            Ok(v) => v.iter().copied().collect(),
            Err(_) => vec![Counter::default(); self.cpus],
        };
        for (v, c) in values.iter_mut().zip(counts) {
            *v = add(*v, c);
        }
        let values = PerCpuValues::try_from(values)
            .map_err(|e| DatapathError::Bpf(format!("COUNTERS: {e}")))?;
        self.maps
            .counters
            .insert(key, values, 0)
            .map_err(bpf_err("COUNTERS"))
    }

    /// What the host must have wired for the device.
    pub(super) fn device_wiring(&self, ifindex: u32) -> Result<DeviceWiring> {
        let inner = match self.maps.devices.get(&ifindex, 0) {
            Ok(cfg) => Self::inner_of(&cfg),
            Err(_) => Vec::new(),
        };
        Ok(DeviceWiring {
            inner,
            active: self.active_addresses(ifindex)?,
            draining: self.draining(ifindex)?,
            gateways: gateways(&self.wiring(ifindex)),
            metadata: self.metadata_peer(ifindex),
        })
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
        if let Some(h) = &self.held {
            super::write(h).attach(ifindex);
        }
        self.restamp(ifindex, &cfg)?;
        self.assign_metadata(ifindex, device)?;
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
            None => remove_if_there(&mut self.maps.guard, &ifindex, "GUARD")?,
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

    pub(super) fn wiring(&self, ifindex: u32) -> HostWiring {
        self.maps.host_wiring.get(&ifindex, 0).unwrap_or_default()
    }
}
