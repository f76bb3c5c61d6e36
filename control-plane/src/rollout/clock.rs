//! The time rollouts are judged by (step intervals, the ack and takeover graces,
//! deadlines) and the proxies' traffic counts age by.
//!
//! It reads the real clocks. A test moves it forward instead of waiting for an
//! interval to pass, so what a rollout does when time passes is shown however fast
//! or loaded the machine running the test is.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::engine::Now;

/// The rollouts' clock; clones read (and move) the same time.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// Nanoseconds a test moved it ahead of the real clocks; zero outside tests.
    ahead: Arc<AtomicU64>,
}

impl Clock {
    /// The monotonic time now.
    pub fn instant(&self) -> Instant {
        Instant::now() + self.ahead()
    }

    /// The time now as the engine takes it: the monotonic clock and the wall clock,
    /// both moved by the same amount.
    pub fn now(&self) -> Now {
        let ahead = self.ahead();
        Now {
            at: Instant::now() + ahead,
            unix_ms: crate::unix_ms(SystemTime::now() + ahead),
        }
    }

    fn ahead(&self) -> Duration {
        Duration::from_nanos(self.ahead.load(Ordering::Acquire))
    }

    /// Moves the time forward by `by`, for every holder of this clock.
    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).expect("less than 500 years");
        self.ahead.fetch_add(nanos, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_both_clocks_for_every_clone() {
        let clock = Clock::default();
        let other = clock.clone();
        let hour = Duration::from_secs(3600);
        clock.advance(hour);
        let (before, unix_before) = (Instant::now(), crate::unix_ms(SystemTime::now()));
        let now = other.now();
        assert!(other.instant() >= before + hour);
        assert!(now.at >= before + hour);
        assert!(now.unix_ms >= unix_before + 3_600_000);
    }
}
