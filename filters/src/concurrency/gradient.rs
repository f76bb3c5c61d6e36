//! The adaptive limit: Gradient2 from Netflix's concurrency-limits.
//!
//! Once per sample window the limit moves by the *gradient* between a long-term baseline
//! of the app's latency and the window's latency:
//!
//! ```text
//! gradient = clamp(tolerance × long_rtt / short_rtt, 0.5, 1.0)
//! target   = limit × gradient + queue_allowance(limit)
//! limit    = clamp(limit × (1 − smoothing) + target × smoothing, min, max)
//! ```
//!
//! While latency stays within `tolerance` of the baseline the gradient is 1 and the limit
//! grows by the queue allowance; once requests queue inside the app its latency rises and
//! the limit settles where `short_rtt ≈ tolerance × long_rtt / (1 − allowance / limit)`.
//! A window in which fewer than half the limit was in flight leaves the limit alone (the
//! app was not the bottleneck, so its latency says nothing about the limit).
//!
//! There are no probe windows: the baseline is an exponentially smoothed average of past
//! windows (a plain mean over the first ones), never a measurement taken by pinning
//! concurrency low. Two rules keep it honest:
//! - it drops quickly (×0.95 a window) while it is more than twice the current latency,
//!   so a recovery after a long slowdown is followed at once;
//! - it is fed only by windows within `tolerance` of it, or taken at the floor (`min`)
//!   where the latency is the app's own. Latency caused by the limit itself (the overload
//!   equilibrium sits above `tolerance`) therefore never raises the baseline, so the limit
//!   does not creep upwards under sustained overload; a lasting slowdown of the app is
//!   learned once the limit has backed off to the floor.

/// How much faster than the baseline a window's latency may be before counting as queueing.
pub(crate) const RTT_TOLERANCE: f64 = 1.25;
/// Weight of the newest target in the limit.
pub(crate) const SMOOTHING: f64 = 0.2;
/// Windows the long-term baseline averages over (its exponential smoothing span).
pub(crate) const LONG_WINDOW: u32 = 600;
/// Windows averaged plainly before the baseline becomes exponential.
pub(crate) const WARMUP_WINDOWS: u32 = 10;
/// Where an adaptive limit starts, clamped to its bounds.
pub(crate) const INITIAL_LIMIT: f64 = 20.0;

/// Requests the app may queue at the limit's equilibrium: at least 4, √limit for large limits
/// (so a large limit grows in proportion).
pub(crate) fn queue_allowance(limit: f64) -> f64 {
    limit.sqrt().max(4.0)
}

/// An exponentially smoothed average with a plain-mean warm-up.
#[derive(Clone, Debug)]
pub(crate) struct ExpAvg {
    value: f64,
    count: u32,
    factor: f64,
}

impl ExpAvg {
    pub(crate) fn new(window: u32) -> Self {
        Self {
            value: 0.0,
            count: 0,
            factor: 2.0 / (f64::from(window) + 1.0),
        }
    }

    pub(crate) fn add(&mut self, sample: f64) -> f64 {
        if self.count < WARMUP_WINDOWS {
            self.count += 1;
            self.value += (sample - self.value) / f64::from(self.count);
        } else {
            self.value = self.value * (1.0 - self.factor) + sample * self.factor;
        }
        self.value
    }

    pub(crate) fn get(&self) -> f64 {
        self.value
    }

    fn warming_up(&self) -> bool {
        self.count < WARMUP_WINDOWS
    }

    fn scale(&mut self, by: f64) {
        self.value *= by;
    }
}

/// The state of one adaptive limit: its estimate and the long-term latency baseline.
#[derive(Clone, Debug)]
pub(crate) struct Gradient2 {
    estimate: f64,
    min: f64,
    max: f64,
    long_rtt: ExpAvg,
}

/// What one sample window saw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct WindowSample {
    /// Mean latency of the requests completed in the window, in seconds (any unit works).
    pub(crate) rtt: f64,
    /// Most requests in flight at once during the window.
    pub(crate) max_in_flight: usize,
}

impl Gradient2 {
    pub(crate) fn new(min: u32, max: u32) -> Self {
        let (min, max) = (f64::from(min.max(1)), f64::from(max.max(min).max(1)));
        Self {
            estimate: INITIAL_LIMIT.clamp(min, max),
            min,
            max,
            long_rtt: ExpAvg::new(LONG_WINDOW),
        }
    }

    /// The current limit, as requests in flight.
    pub(crate) fn limit(&self) -> usize {
        self.estimate as usize
    }

    /// The long-term latency baseline.
    pub(crate) fn baseline(&self) -> f64 {
        self.long_rtt.get()
    }

    /// Moves the limit by one window's sample; returns the new limit.
    pub(crate) fn update(&mut self, sample: WindowSample) -> usize {
        let short = sample.rtt;
        if !(short.is_finite() && short > 0.0) {
            return self.limit();
        }
        let at_floor = self.estimate <= self.min + 0.5;
        let long = if self.long_rtt.warming_up()
            || short <= self.long_rtt.get() * RTT_TOLERANCE
            || at_floor
        {
            self.long_rtt.add(short)
        } else {
            self.long_rtt.get()
        };
        if long / short > 2.0 {
            self.long_rtt.scale(0.95);
        }
        if (sample.max_in_flight as f64) < self.estimate / 2.0 {
            return self.limit();
        }
        let gradient = (RTT_TOLERANCE * long / short).clamp(0.5, 1.0);
        let target = self.estimate * gradient + queue_allowance(self.estimate);
        let next = self.estimate * (1.0 - SMOOTHING) + target * SMOOTHING;
        self.estimate = next.clamp(self.min, self.max);
        self.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// A window with `rtt` in which `in_flight` requests were at once.
    fn window(rtt: f64, in_flight: usize) -> WindowSample {
        WindowSample {
            rtt,
            max_in_flight: in_flight,
        }
    }

    /// The baseline after one more window past its warm-up: `sample` weighs 2 / (600 + 1).
    fn fed(baseline: f64, sample: f64) -> f64 {
        let f = 2.0 / (f64::from(LONG_WINDOW) + 1.0);
        baseline * (1.0 - f) + sample * f
    }

    /// A limit in `[min, max]` whose baseline has seen its warm-up windows at `rtt`.
    fn warmed(min: u32, max: u32, rtt: f64) -> Gradient2 {
        let mut g = Gradient2::new(min, max);
        for _ in 0..WARMUP_WINDOWS {
            g.long_rtt.add(rtt);
        }
        g
    }

    #[test]
    fn the_average_is_a_plain_mean_over_its_warm_up_then_exponential() {
        let mut avg = ExpAvg::new(LONG_WINDOW);
        assert!(close(avg.add(1.0), 1.0));
        assert!(close(avg.add(2.0), 1.5));
        assert!(close(avg.add(6.0), 3.0));
        let mut avg = ExpAvg::new(LONG_WINDOW);
        for _ in 0..WARMUP_WINDOWS {
            avg.add(1.0);
        }
        assert!(!avg.warming_up());
        // The eleventh sample weighs 2 / (600 + 1), not 1 / 11.
        assert!(close(avg.add(12.0), fed(1.0, 12.0)), "{}", avg.get());
    }

    #[test]
    fn windows_without_a_usable_latency_change_nothing() {
        let mut g = warmed(1, 1000, 0.1);
        for rtt in [0.0, -0.05, f64::NAN, f64::INFINITY] {
            assert_eq!(g.update(window(rtt, 100)), 20, "{rtt}");
            assert!(close(g.estimate, INITIAL_LIMIT), "{rtt}: {}", g.estimate);
            assert!(close(g.baseline(), 0.1), "{rtt}: {}", g.baseline());
        }
    }

    #[test]
    fn a_window_with_under_half_the_limit_in_flight_leaves_the_limit_alone() {
        let mut g = warmed(1, 1000, 0.1);
        g.update(window(0.1, 9));
        assert!(close(g.estimate, 20.0), "{}", g.estimate);
        // Half the limit in flight counts: latency at the baseline grows it by the
        // smoothed queue allowance.
        g.update(window(0.1, 10));
        let target = 20.0 + 20f64.sqrt();
        assert!(
            close(g.estimate, 20.0 * 0.8 + target * 0.2),
            "{}",
            g.estimate
        );
    }

    #[test]
    fn a_window_within_tolerance_feeds_the_baseline_and_a_slower_one_does_not() {
        let mut g = warmed(1, 1000, 0.1);
        g.update(window(0.12, 100));
        let baseline = fed(0.1, 0.12);
        assert!(close(g.baseline(), baseline), "{}", g.baseline());
        // Above 1.25 × the baseline the latency is the limit's doing: not learned, and
        // the limit backs off by the gradient.
        let before = g.estimate;
        g.update(window(0.2, 100));
        assert!(close(g.baseline(), baseline), "{}", g.baseline());
        let gradient = RTT_TOLERANCE * baseline / 0.2;
        let target = before * gradient + queue_allowance(before);
        assert!(
            close(g.estimate, before * 0.8 + target * 0.2),
            "{}",
            g.estimate
        );
        assert!(g.estimate < before);
    }

    #[test]
    fn at_the_floor_a_slow_window_is_learned() {
        // The floor is the limit within half a request of `min`.
        for (estimate, learned) in [(5.0, true), (5.5, true), (6.0, false)] {
            let mut g = warmed(5, 100, 0.1);
            g.estimate = estimate;
            g.update(window(0.3, 100));
            let want = if learned { fed(0.1, 0.3) } else { 0.1 };
            assert!(close(g.baseline(), want), "{estimate}: {}", g.baseline());
        }
    }

    #[test]
    fn a_baseline_over_twice_the_latency_drops_by_a_twentieth_a_window() {
        let mut g = warmed(1, 1000, 0.1);
        g.update(window(0.04, 100));
        let baseline = fed(0.1, 0.04);
        assert!(close(g.baseline(), baseline * 0.95), "{}", g.baseline());
        // Within twice, only the sample moves it.
        let mut g = warmed(1, 1000, 0.1);
        g.update(window(0.06, 100));
        assert!(close(g.baseline(), fed(0.1, 0.06)), "{}", g.baseline());
    }
}
