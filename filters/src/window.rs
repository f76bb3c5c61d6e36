//! A lock-free sliding-window counter: the circuit breaker's failure rate and the
//! retry budget both count over one.
//!
//! The window is cut into [`BUCKETS`] buckets, each stamped with the time slot it
//! counts for and holding two counters. A bucket is recycled by whoever first finds it
//! stale, so no background task and no lock are needed; a count racing that recycling
//! may be lost, which errs towards a smaller count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets a window is cut into.
pub(crate) const BUCKETS: u64 = 10;

const EMPTY_SLOT: u64 = u64::MAX;

/// Two counters summed over the last window, on a clock the caller reads (milliseconds
/// since an epoch of its own), so that tests can drive it by hand.
pub(crate) struct SlidingWindow {
    bucket_ms: u64,
    buckets: Box<[Bucket]>,
}

/// One time slot's counts.
pub(crate) struct Bucket {
    slot: AtomicU64,
    counts: [AtomicU64; 2],
}

impl Bucket {
    /// Adds one to counter `which` (0 or 1).
    pub(crate) fn add(&self, which: usize) {
        self.counts[which].fetch_add(1, Ordering::AcqRel);
    }

    /// Takes back one [`add`](Self::add) of counter `which`.
    pub(crate) fn take_back(&self, which: usize) {
        self.counts[which].fetch_sub(1, Ordering::AcqRel);
    }
}

impl SlidingWindow {
    /// An empty window `window` long (a bucket is at least a millisecond).
    pub(crate) fn new(window: Duration) -> Self {
        let bucket_ms = (window.as_millis() as u64 / BUCKETS).max(1);
        let buckets = (0..BUCKETS)
            .map(|_| Bucket {
                slot: AtomicU64::new(EMPTY_SLOT),
                counts: [AtomicU64::new(0), AtomicU64::new(0)],
            })
            .collect();
        Self { bucket_ms, buckets }
    }

    /// The bucket counting for `now_ms`, recycled first if it still holds an older slot.
    pub(crate) fn bucket(&self, now_ms: u64) -> &Bucket {
        let slot = now_ms / self.bucket_ms;
        let b = &self.buckets[(slot % BUCKETS) as usize];
        let seen = b.slot.load(Ordering::Acquire);
        if seen != slot
            && b.slot
                .compare_exchange(seen, slot, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            for c in &b.counts {
                c.store(0, Ordering::Release);
            }
        }
        b
    }

    /// Both counters summed over the window ending at `now_ms`.
    pub(crate) fn sums(&self, now_ms: u64) -> [u64; 2] {
        let cur = now_ms / self.bucket_ms;
        let mut sums = [0; 2];
        for b in self.buckets.iter() {
            let s = b.slot.load(Ordering::Acquire);
            if s != EMPTY_SLOT && s <= cur && cur - s < BUCKETS {
                for (sum, c) in sums.iter_mut().zip(&b.counts) {
                    *sum += c.load(Ordering::Acquire);
                }
            }
        }
        sums
    }

    /// Forgets every count.
    pub(crate) fn clear(&self) {
        for b in self.buckets.iter() {
            b.slot.store(EMPTY_SLOT, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 10 s window: one bucket a second. The clock is the milliseconds passed in.
    fn window() -> SlidingWindow {
        SlidingWindow::new(Duration::from_secs(10))
    }

    #[test]
    fn counts_slide_out_bucket_by_bucket() {
        let w = window();
        w.bucket(0).add(0);
        w.bucket(500).add(1);
        w.bucket(3_000).add(0);
        assert_eq!(w.sums(3_000), [2, 1]);
        // At 10 s the first bucket (0–1 s) has left the window; the one at 3 s has not.
        assert_eq!(w.sums(9_999), [2, 1]);
        assert_eq!(w.sums(10_000), [1, 0]);
        assert_eq!(w.sums(13_000), [0, 0]);
    }

    #[test]
    fn a_stale_bucket_is_recycled_before_it_counts_again() {
        let w = window();
        for _ in 0..3 {
            w.bucket(1_000).add(0);
        }
        // Ten seconds later the same bucket stands for a new slot and starts from zero.
        w.bucket(11_000).add(1);
        assert_eq!(w.sums(11_000), [0, 1]);
    }

    #[test]
    fn take_back_undoes_an_add() {
        let w = window();
        let b = w.bucket(42);
        b.add(1);
        b.add(1);
        b.take_back(1);
        assert_eq!(w.sums(42), [0, 1]);
    }

    #[test]
    fn a_slot_ahead_of_now_is_not_counted() {
        let w = window();
        w.bucket(5_000).add(0);
        // A reader whose clock lags the writer's sees nothing from the future.
        assert_eq!(w.sums(4_999), [0, 0]);
        assert_eq!(w.sums(5_000), [1, 0]);
    }

    #[test]
    fn clear_forgets_everything() {
        let w = window();
        w.bucket(0).add(0);
        w.bucket(1_000).add(1);
        w.clear();
        assert_eq!(w.sums(1_000), [0, 0]);
        w.bucket(1_000).add(1);
        assert_eq!(w.sums(1_000), [0, 1]);
    }

    #[test]
    fn a_short_window_has_millisecond_buckets() {
        let w = SlidingWindow::new(Duration::from_millis(3));
        w.bucket(0).add(0);
        assert_eq!(w.sums(9), [1, 0]);
        assert_eq!(w.sums(10), [0, 0]);
    }
}
