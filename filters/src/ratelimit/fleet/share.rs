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

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(100);

    /// A limit of `floor` tokens kept at least, `capacity` at most, dropped after three
    /// idle reconciliations, refilled at 100 a second.
    fn sizing(floor: u64, capacity: u64) -> Sizing {
        Sizing {
            floor,
            capacity,
            idle_syncs: 3,
            per_second: 100,
            interval: INTERVAL,
        }
    }

    fn share(credit: u64) -> Share {
        Share::on_credit(Arc::from("k"), credit)
    }

    /// Spends `n` tokens (or fails to), as `n` requests would.
    fn ask(s: &Share, n: usize) -> Vec<Take> {
        (0..n).map(|_| s.take()).collect()
    }

    fn granted(granted: u64, balance: i64) -> LeaseGrant {
        LeaseGrant { granted, balance }
    }

    #[test]
    fn take_counts_down_the_credit_then_refuses_and_a_closed_share_says_so() {
        let s = share(3);
        assert_eq!(
            ask(&s, 4),
            [
                Take::Allowed(2),
                Take::Allowed(1),
                Take::Allowed(0),
                Take::Empty
            ]
        );
        assert_eq!(s.held(), 0);
        assert_eq!(s.close(), 0);
        assert_eq!(s.take(), Take::Closed);
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn close_hands_back_what_is_held_and_a_closed_share_plans_nothing() {
        let s = share(5);
        ask(&s, 2);
        assert_eq!(s.close(), 3);
        assert_eq!(s.plan(&sizing(1, 100)), Plan::default());
        assert_eq!(s.give_back_all(), 0);
    }

    #[test]
    fn the_plan_asks_for_twice_the_demand_admitted_and_refused() {
        let s = share(3);
        ask(&s, 4); // three admitted, one refused
        let p = s.plan(&sizing(1, 100));
        assert_eq!(
            p,
            Plan {
                debt: 3,
                delta: 8,
                retire: false
            }
        );
        // The demand was counted once and the debt paid: with none since, the target
        // falls to the floor and all but it go back.
        s.settle(&p, Some(&granted(8, 89)), &sizing(1, 100));
        assert_eq!(s.held(), 8);
        assert_eq!(
            s.plan(&sizing(1, 100)),
            Plan {
                debt: 0,
                delta: -7,
                retire: false
            }
        );
        assert_eq!(s.held(), 1);
    }

    #[test]
    fn the_plan_tops_up_only_the_difference_within_floor_and_capacity() {
        // Two tokens left of five, demand 3: the target 6 less the 2 in hand.
        let s = share(5);
        ask(&s, 3);
        assert_eq!(s.plan(&sizing(1, 100)).delta, 4);
        // The floor raises the target.
        let s = share(5);
        ask(&s, 3);
        assert_eq!(s.plan(&sizing(20, 100)).delta, 18);
        // The capacity caps it.
        let s = share(5);
        ask(&s, 3);
        assert_eq!(s.plan(&sizing(1, 4)).delta, 2);
    }

    #[test]
    fn a_share_without_demand_is_not_topped_up_and_retires_after_idle_syncs() {
        let s = share(0);
        let z = sizing(10, 100);
        // Nothing held, floor 10, but nobody asked: no tokens are taken from the fleet.
        let first = s.plan(&z);
        assert_eq!((first.delta, first.retire), (0, false));
        assert!(s.plan(&z).is_empty());
        assert_eq!(
            s.plan(&z),
            Plan {
                debt: 0,
                delta: 0,
                retire: true
            }
        );
        // A request in between starts the idle count again.
        let s = share(1);
        let first = s.plan(&z);
        assert_eq!(first.debt, 1);
        s.plan(&z);
        s.take();
        assert!(!s.plan(&z).retire);
        assert!(!s.plan(&z).retire);
        assert!(!s.plan(&z).retire);
        assert!(s.plan(&z).retire);
    }

    #[test]
    fn tokens_beyond_twice_the_target_go_back_down_to_the_target() {
        let z = sizing(1, 100);
        // Demand 1 sets the target at 2: holding 4 (twice it) is kept.
        let s = share(5);
        s.take();
        assert_eq!(s.plan(&z).delta, 0);
        assert_eq!(s.held(), 4);
        // Holding 5 is more than twice it: 3 go back, 2 stay.
        let s = share(6);
        s.take();
        let p = s.plan(&z);
        assert_eq!(p.delta, -3);
        assert_eq!(s.held(), 2);
        // The bucket took them: they stay gone.
        s.settle(&p, Some(&granted(0, 50)), &z);
        assert_eq!(s.held(), 2);
    }

    #[test]
    fn without_an_answer_tokens_meant_to_go_back_return_and_the_debt_stays() {
        let z = sizing(1, 100);
        let s = share(10);
        s.take();
        let p = s.plan(&z);
        assert_eq!(
            p,
            Plan {
                debt: 10,
                delta: -7,
                retire: false
            }
        );
        assert_eq!(s.held(), 2);
        s.settle(&p, None, &z);
        assert_eq!(s.held(), 9);
        // The credit was never paid: the next plan sends it again.
        assert_eq!(s.plan(&z).debt, 10);
    }

    #[test]
    fn without_an_answer_tokens_asked_for_are_not_added() {
        let z = sizing(1, 100);
        let s = share(1);
        ask(&s, 2);
        let p = s.plan(&z);
        assert_eq!(p.delta, 4);
        s.settle(&p, None, &z);
        assert_eq!(s.held(), 0);
        assert_eq!(s.take(), Take::Empty);
        // Nor taken away: the next grant is the whole hand.
        s.settle(&p, Some(&granted(4, 10)), &z);
        assert_eq!(s.held(), 4);
    }

    #[test]
    fn retry_after_is_the_interval_until_the_bucket_is_in_debt() {
        let z = sizing(1, 100);
        let s = share(1);
        assert_eq!(s.retry_after(INTERVAL), INTERVAL);
        ask(&s, 2);
        let p = s.plan(&z);
        // 50 tokens of debt at 100 a second: half a second before asking is worth it.
        s.settle(&p, Some(&granted(0, -50)), &z);
        assert_eq!(s.retry_after(INTERVAL), Duration::from_millis(500));
        // Debt shorter than the interval still waits the interval.
        s.settle(&p, Some(&granted(0, -5)), &z);
        assert_eq!(s.retry_after(INTERVAL), INTERVAL);
        // An answer with tokens left ends the wait.
        s.settle(&p, Some(&granted(0, -50)), &z);
        s.settle(&p, Some(&granted(2, 0)), &z);
        assert_eq!(s.retry_after(INTERVAL), INTERVAL);
        assert_eq!(s.held(), 2);
    }

    #[test]
    fn give_back_all_empties_the_hand_and_reports_how_much() {
        let s = share(7);
        s.take();
        assert_eq!(s.give_back_all(), 6);
        assert_eq!(s.held(), 0);
        assert_eq!(s.give_back_all(), 0);
        assert_eq!(s.take(), Take::Empty);
    }
}
