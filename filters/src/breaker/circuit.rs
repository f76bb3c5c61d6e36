//! One breaker's state machine: closed → open → half-open → closed, on atomics.
//!
//! The state, the generation and the half-open probe counters share one packed
//! `AtomicU64`, so every transition is a single compare-and-swap and a result
//! reported after a transition (an older generation) is counted but changes nothing.
//! The transition log is the one lock: it is taken only when a transition happens
//! and when the admin API reads it, never on a request that changes no state.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::observe::{BreakerObserver, BreakerSnapshot, CircuitState, TransitionRecord};
use super::params::BreakerParams;
use crate::extensions::BodyProgress;
use crate::window::SlidingWindow;

/// How many transitions each breaker remembers for the admin API.
pub const TRANSITION_LOG_LEN: usize = 16;

// Packed word: state (2 bits) | probes issued (16) | probes succeeded (16) | generation (30).
const ISSUED_SHIFT: u32 = 2;
const OK_SHIFT: u32 = 18;
const GEN_SHIFT: u32 = 34;
const COUNT_MASK: u64 = 0xffff;

fn pack(state: CircuitState, issued: u64, ok: u64, generation: u64) -> u64 {
    state.bits()
        | (issued & COUNT_MASK) << ISSUED_SHIFT
        | (ok & COUNT_MASK) << OK_SHIFT
        | generation << GEN_SHIFT
}

fn state_of(w: u64) -> CircuitState {
    CircuitState::from_bits(w)
}
fn issued_of(w: u64) -> u64 {
    (w >> ISSUED_SHIFT) & COUNT_MASK
}
fn ok_of(w: u64) -> u64 {
    (w >> OK_SHIFT) & COUNT_MASK
}
fn gen_of(w: u64) -> u64 {
    w >> GEN_SHIFT
}
fn next_gen(w: u64) -> u64 {
    (gen_of(w) + 1) & ((1 << 30) - 1)
}

// The open deadline carries the generation that set it, so a request that sees the
// new open state before the deadline is written cannot mistake the old deadline for it.
const DEADLINE_BITS: u32 = 48;
const DEADLINE_MASK: u64 = (1 << DEADLINE_BITS) - 1;
const NEVER: u64 = DEADLINE_MASK;

fn tag_deadline(generation: u64, ms: u64) -> u64 {
    (generation & 0xffff) << DEADLINE_BITS | ms.min(NEVER)
}

// The failure-rate window's two counters.
const TOTAL: usize = 0;
const FAILED: usize = 1;

/// Counts one result in the failure-rate window.
fn record(window: &SlidingWindow, now_ms: u64, failed: bool) {
    let b = window.bucket(now_ms);
    b.add(TOTAL);
    if failed {
        b.add(FAILED);
    }
}

/// The shared state of one route × backend breaker.
///
/// Held in an `Arc` by the [`BreakerRegistry`](super::BreakerRegistry) and by every
/// [`Breaker`](super::Breaker) service built for that route × backend.
pub struct Circuit {
    route: Arc<str>,
    backend: Arc<str>,
    params: BreakerParams,
    observer: Arc<dyn BreakerObserver>,
    epoch: Instant,
    word: AtomicU64,
    open_deadline: AtomicU64,
    opened_at_ms: AtomicU64,
    /// Open time before jitter; doubles on each failed probe.
    open_for_ms: AtomicU64,
    /// The jittered open time of the current (or last) opening.
    current_open_ms: AtomicU64,
    consecutive: AtomicU32,
    successes: AtomicU64,
    failures: AtomicU64,
    rejected: AtomicU64,
    transitions: AtomicU64,
    window: Option<SlidingWindow>,
    log: Mutex<VecDeque<TransitionRecord>>,
}

impl std::fmt::Debug for Circuit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Circuit")
            .field("route", &self.route)
            .field("backend", &self.backend)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Leave to send one request through a breaker. Report the outcome with
/// [`success`](Permit::success) or [`failure`](Permit::failure); dropped without
/// either, it counts as a timeout when its deadline had passed and otherwise as
/// cancelled (a half-open probe slot is handed back).
pub(crate) struct Permit {
    circuit: Arc<Circuit>,
    generation: u64,
    probe: bool,
    deadline: Option<Instant>,
    /// The request body still arriving when the call went, and when it went: the
    /// deadline counts from the body's end.
    body: Option<(BodyProgress, Instant)>,
    done: bool,
}

impl Permit {
    /// Times the call's deadline from when `body` is in, rather than from now.
    pub(crate) fn with_body(mut self, body: Option<BodyProgress>) -> Self {
        if self.deadline.is_some() {
            self.body = body.map(|b| (b, crate::clock::now()));
        }
        self
    }

    /// Whether the client's request body failed: nothing the call ends in is the
    /// upstream's doing.
    pub(crate) fn client_failed(&self) -> bool {
        self.body
            .as_ref()
            .is_some_and(|(b, _)| b.is_client_failed())
    }

    /// Ends the call as cancelled, counting nothing.
    pub(crate) fn cancel(mut self) {
        self.deadline = None;
    }

    pub(crate) fn params(&self) -> &BreakerParams {
        &self.circuit.params
    }

    pub(crate) fn success(mut self) {
        self.done = true;
        self.circuit.on_success(self.generation);
    }

    pub(crate) fn failure(mut self, what: &'static str) {
        self.done = true;
        self.circuit.on_failure(self.generation, what);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let now = crate::clock::now();
        let timed_out = match (self.deadline, &self.body) {
            (Some(d), Some((body, sent))) => {
                let after = d.saturating_duration_since(*sent);
                BodyProgress::due(Some(body), *sent, after, now).is_ok()
            }
            (d, _) => d.is_some_and(|d| now >= d),
        };
        if timed_out && self.circuit.params.counts_timeouts() {
            self.circuit.on_failure(self.generation, "timeout");
        } else if self.probe {
            self.circuit.release_probe(self.generation);
        }
    }
}

impl Circuit {
    pub(crate) fn new(
        route: Arc<str>,
        backend: Arc<str>,
        params: BreakerParams,
        observer: Arc<dyn BreakerObserver>,
    ) -> Self {
        let open_ms = params.open_for.as_millis() as u64;
        Self {
            route,
            backend,
            window: params
                .failure_rate
                .as_ref()
                .map(|r| SlidingWindow::new(r.window)),
            params,
            observer,
            epoch: Instant::now(),
            word: AtomicU64::new(pack(CircuitState::Closed, 0, 0, 0)),
            open_deadline: AtomicU64::new(tag_deadline(0, 0)),
            opened_at_ms: AtomicU64::new(u64::MAX),
            open_for_ms: AtomicU64::new(open_ms),
            current_open_ms: AtomicU64::new(open_ms),
            consecutive: AtomicU32::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            transitions: AtomicU64::new(0),
            log: Mutex::new(VecDeque::with_capacity(TRANSITION_LOG_LEN)),
        }
    }

    /// A breaker with new `params` that goes on from `old`: an edit of its thresholds
    /// must not close a breaker its backend's failures opened, nor one an operator
    /// opened by hand. The state, the opening's deadline and back-off, the counts and
    /// the history carry over; probes in flight stay with `old`, and the failure-rate
    /// window restarts, its length being one of the params. A transition `old` makes
    /// after this copy (a request finishing there) is not carried.
    pub(crate) fn carried_from(old: &Circuit, params: BreakerParams) -> Self {
        let mut next = Self::new(
            old.route.clone(),
            old.backend.clone(),
            params,
            old.observer.clone(),
        );
        // Deadlines and history are in milliseconds since the epoch: keep it.
        next.epoch = old.epoch;
        let w = old.word.load(Ordering::Acquire);
        let state = state_of(w);
        next.word = AtomicU64::new(pack(state, 0, 0, gen_of(w)));
        let copy = |a: &AtomicU64| AtomicU64::new(a.load(Ordering::Acquire));
        if state != CircuitState::Closed {
            next.open_deadline = copy(&old.open_deadline);
            next.opened_at_ms = copy(&old.opened_at_ms);
            let max = next.params.max_open_for.as_millis() as u64;
            next.open_for_ms = AtomicU64::new(old.open_for_ms.load(Ordering::Acquire).min(max));
            next.current_open_ms = copy(&old.current_open_ms);
        }
        next.consecutive = AtomicU32::new(old.consecutive.load(Ordering::Acquire));
        next.successes = copy(&old.successes);
        next.failures = copy(&old.failures);
        next.rejected = copy(&old.rejected);
        next.transitions = copy(&old.transitions);
        next.log = Mutex::new(old.log.lock().unwrap_or_else(|e| e.into_inner()).clone());
        next
    }

    /// The params this breaker was built with.
    pub fn params(&self) -> &BreakerParams {
        &self.params
    }

    /// The current state, moving an open breaker whose open time is over to half-open.
    pub fn state(&self) -> CircuitState {
        let w = self.word.load(Ordering::Acquire);
        if state_of(w) == CircuitState::Open && self.open_time_over(w, self.now_ms()) {
            self.try_transition(w, CircuitState::HalfOpen, || "open time elapsed".into());
            return state_of(self.word.load(Ordering::Acquire));
        }
        state_of(w)
    }

    fn now_ms(&self) -> u64 {
        crate::clock::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64
    }

    fn open_time_over(&self, w: u64, now_ms: u64) -> bool {
        let d = self.open_deadline.load(Ordering::Acquire);
        (d >> DEADLINE_BITS) == gen_of(w) & 0xffff && now_ms >= (d & DEADLINE_MASK)
    }

    /// Asks to send one request. `deadline` is when the caller gives up on it.
    pub(crate) fn acquire(self: &Arc<Self>, deadline: Option<Instant>) -> Option<Permit> {
        let mut w = self.word.load(Ordering::Acquire);
        loop {
            match state_of(w) {
                CircuitState::Closed => {
                    return Some(self.permit(w, false, deadline));
                }
                CircuitState::Open => {
                    if !self.open_time_over(w, self.now_ms()) {
                        self.rejected.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    self.try_transition(w, CircuitState::HalfOpen, || "open time elapsed".into());
                    w = self.word.load(Ordering::Acquire);
                }
                CircuitState::HalfOpen => {
                    let issued = issued_of(w);
                    if issued >= u64::from(self.params.half_open_requests) {
                        self.rejected.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    let next = pack(CircuitState::HalfOpen, issued + 1, ok_of(w), gen_of(w));
                    match self
                        .word
                        .compare_exchange(w, next, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => return Some(self.permit(w, true, deadline)),
                        Err(cur) => w = cur,
                    }
                }
            }
        }
    }

    fn permit(self: &Arc<Self>, w: u64, probe: bool, deadline: Option<Instant>) -> Permit {
        Permit {
            circuit: Arc::clone(self),
            generation: gen_of(w),
            probe,
            deadline,
            body: None,
            done: false,
        }
    }

    fn on_success(&self, generation: u64) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        let mut w = self.word.load(Ordering::Acquire);
        if gen_of(w) != generation {
            return;
        }
        match state_of(w) {
            CircuitState::Closed => {
                self.consecutive.store(0, Ordering::Relaxed);
                if let Some(win) = &self.window {
                    record(win, self.now_ms(), false);
                }
            }
            CircuitState::Open => {}
            CircuitState::HalfOpen => loop {
                let ok = ok_of(w) + 1;
                if ok >= u64::from(self.params.half_open_requests) {
                    let n = self.params.half_open_requests;
                    self.try_transition(w, CircuitState::Closed, || {
                        format!("{n} probe(s) succeeded")
                    });
                    return;
                }
                let next = pack(CircuitState::HalfOpen, issued_of(w), ok, gen_of(w));
                match self
                    .word
                    .compare_exchange(w, next, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => return,
                    Err(cur) if gen_of(cur) == generation => w = cur,
                    Err(_) => return,
                }
            },
        }
    }

    fn on_failure(&self, generation: u64, what: &'static str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let w = self.word.load(Ordering::Acquire);
        if gen_of(w) != generation {
            return;
        }
        match state_of(w) {
            CircuitState::Closed => {
                let n = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
                let now = self.now_ms();
                if let Some(win) = &self.window {
                    record(win, now, true);
                }
                if let Some(limit) = self.params.consecutive_failures
                    && n >= limit
                {
                    self.try_transition(w, CircuitState::Open, || {
                        format!("{n} consecutive failures (last: {what})")
                    });
                    return;
                }
                if let (Some(rate), Some(win)) = (&self.params.failure_rate, &self.window) {
                    let [total, failed] = win.sums(now);
                    if total >= u64::from(rate.min_requests.max(1))
                        && failed * 100 >= u64::from(rate.percent) * total
                    {
                        self.try_transition(w, CircuitState::Open, || {
                            format!(
                                "failure rate {}% over {:?} ({failed} of {total} requests; threshold {}%)",
                                failed * 100 / total,
                                rate.window,
                                rate.percent
                            )
                        });
                    }
                }
            }
            CircuitState::Open => {}
            CircuitState::HalfOpen => {
                self.try_transition(w, CircuitState::Open, || format!("probe failed: {what}"));
            }
        }
    }

    fn release_probe(&self, generation: u64) {
        let mut w = self.word.load(Ordering::Acquire);
        while gen_of(w) == generation && state_of(w) == CircuitState::HalfOpen && issued_of(w) > 0 {
            let next = pack(
                CircuitState::HalfOpen,
                issued_of(w) - 1,
                ok_of(w),
                gen_of(w),
            );
            match self
                .word
                .compare_exchange(w, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(cur) => w = cur,
            }
        }
    }

    /// Moves from exactly the state word `from` to `to`; false when another thread
    /// moved first. The side effects (timing, log, observer) run only for the winner.
    fn try_transition(&self, from: u64, to: CircuitState, reason: impl FnOnce() -> String) -> bool {
        self.transition_with(from, to, reason, false)
    }

    fn transition_with(
        &self,
        from: u64,
        to: CircuitState,
        reason: impl FnOnce() -> String,
        forced: bool,
    ) -> bool {
        let generation = next_gen(from);
        if self
            .word
            .compare_exchange(
                from,
                pack(to, 0, 0, generation),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return false;
        }
        let now = self.now_ms();
        let base_ms = self.params.open_for.as_millis() as u64;
        match to {
            CircuitState::Open => {
                let open_ms = if forced {
                    self.open_for_ms.load(Ordering::Acquire)
                } else if state_of(from) == CircuitState::HalfOpen {
                    let max = self.params.max_open_for.as_millis() as u64;
                    (self.open_for_ms.load(Ordering::Acquire).saturating_mul(2)).min(max)
                } else {
                    base_ms
                };
                self.open_for_ms.store(open_ms, Ordering::Release);
                let actual = self.jittered(open_ms);
                self.current_open_ms.store(actual, Ordering::Release);
                self.opened_at_ms.store(now, Ordering::Release);
                let until = if forced { NEVER } else { now + actual };
                self.open_deadline
                    .store(tag_deadline(generation, until), Ordering::Release);
            }
            CircuitState::Closed => {
                self.consecutive.store(0, Ordering::Release);
                if let Some(win) = &self.window {
                    win.clear();
                }
                self.open_for_ms.store(base_ms, Ordering::Release);
            }
            CircuitState::HalfOpen => {}
        }
        self.transitions.fetch_add(1, Ordering::Relaxed);
        let record = TransitionRecord {
            at_ms: now,
            at_unix_ms: 0,
            from: state_of(from),
            to,
            reason: reason(),
        };
        tracing::info!(
            route = %self.route,
            backend = %self.backend,
            from = state_of(from).as_str(),
            to = to.as_str(),
            reason = %record.reason,
            "circuit breaker transition"
        );
        self.observer.on_transition(
            &self.route,
            &self.backend,
            state_of(from),
            to,
            &record.reason,
        );
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == TRANSITION_LOG_LEN {
            log.pop_front();
        }
        log.push_back(record);
        true
    }

    fn jittered(&self, ms: u64) -> u64 {
        let j = self.params.jitter;
        if j <= 0.0 {
            return ms;
        }
        let f = 1.0 + j * (2.0 * rand::random::<f64>() - 1.0);
        (ms as f64 * f).round() as u64
    }

    /// Closes the breaker by hand and clears its failure counts.
    pub fn reset(&self) {
        loop {
            let w = self.word.load(Ordering::Acquire);
            if state_of(w) == CircuitState::Closed {
                self.consecutive.store(0, Ordering::Release);
                if let Some(win) = &self.window {
                    win.clear();
                }
                return;
            }
            if self.transition_with(
                w,
                CircuitState::Closed,
                || "reset by operator".into(),
                false,
            ) {
                return;
            }
        }
    }

    /// Opens the breaker by hand; it stays open (no probes) until [`reset`](Self::reset).
    pub fn force_open(&self) {
        loop {
            let w = self.word.load(Ordering::Acquire);
            if self.transition_with(w, CircuitState::Open, || "opened by operator".into(), true) {
                return;
            }
        }
    }

    /// A serialisable view for the admin API.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let state = self.state();
        let w = self.word.load(Ordering::Acquire);
        let now = self.now_ms();
        let wall_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let to_unix = |ms: u64| wall_now.saturating_sub(now.saturating_sub(ms));
        let opened = self.opened_at_ms.load(Ordering::Acquire);
        let in_open = state_of(w) == CircuitState::Open;
        let deadline = self.open_deadline.load(Ordering::Acquire);
        let next_probe_at = match (in_open, deadline & DEADLINE_MASK) {
            (true, NEVER) | (false, _) => None,
            (true, ms) => Some(wall_now + ms.saturating_sub(now)),
        };
        let recent = self
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|r| TransitionRecord {
                at_unix_ms: to_unix(r.at_ms),
                ..r.clone()
            })
            .collect();
        BreakerSnapshot {
            route: self.route.to_string(),
            backend: self.backend.to_string(),
            state,
            successes: self.successes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            consecutive_failures: self.consecutive.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            transitions_total: self.transitions.load(Ordering::Relaxed),
            opened_at: (state != CircuitState::Closed && opened != u64::MAX)
                .then(|| to_unix(opened)),
            next_probe_at,
            open_for_ms: self.current_open_ms.load(Ordering::Acquire),
            recent_transitions: recent,
        }
    }

    /// Transitions since creation.
    pub fn transitions_total(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }

    /// The jittered open time of the current (or last) opening.
    pub fn current_open_for(&self) -> Duration {
        Duration::from_millis(self.current_open_ms.load(Ordering::Acquire))
    }

    /// True while every request would be refused: open with time left, or half-open
    /// with every probe slot taken. Changes nothing.
    pub(crate) fn refuses_all(&self) -> bool {
        let w = self.word.load(Ordering::Acquire);
        match state_of(w) {
            CircuitState::Closed => false,
            CircuitState::Open => !self.open_time_over(w, self.now_ms()),
            CircuitState::HalfOpen => issued_of(w) >= u64::from(self.params.half_open_requests),
        }
    }

    /// Counts a refusal decided outside [`acquire`](Self::acquire).
    pub(crate) fn reject(&self) -> crate::FilterError {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.rejected_error()
    }

    pub(crate) fn rejected_error(&self) -> crate::FilterError {
        crate::FilterError::BreakerOpen {
            route: self.route.to_string(),
            backend: self.backend.to_string(),
        }
    }
}
