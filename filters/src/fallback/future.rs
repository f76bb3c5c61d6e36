use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{BoxError, ServiceExt};
use tower_service::Service;

use super::{FallbackAction, FallbackObserver, FallbackParams};
use crate::extensions::{BodyProgress, Routing, poll_due, within};
use crate::reason::{DEGRADED_HEADER, Reason};
use crate::replay::{BodySource, Reclaim, ReplayBody};
use crate::{AtBackend, FilterError};

/// How long the fallback waits for the primary's try to hand the request body back
/// (a connection may still hold it for a moment after failing).
const BODY_RECLAIM_WAIT: Duration = Duration::from_millis(50);

type Answer<RB> = Result<Response<Either<RB, Full<Bytes>>>, BoxError>;

/// The boxed request to a fallback backend: the slow path.
type ToBackend<RB> = Pin<Box<dyn Future<Output = Answer<RB>> + Send>>;

pin_project! {
    /// Response future of [`Fallback`](super::Fallback): the primary's call, unboxed;
    /// the boxed call to the fallback backend once the primary failed for a listed reason.
    pub struct ResponseFuture<S, B, RB>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        #[pin]
        kind: Kind<S, B, RB>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, B, RB>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        Primary {
            #[pin]
            fut: S::Future,
            // The route's total timeout, when this layer enforces it.
            #[pin]
            total: Option<Sleep>,
            rest: Option<Rest<S, B>>,
        },
        ToBackend { fut: ToBackend<RB> },
    }
}

/// What the fallback needs once the primary has failed.
pub(crate) struct Rest<S, B> {
    /// The inner stack, for the fallback backend (only with a `backend` fallback).
    pub(super) svc: Option<S>,
    pub(super) params: Arc<FallbackParams>,
    pub(super) route: Arc<str>,
    pub(super) observer: Arc<dyn FallbackObserver>,
    /// The backend the split chose.
    pub(super) primary: Arc<str>,
    pub(super) grpc: bool,
    /// The head as it came, for the fallback backend.
    pub(super) head: Option<http::request::Parts>,
    pub(super) source: Option<BodySource<B>>,
    /// The route's total timeout, when this layer enforces it: when it started, and
    /// after how long it ends (once the request body is in).
    pub(super) total: Option<(Instant, Duration)>,
    /// The request body still arriving: the total starts once it is in.
    pub(super) body: Option<BodyProgress>,
}

impl<S, B, RB> ResponseFuture<S, B, RB>
where
    S: Service<Request<ReplayBody<B>>>,
{
    pub(crate) fn first(fut: S::Future, rest: Rest<S, B>) -> Self {
        Self {
            kind: Kind::Primary {
                fut,
                total: rest
                    .total
                    .map(|(start, after)| tokio::time::sleep_until(start + after)),
                rest: Some(rest),
            },
        }
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B, RB>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
    RB: Send + 'static,
{
    type Output = Answer<RB>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let next = match self.as_mut().project().kind.project() {
            KindProj::ToBackend { fut } => return fut.as_mut().poll(cx),
            KindProj::Primary { fut, total, rest } => {
                // The response goes first so that one ready at the deadline wins.
                let err: BoxError = match fut.poll(cx) {
                    Poll::Ready(Ok(resp)) => return Poll::Ready(Ok(resp.map(Either::Left))),
                    Poll::Ready(Err(e)) => e.into(),
                    Poll::Pending => {
                        let r = rest.as_ref().expect("polled after completion");
                        if let (Some(sleep), Some((start, after))) = (total.as_pin_mut(), r.total) {
                            ready!(poll_due(sleep, cx, r.body.as_ref(), start, after));
                            // The whole request is over, fallback included: counted
                            // against the primary, which had it.
                            let rest = rest.take().expect("polled after completion");
                            return Poll::Ready(Err(AtBackend::wrap(
                                rest.primary.clone(),
                                FilterError::Timeout(after),
                            )));
                        }
                        return Poll::Pending;
                    }
                };
                let rest = rest.take().expect("polled after completion");
                let Some(reason) = rest.params.fires_on(&*err) else {
                    return Poll::Ready(Err(err));
                };
                match rest.params.action() {
                    FallbackAction::Response(r) => {
                        rest.answered(reason);
                        return Poll::Ready(Ok(r.answer(rest.grpc, reason)));
                    }
                    FallbackAction::Backend(b) => match rest.total {
                        None => Box::pin(rest.send_to_backend(err, reason)) as ToBackend<RB>,
                        // The fallback backend gets what is left of the route's time;
                        // running out is counted against it, which had the request.
                        Some((start, after)) => {
                            let name = b.name.clone();
                            let body = rest.body.clone();
                            let tries = rest.send_to_backend(err, reason);
                            Box::pin(async move {
                                match within(tries, body.as_ref(), start, after).await {
                                    Ok(answer) => answer,
                                    Err(()) => {
                                        Err(AtBackend::wrap(name, FilterError::Timeout(after)))
                                    }
                                }
                            })
                        }
                    },
                }
            }
        };
        self.as_mut()
            .project()
            .kind
            .set(Kind::ToBackend { fut: next });
        match self.project().kind.project() {
            KindProj::ToBackend { fut } => fut.as_mut().poll(cx),
            KindProj::Primary { .. } => unreachable!("just set"),
        }
    }
}

impl<S, B> Rest<S, B> {
    fn answered(&self, reason: Reason) {
        self.observer
            .on_fallback(&self.route, &self.primary, reason);
        tracing::debug!(route = %self.route, backend = %self.primary, %reason, "fallback answered");
    }
}

impl<S, B> Rest<S, B>
where
    S: Service<Request<ReplayBody<B>>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// The slow path: the request once more, to the fallback backend. Its answer or its
    /// own error is final.
    async fn send_to_backend<RB>(mut self, primary_err: BoxError, reason: Reason) -> Answer<RB>
    where
        S: Service<Request<ReplayBody<B>>, Response = Response<RB>>,
    {
        let FallbackAction::Backend(backend) = self.params.action() else {
            return Err(primary_err);
        };
        let (Some(svc), Some(mut head), Some(mut source)) =
            (self.svc.take(), self.head.take(), self.source.take())
        else {
            return Err(primary_err);
        };
        if source.reclaim_within(BODY_RECLAIM_WAIT).await != Reclaim::Ready {
            tracing::debug!(
                route = %self.route,
                fallback = %backend.name,
                "request body not kept for replay: not sent to the fallback backend"
            );
            return Err(primary_err);
        }
        drop(primary_err);
        Routing::of_mut(&mut head.extensions).backend = Some(backend.clone());
        let req = Request::from_parts(head, source.next());
        let mut resp = svc.oneshot(req).await.map_err(Into::into)?;
        resp.headers_mut()
            .insert(DEGRADED_HEADER, HeaderValue::from_static(reason.as_str()));
        self.answered(reason);
        Ok(resp.map(Either::Left))
    }
}
