//! The tries after the first: what a request keeps for them, and the boxed loop that
//! sends them (the slow path, entered only once a try failed in a retryable way).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tokio::time::{Instant, sleep};
use tower::{BoxError, ServiceExt};
use tower_service::Service;

use super::params::{RetryAfter, RetryParams, retry_after};
use super::registry::{RetryOutcome, RouteRetry};
use crate::classify::classify_error;
use crate::extensions::{BodyProgress, Deadline, RetryCount, Routing, within};
use crate::replay::{BodySource, Reclaim, ReplayBody};
use crate::{AtBackend, FilterError};

/// The boxed retry loop: the slow path, once a try has failed in a retryable way.
pub(crate) type RetryLoop<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

/// Whether a try's result is worth another try, and after what wait; `None` ends.
fn retry_wait<RB>(
    p: &RetryParams,
    body: Option<&BodyProgress>,
    res: &Result<Response<RB>, BoxError>,
) -> Option<RetryAfter> {
    // The client's body broke off: the try failed through no fault of the upstream, and
    // nothing is left to send again.
    if body.is_some_and(BodyProgress::is_client_failed) {
        return None;
    }
    match res {
        Ok(rsp) if p.is_retryable_response(rsp) => Some(retry_after(rsp)),
        Err(e) if p.is_retryable_error(classify_error(&**e)) => Some(RetryAfter::Absent),
        _ => None,
    }
}

/// What a request needs for tries after the first.
pub(crate) struct Rest<S, B> {
    /// Cloned into a service of the retry's own once a try is retried.
    pub(super) svc: Arc<S>,
    pub(super) route: Arc<RouteRetry>,
    pub(super) backend: Arc<str>,
    /// The head as it came (`None`: the request goes once, for its per-try timer).
    pub(super) parts: Option<KeptHead>,
    pub(super) source: BodySource<B>,
    pub(super) outer_deadline: Option<Instant>,
    /// The first try's per-try deadline.
    pub(super) try_deadline: Option<Instant>,
    /// The route's total timeout, when this layer enforces it.
    pub(super) total: Option<Total>,
    /// When the first try (and the total) started.
    pub(super) start: Instant,
    /// The request body still arriving: the timers start once it is in.
    pub(super) body: Option<BodyProgress>,
}

/// The head kept for the tries after the first, copied before the first goes.
///
/// Every request that may be retried pays for this copy, and few are retried, so it is
/// kept in the form cheapest to make: the headers as a flat list of their names and
/// values (one allocation, where a copy of the map takes two; a map is built from it only
/// for a retry), and extensions that hold the split's choice and nothing else as that
/// choice, not a copy of the map (three allocations fewer). Later tries get the same
/// head either way.
pub(crate) struct KeptHead {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    /// Every value in the map's order: appended in this order, a map reads the same.
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// `Ok`: the extensions were this routing (the split's choice) or none, and nothing more.
    extensions: Result<Option<Routing>, http::Extensions>,
}

impl KeptHead {
    /// Copies `parts` for later tries.
    pub(crate) fn copy(parts: &http::request::Parts) -> Self {
        let ext = &parts.extensions;
        let extensions = match (ext.len(), Routing::of(ext)) {
            (0, _) => Ok(None),
            (1, Some(choice)) => Ok(Some(choice.clone())),
            _ => Err(ext.clone()),
        };
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            extensions,
        }
    }

    /// A fresh head for one more try: the one that came, extensions and all.
    fn head(&self) -> http::request::Parts {
        let (mut head, ()) = Request::new(()).into_parts();
        head.method = self.method.clone();
        head.uri = self.uri.clone();
        head.version = self.version;
        // A hint only: the map that came held these values, so appending them cannot
        // outgrow what a map takes; `reserve` would panic on a count it cannot hold.
        let _ = head.headers.try_reserve(self.headers.len());
        for (name, value) in &self.headers {
            head.headers.append(name.clone(), value.clone());
        }
        match &self.extensions {
            Ok(None) => {}
            Ok(Some(choice)) => {
                head.extensions.insert(choice.clone());
            }
            Err(all) => head.extensions = all.clone(),
        }
        head
    }

    /// The request's retry count, if it carries one.
    fn retry_count(&self) -> Option<&RetryCount> {
        self.extensions.as_ref().err()?.get::<RetryCount>()
    }
}

/// The route's total timeout as the retry layer enforces it: when it ends, and after
/// how long (what the error says).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Total {
    pub(crate) at: Instant,
    pub(crate) after: Duration,
}

impl<S, B> Rest<S, B>
where
    S: Service<Request<ReplayBody<B>>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    pub(crate) fn per_try_timeout(&self) -> std::time::Duration {
        self.route.params().per_try_timeout.unwrap_or_default()
    }

    /// When the first try's timer fired: the total timeout if it was the one due (it
    /// ends the request), `None` when it was the per-try deadline.
    pub(crate) fn total_due(&self) -> Option<Duration> {
        let total = self.total?;
        match self.try_deadline {
            // On a tie the per-try timeout is what the try sees first, as it was when
            // the total's timer sat in a layer above.
            Some(d) if d <= total.at => None,
            _ => Some(total.after),
        }
    }

    /// Polls the first try's one timer until the per-try or the total timeout is due
    /// (both start once the request body is in): `Some(total)` when the total is (it
    /// ends the request), `None` when the per-try timeout is.
    pub(crate) fn poll_timer(
        &self,
        mut sleep: Pin<&mut tokio::time::Sleep>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Duration>> {
        loop {
            std::task::ready!(sleep.as_mut().poll(cx));
            let Some(body) = &self.body else {
                return std::task::Poll::Ready(self.total_due());
            };
            let now = Instant::now();
            let due = |after| BodyProgress::due(Some(body), self.start, after, now);
            let per_try = self.route.params().per_try_timeout.map(due);
            let total = self.total.map(|t| due(t.after));
            match (per_try, total) {
                // On a tie the per-try timeout is what the try sees first.
                (Some(Ok(())), _) => return std::task::Poll::Ready(None),
                (_, Some(Ok(()))) => {
                    return std::task::Poll::Ready(self.total.map(|t| t.after));
                }
                (a, b) => {
                    let again = earliest(a.and_then(Result::err), b.and_then(Result::err));
                    match again {
                        Some(at) => sleep.as_mut().reset(at),
                        None => return std::task::Poll::Pending,
                    }
                }
            }
        }
    }

    /// Settles the first try: its result when it stands, else the boxed retry loop.
    pub(crate) fn after_first<RB: Send + 'static>(
        self,
        res: Result<Response<RB>, BoxError>,
    ) -> Result<Result<Response<RB>, BoxError>, RetryLoop<Response<RB>>>
    where
        S: Service<Request<ReplayBody<B>>, Response = Response<RB>>,
    {
        match retry_wait(self.route.params(), self.body.as_ref(), &res) {
            Some(wait) if self.parts.is_some() => match self.total {
                None => Err(Box::pin(self.retry_loop(res, wait))),
                // The later tries and their waits run within what is left of the total.
                Some(Total { after, .. }) => {
                    let backend = self.backend.clone();
                    let (body, start) = (self.body.clone(), self.start);
                    let tries = self.retry_loop(res, wait);
                    Err(Box::pin(async move {
                        match within(tries, body.as_ref(), start, after).await {
                            Ok(res) => res,
                            Err(()) => Err(AtBackend::wrap(backend, FilterError::Timeout(after))),
                        }
                    }))
                }
            },
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
            svc: template,
            route,
            backend,
            parts,
            mut source,
            outer_deadline,
            body,
            ..
        } = self;
        let mut svc = S::clone(&template);
        drop(template);
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
            if let Some(count) = parts.as_ref().and_then(KeptHead::retry_count) {
                count.add_one();
            }
            let head = parts
                .as_ref()
                .expect("the head is kept while tries remain")
                .head();
            let mut req = Request::from_parts(head, source.next());
            let try_deadline = p.per_try_timeout.map(|t| Instant::now() + t);
            if let Some(d) = earliest(try_deadline, outer_deadline) {
                Routing::of_mut(req.extensions_mut()).deadline = Some(Deadline(d));
            }
            let fut = svc.ready().await.map_err(Into::into)?.call(req);
            res = match p.per_try_timeout {
                Some(after) => match within(fut, body.as_ref(), Instant::now(), after).await {
                    Ok(r) => r.map_err(Into::into),
                    Err(()) => Err(AtBackend::wrap(
                        backend.clone(),
                        FilterError::Timeout(p.per_try_timeout.unwrap_or_default()),
                    )),
                },
                None => fut.await.map_err(Into::into),
            };
            wait = match retry_wait(p, body.as_ref(), &res) {
                Some(w) => w,
                None => return res,
            };
        }
    }
}

pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extensions::SelectedBackend;

    fn parts(ext: impl FnOnce(&mut http::Extensions)) -> http::request::Parts {
        let (mut parts, ()) = Request::builder()
            .method("POST")
            .uri("http://log/ingest")
            .header("x-a", "1")
            .header("x-a", "2")
            .header("x-b", "3")
            .body(())
            .unwrap()
            .into_parts();
        ext(&mut parts.extensions);
        parts
    }

    fn same_head(a: &http::request::Parts, b: &http::request::Parts) {
        assert_eq!(
            (&a.method, &a.uri, a.version),
            (&b.method, &b.uri, b.version)
        );
        assert_eq!(a.headers, b.headers);
    }

    /// The cheap forms are what a kept head holds in the common cases (no extensions, or
    /// the split's choice alone); anything else is a copy of the map. Each gives the
    /// same head back.
    #[test]
    fn a_kept_head_holds_the_cheapest_form_that_gives_the_same_head_back() {
        let none = parts(|_| {});
        let kept = KeptHead::copy(&none);
        assert!(matches!(kept.extensions, Ok(None)));
        let again = kept.head();
        same_head(&again, &none);
        assert_eq!(again.extensions.len(), 0);

        let choice = SelectedBackend {
            name: "log-v2".into(),
            index: 1,
        };
        let routed = parts(|e| Routing::of_mut(e).backend = Some(choice.clone()));
        let kept = KeptHead::copy(&routed);
        assert!(matches!(&kept.extensions, Ok(Some(r)) if r.backend == Some(choice.clone())));
        let again = kept.head();
        same_head(&again, &routed);
        assert_eq!(
            Routing::of(&again.extensions).unwrap().backend,
            Some(choice)
        );

        let more = parts(|e| {
            Routing::of_mut(e);
            e.insert(7u32);
        });
        let kept = KeptHead::copy(&more);
        assert!(kept.extensions.is_err());
        let again = kept.head();
        same_head(&again, &more);
        assert_eq!(again.extensions.get::<u32>(), Some(&7));
        assert!(Routing::of(&again.extensions).is_some());
    }
}
