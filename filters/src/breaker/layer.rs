use std::sync::Arc;

use tower_layer::Layer;

use super::circuit::Circuit;
use super::service::{Breaker, Circuits};

/// Wraps a backend's stack with a circuit breaker.
#[derive(Clone, Debug)]
pub struct BreakerLayer {
    circuits: Circuits,
}

impl BreakerLayer {
    /// A layer feeding `circuit` (from [`BreakerRegistry::get`](super::BreakerRegistry::get)),
    /// for a stack built per route × backend.
    pub fn new(circuit: Arc<Circuit>) -> Self {
        Self {
            circuits: Circuits::One(circuit),
        }
    }

    /// A layer for a route-level stack below the split: each request feeds the breaker
    /// at its [`SelectedBackend`](crate::extensions::SelectedBackend) index (the backend's
    /// position in `spec.backends`); a `None` entry, or a request without a chosen
    /// backend, passes unguarded.
    pub fn per_backend(circuits: Arc<[Option<Arc<Circuit>>]>) -> Self {
        Self {
            circuits: Circuits::PerBackend(circuits),
        }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Breaker::with_circuits(inner, self.circuits.clone())
    }
}
