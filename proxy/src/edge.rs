//! The server edge of the outbound and inbound listeners: pick the stack, hand the
//! request over, and hand failures to the rescue ([`crate::rescue`]). Here each request gets
//! its span ([`crate::telemetry`]), its metrics and, on routes with `accessLog: true`,
//! one access-log event on the `sluice::access` target.

use std::sync::Arc;

use http::{HeaderValue, Request, Response, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use opentelemetry::trace::SpanKind;
use sluice_filters::clock;
use sluice_filters::extensions::{PeerIdentity, RetryCount, Routing};
use sluice_filters::reason::{self, Reason};
use tokio::time::Instant;
use tower::Service;
use tracing::debug;

use crate::authority::{self, Named, Refusal};
use crate::body::{Body, boxed, empty};
use crate::message::{
    foreign_coding_in, is_grpc, is_switching, is_upgrade_request, normalize_target, request_host,
    restrict_upgrade, spawn_tunnel, strip_hop_by_hop, switched_as_offered,
};
use crate::policy::{PolicySnapshot, PolicyStore};
use crate::recent::{RecentRequests, Seen};
use crate::rescue::{ClientBodyError, refuse, rescue};
use crate::stack::RouteEntry;
use crate::telemetry::Telemetry;
use crate::timeouts::{BodyTimeout, Timeouts};
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
pub(crate) async fn outbound(store: PolicyStore, mut req: Request<Incoming>) -> Response<Body> {
    let store = &store;
    let started = clock::now();
    let snapshot = store.current();
    let named = match authority::settle(&mut req) {
        Ok(_) if foreign_coding_in(req.headers(), req.body()) => Err(authority::TRANSFER_CODING),
        settled => settled,
    };
    let named = match named {
        Ok(named) => named,
        Err(refusal) => return refused(store, Direction::Outbound, &mut req, refusal, started),
    };
    if named == Named::Nothing {
        // Transparent mode: a request naming no host is none of the mesh's business.
        if let Some(dst) = req.extensions().get::<OriginalDst>().cloned() {
            return to_original_destination(store, dst, req).await;
        }
        return refused(
            store,
            Direction::Outbound,
            &mut req,
            authority::NO_AUTHORITY,
            started,
        );
    }
    normalize_target(&mut req);
    let host = request_host(&req);
    if let Err(refusal) =
        authority::check_target(&req, || host.is_some_and(|h| snapshot.has_host(h)))
    {
        return refused(store, Direction::Outbound, &mut req, refusal, started);
    }
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
        return refused(
            store,
            Direction::Outbound,
            &mut req,
            Refusal {
                reason: Reason::NoRoute,
                detail: "no route",
            },
            started,
        );
    };
    let ctx = store.context();
    let (telemetry, recent) = (ctx.telemetry.as_deref(), ctx.recent.as_deref());
    forward(
        &snapshot,
        entry,
        req,
        started,
        Direction::Outbound,
        telemetry,
        recent,
    )
    .await
}

/// The answer to an upstream response whose body is in a coding besides `chunked`,
/// which could only be handed on as bytes mislabelled plain
/// ([`crate::message::foreign_transfer_coding`]).
const FOREIGN_CODING: &str = "the upstream used a transfer coding other than chunked";

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
    Routing::of_mut(req.extensions_mut()).endpoint = Some(dst.endpoint);
    let mut upstream = store.context().upstream.clone();
    match upstream.call(req).await {
        Ok(mut resp) => {
            match upgrade {
                Some(down) if is_switching(&resp) => spawn_tunnel(down, &mut resp),
                _ if foreign_coding_in(resp.headers(), resp.body()) => {
                    return refuse(Reason::UpstreamUnavailable, FOREIGN_CODING, false);
                }
                _ => strip_hop_by_hop(resp.headers_mut(), false),
            }
            resp
        }
        Err(err) => {
            debug!(dst = %dst.addr, error = %err, "original destination failed");
            refuse(
                Reason::UpstreamUnavailable,
                &format!("{}: {err}", dst.addr),
                false,
            )
        }
    }
}

/// Handles one request on the inbound listener: the authority rule and the target
/// checks hold as outbound, and the application counts as a governed host.
pub(crate) async fn inbound(store: PolicyStore, mut req: Request<Incoming>) -> Response<Body> {
    let store = &store;
    let started = clock::now();
    let snapshot = store.current();
    normalize_target(&mut req);
    let checked = match authority::settle(&mut req) {
        Ok(_) if foreign_coding_in(req.headers(), req.body()) => Err(authority::TRANSFER_CODING),
        Ok(Named::One) => authority::check_target(&req, || true),
        Ok(Named::Nothing) => Err(authority::NO_AUTHORITY),
        Err(refusal) => Err(refusal),
    };
    if let Err(refusal) = checked {
        return refused(store, Direction::Inbound, &mut req, refusal, started);
    }
    let Some(entry) = snapshot.inbound() else {
        let refusal = Refusal {
            reason: Reason::NoRoute,
            detail: "no application",
        };
        return refused(store, Direction::Inbound, &mut req, refusal, started);
    };
    let ctx = store.context();
    let (telemetry, recent) = (ctx.telemetry.as_deref(), ctx.recent.as_deref());
    forward(
        &snapshot,
        entry,
        req,
        started,
        Direction::Inbound,
        telemetry,
        recent,
    )
    .await
}

/// The proxy's answer to a request refused before any route took it (`no-route`, or a
/// request that breaks the authority or target rules), traced like any other.
fn refused<B>(
    store: &PolicyStore,
    direction: Direction,
    req: &mut Request<B>,
    refusal: Refusal,
    started: Instant,
) -> Response<Body> {
    let mut resp = refuse(refusal.reason, refusal.detail, is_grpc(req));
    if refusal.reason == Reason::MethodNotAllowed {
        // RFC 9110 §15.5.6: a 405 lists what the target does take.
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
    }
    if let Some(t) = store.context().telemetry.as_deref() {
        t.start_unrouted(direction.span_kind(), req).finish(
            resp.status().as_u16(),
            None,
            resp.headers(),
        );
    }
    if let Some(r) = store.context().recent.as_deref() {
        let elapsed = clock::now().saturating_duration_since(started);
        r.record(
            Seen::new(req),
            direction.as_str(),
            None,
            None,
            &resp,
            elapsed,
        );
    }
    resp
}

/// What a governed host takes: every method but `CONNECT`.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH";

async fn forward(
    snapshot: &Arc<PolicySnapshot>,
    entry: &RouteEntry,
    mut req: Request<Incoming>,
    started: Instant,
    direction: Direction,
    telemetry: Option<&Telemetry>,
    recent: Option<&RecentRequests>,
) -> Response<Body> {
    // Off by default: then this is the ring's whole cost. Boxed, like the access entry
    // below: this future is moved whole into its box and through hyper, and a field
    // that is nearly always `None` should not make every move larger.
    let seen = recent.map(|_| Box::new(Seen::new(&req)));
    let grpc = is_grpc(&req);
    let peer = req.extensions().get::<PeerIdentity>().map(|p| p.0.clone());
    // Only the protocols the route lets through are offered upstream; the rest of an
    // offer (`h2c` unless listed) goes with the hop-by-hop headers.
    let upgrade = (is_upgrade_request(&req)
        && restrict_upgrade(req.headers_mut(), &entry.params.route.upgrades))
    .then(|| {
        let offer = req.headers().get(header::UPGRADE).cloned();
        (hyper::upgrade::on(&mut req), offer)
    });
    strip_hop_by_hop(req.headers_mut(), upgrade.is_some());
    // Both are off by default; then a request pays two branches here and two below.
    let span = telemetry.map(|t| {
        let (namespace, route) = (&entry.params.namespace, &entry.params.label);
        t.start_request(direction.span_kind(), namespace, route, &mut req)
    });
    let access =
        (entry.params.route.access_log == Some(true)).then(|| Box::new(AccessEntry::new(&mut req)));
    let mut ledger = Ledger {
        entry,
        direction,
        started,
        recent,
        peer,
        seen,
        access,
        span,
        open: true,
    };
    let mut svc = crate::kept::take(snapshot, entry);
    // The boxed request must not be held across an await: rustc cannot prove such a
    // future `Send` for every lifetime of the boxed error inside the body type.
    let ready = std::future::poll_fn(|cx| svc.poll_ready(cx)).await;
    // A request that came whole without a body (most GETs) has nothing to time or
    // stream: it goes on with an empty body, which boxes without allocating.
    let ended = req.body().is_end_stream();
    let mut progress = None;
    let called = match ready {
        Ok(()) if ended => Ok(svc.call(req.map(|_| empty()))),
        Ok(()) => {
            let timeout = req.extensions().get::<Timeouts>().map(|t| t.request_body);
            let (parts, body) = req.into_parts();
            let (body, p) = BodyTimeout::new(body.map_err(ClientBodyError), timeout);
            let mut req = Request::from_parts(parts, boxed(body));
            // The route's timers start once the body is in: its layers read how it arrives.
            Routing::of_mut(req.extensions_mut()).body = Some(p.clone());
            progress = Some(p);
            Ok(svc.call(req))
        }
        Err(e) => Err(e),
    };
    // Called, the stack is free for this worker's next request to the route; one that
    // failed to become ready is not called again.
    if called.is_ok() {
        crate::kept::keep(snapshot, entry, svc);
    }
    let result = match called {
        Ok(future) => future.await,
        Err(e) => Err(e),
    };
    // Answered: the rest is recorded below, with the answer.
    ledger.open = false;
    let (peer, seen, access, span) = (
        ledger.peer.take(),
        ledger.seen.take(),
        ledger.access.take(),
        ledger.span.take(),
    );
    // The upstream answered: from here a quiet request side is a stream's own.
    if let Some(p) = &progress {
        p.answered();
    }
    let (resp, backend) = match result {
        Ok(mut resp) => {
            let backend = Routing::backend(resp.extensions()).map(|b| b.index);
            match upgrade {
                Some((down, Some(offer)))
                    if is_switching(&resp) && switched_as_offered(&resp, &offer) =>
                {
                    spawn_tunnel(down, &mut resp)
                }
                _ if is_switching(&resp) => {
                    // Switched to what nobody offered: the tunnel is not opened.
                    debug!(route = %entry.params.name, "upstream switched protocols unasked");
                    resp = refuse(
                        Reason::UpstreamUnavailable,
                        "upstream switched to a protocol not offered",
                        grpc,
                    );
                }
                _ if foreign_coding_in(resp.headers(), resp.body()) => {
                    debug!(route = %entry.params.name, "upstream used a transfer coding besides chunked");
                    resp = refuse(Reason::UpstreamUnavailable, FOREIGN_CODING, grpc);
                }
                _ => strip_hop_by_hop(resp.headers_mut(), false),
            }
            (resp, backend)
        }
        Err(err) => {
            // The client's body broke off or stalled: its outcome, whatever the upstream
            // connection made of it.
            let client_failed = progress.as_ref().is_some_and(|p| p.is_client_failed());
            let (resp, backend_name) = rescue(&*err, grpc, client_failed);
            debug!(route = %entry.params.name, ?direction, error = %err, "request failed");
            let backend =
                backend_name.and_then(|n| entry.params.backends.iter().position(|b| *b.name == *n));
            (resp, backend)
        }
    };
    let elapsed = clock::now().saturating_duration_since(started);
    let status = resp.status().as_u16();
    entry
        .metrics
        .record(backend, peer.as_deref(), status, elapsed);
    if let (Some(r), Some(seen)) = (recent, seen) {
        let name = backend
            .and_then(|i| entry.params.backends.get(i))
            .map(|b| &b.name);
        let route = Some((&entry.params.namespace, &entry.params.label));
        r.record(*seen, direction.as_str(), route, name, &resp, elapsed);
    }
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

/// What a request records however it ends, held while it waits for its answer. Dropped
/// before that (the client went away, and hyper dropped the request's future with the
/// upstream call in it), it records the request as 499, nginx's "client closed
/// request": in the metrics, `/recent`, the access log and the span, so a storm of
/// client timeouts shows instead of vanishing. An answered request takes its parts out
/// and records them with the answer.
struct Ledger<'a> {
    entry: &'a RouteEntry,
    direction: Direction,
    started: Instant,
    recent: Option<&'a RecentRequests>,
    peer: Option<Arc<str>>,
    seen: Option<Box<Seen>>,
    access: Option<Box<AccessEntry>>,
    span: Option<crate::telemetry::RequestSpan>,
    /// Not answered yet.
    open: bool,
}

/// The status a request the client abandoned before its answer is recorded with.
const CLIENT_CLOSED: u16 = 499;

impl Drop for Ledger<'_> {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let elapsed = clock::now().saturating_duration_since(self.started);
        let mut resp = Response::new(empty());
        if let Ok(status) = http::StatusCode::from_u16(CLIENT_CLOSED) {
            *resp.status_mut() = status;
        }
        // Where the split had sent it is not known here: no backend.
        self.entry
            .metrics
            .record(None, self.peer.as_deref(), CLIENT_CLOSED, elapsed);
        if let (Some(r), Some(seen)) = (self.recent, self.seen.take()) {
            let route = Some((&self.entry.params.namespace, &self.entry.params.label));
            r.record(*seen, self.direction.as_str(), route, None, &resp, elapsed);
        }
        if let Some(a) = self.access.take() {
            a.emit(self.direction, self.entry, None, &resp, elapsed);
        }
        if let Some(s) = self.span.take() {
            s.finish(CLIENT_CLOSED, None, resp.headers());
        }
    }
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
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
        let reason = header(reason::HEADER);
        let degraded = header(reason::DEGRADED_HEADER);
        tracing::info!(
            target: "sluice::access",
            direction = direction.as_str(),
            namespace = &*entry.params.namespace,
            route = &*entry.params.label,
            backend = backend.map(|b| &**b),
            method = self.method.as_str(),
            host = self.host.as_deref(),
            path = self.path,
            status = resp.status().as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            retries = self.retries.get(),
            reason,
            degraded,
            peer_identity = self.peer.as_deref(),
            trace_id = self.trace_id.as_deref(),
            "access"
        );
    }
}
