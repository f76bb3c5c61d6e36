use std::sync::Arc;

use tower_layer::Layer;

use super::{Split, SplitParams};
use crate::random::RandomSource;

/// Chooses a backend per request and records it as a [`SelectedBackend`](crate::extensions::SelectedBackend).
#[derive(Clone, Debug)]
pub struct SplitLayer {
    params: Arc<SplitParams>,
    rng: RandomSource,
}

impl SplitLayer {
    /// A layer applying `params` with per-thread randomness.
    pub fn new(params: Arc<SplitParams>) -> Self {
        Self {
            params,
            rng: RandomSource::default(),
        }
    }

    /// Uses `rng` for non-sticky weighted picks (tests pass [`RandomSource::seeded`]).
    pub fn with_random(mut self, rng: RandomSource) -> Self {
        self.rng = rng;
        self
    }
}

impl<S> Layer<S> for SplitLayer {
    type Service = Split<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Split::new(inner, self.params.clone(), self.rng.clone())
    }
}
