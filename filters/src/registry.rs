//! The one pattern for state kept per key across policy swaps (breakers, retry budgets,
//! rate limiters, concurrency limiters, endpoint health): at each swap every live key
//! keeps its value when the new settings leave it unchanged and gets a rebuilt one
//! otherwise; keys no longer live are dropped. Stacks built after the swap take their
//! `Arc`s from here; services still holding an old value finish against it.
//!
//! Lookups happen when stacks are built and when the admin API reads, never per request.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// Values by key, each in an `Arc` shared with the stacks built from it.
pub(crate) struct Registry<K, V> {
    map: DashMap<K, Arc<V>>,
    /// Serialises whole-set [`update`](Self::update)s against each other.
    updating: Mutex<()>,
}

impl<K: Hash + Eq, V> Default for Registry<K, V> {
    fn default() -> Self {
        Self {
            map: DashMap::new(),
            updating: Mutex::new(()),
        }
    }
}

impl<K: Hash + Eq + Clone, V> Registry<K, V> {
    /// The value held for `key` when `keep` accepts it; otherwise `build` makes a new
    /// one (from the value held, if any), which replaces it.
    pub(crate) fn get_or_rebuild(
        &self,
        key: K,
        keep: impl FnOnce(&V) -> bool,
        build: impl FnOnce(Option<&V>) -> V,
    ) -> Arc<V> {
        match self.map.entry(key) {
            Entry::Occupied(held) if keep(held.get()) => held.get().clone(),
            Entry::Occupied(mut held) => {
                let next = Arc::new(build(Some(held.get())));
                held.insert(next.clone());
                next
            }
            Entry::Vacant(slot) => {
                let next = Arc::new(build(None));
                slot.insert(next.clone());
                next
            }
        }
    }

    /// Makes the held keys exactly those of `entries`, each through
    /// [`get_or_rebuild`](Self::get_or_rebuild) with `keep` and `build` given its
    /// settings; `dropped` is told of every key let go. Updates run one at a time.
    pub(crate) fn update<P>(
        &self,
        entries: impl IntoIterator<Item = (K, P)>,
        mut keep: impl FnMut(&V, &P) -> bool,
        mut build: impl FnMut(&K, &P, Option<&V>) -> V,
        mut dropped: impl FnMut(&K),
    ) {
        let _guard = self.updating.lock().unwrap_or_else(|e| e.into_inner());
        let mut live = HashSet::new();
        for (key, params) in entries {
            self.get_or_rebuild(
                key.clone(),
                |held| keep(held, &params),
                |held| build(&key, &params, held),
            );
            live.insert(key);
        }
        self.map.retain(|k, _| {
            let kept = live.contains(k);
            if !kept {
                dropped(k);
            }
            kept
        });
    }
}

impl<K: Hash + Eq, V> Registry<K, V> {
    /// The value held for `key`.
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|v| v.value().clone())
    }

    /// Drops the keys for which `keep` is false.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&K) -> bool) {
        self.map.retain(|k, _| keep(k));
    }

    /// Every value held, collected first so that no part of the map stays locked while
    /// the caller works on them.
    pub(crate) fn values(&self) -> Vec<Arc<V>> {
        self.map.iter().map(|e| e.value().clone()).collect()
    }

    /// Number of keys held.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no key is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value that remembers its settings and how many times it was built before.
    #[derive(Debug, PartialEq)]
    struct State {
        params: u32,
        generation: u32,
    }

    fn build(_: &&str, p: &u32, old: Option<&State>) -> State {
        State {
            params: *p,
            generation: old.map_or(0, |o| o.generation + 1),
        }
    }

    #[test]
    fn unchanged_settings_keep_the_value_changed_ones_rebuild_it() {
        let r: Registry<&str, State> = Registry::default();
        let a = r.get_or_rebuild("a", |s| s.params == 1, |old| build(&"a", &1, old));
        let again = r.get_or_rebuild("a", |s| s.params == 1, |_| unreachable!());
        assert!(Arc::ptr_eq(&a, &again));
        let changed = r.get_or_rebuild("a", |s| s.params == 2, |old| build(&"a", &2, old));
        assert_eq!(
            *changed,
            State {
                params: 2,
                generation: 1
            }
        );
        assert!(Arc::ptr_eq(&r.get("a").unwrap(), &changed));
    }

    #[test]
    fn update_keeps_rebuilds_adds_and_drops() {
        let r: Registry<&str, State> = Registry::default();
        let keep = |s: &State, p: &u32| s.params == *p;
        let mut dropped = Vec::new();
        r.update([("a", 1), ("b", 1)], keep, build, |k| dropped.push(*k));
        let a = r.get("a").unwrap();
        let b = r.get("b").unwrap();
        r.update([("a", 1), ("b", 2), ("c", 1)], keep, build, |k| {
            dropped.push(*k)
        });
        assert!(Arc::ptr_eq(&r.get("a").unwrap(), &a));
        assert!(!Arc::ptr_eq(&r.get("b").unwrap(), &b));
        assert_eq!(r.get("b").unwrap().generation, 1);
        assert_eq!(r.len(), 3);
        assert!(dropped.is_empty());
        r.update([("c", 1)], keep, build, |k| dropped.push(*k));
        dropped.sort_unstable();
        assert_eq!(dropped, ["a", "b"]);
        assert_eq!(r.values().len(), 1);
        r.retain(|_| false);
        assert!(r.is_empty());
    }
}
