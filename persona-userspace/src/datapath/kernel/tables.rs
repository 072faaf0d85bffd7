//! Table slots: staging a persona into a free one, copying, clearing, and freeing
//! replaced ones after a grace period; the resident firewall rulesets they name.
use super::*;

impl KernelDatapath {
    /// Holds an empty slot and its ruleset, and writes the slot's QOS. The table itself
    /// is written by the flip, with the device's part, in one update.
    pub(super) fn stage_persona(&mut self, persona: &CompiledPersona) -> Result<Staged> {
        let ruleset = self.resident(&persona.firewall)?;
        let table = self.empty_table()?;
        self.tables.hold(table, ruleset);
        if let Err(e) = self
            .maps
            .qos
            .set(table, persona.qos, 0)
            .map_err(bpf_err("QOS"))
        {
            let _ = self.clear_table(table);
            self.tables.release(table);
            return Err(e);
        }
        Ok(Staged {
            table,
            rules: ruleset,
            persona: persona.clone(),
        })
    }

    pub(super) fn discard_staged(&mut self, staged: Staged) -> Result<()> {
        // Never visible to a program: no grace period needed.
        self.clear_table(staged.table)?;
        self.tables.release_clean(staged.table);
        Ok(())
    }

    /// A device whose own addresses changed while a persona is active gets a copy of
    /// its table with the new identity, flipped in like a shift: a table is never
    /// rewritten while a program may read it.
    pub(super) fn restamp(&mut self, ifindex: u32, cfg: &DeviceConfig) -> Result<()> {
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
        let qos = self
            .maps
            .qos
            .get(&active.table, 0)
            .map_err(bpf_err("QOS"))?;
        let slot = self.empty_table()?;
        self.tables.hold(slot, table.rules);
        self.tables
            .set_owner(slot, (table.owner_ifindex, table.owner_persona));
        let copied = self
            .maps
            .qos
            .set(slot, qos, 0)
            .map_err(bpf_err("QOS"))
            .and_then(|()| {
                self.maps
                    .personas
                    .set(slot, table, 0)
                    .map_err(bpf_err("PERSONAS"))
            });
        if let Err(e) = copied {
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

    /// The resident ruleset holding this firewall, written now if none does. When the
    /// tries or the ids are full, rulesets no table names are removed first.
    pub(super) fn resident(&mut self, firewall: &Arc<Firewall>) -> Result<u32> {
        if let Some(id) = self.tables.find_ruleset(firewall) {
            return Ok(id);
        }
        let mut result = self.write_ruleset(firewall);
        if result.is_err() {
            // The maps may be full of rulesets no table needs, or of retired tables'.
            self.reclaim()?;
            self.evict_rulesets();
            result = self.write_ruleset(firewall);
        }
        result
    }

    fn write_ruleset(&mut self, firewall: &Arc<Firewall>) -> Result<u32> {
        let id = self
            .tables
            .alloc_ruleset()
            .ok_or(DatapathError::TablesExhausted(MAX_RULESETS - 1))?;
        let mut written = Prefixes::default();
        match self.write_prefixes(id, firewall, &mut written) {
            Ok(()) => {
                self.tables.insert_ruleset(id, firewall.clone(), written);
                Ok(id)
            }
            Err(e) => {
                self.remove_prefixes(written);
                self.tables.unalloc_ruleset(id);
                Err(e)
            }
        }
    }

    /// Removes the prefixes of every ruleset no table names.
    pub(super) fn evict_rulesets(&mut self) {
        let evicted = self.tables.evict_unreferenced();
        tracing::debug!(rulesets = evicted.len(), "evicting rulesets no table names");
        for (_, ruleset) in evicted {
            self.remove_prefixes(ruleset.keys);
        }
    }

    fn remove_prefixes(&mut self, keys: Prefixes) {
        for (len, data) in keys.v4 {
            let _ = self.maps.fw_v4.remove(&Key::new(len, data));
        }
        for (len, data) in keys.v6 {
            let _ = self.maps.fw_v6.remove(&Key::new(len, data));
        }
    }

    /// Writes the firewall's prefixes under `ruleset`, recording each in `written` as
    /// it goes, so that a failure part-way leaves a record of what to remove.
    fn write_prefixes(
        &mut self,
        ruleset: u32,
        firewall: &Firewall,
        written: &mut Prefixes,
    ) -> Result<()> {
        for p in &firewall.v4 {
            let (r, d) = key_header(ruleset, p.direction);
            let data = FwKeyV4 {
                ruleset: r,
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
        for p in &firewall.v6 {
            let (r, d) = key_header(ruleset, p.direction);
            let data = FwKeyV6 {
                ruleset: r,
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

    /// Empties a table slot nothing reads: its tracked counts harvested, its ruleset
    /// reference dropped (the ruleset stays resident).
    pub(super) fn clear_table(&mut self, table: u32) -> Result<()> {
        self.harvest(table)?;
        if let Some(pair) = self.tables.take_owner(table) {
            self.unowned.push(pair);
        }
        self.tables.unhold(table);
        self.maps
            .personas
            .set(table, PersonaTable::default(), 0)
            .map_err(bpf_err("PERSONAS"))
    }

    /// Moves a freed table's tracked-flow counts into its device's `allow_tracked` keys
    /// (which only userspace writes), and zeroes them for the slot's next owner. Safe
    /// only once no program can be using the table.
    pub(super) fn harvest(&mut self, table: u32) -> Result<()> {
        let mut owner = None;
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
            let (ifindex, persona) = match owner {
                Some(o) => o,
                None => *owner.insert(self.counting_for(table)?),
            };
            if ifindex != 0 {
                let key = CounterKey::new(ifindex, persona, direction, Reason::AllowTracked);
                let counted: Vec<Counter> = counted.iter().copied().collect();
                self.add_to_counter(key, &counted)?;
            }
            self.maps
                .tracked
                .set(slot, self.zeroed()?, 0)
                .map_err(bpf_err("TRACKED"))?;
        }
        Ok(())
    }

    /// The attached device and persona a table counts for; ifindex 0 for none.
    fn counting_for(&self, table: u32) -> Result<Pair> {
        let owner = self.persona_table(table)?;
        let attached =
            owner.owner_ifindex != 0 && self.maps.devices.get(&owner.owner_ifindex, 0).is_ok();
        Ok(match attached {
            true => (owner.owner_ifindex, owner.owner_persona),
            false => (0, 0),
        })
    }

    /// A free table slot, freeing the retired ones first when none is left.
    fn alloc_table(&mut self) -> Result<(u32, bool)> {
        match self.tables.alloc() {
            Err(DatapathError::TablesExhausted(_)) if self.retiring().next().is_some() => {
                self.reclaim()?;
                self.tables.alloc()
            }
            other => other,
        }
    }

    /// A free slot, empty: cleared when it was freed, or now when it may hold leftovers
    /// of a stage a crash cut short.
    fn empty_table(&mut self) -> Result<u32> {
        let (table, clean) = self.alloc_table()?;
        if !clean && let Err(e) = self.clear_table(table) {
            self.tables.release(table);
            return Err(e);
        }
        Ok(table)
    }

    /// A counter of zeros for every CPU.
    pub(super) fn zeroed(&self) -> Result<PerCpuValues<Counter>> {
        PerCpuValues::try_from(vec![Counter::default(); self.cpus])
            .map_err(|e| DatapathError::Bpf(format!("per-CPU counter: {e}")))
    }

    /// Queues a table no device points at any more. A full batch goes to the grace
    /// thread at once; the tables are freed when it comes back, off the shift's path.
    pub(super) fn retire(&mut self, table: u32) -> Result<()> {
        self.retired.push(table);
        if self.retired.len() >= RECLAIM_BATCH {
            self.hand_over()?;
        }
        Ok(())
    }

    /// Hands the retired tables to the grace thread.
    fn hand_over(&mut self) -> Result<()> {
        let batch = std::mem::take(&mut self.retired);
        self.in_grace.extend(batch.iter().copied());
        self.grace
            .submit(batch)
            .map_err(io_err("handing tables to the grace-period thread"))
    }

    /// Tables replaced but not yet freed: programs may still count in them.
    pub(super) fn retiring(&self) -> impl Iterator<Item = u32> + '_ {
        self.retired
            .iter()
            .chain(self.in_grace.iter())
            .chain(self.safe.iter())
            .copied()
    }

    /// Housekeeping while no job waits: frees the batches whose grace period ended,
    /// and hands over a part batch when nothing else is in flight.
    pub(super) fn tidy(&mut self) -> Result<()> {
        let finished = self.grace.finished();
        self.free_batches(finished, Some(TIDY_TABLES))?;
        if !self.retired.is_empty() && self.grace.in_flight() == 0 {
            self.hand_over()?;
        }
        Ok(())
    }

    /// Frees every retired table once no program run can still be reading any of them,
    /// waiting for the grace periods under way.
    pub fn reclaim(&mut self) -> Result<()> {
        if !self.retired.is_empty() {
            self.hand_over()?;
        }
        let finished = self.grace.wait_all();
        self.free_batches(finished, None)
    }

    /// Takes in the batches whose grace period ended, then frees at most `limit` of the
    /// tables known safe (all without a limit): housekeeping between jobs stays short.
    fn free_batches(
        &mut self,
        batches: Vec<(Vec<u32>, std::io::Result<()>)>,
        limit: Option<usize>,
    ) -> Result<()> {
        let mut failed = None;
        for (batch, waited) in batches {
            for t in &batch {
                self.in_grace.remove(t);
            }
            match waited {
                Ok(()) => self.safe.extend(batch),
                Err(e) => {
                    // Not known to be safe yet: they wait for the next grace period.
                    self.retired.extend(batch);
                    failed.get_or_insert(io_err("waiting for an RCU grace period")(e));
                }
            }
        }
        for _ in 0..limit.unwrap_or(usize::MAX) {
            let Some(table) = self.safe.pop() else {
                break;
            };
            // One at a time: a failure leaves the rest listed, to be freed next time.
            if let Err(e) = self.clear_table(table) {
                self.safe.push(table);
                failed.get_or_insert(e);
                break;
            }
            self.tables.release_clean(table);
        }
        if self.config.exclusive {
            self.fold_unowned();
        }
        failed.map_or(Ok(()), Err)
    }

    pub(super) fn persona_table(&self, table: u32) -> Result<PersonaTable> {
        self.maps
            .personas
            .get(&table, 0)
            .map_err(bpf_err("PERSONAS"))
    }

    pub(super) fn next_generation(&mut self) -> Result<u64> {
        let mut meta = match self.meta.take() {
            Some(meta) => meta,
            None => self.persona_table(META_TABLE)?,
        };
        meta.generation += 1;
        self.maps
            .personas
            .set(META_TABLE, meta, 0)
            .map_err(bpf_err("PERSONAS"))?;
        // Only the holder of the pin directory's lock hands generations out.
        if self.config.exclusive {
            self.meta = Some(meta);
        }
        Ok(meta.generation)
    }

    pub fn tables_in_use(&self) -> usize {
        self.tables.in_use()
    }
}
