use std::sync::Arc;

use tower_layer::Layer;

use super::{ConcurrencyLimit, Limiter};

/// Applies one [`Limiter`] to the wrapped service.
#[derive(Clone, Debug)]
pub struct ConcurrencyLimitLayer {
    limiter: Arc<Limiter>,
}

impl ConcurrencyLimitLayer {
    /// A layer enforcing `limiter` (from [`ConcurrencyRegistry::get_or_rebuild`](super::ConcurrencyRegistry::get_or_rebuild)).
    pub fn new(limiter: Arc<Limiter>) -> Self {
        Self { limiter }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit::new(inner, self.limiter.clone())
    }
}
