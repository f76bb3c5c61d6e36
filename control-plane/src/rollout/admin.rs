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
//!   the lease and the versions they acked (JSON); 204, or 409 as above.
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
use crate::state::Shared;

/// Most bytes of a relayed report (a proxy's report is bounded well below).
const MAX_REPORT_BYTES: usize = 1 << 20;

/// The refusal when the request passes neither the loopback nor the token rule.
fn refusal<B>(gate: &AdminGate, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let refusal = gate.check(auth).err()?;
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::FORBIDDEN);
    let mut resp = text(status, refusal.message().to_string());
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static(sluice_api::admin_gate::CHALLENGE),
        );
    }
    Some(resp)
}

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
        .ingest(&node, &report, shared.clock.instant())
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

/// `POST /rollouts/proxies`: takes in another replica's list of connected proxies.
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
    shared
        .remote_proxies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(replica, (Instant::now(), list));
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Full::default())
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
