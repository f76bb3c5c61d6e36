//! The time as the layers read it: one clock reading per poll of a connection's task.
//!
//! A proxied request asks the time about a dozen times: its latency at the edge, the
//! retry budget and deadlines, the balancer's round-trip estimate, the breaker's window,
//! the connection's idle and head timers. Nearly all of them fall within the two or
//! three polls of its connection's task that carry it. A future run under [`Frozen`]
//! reads the clock at most once per poll, on the first [`now`] of that poll, and every
//! later [`now`] of the same poll gets that reading; anywhere else [`now`] is
//! [`Instant::now`]. A reading is at most one poll old, which no timeout or estimate
//! here can tell apart from the moment it is used (a poll of a connection's task runs
//! for microseconds). Under tokio's paused clock time cannot move within a poll
//! either, so tests see the same instants as before.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Instant;

/// What [`now`] returns on this thread.
#[derive(Clone, Copy)]
enum Reading {
    /// Not within a [`Frozen`] poll: the clock itself.
    Live,
    /// Within a [`Frozen`] poll that has not asked yet.
    Due,
    /// Within a [`Frozen`] poll that read this.
    Taken(Instant),
}

thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading::Live) };
}

/// The current time: this poll's reading within a [`Frozen`] poll, else the clock's.
pub fn now() -> Instant {
    READING
        .try_with(|r| match r.get() {
            Reading::Taken(t) => t,
            Reading::Due => {
                let t = Instant::now();
                r.set(Reading::Taken(t));
                t
            }
            Reading::Live => Instant::now(),
        })
        .unwrap_or_else(|_| Instant::now())
}

/// governor's clock for the rate limiters: [`now`] as a [`std::time::Instant`]. A limit's
/// check takes the poll's reading like every other layer, and no TSC calibration (up to
/// 200 ms of spinning in `quanta`) runs when the first limiter is built.
#[derive(Clone, Copy, Debug, Default)]
pub struct PollClock;

impl governor::clock::Clock for PollClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        now().into_std()
    }
}

impl governor::clock::ReasonablyRealtime for PollClock {}

pin_project_lite::pin_project! {
    /// Runs `inner` with one clock reading per poll (module docs).
    pub struct Frozen<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Frozen<F> {
    /// Wraps `inner`.
    pub fn new(inner: F) -> Self {
        Self { inner }
    }
}

/// Puts the reading of the poll around this one back, also when the poll panics.
struct Restore(Reading);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = READING.try_with(|r| r.set(self.0));
    }
}

impl<F: Future> Future for Frozen<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let outer = READING
            .try_with(|r| r.replace(Reading::Due))
            .unwrap_or(Reading::Live);
        let _restore = Restore(outer);
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_poll_has_one_reading_and_the_next_poll_a_new_one() {
        let outside = now();
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(now() - outside, Duration::from_millis(5), "live outside");
        let mut polls = Vec::new();
        Frozen::new(async {
            for _ in 0..3 {
                let (a, b) = (now(), now());
                polls.push((a, b));
                // Moving the paused clock yields, which ends the poll; the next poll
                // reads the clock again.
                tokio::time::advance(Duration::from_millis(10)).await;
            }
        })
        .await;
        for (i, (a, b)) in polls.iter().enumerate() {
            assert_eq!(a, b, "one reading within poll {i}");
        }
        assert_eq!(polls[1].0 - polls[0].0, Duration::from_millis(10));
        assert_eq!(polls[2].0 - polls[1].0, Duration::from_millis(10));
        // Back outside, the clock is live again.
        assert_eq!(now() - polls[2].0, Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn within_one_poll_time_stands_still_while_the_clock_moves() {
        let (first, later, live) = Frozen::new(std::future::poll_fn(|cx| {
            let first = now();
            // tokio moves its paused clock on the first poll of `advance`.
            let mut advance = std::pin::pin!(tokio::time::advance(Duration::from_millis(7)));
            let _ = advance.as_mut().poll(cx);
            Poll::Ready((first, now(), Instant::now()))
        }))
        .await;
        assert_eq!(first, later);
        assert_eq!(live - first, Duration::from_millis(7));
        assert_eq!(now(), live, "live again after the poll");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_on_the_poll_clock_refills_with_tokio_time() {
        let quota = governor::Quota::per_second(std::num::NonZeroU32::new(1).unwrap());
        let limit = governor::RateLimiter::direct_with_clock(quota, PollClock);
        assert!(limit.check().is_ok());
        assert!(limit.check().is_err());
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(limit.check().is_err(), "not a whole period yet");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(limit.check().is_ok());
    }

    #[test]
    fn a_panicking_poll_leaves_the_clock_live() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(Frozen::new(async {
                let _ = now();
                panic!("in the poll");
            }))
        }));
        assert!(caught.is_err());
        assert!(matches!(READING.with(Cell::get), Reading::Live));
    }
}
