use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use super::future::{RATELIMIT, RATELIMIT_POLICY};
use super::limiter::ceil_secs;
use crate::FilterError;

const X_SLUICE_REASON: HeaderName = HeaderName::from_static("x-sluice-reason");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// True when the request is gRPC (`content-type: application/grpc`, `application/grpc+proto`, …).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status code that stands for `err`.
pub fn grpc_status_of(err: &FilterError) -> u32 {
    // Keyed on the reason so that new error variants need no change here.
    match err.reason() {
        "rate-limited" => 8, // RESOURCE_EXHAUSTED
        "timeout" => 4,      // DEADLINE_EXCEEDED
        "forbidden" => 7,    // PERMISSION_DENIED
        _ => 14,             // UNAVAILABLE
    }
}

/// The synthetic response a caller gets for `err`.
///
/// HTTP callers get `err.status()` (429 for a rate limit) with `x-sluice-reason` and, for a
/// rate limit or an overload, `retry-after` (whole seconds, rounded up) and the `RateLimit-Policy` /
/// `RateLimit` headers. gRPC callers (`req_is_grpc`, see [`is_grpc`]) get a trailers-only
/// HTTP 200 whose headers carry `grpc-status` (8 RESOURCE_EXHAUSTED for a rate limit) and
/// `grpc-message`, plus the same Sluice headers.
pub fn refusal_response(err: &FilterError, req_is_grpc: bool) -> Response<Full<Bytes>> {
    let mut headers = HeaderMap::new();
    headers.insert(X_SLUICE_REASON, HeaderValue::from_static(err.reason()));
    if let FilterError::RateLimited {
        retry_after,
        policy,
        state,
    } = err
    {
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
    let mut rsp = if req_is_grpc {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(GRPC_STATUS, HeaderValue::from(grpc_status_of(err)));
        headers.insert(GRPC_MESSAGE, HeaderValue::from_static(grpc_message(err)));
        Response::new(Full::new(Bytes::new()))
    } else {
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        let mut rsp = Response::new(Full::new(Bytes::from_static(err.reason().as_bytes())));
        *rsp.status_mut() = err.status();
        rsp
    };
    if req_is_grpc {
        *rsp.status_mut() = StatusCode::OK;
    }
    rsp.headers_mut().extend(headers);
    rsp
}

/// Fixed, percent-encoding-free messages (`grpc-message` is percent-encoded on the wire).
fn grpc_message(err: &FilterError) -> &'static str {
    match err.reason() {
        "rate-limited" => "rate limited by sluice",
        "timeout" => "timed out in sluice",
        "breaker-open" => "circuit breaker open",
        "no-healthy-endpoint" => "no healthy endpoint",
        "forbidden" => "forbidden by sluice",
        "overloaded" => "overloaded; shed by sluice",
        _ => "refused by sluice",
    }
}
