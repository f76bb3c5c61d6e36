use std::sync::Arc;

use tower_layer::Layer;

use super::ConnectFailureClassifier;
use super::{Balance, EndpointSet, is_connect_failure};
use crate::random::RandomSource;

/// Balances each request over the endpoints of its selected backend.
#[derive(Clone, Debug)]
pub struct BalanceLayer {
    backends: Arc<[Arc<EndpointSet>]>,
    rng: RandomSource,
    classify: ConnectFailureClassifier,
}

impl BalanceLayer {
    /// A layer over `backends`: one [`EndpointSet`] per policy backend, in file order, so
    /// that [`SelectedBackend::index`](crate::extensions::SelectedBackend::index) indexes it.
    pub fn new(backends: Arc<[Arc<EndpointSet>]>) -> Self {
        Self {
            backends,
            rng: RandomSource::default(),
            classify: is_connect_failure,
        }
    }

    /// Uses `rng` for the two random choices (tests pass [`RandomSource::seeded`]).
    pub fn with_random(mut self, rng: RandomSource) -> Self {
        self.rng = rng;
        self
    }

    /// Decides which inner errors mean "connection refused" and eject the endpoint.
    pub fn classify_with(mut self, classify: ConnectFailureClassifier) -> Self {
        self.classify = classify;
        self
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Balance::new(
            inner,
            self.backends.clone(),
            self.rng.clone(),
            self.classify,
        )
    }
}
