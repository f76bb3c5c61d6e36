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
    if !matches!(req.uri().path(), "/live" | "/ready" | "/metrics")
        && let Some(refused) = crate::refusal::refusal(gate, req)
    {
        return refused;
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    use super::*;
    use crate::k8s::endpoints::ServiceEndpoints;
    use crate::source::PolicyDir;
    use crate::state::PolicySource;

    /// The admin port on 127.0.0.1 under `gate`, over a policy directory holding the
    /// rollout test policy; not yet loaded (so not ready) until the caller reloads.
    async fn admin(
        dir: &std::path::Path,
        gate: AdminGate,
    ) -> (Arc<Shared>, SocketAddr, watch::Sender<bool>) {
        std::fs::write(dir.join("log.yaml"), crate::rollout::TEST_POLICY).unwrap();
        let source = PolicySource::Dir(
            PolicyDir::open(dir, None, sluice_config::Limits::default()).unwrap(),
        );
        let shared = Arc::new(Shared::new(source, ServiceEndpoints::default(), None, None));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, gate, shared.clone(), stopped));
        (shared, addr, stop)
    }

    /// One request: status, `content-type`, `WWW-Authenticate` values and body.
    async fn send(
        addr: SocketAddr,
        method: Method,
        path: &str,
        auth: Option<&str>,
    ) -> (u16, String, Vec<String>, String) {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        if let Some(a) = auth {
            req = req.header(hyper::header::AUTHORIZATION, a);
        }
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(req.body(Full::default()).unwrap()),
        )
        .await
        .expect("answered in time")
        .expect("answered");
        let header = |name| {
            resp.headers()
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let ctype = header(hyper::header::CONTENT_TYPE).join(",");
        let challenges = header(hyper::header::WWW_AUTHENTICATE);
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            ctype,
            challenges,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// Every route answers with its content; only `GET` is taken; unknown paths 404;
    /// `/ready` follows the first load of the policy source.
    #[tokio::test]
    async fn every_route_answers_and_only_get_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let open = AdminGate::new(SocketAddr::from(([127, 0, 0, 1], 0)), None);
        let (shared, addr, _stop) = admin(dir.path(), open).await;
        let get = |path: &'static str| send(addr, Method::GET, path, None);

        assert_eq!(get("/live").await.0, 200);
        let (code, _, _, body) = get("/ready").await;
        assert_eq!(
            (code, body.as_str()),
            (503, "policy source not loaded yet\n")
        );
        shared.reload();
        let (code, _, _, body) = get("/ready").await;
        assert_eq!((code, body.as_str()), (200, "ready\n"));

        let (code, ctype, _, body) = get("/metrics").await;
        assert_eq!((code, ctype.as_str()), (200, "text/plain; version=0.0.4"));
        assert!(body.contains("sluice_cp_"), "{body}");
        let (code, ctype, _, body) = get("/").await;
        assert_eq!((code, ctype.as_str()), (200, "text/html; charset=utf-8"));
        assert!(body.contains("<html"), "{body}");
        for path in ["/policies", "/served", "/proxies"] {
            let (code, ctype, _, body) = get(path).await;
            assert_eq!((code, ctype.as_str()), (200, "application/json"), "{path}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(v.get("version").is_some(), "{path}: {v}");
        }
        let (_, _, _, body) = get("/policies").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["version"], serde_json::json!(shared.current_version()));
        assert_eq!(v["policies"].as_array().map(Vec::len), Some(1), "{v}");
        let (_, _, _, body) = get("/proxies").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["proxies"], serde_json::json!([]));

        assert_eq!(get("/nope").await.0, 404);
        let (code, _, _, body) = send(addr, Method::POST, "/policies", None).await;
        assert_eq!((code, body.as_str()), (405, "only GET\n"));
        assert_eq!(send(addr, Method::DELETE, "/live", None).await.0, 405);
    }

    /// Bound beyond loopback, the probes and `/metrics` stay open; every other route
    /// wants the token (401 with both challenges), or is closed without one (403).
    #[tokio::test]
    async fn beyond_loopback_only_the_probes_and_metrics_are_open() {
        let dir = tempfile::tempdir().unwrap();
        let beyond = SocketAddr::from(([0, 0, 0, 0], 0));
        let (shared, addr, _stop) =
            admin(dir.path(), AdminGate::new(beyond, Some("t0k".into()))).await;
        shared.reload();
        for path in ["/live", "/ready", "/metrics"] {
            assert_eq!(send(addr, Method::GET, path, None).await.0, 200, "{path}");
        }
        for path in ["/", "/policies", "/served", "/proxies", "/nope"] {
            let (code, _, challenges, _) = send(addr, Method::GET, path, None).await;
            assert_eq!(code, 401, "{path}");
            assert_eq!(
                challenges,
                [
                    sluice_api::admin_gate::CHALLENGE,
                    sluice_api::admin_gate::BASIC_CHALLENGE
                ],
                "{path}"
            );
            let (code, _, _, _) = send(addr, Method::GET, path, Some("Bearer t0k")).await;
            assert_eq!(code, if path == "/nope" { 404 } else { 200 }, "{path}");
        }

        let dir = tempfile::tempdir().unwrap();
        let (_, addr, _stop) = admin(dir.path(), AdminGate::new(beyond, None)).await;
        assert_eq!(send(addr, Method::GET, "/metrics", None).await.0, 200);
        let (code, _, challenges, _) = send(addr, Method::GET, "/policies", None).await;
        assert_eq!((code, challenges.len()), (403, 0));
    }
}
