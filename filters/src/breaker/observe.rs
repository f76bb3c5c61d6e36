//! A breaker as the outside sees it: its states, the observer told of its transitions,
//! and the snapshot the admin API shows.

/// The state of one breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Requests flow; failures are counted.
    Closed,
    /// Requests fail fast with `breaker-open` until the open time ends.
    Open,
    /// A few probes are let through; the rest fail fast.
    HalfOpen,
}

impl CircuitState {
    /// The label used in metrics and the admin API (`closed`, `open`, `half_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// Every state, for exporters that set one gauge per state.
    pub const ALL: [CircuitState; 3] = [
        CircuitState::Closed,
        CircuitState::Open,
        CircuitState::HalfOpen,
    ];

    pub(super) fn from_bits(b: u64) -> Self {
        match b & 0b11 {
            0 => CircuitState::Closed,
            1 => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    pub(super) fn bits(self) -> u64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }
}

/// Told about every breaker state change, so the proxy can export
/// `sluice_breaker_state{route,backend,state}` and `sluice_breaker_transitions_total`
/// without this crate knowing about Prometheus.
///
/// Calls happen on the request path of the request that caused the change (rarely),
/// so implementations must be quick and must not block.
pub trait BreakerObserver: Send + Sync + 'static {
    /// A breaker moved from one state to another.
    fn on_transition(
        &self,
        route: &str,
        backend: &str,
        from: CircuitState,
        to: CircuitState,
        reason: &str,
    );

    /// A breaker was created (closed) at a policy swap.
    fn on_added(&self, route: &str, backend: &str) {
        let _ = (route, backend);
    }

    /// A breaker was dropped at a policy swap (its route or backend is gone, or its
    /// params changed and a fresh one replaces it right after).
    fn on_removed(&self, route: &str, backend: &str) {
        let _ = (route, backend);
    }
}

/// The observer used when none is given.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl BreakerObserver for NoopObserver {
    fn on_transition(&self, _: &str, _: &str, _: CircuitState, _: CircuitState, _: &str) {}
}

/// One remembered transition.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TransitionRecord {
    /// Milliseconds since the breaker was created (monotonic clock).
    #[serde(skip)]
    pub at_ms: u64,
    /// When it happened, in milliseconds since the Unix epoch.
    #[serde(rename = "at")]
    pub at_unix_ms: u64,
    /// State before.
    pub from: CircuitState,
    /// State after.
    pub to: CircuitState,
    /// Why, e.g. `5 consecutive failures (last: 5xx)`.
    pub reason: String,
}

/// One breaker as the admin `GET /breakers` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BreakerSnapshot {
    /// Route name.
    pub route: String,
    /// Backend name.
    pub backend: String,
    /// `closed`, `open` or `half_open`.
    pub state: CircuitState,
    /// Results counted as successes since creation.
    pub successes: u64,
    /// Results counted as failures since creation.
    pub failures: u64,
    /// Failures in a row right now.
    pub consecutive_failures: u32,
    /// Requests refused while open or half-open.
    pub rejected: u64,
    /// Transitions since creation.
    pub transitions_total: u64,
    /// When it last opened (ms since the Unix epoch); absent when closed.
    pub opened_at: Option<u64>,
    /// When it next lets a probe through (ms since the Unix epoch); absent unless open,
    /// and absent when opened by hand (held until reset).
    pub next_probe_at: Option<u64>,
    /// Length of the current (or last) open time, jitter included.
    pub open_for_ms: u64,
    /// The last transitions, oldest first.
    pub recent_transitions: Vec<TransitionRecord>,
}
