//! Table slots: staging a persona into a free one, copying, clearing, and freeing
//! replaced ones after a grace period.
use super::*;

impl KernelDatapath {
    pub(super) fn stage_persona(&mut self, persona: &CompiledPersona) -> Result<Staged> {
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

    pub(super) fn discard_staged(&mut self, staged: Staged) -> Result<()> {
        // Never visible to a program: no grace period needed.
        self.clear_table(staged.table)?;
        self.tables.release(staged.table);
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
    pub(super) fn copy_into(&mut self, from: u32, to: u32, table: PersonaTable) -> Result<()> {
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
    pub(super) fn write_prefixes(
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
    pub(super) fn write_into(&mut self, table: u32, persona: &CompiledPersona) -> Result<()> {
        let mut written = Prefixes::default();
        let result = self.write_prefixes(table, persona, &mut written);
        self.tables.set_prefixes(table, written);
        if result.is_err() {
            let _ = self.clear_table(table);
        }
        result
    }

    pub(super) fn clear_table(&mut self, table: u32) -> Result<()> {
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

    /// Moves a freed table's tracked-flow counts into its device's `allow_tracked` keys
    /// (which only userspace writes), and zeroes them for the slot's next owner. Safe
    /// only once no program can be using the table.
    pub(super) fn harvest(&mut self, table: u32) -> Result<()> {
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
                let key = CounterKey::new(
                    owner.owner_ifindex,
                    owner.owner_persona,
                    direction,
                    Reason::AllowTracked,
                );
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

    /// A free table slot, freeing the retired ones first when none is left.
    pub(super) fn alloc_table(&mut self) -> Result<u32> {
        match self.tables.alloc() {
            Err(DatapathError::TablesExhausted(_)) if !self.retired.is_empty() => {
                self.reclaim()?;
                self.tables.alloc()
            }
            other => other,
        }
    }

    /// A counter of zeros for every CPU.
    pub(super) fn zeroed(&self) -> Result<PerCpuValues<Counter>> {
        PerCpuValues::try_from(vec![Counter::default(); self.cpus])
            .map_err(|e| DatapathError::Bpf(format!("per-CPU counter: {e}")))
    }

    /// Queues a table no device points at any more. It is freed by the next
    /// [`reclaim`](Self::reclaim), which one grace period makes safe for the whole batch.
    pub(super) fn retire(&mut self, table: u32) -> Result<()> {
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

    pub(super) fn persona_table(&self, table: u32) -> Result<PersonaTable> {
        self.maps
            .personas
            .get(&table, 0)
            .map_err(bpf_err("PERSONAS"))
    }

    pub(super) fn next_generation(&mut self) -> Result<u64> {
        let mut meta = self.persona_table(META_TABLE)?;
        meta.generation += 1;
        self.maps
            .personas
            .set(META_TABLE, meta, 0)
            .map_err(bpf_err("PERSONAS"))?;
        Ok(meta.generation)
    }

    pub fn tables_in_use(&self) -> usize {
        self.tables.in_use()
    }
}
