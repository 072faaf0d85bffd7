//! Which persona table slots are free, and which firewall prefixes each slot holds.
//! Slot 0 is never a persona: its `generation` is the last generation handed out, so
//! generations keep counting up across restarts.
use std::collections::{BTreeSet, HashMap};

use persona_common::{
    firewall::{FwKeyV4, FwKeyV6},
    persona::MAX_TABLES,
};

use super::{DatapathError, Result};

pub const META_TABLE: u32 = 0;

#[derive(Default)]
pub struct Prefixes {
    pub v4: Vec<(u32, FwKeyV4)>,
    pub v6: Vec<(u32, FwKeyV6)>,
}

pub struct Tables {
    free: BTreeSet<u32>,
    prefixes: HashMap<u32, Prefixes>,
}

impl Tables {
    /// `in_use`: tables some device's `ACTIVE` points at. Everything else is free, and
    /// prefixes found for free tables (a stage cut short by a crash) are cleared on reuse.
    pub fn recover(in_use: impl IntoIterator<Item = u32>, found: HashMap<u32, Prefixes>) -> Self {
        let mut free: BTreeSet<u32> = (META_TABLE + 1..MAX_TABLES).collect();
        for t in in_use {
            free.remove(&t);
        }
        Self {
            free,
            prefixes: found,
        }
    }

    pub fn alloc(&mut self) -> Result<u32> {
        self.free
            .pop_first()
            .ok_or(DatapathError::TablesExhausted(MAX_TABLES - 1))
    }

    pub fn release(&mut self, table: u32) {
        if table != META_TABLE {
            self.free.insert(table);
        }
    }

    pub fn take_prefixes(&mut self, table: u32) -> Prefixes {
        self.prefixes.remove(&table).unwrap_or_default()
    }

    pub fn set_prefixes(&mut self, table: u32, p: Prefixes) {
        self.prefixes.insert(table, p);
    }

    pub fn free(&self) -> impl Iterator<Item = u32> + '_ {
        self.free.iter().copied()
    }

    pub fn in_use(&self) -> usize {
        (MAX_TABLES - 1) as usize - self.free.len()
    }
}
