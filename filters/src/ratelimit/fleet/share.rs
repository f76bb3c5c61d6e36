//! One key's locally held share of a fleet quota: atomics only, no lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::sync::LeaseGrant;

/// `tokens` of a share the sync task has retired: a request that finds it looks again.
const CLOSED: i64 = i64::MIN;

/// What taking one token from a share gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// A token was spent; this many remain in hand.
    Allowed(u32),
    /// The share is spent until the next reconciliation.
    Empty,
    /// The share was retired meanwhile; look the key up again.
    Closed,
}

/// How the sync task sizes the shares of one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sizing {
    /// Tokens a proxy keeps in hand at least: its part of the burst, `⌈burst / N⌉`.
    pub(crate) floor: u64,
    /// The Redis bucket's capacity (no share is ever larger).
    pub(crate) capacity: u64,
    /// Reconciliations without a request after which a share is given back and dropped.
    pub(crate) idle_syncs: u32,
    /// The limit's sustained rate, for `retry-after` while the bucket is in debt.
    pub(crate) per_second: u32,
    /// The reconciliation interval: the longest a spent share waits for more.
    pub(crate) interval: Duration,
}

/// What one reconciliation asks of the bucket for one share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Tokens spent on credit (a first-seen key's start), now taken from the bucket.
    pub(crate) debt: u64,
    /// Tokens wanted (> 0) or given back (< 0).
    pub(crate) delta: i64,
    /// The share was idle long enough to be dropped (its tokens are in `delta`).
    pub(crate) retire: bool,
}

impl Plan {
    /// True when there is nothing to tell the bucket.
    pub(crate) fn is_empty(&self) -> bool {
        self.debt == 0 && self.delta == 0
    }
}

/// The tokens one proxy holds for one key of a fleet limit.
///
/// The request path only calls [`take`](Self::take) (one compare-and-swap); the sync task
/// alone calls [`plan`](Self::plan), [`settle`](Self::settle) and [`close`](Self::close).
#[derive(Debug)]
pub(crate) struct Share {
    /// The key's Redis key: a fixed hash of (policy, route, key value).
    pub(crate) redis_key: Arc<str>,
    tokens: AtomicI64,
    debt: AtomicU64,
    spent: AtomicU64,
    refused: AtomicU64,
    /// Milliseconds until the bucket has tokens again (from the last answer).
    retry_ms: AtomicU64,
    idle: AtomicU32,
}

impl Share {
    /// A share for a key seen for the first time: `credit` tokens to spend at once,
    /// taken from the bucket as debt at the next reconciliation.
    pub(crate) fn on_credit(redis_key: Arc<str>, credit: u64) -> Self {
        Self {
            redis_key,
            tokens: AtomicI64::new(i64::try_from(credit).unwrap_or(i64::MAX)),
            debt: AtomicU64::new(credit),
            spent: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            retry_ms: AtomicU64::new(0),
            idle: AtomicU32::new(0),
        }
    }

    /// Spends one token if the share has one.
    pub(crate) fn take(&self) -> Take {
        let mut cur = self.tokens.load(Ordering::Acquire);
        loop {
            if cur == CLOSED {
                return Take::Closed;
            }
            if cur <= 0 {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Take::Empty;
            }
            match self.tokens.compare_exchange_weak(
                cur,
                cur - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.spent.fetch_add(1, Ordering::Relaxed);
                    return Take::Allowed(u32::try_from(cur - 1).unwrap_or(u32::MAX));
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// When a refused caller may try again: the next reconciliation, or later while
    /// the fleet's bucket is in debt.
    pub(crate) fn retry_after(&self, interval: Duration) -> Duration {
        interval.max(Duration::from_millis(self.retry_ms.load(Ordering::Relaxed)))
    }

    /// Tokens in hand (0 once retired).
    pub(crate) fn held(&self) -> u64 {
        u64::try_from(self.tokens.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Decides what to ask the bucket for: enough for twice the demand of the last
    /// interval (admitted and refused), at least `floor`, at most `capacity`, when
    /// there was demand; tokens beyond twice that target go back. Resets the interval's
    /// demand counters.
    pub(crate) fn plan(&self, s: &Sizing) -> Plan {
        let demand =
            self.spent.swap(0, Ordering::Relaxed) + self.refused.swap(0, Ordering::Relaxed);
        let debt = self.debt.load(Ordering::Acquire);
        if demand == 0 {
            let idle = self.idle.fetch_add(1, Ordering::Relaxed) + 1;
            if idle >= s.idle_syncs {
                return Plan {
                    debt,
                    delta: 0,
                    retire: true,
                };
            }
        } else {
            self.idle.store(0, Ordering::Relaxed);
        }
        let target = demand.saturating_mul(2).max(s.floor).min(s.capacity).max(1);
        let target = i64::try_from(target).unwrap_or(i64::MAX);
        let held = self.tokens.load(Ordering::Acquire);
        if held == CLOSED {
            return Plan::default();
        }
        // A share nobody asked of in the last interval is not topped up.
        let delta = if held < target && demand > 0 {
            target - held
        } else if held > target.saturating_mul(2) {
            -i64::try_from(self.give_back(held - target)).unwrap_or(0)
        } else {
            0
        };
        Plan {
            debt,
            delta,
            retire: false,
        }
    }

    /// Takes up to `n` tokens out of the hand (requests may spend some meanwhile).
    fn give_back(&self, n: i64) -> u64 {
        let mut cur = self.tokens.load(Ordering::Acquire);
        loop {
            let take = n.min(cur).max(0);
            if take == 0 || cur == CLOSED {
                return 0;
            }
            match self.tokens.compare_exchange_weak(
                cur,
                cur - take,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return take.unsigned_abs(),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes every token out of the hand (an idle share that stays in place).
    pub(crate) fn give_back_all(&self) -> u64 {
        self.give_back(i64::MAX)
    }

    /// Retires the share (already out of the map): returns the tokens it held, which
    /// go back to the bucket. Requests still holding it look the key up again.
    pub(crate) fn close(&self) -> u64 {
        u64::try_from(self.tokens.swap(CLOSED, Ordering::AcqRel)).unwrap_or(0)
    }

    /// Applies the bucket's answer to `plan`: granted tokens join the hand, the debt
    /// sent is paid. Without an answer (Redis unreachable) tokens meant to go back stay.
    pub(crate) fn settle(&self, plan: &Plan, answer: Option<&LeaseGrant>, s: &Sizing) {
        match answer {
            Some(grant) => {
                self.debt.fetch_sub(plan.debt, Ordering::AcqRel);
                if grant.granted > 0 {
                    self.tokens
                        .fetch_add(i64::try_from(grant.granted).unwrap_or(0), Ordering::AcqRel);
                }
                // A bucket in debt refills at `per_second`; until then more asking is futile.
                let wait = if grant.balance < 0 {
                    grant.balance.unsigned_abs().saturating_mul(1000) / u64::from(s.per_second)
                } else {
                    0
                };
                self.retry_ms.store(wait, Ordering::Relaxed);
            }
            None if plan.delta < 0 => {
                self.tokens.fetch_add(-plan.delta, Ordering::AcqRel);
            }
            None => {}
        }
    }
}
