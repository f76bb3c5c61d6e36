use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tokio::time::{Sleep, sleep, sleep_until};
use tower::BoxError;
use tower_service::Service;

use super::future::ResponseFuture;
use super::registry::{RetryOutcome, RouteRetry};
use super::tries::{KeptHead, Rest, Total, earliest};
use crate::extensions::{BodyProgress, Deadline, Routing};
use crate::replay::{BodySource, ReplayBody, known_len};

/// Retries failed tries of a request against the same inner service (one backend).
///
/// Sends `Request<ReplayBody<B>>` below; answers what the inner service answers (the
/// last try's response or error). A request that can never be retried (retry off,
/// non-idempotent method without `nonIdempotent`, or no per-try timeout and a
/// `Content-Length` over the replay cap) takes the direct path: the inner future
/// itself, no box, no copy. Any other request sends its first try unboxed too (with a
/// copy of its head kept for replay); the retry loop is boxed only once a try has
/// failed in a way worth retrying.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    /// What later tries are sent through: a request that may be retried holds it by
    /// reference count and clones a service of its own only when it is retried, where
    /// cloning `inner` for every request would count up and down every layer below.
    template: Arc<S>,
    route: Option<Arc<RouteRetry>>,
    backend: Arc<str>,
    total: Option<Duration>,
}

impl<S: Clone> Retry<S> {
    /// Wraps `inner`; `route` `None` never retries.
    pub fn new(inner: S, route: Option<Arc<RouteRetry>>, backend: Arc<str>) -> Self {
        Self {
            template: Arc::new(inner.clone()),
            inner,
            route,
            backend,
            total: None,
        }
    }

    /// Also enforces the route's total timeout (see [`RetryLayer::with_total`](super::RetryLayer::with_total)).
    pub fn with_total(mut self, total: Option<Duration>) -> Self {
        self.total = total;
        self
    }

    /// The total timeout's timer for a request that takes no per-try timer.
    fn total_alone(&self) -> Option<(Sleep, Duration)> {
        self.total.map(|d| (sleep(d), d))
    }
}

impl<S, B, RB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(route) = &self.route else {
            let total = self
                .total_alone()
                .map(|(s, d)| (s, d, backend_of(&req, &self.backend), body_of(&req)));
            return ResponseFuture::direct(
                self.inner.call(req.map(ReplayBody::passthrough)),
                total,
            );
        };
        // One clock read serves the budget, the per-try deadline and the total's.
        let now = crate::clock::now();
        route.budget().deposit_at(now);
        let p = route.params();
        let mut may_retry = p.attempts > 0 && p.method_allowed(req.method());
        if may_retry && known_len(&req) > p.max_replay_bytes {
            may_retry = false;
            route.observe(
                &backend_of(&req, &self.backend),
                RetryOutcome::SkippedBodyTooLarge,
            );
            tracing::debug!(
                route = route.route(),
                max_replay_bytes = p.max_replay_bytes,
                "request body over the replay cap: sent once, not retried"
            );
        }
        if !may_retry && p.per_try_timeout.is_none() {
            let total = self.total.map(|d| {
                let backend = backend_of(&req, &self.backend);
                (sleep_until(now + d), d, backend, body_of(&req))
            });
            return ResponseFuture::direct(
                self.inner.call(req.map(ReplayBody::passthrough)),
                total,
            );
        }
        let backend = backend_of(&req, &self.backend);
        let progress = body_of(&req);
        let (parts, body) = req.into_parts();
        let outer_deadline = Routing::deadline(&parts.extensions);
        let (body, source) = BodySource::first(body, may_retry, p.max_replay_bytes);
        // Later tries need the head as it came; a request that only needs the per-try
        // timer goes once: no head copy.
        let kept = may_retry.then(|| KeptHead::copy(&parts));
        let mut req = Request::from_parts(parts, body);
        let try_deadline = p.per_try_timeout.map(|t| now + t);
        // The total is not the try's `Deadline`: a route timeout never was one.
        if let Some(d) = earliest(try_deadline, outer_deadline) {
            Routing::of_mut(req.extensions_mut()).deadline = Some(Deadline(d));
        }
        let total = self.total.map(|after| Total {
            at: now + after,
            after,
        });
        // One timer for the first try: whichever deadline comes first.
        let timer = earliest(try_deadline, total.map(|t| t.at));
        // The first try runs unboxed on the service that was made ready; only a try
        // that failed in a retryable way moves into the boxed loop, with a clone.
        let fut = self.inner.call(req);
        let rest = Rest {
            svc: Arc::clone(&self.template),
            route: Arc::clone(route),
            backend,
            parts: kept,
            source,
            outer_deadline,
            try_deadline,
            total,
            start: now,
            body: progress,
        };
        ResponseFuture::first(fut, timer.map(sleep_until), rest)
    }
}

/// The backend label: the split's choice when the stack is route-level, else the
/// name the layer was built with.
fn backend_of<B>(req: &Request<B>, fixed: &Arc<str>) -> Arc<str> {
    Routing::backend(req.extensions()).map_or_else(|| Arc::clone(fixed), |s| Arc::clone(&s.name))
}

/// How the request's body is arriving, when it had not all arrived with the head.
fn body_of<B>(req: &Request<B>) -> Option<BodyProgress> {
    Routing::of(req.extensions())?.body.clone()
}
