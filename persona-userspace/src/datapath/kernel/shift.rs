//! The flip and what follows it: the one map update, its undo, and the commit that
//! retires the previous table and records which of its addresses still drain.
use super::*;

impl KernelDatapath {
    pub(super) fn flip_to(
        &mut self,
        ifindex: u32,
        staged: Staged,
        flows: FlowMode,
    ) -> Result<Flipped> {
        let Ok(device) = self.maps.devices.get(&ifindex, 0) else {
            self.discard_staged(staged)?;
            return Err(DatapathError::NotAttached(ifindex));
        };
        let previous = self.maps.active.get(&ifindex, 0).ok();
        let ready = match previous {
            Some(a) => self.persona_table(a.table),
            None => Ok(PersonaTable::default()),
        }
        .and_then(|t| Ok((t, self.next_generation()?)));
        let (inherited, generation) = match ready {
            Ok(r) => r,
            Err(e) => {
                self.discard_staged(staged)?;
                return Err(e);
            }
        };
        let mut table = staged.persona.table;
        table.rules = staged.rules;
        table.generation = generation;
        table.inner_v4 = device.inner_v4;
        table.inner_v6 = device.inner_v6;
        table.device_flags = device.flags;
        table.owner_ifindex = ifindex;
        table.owner_persona = staged.persona.id;
        (table.ct_floor, table.move_floor) = match flows {
            // Flows still waiting to move keep their address too.
            FlowMode::Keep => (inherited.ct_floor, 0),
            FlowMode::Move => (inherited.ct_floor, generation),
            FlowMode::Cut => (generation, generation),
        };
        let active = Active {
            table: staged.table,
            persona: staged.persona.id,
            generation,
        };
        let addresses = Self::host_addresses(&table);
        let start = Instant::now();
        let written = self
            .maps
            .personas
            .set(staged.table, table, 0)
            .map_err(bpf_err("PERSONAS"))
            .and_then(|()| {
                self.maps
                    .active
                    .insert(ifindex, active, 0)
                    .map_err(bpf_err("ACTIVE"))
            });
        let flip = start.elapsed();
        if let Err(e) = written {
            // Not flipped in: no program saw the table.
            self.discard_staged(staged)?;
            return Err(e);
        }
        self.tables
            .set_owner(staged.table, (ifindex, staged.persona.id));
        if let Some(h) = &self.held {
            // Its old addresses too, until the commit has put those it keeps draining.
            super::write(h).add(ifindex, addresses);
        }
        Ok(Flipped {
            ifindex,
            generation,
            table: staged.table,
            persona: staged.persona.id,
            previous: previous.map(|a| ActiveState {
                table: a.table,
                persona: a.persona,
                generation: a.generation,
            }),
            flows,
            flip,
            tables: Some(Box::new([table, inherited])),
        })
    }

    pub(super) fn unflip_to_previous(&mut self, f: &Flipped) -> Result<()> {
        // The addresses the device has again: the previous table's, and those draining.
        let mut restored = match f.previous {
            Some(p) => Self::host_addresses(&self.persona_table(p.table)?),
            None => Vec::new(),
        };
        if let Some(h) = &self.held {
            super::write(h).set(f.ifindex, restored.clone());
        }
        restored.extend(self.draining(f.ifindex)?);
        match f.previous {
            Some(p) => self
                .maps
                .active
                .insert(
                    f.ifindex,
                    Active {
                        table: p.table,
                        persona: p.persona,
                        generation: p.generation,
                    },
                    0,
                )
                .map_err(bpf_err("ACTIVE"))?,
            None => match self.maps.active.remove(&f.ifindex) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(bpf_err("ACTIVE")(e)),
            },
        }
        // Programs may have read the flipped table: freed after a grace period, waited
        // for now so that a failed shift leaves no table behind.
        self.retire(f.table)?;
        self.reclaim()?;
        self.unbind(f.ifindex, f.generation, &restored)
    }

    /// The device's addresses held as active are `addrs` from now on.
    fn hold_only(&self, ifindex: u32, addrs: &[IpAddr]) {
        if let Some(h) = &self.held {
            super::write(h).set(ifindex, addrs.to_vec());
        }
    }

    pub(super) fn commit_flip(&mut self, f: &Flipped) -> Result<Committed> {
        let [new_table, prev_table] = match f.tables.as_deref() {
            Some(&tables) => tables,
            None => [
                self.persona_table(f.table)?,
                match f.previous {
                    Some(prev) => self.persona_table(prev.table)?,
                    None => PersonaTable::default(),
                },
            ],
        };
        let new_addrs = Self::host_addresses(&new_table);
        // The new persona's addresses are its own again, draining no more.
        for &addr in &new_addrs {
            self.drop_drain(f.ifindex, addr)?;
        }
        let mut committed = Committed::default();
        let Some(prev) = f.previous else {
            self.hold_only(f.ifindex, &new_addrs);
            return Ok(committed);
        };
        let drain = Drain {
            persona: prev.persona,
            _pad: 0,
            generation: f.generation,
        };
        for addr in Self::host_addresses(&prev_table) {
            if new_addrs.contains(&addr) {
                continue;
            }
            self.put_drain(f.ifindex, addr, drain)?;
        }
        self.hold_only(f.ifindex, &new_addrs);
        self.retire(prev.table)?;
        if f.flows == FlowMode::Cut {
            // Best effort: the connections are forgotten whether or not the VM hears.
            committed.resets = match self.maps.devices.get(&f.ifindex, 0) {
                Ok(device) => self
                    .reset_flows(f.ifindex, &device, prev_table.ct_floor, f.generation)
                    .unwrap_or_else(|e| {
                        tracing::warn!(ifindex = f.ifindex, error = %e, "resetting the VM's connections");
                        0
                    }),
                Err(_) => 0,
            };
            // Every flow is gone: so is every reason to keep an old address.
            committed.release = self.draining(f.ifindex)?;
        }
        Ok(committed)
    }

    pub(super) fn forget(&mut self, ifindex: u32, addrs: &[IpAddr]) -> Result<()> {
        for &a in addrs {
            self.drop_drain(ifindex, a)?;
        }
        Ok(())
    }
}
