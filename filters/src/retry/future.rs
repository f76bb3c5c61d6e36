use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::BoxError;
use tower_service::Service;

use super::tries::{Rest, RetryLoop};
use crate::extensions::{BodyProgress, poll_due};
use crate::replay::ReplayBody;
use crate::{AtBackend, FilterError};

pin_project! {
    /// Response future of [`Retry`](super::Retry): the inner future itself when the
    /// request cannot be retried; the first try, unboxed, with what a retry would need;
    /// the boxed retry loop once the first try failed in a way worth retrying.
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
        Direct {
            #[pin]
            fut: S::Future,
            // The route's total timeout, when this layer enforces it.
            #[pin]
            total: Option<Sleep>,
            after: Duration,
            // Where the request went, named in the timeout (only with a total).
            backend: Option<Arc<str>>,
            // The request body still arriving, and when the total started (only with a total).
            body: Option<BodyProgress>,
            start: Option<Instant>,
        },
        First {
            #[pin]
            fut: S::Future,
            #[pin]
            per_try: Option<Sleep>,
            // Boxed: what a retry would need (the kept head, the body's source, the
            // deadlines) would otherwise be copied with this future at every layer
            // above that moves it.
            rest: Option<Box<Rest<S, B>>>,
        },
        Retrying { fut: RetryLoop<Response<RB>> },
    }
}

impl<S, B, RB> ResponseFuture<S, B, RB>
where
    S: Service<Request<ReplayBody<B>>>,
{
    pub(crate) fn direct(
        fut: S::Future,
        total: Option<(Sleep, Duration, Arc<str>, Option<BodyProgress>)>,
    ) -> Self {
        let (total, after, backend, body, start) = match total {
            Some((s, d, b, body)) => {
                let start = s.deadline() - d;
                (Some(s), d, Some(b), body, Some(start))
            }
            None => (None, Duration::ZERO, None, None, None),
        };
        Self {
            kind: Kind::Direct {
                fut,
                total,
                after,
                backend,
                body,
                start,
            },
        }
    }

    pub(crate) fn first(fut: S::Future, per_try: Option<Sleep>, rest: Rest<S, B>) -> Self {
        Self {
            kind: Kind::First {
                fut,
                per_try,
                rest: Some(Box::new(rest)),
            },
        }
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B, RB>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
    RB: Send + 'static,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let next = match self.as_mut().project().kind.project() {
            KindProj::Direct {
                fut,
                total,
                after,
                backend,
                body,
                start,
            } => {
                // The response goes first so that one ready at the deadline wins.
                if let Poll::Ready(res) = fut.poll(cx) {
                    return Poll::Ready(res.map_err(Into::into));
                }
                if let (Some(sleep), Some(start)) = (total.as_pin_mut(), *start) {
                    ready!(poll_due(sleep, cx, body.as_ref(), start, *after));
                    let timeout = FilterError::Timeout(*after);
                    return Poll::Ready(Err(match backend.take() {
                        Some(b) => AtBackend::wrap(b, timeout),
                        None => timeout.into(),
                    }));
                }
                return Poll::Pending;
            }
            KindProj::Retrying { fut } => return fut.as_mut().poll(cx),
            KindProj::First { fut, per_try, rest } => {
                // The response goes first so that one ready at the deadline wins.
                let res = match fut.poll(cx) {
                    Poll::Ready(res) => res.map_err(Into::into),
                    Poll::Pending => match per_try.as_pin_mut().map(|s| {
                        rest.as_ref()
                            .expect("polled after completion")
                            .poll_timer(s, cx)
                    }) {
                        Some(Poll::Ready(total_due)) => {
                            let rest = rest.as_ref().expect("polled after completion");
                            if let Some(total) = total_due {
                                // The whole request is over: no retry, as when a layer
                                // above dropped this future.
                                return Poll::Ready(Err(AtBackend::wrap(
                                    rest.backend.clone(),
                                    FilterError::Timeout(total),
                                )));
                            }
                            Err(AtBackend::wrap(
                                rest.backend.clone(),
                                FilterError::Timeout(rest.per_try_timeout()),
                            ))
                        }
                        _ => return Poll::Pending,
                    },
                };
                match rest
                    .take()
                    .expect("polled after completion")
                    .after_first(res)
                {
                    Ok(done) => return Poll::Ready(done),
                    Err(retrying) => retrying,
                }
            }
        };
        self.as_mut()
            .project()
            .kind
            .set(Kind::Retrying { fut: next });
        match self.project().kind.project() {
            KindProj::Retrying { fut } => fut.as_mut().poll(cx),
            _ => unreachable!("just set"),
        }
    }
}
