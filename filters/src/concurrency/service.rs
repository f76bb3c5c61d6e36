use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::BoxError;
use tower_service::Service;

use super::limiter::Admission;
use super::{Limiter, ResponseFuture};

/// Limits requests in flight to the inner service; over the limit a request waits in the
/// limiter's priority queue or is refused with
/// [`FilterError::Overloaded`](crate::FilterError::Overloaded).
#[derive(Clone, Debug)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> ConcurrencyLimit<S> {
    /// Wraps `inner` with `limiter`.
    pub fn new(inner: S, limiter: Arc<Limiter>) -> Self {
        Self { inner, limiter }
    }

    /// The limiter enforced.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }
}

impl<S, B, RB> Service<Request<B>> for ConcurrencyLimit<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, Response<RB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Admission depends on the request's priority, so it is decided in `call`.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let level = self.limiter.params().priorities.level_of(&req);
        match self.limiter.admit(level) {
            Admission::Admitted(permit) => ResponseFuture::admitted(self.inner.call(req), permit),
            Admission::Refused(err) => ResponseFuture::refused(err),
            Admission::Queued(ticket) => {
                // The ready service goes with the waiting request; a clone stays for the next.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::queued(Box::pin(async move {
                    let permit = ticket.wait().await?;
                    let rsp = inner.call(req).await.map_err(Into::into)?;
                    permit.complete();
                    Ok(rsp)
                }))
            }
        }
    }
}
