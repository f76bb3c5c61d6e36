//! Rate limiting: token buckets (governor's GCRA), optionally one per key.
//!
//! A [`RateLimitRegistry`] holds one [`KeyedLimiter`] per route (or per inbound service);
//! the proxy asks it for the limiter of each route at every policy swap, so buckets survive
//! a swap that leaves the route's [`RateLimitParams`] unchanged. [`RateLimitLayer`] wraps a
//! service with one limiter: a request over the limit fails at once with
//! [`FilterError::RateLimited`](crate::FilterError::RateLimited), carrying `retry_after` and
//! the IETF `RateLimit-Policy` / `RateLimit` header values; allowed responses get the same
//! headers. [`refusal_headers`] adds `retry-after` and those headers to the proxy's
//! refusal.
//!
//! Keyed limits bound their memory: a limiter keeps at most `max_keys` keys (new keys beyond
//! that share one overflow bucket) and drops idle keys whose bucket has refilled, which a
//! returning key gets back as exactly one full bucket.
//!
//! A `scope: fleet` limit ([`fleet`]) shares one quota between every proxy through
//! Redis; [`RateLimitLayer::fleet`] enforces it with the same headers and refusals.

pub mod fleet;
mod future;
mod layer;
mod limiter;
mod params;
mod response;
mod service;
#[cfg(test)]
mod tests;

pub use future::ResponseFuture;
pub use layer::RateLimitLayer;
pub use limiter::{DEFAULT_MAX_KEYS, KeyedLimiter, RateLimitRegistry, Verdict};
pub use params::{KeyBy, RateLimitConfigError, RateLimitParams};
pub use response::refusal_headers;
pub(crate) use service::Limiter;
pub use service::RateLimit;

/// What a rate limit decided about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Within the limit.
    Allowed,
    /// Over the limit and refused.
    Limited,
    /// Over the limit but let through because the limit is in shadow mode.
    Shadow,
}

impl Decision {
    /// The metric label value: `allowed`, `limited` or `shadow`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Limited => "limited",
            Decision::Shadow => "shadow",
        }
    }
}

/// Receives every rate-limit decision, e.g. to count
/// `sluice_ratelimit_decisions_total{direction,route,decision}`.
///
/// Called on the request path: implementations must be cheap and must not block
/// (pre-resolved counters, atomics). `limit` is the [`RateLimitParams::name`].
pub trait RateLimitObserver: Send + Sync + 'static {
    /// One request was decided.
    fn on_decision(&self, limit: &str, decision: Decision);
}

/// An observer that ignores every decision.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopObserver;

impl RateLimitObserver for NoopObserver {
    fn on_decision(&self, _limit: &str, _decision: Decision) {}
}

impl<F> RateLimitObserver for F
where
    F: Fn(&str, Decision) + Send + Sync + 'static,
{
    fn on_decision(&self, limit: &str, decision: Decision) {
        self(limit, decision)
    }
}
