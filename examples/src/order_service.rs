//! The order service: `POST /orders`, `GET /health`.
//!
//! Each order is logged by calling the log service, `POST /logs`, through the local
//! outbound sidecar: the request goes to `log_url` (the sidecar's outbound listener)
//! with `Host: <log_host>`, and the sidecar decides which log-service version takes it
//! and with what governance. The headers `x-user-id`, `x-tenant-id`, `x-canary` and
//! `x-request-id` of the incoming order are passed along, so a caller can steer canary
//! routing and rate-limit keys from outside, and so are `traceparent` and `tracestate`,
//! so the sidecars' spans join the caller's trace. There is no retry, timeout or breaker code
//! here on purpose.
//!
//! Answers: `201` with `{"order":N,"logged":true,"log_status":202,"log_version":"log-v1"}`
//! when the log call succeeded; otherwise `502` with the log call's status and the
//! sidecar's `x-sluice-reason` (or the transport error) in `reason`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use crate::RunningService;
use crate::server::{self, text};

/// Headers of an incoming order that are passed on to the log call.
const FORWARDED_HEADERS: [&str; 6] = [
    "x-user-id",
    "x-tenant-id",
    "x-canary",
    "x-request-id",
    // The W3C trace context: with it, the sidecars' spans join the caller's trace.
    "traceparent",
    "tracestate",
];

/// Where the order service sends its log calls.
#[derive(Clone, Debug)]
pub struct OrderServiceConfig {
    /// Base URL of the outbound sidecar, e.g. `http://127.0.0.1:15001`.
    pub log_url: String,
    /// The `Host` the log calls carry, which the sidecar routes by.
    pub log_host: String,
}

impl Default for OrderServiceConfig {
    fn default() -> Self {
        Self {
            log_url: "http://127.0.0.1:15001".to_string(),
            log_host: "log-service".to_string(),
        }
    }
}

struct State {
    config: OrderServiceConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    next_order: AtomicU64,
}

/// Binds `addr` and serves the order service until the returned handle is shut down.
pub async fn start(addr: SocketAddr, config: OrderServiceConfig) -> io::Result<RunningService> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).build(connector);
    let state = Arc::new(State {
        config,
        client,
        next_order: AtomicU64::new(1),
    });
    server::serve(addr, move |req| handle(state.clone(), req)).await
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/orders") => create_order(&state, req).await,
        (&Method::GET, "/health") => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn create_order(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let order = state.next_order.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    // The order's content is not used; read it so the connection stays reusable.
    if let Err(e) = body.collect().await {
        tracing::debug!(error = %e, "order body broke off");
        return text(StatusCode::BAD_REQUEST, "request body broke off\n");
    }

    let event = json!({ "event": "order-created", "order": order }).to_string();
    let uri = format!("{}/logs", state.config.log_url.trim_end_matches('/'));
    let mut log_req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(CONTENT_TYPE, "application/json");
    if let Ok(host) = HeaderValue::from_str(&state.config.log_host) {
        log_req = log_req.header(HOST, host);
    }
    for name in FORWARDED_HEADERS {
        if let Some(v) = parts.headers.get(name) {
            log_req = log_req.header(name, v.clone());
        }
    }
    let log_req = match log_req.body(Full::new(Bytes::from(event))) {
        Ok(r) => r,
        Err(e) => {
            return server::json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({ "order": order, "logged": false, "reason": e.to_string() }),
            );
        }
    };

    match state.client.request(log_req).await {
        Ok(resp) => {
            let status = resp.status();
            let reason = header_str(&resp, "x-sluice-reason");
            let version = header_str(&resp, "x-log-version");
            // Drain the body so the pooled connection can be reused.
            let _ = resp.into_body().collect().await;
            if status.is_success() {
                server::json(
                    StatusCode::CREATED,
                    &json!({
                        "order": order,
                        "logged": true,
                        "log_status": status.as_u16(),
                        "log_version": version,
                    }),
                )
            } else {
                server::json(
                    StatusCode::BAD_GATEWAY,
                    &json!({
                        "order": order,
                        "logged": false,
                        "log_status": status.as_u16(),
                        "log_version": version,
                        "reason": reason,
                    }),
                )
            }
        }
        Err(e) => server::json(
            StatusCode::BAD_GATEWAY,
            &json!({ "order": order, "logged": false, "reason": format!("log call failed: {e}") }),
        ),
    }
}

fn header_str<B>(resp: &Response<B>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}
