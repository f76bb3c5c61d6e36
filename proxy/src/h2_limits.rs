//! Per-connection limits on HTTP/2 streams: what stops a client from making the proxy
//! forward an unbounded number of requests it cancels at once (rapid reset,
//! CVE-2023-44487), including the paced kind that waits for each stream to be accepted
//! before resetting it, which h2's own pending-reset limit never sees.
//!
//! Each HTTP/2 connection gets one `StreamBudget`. A stream whose handler is dropped
//! before it produced a response (the client reset it, or left) spends one token of a
//! per-connection rate ([`H2Limits::max_resets`] per [`H2Limits::reset_interval`],
//! governor's GCRA); every stream counts towards [`H2Limits::max_streams`]. When either
//! runs out the budget trips: the server sends GOAWAY and lets the streams in flight
//! finish.
//!
//! The stream cap is a rotation, not a punishment, and loses nothing: the last stream
//! `max_streams` allows is served and trips the budget as it opens, so the GOAWAY
//! reaches the client with that stream's answer, before it opens another (a client
//! sending one request at a time opens a new connection for the next); streams a
//! busier client opened before the GOAWAY reached it are served too, up to
//! `RACING_STREAMS` (1,000) of them, since a refused one would fail wherever the client
//! does not retry `REFUSED_STREAM`. Only a client that ignores the GOAWAY goes past
//! that and is refused. Resets are abuse: once they trip the budget every stream opened
//! meanwhile is refused with `REFUSED_STREAM` before it reaches a route. hyper chooses
//! the GOAWAY's code (`NO_ERROR`); it offers no way to send `ENHANCE_YOUR_CALM` for a
//! limit of ours.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

use governor::{Quota, RateLimiter};
use sluice_filters::clock::PollClock;
use tokio::sync::Notify;

/// The limits of one HTTP/2 connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2Limits {
    /// Streams one connection may open in its life; then GOAWAY (clients reconnect).
    pub max_streams: u32,
    /// Streams the client may cancel before their response within `reset_interval`.
    pub max_resets: u32,
    /// The interval `max_resets` refills over.
    pub reset_interval: Duration,
}

impl Default for H2Limits {
    fn default() -> Self {
        Self {
            max_streams: 10_000,
            max_resets: 100,
            reset_interval: Duration::from_secs(10),
        }
    }
}

/// Streams served past the cap while its GOAWAY is on the way: a client opens at most
/// its concurrency's worth in the round trip before it sees the GOAWAY (hyper allows
/// 200 at once), so this covers any client that heeds it.
pub(crate) const RACING_STREAMS: u32 = 1_000;

/// Not tripped.
const OPEN: u8 = 0;
/// Tripped by the stream cap: streams racing the GOAWAY are still served.
const CAPPED: u8 = 1;
/// Tripped by resets: every new stream is refused.
const ABUSED: u8 = 2;

/// What one HTTP/2 connection may still do.
#[derive(Debug)]
pub(crate) struct StreamBudget {
    max_streams: u32,
    streams: AtomicU32,
    resets: RateLimiter<governor::state::NotKeyed, governor::state::InMemoryState, PollClock>,
    /// [`OPEN`], [`CAPPED`] or [`ABUSED`].
    tripped: AtomicU8,
    trip: Notify,
}

impl StreamBudget {
    /// A fresh budget under `limits`.
    pub(crate) fn new(limits: &H2Limits) -> Arc<Self> {
        let burst = NonZeroU32::new(limits.max_resets.max(1)).expect("at least 1");
        let period = (limits.reset_interval / burst.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("a non-zero period")
            .allow_burst(burst);
        Arc::new(Self {
            max_streams: limits.max_streams,
            streams: AtomicU32::new(0),
            resets: RateLimiter::direct_with_clock(quota, PollClock),
            tripped: AtomicU8::new(OPEN),
            trip: Notify::new(),
        })
    }

    /// Counts a new stream; `None` when the connection is over its limits and the
    /// stream must be refused, else a guard to [`StreamGuard::answered`] once the
    /// response is ready.
    pub(crate) fn open(self: &Arc<Self>) -> Option<StreamGuard> {
        let last = self.max_streams.saturating_add(RACING_STREAMS);
        match self.tripped.load(Ordering::Relaxed) {
            ABUSED => return None,
            // Not counted any further: the count cannot wrap around to "open".
            CAPPED if self.streams.load(Ordering::Relaxed) >= last => return None,
            _ => {}
        }
        let n = self.streams.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.max_streams {
            // The last stream allowed is served, and the GOAWAY goes out now rather
            // than when a stream too many arrives and has to be refused.
            self.set_tripped(CAPPED);
            if n > last {
                return None;
            }
        }
        Some(StreamGuard {
            budget: self.clone(),
            answered: false,
        })
    }

    /// Resolves once the connection went over a limit.
    pub(crate) async fn tripped(&self) {
        self.trip.notified().await;
    }

    /// Trips the budget for `why` ([`CAPPED`] or [`ABUSED`]); resets after the cap
    /// still turn it to refusing every stream. The first trip asks for the GOAWAY.
    fn set_tripped(&self, why: u8) {
        let before = self.tripped.fetch_max(why, Ordering::Relaxed);
        if before == OPEN {
            let limit = if why == CAPPED {
                "streams per connection"
            } else {
                "resets per interval"
            };
            tracing::info!(limit, "HTTP/2 connection at its limit: GOAWAY");
            // `notify_one` keeps a permit, so a trip before the connection task waits
            // is not lost.
            self.trip.notify_one();
        }
    }

    #[cfg(test)]
    fn is_tripped(&self) -> bool {
        self.tripped.load(Ordering::Relaxed) != OPEN
    }
}

/// One open stream; dropped before [`StreamGuard::answered`], it counts as a reset.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    budget: Arc<StreamBudget>,
    answered: bool,
}

impl StreamGuard {
    /// The stream's response is ready: it was not reset early.
    pub(crate) fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.answered && self.budget.resets.check().is_err() {
            self.budget.set_tripped(ABUSED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_streams: u32, max_resets: u32) -> H2Limits {
        H2Limits {
            max_streams,
            max_resets,
            reset_interval: Duration::from_secs(3600),
        }
    }

    #[tokio::test]
    async fn resets_beyond_the_burst_trip_and_refuse_new_streams() {
        let b = StreamBudget::new(&limits(1000, 3));
        for _ in 0..3 {
            drop(b.open().unwrap());
        }
        assert!(!b.is_tripped(), "3 resets are allowed");
        b.open().unwrap().answered();
        assert!(!b.is_tripped(), "answered streams cost nothing");
        drop(b.open().unwrap());
        assert!(b.is_tripped());
        assert!(b.open().is_none());
        // The trip left a permit for the connection task.
        tokio::time::timeout(Duration::from_secs(1), b.tripped())
            .await
            .unwrap();
    }

    #[test]
    fn streams_per_connection_are_capped() {
        let b = StreamBudget::new(&limits(2, 100));
        b.open().unwrap().answered();
        assert!(!b.is_tripped());
        // The last stream allowed is served and trips the budget as it opens.
        b.open().unwrap().answered();
        assert!(b.is_tripped());
        // Streams racing the GOAWAY are served, up to a bound; then refused.
        for i in 0..RACING_STREAMS {
            let racing = b.open();
            assert!(racing.is_some(), "racing stream {i}");
            racing.into_iter().for_each(StreamGuard::answered);
        }
        assert!(b.open().is_none());
        assert!(b.open().is_none());
    }

    #[test]
    fn resets_after_the_cap_refuse_at_once() {
        let b = StreamBudget::new(&limits(1, 1));
        b.open().unwrap().answered();
        assert!(b.is_tripped());
        // A racing stream is served, but reset streams past the burst make it abuse.
        drop(b.open().unwrap());
        drop(b.open().unwrap());
        assert!(b.open().is_none());
    }
}
