//! Every breaker of the proxy, keyed by (route, backend), updated at each policy swap.

use std::sync::Arc;

use super::circuit::Circuit;
use super::observe::{BreakerObserver, BreakerSnapshot, NoopObserver};
use super::params::BreakerParams;
use crate::registry::Registry;

/// (route, backend).
type Key = (Arc<str>, Arc<str>);

/// All breakers, keyed by (route, backend). Cheap to clone (one `Arc`).
///
/// [`update`](Self::update) is called at each policy swap; [`get`](Self::get) when the
/// stacks are built from it.
#[derive(Clone)]
pub struct BreakerRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    map: Registry<Key, Circuit>,
    observer: Arc<dyn BreakerObserver>,
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
                map: Registry::default(),
                observer,
            }),
        }
    }

    /// Replaces the set of breakers with exactly `entries` (route, backend, params),
    /// as built from a new policy snapshot.
    ///
    /// A breaker whose params are unchanged keeps its state and counts; one whose
    /// params changed is rebuilt with them but goes on from where it was (an opening
    /// keeps its time left, one opened by hand stays open until reset, counts and
    /// history stay); one no longer listed is dropped (services still holding it
    /// finish their requests against it).
    pub fn update<R, B>(&self, entries: impl IntoIterator<Item = (R, B, BreakerParams)>)
    where
        R: AsRef<str>,
        B: AsRef<str>,
    {
        let obs = &self.inner.observer;
        let entries = entries.into_iter().map(|(route, backend, params)| {
            let key: Key = (route.as_ref().into(), backend.as_ref().into());
            (key, params)
        });
        self.inner.map.update(
            entries,
            |circuit, params| circuit.params() == params,
            |(route, backend), params, held| match held {
                // Same route × backend, same state: what the observer shows stands.
                Some(old) => Circuit::carried_from(old, params.clone()),
                None => {
                    obs.on_added(route, backend);
                    Circuit::new(route.clone(), backend.clone(), params.clone(), obs.clone())
                }
            },
            |(route, backend)| obs.on_removed(route, backend),
        );
    }

    /// The breaker of a route × backend, to build a [`BreakerLayer`](super::BreakerLayer) with.
    pub fn get(&self, route: &str, backend: &str) -> Option<Arc<Circuit>> {
        self.inner.map.get(&(Arc::from(route), Arc::from(backend)))
    }

    /// Every breaker, sorted by route then backend, for `GET /breakers`.
    pub fn snapshot(&self) -> Vec<BreakerSnapshot> {
        let mut all: Vec<_> = self
            .inner
            .map
            .values()
            .iter()
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
        self.inner.map.len()
    }

    /// True when there are no breakers.
    pub fn is_empty(&self) -> bool {
        self.inner.map.is_empty()
    }
}
