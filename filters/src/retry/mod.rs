//! Retries with a per-route budget.
//!
//! `attempts` is the number of retries after the first try. A try is retried when it
//! ends in a class listed in `on` — `connect-failure`, `refused-stream`, `reset`
//! (typed [`UpstreamError`](crate::UpstreamError)s, or the matching I/O errors),
//! `gateway-error` (502/503/504), `5xx`, `timeout` (the per-try timer, which yields
//! `FilterError::Timeout`) — or answers a status in `statusCodes`, or a `grpc-status`
//! in `grpcStatuses` in its response headers (trailers-only; a status in trailers is
//! never waited for, as that would mean buffering the response). A
//! `FilterError::BreakerOpen` is never retried, nor is any error we cannot place.
//!
//! Only GET, HEAD, OPTIONS, PUT, DELETE and TRACE are retried unless
//! `nonIdempotent: true`. Between tries the layer waits an exponential backoff with
//! full jitter (`base × 2^n` capped at `max`, defaults 25 ms and 250 ms, then a
//! uniform draw below it), never shorter than `backoff.min` when set. A 429 or 503 carrying `Retry-After: <seconds>` is retried
//! (when its status is retryable) after exactly that wait if it is at most
//! `max(backoff.max, 1 s)`; a longer wait, or an HTTP-date, is not retried and the
//! response goes back to the caller (outcome `retry_after_too_long`).
//!
//! Request bodies: the first try streams the body while [`ReplayBody`] copies its
//! chunks (cheap `Bytes` clones) up to `maxReplayBytes` (default 64 KiB); later tries
//! replay the copies, then continue with whatever of the original was not read yet.
//! A `Content-Length` (or a body size hint) above the cap means no copying at all:
//! the request goes once and `skipped_body_too_large` is counted at once; a body
//! without a length that grows past the cap drops its copies and counts the skip
//! when a retry is wanted.
//! An empty body is never copied.
//!
//! The budget ([`RetryBudget`]) counts original requests and retries in a sliding
//! window of atomic buckets and allows a retry only while retries ≤
//! `ratio × requests + minPerSecond × window`; without `budget` a route gets 0.2,
//! 10/s over 10 s. Exhausted → no retry, outcome `budget_exhausted`.
//!
//! Each try carries a [`Deadline`](crate::extensions::Deadline) in its [`Routing`](crate::extensions::Routing) (its per-try
//! deadline, or an earlier one already on the request),
//! so the breaker below can count a try cut off by the per-try timer as a timeout.
//! A retry whose wait would end past a `Deadline` found on the incoming request is
//! not attempted. The per-try timer runs to the response head; a streaming
//! response body is not timed by it.
//!
//! # Where it sits and how the proxy composes it
//!
//! The retry layer sits below the split and above the breaker and re-calls the same
//! inner service with a copy of the same head, extensions included: in a route-level
//! stack the split's `SelectedBackend` rides along, in a per-backend stack the inner
//! service is that backend's; either way every try goes to the backend the split
//! chose, through its breaker (a breaker that opens meanwhile ends the retries with
//! `breaker-open`), and the balancer below may pick another endpoint of it.
//!
//! ```text
//! let retries = RetryRegistry::new(Arc::new(MyMetrics));        // impl RetryObserver
//! // at every policy swap:
//! retries.update(routes.iter().filter_map(|r| r.retry.as_ref()
//!     .map(|p| (r.name.as_str(), RetryParams::from_policy(p)))));
//! // per route (or per route × backend, naming the backend for the outcome label):
//! let retry = match retries.get(route) {
//!     Some(state) => RetryLayer::new(state, backend),   // `SelectedBackend` name wins
//!     None => RetryLayer::disabled(backend),
//! };
//! let stack = ServiceBuilder::new()
//!     .layer(retry)                                  // Request<B> → Request<ReplayBody<B>>
//!     .layer(BreakerLayer::per_backend(circuits))    // Response<R> → Response<breaker::ResponseBody<R>>
//!     .service(backend_client);                      // Service<Request<ReplayBody<B>>>
//! ```
//!
//! The inner service must be `Clone + Send + 'static` with a `Send` future; the
//! request body `B` any `http_body::Body` (its data is turned into `Bytes`, zero-copy
//! for `Bytes`); errors come back as `BoxError`. Outcomes go to the
//! [`RetryObserver`] as `sluice_retries_total{route,backend,outcome}` with outcomes
//! `retried`, `attempts_exhausted`, `budget_exhausted`, `skipped_body_too_large`,
//! `skipped_body_in_use`, `retry_after_too_long`.

mod budget;
mod future;
mod layer;
mod params;
mod registry;
mod service;
mod tries;

pub use crate::replay::ReplayBody;
pub use budget::RetryBudget;
pub use future::ResponseFuture;
pub use layer::RetryLayer;
pub use params::{
    BudgetParams, DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX, DEFAULT_BUDGET_MIN_PER_SECOND,
    DEFAULT_BUDGET_RATIO, DEFAULT_BUDGET_WINDOW, DEFAULT_MAX_REPLAY_BYTES, DEFAULT_MAX_RETRY_AFTER,
    RetryClasses, RetryParams, is_idempotent,
};
pub use registry::{NoopRetryObserver, RetryObserver, RetryOutcome, RetryRegistry, RouteRetry};
pub use service::Retry;

#[cfg(test)]
mod tests;
