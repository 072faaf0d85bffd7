//! A map from a key to a set of values that keeps no empty set: the indexes kept beside
//! the daemon's tables (which devices run a persona, who holds an address).
use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiMap<K, V>(BTreeMap<K, BTreeSet<V>>);

impl<K, V> Default for MultiMap<K, V> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<K: Ord, V: Ord> MultiMap<K, V> {
    pub fn insert(&mut self, key: K, value: V) {
        self.0.entry(key).or_default().insert(value);
    }

    /// Takes `value` from under `key`, and the key with it once it has none left.
    pub fn remove<Q, W>(&mut self, key: &Q, value: &W)
    where
        K: Borrow<Q>,
        V: Borrow<W>,
        Q: Ord + ?Sized,
        W: Ord + ?Sized,
    {
        if let Some(set) = self.0.get_mut(key) {
            set.remove(value);
            if set.is_empty() {
                self.0.remove(key);
            }
        }
    }

    pub fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&BTreeSet<V>>
    where
        K: Borrow<Q>,
    {
        self.0.get(key)
    }

    /// The keys, each with its values: for range lookups.
    pub fn as_map(&self) -> &BTreeMap<K, BTreeSet<V>> {
        &self.0
    }

    /// How many keys have a value.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_goes_with_its_last_value() {
        let mut m: MultiMap<String, u32> = MultiMap::default();
        m.insert("a".into(), 1);
        m.insert("a".into(), 2);
        m.insert("b".into(), 1);
        m.remove("a", &1);
        assert_eq!(m.get("a").map(|s| s.len()), Some(1));
        m.remove("a", &2);
        m.remove("c", &1);
        assert_eq!(m.get("a"), None);
        assert_eq!(m.len(), 1);
        m.remove("b", &1);
        assert!(m.is_empty());
    }
}
