//! Personas as shifts use them: parsed, compiled and turned into diff lines once per
//! stored version, then shared by every shift to them; which of them declare an
//! address. Devices, parsed once per stored version, for what looks through all of them.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use super::{ShiftError, not_found, parse, rule_lines};
use crate::{
    datapath::{CompiledPersona, compile},
    model::{AddressScope, DeviceSpec, PersonaSpec},
    multimap::MultiMap,
    store::{Kind, Stamp, Store},
};

/// One stored version of a persona, ready to shift to.
pub struct Entry {
    pub stamp: Stamp,
    pub spec: Arc<PersonaSpec>,
    /// Compiled as declared (a pooled persona without its lease), with its counter id.
    pub compiled: CompiledPersona,
    /// Its firewall as diff lines, for plans.
    pub rules: Arc<BTreeSet<String>>,
}

impl Entry {
    /// The persona as one device runs it: `leases` from its pools as its addresses.
    pub fn leased(
        &self,
        leases: &[ipnet::IpNet],
    ) -> Result<(Arc<PersonaSpec>, CompiledPersona), ShiftError> {
        if leases.is_empty() && self.spec.address_pool.is_empty() {
            return Ok((self.spec.clone(), self.compiled.clone()));
        }
        let spec = self.spec.leased(leases);
        let mut compiled = compile(&spec)?;
        compiled.id = self.compiled.id;
        Ok((Arc::new(spec), compiled))
    }
}

/// Shifts between the same two versions plan the same firewall diff.
type DiffKey = (Option<(String, Stamp)>, (String, Stamp));

/// How many firewall diffs are kept; beyond it the cache starts over.
const DIFFS_KEPT: usize = 256;

#[derive(Default)]
pub struct Catalog {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    diffs: Mutex<HashMap<DiffKey, Arc<Vec<String>>>>,
    devices: Mutex<hashbrown::HashMap<String, KnownDevice>>,
    fixed: Mutex<Fixed>,
}

/// A device as parsed, and the generation of the store's devices it was last found
/// current at: until that moves, it is not asked of the store again.
struct KnownDevice {
    stamp: Stamp,
    spec: Arc<DeviceSpec>,
    current_at: Option<u64>,
}

/// What a persona declares: its fixed addresses and its pools.
#[derive(Default)]
struct Declared {
    fixed: Vec<IpAddr>,
    pools: Vec<ipnet::IpNet>,
}

/// Every stored persona's addresses, as of a generation of the store's personas.
#[derive(Default)]
struct Fixed {
    generation: Option<u64>,
    by_persona: HashMap<String, (Stamp, Declared)>,
    by_address: MultiMap<IpAddr, String>,
    /// The personas with pools (few: most have addresses of their own).
    pooled: BTreeSet<String>,
}

impl Fixed {
    fn set(&mut self, name: &str, now: Option<(Stamp, Declared)>) {
        self.pooled.remove(name);
        if let Some((_, old)) = self.by_persona.remove(name) {
            for a in old.fixed {
                self.by_address.remove(&a, name);
            }
        }
        if let Some((stamp, declared)) = now {
            for &a in &declared.fixed {
                self.by_address.insert(a, name.to_owned());
            }
            if !declared.pools.is_empty() {
                self.pooled.insert(name.to_owned());
            }
            self.by_persona.insert(name.to_owned(), (stamp, declared));
        }
    }

    /// The personas with a fixed address in `scope`.
    fn declaring<'a>(&'a self, scope: &'a AddressScope) -> impl Iterator<Item = &'a String> {
        scope
            .within(self.by_address.as_map())
            .flat_map(|(_, names)| names)
    }

    /// The personas with a pool that overlaps `scope`.
    fn pooling<'a>(&'a self, scope: &'a AddressScope) -> impl Iterator<Item = &'a String> {
        self.pooled.iter().filter(|name| {
            let pools = &self.by_persona[*name].1.pools;
            pools
                .iter()
                .any(|p| scope.overlaps(&AddressScope::of_net(p)))
        })
    }
}

/// Each name once, in order.
fn names<'a>(found: impl Iterator<Item = &'a String>) -> Vec<String> {
    let set: BTreeSet<&String> = found.collect();
    set.into_iter().cloned().collect()
}

impl Catalog {
    /// Every stored device that parses, by name; only those written since the last
    /// call are read again.
    pub fn devices(&self, store: &dyn Store) -> Result<Vec<(String, Arc<DeviceSpec>)>, ShiftError> {
        let generation = store.generation(Kind::Device);
        let stamps = store.stamps(Kind::Device)?;
        let mut known = self.devices.lock().expect("device catalog lock");
        let mut out = Vec::with_capacity(stamps.len());
        for (name, stamp) in stamps {
            if let Ok(Some(spec)) = Self::parsed(&mut known, store, &name, (stamp, generation)) {
                out.push((name, spec));
            }
        }
        // Only a device deleted, or no longer parsing, leaves one known beyond these.
        if known.len() > out.len() {
            let names: std::collections::HashSet<&str> =
                out.iter().map(|(n, _)| n.as_str()).collect();
            known.retain(|n, _| names.contains(n.as_str()));
        }
        Ok(out)
    }

    /// One stored device; `None` when there is none.
    pub fn device(
        &self,
        store: &dyn Store,
        name: &str,
    ) -> Result<Option<Arc<DeviceSpec>>, ShiftError> {
        // Read before the stamp: a write in between is seen at the next call.
        let generation = store.generation(Kind::Device);
        if generation.is_some()
            && let Some(k) = self.devices.lock().expect("device catalog lock").get(name)
            && k.current_at == generation
        {
            return Ok(Some(k.spec.clone()));
        }
        let Some(stamp) = store.stamp(Kind::Device, name)? else {
            return Ok(None);
        };
        let mut known = self.devices.lock().expect("device catalog lock");
        Self::parsed(&mut known, store, name, (stamp, generation))
    }

    fn parsed(
        known: &mut hashbrown::HashMap<String, KnownDevice>,
        store: &dyn Store,
        name: &str,
        (stamp, generation): (Stamp, Option<u64>),
    ) -> Result<Option<Arc<DeviceSpec>>, ShiftError> {
        if let Some(k) = known.get_mut(name)
            && k.stamp == stamp
        {
            k.current_at = generation;
            return Ok(Some(k.spec.clone()));
        }
        let Some(record) = store.get(Kind::Device, name)? else {
            return Ok(None);
        };
        let spec = Arc::new(parse::<DeviceSpec>(&record)?);
        let k = KnownDevice {
            stamp,
            spec: spec.clone(),
            current_at: generation,
        };
        known.insert(name.to_owned(), k);
        Ok(Some(spec))
    }

    /// The persona's stored version, from the cache while the store says it is current.
    pub fn persona(&self, store: &dyn Store, name: &str) -> Result<Arc<Entry>, ShiftError> {
        let stamp = store
            .stamp(Kind::Persona, name)?
            .ok_or_else(|| not_found("Persona", name))?;
        if let Some(e) = self.entries.lock().expect("catalog lock").get(name)
            && e.stamp == stamp
        {
            return Ok(e.clone());
        }
        let record = store
            .get(Kind::Persona, name)?
            .ok_or_else(|| not_found("Persona", name))?;
        let spec: PersonaSpec = parse(&record)?;
        let mut compiled = compile(&spec)?;
        compiled.id = store.persona_id(name)?;
        let entry = Arc::new(Entry {
            stamp: Stamp {
                version: record.version,
                updated: record.updated,
            },
            rules: Arc::new(rule_lines(&spec)),
            spec: Arc::new(spec),
            compiled,
        });
        self.entries
            .lock()
            .expect("catalog lock")
            .insert(name.to_owned(), entry.clone());
        Ok(entry)
    }

    /// The stored personas that declare a fixed address in `scope`.
    pub fn declaring(
        &self,
        store: &dyn Store,
        scope: &AddressScope,
    ) -> Result<Vec<String>, ShiftError> {
        let fixed = self.fixed_now(store)?;
        Ok(names(fixed.declaring(scope)))
    }

    /// The fixed addresses of the stored persona `name`: none for one gone, or that
    /// does not parse.
    pub fn fixed(&self, store: &dyn Store, name: &str) -> Result<Vec<IpAddr>, ShiftError> {
        let fixed = self.fixed_now(store)?;
        Ok(fixed
            .by_persona
            .get(name)
            .map(|(_, d)| d.fixed.clone())
            .unwrap_or_default())
    }

    /// The stored personas that declare an address in `scope`, fixed or in a pool.
    pub fn overlapping(
        &self,
        store: &dyn Store,
        scope: &AddressScope,
    ) -> Result<Vec<String>, ShiftError> {
        let fixed = self.fixed_now(store)?;
        Ok(names(fixed.declaring(scope).chain(fixed.pooling(scope))))
    }

    /// The fixed addresses as stored now: read again only when the store's personas
    /// have changed, and then only those written since.
    fn fixed_now(&self, store: &dyn Store) -> Result<std::sync::MutexGuard<'_, Fixed>, ShiftError> {
        let mut fixed = self.fixed.lock().expect("fixed address lock");
        let generation = store.generation(Kind::Persona);
        if generation.is_some() && generation == fixed.generation {
            return Ok(fixed);
        }
        // Read before the stamps: a write in between is seen at the next call. Recorded
        // only once the whole refresh has succeeded: one cut short is done again.
        fixed.generation = None;
        let stamps: HashMap<String, Stamp> = store.stamps(Kind::Persona)?.into_iter().collect();
        let gone: Vec<String> = fixed
            .by_persona
            .keys()
            .filter(|n| !stamps.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            fixed.set(&name, None);
        }
        for (name, stamp) in stamps {
            if fixed
                .by_persona
                .get(&name)
                .is_some_and(|(s, _)| *s == stamp)
            {
                continue;
            }
            let declared = self.declared(store, &name, stamp)?;
            fixed.set(&name, declared.map(|d| (stamp, d)));
        }
        fixed.generation = generation;
        Ok(fixed)
    }

    /// A persona's addresses at `stamp`, from its entry when that is current; `None`
    /// for one gone or that no longer parses.
    fn declared(
        &self,
        store: &dyn Store,
        name: &str,
        stamp: Stamp,
    ) -> Result<Option<Declared>, ShiftError> {
        let addrs = |spec: &PersonaSpec| Declared {
            fixed: spec.addresses.iter().map(|a| a.addr()).collect(),
            pools: spec.address_pool.clone(),
        };
        if let Some(e) = self.entries.lock().expect("catalog lock").get(name)
            && e.stamp == stamp
        {
            return Ok(Some(addrs(&e.spec)));
        }
        let Some(record) = store.get(Kind::Persona, name)? else {
            return Ok(None);
        };
        Ok(parse::<PersonaSpec>(&record).ok().map(|s| addrs(&s)))
    }

    /// The firewall lines that go and come between two versions.
    pub fn firewall_diff(
        &self,
        from: Option<(&str, &Entry)>,
        to: (&str, &Entry),
    ) -> Arc<Vec<String>> {
        let key = |(n, e): (&str, &Entry)| (n.to_owned(), e.stamp);
        let k = (from.map(key), key(to));
        if let Some(d) = self.diffs.lock().expect("diff lock").get(&k) {
            return d.clone();
        }
        let empty = BTreeSet::new();
        let old = from.map_or(&empty, |(_, e)| &*e.rules);
        let diff = Arc::new(super::set_diff_ref("firewall", old, &to.1.rules));
        let mut diffs = self.diffs.lock().expect("diff lock");
        if diffs.len() >= DIFFS_KEPT {
            diffs.clear();
        }
        diffs.insert(k, diff.clone());
        diff
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Expect, embedded::EmbeddedStore};

    fn put(store: &EmbeddedStore, addr: &str) {
        let spec = serde_json::json!({ "addresses": [addr] });
        store
            .put(Kind::Persona, "office", spec, Expect::Any)
            .expect("put");
    }

    #[test]
    fn a_device_is_read_again_only_after_a_write_and_gone_once_deleted() {
        let dir = std::env::temp_dir().join(format!("persona-catalog-dev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = EmbeddedStore::open(&dir.join("s.redb")).unwrap();
        let catalog = Catalog::default();
        let put = |name: &str, interface: &str| {
            let spec = serde_json::json!({ "interface": interface, "innerV4": "198.18.0.2" });
            store.put(Kind::Device, name, spec, Expect::Any).unwrap();
        };
        put("vm1", "pvm1");
        let first = catalog.device(&store, "vm1").unwrap().unwrap();
        let again = catalog.device(&store, "vm1").unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &again), "unchanged: the same spec");
        put("vm2", "pvm2");
        let after_another = catalog.device(&store, "vm1").unwrap().unwrap();
        assert!(
            Arc::ptr_eq(&first, &after_another),
            "another's write: still current"
        );
        put("vm1", "pvm9");
        assert_eq!(
            catalog.device(&store, "vm1").unwrap().unwrap().interface,
            "pvm9"
        );
        store.delete(Kind::Device, "vm1", Expect::Any).unwrap();
        assert!(catalog.device(&store, "vm1").unwrap().is_none(), "gone");
        let names: Vec<String> = catalog
            .devices(&store)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["vm2"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_persona_is_compiled_once_per_write_and_again_after_each() {
        let dir = std::env::temp_dir().join(format!("persona-catalog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = EmbeddedStore::open(&dir.join("s.redb")).unwrap();
        let catalog = Catalog::default();
        put(&store, "203.0.113.10/24");
        let first = catalog.persona(&store, "office").unwrap();
        let again = catalog.persona(&store, "office").unwrap();
        assert!(Arc::ptr_eq(&first, &again), "unchanged: the same entry");

        put(&store, "203.0.113.11/24");
        let updated = catalog.persona(&store, "office").unwrap();
        assert_eq!(updated.compiled.addresses()[0].to_string(), "203.0.113.11");

        // Deleted and made again: version 1 once more, yet another write.
        store.delete(Kind::Persona, "office", Expect::Any).unwrap();
        assert!(catalog.persona(&store, "office").is_err(), "gone");
        put(&store, "203.0.113.12/24");
        let remade = catalog.persona(&store, "office").unwrap();
        assert_eq!(remade.stamp.version, 1);
        assert_eq!(remade.compiled.addresses()[0].to_string(), "203.0.113.12");
        assert_eq!(
            remade.compiled.id, first.compiled.id,
            "the counter id stays"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
