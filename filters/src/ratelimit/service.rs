use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use governor::clock::Clock;
use http::{Request, Response};
use tower::BoxError;
use tower_service::Service;

use super::fleet::{FleetLimiter, FleetVerdict};
use super::{Decision, KeyedLimiter, RateLimitObserver, ResponseFuture, Verdict};
use crate::FilterError;
use crate::clock::PollClock;

/// The limiter a [`RateLimit`] enforces: this proxy's own buckets, or a share of a
/// fleet-wide quota.
pub(crate) enum Limiter<C: Clock> {
    Local(Arc<KeyedLimiter<C>>),
    Fleet(Arc<FleetLimiter>),
}

impl<C: Clock> Clone for Limiter<C> {
    fn clone(&self) -> Self {
        match self {
            Limiter::Local(l) => Limiter::Local(l.clone()),
            Limiter::Fleet(l) => Limiter::Fleet(l.clone()),
        }
    }
}

impl<C: Clock> fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limiter::Local(l) => l.fmt(f),
            Limiter::Fleet(l) => l.fmt(f),
        }
    }
}

impl<C: Clock> Limiter<C> {
    fn params(&self) -> &super::RateLimitParams {
        match self {
            Limiter::Local(l) => l.params(),
            Limiter::Fleet(l) => l.params(),
        }
    }

    fn check<B>(&self, req: &Request<B>) -> FleetVerdict {
        match self {
            Limiter::Local(l) => FleetVerdict {
                verdict: l.check(req),
                degraded: false,
            },
            Limiter::Fleet(l) => l.check(req),
        }
    }

    fn policy_header(&self) -> &http::HeaderValue {
        match self {
            Limiter::Local(l) => l.policy_header(),
            Limiter::Fleet(l) => l.policy_header(),
        }
    }

    fn state_header(&self, v: FleetVerdict) -> http::HeaderValue {
        match self {
            Limiter::Local(l) => l.state_header(v.verdict),
            Limiter::Fleet(l) => l.state_header(v),
        }
    }
}

/// Refuses requests over its limiter's rate with [`FilterError::RateLimited`].
pub struct RateLimit<S, C: Clock = PollClock> {
    inner: S,
    limiter: Limiter<C>,
    observer: Arc<dyn RateLimitObserver>,
    headers_on_allowed: bool,
    last_state: LastState,
}

/// The `RateLimit` value this service wrote last on an allowed response, by the tokens
/// left that it shows. Traffic well under its limit finds the bucket full again at every
/// request, so the same value is due again and again: a clone of it (a reference count)
/// instead of formatting and allocating it anew. A worker keeps its route stack across
/// requests, so this lives as long as the stack and needs no synchronisation.
#[derive(Clone, Default)]
struct LastState(Option<(u32, http::HeaderValue)>);

impl<S, C: Clock> RateLimit<S, C> {
    pub(crate) fn with_limiter(
        inner: S,
        limiter: Limiter<C>,
        observer: Arc<dyn RateLimitObserver>,
        headers_on_allowed: bool,
    ) -> Self {
        Self {
            inner,
            limiter,
            observer,
            headers_on_allowed,
            last_state: LastState::default(),
        }
    }

    /// The `RateLimit` value of an allowed, checked request.
    fn allowed_state_header(&mut self, checked: FleetVerdict) -> http::HeaderValue {
        // A degraded fleet limit answers from its fallback's quota, which can change
        // under it: only values from the limiter's own (fixed) parameters are kept.
        let Verdict::Allowed { remaining } = checked.verdict else {
            return self.limiter.state_header(checked);
        };
        if checked.degraded {
            return self.limiter.state_header(checked);
        }
        if let Some((left, value)) = &self.last_state.0
            && *left == remaining
        {
            return value.clone();
        }
        let value = self.limiter.state_header(checked);
        self.last_state.0 = Some((remaining, value.clone()));
        value
    }
}

impl<S: Clone, C: Clock> Clone for RateLimit<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            observer: self.observer.clone(),
            headers_on_allowed: self.headers_on_allowed,
            last_state: self.last_state.clone(),
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
        let checked = self.limiter.check(&req);
        let degraded = checked.degraded;
        match checked.verdict {
            Verdict::Allowed { .. } => {
                self.observer.on_decision(&params.name, Decision::Allowed);
                let headers = self.headers_on_allowed.then(|| {
                    (
                        self.limiter.policy_header().clone(),
                        self.allowed_state_header(checked),
                    )
                });
                ResponseFuture::inner(self.inner.call(req), headers, degraded)
            }
            Verdict::Limited { .. } if params.shadow => {
                self.observer.on_decision(&params.name, Decision::Shadow);
                ResponseFuture::inner(self.inner.call(req), None, degraded)
            }
            Verdict::Limited { retry_after } => {
                self.observer.on_decision(&params.name, Decision::Limited);
                tracing::debug!(limit = %params.name, ?retry_after, degraded, "rate limited");
                ResponseFuture::refused(FilterError::RateLimited {
                    retry_after,
                    policy: header_string(self.limiter.policy_header()),
                    state: header_string(&self.limiter.state_header(checked)),
                    degraded,
                })
            }
        }
    }
}

fn header_string(v: &http::HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}
