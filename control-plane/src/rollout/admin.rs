//! The rollouts on the control plane's admin port.
//!
//! - `GET /rollouts`: every rollout: step, effective weights, each check's value,
//!   threshold, bound and sample size for the open and the last judged window, the
//!   decision and why, the history, and the proxies left out of the step's acks.
//! - `POST /rollouts/<namespace>/<policy>/<route>/{pause,resume,promote,abort}`:
//!   a command by hand; 200 with the transition, 404 for no such rollout, 409 when
//!   its state does not allow it. A replica that does not hold the lease relays the
//!   command to the one that does ([`super::forward`]) and answers with its answer;
//!   503 while it knows no holder, 502 when the holder does not answer, 409 when the
//!   command was itself relayed (two replicas that both think the other leads must
//!   not pass it back and forth).
//! - `POST /rollouts/reports`: a proxy's traffic report relayed by a replica that
//!   does not hold the lease (see [`super::forward`]); 204 once taken in, 409 when
//!   this replica does not hold the lease either.
//! - `POST /rollouts/proxies`: the proxies connected to a replica that does not hold
//!   the lease and the versions they acked (JSON); 200 with the per-route proxy
//!   counts of the whole fleet (a [`pb::RouteTraffic`], protobuf) for the
//!   follower's own proxies, or 409 as above.
//!
//! Both answer under the admin port's token rule ([`AdminGate`]): on loopback, or
//! with the admin token.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prost::Message as _;
use sluice_api::{AdminGate, pb};

use super::driver::{CommandError, RolloutId};
use super::engine::Command;
use super::forward::RelayError;
use crate::refusal::refusal;
use crate::state::Shared;

/// Most bytes of a relayed report (a proxy's report is bounded well below).
const MAX_REPORT_BYTES: usize = 1 << 20;

/// What every relay from another replica carries: the sender's name in `header` and a
/// body of at most [`MAX_REPORT_BYTES`]; anything else is answered here.
async fn relayed(
    gate: &AdminGate,
    req: Request<Incoming>,
    header: &str,
) -> Result<(String, Bytes), Response<Full<Bytes>>> {
    if let Some(refused) = refusal(gate, &req) {
        return Err(refused);
    }
    let Some(sender) = req
        .headers()
        .get(header)
        .and_then(|v| v.to_str().ok())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
    else {
        return Err(text(StatusCode::BAD_REQUEST, format!("missing {header}\n")));
    };
    match Limited::new(req.into_body(), MAX_REPORT_BYTES)
        .collect()
        .await
    {
        Ok(b) => Ok((sender, b.to_bytes())),
        Err(e) => Err(text(StatusCode::BAD_REQUEST, format!("body: {e}\n"))),
    }
}

/// `POST /rollouts/reports`: takes in a report another replica relayed.
async fn relayed_report(
    shared: &Shared,
    gate: &AdminGate,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    // Absent from an older replica's relays: its proxies count by node id, as then.
    let conn = req
        .headers()
        .get(super::forward::STREAM_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let (node, body) = match relayed(gate, req, super::forward::NODE_HEADER).await {
        Ok(parts) => parts,
        Err(refused) => return refused,
    };
    let report = match pb::Report::decode(body) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("not a report: {e}\n")),
    };
    if !shared.rollouts.is_leading() {
        // Never relayed on: two replicas that both think the other leads must not
        // pass a report back and forth.
        return text(
            StatusCode::CONFLICT,
            "this replica does not hold the lease\n".into(),
        );
    }
    match shared
        .reports
        .ingest(&node, &conn, &report, shared.clock.instant())
    {
        Ok(()) => {
            shared.judge_reports();
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Full::default())
                .expect("valid response")
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("malformed report: {e}\n")),
    }
}

/// `POST /rollouts/proxies`: takes in another replica's list of connected proxies,
/// and answers with the per-route proxy counts of the whole fleet.
async fn remote_proxies(
    shared: &Shared,
    gate: &AdminGate,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (replica, body) = match relayed(gate, req, super::forward::REPLICA_HEADER).await {
        Ok(parts) => parts,
        Err(refused) => return refused,
    };
    let list: Vec<super::forward::RemoteProxy> = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("not a list of proxies: {e}\n"),
            );
        }
    };
    if !shared.rollouts.is_leading() {
        return text(
            StatusCode::CONFLICT,
            "this replica does not hold the lease\n".into(),
        );
    }
    // A stream the replica says closed no longer stands for its node in the counts.
    let now = shared.clock.instant();
    for p in list.iter().filter(|p| !p.connected) {
        let conn = format!("{replica}/{}", p.stream);
        shared.reports.closed(&p.node_id, &conn, now);
    }
    shared
        .remote_proxies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(replica, (Instant::now(), list));
    // The answer is the whole fleet's count per route, for the follower's proxies.
    let fleet = shared.reports.counted_here(now);
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, super::forward::PROTOBUF)
        .body(Full::new(Bytes::from(fleet.encode_to_vec())))
        .expect("valid response")
}

/// Answers a `POST` under `/rollouts/`: a relayed report, another replica's list of
/// proxies, or a command by hand (relayed to the lease holder when this replica does
/// not hold the lease).
pub(crate) async fn post(
    shared: &Shared,
    gate: &AdminGate,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/rollouts/reports" => return relayed_report(shared, gate, req).await,
        "/rollouts/proxies" => return remote_proxies(shared, gate, req).await,
        _ => {}
    }
    if let Some(refused) = refusal(gate, &req) {
        return refused;
    }
    let path = req.uri().path().trim_end_matches('/');
    let is_command = path.split('/').skip(2).count() == 4;
    if !is_command || shared.rollouts.is_leading() {
        return route(shared, gate, &req);
    }
    if let Some(by) = req.headers().get(super::forward::RELAYED_HEADER) {
        return text(
            StatusCode::CONFLICT,
            format!(
                "relayed by {}, but this replica does not hold the lease either\n",
                String::from_utf8_lossy(by.as_bytes())
            ),
        );
    }
    match shared.forwarder.relay_command(path).await {
        Ok(answer) => {
            let mut resp = Response::builder().status(answer.status);
            if let Some(ct) = answer.content_type {
                resp = resp.header(hyper::header::CONTENT_TYPE, ct);
            }
            resp.body(Full::new(answer.body)).expect("valid response")
        }
        Err(e @ RelayError::NoHolder) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        Err(e @ RelayError::Unreachable { .. }) => text(StatusCode::BAD_GATEWAY, format!("{e}\n")),
    }
}

/// Answers a request under `/rollouts`.
pub(crate) fn route<B>(
    shared: &Shared,
    gate: &AdminGate,
    req: &Request<B>,
) -> Response<Full<Bytes>> {
    if let Some(refused) = refusal(gate, req) {
        return refused;
    }
    let path = req.uri().path().trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').skip(2).collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, []) => json(StatusCode::OK, &shared.rollouts.view()),
        (&Method::POST, [namespace, policy, route, command]) => {
            let Some(cmd) = Command::parse(command) else {
                return text(
                    StatusCode::NOT_FOUND,
                    format!("unknown command {command:?}: pause, resume, promote or abort\n"),
                );
            };
            let id = RolloutId {
                namespace: (*namespace).into(),
                policy: (*policy).into(),
                route: (*route).into(),
            };
            match shared.rollouts.command(&id, cmd) {
                Ok(t) => {
                    shared.republish();
                    json(StatusCode::OK, &serde_json::to_value(t).unwrap_or_default())
                }
                Err(e @ CommandError::NotFound(_)) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
                Err(e @ (CommandError::Refused(_) | CommandError::NotLeading)) => {
                    text(StatusCode::CONFLICT, format!("{e}\n"))
                }
            }
        }
        (_, []) => text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into()),
        (_, [_, _, _, _]) => text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec_pretty(value).unwrap_or_default(),
        )))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use tokio::sync::watch;

    use super::*;
    use crate::k8s::endpoints::ServiceEndpoints;
    use crate::rollout::forward::{
        NODE_HEADER, RELAYED_HEADER, REPLICA_HEADER, RemoteProxy, STREAM_HEADER,
    };
    use crate::source::PolicyDir;
    use crate::state::PolicySource;

    use crate::rollout::TEST_POLICY as POLICY;

    const BASE: &str = "/rollouts/shop/log/ingest";

    /// A control plane's state on the policy above and its admin port on 127.0.0.1
    /// under `gate`; the port stops when the sender is dropped.
    async fn admin(dir: &Path, gate: AdminGate) -> (Arc<Shared>, SocketAddr, watch::Sender<bool>) {
        std::fs::write(dir.join("log.yaml"), POLICY).expect("writes the policy");
        let source = PolicySource::Dir(
            PolicyDir::open(dir, None, sluice_config::Limits::default()).expect("opens the dir"),
        );
        let shared = Arc::new(Shared::new(source, ServiceEndpoints::default(), None, None));
        shared.reload();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("an address");
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(crate::admin::serve(listener, gate, shared.clone(), stopped));
        (shared, addr, stop)
    }

    fn open() -> AdminGate {
        AdminGate::new(SocketAddr::from(([127, 0, 0, 1], 0)), None)
    }

    /// One request; its status, `content-type` and body.
    async fn send(
        addr: SocketAddr,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (u16, String, String) {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).expect("a request");
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .expect("answered in time")
            .expect("answered");
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp.into_body().collect().await.expect("a body").to_bytes();
        (status, ctype, String::from_utf8_lossy(&body).into_owned())
    }

    fn phase(shared: &Shared) -> String {
        shared.rollouts.view()["rollouts"][0]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// `GET /rollouts` and the commands by hand, with each refusal's status.
    #[tokio::test]
    async fn commands_by_hand_and_their_refusals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (shared, addr, _stop) = admin(dir.path(), open()).await;
        let (code, ctype, body) = send(addr, Method::GET, "/rollouts", &[], "").await;
        assert_eq!((code, ctype.as_str()), (200, "application/json"));
        let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(view["rollouts"][0]["canaryWeight"], 10);
        assert_eq!(send(addr, Method::GET, "/rollouts/", &[], "").await.0, 200);

        let (code, ctype, body) = send(addr, Method::POST, &format!("{BASE}/pause"), &[], "").await;
        assert_eq!((code, ctype.as_str()), (200, "application/json"), "{body}");
        let t: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(t["result"], "paused");
        assert_eq!(phase(&shared), "paused");
        let (code, ctype, body) =
            send(addr, Method::POST, &format!("{BASE}/pause/"), &[], "").await;
        assert_eq!(
            (code, ctype.as_str(), body.as_str()),
            (409, "text/plain", "already paused\n")
        );
        let (code, _, body) = send(addr, Method::POST, &format!("{BASE}/jump"), &[], "").await;
        assert_eq!(code, 404);
        assert!(body.contains("unknown command \"jump\""), "{body}");
        let (code, _, body) =
            send(addr, Method::POST, "/rollouts/shop/log/nope/abort", &[], "").await;
        assert_eq!(
            (code, body.as_str()),
            (404, "no rollout on shop/log/nope\n")
        );
        let (code, _, body) = send(addr, Method::GET, &format!("{BASE}/abort"), &[], "").await;
        assert_eq!((code, body.as_str()), (405, "only POST\n"));
        let (code, _, body) = send(addr, Method::DELETE, "/rollouts", &[], "").await;
        assert_eq!((code, body.as_str()), (405, "only GET\n"));
        let (code, _, _) = send(addr, Method::GET, "/rollouts/shop/log", &[], "").await;
        assert_eq!(code, 404);
        let (code, _, _) = send(addr, Method::POST, "/rollouts/shop/log", &[], "").await;
        assert_eq!(code, 404);
        // The command's weights are published at once.
        send(addr, Method::POST, &format!("{BASE}/abort"), &[], "").await;
        let published = shared.snapshots.borrow().clone().expect("published");
        let version = &published.views.last().expect("a view").snapshot.version;
        let id = RolloutId {
            namespace: "shop".into(),
            policy: "log".into(),
            route: "ingest".into(),
        };
        assert_eq!(shared.rollouts.recorded_weight(version, &id), Some(0));
    }

    /// Beyond loopback every route under `/rollouts` wants the token: 401 with the
    /// challenge without it, 403 when none is configured.
    #[tokio::test]
    async fn beyond_loopback_the_token_is_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let beyond = SocketAddr::from(([0, 0, 0, 0], 0));
        let (shared, addr, _stop) =
            admin(dir.path(), AdminGate::new(beyond, Some("t0k".into()))).await;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        for (method, path) in [
            (Method::GET, "/rollouts".to_string()),
            (Method::POST, format!("{BASE}/pause")),
            (Method::POST, "/rollouts/reports".to_string()),
            (Method::POST, "/rollouts/proxies".to_string()),
        ] {
            let req = Request::builder()
                .method(method)
                .uri(format!("http://{addr}{path}"))
                .header(NODE_HEADER, "n")
                .header(REPLICA_HEADER, "r")
                .body(Full::default())
                .expect("a request");
            let resp = client.request(req).await.expect("answered");
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
            // Both challenges, as on the admin port's other routes: a browser opening
            // `/rollouts` first asks for the token too.
            let challenges: Vec<&[u8]> = resp
                .headers()
                .get_all(hyper::header::WWW_AUTHENTICATE)
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            assert_eq!(
                challenges,
                [
                    sluice_api::admin_gate::CHALLENGE.as_bytes(),
                    sluice_api::admin_gate::BASIC_CHALLENGE.as_bytes()
                ],
                "{path}"
            );
        }
        assert_eq!(phase(&shared), "progressing");
        let auth = [("authorization", "Bearer t0k")];
        let (code, _, _) = send(addr, Method::POST, &format!("{BASE}/pause"), &auth, "").await;
        assert_eq!(code, 200);

        let dir = tempfile::tempdir().expect("tempdir");
        let (_, addr, _stop) = admin(dir.path(), AdminGate::new(beyond, None)).await;
        let (code, _, body) = send(addr, Method::GET, "/rollouts", &[], "").await;
        assert_eq!(code, 403, "{body}");
    }

    fn report(entry: pb::BackendCounts) -> Vec<u8> {
        pb::Report {
            seq: 1,
            interval_ms: 1000,
            entries: vec![entry],
            ..pb::Report::default()
        }
        .encode_to_vec()
    }

    /// A relayed report: refused without its proxy's name, as not a report, when
    /// malformed or too large, and on a replica that does not hold the lease; taken
    /// in (and judged at once) otherwise.
    #[tokio::test]
    async fn relayed_reports_are_checked_then_judged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (shared, addr, _stop) = admin(dir.path(), open()).await;
        let path = "/rollouts/reports";
        let node = [(NODE_HEADER, "proxy-1")];
        // No namespace, as from a proxy that predates it: the one rollout of that name.
        let failing = pb::BackendCounts {
            policy: "log".into(),
            route: "ingest".into(),
            backend: "v2".into(),
            requests: 20,
            server_errors: 20,
            ..pb::BackendCounts::default()
        };
        let (code, _, body) = send(addr, Method::POST, path, &[], report(failing.clone())).await;
        assert_eq!((code, body.as_str()), (400, "missing x-sluice-node\n"));
        let (code, _, _) = send(
            addr,
            Method::POST,
            path,
            &[(NODE_HEADER, "")],
            report(failing.clone()),
        )
        .await;
        assert_eq!(code, 400);
        let (code, _, body) = send(addr, Method::POST, path, &node, vec![0x08]).await;
        assert_eq!(code, 400);
        assert!(body.starts_with("not a report: "), "{body}");
        let nameless = pb::BackendCounts {
            backend: String::new(),
            ..failing.clone()
        };
        let (code, _, body) = send(addr, Method::POST, path, &node, report(nameless)).await;
        assert_eq!(code, 400);
        assert!(body.starts_with("malformed report: "), "{body}");
        let huge = vec![0u8; MAX_REPORT_BYTES + 1];
        let (code, _, body) = send(addr, Method::POST, path, &node, huge).await;
        assert_eq!(code, 400);
        assert!(body.starts_with("body: "), "{body}");
        assert_eq!(phase(&shared), "progressing");

        shared.rollouts.set_leading(false);
        let (code, _, _) = send(addr, Method::POST, path, &node, report(failing.clone())).await;
        assert_eq!(code, 409);
        assert_eq!(phase(&shared), "progressing");
        shared.rollouts.set_leading(true);
        let (code, _, body) = send(addr, Method::POST, path, &node, report(failing)).await;
        assert_eq!((code, body.as_str()), (204, ""));
        assert_eq!(phase(&shared), "rolled-back");
    }

    /// Another replica's list of proxies: refused without its name, when not a list,
    /// and on a replica that does not hold the lease; kept otherwise. A list from an
    /// older replica, without streams or times, reads as open streams.
    #[tokio::test]
    async fn another_replicas_proxies_are_kept_by_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (shared, addr, _stop) = admin(dir.path(), open()).await;
        let path = "/rollouts/proxies";
        let list = br#"[{"nodeId":"p1","ackedVersion":"v1","nackedVersion":null}]"#.to_vec();
        let replica = [(REPLICA_HEADER, "cp-b")];
        let (code, _, body) = send(addr, Method::POST, path, &[], list.clone()).await;
        assert_eq!((code, body.as_str()), (400, "missing x-sluice-replica\n"));
        let (code, _, body) = send(addr, Method::POST, path, &replica, "{}").await;
        assert_eq!(code, 400);
        assert!(body.starts_with("not a list of proxies: "), "{body}");
        shared.rollouts.set_leading(false);
        let (code, _, _) = send(addr, Method::POST, path, &replica, list.clone()).await;
        assert_eq!(code, 409);
        let kept = || {
            shared
                .remote_proxies
                .lock()
                .unwrap()
                .get("cp-b")
                .map(|(_, l)| l.clone())
        };
        assert_eq!(kept(), None);
        shared.rollouts.set_leading(true);
        let (code, _, _) = send(addr, Method::POST, path, &replica, list).await;
        assert_eq!(code, 200);
        assert_eq!(
            kept(),
            Some(vec![RemoteProxy {
                node_id: "p1".into(),
                acked_version: Some("v1".into()),
                connected: true,
                ..Default::default()
            }])
        );
    }

    /// Reports relayed from three streams of one node id count as three proxies; a stream
    /// the relaying replica then lists as closed stands down for the ones still open
    /// (and only that one: the open ones keep counting),
    /// and the holder answers the list with its count.
    #[tokio::test]
    async fn relayed_reports_count_by_stream_until_their_replica_lists_them_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (shared, addr, _stop) = admin(dir.path(), open()).await;
        let healthy = pb::BackendCounts {
            namespace: "shop".into(),
            policy: "log".into(),
            route: "ingest".into(),
            backend: "v1".into(),
            requests: 5,
            ..pb::BackendCounts::default()
        };
        for stream in ["cp-b/1", "cp-b/2", "cp-b/3"] {
            let headers = [(NODE_HEADER, "twin"), (STREAM_HEADER, stream)];
            let (code, _, body) = send(
                addr,
                Method::POST,
                "/rollouts/reports",
                &headers,
                report(healthy.clone()),
            )
            .await;
            assert_eq!((code, body.as_str()), (204, ""));
        }
        let count = || {
            shared
                .reports
                .proxies_with_traffic("shop", "log", "ingest", shared.clock.instant())
        };
        assert_eq!(count(), 3, "one node id, three proxies");

        let rows = |stream: u64, connected: bool| RemoteProxy {
            node_id: "twin".into(),
            stream,
            connected,
            disconnected_at_unix_ms: (!connected).then_some(1),
            ..Default::default()
        };
        let list =
            serde_json::to_vec(&[rows(1, false), rows(2, true), rows(3, true)]).expect("JSON");
        let replica = [(REPLICA_HEADER, "cp-b")];
        let (code, ctype, body) =
            send(addr, Method::POST, "/rollouts/proxies", &replica, list).await;
        assert_eq!(
            (code, ctype.as_str()),
            (200, crate::rollout::forward::PROTOBUF)
        );
        assert_eq!(
            count(),
            2,
            "the closed stream's twins stand for it; open streams stay"
        );
        // The answer is the holder's count, for the replica's own proxies.
        let counts = pb::RouteTraffic::decode(body.as_bytes()).expect("protobuf");
        assert_eq!(
            counts.routes,
            [pb::RouteProxies {
                namespace: "shop".into(),
                policy: "log".into(),
                route: "ingest".into(),
                proxies: 2,
            }]
        );
    }

    /// A command sent to a replica that does not hold the lease: 503 while no holder
    /// is known, 502 when the holder does not answer, 409 when it was itself relayed;
    /// `GET /rollouts` is answered here.
    #[tokio::test]
    async fn a_follower_relays_commands_or_says_why_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (shared, addr, _stop) = admin(dir.path(), open()).await;
        shared.rollouts.set_leading(false);
        let pause = format!("{BASE}/pause");
        let (code, _, body) = send(addr, Method::POST, &pause, &[], "").await;
        assert_eq!(code, 503, "{body}");
        let (code, _, body) =
            send(addr, Method::POST, &pause, &[(RELAYED_HEADER, "cp-a")], "").await;
        assert_eq!(
            (code, body.as_str()),
            (
                409,
                "relayed by cp-a, but this replica does not hold the lease either\n"
            )
        );
        assert_eq!(send(addr, Method::GET, "/rollouts", &[], "").await.0, 200);

        // A holder that is gone: a port bound and closed again.
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
            l.local_addr().expect("an address")
        };
        let (_holder, holder_rx) = watch::channel(Some(format!("http://{gone}")));
        let (_stop_fwd, stop_rx) = watch::channel(false);
        let fwd = shared.clone();
        tokio::spawn(async move {
            fwd.forwarder
                .run(holder_rx, None, "cp-b".into(), Vec::new, |_| {}, stop_rx)
                .await;
        });
        let relayed = async {
            loop {
                let (code, _, body) = send(addr, Method::POST, &pause, &[], "").await;
                if code != 503 {
                    return (code, body);
                }
                tokio::task::yield_now().await;
            }
        };
        let (code, body) = tokio::time::timeout(Duration::from_secs(10), relayed)
            .await
            .expect("the forwarder started");
        assert_eq!(code, 502, "{body}");
        assert!(body.contains(&gone.to_string()), "{body}");
        assert_eq!(phase(&shared), "progressing");
    }
}
