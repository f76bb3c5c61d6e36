//! The per-route retry budget: a sliding window of atomic counters.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use super::params::BudgetParams;

const BUCKETS: u64 = 10;
const EMPTY_SLOT: u64 = u64::MAX;

/// Counts original requests and retries over a sliding window (ten time-stamped
/// buckets) and allows a retry only while retries stay within
/// `ratio × requests + min_per_second × window`.
///
/// A retry is counted before it is checked and taken back when over, so racing
/// retries can only undershoot the budget, never exceed it.
pub struct RetryBudget {
    params: BudgetParams,
    epoch: Instant,
    bucket_ms: u64,
    floor: f64,
    buckets: Box<[Bucket]>,
}

struct Bucket {
    slot: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
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
        let window_ms = params.window.as_millis() as u64;
        Self {
            bucket_ms: (window_ms / BUCKETS).max(1),
            floor: f64::from(params.min_per_second) * params.window.as_secs_f64(),
            params,
            epoch: Instant::now(),
            buckets: (0..BUCKETS)
                .map(|_| Bucket {
                    slot: AtomicU64::new(EMPTY_SLOT),
                    requests: AtomicU64::new(0),
                    retries: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    fn slot_now(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64
            / self.bucket_ms
    }

    /// The bucket of `slot`, recycled if it still holds an older slot. A count racing
    /// the recycling may be lost; that errs towards fewer retries.
    fn bucket(&self, slot: u64) -> &Bucket {
        let b = &self.buckets[(slot % BUCKETS) as usize];
        let seen = b.slot.load(Ordering::Acquire);
        if seen != slot
            && b.slot
                .compare_exchange(seen, slot, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.requests.store(0, Ordering::Release);
            b.retries.store(0, Ordering::Release);
        }
        b
    }

    fn sums(&self, slot: u64) -> (u64, u64) {
        let mut req = 0;
        let mut ret = 0;
        for b in self.buckets.iter() {
            let s = b.slot.load(Ordering::Acquire);
            if s != EMPTY_SLOT && s <= slot && slot - s < BUCKETS {
                req += b.requests.load(Ordering::Acquire);
                ret += b.retries.load(Ordering::Acquire);
            }
        }
        (req, ret)
    }

    /// Counts one original request.
    pub fn deposit(&self) {
        self.bucket(self.slot_now())
            .requests
            .fetch_add(1, Ordering::AcqRel);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self) -> bool {
        let slot = self.slot_now();
        let b = self.bucket(slot);
        b.retries.fetch_add(1, Ordering::AcqRel);
        let (requests, retries) = self.sums(slot);
        let allowed = self.params.ratio * requests as f64 + self.floor;
        if retries as f64 <= allowed {
            true
        } else {
            b.retries.fetch_sub(1, Ordering::AcqRel);
            false
        }
    }

    /// (requests, retries) counted in the current window.
    pub fn totals(&self) -> (u64, u64) {
        self.sums(self.slot_now())
    }

    /// The settings this budget enforces.
    pub fn params(&self) -> &BudgetParams {
        &self.params
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
