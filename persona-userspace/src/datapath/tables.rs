//! Which persona table slots are free, and the resident firewall rulesets they name.
//! Slot 0 is never a persona: its `generation` is the last generation handed out, so
//! generations keep counting up across restarts.
use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Weak},
};

use persona_common::{
    firewall::{FwKeyV4, FwKeyV6, MAX_RULESETS},
    persona::MAX_TABLES,
};

use super::{DatapathError, Result, compile::Firewall};

pub const META_TABLE: u32 = 0;
/// The empty firewall: no prefix is ever written under it.
pub const EMPTY_RULESET: u32 = 0;

/// The trie keys written for one ruleset, so that it can be removed exactly.
#[derive(Default)]
pub struct Prefixes {
    pub v4: Vec<(u32, FwKeyV4)>,
    pub v6: Vec<(u32, FwKeyV6)>,
}

pub struct Ruleset {
    pub firewall: Arc<Firewall>,
    /// Other compilations found equal to it (two personas with one firewall, a persona
    /// compiled again): known by their pointer from then on, not compared again prefix
    /// by prefix at every shift. Weak: a persona gone takes its prefixes with it.
    aliases: Vec<Weak<Firewall>>,
    pub keys: Prefixes,
    /// Tables naming it, freed or not. At zero it stays resident for the next persona
    /// with the same firewall until the space is needed.
    refs: u32,
}

/// A device's counters for one persona: (ifindex, persona id).
pub type Pair = (u32, u32);

pub struct Tables {
    free: BTreeSet<u32>,
    /// Free slots known empty, cleared when they were freed: a stage into one writes
    /// the table alone. The others may hold what a process that stopped left.
    clean: BTreeSet<u32>,
    /// The (device, persona) each flipped-in table counts for, and how many tables
    /// count for each pair: a pair no table owns is counted for no more.
    owner_of: HashMap<u32, Pair>,
    owned: HashMap<Pair, u32>,
    /// The ruleset each allocated table names.
    rules_of: HashMap<u32, u32>,
    rulesets: HashMap<u32, Ruleset>,
    by_fingerprint: HashMap<u64, Vec<u32>>,
    free_rulesets: BTreeSet<u32>,
}

impl Tables {
    /// `in_use`: tables some device's `ACTIVE` points at, with the ruleset each names.
    /// Everything else is free. `found`: the rulesets the tries hold.
    pub fn recover(
        in_use: impl IntoIterator<Item = (u32, u32)>,
        found: impl IntoIterator<Item = (u32, Firewall, Prefixes)>,
    ) -> Self {
        let mut tables = Self {
            free: (META_TABLE + 1..MAX_TABLES).collect(),
            clean: BTreeSet::new(),
            owner_of: HashMap::new(),
            owned: HashMap::new(),
            rules_of: HashMap::new(),
            rulesets: HashMap::new(),
            by_fingerprint: HashMap::new(),
            free_rulesets: (EMPTY_RULESET + 1..MAX_RULESETS).collect(),
        };
        for (id, firewall, keys) in found {
            tables.free_rulesets.remove(&id);
            tables.insert_ruleset(id, Arc::new(firewall), keys);
        }
        for (table, ruleset) in in_use {
            tables.free.remove(&table);
            tables.hold(table, ruleset);
        }
        tables
    }

    /// A free slot, a clean one first, and whether it is clean.
    pub fn alloc(&mut self) -> Result<(u32, bool)> {
        if let Some(table) = self.clean.pop_first() {
            self.free.remove(&table);
            return Ok((table, true));
        }
        self.free
            .pop_first()
            .map(|table| (table, false))
            .ok_or(DatapathError::TablesExhausted(MAX_TABLES - 1))
    }

    /// Returns the slot to the free list; its ruleset reference must be dropped first.
    pub fn release(&mut self, table: u32) {
        if table != META_TABLE {
            self.free.insert(table);
        }
    }

    /// Returns a slot just cleared to the free list.
    pub fn release_clean(&mut self, table: u32) {
        if table != META_TABLE {
            self.free.insert(table);
            self.clean.insert(table);
        }
    }

    pub fn free(&self) -> impl Iterator<Item = u32> + '_ {
        self.free.iter().copied()
    }

    pub fn in_use(&self) -> usize {
        (MAX_TABLES - 1) as usize - self.free.len()
    }

    /// Records that `table` counts for `pair` (flipped in for it).
    pub fn set_owner(&mut self, table: u32, pair: Pair) {
        if let Some(old) = self.owner_of.insert(table, pair) {
            self.disown(old);
        }
        *self.owned.entry(pair).or_default() += 1;
    }

    /// `table` counts for nothing any more; returns its pair when no other table
    /// counts for it.
    pub fn take_owner(&mut self, table: u32) -> Option<Pair> {
        let pair = self.owner_of.remove(&table)?;
        self.disown(pair).then_some(pair)
    }

    /// True when no table counts for `pair` any more.
    fn disown(&mut self, pair: Pair) -> bool {
        match self.owned.get_mut(&pair) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.owned.remove(&pair);
                true
            }
        }
    }

    pub fn is_owned(&self, pair: Pair) -> bool {
        self.owned.contains_key(&pair)
    }

    /// The resident ruleset holding exactly this firewall.
    pub fn find_ruleset(&mut self, firewall: &Arc<Firewall>) -> Option<u32> {
        if firewall.is_empty() {
            return Some(EMPTY_RULESET);
        }
        let ids = self.by_fingerprint.get(&firewall.fingerprint())?;
        let known = |r: &Ruleset| {
            Arc::ptr_eq(&r.firewall, firewall)
                || r.aliases
                    .iter()
                    .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(firewall)))
        };
        if let Some(&id) = ids.iter().find(|id| known(&self.rulesets[id])) {
            return Some(id);
        }
        let id = *ids
            .iter()
            .find(|id| *self.rulesets[id].firewall == **firewall)?;
        let r = self.rulesets.get_mut(&id).expect("indexed rulesets exist");
        r.aliases.retain(|w| w.strong_count() > 0);
        r.aliases.push(Arc::downgrade(firewall));
        Some(id)
    }

    pub fn alloc_ruleset(&mut self) -> Option<u32> {
        self.free_rulesets.pop_first()
    }

    /// An id handed out by [`alloc_ruleset`](Self::alloc_ruleset) and never written.
    pub fn unalloc_ruleset(&mut self, id: u32) {
        if id != EMPTY_RULESET {
            self.free_rulesets.insert(id);
        }
    }

    pub fn insert_ruleset(&mut self, id: u32, firewall: Arc<Firewall>, keys: Prefixes) {
        self.by_fingerprint
            .entry(firewall.fingerprint())
            .or_default()
            .push(id);
        self.rulesets.insert(
            id,
            Ruleset {
                firewall,
                aliases: Vec::new(),
                keys,
                refs: 0,
            },
        );
    }

    /// Records that `table` names `ruleset`.
    pub fn hold(&mut self, table: u32, ruleset: u32) {
        if let Some(old) = self.rules_of.insert(table, ruleset) {
            self.unref(old);
        }
        if let Some(r) = self.rulesets.get_mut(&ruleset) {
            r.refs += 1;
        }
    }

    /// `table` names no ruleset any more (it is being cleared).
    pub fn unhold(&mut self, table: u32) {
        if let Some(old) = self.rules_of.remove(&table) {
            self.unref(old);
        }
    }

    fn unref(&mut self, ruleset: u32) {
        if let Some(r) = self.rulesets.get_mut(&ruleset) {
            r.refs = r.refs.saturating_sub(1);
        }
    }

    /// Takes out every ruleset no table names, for its prefixes to be removed.
    pub fn evict_unreferenced(&mut self) -> Vec<(u32, Ruleset)> {
        let ids: Vec<u32> = self
            .rulesets
            .iter()
            .filter(|(_, r)| r.refs == 0)
            .map(|(&id, _)| id)
            .collect();
        ids.into_iter()
            .filter_map(|id| {
                let r = self.rulesets.remove(&id)?;
                if let Some(ids) = self.by_fingerprint.get_mut(&r.firewall.fingerprint()) {
                    ids.retain(|&i| i != id);
                    if ids.is_empty() {
                        self.by_fingerprint.remove(&r.firewall.fingerprint());
                    }
                }
                self.free_rulesets.insert(id);
                Some((id, r))
            })
            .collect()
    }

    /// Resident rulesets and their prefixes (v4, v6).
    pub fn ruleset_usage(&self) -> (usize, usize, usize) {
        let (v4, v6) = self.rulesets.values().fold((0, 0), |(a, b), r| {
            (a + r.keys.v4.len(), b + r.keys.v6.len())
        });
        (self.rulesets.len(), v4, v6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn firewall(port: u16) -> Arc<Firewall> {
        let mut rules = persona_common::firewall::RuleSet {
            count: 1,
            ..Default::default()
        };
        rules.rules[0].port_lo = port;
        rules.rules[0].port_hi = port;
        Arc::new(Firewall::new(
            vec![super::super::compile::Prefix {
                direction: 0,
                net: "198.51.100.0/24".parse().unwrap(),
                rules,
            }],
            Vec::new(),
        ))
    }

    #[test]
    fn equal_firewalls_share_a_ruleset_until_no_table_names_it() {
        let mut t = Tables::recover([], []);
        let a = firewall(22);
        assert_eq!(t.find_ruleset(&a), None);
        let id = t.alloc_ruleset().unwrap();
        t.insert_ruleset(id, a.clone(), Prefixes::default());
        let copy = Arc::new((*a).clone());
        assert_eq!(t.find_ruleset(&copy), Some(id), "found by content");
        assert_eq!(t.find_ruleset(&copy), Some(id), "then by pointer");
        assert_eq!(t.rulesets[&id].aliases.len(), 1);
        drop(copy);
        let another = Arc::new((*a).clone());
        assert_eq!(t.find_ruleset(&another), Some(id));
        assert_eq!(
            t.rulesets[&id].aliases.len(),
            1,
            "a copy dropped is no longer remembered"
        );
        assert_eq!(t.find_ruleset(&firewall(23)), None);
        assert_eq!(
            t.find_ruleset(&Arc::new(Firewall::default())),
            Some(EMPTY_RULESET)
        );
        t.hold(1, id);
        t.hold(2, id);
        t.unhold(1);
        assert!(t.evict_unreferenced().is_empty(), "table 2 still names it");
        t.unhold(2);
        let evicted = t.evict_unreferenced();
        assert_eq!(evicted.len(), 1);
        assert_eq!(t.find_ruleset(&a), None);
        assert_eq!(t.alloc_ruleset(), Some(id), "its id is free again");
    }
}
