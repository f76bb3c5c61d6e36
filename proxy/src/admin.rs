//! The admin listener.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | the admin page: one static HTML page built into the binary that reads the routes below ([`crate::admin_page`]) |
//! | `GET /live` | 200 while the process runs |
//! | `GET /ready` | 200 once a policy (and with mTLS a certificate) is loaded and the proxy is not draining, else 503 |
//! | `GET /identity` | JSON: mTLS on or off, SPIFFE ID, certificate expiry, next renewal, certificates installed |
//! | `GET /metrics` | Prometheus text |
//! | `GET /config` | JSON: version, source, applied_at, policies (canonical YAML), last_rejected, identity, node_id (with a control plane) |
//! | `GET /breakers` | JSON list of circuit breakers, one per route × backend (`namespace`, and `route` as `<policy>.<route>`) |
//! | `POST /breakers/<route>/<backend>/reset` or `/open` | change one breaker by hand; `?namespace=NS` when that route and backend are in several namespaces |
//! | `GET /recent` | JSON: the last requests the ring kept (`--recent-requests N`), filtered by `since`, `status` (`503`, `5xx`), `reason`, `route`, `namespace`, `backend`, `min_ms`, `limit`; `secrets=true` shows secret headers a proxy kept ([`crate::recent`]) |
//! | `GET /routes` | JSON: the routes of the policy in force, per host in the order they are tried |
//! | `PUT /log-level` | body: a level or an `EnvFilter` string |
//! | `GET /app-health/<container>/<livez\|readyz\|startupz>` | the application's own probe, called as the kubelet would ([`crate::probes`]) |
//!
//! On an admin port bound beyond loopback (`0.0.0.0:15000` in a pod), only `/live`,
//! `/ready`, `/metrics` and `/app-health/…` answer without the admin token
//! (`Authorization: Bearer …`, `--admin-token-file`): the others show every policy in
//! the mesh or change the proxy ([`sluice_api::AdminGate`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};

use sluice_api::AdminGate;
use sluice_api::clock::rfc3339_millis as rfc3339;

use crate::admin_page;
use crate::body::{Body, full};
use crate::config::LogControl;
use crate::policy::PolicyStore;
use crate::recent::RecentFilter;
use crate::route::key_labels;
use crate::tls::TlsStore;

/// Largest admin request body read.
const MAX_BODY: usize = 64 * 1024;

/// What the admin routes read and change.
#[derive(Clone, Debug)]
pub(crate) struct AdminState {
    pub(crate) store: PolicyStore,
    pub(crate) log: Option<LogControl>,
    pub(crate) gate: AdminGate,
    pub(crate) probes: Option<Arc<crate::probes::AppProbes>>,
    /// The workload certificate, when mTLS is on.
    pub(crate) tls: Option<Arc<TlsStore>>,
    /// The node id this proxy gives the control plane, when it follows one (so
    /// `sluicectl status` can join `/proxies` to this admin port).
    pub(crate) node_id: Option<Arc<str>>,
}

/// Handles one admin request.
pub(crate) async fn handle<B>(
    state: AdminState,
    _peer: SocketAddr,
    req: Request<B>,
) -> Response<Body>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if !is_public(&parts.method, path) {
        let auth = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if let Err(refusal) = state.gate.check(auth) {
            return refused(refusal);
        }
    }
    match (&parts.method, path) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            // Draining first: the policy is still loaded, and the kubelet should stop
            // sending traffic here for that reason, not be told no policy is loaded.
            if state.store.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
            } else if !state.store.is_ready() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no policy loaded\n",
                )
            } else if state.tls.as_ref().is_some_and(|t| !t.is_ready()) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no workload certificate yet\n",
                )
            } else {
                // An expired certificate (renewal failing) does not make the pod unready:
                // a control plane down past the certificates' lifetime would take every
                // pod out of its Service at once, plaintext callers' traffic too.
                // `/identity`, `sluicectl status` and the expiry metric say it instead.
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(full(state.store.context().metrics.encode()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        (&Method::GET, "/config") => {
            let mut v = config_json(&state.store);
            v["identity"] = identity_json(state.tls.as_deref());
            v["node_id"] = state.node_id.as_deref().into();
            json(StatusCode::OK, &v)
        }
        (&Method::GET, "/identity") => json(StatusCode::OK, &identity_json(state.tls.as_deref())),
        (&Method::GET, "/breakers") => json(StatusCode::OK, &state.store.context().breakers.list()),
        (&Method::GET, "/endpoints") => {
            let list = state.store.context().governance.endpoints.list();
            json(
                StatusCode::OK,
                &serde_json::to_value(list).unwrap_or_default(),
            )
        }
        (&Method::POST, p) if p.starts_with("/breakers/") => {
            breaker_action(&state, p, parts.uri.query())
        }
        (&Method::GET, "/recent") => recent(&state, parts.uri.query()),
        (&Method::GET, "/routes") => json(StatusCode::OK, &admin_page::routes_json(&state.store)),
        (&Method::GET, "/") => {
            let mut resp = Response::new(full(admin_page::PAGE));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, p) if p.starts_with("/app-health/") => {
            let answer = match &state.probes {
                Some(probes) => probes.answer(p, &parts.headers).await,
                None => None,
            };
            answer.unwrap_or_else(|| text(StatusCode::NOT_FOUND, "no such application probe\n"))
        }
        (&Method::PUT, "/log-level") => {
            let Some(log) = &state.log else {
                return text(
                    StatusCode::NOT_IMPLEMENTED,
                    "log level is not reloadable here\n",
                );
            };
            let body = match Limited::new(body, MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::BAD_REQUEST, "unreadable body\n"),
            };
            let Ok(directive) = std::str::from_utf8(&body) else {
                return text(StatusCode::BAD_REQUEST, "body is not UTF-8\n");
            };
            match log.set(directive.trim()) {
                Ok(()) => text(
                    StatusCode::OK,
                    format!("log level set to {}\n", directive.trim()),
                ),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (method, p) => match allowed_methods(p) {
            // A known path asked with another method: say which one it takes
            // (RFC 9110 §15.5.6), as the control plane's admin does.
            Some(allow) => {
                let mut resp = text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{p} takes {allow}, not {method}\n"),
                );
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                resp
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
    }
}

/// The method a known admin path takes, `None` for a path the admin does not serve.
fn allowed_methods(path: &str) -> Option<&'static str> {
    const READ: [&str; 10] = [
        "/",
        "/live",
        "/ready",
        "/metrics",
        "/config",
        "/identity",
        "/breakers",
        "/endpoints",
        "/recent",
        "/routes",
    ];
    if READ.contains(&path) || path.starts_with("/app-health/") {
        return Some("GET");
    }
    if path == "/log-level" {
        return Some("PUT");
    }
    let mut parts = path.strip_prefix("/breakers/")?.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(_), Some("open" | "reset"), None) => Some("POST"),
        _ => None,
    }
}

/// `POST /breakers/<route>/<backend>/{reset,open}[?namespace=NS]`: without a namespace,
/// the one breaker of that route and backend in any namespace; several are refused.
fn breaker_action(state: &AdminState, path: &str, query: Option<&str>) -> Response<Body> {
    let mut parts = path.trim_start_matches("/breakers/").split('/');
    let (Some(route), Some(backend), Some(action), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    if !matches!(action, "reset" | "open") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    let mut namespace = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("namespace", v)) => {
                let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                namespace = Some(v.into_owned());
            }
            _ => {
                let msg = format!("unknown query parameter {pair:?} (only namespace=NS)\n");
                return text(StatusCode::BAD_REQUEST, msg);
            }
        }
    }
    let breakers = &state.store.context().breakers;
    let key = match breakers
        .find(namespace.as_deref(), route, backend)
        .as_slice()
    {
        [] => return text(StatusCode::NOT_FOUND, "no such breaker\n"),
        [key] => key.clone(),
        several => {
            let namespaces: Vec<&str> = several.iter().map(|k| key_labels(k).0).collect();
            let msg = format!(
                "{route}/{backend} is a breaker in several namespaces ({}): name one with ?namespace=NS\n",
                namespaces.join(", ")
            );
            return text(StatusCode::CONFLICT, msg);
        }
    };
    let found = match action {
        "reset" => breakers.reset(&key, backend),
        _ => breakers.open(&key, backend),
    };
    if found {
        let ns = key_labels(&key).0;
        text(
            StatusCode::OK,
            format!("{ns}/{route}/{backend}: {action}\n"),
        )
    } else {
        text(StatusCode::NOT_FOUND, "no such breaker\n")
    }
}

/// `GET /recent`: the ring's entries the query's filters let through.
fn recent(state: &AdminState, query: Option<&str>) -> Response<Body> {
    let filter = match RecentFilter::from_query(query) {
        Ok(f) => f,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match state.store.context().recent.as_deref() {
        Some(ring) => json(StatusCode::OK, &ring.to_json(&filter)),
        None => json(StatusCode::OK, &crate::recent::disabled_json()),
    }
}

/// The routes the kubelet and Prometheus call, open on every admin port.
fn is_public(method: &Method, path: &str) -> bool {
    *method == Method::GET
        && (matches!(path, "/live" | "/ready" | "/metrics") || path.starts_with("/app-health/"))
}

/// The gate's refusal as an answer, with the challenges on a 401.
fn refused(refusal: sluice_api::admin_gate::Refusal) -> Response<Body> {
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::FORBIDDEN);
    let mut resp = text(status, refusal.message());
    for challenge in refusal.challenges() {
        resp.headers_mut().append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    resp
}

fn config_json(store: &PolicyStore) -> serde_json::Value {
    let snap = store.current();
    let policies = snap
        .policy_set()
        .map(|s| String::from_utf8_lossy(s.canonical_bytes()).into_owned());
    let rejected = store
        .last_rejected()
        .map(|r| serde_json::json!({ "source": r.source, "at": rfc3339(r.at), "error": r.error }));
    serde_json::json!({
        "version": snap.hash(),
        "hash": snap.hash(),
        "source": snap.policy_set().map(|_| snap.source()),
        "applied_at": snap.applied_at().map(rfc3339),
        "policies": policies,
        "last_rejected": rejected,
    })
}

/// The workload identity as `/identity` and `/config` show it.
fn identity_json(tls: Option<&TlsStore>) -> serde_json::Value {
    let Some(tls) = tls else {
        return serde_json::json!({ "mtls": false });
    };
    let held = tls.is_ready();
    let expired = tls.is_expired();
    serde_json::json!({
        "mtls": true,
        "ready": held && !expired,
        "expired": expired,
        "spiffe_id": tls.spiffe_id(),
        "not_after": held.then(|| rfc3339(tls.not_after())),
        "next_renewal": tls.next_renewal().map(rfc3339),
        "certificates_installed": tls.installs(),
    })
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(token: Option<&str>) -> AdminState {
        AdminState {
            store: crate::policy::store_for_tests(),
            log: None,
            gate: AdminGate::new("0.0.0.0:15000".parse().unwrap(), token.map(Into::into)),
            probes: None,
            tls: None,
            node_id: None,
        }
    }

    /// State behind a loopback admin port, which the gate leaves open.
    fn loopback() -> AdminState {
        AdminState {
            gate: AdminGate::new("127.0.0.1:15000".parse().unwrap(), None),
            ..state(None)
        }
    }

    /// A certificate past its end (renewal kept failing) is not ready: `/identity` says
    /// it expired, where it used to say ready with a `not_after` in the past.
    #[test]
    fn an_expired_certificate_is_not_ready() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let id = "spiffe://cluster.local/ns/shop/sa/order";
        for (not_after, ready) in [(now - 60, false), (now + 3600, true)] {
            let tls = TlsStore::new(crate::tls::tests::test_credentials(id, not_after)).unwrap();
            assert_eq!(tls.is_expired(), !ready);
            let v = identity_json(Some(&tls));
            assert_eq!(v["ready"], ready, "{v}");
            assert_eq!(v["expired"], !ready, "{v}");
        }
    }

    #[test]
    fn only_probes_and_metrics_are_public() {
        for (method, path) in [
            (Method::GET, "/live"),
            (Method::GET, "/ready"),
            (Method::GET, "/metrics"),
            (Method::GET, "/app-health/app/readyz"),
        ] {
            assert!(is_public(&method, path), "{method} {path}");
        }
        for (method, path) in [
            (Method::GET, "/config"),
            (Method::GET, "/breakers"),
            (Method::GET, "/endpoints"),
            (Method::GET, "/identity"),
            (Method::GET, "/recent"),
            (Method::POST, "/breakers/a.b/v1/open"),
            (Method::PUT, "/log-level"),
            (Method::POST, "/live"),
        ] {
            assert!(!is_public(&method, path), "{method} {path}");
        }
    }

    /// Sends one request through [`handle`]; the answer's status, content type and body.
    async fn call(
        state: &AdminState,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, String, Bytes) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(http_body_util::Full::new(body.into()))
            .unwrap();
        let resp = handle(state.clone(), "127.0.0.1:1".parse().unwrap(), req).await;
        let status = resp.status();
        let kind = resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, kind, body)
    }

    #[tokio::test]
    async fn each_route_answers_in_its_own_format() {
        let s = loopback();
        let (status, kind, body) = call(&s, Method::GET, "/identity", "").await;
        assert_eq!(
            (status, kind.as_str()),
            (StatusCode::OK, "application/json")
        );
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({ "mtls": false })
        );
        let (status, kind, body) = call(&s, Method::GET, "/endpoints", "").await;
        assert_eq!(
            (status, kind.as_str()),
            (StatusCode::OK, "application/json")
        );
        assert!(
            serde_json::from_slice::<serde_json::Value>(&body)
                .unwrap()
                .is_array()
        );
        let (status, kind, body) = call(&s, Method::GET, "/live", "").await;
        assert_eq!(
            (status, kind.as_str()),
            (StatusCode::OK, "text/plain; charset=utf-8")
        );
        assert_eq!(body, "live\n");
        let (status, kind, _) = call(&s, Method::GET, "/", "").await;
        assert_eq!(
            (status, kind.as_str()),
            (StatusCode::OK, "text/html; charset=utf-8")
        );
        // Neither a path outside `/app-health/` nor one outside `/breakers/` reaches
        // the probe or breaker handlers, whose refusals say something else.
        for (method, path) in [(Method::GET, "/nope"), (Method::POST, "/a/reset")] {
            let (status, _, body) = call(&s, method.clone(), path, "").await;
            assert_eq!(
                (status, &body[..]),
                (StatusCode::NOT_FOUND, &b"not found\n"[..]),
                "{method} {path}"
            );
        }
        let (status, _, body) = call(&s, Method::GET, "/app-health/app/readyz", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, "no such application probe\n");
    }

    /// A path the admin serves, asked with another method, is a 405 that names the
    /// method it takes; an unknown path stays a 404 whatever the method.
    #[tokio::test]
    async fn a_known_path_with_the_wrong_method_is_405_with_allow() {
        let s = loopback();
        let call_full = |method: Method, path: &'static str| {
            let s = s.clone();
            async move {
                let req = Request::builder()
                    .method(method)
                    .uri(path)
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap();
                let resp = handle(s, "127.0.0.1:1".parse().unwrap(), req).await;
                let allow = resp
                    .headers()
                    .get(header::ALLOW)
                    .map(|v| v.to_str().unwrap().to_owned());
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (status, allow, String::from_utf8(body.to_vec()).unwrap())
            }
        };
        for (method, path, allow) in [
            (Method::POST, "/ready", "GET"),
            (Method::DELETE, "/metrics", "GET"),
            (Method::POST, "/", "GET"),
            (Method::PUT, "/app-health/app/readyz", "GET"),
            (Method::GET, "/log-level", "PUT"),
            (Method::GET, "/breakers/a.b/v1/open", "POST"),
            (Method::PUT, "/breakers/a.b/v1/reset", "POST"),
        ] {
            let resp = call_full(method.clone(), path).await;
            assert_eq!(resp.0, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(resp.1.as_deref(), Some(allow), "{method} {path}");
            assert_eq!(resp.2, format!("{path} takes {allow}, not {method}\n"));
        }
        for (method, path) in [
            (Method::POST, "/nope"),
            (Method::GET, "/breakers/a.b/v1/close"),
            (Method::GET, "/breakers/a.b/open"),
            (Method::GET, "/live/"),
        ] {
            let resp = call_full(method.clone(), path).await;
            assert_eq!(resp.0, StatusCode::NOT_FOUND, "{method} {path}");
            assert_eq!(resp.1, None);
        }
    }

    #[tokio::test]
    async fn log_level_takes_a_long_directive_and_refuses_bad_bodies() {
        let mut s = loopback();
        let (status, _, _) = call(&s, Method::PUT, "/log-level", "debug").await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED);

        let applied = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = applied.clone();
        s.log = Some(LogControl::new(move |d| {
            if d == "bogus" {
                return Err("invalid directive `bogus`".into());
            }
            seen.lock().unwrap().push(d.to_owned());
            Ok(())
        }));
        // One target per crate of a large service: longer than a few hundred bytes,
        // well under the 64 KiB the route reads.
        let long = (0..200)
            .map(|i| format!("crate_{i}=debug"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(long.len() > 2048);
        let (status, _, body) = call(&s, Method::PUT, "/log-level", format!(" {long}\n")).await;
        assert_eq!(status, StatusCode::OK, "{body:?}");
        assert_eq!(applied.lock().unwrap().as_slice(), [long]);

        let (status, _, body) = call(&s, Method::PUT, "/log-level", "bogus").await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::BAD_REQUEST, &b"invalid directive `bogus`\n"[..])
        );
        let (status, _, body) = call(&s, Method::PUT, "/log-level", vec![0xff, 0xfe]).await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::BAD_REQUEST, &b"body is not UTF-8\n"[..])
        );
        let (status, _, body) = call(&s, Method::PUT, "/log-level", vec![b'a'; MAX_BODY + 1]).await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::BAD_REQUEST, &b"unreadable body\n"[..])
        );
        assert_eq!(applied.lock().unwrap().len(), 1);
    }

    #[test]
    fn config_reports_rejection() {
        let s = state(None);
        s.store
            .reject("p.yaml", "p.yaml:3:1: spec: missing field".into());
        let v = config_json(&s.store);
        assert!(v["version"].is_null());
        assert_eq!(v["last_rejected"]["source"], "p.yaml");
        assert!(v["last_rejected"]["at"].as_str().unwrap().ends_with('Z'));
    }
}
