//! The admin port's answer to a request its token rule ([`AdminGate`]) refuses, shared
//! by every protected route (`/rollouts` included), so all refuse alike.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use sluice_api::AdminGate;

/// The refusal of `req` by `gate` as an answer (401 with both challenges, or 403), or
/// `None` when the request may pass.
pub(crate) fn refusal<B>(gate: &AdminGate, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    let auth = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    let refusal = gate.check(auth).err()?;
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::FORBIDDEN);
    let mut resp = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from_static(refusal.message().as_bytes())))
        .expect("valid response");
    for challenge in refusal.challenges() {
        resp.headers_mut()
            .append(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    }
    Some(resp)
}
