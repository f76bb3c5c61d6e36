//! The rollouts on the control plane's admin port.
//!
//! - `GET /rollouts`: every rollout: step, effective weights, each check's value,
//!   threshold, bound and sample size for the open and the last judged window, the
//!   decision and why, the history, and the proxies left out of the step's acks.
//! - `POST /rollouts/<namespace>/<policy>/<route>/{pause,resume,promote,abort}`:
//!   a command by hand; 200 with the transition, 404 for no such rollout, 409 when
//!   its state does not allow it.
//!
//! Both answer under the admin port's token rule ([`AdminGate`]): on loopback, or
//! with the admin token.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use sluice_api::AdminGate;

use super::driver::{CommandError, RolloutId};
use super::engine::Command;
use crate::state::Shared;

/// Answers a request under `/rollouts`.
pub(crate) fn route<B>(
    shared: &Shared,
    gate: &AdminGate,
    req: &Request<B>,
) -> Response<Full<Bytes>> {
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if let Err(refusal) = gate.check(auth) {
        let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::FORBIDDEN);
        let mut resp = text(status, refusal.message().to_string());
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static(sluice_api::admin_gate::CHALLENGE),
            );
        }
        return resp;
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
                Err(e @ CommandError::Refused(_)) => text(StatusCode::CONFLICT, format!("{e}\n")),
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
