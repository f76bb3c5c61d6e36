//! Overload protection: a limit on requests in flight to the app, with a priority queue.
//!
//! A [`Limiter`] counts requests in flight and admits one while the count is under its
//! limit: a compare-and-swap on an atomic, no lock. Over the limit a request waits in a
//! bounded queue ordered by priority (then arrival); a slot freed by a finished request goes
//! to the most important waiter. A request that finds the queue full, waits longer than the
//! queue's timeout, or is pushed out of a full queue by a more important one fails with
//! [`FilterError::Overloaded`](crate::FilterError::Overloaded), which the proxy answers
//! with 503 `overloaded` and `retry-after`. When the queue is full the newest waiter of the
//! lowest level present gives way, so the lowest level is shed first.
//!
//! The limit is either [`fixed`](LimitParams::Fixed) or [`adaptive`](LimitParams::Adaptive):
//! Gradient2 as in Netflix's concurrency-limits (see `gradient.rs`), learning from the
//! latency of the app's responses (time to the response head) against a long-term baseline,
//! one update per sample window (at least 10 responses and twice the baseline latency,
//! 50 ms..=1 s), with no probe windows. Samples are taken on the hot path with atomics;
//! the one request that closes a window updates the limit, the others never wait for it.
//!
//! A slot is held until the response head arrives (or the call fails or is dropped): the
//! app's work is what the limit protects, a long streamed body is not.
//!
//! At every policy swap the proxy asks a [`ConcurrencyRegistry`] for the limiter of each
//! inbound service: unchanged [`ConcurrencyParams`] keep the limiter, its learned limit
//! and its queue.

mod future;
mod gradient;
mod layer;
mod limiter;
mod params;
mod service;
#[cfg(test)]
mod tests;

pub use future::ResponseFuture;
pub use layer::ConcurrencyLimitLayer;
pub use limiter::{Admission, ConcurrencyRegistry, Limiter, Permit, Ticket};
pub use params::{ConcurrencyConfigError, ConcurrencyParams, LimitParams, Priorities, RETRY_AFTER};
pub use service::ConcurrencyLimit;

/// Receives what a limiter does, e.g. to export `sluice_concurrency_limit`,
/// `sluice_concurrency_in_flight` and `sluice_overload_refusals_total{priority}`.
///
/// Called on the request path: implementations must be cheap and must not block.
pub trait ConcurrencyObserver: Send + Sync + 'static {
    /// The limit changed (also called once when the limiter is built).
    fn on_limit(&self, limit: usize);
    /// A request of this priority level was refused `overloaded`.
    fn on_refusal(&self, level: &str);
    /// Requests in flight changed by `delta` (+1 admitted, −1 done); a gauge adds it.
    fn on_in_flight(&self, _delta: i64) {}
}

/// An observer that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopObserver;

impl ConcurrencyObserver for NoopObserver {
    fn on_limit(&self, _limit: usize) {}
    fn on_refusal(&self, _level: &str) {}
}
