//! Timeouts: the route's total timeout and, inside the retry loop, the per-try timeout.
//!
//! One layer serves both uses; it is placed twice in the stack. When the time elapses the
//! inner future is dropped (cancelling the upstream call) and the request fails with
//! [`FilterError::Timeout`](crate::FilterError::Timeout), which the proxy answers with
//! 504 `timeout`. The time covers the wait for the response head; the body then streams
//! without a deadline from this layer.

mod future;
mod layer;
mod service;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use future::ResponseFuture;
pub use layer::TimeoutLayer;
pub use service::Timeout;

/// Timeout settings of one route, built from the policy once per swap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeoutParams {
    /// `routes[].timeout`: the whole request, retries included.
    pub total: Option<Duration>,
    /// `routes[].retry.perTryTimeout`: each try.
    pub per_try: Option<Duration>,
}

impl TimeoutParams {
    /// Reads `timeout` and `retry.perTryTimeout` of a route.
    pub fn from_config(route: &sluice_config::Route) -> Self {
        Self {
            total: route.timeout.map(|d| d.get()),
            per_try: route
                .retry
                .as_ref()
                .and_then(|r| r.per_try_timeout)
                .map(|d| d.get()),
        }
    }

    /// The layer enforcing the route's total timeout (a pass-through when there is none).
    pub fn total_layer(&self) -> TimeoutLayer {
        TimeoutLayer::new(self.total)
    }

    /// The layer enforcing the per-try timeout (a pass-through when there is none).
    pub fn per_try_layer(&self) -> TimeoutLayer {
        TimeoutLayer::new(self.per_try)
    }
}
