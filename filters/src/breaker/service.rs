use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use tower::BoxError;
use tower_service::Service;

use super::circuit::Circuit;
use super::future::{ResponseBody, ResponseFuture};
use crate::extensions::Routing;

/// Which breaker a request feeds.
#[derive(Clone, Debug)]
pub(crate) enum Circuits {
    /// A stack built for one route × backend.
    One(Arc<Circuit>),
    /// A route-level stack: the breaker of the backend named by the request's
    /// [`SelectedBackend`](crate::extensions::SelectedBackend) index (`None` entries and requests without it pass).
    PerBackend(Arc<[Option<Arc<Circuit>>]>),
}

impl Circuits {
    fn pick<B>(&self, req: &Request<B>) -> Option<&Arc<Circuit>> {
        match self {
            Circuits::One(c) => Some(c),
            Circuits::PerBackend(all) => {
                let i = Routing::backend(req.extensions())?.index;
                all.get(i)?.as_ref()
            }
        }
    }
}

/// A circuit breaker in front of a backend's stack.
///
/// Open: answers `FilterError::BreakerOpen` at once without calling the inner
/// service. Responses come back with their body wrapped in [`ResponseBody`], which
/// reports a gRPC status found in trailers when the body ends.
///
/// Built for one route × backend ([`BreakerLayer::new`](super::BreakerLayer::new)),
/// while the breaker refuses everything `poll_ready` is ready at once without
/// polling the inner service, so an open breaker in front of a backend that is never
/// ready (no endpoints) still fails fast.
#[derive(Debug)]
pub struct Breaker<S> {
    inner: S,
    circuits: Circuits,
    /// Whether the inner service was polled ready for the next call.
    inner_ready: bool,
}

impl<S: Clone> Clone for Breaker<S> {
    fn clone(&self) -> Self {
        // A clone has not been polled ready.
        Self::with_circuits(self.inner.clone(), self.circuits.clone())
    }
}

impl<S> Breaker<S> {
    pub(crate) fn with_circuits(inner: S, circuits: Circuits) -> Self {
        Self {
            inner,
            circuits,
            inner_ready: false,
        }
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Breaker<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.inner_ready {
            return Poll::Ready(Ok(()));
        }
        if let Circuits::One(c) = &self.circuits
            && c.refuses_all()
        {
            return Poll::Ready(Ok(()));
        }
        ready!(self.inner.poll_ready(cx)).map_err(Into::into)?;
        self.inner_ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let inner_ready = std::mem::take(&mut self.inner_ready);
        let Some(circuit) = self.circuits.pick(&req) else {
            return ResponseFuture::unguarded(self.inner.call(req));
        };
        if !inner_ready {
            // Readiness was granted because the breaker refused everything; if it
            // has just moved on, this request still may not reach an unready inner.
            return ResponseFuture::rejected(circuit.reject());
        }
        let routing = Routing::of(req.extensions());
        let deadline = routing.and_then(|r| Some(r.deadline?.0));
        match circuit.acquire(deadline) {
            Some(permit) => {
                let body = deadline.and_then(|_| routing?.body.clone());
                let permit = permit.with_body(body);
                ResponseFuture::called(self.inner.call(req), Some(permit))
            }
            None => ResponseFuture::rejected(circuit.rejected_error()),
        }
    }
}
