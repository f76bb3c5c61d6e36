//! Why the proxy answered instead of the upstream: the one list of reasons, each with the
//! `x-sluice-reason` value, HTTP status and gRPC status its answer carries.

use http::StatusCode;

/// The header naming why the proxy answered instead of the upstream.
pub const HEADER: &str = "x-sluice-reason";

/// The header on an answer a route's fallback gave, naming the primary's failure.
pub const DEGRADED_HEADER: &str = "x-sluice-degraded";

/// A reason the proxy answers a request itself (DESIGN.md's list of fast failures).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A rate limit refused the request (429, with `retry-after`).
    RateLimited,
    /// The chosen backend's circuit breaker is open (503).
    BreakerOpen,
    /// The route's total or per-try timeout elapsed (504).
    Timeout,
    /// No route takes the request (404).
    NoRoute,
    /// The peer identity is not allowed in (403).
    Forbidden,
    /// The upstream refused the connection or reset it (502).
    UpstreamUnavailable,
    /// Every endpoint of the chosen backend is ejected (503).
    NoHealthyEndpoint,
    /// The client's request was broken (400: bad framing, a body cut short).
    BadRequest,
    /// The proxy shed the request under load (503, with `retry-after`).
    Overloaded,
    /// The client stalled sending its request (408): a head not complete within the
    /// header timeout, or a body that paused too long (its upstream request dropped).
    RequestTimeout,
    /// The method is not served for this host (405): `CONNECT` to a governed host.
    MethodNotAllowed,
}

impl Reason {
    /// The `x-sluice-reason` value.
    pub fn as_str(self) -> &'static str {
        self.row().0
    }

    /// The HTTP status of the proxy's answer.
    pub fn status(self) -> StatusCode {
        self.row().1
    }

    /// The `grpc-status` a gRPC caller gets (per the HTTP-to-gRPC status mapping).
    pub fn grpc_code(self) -> u32 {
        self.row().2
    }

    /// A fixed `grpc-message` (no percent-encoding needed) when there is nothing more
    /// specific to say.
    pub fn grpc_message(self) -> &'static str {
        self.row().3
    }

    /// The one table: reason, HTTP status, gRPC status, default gRPC message.
    fn row(self) -> (&'static str, StatusCode, u32, &'static str) {
        // gRPC codes: 4 DEADLINE_EXCEEDED, 7 PERMISSION_DENIED, 8 RESOURCE_EXHAUSTED,
        // 12 UNIMPLEMENTED, 13 INTERNAL, 14 UNAVAILABLE. A malformed request is 13, as
        // the mapping has 400: 14 is the code clients retry, and sending the same
        // broken request again cannot help.
        match self {
            Reason::RateLimited => (
                "rate-limited",
                StatusCode::TOO_MANY_REQUESTS,
                8,
                "rate limited by sluice",
            ),
            Reason::BreakerOpen => (
                "breaker-open",
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                "circuit breaker open",
            ),
            Reason::Timeout => (
                "timeout",
                StatusCode::GATEWAY_TIMEOUT,
                4,
                "timed out in sluice",
            ),
            Reason::NoRoute => ("no-route", StatusCode::NOT_FOUND, 12, "no route"),
            Reason::Forbidden => ("forbidden", StatusCode::FORBIDDEN, 7, "forbidden by sluice"),
            Reason::UpstreamUnavailable => (
                "upstream-unavailable",
                StatusCode::BAD_GATEWAY,
                14,
                "upstream unavailable",
            ),
            Reason::NoHealthyEndpoint => (
                "no-healthy-endpoint",
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                "no healthy endpoint",
            ),
            Reason::BadRequest => ("bad-request", StatusCode::BAD_REQUEST, 13, "bad request"),
            Reason::Overloaded => (
                "overloaded",
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                "overloaded",
            ),
            Reason::RequestTimeout => (
                "request-timeout",
                StatusCode::REQUEST_TIMEOUT,
                4,
                "request body timed out",
            ),
            Reason::MethodNotAllowed => (
                "method-not-allowed",
                StatusCode::METHOD_NOT_ALLOWED,
                12,
                "method not allowed by sluice",
            ),
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A malformed request is not answered with the code gRPC clients retry.
    #[test]
    fn grpc_codes_follow_the_mapping_where_a_retry_cannot_help() {
        assert_eq!(Reason::BadRequest.grpc_code(), 13);
        assert_eq!(Reason::UpstreamUnavailable.grpc_code(), 14);
        assert_eq!(Reason::Timeout.grpc_code(), 4);
    }
}
