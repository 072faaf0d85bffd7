//! Counters that scale: a (device, persona) pair's keys live in `COUNTERS` only while a
//! table counts for it. Once none does (its last table freed, after a grace period, so
//! no program can add to them), they are folded into `FOLDED` and freed; reads add both,
//! so every count only grows. A scrape reads each map in one batched pass.
use persona_common::counters::{HANDSHAKE_BUCKETS, HANDSHAKE_SUM, HandshakeKey};

use super::*;
use crate::datapath::{DeviceCounts, batch};

/// Folded counts per device: persona → (direction, reason) → counts.
pub(super) type Folded = BTreeMap<u32, BTreeMap<u32, Counters>>;

/// A per-CPU counter as a batch read returns it, summed over CPUs.
fn summed_bytes(bytes: &[u8], cpus: usize) -> Counter {
    batch::per_cpu::<Counter>(bytes, cpus).fold(Counter::default(), |a, b| add(a, &b))
}

impl KernelDatapath {
    /// Reads `FOLDED` back into memory, at start.
    pub(super) fn load_folded(maps: &Maps) -> Result<Folded> {
        let mut folded = Folded::new();
        let rows = batch::lookup_all::<CounterKey>(maps.folded.map(), size_of::<Counter>())
            .map_err(io_err("reading FOLDED"))?;
        for (key, bytes) in rows {
            let Some(reason) = Reason::from_u8(key.reason) else {
                continue;
            };
            let c = batch::per_cpu::<Counter>(&bytes, 1)
                .next()
                .unwrap_or_default();
            folded
                .entry(key.ifindex)
                .or_default()
                .entry(key.persona)
                .or_default()
                .insert((key.direction, reason), c);
        }
        Ok(folded)
    }

    /// Pairs found with keys in `COUNTERS` that no table counts for (left by a process
    /// that stopped before folding them), to be folded.
    pub(super) fn stray_pairs(&self) -> Result<Vec<Pair>> {
        let rows = batch::lookup_all::<CounterKey>(
            self.maps.counters.map(),
            size_of::<Counter>().next_multiple_of(8) * self.cpus,
        )
        .map_err(io_err("reading COUNTERS"))?;
        let mut pairs: Vec<Pair> = rows
            .into_iter()
            .map(|(k, _)| (k.ifindex, k.persona))
            .filter(|&(ifindex, persona)| {
                persona != NO_PERSONA
                    && !self.tables.is_owned((ifindex, persona))
                    && self.maps.devices.get(&ifindex, 0).is_ok()
            })
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        Ok(pairs)
    }

    /// Folds every pair queued as unowned that still is: no program can add to its keys
    /// any more. A pair that fails to fold (FOLDED full, or out of memory for a moment)
    /// keeps its keys and stays queued: nothing is lost, and no shift fails for it.
    pub(super) fn fold_unowned(&mut self) {
        let mut failed = Vec::new();
        while let Some(pair) = self.unowned.pop() {
            if self.tables.is_owned(pair) {
                continue;
            }
            if let Err(e) = self.fold(pair) {
                tracing::warn!(ifindex = pair.0, persona = pair.1, error = %e, "folding counters");
                failed.push(pair);
            }
        }
        self.unowned = failed;
    }

    /// Adds a pair's counts into `FOLDED`, then frees its keys. (A crash between the
    /// two counts them twice on the next fold; the other order could lose them.)
    fn fold(&mut self, (ifindex, persona): Pair) -> Result<()> {
        tracing::debug!(
            ifindex,
            persona,
            "folding the counts of a pair no table counts for"
        );
        for key in Self::counter_keys(ifindex, persona) {
            let Ok(values) = self.maps.counters.get(&key, 0) else {
                continue;
            };
            let counted = summed(values.iter());
            if counted.packets > 0 || counted.bytes > 0 {
                self.add_folded(key, counted)?;
            }
            match self.maps.counters.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(bpf_err("COUNTERS")(e)),
            }
        }
        Ok(())
    }

    pub(super) fn add_folded(&mut self, key: CounterKey, c: Counter) -> Result<()> {
        let Some(reason) = Reason::from_u8(key.reason) else {
            return Ok(());
        };
        let entry = self
            .folded
            .entry(key.ifindex)
            .or_default()
            .entry(key.persona)
            .or_default()
            .entry((key.direction, reason))
            .or_default();
        let total = add(*entry, &c);
        self.maps
            .folded
            .insert(key, total, 0)
            .map_err(bpf_err("FOLDED"))?;
        *entry = total;
        Ok(())
    }

    /// Removes everything counted for a device: its live keys, its folded counts and its
    /// handshake histogram.
    pub(super) fn forget_counts(&mut self, ifindex: u32) {
        let keys: Vec<CounterKey> = self
            .maps
            .counters
            .keys()
            .flatten()
            .filter(|k| k.ifindex == ifindex)
            .collect();
        for k in keys {
            let _ = self.maps.counters.remove(&k);
        }
        for (persona, counters) in self.folded.remove(&ifindex).unwrap_or_default() {
            for (direction, reason) in counters.into_keys() {
                let _ = self
                    .maps
                    .folded
                    .remove(&CounterKey::new(ifindex, persona, direction, reason));
            }
        }
        for bucket in 0..=HANDSHAKE_SUM {
            let _ = self
                .maps
                .handshakes
                .remove(&HandshakeKey { ifindex, bucket });
        }
    }

    /// The folded counts of a device, added into `out`.
    pub(super) fn add_folded_into(&self, ifindex: u32, out: &mut BTreeMap<u32, Counters>) {
        for (persona, counters) in self.folded.get(&ifindex).into_iter().flatten() {
            let mine = out.entry(*persona).or_default();
            for (k, c) in counters {
                let t = mine.entry(*k).or_default();
                *t = add(*t, c);
            }
        }
    }

    /// Every device's counters and handshakes, each map read in one batched pass.
    pub(super) fn counts_all(&self) -> Result<BTreeMap<u32, DeviceCounts>> {
        let mut out: BTreeMap<u32, DeviceCounts> = self
            .maps
            .devices
            .keys()
            .flatten()
            .map(|i| (i, DeviceCounts::default()))
            .collect();
        let per_cpu_len = |t: usize| t.next_multiple_of(8) * self.cpus;
        let live = batch::lookup_all::<CounterKey>(
            self.maps.counters.map(),
            per_cpu_len(size_of::<Counter>()),
        )
        .map_err(io_err("reading COUNTERS"))?;
        self.live_keys.set(live.len() as u64);
        let mut count = |ifindex: u32, persona: u32, k: (u8, Reason), c: Counter| {
            if let Some(d) = out.get_mut(&ifindex) {
                let t = d
                    .by_persona
                    .entry(persona)
                    .or_default()
                    .entry(k)
                    .or_default();
                *t = add(*t, &c);
            }
        };
        for (key, bytes) in live {
            let Some(reason) = Reason::from_u8(key.reason) else {
                continue;
            };
            let c = summed_bytes(&bytes, self.cpus);
            count(key.ifindex, key.persona, (key.direction, reason), c);
        }
        let tables = batch::lookup_all::<u32>(self.maps.personas.map(), size_of::<PersonaTable>())
            .map_err(io_err("reading PERSONAS"))?;
        let tracked =
            batch::lookup_all::<u32>(self.maps.tracked.map(), per_cpu_len(size_of::<Counter>()))
                .map_err(io_err("reading TRACKED"))?;
        let tracked: BTreeMap<u32, Counter> = tracked
            .into_iter()
            .map(|(slot, bytes)| (slot, summed_bytes(&bytes, self.cpus)))
            .collect();
        for (table, bytes) in tables {
            let Some(t) = batch::per_cpu::<PersonaTable>(&bytes, 1).next() else {
                continue;
            };
            if table == META_TABLE || t.owner_ifindex == 0 {
                continue;
            }
            for direction in [DIR_EGRESS, DIR_INGRESS] {
                if let Some(c) = tracked.get(&tracked_slot(table, direction)) {
                    count(
                        t.owner_ifindex,
                        t.owner_persona,
                        (direction, Reason::AllowTracked),
                        *c,
                    );
                }
            }
        }
        for (ifindex, d) in out.iter_mut() {
            self.add_folded_into(*ifindex, &mut d.by_persona);
        }
        let shakes = batch::lookup_all::<HandshakeKey>(
            self.maps.handshakes.map(),
            per_cpu_len(size_of::<u64>()),
        )
        .map_err(io_err("reading HANDSHAKES"))?;
        for (key, bytes) in shakes {
            let Some(d) = out.get_mut(&key.ifindex) else {
                continue;
            };
            let n: u64 = batch::per_cpu::<u64>(&bytes, self.cpus).sum();
            if d.handshakes.0.is_empty() {
                d.handshakes.0 = vec![0; HANDSHAKE_BUCKETS as usize];
            }
            match d.handshakes.0.get_mut(key.bucket as usize) {
                Some(b) => *b += n,
                None if key.bucket == HANDSHAKE_SUM => d.handshakes.1 += n,
                None => {}
            }
        }
        Ok(out)
    }
}
