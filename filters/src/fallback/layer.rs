use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::{Fallback, FallbackObserver, FallbackParams};

/// Answers with a route's fallback once its primary has failed.
#[derive(Clone)]
pub struct FallbackLayer {
    params: Arc<FallbackParams>,
    route: Arc<str>,
    observer: Arc<dyn FallbackObserver>,
    total: Option<Duration>,
}

impl std::fmt::Debug for FallbackLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("route", &self.route)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl FallbackLayer {
    /// A layer for `route` (its key, for the observer) with its compiled `params`.
    pub fn new(
        params: Arc<FallbackParams>,
        route: impl Into<Arc<str>>,
        observer: Arc<dyn FallbackObserver>,
    ) -> Self {
        Self {
            params,
            route: route.into(),
            observer,
            total: None,
        }
    }

    /// Enforces the route's total timeout here too, as a
    /// [`TimeoutLayer`](crate::timeout::TimeoutLayer) above the split would (the request
    /// fails with [`FilterError::Timeout`](crate::FilterError::Timeout) of `total`,
    /// fallback included), but naming the backend that had the request when the time ran
    /// out ([`AtBackend`](crate::AtBackend)): the primary, or the fallback backend once the
    /// request went there. Only for a stack where nothing between the split and this
    /// layer waits.
    pub fn with_total(mut self, total: Option<Duration>) -> Self {
        self.total = total;
        self
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;

    fn layer(&self, inner: S) -> Fallback<S> {
        Fallback::new(
            inner,
            self.params.clone(),
            self.route.clone(),
            self.observer.clone(),
        )
        .with_total(self.total)
    }
}
