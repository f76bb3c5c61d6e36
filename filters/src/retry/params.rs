//! Retry settings, built from a route's `retry` once per policy swap.

use std::time::Duration;

use http::{HeaderMap, Method, Response, StatusCode};
use sluice_config::RetryOn;

use crate::classify::{ErrorClass, GrpcCodes, grpc_status};

/// First backoff delay when the policy gives none.
pub const DEFAULT_BACKOFF_BASE: Duration = sluice_config::defaults::BACKOFF_BASE;
/// Largest backoff delay when the policy gives none.
pub const DEFAULT_BACKOFF_MAX: Duration = sluice_config::defaults::BACKOFF_MAX;
/// Request bodies up to this size are kept for replay when the policy gives no cap.
pub const DEFAULT_MAX_REPLAY_BYTES: u64 = sluice_config::defaults::MAX_REPLAY_BYTES;
/// Budget ratio when the route names no budget.
pub const DEFAULT_BUDGET_RATIO: f64 = sluice_config::defaults::BUDGET_RATIO;
/// Budget floor (retries per second) when the route names no budget.
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = sluice_config::defaults::BUDGET_MIN_PER_SECOND;
/// Budget window when the route's budget names none.
pub const DEFAULT_BUDGET_WINDOW: Duration = sluice_config::defaults::BUDGET_WINDOW;
/// Longest `Retry-After` honoured unless the backoff maximum is longer: a server
/// asking for more is answered with its own response rather than a held request.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Retry budget settings: at most `ratio × requests + min_per_second × window`
/// retries within any window.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetParams {
    /// Retries allowed per original request.
    pub ratio: f64,
    /// Retries always allowed per second.
    pub min_per_second: u32,
    /// Window over which requests and retries are counted.
    pub window: Duration,
}

impl Default for BudgetParams {
    fn default() -> Self {
        Self {
            ratio: DEFAULT_BUDGET_RATIO,
            min_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
            window: DEFAULT_BUDGET_WINDOW,
        }
    }
}

/// The set of [`RetryOn`] classes a route retries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryClasses {
    connect: bool,
    refused: bool,
    reset: bool,
    gateway: bool,
    server: bool,
    timeout: bool,
}

impl RetryClasses {
    /// The set holding exactly these classes.
    pub fn from_classes(classes: impl IntoIterator<Item = RetryOn>) -> Self {
        let mut s = Self::default();
        for c in classes {
            match c {
                RetryOn::ConnectFailure => s.connect = true,
                RetryOn::RefusedStream => s.refused = true,
                RetryOn::Reset => s.reset = true,
                RetryOn::GatewayError => s.gateway = true,
                RetryOn::ServerError => s.server = true,
                RetryOn::Timeout => s.timeout = true,
            }
        }
        s
    }
}

/// Everything the retry layer of one route needs; equal params keep the route's
/// budget across a policy swap.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryParams {
    /// Retries after the first try (2 → at most 3 tries).
    pub attempts: u32,
    /// Failure classes retried.
    pub on: RetryClasses,
    /// Response statuses retried besides the classes.
    pub status_codes: Vec<u16>,
    pub(crate) grpc_statuses: GrpcCodes,
    /// Time allowed for each try (to the response head).
    pub per_try_timeout: Option<Duration>,
    /// First backoff delay.
    pub backoff_base: Duration,
    /// Largest backoff delay.
    pub backoff_max: Duration,
    /// No retry starts sooner than this after the previous try (`backoff.min`).
    pub backoff_min: Duration,
    /// Full jitter on backoff delays (off in tests for determinism).
    pub jitter: bool,
    /// Retry non-idempotent methods too.
    pub non_idempotent: bool,
    /// Bodies up to this many bytes are kept for replay.
    pub max_replay_bytes: u64,
    /// The route's retry budget.
    pub budget: BudgetParams,
}

impl Default for RetryParams {
    fn default() -> Self {
        Self::from_policy(&sluice_config::Retry::default())
    }
}

impl RetryParams {
    /// Builds params from a route's `retry`, filling the documented defaults. A route
    /// without `budget` gets ratio 0.2, 10 per second, over 10 s.
    pub fn from_policy(p: &sluice_config::Retry) -> Self {
        let backoff_base = p
            .backoff
            .as_ref()
            .and_then(|b| b.base)
            .map_or(DEFAULT_BACKOFF_BASE, |d| d.get());
        let backoff_max = p
            .backoff
            .as_ref()
            .and_then(|b| b.max)
            .map_or(DEFAULT_BACKOFF_MAX, |d| d.get())
            .max(backoff_base);
        let backoff_min = p
            .backoff
            .as_ref()
            .and_then(|b| b.min)
            .map_or(Duration::ZERO, |d| d.get());
        let budget = p
            .budget
            .as_ref()
            .map_or_else(BudgetParams::default, |b| BudgetParams {
                ratio: b.ratio.clamp(0.0, 1000.0),
                min_per_second: b.min_per_second,
                window: b
                    .window
                    .map_or(DEFAULT_BUDGET_WINDOW, |d| d.get())
                    .max(Duration::from_millis(10)),
            });
        Self {
            attempts: p.attempts,
            on: RetryClasses::from_classes(p.on.iter().copied()),
            status_codes: p.status_codes.clone(),
            grpc_statuses: GrpcCodes::from_codes(p.grpc_statuses.iter().copied()),
            per_try_timeout: p.per_try_timeout.map(|d| d.get()),
            backoff_base,
            backoff_max,
            backoff_min,
            jitter: true,
            non_idempotent: p.non_idempotent,
            max_replay_bytes: p.max_replay_bytes.unwrap_or(DEFAULT_MAX_REPLAY_BYTES),
            budget,
        }
    }

    /// The same params with backoff jitter off (deterministic tests).
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// Whether this method may be retried at all.
    pub fn method_allowed(&self, m: &Method) -> bool {
        self.non_idempotent || is_idempotent(m)
    }

    /// Longest `Retry-After` this route waits for.
    pub fn max_retry_after(&self) -> Duration {
        self.backoff_max.max(DEFAULT_MAX_RETRY_AFTER)
    }

    /// The delay before retry number `retry` (0-based): exponential, capped, and with
    /// full jitter a uniform draw below that; never below `backoff.min`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
            .min(self.backoff_max);
        let delay = if self.jitter {
            exp.mul_f64(rand::random::<f64>())
        } else {
            exp
        };
        delay.max(self.backoff_min)
    }

    pub(crate) fn is_retryable_response<B>(&self, rsp: &Response<B>) -> bool {
        let s = rsp.status();
        self.status_retryable(s) || self.grpc_retryable(rsp.headers())
    }

    fn status_retryable(&self, s: StatusCode) -> bool {
        (self.on.server && s.is_server_error())
            || (self.on.gateway && matches!(s.as_u16(), 502..=504))
            || self.status_codes.contains(&s.as_u16())
    }

    fn grpc_retryable(&self, headers: &HeaderMap) -> bool {
        grpc_status(headers).is_some_and(|c| self.grpc_statuses.contains(c))
    }

    pub(crate) fn is_retryable_error(&self, class: ErrorClass) -> bool {
        match class {
            ErrorClass::Timeout => self.on.timeout,
            // Never sent either way; a later try may find the certificate in place.
            ErrorClass::ConnectFailure | ErrorClass::Unready => self.on.connect,
            ErrorClass::RefusedStream => self.on.refused,
            ErrorClass::Reset => self.on.reset,
            ErrorClass::BreakerOpen | ErrorClass::Other => false,
        }
    }
}

/// GET, HEAD, OPTIONS, PUT, DELETE and TRACE: safe to send twice.
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// What a `Retry-After` on a 429 or 503 asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryAfter {
    /// No header, or a status it does not apply to.
    Absent,
    /// Wait this long (delta-seconds).
    Wait(Duration),
    /// An HTTP-date or garbage: we cannot tell how long, so we do not retry early.
    Unusable,
}

pub(crate) fn retry_after<B>(rsp: &Response<B>) -> RetryAfter {
    if !matches!(
        rsp.status(),
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        return RetryAfter::Absent;
    }
    let Some(v) = rsp.headers().get(http::header::RETRY_AFTER) else {
        return RetryAfter::Absent;
    };
    match std::str::from_utf8(v.as_bytes())
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        Some(secs) => RetryAfter::Wait(Duration::from_secs(secs)),
        None => RetryAfter::Unusable,
    }
}
