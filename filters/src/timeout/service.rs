use std::task::{Context, Poll};
use std::time::Duration;

use tower::BoxError;
use tower_service::Service;

use super::ResponseFuture;

/// Fails a request with [`FilterError::Timeout`](crate::FilterError::Timeout) when the inner
/// service has not answered within the timeout.
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S> Timeout<S> {
    /// Wraps `inner`, allowing `timeout` per request (`None`: no limit).
    pub fn new(inner: S, timeout: Option<Duration>) -> Self {
        Self { inner, timeout }
    }
}

impl<S, R> Service<R> for Timeout<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Waiting for readiness is not bounded here: the layers below fail fast instead
        // of queueing, and the total timeout sits above anything that may wait.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let sleep = self.timeout.map(|d| (tokio::time::sleep(d), d));
        ResponseFuture::new(self.inner.call(req), sleep)
    }
}
