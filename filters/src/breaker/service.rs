use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use tokio::time::Instant;
use tower::BoxError;
use tower_service::Service;

use super::circuit::Circuit;
use super::future::{ResponseBody, ResponseFuture};

/// The instant at which whoever sent a request stops waiting for it.
///
/// The retry layer sets it for each try (its per-try timeout), and a route timeout
/// above may set it too (the earlier wins). A call the breaker sees dropped at or
/// after its deadline counts as a `timeout` failure; dropped earlier, as cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// A circuit breaker in front of one backend's stack, for one route.
///
/// Open: answers `FilterError::BreakerOpen` at once without calling the inner
/// service. Responses come back with their body wrapped in [`ResponseBody`], which
/// reports a gRPC status found in trailers when the body ends.
///
/// While the breaker refuses everything, `poll_ready` is ready at once without
/// polling the inner service, so an open breaker in front of a backend that is
/// never ready (no endpoints) still fails fast.
#[derive(Debug)]
pub struct Breaker<S> {
    inner: S,
    circuit: Arc<Circuit>,
    /// Whether the inner service was polled ready for the next call.
    inner_ready: bool,
}

impl<S: Clone> Clone for Breaker<S> {
    fn clone(&self) -> Self {
        // A clone has not been polled ready.
        Self::new(self.inner.clone(), Arc::clone(&self.circuit))
    }
}

impl<S> Breaker<S> {
    /// Wraps `inner` with `circuit`.
    pub fn new(inner: S, circuit: Arc<Circuit>) -> Self {
        Self {
            inner,
            circuit,
            inner_ready: false,
        }
    }

    /// The breaker state this service feeds.
    pub fn circuit(&self) -> &Arc<Circuit> {
        &self.circuit
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
        if self.circuit.refuses_all() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.inner.poll_ready(cx)).map_err(Into::into)?;
        self.inner_ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if !std::mem::take(&mut self.inner_ready) {
            // Readiness was granted because the breaker refused everything; if it
            // has just moved on, this request still may not reach an unready inner.
            return ResponseFuture::rejected(self.circuit.reject());
        }
        let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        match self.circuit.acquire(deadline) {
            Some(permit) => ResponseFuture::called(self.inner.call(req), permit),
            None => ResponseFuture::rejected(self.circuit.rejected_error()),
        }
    }
}
