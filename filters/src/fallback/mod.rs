//! Degradation: once a route's primary backend has failed, another backend or a static
//! answer instead of the error (`routes[].fallback`).
//!
//! The layer sits below the route's total timeout and the split, above retries:
//!
//! ```text
//! total timeout → split → fallback → retry → breaker → balancer → connection
//! ```
//!
//! so it sees a failure only once the primary's retries are spent, or when the failure is
//! final at once (`breaker-open` is never retried), and whatever it does happens within
//! the route's remaining time. On such a route this layer enforces the total timeout
//! itself ([`FallbackLayer::with_total`]), so that a request that runs out of time is
//! counted against the backend that had it: the primary, or the fallback backend. It
//! acts only on an error whose reason ([`Reason`]) is
//! listed in `on` (`breaker-open`, `no-healthy-endpoint`, `upstream-unavailable`,
//! `timeout`: a try's timeout); anything else, and any response the upstream gave, goes
//! back as it came.
//!
//! - `backend`: the request goes once more through the same inner stack with the
//!   [`SelectedBackend`](crate::extensions::SelectedBackend) of the fallback backend, so it
//!   passes that backend's own breaker and balancer (and its retries), never the
//!   primary's. Whatever the fallback backend answers, or its own error, is the answer:
//!   a fallback never falls back again. The request body is kept for it like a retry's
//!   (up to the route's `retry.maxReplayBytes`, default 64 KiB); a request whose body was
//!   not kept is not sent to the fallback backend and gets the primary's error.
//! - `response`: a static answer (status, headers, body), or for a gRPC caller with
//!   `grpcStatus` set a trailers-only gRPC status; it needs no body, so it always answers.
//!
//! Every fallback answer carries `x-sluice-degraded: <reason>`
//! ([`DEGRADED_HEADER`](crate::reason::DEGRADED_HEADER)) and is reported to the
//! [`FallbackObserver`] (the proxy counts `sluice_fallbacks_total{route,backend,reason}`,
//! `backend` being the primary). Routes without `fallback` do not get this layer.

mod future;
mod layer;
mod params;
mod service;
#[cfg(test)]
mod tests;

pub use future::ResponseFuture;
pub use layer::FallbackLayer;
pub use params::{FallbackAction, FallbackConfigError, FallbackParams, StaticResponse};
pub use service::Fallback;

use crate::reason::Reason;

/// Told about every answer a fallback gave.
pub trait FallbackObserver: Send + Sync + 'static {
    /// A fallback answered a request on `route` whose primary `backend` failed for `reason`.
    fn on_fallback(&self, route: &str, backend: &str, reason: Reason);
}

impl<F> FallbackObserver for F
where
    F: Fn(&str, &str, Reason) + Send + Sync + 'static,
{
    fn on_fallback(&self, route: &str, backend: &str, reason: Reason) {
        self(route, backend, reason);
    }
}
