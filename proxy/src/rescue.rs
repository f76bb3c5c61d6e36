//! The one rescue: every refusal, whether a governance layer's [`FilterError`], a
//! [`ProxyError`] from the upstream client, a broken client body or a request no route
//! takes, becomes the caller's answer here, from the one table of
//! [`Reason`]: HTTP status, `x-sluice-reason` and, for
//! gRPC callers, a trailers-only `grpc-status`.

use http::{HeaderValue, Response, StatusCode, header};
use sluice_filters::reason::{self, Reason};
use sluice_filters::{FilterError, find_filter_error};

use crate::ProxyError;
use crate::body::{Body, full};
use crate::timeouts::RequestBodyTimeout;

/// A client's request body failed to read (malformed framing, or cut short).
#[derive(Debug, thiserror::Error)]
#[error("malformed request body: {0}")]
pub(crate) struct ClientBodyError(#[source] pub(crate) hyper::Error);

/// Turns a failure from a route stack into the answer the client gets, and names the
/// backend it concerned when known. gRPC callers get a trailers-only gRPC status.
pub(crate) fn rescue(
    err: &(dyn std::error::Error + 'static),
    grpc: bool,
    client_failed: bool,
) -> (Response<Body>, Option<String>) {
    if client_failed {
        // The client's own body failed first (a stall past the body timeout, or broken
        // framing): whatever came of it upstream, no backend is at fault.
        let reason = if find::<RequestBodyTimeout>(err).is_some() {
            Reason::RequestTimeout
        } else if find::<ClientBodyError>(err).is_some() {
            Reason::BadRequest
        } else {
            // The upstream connection reported the body's failure its own way (an
            // HTTP/2 stream reset): the stall is the likelier cause.
            Reason::RequestTimeout
        };
        return (refuse(reason, &err.to_string(), grpc), None);
    }
    if let Some(f) = find_filter_error(err) {
        let backend = match f {
            FilterError::BreakerOpen { backend, .. } => Some(backend.clone()),
            FilterError::NoHealthyEndpoint(backend) => Some(backend.clone()),
            // Timed out after the split chose: counted against the backend it went to.
            FilterError::Timeout(_) => sluice_filters::AtBackend::find(err).map(str::to_string),
            _ => None,
        };
        let reason = f.reason();
        let detail = if grpc {
            reason.grpc_message()
        } else {
            reason.as_str()
        };
        let mut resp = refuse(reason, detail, grpc);
        sluice_filters::ratelimit::refusal_headers(f, resp.headers_mut());
        return (resp, backend);
    }
    let (reason, backend) = if find::<RequestBodyTimeout>(err).is_some() {
        // The client stalled mid-body: the upstream request is gone (its connection
        // freed), and the client is told so.
        (Reason::RequestTimeout, None)
    } else if find::<ClientBodyError>(err).is_some() {
        // The client's own body was broken (a bad chunk, a connection cut short):
        // its fault, not the upstream's.
        (Reason::BadRequest, None)
    } else {
        match find::<ProxyError>(err) {
            Some(ProxyError::NoEndpoint(b)) => (Reason::NoHealthyEndpoint, Some(b.to_string())),
            Some(ProxyError::Upstream { backend, .. }) => {
                (Reason::UpstreamUnavailable, Some(backend.to_string()))
            }
            _ => (Reason::UpstreamUnavailable, None),
        }
    };
    (refuse(reason, &err.to_string(), grpc), backend)
}

/// The proxy's own answer for `reason`: a short text (`detail` and a newline) with
/// `x-sluice-reason`, or for a gRPC caller a trailers-only HTTP 200 whose headers carry
/// `grpc-status` and `detail` as `grpc-message`.
pub(crate) fn refuse(reason: Reason, detail: &str, grpc: bool) -> Response<Body> {
    let mut resp = if grpc {
        let mut resp = Response::new(full(""));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(reason.grpc_code()));
        if let Ok(v) = HeaderValue::from_str(&detail.replace(['\r', '\n'], " ")) {
            h.insert("grpc-message", v);
        }
        resp
    } else {
        let mut resp = Response::new(full(format!("{detail}\n")));
        *resp.status_mut() = reason.status();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    };
    if grpc {
        *resp.status_mut() = StatusCode::OK;
    }
    resp.headers_mut()
        .insert(reason::HEADER, HeaderValue::from_static(reason.as_str()));
    resp
}

/// The whole HTTP/1.1 answer to a request head that did not arrive within `timeout`
/// ([`crate::timeouts::HeaderTimeoutIo`]): what [`refuse`] answers for
/// [`Reason::RequestTimeout`], plus `connection: close`, written out once per listener
/// since there is no request for hyper to answer.
pub(crate) fn header_timeout_answer(timeout: std::time::Duration) -> bytes::Bytes {
    let reason = Reason::RequestTimeout;
    let status = reason.status();
    let body = format!("no complete request head within {timeout:?}\n");
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\n{}: {}\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default(),
        reason::HEADER,
        reason.as_str(),
        body.len(),
    )
    .into()
}

fn find<'a, E: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::BoxError;
    use std::time::Duration;

    #[test]
    fn rescues_filter_errors_with_reason() {
        let err: BoxError = Box::new(FilterError::RateLimited {
            retry_after: Duration::from_millis(1500),
            policy: "\"default\";q=200;w=1".into(),
            state: "\"default\";r=0;t=2".into(),
            degraded: false,
        });
        let (resp, _) = rescue(&*err, false, false);
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["x-sluice-reason"], "rate-limited");
        assert_eq!(resp.headers()["retry-after"], "2");
        assert_eq!(resp.headers()["ratelimit-policy"], "\"default\";q=200;w=1");
        assert_eq!(resp.headers()["ratelimit"], "\"default\";r=0;t=2");
        let err: BoxError = Box::new(FilterError::BreakerOpen {
            route: "r".into(),
            backend: "v1".into(),
        });
        let (resp, backend) = rescue(&*err, false, false);
        assert_eq!(resp.status(), 503);
        assert_eq!(backend.as_deref(), Some("v1"));
        let (resp, _) = rescue(&FilterError::Timeout(Duration::from_secs(2)), false, false);
        assert_eq!(resp.status(), 504);
        assert_eq!(resp.headers()["x-sluice-reason"], "timeout");
    }

    #[test]
    fn rescues_grpc_as_trailers_only() {
        let err: BoxError = Box::new(FilterError::Timeout(Duration::from_secs(1)));
        let (resp, _) = rescue(&*err, true, false);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["grpc-status"], "4");
        assert_eq!(resp.headers()["x-sluice-reason"], "timeout");
        let err: BoxError = Box::new(FilterError::RateLimited {
            retry_after: Duration::from_millis(1200),
            policy: "\"ingest\";q=50;w=1".into(),
            state: "\"ingest\";r=0;t=2".into(),
            degraded: true,
        });
        let (resp, _) = rescue(&*err, true, false);
        let h = resp.headers();
        assert_eq!(resp.status(), 200);
        assert_eq!(h["grpc-status"], "8");
        assert_eq!(h["content-type"], "application/grpc");
        assert!(h.contains_key("grpc-message"));
        assert_eq!(h["x-sluice-reason"], "rate-limited");
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["x-sluice-ratelimit-scope"], "degraded-local");
    }

    #[test]
    fn a_timeout_after_the_split_names_the_backend_it_was_sent_to() {
        let err = sluice_filters::AtBackend::wrap(
            "v2".into(),
            FilterError::Timeout(Duration::from_secs(1)),
        );
        let (resp, backend) = rescue(&*err, false, false);
        assert_eq!(resp.status(), 504);
        assert_eq!(resp.headers()["x-sluice-reason"], "timeout");
        assert_eq!(backend.as_deref(), Some("v2"));
        let (_, backend) = rescue(&FilterError::Timeout(Duration::from_secs(1)), false, false);
        assert_eq!(backend, None, "a timeout above the split names none");
    }

    #[test]
    fn a_backend_left_without_an_endpoint_is_named_and_answered_as_such() {
        let err: BoxError = Box::new(ProxyError::NoEndpoint("v1".into()));
        let (resp, backend) = rescue(&*err, false, false);
        assert_eq!(resp.status(), Reason::NoHealthyEndpoint.status());
        assert_eq!(
            resp.headers()["x-sluice-reason"],
            Reason::NoHealthyEndpoint.as_str()
        );
        assert_eq!(backend.as_deref(), Some("v1"));
    }

    #[test]
    fn rescues_upstream_failures_naming_the_backend() {
        let err: BoxError = Box::new(ProxyError::Upstream {
            backend: "v2".into(),
            source: sluice_filters::UpstreamError::new(
                sluice_filters::UpstreamErrorKind::ConnectFailure,
                "refused",
            ),
        });
        let (resp, backend) = rescue(&*err, false, false);
        assert_eq!(resp.status(), 502);
        assert_eq!(resp.headers()["x-sluice-reason"], "upstream-unavailable");
        assert_eq!(backend.as_deref(), Some("v2"));
        let (resp, _) = rescue(&*err, true, false);
        assert_eq!(resp.headers()["grpc-status"], "14");
        let resp = refuse(Reason::NoRoute, "no route", true);
        assert_eq!(resp.headers()["grpc-status"], "12");
    }
}
