use std::sync::Arc;

use tower_layer::Layer;

use super::circuit::Circuit;
use super::service::Breaker;

/// Wraps a backend's stack with the breaker of one route × backend.
#[derive(Clone, Debug)]
pub struct BreakerLayer {
    circuit: Arc<Circuit>,
}

impl BreakerLayer {
    /// A layer feeding `circuit` (from [`BreakerRegistry::get`](super::BreakerRegistry::get)).
    pub fn new(circuit: Arc<Circuit>) -> Self {
        Self { circuit }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Breaker::new(inner, Arc::clone(&self.circuit))
    }
}
