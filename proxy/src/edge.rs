//! The server edge of the outbound and inbound listeners: pick the stack, hand the
//! request over, and rescue failures into synthetic responses. Here each request gets
//! its span ([`crate::telemetry`]), its metrics and, on routes with `accessLog: true`,
//! one access-log event on the `sluice::access` target.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use opentelemetry::trace::SpanKind;
use sluice_filters::extensions::{PeerIdentity, RetryCount, SelectedBackend};
use sluice_filters::{FilterError, find_filter_error};
use tower::Service;
use tracing::debug;

use crate::ProxyError;
use crate::body::{Body, boxed, synthetic};
use crate::message::{
    is_grpc, is_switching, is_upgrade_request, request_host, spawn_tunnel, strip_hop_by_hop,
};
use crate::policy::PolicyStore;
use crate::stack::RouteEntry;
use crate::telemetry::Telemetry;
use crate::transparent::OriginalDst;

/// Which listener a request came in on (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// The span kind: the outbound sidecar calls the mesh, the inbound one serves it.
    fn span_kind(self) -> SpanKind {
        match self {
            Direction::Outbound => SpanKind::Client,
            Direction::Inbound => SpanKind::Server,
        }
    }
}

/// Handles one request on the outbound listener.
pub(crate) async fn outbound(store: &PolicyStore, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let snapshot = store.current();
    let host = request_host(&req);
    let entry =
        host.and_then(|host| snapshot.route(host, req.method(), req.uri().path(), req.headers()));
    let Some(entry) = entry else {
        // Transparent mode: a host no policy claims is none of the mesh's business.
        if let Some(dst) = req.extensions().get::<OriginalDst>()
            && !host.is_some_and(|h| snapshot.has_host(h))
        {
            let dst = dst.clone();
            return to_original_destination(store, dst, req).await;
        }
        debug!(host = ?host, path = req.uri().path(), "no route");
        let mut req = req;
        return unrouted(store, Direction::Outbound, &mut req, "no route\n");
    };
    let telemetry = store.context().telemetry.as_deref();
    forward(entry, req, started, Direction::Outbound, telemetry).await
}

/// Sends a request of a redirected connection to where the application addressed it,
/// without governance; upgrades are tunnelled once accepted.
async fn to_original_destination(
    store: &PolicyStore,
    dst: OriginalDst,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let upgrade = is_upgrade_request(&req).then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade.is_some());
    let mut req = req.map(boxed);
    req.extensions_mut().insert(dst.endpoint);
    let mut upstream = store.context().upstream.clone();
    match upstream.call(req).await {
        Ok(mut resp) => {
            match upgrade {
                Some(down) if is_switching(&resp) => spawn_tunnel(down, &mut resp),
                _ => strip_hop_by_hop(resp.headers_mut(), false),
            }
            resp
        }
        Err(err) => {
            debug!(dst = %dst.addr, error = %err, "original destination failed");
            synthetic(
                StatusCode::BAD_GATEWAY,
                "upstream-unavailable",
                format!("{}: {err}\n", dst.addr),
            )
        }
    }
}

/// Handles one request on the inbound listener.
pub(crate) async fn inbound(store: &PolicyStore, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let snapshot = store.current();
    let Some(entry) = snapshot.inbound() else {
        let mut req = req;
        return unrouted(store, Direction::Inbound, &mut req, "no application\n");
    };
    let telemetry = store.context().telemetry.as_deref();
    forward(entry, req, started, Direction::Inbound, telemetry).await
}

/// The 404 `no-route` answer to a request no route matches, traced like any other.
fn unrouted<B>(
    store: &PolicyStore,
    direction: Direction,
    req: &mut Request<B>,
    text: &'static str,
) -> Response<Body> {
    let resp = synthetic(StatusCode::NOT_FOUND, "no-route", text);
    if let Some(t) = store.context().telemetry.as_deref() {
        t.start_unrouted(direction.span_kind(), req)
            .finish(404, None, resp.headers());
    }
    resp
}

async fn forward(
    entry: &RouteEntry,
    mut req: Request<Incoming>,
    started: Instant,
    direction: Direction,
    telemetry: Option<&Telemetry>,
) -> Response<Body> {
    let grpc = is_grpc(&req);
    let peer = req.extensions().get::<PeerIdentity>().map(|p| p.0.clone());
    let upgrade = is_upgrade_request(&req).then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade.is_some());
    // Both are off by default; then a request pays two branches here and two below.
    let span =
        telemetry.map(|t| t.start_request(direction.span_kind(), &entry.params.key, &mut req));
    let access = (entry.params.route.access_log == Some(true)).then(|| AccessEntry::new(&mut req));
    let mut svc = entry.service.clone();
    // The boxed request must not be held across an await: rustc cannot prove such a
    // future `Send` for every lifetime of the boxed error inside the body type.
    let ready = std::future::poll_fn(|cx| svc.poll_ready(cx)).await;
    let result = match ready {
        Ok(()) => {
            svc.call(req.map(|b| boxed(b.map_err(ClientBodyError))))
                .await
        }
        Err(e) => Err(e),
    };
    let (resp, backend) = match result {
        Ok(mut resp) => {
            let backend = resp
                .extensions_mut()
                .remove::<SelectedBackend>()
                .map(|b| b.index);
            match upgrade {
                Some(down) if is_switching(&resp) => spawn_tunnel(down, &mut resp),
                _ => strip_hop_by_hop(resp.headers_mut(), false),
            }
            (resp, backend)
        }
        Err(err) => {
            let (resp, backend_name) = rescue(&*err, grpc);
            debug!(route = %entry.params.name, ?direction, error = %err, "request failed");
            let backend =
                backend_name.and_then(|n| entry.params.backends.iter().position(|b| *b.name == *n));
            (resp, backend)
        }
    };
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    entry
        .metrics
        .record(backend, peer.as_deref(), status, elapsed);
    if span.is_some() || access.is_some() {
        let backend = backend
            .and_then(|i| entry.params.backends.get(i))
            .map(|b| &b.name);
        if let Some(a) = access {
            a.emit(direction, entry, backend, &resp, elapsed);
        }
        if let Some(s) = span {
            let (parts, body) = resp.into_parts();
            let body = s.finish_with_body(status, backend, &parts.headers, body);
            return Response::from_parts(parts, body);
        }
    }
    resp
}

/// What an access-log line needs from the request, taken before it is sent on.
struct AccessEntry {
    method: http::Method,
    path: String,
    host: Option<String>,
    peer: Option<Arc<str>>,
    trace_id: Option<String>,
    retries: RetryCount,
}

impl AccessEntry {
    fn new<B>(req: &mut Request<B>) -> Self {
        let retries = match req.extensions().get::<RetryCount>() {
            Some(c) => c.clone(),
            None => {
                let c = RetryCount::new();
                req.extensions_mut().insert(c.clone());
                c
            }
        };
        // After the span's injection, `traceparent` names this request's trace.
        let trace_id = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.get(3..35))
            .map(str::to_owned);
        Self {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            host: request_host(req).map(str::to_owned),
            peer: req.extensions().get::<PeerIdentity>().map(|p| p.0.clone()),
            trace_id,
            retries,
        }
    }

    /// One event on target `sluice::access` at INFO: the request, where it went, how
    /// it ended. Fields with nothing to say are left out.
    fn emit(
        self,
        direction: Direction,
        entry: &RouteEntry,
        backend: Option<&Arc<str>>,
        resp: &Response<Body>,
        elapsed: std::time::Duration,
    ) {
        let reason = resp
            .headers()
            .get("x-sluice-reason")
            .and_then(|v| v.to_str().ok());
        tracing::info!(
            target: "sluice::access",
            direction = direction.as_str(),
            route = &*entry.params.key,
            backend = backend.map(|b| &**b),
            method = self.method.as_str(),
            host = self.host.as_deref(),
            path = self.path,
            status = resp.status().as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            retries = self.retries.get(),
            reason,
            peer_identity = self.peer.as_deref(),
            trace_id = self.trace_id.as_deref(),
            "access"
        );
    }
}

/// Turns a failure from a route stack into the answer the client gets, and names the
/// backend it concerned when known. gRPC callers get a trailers-only gRPC status.
pub(crate) fn rescue(
    err: &(dyn std::error::Error + 'static),
    grpc: bool,
) -> (Response<Body>, Option<String>) {
    let (status, reason, backend, text): (StatusCode, &'static str, Option<String>, String) =
        if let Some(e) = find::<ClientBodyError>(err) {
            // The client's own body was broken (a bad chunk, a connection cut short):
            // its fault, not the upstream's.
            (StatusCode::BAD_REQUEST, "bad-request", None, e.to_string())
        } else if let Some(f) = find_filter_error(err) {
            let backend = match f {
                FilterError::BreakerOpen { backend, .. } => Some(backend.clone()),
                FilterError::NoHealthyEndpoint(backend) => Some(backend.clone()),
                _ => None,
            };
            // The filters' own answer: status, `x-sluice-reason`, `retry-after` and the
            // RateLimit headers, or a trailers-only gRPC status.
            let resp = sluice_filters::ratelimit::refusal_response(f, grpc).map(boxed);
            return (resp, backend);
        } else if let Some(p) = find::<ProxyError>(err) {
            match p {
                ProxyError::NoRoute(_) => (StatusCode::NOT_FOUND, "no-route", None, p.to_string()),
                ProxyError::NoEndpoint(b) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-healthy-endpoint",
                    Some(b.to_string()),
                    p.to_string(),
                ),
                ProxyError::Upstream { backend, .. } => (
                    StatusCode::BAD_GATEWAY,
                    "upstream-unavailable",
                    Some(backend.to_string()),
                    p.to_string(),
                ),
                _ => (
                    StatusCode::BAD_GATEWAY,
                    "upstream-unavailable",
                    None,
                    p.to_string(),
                ),
            }
        } else if find::<tower::timeout::error::Elapsed>(err).is_some() {
            (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                None,
                err.to_string(),
            )
        } else {
            (
                StatusCode::BAD_GATEWAY,
                "upstream-unavailable",
                None,
                err.to_string(),
            )
        };
    (build(status, reason, text, grpc), backend)
}

fn build(status: StatusCode, reason: &'static str, text: String, grpc: bool) -> Response<Body> {
    if !grpc {
        return synthetic(status, reason, format!("{text}\n"));
    }
    // gRPC statuses per the HTTP-to-gRPC mapping, so clients see a gRPC error.
    let code: u32 = match status {
        StatusCode::TOO_MANY_REQUESTS => 8,
        StatusCode::GATEWAY_TIMEOUT => 4,
        StatusCode::FORBIDDEN => 7,
        StatusCode::NOT_FOUND => 12,
        _ => 14,
    };
    let mut resp = synthetic(StatusCode::OK, reason, "");
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&text.replace(['\r', '\n'], " ")) {
        h.insert("grpc-message", v);
    }
    resp
}

/// A client's request body failed to read (malformed framing, or cut short).
#[derive(Debug, thiserror::Error)]
#[error("malformed request body: {0}")]
struct ClientBodyError(#[source] hyper::Error);

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
        });
        let (resp, _) = rescue(&*err, false);
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["x-sluice-reason"], "rate-limited");
        assert_eq!(resp.headers()["retry-after"], "2");
        let err: BoxError = Box::new(FilterError::BreakerOpen {
            route: "r".into(),
            backend: "v1".into(),
        });
        let (resp, backend) = rescue(&*err, false);
        assert_eq!(resp.status(), 503);
        assert_eq!(backend.as_deref(), Some("v1"));
    }

    #[test]
    fn rescues_grpc_as_trailers_only() {
        let err: BoxError = Box::new(FilterError::Timeout(Duration::from_secs(1)));
        let (resp, _) = rescue(&*err, true);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["grpc-status"], "4");
        assert_eq!(resp.headers()["x-sluice-reason"], "timeout");
    }

    #[test]
    fn host_from_authority_or_header() {
        let req = Request::builder()
            .uri("http://a:1/x")
            .header("host", "b")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), Some("a:1"));
        let req = Request::builder()
            .uri("/x")
            .header("host", "b:2")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), Some("b:2"));
        let req = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(request_host(&req), None);
    }
}
