use std::sync::Arc;
use std::task::{Context, Poll};

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
#[derive(Clone, Debug)]
pub struct Breaker<S> {
    inner: S,
    circuit: Arc<Circuit>,
}

impl<S> Breaker<S> {
    /// Wraps `inner` with `circuit`.
    pub fn new(inner: S, circuit: Arc<Circuit>) -> Self {
        Self { inner, circuit }
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
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        match self.circuit.acquire(deadline) {
            Some(permit) => ResponseFuture::called(self.inner.call(req), permit),
            None => ResponseFuture::rejected(self.circuit.rejected_error()),
        }
    }
}
