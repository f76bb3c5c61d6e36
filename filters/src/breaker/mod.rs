//! Circuit breaker, one per route × backend.
//!
//! A breaker opens on `consecutiveFailures` failures in a row, or when the failure
//! rate over a sliding window (a ring of ten time-stamped atomic buckets) reaches
//! `failureRate.percent` with at least `minRequests` requests in the window. Open, it
//! answers [`FilterError::BreakerOpen`](crate::FilterError::BreakerOpen) at once
//! without calling the backend. After the open time it lets `halfOpenRequests` probes
//! through: all succeed → closed; one fails → open again for twice the last open
//! time, capped at `maxOpenFor`, each open time jittered by ±10 %.
//!
//! What is a failure (`failureOn`, default connect-failure, timeout, 5xx; `grpcStatuses`,
//! default unavailable, internal, unknown, deadline-exceeded, data-loss):
//! - a response status: `5xx` any 5xx, `gateway-error` 502/503/504;
//! - a `grpc-status` in the response headers (trailers-only) at once; in the trailers
//!   when the body ends — the body is wrapped ([`ResponseBody`]) and watched as it
//!   streams, never buffered; a body error mid-stream counts as a connect failure;
//! - an error from below: `timeout` for `FilterError::Timeout`, connect-failure for
//!   everything else ([`UpstreamError`](crate::UpstreamError) of any kind, I/O errors,
//!   `NoHealthyEndpoint`); a call dropped at or after its [`Deadline`](crate::extensions::Deadline) (a per-try
//!   timeout above fired) counts as a timeout too.
//!
//! State lives in a [`Circuit`]: one packed `AtomicU64` (state, generation, probe
//! counters) moved by compare-and-swap, plain atomic counters, and a transition log
//! (last 16, with time and reason) behind a mutex taken only on transitions and
//! admin reads. The open → half-open move is lazy: it happens on the first request
//! (or admin read) after the open time.
//!
//! # How the proxy composes it
//!
//! ```text
//! // once, at start:
//! let breakers = BreakerRegistry::new(Arc::new(MyMetrics));   // impl BreakerObserver
//! // at every policy swap, for every route with a circuitBreaker and each of its backends:
//! breakers.update(routes.iter().flat_map(|r| backends.iter().map(move |b|
//!     (r.key(), b.name(), BreakerParams::from_policy(r.circuit_breaker())))));
//! // a route-level stack below the split (the split sets `SelectedBackend`):
//! let circuits: Arc<[Option<Arc<Circuit>>]> =
//!     spec.backends.keys().map(|b| breakers.get(route_key, b)).collect();
//! let stack = ServiceBuilder::new()
//!     .layer(SplitLayer::new(split))
//!     .layer(RetryLayer::new(retries.get(route_key).unwrap(), "-"))   // see `retry`
//!     .layer(BreakerLayer::per_backend(circuits))
//!     .layer(BalanceLayer::new(sets))
//!     .service(client);
//! // or, with one stack per route × backend: BreakerLayer::new(breakers.get(route, backend)?)
//! // admin: GET /breakers → serde_json::to_string(&breakers.snapshot())
//! //        POST /breakers/<route>/<backend>/reset → breakers.reset(route, backend)
//! //        POST /breakers/<route>/<backend>/open  → breakers.force_open(route, backend)
//! ```
//!
//! Services built before a swap keep the `Circuit`s they were given; rebuild the
//! stacks from the registry after each `update` so a changed breaker takes effect
//! (an unchanged one is the same `Arc`, state and all). The request body passes
//! through untouched; the response body becomes `ResponseBody<B>`. The request
//! [`Deadline`](crate::extensions::Deadline) in the request's [`Routing`](crate::extensions::Routing) (set by the retry layer on each try) lets the breaker count
//! a per-try timeout that fires above it. Route keys are the proxy's choice (unique
//! across the snapshot; they appear in metrics and admin paths, so no `/`).
//!
//! The observer hears `on_added` (closed) and every transition; the open →
//! half-open move is reported when it happens, i.e. lazily on the first request or
//! admin read after the open time, so a gauge may show `open` a little longer.

mod circuit;
mod future;
mod layer;
mod observe;
mod params;
mod registry;
mod service;

pub use circuit::{Circuit, TRANSITION_LOG_LEN};
pub use future::{ResponseBody, ResponseFuture};
pub use layer::BreakerLayer;
pub use observe::{BreakerObserver, BreakerSnapshot, CircuitState, NoopObserver, TransitionRecord};
pub use params::{
    BreakerParams, DEFAULT_CONSECUTIVE_FAILURES, DEFAULT_GRPC_FAILURES, DEFAULT_MAX_OPEN_FOR,
    DEFAULT_OPEN_FOR, DEFAULT_OPEN_JITTER, FailureClasses, RateTrigger,
};
pub use registry::BreakerRegistry;
pub use service::Breaker;

#[cfg(test)]
mod tests;
