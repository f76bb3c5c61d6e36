//! One rollout as a pure state machine: no I/O, no clock of its own.
//!
//! The driver feeds it what happened (every proxy acked the step's weights, a
//! report's windows, a tick, a command by hand) with the time, and publishes the
//! weights it answers. Judging follows DESIGN's rules:
//!
//! - a step's interval starts when every connected proxy acked its weights; a proxy
//!   that NACKed, or has not acked within [`ACK_GRACE`] of the step's publication, is
//!   left out of that count (and named, with why). So is one the step waited for that
//!   disconnected without acking: a hung proxy is dropped by the gRPC keepalive at
//!   about the moment the grace ends, and must not vanish from the count unnamed, nor
//!   may one connected when the step began that went before any tick saw it waiting;
//! - at the end of the interval the window is judged only with at least
//!   `minRequests` canary requests; otherwise it is inconclusive and the next window
//!   adds to it, until one is conclusive (`hold`), or until `deadline` passes
//!   (`rollback`). Too few requests is never a failure by itself;
//! - a breach must be significant: the one-sided 99 % Wilson bound of the canary's
//!   ratio (errors, or requests slower than a latency threshold) must lie beyond the
//!   threshold; against the other backends, the canary's lower bound must exceed
//!   the others' upper bound by more than the allowed increase;
//! - a gross breach (the canary's error ratio significantly above
//!   [`gross_error_rate`], with at least [`GROSS_MIN_FAILURES`] failures) rolls back at
//!   the report that shows it, without waiting for `minRequests` or the interval;
//! - promoted (canary at 100) and rolled back (canary at 0) hold until the block
//!   changes; the driver keys the state by a hash of the block.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use sluice_config::{OnInconclusive, Rollout, SplitRule};

use super::reports::Window;

/// A proxy that has not acked a step's weights this long after their publication is
/// left out of "every proxy acked".
pub const ACK_GRACE: Duration = Duration::from_secs(30);

/// z of a one-sided 99 % bound.
pub const Z99: f64 = 2.326_347_874_040_841;

/// Fewest canary failures that can make a gross breach.
pub const GROSS_MIN_FAILURES: u64 = 3;

/// History entries kept per rollout.
const HISTORY: usize = 64;

/// Defaults of optional fields: the ones the canonical form leaves out.
const DEFAULT_INTERVAL: Duration = sluice_config::defaults::ROLLOUT_INTERVAL;
const DEFAULT_MIN_REQUESTS: u64 = sluice_config::defaults::ROLLOUT_MIN_REQUESTS as u64;
const DEFAULT_DEADLINE: Duration = sluice_config::defaults::ROLLOUT_DEADLINE;

/// The fraction of requests allowed above a p99 threshold.
const P99_TAIL: f64 = 0.01;

/// Fewest timed baseline requests that give the others' p99.
const BASELINE_MIN_TIMED: u64 = 100;

/// The rollout block and its rule's file weights, as the engine reads them.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// The rollout block.
    pub rollout: Rollout,
    /// The rule's weights as written in the file.
    pub file_weights: IndexMap<String, u32>,
}

impl Spec {
    /// The spec of `rule`, if it has a rollout and weights.
    pub fn of(rule: &SplitRule) -> Option<Self> {
        Some(Self {
            rollout: rule.rollout.clone()?,
            file_weights: rule.weights.clone()?,
        })
    }

    fn interval(&self) -> Duration {
        self.rollout.interval.map_or(DEFAULT_INTERVAL, |d| d.get())
    }

    fn min_requests(&self) -> u64 {
        self.rollout
            .min_requests
            .map_or(DEFAULT_MIN_REQUESTS, u64::from)
    }

    fn deadline(&self) -> Duration {
        self.rollout.deadline.map_or(DEFAULT_DEADLINE, |d| d.get())
    }

    /// The weights with the canary at `canary` percent: the other backends share the
    /// rest in proportion to their file weights (largest remainders; equally when
    /// their file weights are all 0).
    pub fn weights_at(&self, canary: u32) -> IndexMap<String, u32> {
        let canary = canary.min(100);
        let others: Vec<u32> = self
            .file_weights
            .iter()
            .filter(|(k, _)| **k != self.rollout.canary)
            .map(|(_, v)| *v)
            .collect();
        let mut shares = crate::apportion::apportion(100 - canary, &others).into_iter();
        self.file_weights
            .keys()
            .map(|k| {
                let w = if *k == self.rollout.canary {
                    canary
                } else {
                    shares.next().unwrap_or(0)
                };
                (k.clone(), w)
            })
            .collect()
    }
}

/// The key a rollout's state is kept under: a hash of its block, which names the
/// canary backend (never its endpoints). Edits outside the block keep it.
pub fn block_key(rollout: &Rollout) -> String {
    use sha2::Digest;
    let bytes = serde_json::to_vec(rollout).unwrap_or_default();
    hex::encode(&sha2::Sha256::digest(&bytes)[..12])
}

/// The gross error ratio: ten times the SLO's (or the allowed increase over the
/// others'), and never below 10 %.
pub fn gross_error_rate(spec: &Spec) -> f64 {
    let slo = spec.rollout.slo.as_ref().and_then(|s| s.error_rate);
    let inc = spec
        .rollout
        .baseline
        .as_ref()
        .and_then(|b| b.error_rate_increase);
    (10.0 * slo.or(inc).unwrap_or(0.01)).max(0.1)
}

/// The one-sided Wilson score bounds `(lower, upper)` of `k` successes in `n` at `z`.
pub fn wilson(k: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = (k as f64 / n).clamp(0.0, 1.0);
    let z2 = z * z;
    let center = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    let denom = 1.0 + z2 / n;
    (
        ((center - spread) / denom).max(0.0),
        ((center + spread) / denom).min(1.0),
    )
}

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Moving through the steps.
    Progressing,
    /// Held at its step by hand.
    Paused,
    /// The canary has everything; holds until the block changes.
    Promoted,
    /// The canary has nothing; holds until the block changes.
    RolledBack,
}

impl Phase {
    /// Promoted or rolled back.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Promoted | Phase::RolledBack)
    }
}

/// A command by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Hold at the current step.
    Pause,
    /// Continue from the current step.
    Resume,
    /// Straight to 100.
    Promote,
    /// Straight to 0.
    Abort,
}

impl Command {
    /// The command named in a URL (`pause`, `resume`, `promote`, `abort`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pause" => Some(Self::Pause),
            "resume" => Some(Self::Resume),
            "promote" => Some(Self::Promote),
            "abort" => Some(Self::Abort),
            _ => None,
        }
    }
}

// The window and transition types are the RoutePolicy status's own: a follower
// shows what the lease holder judged, as it judged it.
pub use sluice_config::{
    RolloutCheck as Check, RolloutTransition as Transition, RolloutWindow as WindowView,
};

/// The time as the engine sees it: a monotonic instant and the wall clock.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// For intervals and deadlines.
    pub at: Instant,
    /// For the history (ms since the Unix epoch).
    pub unix_ms: u64,
}

/// A proxy connected to the control plane, and whether it acked the step's weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyAck {
    /// Its node id.
    pub node: String,
    /// Its stream, among those of its node id: two proxies sharing a node id are
    /// waited for apart.
    pub conn: String,
    /// When its stream opened (ms since the Unix epoch).
    pub connected_at_ms: u64,
    /// It acked a version carrying the step's weights.
    pub acked: bool,
    /// It refused the version carrying them.
    pub nacked: bool,
}

/// A proxy whose stream closed without acking the step's weights, as the control
/// plane last saw it.
#[derive(Clone, Copy, Debug)]
pub struct Departed<'a> {
    /// Its node id.
    pub node: &'a str,
    /// Its stream, as [`ProxyAck::conn`] names it.
    pub conn: &'a str,
    /// When its stream opened (ms since the Unix epoch).
    pub connected_at_ms: u64,
    /// When its stream closed (ms since the Unix epoch).
    pub gone_at_ms: u64,
    /// It was sent a version carrying the step's weights.
    pub sent: bool,
    /// It refused that version.
    pub nacked: bool,
}

/// A proxy left out of a step's "every proxy acked", and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftOut {
    /// Its node id.
    pub node: String,
    /// Why it was left out.
    pub why: LeftOutWhy,
}

/// Why a proxy was left out of a step's acks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeftOutWhy {
    /// It refused the version carrying the step's weights.
    Nacked,
    /// It stayed connected without acking for [`ACK_GRACE`].
    Silent,
    /// The step waited for it, and it disconnected (or was dropped as hung) before
    /// acking.
    Disconnected,
}

impl LeftOutWhy {
    /// The operator's words for it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Nacked => "refused the step's weights (NACK)",
            Self::Silent => "connected, but no ack within 30s",
            Self::Disconnected => "disconnected before acking",
        }
    }
}

/// A proxy a step saw connected without its ack.
#[derive(Clone, Copy, Debug)]
struct Awaited {
    /// It refused the step's weights.
    nacked: bool,
    /// It was in the last list of connected proxies.
    connected: bool,
    /// When it was last seen connected (ms since the Unix epoch): a stream of its
    /// node id opened after is the proxy come back, not a second one.
    last_ms: u64,
}

/// What the engine keeps across restarts (no instants: a restored step waits for
/// every proxy's ack again, then runs a fresh interval).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    /// The block's hash the state belongs to.
    pub block: String,
    /// Where it stands.
    pub phase: Phase,
    /// The step index.
    pub step: usize,
    /// Its history.
    pub history: Vec<Transition>,
    /// The last judged window.
    #[serde(default)]
    pub last_window: Option<WindowView>,
}

impl Saved {
    /// A rollout of `block` at its first step with nothing recorded: what a replica
    /// that does not drive it serves until the driving one's status says more.
    pub fn first_step(block: String) -> Self {
        Self {
            block,
            phase: Phase::Progressing,
            step: 0,
            history: Vec::new(),
            last_window: None,
        }
    }
}

/// One rollout's state.
#[derive(Clone, Debug)]
pub struct RolloutState {
    /// The hash of the block (and canary name) this state belongs to.
    pub block: String,
    phase: Phase,
    step: usize,
    /// When the step's weights were set (the ack grace runs from here).
    step_since: Instant,
    /// The same moment on the wall clock, which proxies' connections are timed by.
    step_since_ms: u64,
    /// When every proxy had acked them: the interval runs from here.
    acked_at: Option<Instant>,
    /// Since the window opened (for judging) and since the step began (for gross
    /// breaches).
    window: (Window, Window),
    step_total: (Window, Window),
    /// Intervals elapsed in the current window without enough requests.
    inconclusive: u32,
    inconclusive_since: Option<Instant>,
    /// Windows judged conclusively in this step.
    conclusive: u32,
    left_out: Vec<LeftOut>,
    /// Every proxy seen connected and not acked since the step's weights were set:
    /// one of them gone from the connected list without acking is left out as
    /// disconnected, not forgotten.
    awaited: BTreeMap<(String, String), Awaited>,
    bounds: Vec<f64>,
    last_window: Option<WindowView>,
    history: Vec<Transition>,
}

impl RolloutState {
    /// A rollout starting at its first step now.
    pub fn start(block: String, spec: &Spec, now: Now) -> Self {
        let mut s = Self::at(block, Phase::Progressing, 0, now);
        s.record(now, "started", spec, "a new rollout block".into());
        s
    }

    /// A rollout restored from `saved`, waiting for every proxy's ack of its step.
    pub fn restore(saved: Saved, spec: &Spec, now: Now) -> Self {
        let step = saved.step.min(spec.rollout.steps.len().saturating_sub(1));
        let mut s = Self::at(saved.block, saved.phase, step, now);
        s.history = saved.history;
        s.last_window = saved.last_window;
        if !s.phase.is_terminal() {
            s.record(now, "restarted", spec, "the control plane restarted; the step's interval starts again once every proxy acked".into());
        }
        s
    }

    /// The state another replica drives, as its status describes it (`saved`): the
    /// same step and phase, no windows, nothing recorded. A replica following the
    /// elected one serves its weights; once elected itself, the step's interval
    /// starts again when every proxy acked.
    pub fn mirror(saved: Saved, spec: &Spec, now: Now) -> Self {
        let step = saved.step.min(spec.rollout.steps.len().saturating_sub(1));
        let mut s = Self::at(saved.block, saved.phase, step, now);
        s.history = saved.history;
        if s.history.len() > HISTORY {
            let extra = s.history.len() - HISTORY;
            s.history.drain(..extra);
        }
        s.last_window = saved.last_window;
        s
    }

    fn at(block: String, phase: Phase, step: usize, now: Now) -> Self {
        Self {
            block,
            phase,
            step,
            step_since: now.at,
            step_since_ms: now.unix_ms,
            acked_at: None,
            window: Default::default(),
            step_total: Default::default(),
            inconclusive: 0,
            inconclusive_since: None,
            conclusive: 0,
            left_out: Vec::new(),
            awaited: BTreeMap::new(),
            bounds: Vec::new(),
            last_window: None,
            history: Vec::new(),
        }
    }

    /// What to persist.
    pub fn saved(&self) -> Saved {
        Saved {
            block: self.block.clone(),
            phase: self.phase,
            step: self.step,
            history: self.history.clone(),
            last_window: self.last_window.clone(),
        }
    }

    /// Where it stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The current step (0-based).
    pub fn step(&self) -> usize {
        self.step
    }

    /// The canary's weight now.
    pub fn canary_weight(&self, spec: &Spec) -> u32 {
        match self.phase {
            Phase::Promoted => 100,
            Phase::RolledBack => 0,
            Phase::Progressing | Phase::Paused => {
                spec.rollout.steps.get(self.step).copied().unwrap_or(0)
            }
        }
    }

    /// The weights proxies should have now.
    pub fn weights(&self, spec: &Spec) -> IndexMap<String, u32> {
        spec.weights_at(self.canary_weight(spec))
    }

    /// When every proxy acked the step's weights, if they have.
    pub fn acked_at(&self) -> Option<Instant> {
        self.acked_at
    }

    /// When the window being judged opened: every proxy acked the step, or the step
    /// began while they have not.
    pub fn window_opened(&self) -> Instant {
        self.acked_at.unwrap_or(self.step_since)
    }

    /// The node ids of the proxies left out of the last "every proxy acked" (once
    /// each, however many of its streams were).
    pub fn left_out(&self) -> Vec<&str> {
        let mut nodes: Vec<&str> = self.left_out.iter().map(|l| l.node.as_str()).collect();
        nodes.dedup();
        nodes
    }

    /// The proxies left out of the last "every proxy acked", each with why.
    pub fn left_out_why(&self) -> &[LeftOut] {
        &self.left_out
    }

    /// The connected proxies the step still waits for, while it waits.
    pub fn awaited(&self) -> Vec<&str> {
        if self.acked_at.is_some() {
            return Vec::new();
        }
        let mut nodes: Vec<&str> = self
            .awaited
            .iter()
            .filter(|(_, a)| a.connected && !a.nacked)
            .map(|((n, _), _)| n.as_str())
            .collect();
        nodes.dedup();
        nodes
    }

    /// The history, oldest first.
    pub fn history(&self) -> &[Transition] {
        &self.history
    }

    /// The last judged window.
    pub fn last_window(&self) -> Option<&WindowView> {
        self.last_window.as_ref()
    }

    /// Conclusive windows judged in the current step.
    pub fn conclusive_windows(&self) -> u32 {
        self.conclusive
    }

    /// The window open now, with each check's value on what it holds so far.
    pub fn current_window(&self, spec: &Spec) -> WindowView {
        let (c, b) = &self.window;
        let mut v = self.judge_view(spec, c, b);
        v.decision = "open".into();
        v.reason = match self.acked_at {
            None => "waiting for every proxy to ack the step's weights".into(),
            Some(_) if self.inconclusive > 0 => format!(
                "{} inconclusive interval(s) so far: {} of {} canary requests",
                self.inconclusive,
                c.requests,
                spec.min_requests()
            ),
            Some(_) => "collecting".into(),
        };
        v
    }

    fn record(&mut self, now: Now, result: &str, spec: &Spec, reason: String) {
        self.history.push(Transition {
            at_ms: now.unix_ms,
            result: result.into(),
            step: self.step,
            canary_weight: self.canary_weight(spec),
            reason,
        });
        if self.history.len() > HISTORY {
            let extra = self.history.len() - HISTORY;
            self.history.drain(..extra);
        }
    }

    fn enter_step(&mut self, step: usize, now: Now) {
        self.step = step;
        self.step_since = now.at;
        self.step_since_ms = now.unix_ms;
        self.acked_at = None;
        self.window = Default::default();
        self.step_total = Default::default();
        self.inconclusive = 0;
        self.inconclusive_since = None;
        self.conclusive = 0;
        self.left_out.clear();
        self.awaited.clear();
    }

    fn end(&mut self, phase: Phase, now: Now, spec: &Spec, reason: String) -> Transition {
        let result = if phase == Phase::Promoted {
            "promoted"
        } else {
            "rolled-back"
        };
        self.phase = phase;
        // The end's weights (the canary at 0 or 100) are a step of their own to be
        // acked: the operator's question after a rollback is whether every proxy
        // has it.
        self.step_since = now.at;
        self.step_since_ms = now.unix_ms;
        self.acked_at = None;
        self.left_out.clear();
        self.awaited.clear();
        self.record(now, result, spec, reason);
        self.history.last().cloned().expect("just recorded")
    }

    /// A proxy whose stream closed without acking the step's weights. If it was
    /// connected when the step's weights were set (or was sent them) and went after,
    /// the step waited for it: the next [`Self::on_acks`] names it left out as
    /// disconnected, however soon it went, before any call saw it waiting. One gone
    /// before the step began is none of the step's business.
    pub fn on_departed(&mut self, p: Departed<'_>) {
        if self.acked_at.is_some() || p.gone_at_ms < self.step_since_ms {
            return;
        }
        if p.connected_at_ms > self.step_since_ms && !p.sent {
            return;
        }
        let key = (p.node.to_string(), p.conn.to_string());
        let was = self.awaited.entry(key).or_insert(Awaited {
            nacked: p.nacked,
            connected: false,
            last_ms: p.gone_at_ms,
        });
        was.nacked |= p.nacked;
    }

    /// The proxies connected now and whether each acked the step's weights (once
    /// ended, the end's). Starts the interval once every one acked (or is left out);
    /// a proxy an earlier call saw waiting and this one does not list disconnected
    /// without acking, and is left out as such.
    pub fn on_acks(&mut self, now: Now, proxies: &[ProxyAck]) -> Option<Transition> {
        if self.acked_at.is_some() {
            return None;
        }
        let late = now.at.saturating_duration_since(self.step_since) >= ACK_GRACE;
        let mut left_out = Vec::new();
        let mut waiting = false;
        let mut gone = std::mem::take(&mut self.awaited);
        for p in proxies {
            let key = (p.node.clone(), p.conn.clone());
            gone.remove(&key);
            if p.acked {
                continue;
            }
            let seen = Awaited {
                nacked: p.nacked,
                connected: true,
                last_ms: now.unix_ms,
            };
            self.awaited.insert(key, seen);
            if p.nacked {
                left_out.push(LeftOut {
                    node: p.node.clone(),
                    why: LeftOutWhy::Nacked,
                });
            } else if late {
                left_out.push(LeftOut {
                    node: p.node.clone(),
                    why: LeftOutWhy::Silent,
                });
            } else {
                waiting = true;
            }
        }
        // Kept while the step waits: one that comes back (a stream of its node id
        // opened since it was last seen) is that stream, waited for or acked; a
        // stream of its node id that was there all along is another proxy.
        for (key, mut was) in gone {
            let back = proxies
                .iter()
                .any(|p| p.node == key.0 && p.connected_at_ms > was.last_ms);
            if back {
                continue;
            }
            left_out.push(LeftOut {
                node: key.0.clone(),
                why: if was.nacked {
                    LeftOutWhy::Nacked
                } else {
                    LeftOutWhy::Disconnected
                },
            });
            was.connected = false;
            self.awaited.insert(key, was);
        }
        if waiting {
            return None;
        }
        left_out.sort_by(|a, b| a.node.cmp(&b.node));
        self.left_out = left_out;
        self.acked_at = Some(now.at);
        self.window = Default::default();
        None
    }

    /// A report's windows for this route: the canary's and the other backends'
    /// summed, with the duration buckets' bounds. A gross breach rolls back here.
    pub fn on_report(
        &mut self,
        spec: &Spec,
        now: Now,
        canary: &Window,
        others: &Window,
        bounds: &[f64],
    ) -> Option<Transition> {
        if self.phase.is_terminal() {
            return None;
        }
        self.use_bounds(bounds);
        self.step_total.0.add(canary);
        self.step_total.1.add(others);
        if self.acked_at.is_some() {
            self.window.0.add(canary);
            self.window.1.add(others);
        }
        let total = &self.step_total.0;
        let gross = gross_error_rate(spec);
        let (lower, _) = wilson(total.failures, total.requests, Z99);
        if total.failures >= GROSS_MIN_FAILURES && lower > gross {
            let mut view = self.judge_view(spec, &self.step_total.0, &self.step_total.1);
            view.decision = "breach".into();
            view.reason = format!(
                "gross breach: {} of {} canary requests failed (lower bound {:.3} > {:.3})",
                total.failures, total.requests, lower, gross
            );
            view.checks.push(Check {
                name: "grossErrorRate".into(),
                value: Some(total.failures as f64 / total.requests as f64),
                threshold: gross,
                bound: Some(lower),
                samples: total.requests,
                baseline_samples: None,
                verdict: "breach".into(),
                note: None,
            });
            let reason = view.reason.clone();
            self.last_window = Some(view);
            return Some(self.end(Phase::RolledBack, now, spec, reason));
        }
        self.on_tick(spec, now)
    }

    /// Reads durations by `bounds` from now on. Counts kept under other bounds (the
    /// fleet moved to a build with other buckets) cannot be read by these, so the
    /// window's and the step's durations start afresh; their counts stay.
    fn use_bounds(&mut self, bounds: &[f64]) {
        if bounds.is_empty() || bounds == self.bounds.as_slice() {
            return;
        }
        if !self.bounds.is_empty() {
            let (w, t) = (&mut self.window, &mut self.step_total);
            for kept in [&mut w.0, &mut w.1, &mut t.0, &mut t.1] {
                kept.durations.clear();
            }
        }
        self.bounds = bounds.to_vec();
    }

    /// Time passed: judges a window whose interval is over, applies the deadline.
    pub fn on_tick(&mut self, spec: &Spec, now: Now) -> Option<Transition> {
        if self.phase != Phase::Progressing {
            return None;
        }
        let acked = self.acked_at?;
        let interval = spec.interval();
        let due = acked + interval * (self.inconclusive + 1);
        if now.at < due {
            return None;
        }
        let (c, b) = (self.window.0.clone(), self.window.1.clone());
        let mut view = self.judge_view(spec, &c, &b);
        if c.requests < spec.min_requests() {
            self.inconclusive += 1;
            let since = *self.inconclusive_since.get_or_insert(now.at);
            view.decision = "inconclusive".into();
            view.reason = format!(
                "{} of {} canary requests; the next window adds to this one",
                c.requests,
                spec.min_requests()
            );
            let reason = view.reason.clone();
            self.last_window = Some(view);
            let past = now.at.saturating_duration_since(since) >= spec.deadline();
            if past && spec.rollout.on_inconclusive == Some(OnInconclusive::Rollback) {
                return Some(self.end(
                    Phase::RolledBack,
                    now,
                    spec,
                    format!(
                        "inconclusive for {:?} (deadline): onInconclusive is rollback",
                        spec.deadline()
                    ),
                ));
            }
            self.record(now, "inconclusive", spec, reason);
            return self.history.last().cloned();
        }
        let breaches: Vec<&Check> = view
            .checks
            .iter()
            .filter(|c| c.verdict == "breach")
            .collect();
        if !breaches.is_empty() {
            let reason = breaches
                .iter()
                .map(|c| {
                    format!(
                        "{}: bound {:.4} beyond threshold {:.4} over {} requests",
                        c.name,
                        c.bound.unwrap_or_default(),
                        c.threshold,
                        c.samples
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            view.decision = "breach".into();
            view.reason = reason.clone();
            self.last_window = Some(view);
            return Some(self.end(Phase::RolledBack, now, spec, reason));
        }
        self.conclusive += 1;
        view.decision = "pass".into();
        view.reason = format!("{} canary requests, no significant breach", c.requests);
        self.last_window = Some(view);
        let steps = spec.rollout.steps.len();
        if self.step + 1 >= steps {
            return Some(self.end(Phase::Promoted, now, spec, "the last step passed".into()));
        }
        let from = self.canary_weight(spec);
        self.enter_step(self.step + 1, now);
        let reason = format!(
            "window passed at {from}% with {} canary requests",
            c.requests
        );
        self.record(now, "advanced", spec, reason);
        self.history.last().cloned()
    }

    /// A command by hand; `Err` says why it does not apply.
    pub fn command(&mut self, spec: &Spec, now: Now, cmd: Command) -> Result<Transition, String> {
        if self.phase.is_terminal() {
            return Err(format!(
                "the rollout is {}; it holds until its block changes",
                if self.phase == Phase::Promoted {
                    "promoted"
                } else {
                    "rolled back"
                }
            ));
        }
        match cmd {
            Command::Pause if self.phase == Phase::Paused => Err("already paused".into()),
            Command::Pause => {
                self.phase = Phase::Paused;
                self.record(now, "paused", spec, "paused by hand".into());
                Ok(self.history.last().cloned().expect("recorded"))
            }
            Command::Resume if self.phase != Phase::Paused => Err("not paused".into()),
            Command::Resume => {
                self.phase = Phase::Progressing;
                // The step's interval starts again, on fresh numbers.
                let step = self.step;
                self.enter_step(step, now);
                self.record(now, "resumed", spec, "resumed by hand".into());
                Ok(self.history.last().cloned().expect("recorded"))
            }
            Command::Promote => Ok(self.end(Phase::Promoted, now, spec, "promoted by hand".into())),
            Command::Abort => Ok(self.end(Phase::RolledBack, now, spec, "aborted by hand".into())),
        }
    }

    /// Every check over canary window `c` and the others' window `b`.
    fn judge_view(&self, spec: &Spec, c: &Window, b: &Window) -> WindowView {
        let mut checks = Vec::new();
        let bounds = &self.bounds;
        let min = spec.min_requests();
        let not_judged = |name: &str, threshold: f64, samples, note: String| Check {
            name: name.into(),
            value: None,
            threshold,
            bound: None,
            samples,
            baseline_samples: None,
            verdict: "not-judged".into(),
            note: Some(note),
        };
        let verdict = |breach: bool| if breach { "breach" } else { "pass" }.to_string();
        const NO_CANARY: &str = "no canary requests";
        const NO_TIMED: &str = "no timed canary requests";
        if let Some(slo) = &spec.rollout.slo {
            if let Some(max) = slo.error_rate.filter(|_| c.requests == 0) {
                checks.push(not_judged("errorRate", max, 0, NO_CANARY.into()));
            } else if let Some(max) = slo.error_rate {
                let (lower, _) = wilson(c.failures, c.requests, Z99);
                checks.push(Check {
                    name: "errorRate".into(),
                    value: (c.requests > 0).then(|| c.failures as f64 / c.requests as f64),
                    threshold: max,
                    bound: Some(lower),
                    samples: c.requests,
                    baseline_samples: None,
                    verdict: verdict(lower > max),
                    note: None,
                });
            }
            if let Some(p99) = slo.p99 {
                let t = p99.get().as_secs_f64();
                let timed = c.timed();
                if timed == 0 || bounds.is_empty() {
                    checks.push(not_judged("p99", t, timed, NO_TIMED.into()));
                } else {
                    let slow = c.slower_than(t, bounds);
                    let (lower, _) = wilson(slow, timed, Z99);
                    checks.push(Check {
                        name: "p99".into(),
                        value: c.quantile(0.99, bounds),
                        threshold: t,
                        bound: Some(lower),
                        samples: timed,
                        baseline_samples: None,
                        verdict: verdict(lower > P99_TAIL),
                        note: None,
                    });
                }
            }
        }
        if let Some(base) = &spec.rollout.baseline {
            if let Some(inc) = base.error_rate_increase {
                if c.requests == 0 {
                    checks.push(not_judged("errorRateIncrease", inc, 0, NO_CANARY.into()));
                } else if b.requests == 0 {
                    checks.push(not_judged(
                        "errorRateIncrease",
                        inc,
                        c.requests,
                        "no requests to the other backends in this window".into(),
                    ));
                } else {
                    let (c_lower, _) = wilson(c.failures, c.requests, Z99);
                    let (_, b_upper) = wilson(b.failures, b.requests, Z99);
                    let rate = |w: &Window| w.failures as f64 / w.requests.max(1) as f64;
                    checks.push(Check {
                        name: "errorRateIncrease".into(),
                        value: (c.requests > 0).then(|| rate(c) - rate(b)),
                        threshold: inc,
                        bound: Some(c_lower - b_upper),
                        samples: c.requests,
                        baseline_samples: Some(b.requests),
                        verdict: verdict(c_lower - b_upper > inc),
                        note: None,
                    });
                }
            }
            if let Some(ratio) = base.p99_ratio {
                let base_p99 = (b.timed() >= BASELINE_MIN_TIMED)
                    .then(|| b.quantile(0.99, bounds))
                    .flatten()
                    .filter(|p| p.is_finite());
                match base_p99 {
                    _ if c.timed() == 0 => checks.push(not_judged(
                        "p99Ratio",
                        ratio,
                        0,
                        NO_TIMED.into(),
                    )),
                    Some(bp) => {
                        let t = bp * ratio;
                        let slow = c.slower_than(t, bounds);
                        let (lower, _) = wilson(slow, c.timed(), Z99);
                        checks.push(Check {
                            name: "p99Ratio".into(),
                            value: c.quantile(0.99, bounds).map(|cp| cp / bp),
                            threshold: ratio,
                            bound: Some(lower),
                            samples: c.timed(),
                            baseline_samples: Some(b.timed()),
                            verdict: verdict(lower > P99_TAIL),
                            note: None,
                        });
                    }
                    _ => checks.push(not_judged(
                        "p99Ratio",
                        ratio,
                        c.timed(),
                        format!(
                            "needs {BASELINE_MIN_TIMED} timed requests to the other backends (has {})",
                            b.timed()
                        ),
                    )),
                }
            }
        }
        // DESIGN: a window is judged only with at least `minRequests` canary requests.
        // Below that a check's value and bound are shown as they stand, but a "pass"
        // on a handful of requests (or a "breach" the decision will not act on) would
        // claim a judgement nobody made.
        if c.requests < min {
            for ch in &mut checks {
                if ch.verdict != "not-judged" {
                    ch.verdict = "not-judged".into();
                    ch.note = Some(format!("{} of {min} canary requests", c.requests));
                }
            }
        }
        WindowView {
            step: self.step,
            canary_requests: c.requests,
            canary_failures: c.failures,
            baseline_requests: b.requests,
            baseline_failures: b.failures,
            decision: String::new(),
            reason: String::new(),
            checks,
        }
    }
}

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
