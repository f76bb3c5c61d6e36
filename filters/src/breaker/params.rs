//! Breaker settings, built from a route's `circuitBreaker` once per policy swap.

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use sluice_config::{FailureClass, GrpcCode};

use crate::classify::{ErrorClass, GrpcCodes, grpc_status};

/// Consecutive failures that open a breaker when the policy names no trigger.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// First open time when the policy gives none.
pub const DEFAULT_OPEN_FOR: Duration = sluice_config::defaults::OPEN_FOR;
/// Cap on the growing open time when the policy gives none.
pub const DEFAULT_MAX_OPEN_FOR: Duration = sluice_config::defaults::MAX_OPEN_FOR;
/// Share (±) by which each open time is jittered, so breakers of many sidecars do
/// not probe a recovering backend in lockstep.
pub const DEFAULT_OPEN_JITTER: f64 = 0.1;

/// The failure-rate trigger, with its window cut into buckets.
#[derive(Clone, Debug, PartialEq)]
pub struct RateTrigger {
    /// Open at or above this percentage of failures (1..=100).
    pub percent: u32,
    /// Sliding window length.
    pub window: Duration,
    /// Fewer requests than this in the window never open the breaker.
    pub min_requests: u32,
}

/// Everything one route × backend breaker needs; equal params keep a breaker's state
/// across a policy swap.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerParams {
    /// Open after this many failures in a row (`None`: no such trigger).
    pub consecutive_failures: Option<u32>,
    /// Open on a failure rate over a sliding window.
    pub failure_rate: Option<RateTrigger>,
    /// First open time.
    pub open_for: Duration,
    /// Cap on the open time, which doubles on every failed probe.
    pub max_open_for: Duration,
    /// Probes admitted when half-open; all must succeed to close.
    pub half_open_requests: u32,
    /// Failure classes counted.
    pub failure_on: FailureClasses,
    /// gRPC statuses counted as failures.
    pub(crate) grpc_statuses: GrpcCodes,
    /// ± share of jitter on each open time (0 turns it off, as tests do).
    pub jitter: f64,
}

/// The set of [`FailureClass`]es a breaker counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureClasses {
    connect: bool,
    timeout: bool,
    gateway: bool,
    server: bool,
}

impl FailureClasses {
    /// The set holding exactly these classes.
    pub fn from_classes(classes: impl IntoIterator<Item = FailureClass>) -> Self {
        let mut s = Self {
            connect: false,
            timeout: false,
            gateway: false,
            server: false,
        };
        for c in classes {
            match c {
                FailureClass::ConnectFailure => s.connect = true,
                FailureClass::Timeout => s.timeout = true,
                FailureClass::GatewayError => s.gateway = true,
                FailureClass::ServerError => s.server = true,
            }
        }
        s
    }
}

impl Default for FailureClasses {
    /// connect-failure, timeout, 5xx (the policy model's documented default).
    fn default() -> Self {
        Self::from_classes(sluice_config::defaults::FAILURE_ON)
    }
}

/// gRPC statuses counted when the policy names none.
pub const DEFAULT_GRPC_FAILURES: [GrpcCode; 5] = sluice_config::defaults::BREAKER_GRPC_STATUSES;

impl Default for BreakerParams {
    fn default() -> Self {
        Self::from_policy(&sluice_config::CircuitBreaker::default())
    }
}

impl BreakerParams {
    /// Builds params from a route's `circuitBreaker`, filling the documented defaults.
    ///
    /// With neither `consecutiveFailures` nor `failureRate` the breaker opens after
    /// [`DEFAULT_CONSECUTIVE_FAILURES`] failures in a row.
    pub fn from_policy(p: &sluice_config::CircuitBreaker) -> Self {
        let failure_rate = p.failure_rate.as_ref().map(|r| RateTrigger {
            percent: r.percent.clamp(1, 100),
            window: r.window.get().max(Duration::from_millis(10)),
            min_requests: r.min_requests,
        });
        let consecutive_failures = match (p.consecutive_failures, &failure_rate) {
            (Some(n), _) => Some(n.max(1)),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_CONSECUTIVE_FAILURES),
        };
        let open_for = p.open_for.map_or(DEFAULT_OPEN_FOR, |d| d.get());
        let max_open_for = p
            .max_open_for
            .map_or(DEFAULT_MAX_OPEN_FOR, |d| d.get())
            .max(open_for);
        let failure_on = if p.failure_on.is_empty() {
            FailureClasses::default()
        } else {
            FailureClasses::from_classes(p.failure_on.iter().copied())
        };
        let grpc_statuses = if p.grpc_statuses.is_empty() {
            GrpcCodes::from_codes(DEFAULT_GRPC_FAILURES)
        } else {
            GrpcCodes::from_codes(p.grpc_statuses.iter().copied())
        };
        Self {
            consecutive_failures,
            failure_rate,
            open_for,
            max_open_for,
            // The probe counters are 16-bit fields of the packed state word.
            half_open_requests: p.half_open_requests.unwrap_or(1).clamp(1, 10_000),
            failure_on,
            grpc_statuses,
            jitter: DEFAULT_OPEN_JITTER,
        }
    }

    /// The same params with open-time jitter switched off (deterministic tests).
    pub fn without_jitter(mut self) -> Self {
        self.jitter = 0.0;
        self
    }

    /// Whether a response head (status and headers, trailers-only gRPC included) is a failure.
    pub(crate) fn is_failure_status(&self, status: StatusCode) -> bool {
        let c = &self.failure_on;
        (c.server && status.is_server_error())
            || (c.gateway && matches!(status.as_u16(), 502..=504))
    }

    /// Whether a `grpc-status` in these headers (or trailers) is a counted failure.
    pub(crate) fn is_failure_grpc(&self, headers: &HeaderMap) -> Option<bool> {
        grpc_status(headers).map(|code| self.grpc_statuses.contains(code))
    }

    /// Whether an error from below is a counted failure. Errors we cannot place
    /// count as connect failures: the backend did not give an answer.
    pub(crate) fn is_failure_error(&self, class: ErrorClass) -> bool {
        match class {
            ErrorClass::Timeout => self.failure_on.timeout,
            // Not the backend's doing: this proxy could not dial yet.
            ErrorClass::BreakerOpen | ErrorClass::Unready => false,
            ErrorClass::ConnectFailure
            | ErrorClass::RefusedStream
            | ErrorClass::Reset
            | ErrorClass::Other => self.failure_on.connect,
        }
    }

    /// Whether a dropped call whose deadline had passed counts (a per-try timeout above).
    pub(crate) fn counts_timeouts(&self) -> bool {
        self.failure_on.timeout
    }
}
