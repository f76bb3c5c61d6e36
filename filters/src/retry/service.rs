use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tokio::time::{Instant, sleep, sleep_until, timeout_at};
use tower::{BoxError, ServiceExt};
use tower_service::Service;

use super::body::{BodySource, Reclaim, ReplayBody};
use super::future::{ResponseFuture, RetryLoop};
use super::params::{RetryAfter, RetryParams, retry_after};
use super::registry::{RetryCount, RetryOutcome, RouteRetry};
use crate::FilterError;
use crate::breaker::Deadline;
use crate::breaker::classify::classify_error;
use crate::split::SelectedBackend;

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
    route: Option<Arc<RouteRetry>>,
    backend: Arc<str>,
}

impl<S> Retry<S> {
    /// Wraps `inner`; `route` `None` never retries.
    pub fn new(inner: S, route: Option<Arc<RouteRetry>>, backend: Arc<str>) -> Self {
        Self {
            inner,
            route,
            backend,
        }
    }
}

impl<S, B, RB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
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
            return ResponseFuture::direct(self.inner.call(req.map(ReplayBody::passthrough)));
        };
        route.budget().deposit();
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
            return ResponseFuture::direct(self.inner.call(req.map(ReplayBody::passthrough)));
        }
        let backend = backend_of(&req, &self.backend);
        let (parts, body) = req.into_parts();
        let outer_deadline = parts.extensions.get::<Deadline>().map(|d| d.0);
        let (body, source) = BodySource::first(body, may_retry, p.max_replay_bytes);
        // Later tries need the head as it came; a request that only needs the per-try
        // timer goes once: no head copy.
        let (head, kept) = if may_retry {
            (parts.clone(), Some(parts))
        } else {
            (parts, None)
        };
        let mut req = Request::from_parts(head, body);
        let try_deadline = p.per_try_timeout.map(|t| Instant::now() + t);
        if let Some(d) = earliest(try_deadline, outer_deadline) {
            req.extensions_mut().insert(Deadline(d));
        }
        // The first try runs unboxed on the service that was made ready; only a try
        // that failed in a retryable way moves into the boxed loop, with a clone.
        let fut = self.inner.call(req);
        let rest = Rest {
            svc: self.inner.clone(),
            route: Arc::clone(route),
            backend,
            parts: kept,
            source,
            outer_deadline,
        };
        ResponseFuture::first(fut, try_deadline.map(sleep_until), rest)
    }
}

/// The backend label: the split's choice when the stack is route-level, else the
/// name the layer was built with.
fn backend_of<B>(req: &Request<B>, fixed: &Arc<str>) -> Arc<str> {
    req.extensions()
        .get::<SelectedBackend>()
        .map_or_else(|| Arc::clone(fixed), |s| Arc::clone(&s.name))
}

/// The body size as far as the head or the body itself tells.
fn known_len<B: Body>(req: &Request<B>) -> u64 {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    declared.max(req.body().size_hint().lower())
}

/// Whether a try's result is worth another try, and after what wait; `None` ends.
fn retry_wait<RB>(p: &RetryParams, res: &Result<Response<RB>, BoxError>) -> Option<RetryAfter> {
    match res {
        Ok(rsp) if p.is_retryable_response(rsp) => Some(retry_after(rsp)),
        Err(e) if p.is_retryable_error(classify_error(&**e)) => Some(RetryAfter::Absent),
        _ => None,
    }
}

/// What a request needs for tries after the first.
pub(crate) struct Rest<S, B> {
    svc: S,
    route: Arc<RouteRetry>,
    backend: Arc<str>,
    /// The head as it came (`None`: the request goes once, for its per-try timer).
    parts: Option<http::request::Parts>,
    source: BodySource<B>,
    outer_deadline: Option<Instant>,
}

impl<S, B> Rest<S, B>
where
    S: Service<Request<ReplayBody<B>>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    pub(crate) fn per_try_timeout(&self) -> std::time::Duration {
        self.route.params().per_try_timeout.unwrap_or_default()
    }

    /// Settles the first try: its result when it stands, else the boxed retry loop.
    pub(crate) fn after_first<RB: Send + 'static>(
        self,
        res: Result<Response<RB>, BoxError>,
    ) -> Result<Result<Response<RB>, BoxError>, RetryLoop<Response<RB>>>
    where
        S: Service<Request<ReplayBody<B>>, Response = Response<RB>>,
    {
        match retry_wait(self.route.params(), &res) {
            Some(wait) if self.parts.is_some() => Err(Box::pin(self.retry_loop(res, wait))),
            _ => Ok(res),
        }
    }

    /// The slow path: each later try gets a fresh copy of the head and a replaying body.
    async fn retry_loop<RB>(
        self,
        mut res: Result<Response<RB>, BoxError>,
        mut wait: RetryAfter,
    ) -> Result<Response<RB>, BoxError>
    where
        S: Service<Request<ReplayBody<B>>, Response = Response<RB>>,
    {
        let Rest {
            mut svc,
            route,
            backend,
            parts,
            mut source,
            outer_deadline,
        } = self;
        let p = route.params();
        let mut retries = 0u32;
        loop {
            if retries >= p.attempts {
                route.observe(&backend, RetryOutcome::AttemptsExhausted);
                return res;
            }
            let delay = match wait {
                RetryAfter::Absent => p.backoff(retries),
                // `backoff.min` holds for a server's Retry-After too.
                RetryAfter::Wait(d) if d <= p.max_retry_after() => d.max(p.backoff_min),
                RetryAfter::Wait(_) | RetryAfter::Unusable => {
                    route.observe(&backend, RetryOutcome::RetryAfterTooLong);
                    return res;
                }
            };
            // A retry that could not finish its wait before the caller gives up is pointless.
            if outer_deadline.is_some_and(|d| Instant::now() + delay >= d) {
                return res;
            }
            let mut slept = false;
            match source.reclaim() {
                Reclaim::Ready => {}
                Reclaim::TooLarge => {
                    route.observe(&backend, RetryOutcome::SkippedBodyTooLarge);
                    return res;
                }
                Reclaim::InUse => {
                    // The connection below may still be sending the last try's body; give
                    // it the backoff to let go.
                    sleep(delay).await;
                    slept = true;
                    match source.reclaim() {
                        Reclaim::Ready => {}
                        Reclaim::TooLarge => {
                            route.observe(&backend, RetryOutcome::SkippedBodyTooLarge);
                            return res;
                        }
                        Reclaim::InUse => {
                            route.observe(&backend, RetryOutcome::SkippedBodyInUse);
                            return res;
                        }
                    }
                }
            }
            if !route.budget().try_withdraw() {
                route.observe(&backend, RetryOutcome::BudgetExhausted);
                tracing::debug!(route = route.route(), %backend, "retry budget exhausted");
                return res;
            }
            drop(res);
            if !slept {
                sleep(delay).await;
            }
            retries += 1;
            route.observe(&backend, RetryOutcome::Retried);
            if let Some(count) = parts
                .as_ref()
                .and_then(|p| p.extensions.get::<RetryCount>())
            {
                count.add_one();
            }
            let head = parts.clone().expect("the head is kept while tries remain");
            let mut req = Request::from_parts(head, source.next());
            let try_deadline = p.per_try_timeout.map(|t| Instant::now() + t);
            if let Some(d) = earliest(try_deadline, outer_deadline) {
                req.extensions_mut().insert(Deadline(d));
            }
            let fut = svc.ready().await.map_err(Into::into)?.call(req);
            res = match try_deadline {
                Some(d) => match timeout_at(d, fut).await {
                    Ok(r) => r.map_err(Into::into),
                    Err(_) => {
                        Err(FilterError::Timeout(p.per_try_timeout.unwrap_or_default()).into())
                    }
                },
                None => fut.await.map_err(Into::into),
            };
            wait = match retry_wait(p, &res) {
                Some(w) => w,
                None => return res,
            };
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
