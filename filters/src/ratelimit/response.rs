//! The headers a rate-limit refusal carries beside its reason.

use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderValue};

use super::future::{DEGRADED_LOCAL, RATELIMIT, RATELIMIT_POLICY, RATELIMIT_SCOPE};
use super::limiter::ceil_secs;
use crate::FilterError;

/// Adds what a caller refused by a rate limit needs to back off: `retry-after` (whole
/// seconds, rounded up, at least 1) and the IETF `RateLimit-Policy` / `RateLimit`
/// headers, and `x-sluice-ratelimit-scope: degraded-local` when a fleet limit's local
/// fallback refused; an overload refusal gets `retry-after` too. Any other error adds
/// nothing.
pub fn refusal_headers(err: &FilterError, headers: &mut HeaderMap) {
    if let FilterError::RateLimited {
        retry_after,
        policy,
        state,
        degraded,
    } = err
    {
        if *degraded {
            headers.insert(RATELIMIT_SCOPE, DEGRADED_LOCAL);
        }
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from(ceil_secs(*retry_after).max(1)),
        );
        if let Ok(v) = HeaderValue::try_from(policy.as_str()) {
            headers.insert(RATELIMIT_POLICY, v);
        }
        if let Ok(v) = HeaderValue::try_from(state.as_str()) {
            headers.insert(RATELIMIT, v);
        }
    }
    if let FilterError::Overloaded { retry_after, .. } = err {
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from(ceil_secs(*retry_after).max(1)),
        );
    }
}
