use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
use tower::BoxError;
use tower_service::Service;

use super::future::{ResponseFuture, Rest};
use super::{FallbackAction, FallbackObserver, FallbackParams};
use crate::classify::is_grpc;
use crate::extensions::Routing;
use crate::replay::{BodySource, ReplayBody, known_len};

/// Sends a request to the primary (the inner stack, as the split chose) and, when that
/// fails for a listed reason, answers with the route's fallback.
///
/// Sends `Request<ReplayBody<B>>` below and answers `Response<Either<RB, Full<Bytes>>>`:
/// the inner response (the primary's or the fallback backend's), or a static one. The
/// first try runs unboxed; only a request going to a fallback backend is boxed.
#[derive(Clone)]
pub struct Fallback<S> {
    inner: S,
    params: Arc<FallbackParams>,
    route: Arc<str>,
    observer: Arc<dyn FallbackObserver>,
    total: Option<Duration>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Fallback<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback")
            .field("inner", &self.inner)
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl<S> Fallback<S> {
    /// Wraps `inner` with `route`'s fallback.
    pub fn new(
        inner: S,
        params: Arc<FallbackParams>,
        route: Arc<str>,
        observer: Arc<dyn FallbackObserver>,
    ) -> Self {
        Self {
            inner,
            params,
            route,
            observer,
            total: None,
        }
    }

    /// Also enforces the route's total timeout (see [`FallbackLayer::with_total`](super::FallbackLayer::with_total)).
    pub fn with_total(mut self, total: Option<Duration>) -> Self {
        self.total = total;
        self
    }
}

impl<S, B, RB> Service<Request<B>> for Fallback<S>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
    RB: Send + 'static,
{
    type Response = Response<Either<RB, Full<Bytes>>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let primary =
            Routing::backend(req.extensions()).map_or_else(|| Arc::from(""), |s| s.name.clone());
        let grpc = is_grpc(req.headers());
        let total_body = self
            .total
            .and_then(|_| Routing::of(req.extensions())?.body.clone());
        let (req, head, source) = match self.params.action() {
            // A static answer needs nothing of the request.
            FallbackAction::Response(_) => (req.map(ReplayBody::passthrough), None, None),
            FallbackAction::Backend(_) => {
                let cap = self.params.max_replay_bytes();
                let keep = known_len(&req) <= cap;
                let (parts, body) = req.into_parts();
                let (body, source) = BodySource::first(body, keep, cap);
                let head = parts.clone();
                (Request::from_parts(parts, body), Some(head), Some(source))
            }
        };
        let fut = self.inner.call(req);
        ResponseFuture::first(
            fut,
            Rest {
                svc: head.is_some().then(|| self.inner.clone()),
                params: self.params.clone(),
                route: self.route.clone(),
                observer: self.observer.clone(),
                primary,
                grpc,
                head,
                source,
                total: self.total.map(|d| (crate::clock::now(), d)),
                body: total_body,
            },
        )
    }
}
