use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::registry::RouteRetry;
use super::service::Retry;

/// Retries failed tries of one route against one backend's stack.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    route: Option<Arc<RouteRetry>>,
    backend: Arc<str>,
    total: Option<Duration>,
}

impl RetryLayer {
    /// A layer retrying with `route`'s params and budget (from
    /// [`RetryRegistry::get`](super::RetryRegistry::get)). Outcomes are labelled with
    /// the request's [`SelectedBackend`](crate::extensions::SelectedBackend) name when the
    /// stack is route-level, else with `backend`.
    pub fn new(route: Arc<RouteRetry>, backend: impl Into<Arc<str>>) -> Self {
        Self {
            route: Some(route),
            backend: backend.into(),
            total: None,
        }
    }

    /// A layer that never retries, for routes without `retry`: the stack keeps one
    /// type whether a route retries or not.
    pub fn disabled(backend: impl Into<Arc<str>>) -> Self {
        Self {
            route: None,
            backend: backend.into(),
            total: None,
        }
    }

    /// Enforces the route's total timeout here too, as [`TimeoutLayer`](crate::timeout::TimeoutLayer)
    /// directly above this layer would (the request fails with
    /// [`FilterError::Timeout`](crate::FilterError::Timeout) of `total`, retries
    /// included), with one timer per request for whichever of the total and the per-try
    /// deadline comes first instead of one each. Only for a stack where nothing between
    /// the two layers waits or sends a request twice (no fallback in between).
    pub fn with_total(mut self, total: Option<Duration>) -> Self {
        self.total = total;
        self
    }
}

impl<S: Clone> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(inner, self.route.clone(), Arc::clone(&self.backend)).with_total(self.total)
    }
}
