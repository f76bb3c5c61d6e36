use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tower::BoxError;
use tower_service::Service;

use super::future::Outcome;
use super::{ConnectFailureClassifier, EndpointSet, ResponseFuture};
use crate::FilterError;
use crate::extensions::Routing;
use crate::random::RandomSource;

/// Picks an endpoint of the selected backend, sets [`Endpoint`](crate::extensions::Endpoint) and calls
/// the inner service (the proxy's connector/client).
#[derive(Clone, Debug)]
pub struct Balance<S> {
    inner: S,
    backends: Arc<[Arc<EndpointSet>]>,
    rng: RandomSource,
    classify: ConnectFailureClassifier,
}

impl<S> Balance<S> {
    /// Balances over `backends`, indexed by [`SelectedBackend::index`](crate::extensions::SelectedBackend::index).
    pub fn new(
        inner: S,
        backends: Arc<[Arc<EndpointSet>]>,
        rng: RandomSource,
        classify: ConnectFailureClassifier,
    ) -> Self {
        Self {
            inner,
            backends,
            rng,
            classify,
        }
    }
}

impl<S, B> Service<Request<B>> for Balance<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let index = Routing::backend(req.extensions()).map_or(0, |s| s.index);
        let Some(set) = self.backends.get(index) else {
            let name =
                Routing::backend(req.extensions()).map_or_else(String::new, |s| s.name.to_string());
            return ResponseFuture::failed(FilterError::NoHealthyEndpoint(name));
        };
        let Some(pick) = set.pick(&self.rng) else {
            return ResponseFuture::failed(FilterError::NoHealthyEndpoint(
                set.params().backend.to_string(),
            ));
        };
        Routing::of_mut(req.extensions_mut()).endpoint = Some(pick.endpoint.endpoint().clone());
        let outcome = Outcome::new(pick, set.params(), self.classify);
        ResponseFuture::new(self.inner.call(req), outcome)
    }
}
