use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use governor::clock::{Clock, DefaultClock};
use http::{Request, Response};
use tower::BoxError;
use tower_service::Service;

use super::{Decision, KeyedLimiter, RateLimitObserver, ResponseFuture, Verdict};
use crate::FilterError;

/// Refuses requests over its limiter's rate with [`FilterError::RateLimited`].
pub struct RateLimit<S, C: Clock = DefaultClock> {
    inner: S,
    limiter: Arc<KeyedLimiter<C>>,
    observer: Arc<dyn RateLimitObserver>,
    headers_on_allowed: bool,
}

impl<S, C: Clock> RateLimit<S, C> {
    /// Wraps `inner` with `limiter`, reporting decisions to `observer`.
    pub fn new(
        inner: S,
        limiter: Arc<KeyedLimiter<C>>,
        observer: Arc<dyn RateLimitObserver>,
        headers_on_allowed: bool,
    ) -> Self {
        Self {
            inner,
            limiter,
            observer,
            headers_on_allowed,
        }
    }
}

impl<S: Clone, C: Clock> Clone for RateLimit<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            observer: self.observer.clone(),
            headers_on_allowed: self.headers_on_allowed,
        }
    }
}

impl<S: fmt::Debug, C: Clock> fmt::Debug for RateLimit<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .finish()
    }
}

impl<S, C, B, RB> Service<Request<B>> for RateLimit<S, C>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    C: Clock,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Refusals are decided in `call`, so readiness is only the inner service's.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let params = self.limiter.params();
        match self.limiter.check(&req) {
            verdict @ Verdict::Allowed { .. } => {
                self.observer.on_decision(&params.name, Decision::Allowed);
                let headers = self.headers_on_allowed.then(|| {
                    (
                        self.limiter.policy_header().clone(),
                        self.limiter.state_header(verdict),
                    )
                });
                ResponseFuture::inner(self.inner.call(req), headers)
            }
            Verdict::Limited { .. } if params.shadow => {
                self.observer.on_decision(&params.name, Decision::Shadow);
                ResponseFuture::inner(self.inner.call(req), None)
            }
            verdict @ Verdict::Limited { retry_after } => {
                self.observer.on_decision(&params.name, Decision::Limited);
                tracing::debug!(limit = %params.name, ?retry_after, "rate limited");
                ResponseFuture::refused(FilterError::RateLimited {
                    retry_after,
                    policy: header_string(self.limiter.policy_header()),
                    state: header_string(&self.limiter.state_header(verdict)),
                })
            }
        }
    }
}

fn header_string(v: &http::HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}
