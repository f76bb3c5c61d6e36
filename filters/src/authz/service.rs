use std::task::{Context, Poll};

use tower::BoxError;
use tower_service::Service;

use super::{AllowList, ResponseFuture};
use crate::FilterError;
use crate::extensions::PeerIdentity;

/// Passes allowed requests to the inner service, refuses the others with
/// [`FilterError::Forbidden`] without calling it.
#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    allow: AllowList,
}

impl<S> Authz<S> {
    /// Wraps `inner`, enforcing `allow`.
    pub fn new(inner: S, allow: AllowList) -> Self {
        Self { inner, allow }
    }
}

impl<S, B> Service<http::Request<B>> for Authz<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<PeerIdentity>().map(|p| &*p.0);
        if self.allow.permits(peer) {
            ResponseFuture::inner(self.inner.call(req))
        } else {
            tracing::debug!(peer = ?peer, "peer not in inbound.allow");
            ResponseFuture::refused(FilterError::Forbidden(peer.map(str::to_string)))
        }
    }
}
