use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tower_service::Service;

use super::SplitParams;
use crate::extensions::{Routing, SelectedBackend};
use crate::random::RandomSource;

/// Sets [`Routing::backend`] on each request, then calls the inner service.
#[derive(Clone, Debug)]
pub struct Split<S> {
    inner: S,
    params: Arc<SplitParams>,
    rng: RandomSource,
}

impl<S> Split<S> {
    /// Wraps `inner` with the split `params`.
    pub fn new(inner: S, params: Arc<SplitParams>, rng: RandomSource) -> Self {
        Self { inner, params, rng }
    }
}

impl<S, B> Service<Request<B>> for Split<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let index = self.params.decide(&req, &self.rng);
        let name = self.params.backends()[index].clone();
        Routing::of_mut(req.extensions_mut()).backend = Some(SelectedBackend { name, index });
        self.inner.call(req)
    }
}
