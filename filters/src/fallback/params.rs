use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::{Either, Full};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use sluice_config::FallbackOn;

use crate::FilterError;
use crate::classify::{ErrorClass, classify_error};
use crate::extensions::SelectedBackend;
use crate::reason::{DEGRADED_HEADER, Reason};

/// Why a route's `fallback` could not be turned into [`FallbackParams`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FallbackConfigError {
    /// `backend` names a backend the policy does not define.
    #[error("fallback names unknown backend {0:?}")]
    UnknownBackend(String),
    /// A status, header or gRPC message of the static response is not valid HTTP.
    #[error("fallback response {0} is not valid")]
    BadResponse(&'static str),
    /// Neither `backend` nor `response`.
    #[error("fallback has neither backend nor response")]
    Empty,
}

/// What answers once the primary failed.
#[derive(Clone, Debug)]
pub enum FallbackAction {
    /// Send the request to this backend instead.
    Backend(SelectedBackend),
    /// Answer with this.
    Response(StaticResponse),
}

/// A static fallback answer, built once per swap.
#[derive(Clone, Debug)]
pub struct StaticResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// `grpc-status` and the percent-encoded `grpc-message`, for gRPC callers.
    grpc: Option<(HeaderValue, Option<HeaderValue>)>,
}

/// `grpc-message` is percent-encoded: everything outside printable ASCII, and `%`.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

impl StaticResponse {
    fn from_config(r: &sluice_config::FallbackResponse) -> Result<Self, FallbackConfigError> {
        let status = StatusCode::from_u16(r.status)
            .map_err(|_| FallbackConfigError::BadResponse("status"))?;
        let mut headers = HeaderMap::with_capacity(r.headers.len());
        for (name, value) in &r.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| FallbackConfigError::BadResponse("header name"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| FallbackConfigError::BadResponse("header value"))?;
            headers.append(name, value);
        }
        let grpc = match r.grpc_status {
            Some(code) => {
                let message = r
                    .grpc_message
                    .as_deref()
                    .map(|m| {
                        HeaderValue::from_str(&utf8_percent_encode(m, GRPC_MESSAGE).to_string())
                            .map_err(|_| FallbackConfigError::BadResponse("grpcMessage"))
                    })
                    .transpose()?;
                Some((HeaderValue::from(code), message))
            }
            None => None,
        };
        Ok(Self {
            status,
            headers,
            body: Bytes::from(r.body.clone().unwrap_or_default()),
            grpc,
        })
    }

    /// The answer, marked with `reason`. A gRPC caller gets a trailers-only gRPC status
    /// (HTTP 200, `grpc-status` and `grpc-message` in the headers) when `grpcStatus` is set.
    pub fn answer<B>(&self, grpc: bool, reason: Reason) -> Response<Either<B, Full<Bytes>>> {
        let mut resp = match (&self.grpc, grpc) {
            (Some((status, message)), true) => {
                let mut resp = Response::new(Full::new(Bytes::new()));
                let h = resp.headers_mut();
                h.clone_from(&self.headers);
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                h.insert("grpc-status", status.clone());
                if let Some(m) = message {
                    h.insert("grpc-message", m.clone());
                }
                resp
            }
            _ => {
                let mut resp = Response::new(Full::new(self.body.clone()));
                *resp.status_mut() = self.status;
                resp.headers_mut().clone_from(&self.headers);
                resp
            }
        };
        resp.headers_mut()
            .insert(DEGRADED_HEADER, HeaderValue::from_static(reason.as_str()));
        resp.map(Either::Right)
    }
}

/// A route's fallback, built from the policy once per swap.
#[derive(Clone, Debug)]
pub struct FallbackParams {
    /// Whether it answers each reason of `REASONS`.
    on: [bool; 4],
    action: FallbackAction,
    max_replay_bytes: u64,
}

/// The reasons a fallback may answer, in the order of `FallbackParams::on`.
const REASONS: [Reason; 4] = [
    Reason::BreakerOpen,
    Reason::NoHealthyEndpoint,
    Reason::UpstreamUnavailable,
    Reason::Timeout,
];

impl FallbackParams {
    /// Builds a route's `fallback`. `backends` are the policy's backend names in file order
    /// (they fix the fallback backend's index); `max_replay_bytes` is how much request
    /// body is kept for the fallback backend (the route's `retry.maxReplayBytes`).
    pub fn from_config<'a>(
        f: &sluice_config::Fallback,
        backends: impl IntoIterator<Item = &'a str>,
        max_replay_bytes: u64,
    ) -> Result<Self, FallbackConfigError> {
        let mut on = [false; 4];
        for o in &f.on {
            let r = match o {
                FallbackOn::BreakerOpen => Reason::BreakerOpen,
                FallbackOn::NoHealthyEndpoint => Reason::NoHealthyEndpoint,
                FallbackOn::UpstreamUnavailable => Reason::UpstreamUnavailable,
                FallbackOn::Timeout => Reason::Timeout,
            };
            on[REASONS.iter().position(|x| *x == r).unwrap_or_default()] = true;
        }
        let action = match (&f.backend, &f.response) {
            (Some(name), _) => {
                let index = backends
                    .into_iter()
                    .position(|b| b == name)
                    .ok_or_else(|| FallbackConfigError::UnknownBackend(name.clone()))?;
                FallbackAction::Backend(SelectedBackend {
                    name: name.as_str().into(),
                    index,
                })
            }
            (None, Some(r)) => FallbackAction::Response(StaticResponse::from_config(r)?),
            (None, None) => return Err(FallbackConfigError::Empty),
        };
        Ok(Self {
            on,
            action,
            max_replay_bytes,
        })
    }

    /// What answers instead.
    pub fn action(&self) -> &FallbackAction {
        &self.action
    }

    /// Largest request body kept for the fallback backend.
    pub fn max_replay_bytes(&self) -> u64 {
        self.max_replay_bytes
    }

    /// The reason of a primary's failure when `on` lists it, else `None` (the error
    /// stands). The reason is the one the proxy's answer to `err` would carry.
    pub fn fires_on(&self, err: &(dyn std::error::Error + 'static)) -> Option<Reason> {
        let reason = match classify_error(err) {
            ErrorClass::BreakerOpen => Reason::BreakerOpen,
            ErrorClass::Timeout => Reason::Timeout,
            ErrorClass::ConnectFailure => match crate::find_filter_error(err) {
                Some(FilterError::NoHealthyEndpoint(_)) => Reason::NoHealthyEndpoint,
                _ => Reason::UpstreamUnavailable,
            },
            ErrorClass::Unready | ErrorClass::RefusedStream | ErrorClass::Reset => {
                Reason::UpstreamUnavailable
            }
            ErrorClass::Other => return None,
        };
        let i = REASONS.iter().position(|r| *r == reason)?;
        self.on[i].then_some(reason)
    }
}
