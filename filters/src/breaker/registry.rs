//! Every breaker of the proxy, keyed by (route, backend), updated at each policy swap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::circuit::Circuit;
use super::observe::{BreakerObserver, BreakerSnapshot, NoopObserver};
use super::params::BreakerParams;

/// route → backend → breaker; nested so that both lookups take a borrowed `&str`.
type Map = HashMap<Arc<str>, HashMap<Arc<str>, Arc<Circuit>>>;

/// All breakers, keyed by (route, backend). Cheap to clone (one `Arc`).
///
/// Reads ([`get`](Self::get), [`snapshot`](Self::snapshot)) are lock-free loads of
/// the current map; [`update`](Self::update) builds a new map and swaps it in.
#[derive(Clone)]
pub struct BreakerRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    map: ArcSwap<Map>,
    observer: Arc<dyn BreakerObserver>,
    /// Serialises updates against each other (policy swaps only).
    updating: Mutex<()>,
}

impl Default for BreakerRegistry {
    fn default() -> Self {
        Self::new(Arc::new(NoopObserver))
    }
}

impl std::fmt::Debug for BreakerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerRegistry")
            .field("breakers", &self.len())
            .finish()
    }
}

impl BreakerRegistry {
    /// An empty registry reporting to `observer`.
    pub fn new(observer: Arc<dyn BreakerObserver>) -> Self {
        Self {
            inner: Arc::new(Inner {
                map: ArcSwap::from_pointee(HashMap::new()),
                observer,
                updating: Mutex::new(()),
            }),
        }
    }

    /// Replaces the set of breakers with exactly `entries` (route, backend, params),
    /// as built from a new policy snapshot.
    ///
    /// A breaker whose params are unchanged keeps its state and counts; one whose
    /// params changed starts afresh (closed); one no longer listed is dropped
    /// (services still holding it finish their requests against it).
    pub fn update<R, B>(&self, entries: impl IntoIterator<Item = (R, B, BreakerParams)>)
    where
        R: AsRef<str>,
        B: AsRef<str>,
    {
        let _guard = self
            .inner
            .updating
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let old = self.inner.map.load_full();
        let obs = &self.inner.observer;
        let mut next = Map::new();
        for (route, backend, params) in entries {
            let (route, backend) = (route.as_ref(), backend.as_ref());
            let existing = old.get(route).and_then(|m| m.get(backend));
            let circuit = match existing {
                Some(c) if *c.params() == params => Arc::clone(c),
                _ => {
                    if existing.is_some() {
                        obs.on_removed(route, backend);
                    }
                    obs.on_added(route, backend);
                    Arc::new(Circuit::new(
                        Arc::from(route),
                        Arc::from(backend),
                        params,
                        Arc::clone(obs),
                    ))
                }
            };
            next.entry(Arc::clone(circuit.route_arc()))
                .or_default()
                .insert(Arc::clone(circuit.backend_arc()), circuit);
        }
        for (route, backends) in old.iter() {
            for backend in backends.keys() {
                let kept = next.get(route).is_some_and(|m| m.contains_key(backend));
                if !kept {
                    obs.on_removed(route, backend);
                }
            }
        }
        self.inner.map.store(Arc::new(next));
    }

    /// The breaker of a route × backend, to build a [`BreakerLayer`](super::BreakerLayer) with.
    pub fn get(&self, route: &str, backend: &str) -> Option<Arc<Circuit>> {
        self.inner.map.load().get(route)?.get(backend).cloned()
    }

    /// Every breaker, sorted by route then backend, for `GET /breakers`.
    pub fn snapshot(&self) -> Vec<BreakerSnapshot> {
        let map = self.inner.map.load();
        let mut all: Vec<_> = map
            .values()
            .flat_map(|m| m.values())
            .map(|c| c.snapshot())
            .collect();
        all.sort_by(|a, b| (&a.route, &a.backend).cmp(&(&b.route, &b.backend)));
        all
    }

    /// Closes one breaker by hand (`POST /breakers/<route>/<backend>/reset`); false if unknown.
    pub fn reset(&self, route: &str, backend: &str) -> bool {
        self.get(route, backend).map(|c| c.reset()).is_some()
    }

    /// Opens one breaker by hand until reset (`POST /breakers/<route>/<backend>/open`);
    /// false if unknown.
    pub fn force_open(&self, route: &str, backend: &str) -> bool {
        self.get(route, backend).map(|c| c.force_open()).is_some()
    }

    /// Number of breakers.
    pub fn len(&self) -> usize {
        self.inner.map.load().values().map(HashMap::len).sum()
    }

    /// True when there are no breakers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
