//! The per-route retry budget: a sliding window of atomic counters.

use tokio::time::Instant;

use super::params::BudgetParams;
use crate::window::SlidingWindow;

// The window's two counters.
const REQUESTS: usize = 0;
const RETRIES: usize = 1;

/// Counts original requests and retries over a sliding window (ten time-stamped
/// buckets) and allows a retry only while retries stay within
/// `ratio × requests + min_per_second × window`.
///
/// A retry is counted before it is checked and taken back when over, so racing
/// retries can only undershoot the budget, never exceed it.
pub struct RetryBudget {
    params: BudgetParams,
    epoch: Instant,
    floor: f64,
    window: SlidingWindow,
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (requests, retries) = self.totals();
        f.debug_struct("RetryBudget")
            .field("params", &self.params)
            .field("requests", &requests)
            .field("retries", &retries)
            .finish()
    }
}

impl RetryBudget {
    /// An empty budget.
    pub fn new(params: BudgetParams) -> Self {
        Self {
            floor: f64::from(params.min_per_second) * params.window.as_secs_f64(),
            window: SlidingWindow::new(params.window),
            params,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Counts one original request.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Counts one original request that arrived at `now` (a clock the caller read anyway).
    pub fn deposit_at(&self, now: Instant) {
        self.window.bucket(self.ms_at(now)).add(REQUESTS);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self) -> bool {
        let now = self.now_ms();
        let b = self.window.bucket(now);
        b.add(RETRIES);
        let [requests, retries] = self.window.sums(now);
        let allowed = self.params.ratio * requests as f64 + self.floor;
        if retries as f64 <= allowed {
            true
        } else {
            b.take_back(RETRIES);
            false
        }
    }

    /// (requests, retries) counted in the current window.
    pub fn totals(&self) -> (u64, u64) {
        let [requests, retries] = self.window.sums(self.now_ms());
        (requests, retries)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn budget(ratio: f64, min: u32) -> RetryBudget {
        RetryBudget::new(BudgetParams {
            ratio,
            min_per_second: min,
            window: Duration::from_secs(10),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn floor_then_ratio_then_window_slides() {
        let b = budget(0.5, 1);
        // The floor alone: 1/s × 10 s.
        for _ in 0..10 {
            assert!(b.try_withdraw());
        }
        assert!(!b.try_withdraw());
        // Each two requests buy one more retry.
        b.deposit();
        assert!(!b.try_withdraw());
        b.deposit();
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
        assert_eq!(b.totals(), (2, 11), "refused retries are taken back");
        // A full window later everything has slid out.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.totals(), (0, 0));
        assert!(b.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_budget_allows_nothing() {
        let b = budget(0.0, 0);
        b.deposit();
        assert!(!b.try_withdraw());
    }
}
