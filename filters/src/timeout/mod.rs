//! The route's total timeout (`routes[].timeout`). The per-try timeout is the retry
//! layer's own ([`crate::retry`]), so no timeout layer sits inside the retry loop.
//!
//! When the time elapses the inner future is dropped (cancelling the upstream call) and
//! the request fails with [`FilterError::Timeout`](crate::FilterError::Timeout), which
//! the proxy answers with 504 `timeout`. The time covers the wait for the response head; the body then streams
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
}

impl TimeoutParams {
    /// Reads `timeout` of a route.
    pub fn from_config(route: &sluice_config::Route) -> Self {
        Self {
            total: route.timeout.map(|d| d.get()),
        }
    }

    /// The layer enforcing the route's total timeout (a pass-through when there is none).
    pub fn total_layer(&self) -> TimeoutLayer {
        TimeoutLayer::new(self.total)
    }
}
