//! The body type that flows through the route stacks.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

/// Errors between layers are boxed, as tower does, so layer error types do not nest.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request and response body inside the proxy: streams, never buffered by the proxy itself.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

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
