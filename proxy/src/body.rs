//! The body type that flows through the route stacks, and synthetic responses.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

/// Errors between layers are boxed, as tower does, so layer error types do not nest.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request and response body inside the proxy: streams, never buffered by the proxy itself.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Header naming why the proxy answered instead of the upstream.
pub const REASON_HEADER: &str = "x-sluice-reason";

/// Boxes any body into [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    boxed(Full::new(bytes.into()))
}

/// An empty body.
pub fn empty() -> Body {
    boxed(http_body_util::Empty::new())
}

/// A short plain-text answer from the proxy itself, labelled with `x-sluice-reason`.
pub fn synthetic(
    status: StatusCode,
    reason: &'static str,
    text: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(REASON_HEADER, HeaderValue::from_static(reason));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
