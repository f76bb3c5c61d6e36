//! The control plane's admin HTTP server.
//!
//! Routes (all `GET`):
//! - `/`: the admin page ([`crate::operator`]).
//! - `/live`: 200 while the process runs.
//! - `/ready`: 200 once the policy source has been loaded, else 503.
//! - `/metrics`: Prometheus text (`sluice_cp_*`).
//! - `/policies`: JSON, the served version, every policy in force (name,
//!   namespace, host, source file, its file's version and last validation
//!   error) and every file (including refused ones with no good version), and
//!   `schemaViews`: per schema version, the version its proxies receive and the
//!   policies held back from them (in an older form, or withheld).
//! - `/proxies`: JSON, every proxy seen (node id, namespace, service, versions
//!   sent, acknowledged and refused with the reason, last seen, connected).
//! - `/served`: JSON, the policies served in canonical form and the newest snapshot
//!   proxies receive ([`crate::operator`]).
//! - `/rollouts` (GET) and `/rollouts/<ns>/<policy>/<route>/<command>` (POST): see
//!   [`crate::rollout`]'s admin module.
//!
//! Bound beyond loopback (the default, `0.0.0.0:15014`), every route but the probes
//! and `/metrics` answers only with the admin token (`--admin-token-file`,
//! [`AdminGate`]); the probes and `/metrics` stay open for the kubelet and Prometheus.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use sluice_api::AdminGate;
use sluice_api::admin_gate::Refusal;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::serve::Http;
use crate::state::Shared;

/// Serves the admin routes on `listener` until shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    gate: AdminGate,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let gate = gate.clone();
        async move {
            if req.method() == Method::POST && req.uri().path().starts_with("/rollouts/") {
                let resp = crate::rollout::admin::post(&shared, &gate, req).await;
                return Ok::<_, Infallible>(resp);
            }
            Ok::<_, Infallible>(route(&shared, &gate, &req))
        }
    });
    crate::serve::serve_http(listener, "admin", None, Http::One, svc, shutdown).await;
}

fn route(shared: &Shared, gate: &AdminGate, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/rollouts" || path.starts_with("/rollouts/") {
        return crate::rollout::admin::route(shared, gate, req);
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    if !matches!(req.uri().path(), "/live" | "/ready" | "/metrics") {
        let auth = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if let Err(refusal) = gate.check(auth) {
            return refused(refusal);
        }
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if shared.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "policy source not loaded yet\n",
                )
            }
        }
        "/metrics" => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(shared.metrics.render())))
            .expect("valid response"),
        "/policies" => {
            let (policies, files) = {
                let source = shared.source.lock().unwrap_or_else(|e| e.into_inner());
                (source.policy_views(), source.file_views())
            };
            let schema_views: Vec<serde_json::Value> = shared
                .snapshots
                .borrow()
                .as_ref()
                .map(|p| {
                    p.views
                        .iter()
                        .map(|v| {
                            serde_json::json!({
                                "forSchemaVersion": v.schema,
                                "version": v.snapshot.version,
                                "schemaVersion": v.snapshot.schema_version,
                                "heldBack": v.held_back,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            json(&serde_json::json!({
                "version": shared.current_version(),
                "policies": policies,
                "files": files,
                "schemaViews": schema_views,
            }))
        }
        "/" => crate::operator::page(),
        "/served" => json(&crate::operator::served(shared)),
        "/proxies" => json(&serde_json::json!({
            "version": shared.current_version(),
            "proxies": shared.proxies.snapshot(),
        })),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The gate's refusal as an answer, with the challenges on a 401.
pub(crate) fn refused(refusal: Refusal) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::FORBIDDEN);
    let mut resp = text(status, refusal.message());
    for challenge in refusal.challenges() {
        resp.headers_mut().append(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static(challenge),
        );
    }
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("valid response")
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec_pretty(value).unwrap_or_default(),
        )))
        .expect("valid response")
}
