//! Per-route retry state (params and budget), kept across policy swaps.

use std::sync::Arc;

use super::budget::RetryBudget;
use super::params::RetryParams;
use crate::registry::Registry;

/// What happened to a request the retry layer might have retried; the `outcome`
/// label of `sluice_retries_total{route,backend,outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOutcome {
    /// A retry was sent.
    Retried,
    /// The last allowed try failed too.
    AttemptsExhausted,
    /// A retry was wanted but the route's budget was spent.
    BudgetExhausted,
    /// The request body is larger than `maxReplayBytes`, so the request went once.
    SkippedBodyTooLarge,
    /// A retry was wanted but the last try's body was still held below after the
    /// backoff (the connection was still sending it).
    SkippedBodyInUse,
    /// A 429/503 asked (with `Retry-After`) for a longer wait than the route allows,
    /// or for one we cannot read; its response goes back to the caller.
    RetryAfterTooLong,
}

impl RetryOutcome {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOutcome::Retried => "retried",
            RetryOutcome::AttemptsExhausted => "attempts_exhausted",
            RetryOutcome::BudgetExhausted => "budget_exhausted",
            RetryOutcome::SkippedBodyTooLarge => "skipped_body_too_large",
            RetryOutcome::SkippedBodyInUse => "skipped_body_in_use",
            RetryOutcome::RetryAfterTooLong => "retry_after_too_long",
        }
    }
}

/// Told about every retry decision, so the proxy can count
/// `sluice_retries_total{route,backend,outcome}` without this crate knowing about
/// Prometheus. Called on the request's task: be quick, never block.
pub trait RetryObserver: Send + Sync + 'static {
    /// One decision for a request on `route` sent to `backend`.
    fn on_outcome(&self, route: &str, backend: &str, outcome: RetryOutcome);
}

/// The observer used when none is given.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopRetryObserver;

impl RetryObserver for NoopRetryObserver {
    fn on_outcome(&self, _: &str, _: &str, _: RetryOutcome) {}
}

/// One route's retry settings and budget, shared by the retry services of all
/// backends of the route.
pub struct RouteRetry {
    route: Arc<str>,
    params: RetryParams,
    budget: RetryBudget,
    observer: Arc<dyn RetryObserver>,
}

impl std::fmt::Debug for RouteRetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteRetry")
            .field("route", &self.route)
            .field("params", &self.params)
            .field("budget", &self.budget)
            .finish()
    }
}

impl RouteRetry {
    /// Retry state for one route (the registry builds these; tests may too).
    pub fn new(
        route: impl Into<Arc<str>>,
        params: RetryParams,
        observer: Arc<dyn RetryObserver>,
    ) -> Self {
        Self {
            route: route.into(),
            budget: RetryBudget::new(params.budget.clone()),
            params,
            observer,
        }
    }

    /// Route name.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The params this state was built with.
    pub fn params(&self) -> &RetryParams {
        &self.params
    }

    /// The route's budget.
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    pub(crate) fn observe(&self, backend: &str, outcome: RetryOutcome) {
        self.observer.on_outcome(&self.route, backend, outcome);
    }
}

/// Retry state of every route, keyed by route name, updated at each policy swap.
/// Cheap to clone.
#[derive(Clone)]
pub struct RetryRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    map: Registry<Arc<str>, RouteRetry>,
    observer: Arc<dyn RetryObserver>,
}

impl Default for RetryRegistry {
    fn default() -> Self {
        Self::new(Arc::new(NoopRetryObserver))
    }
}

impl std::fmt::Debug for RetryRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryRegistry")
            .field("routes", &self.inner.map.len())
            .finish()
    }
}

impl RetryRegistry {
    /// An empty registry reporting to `observer`.
    pub fn new(observer: Arc<dyn RetryObserver>) -> Self {
        Self {
            inner: Arc::new(Inner {
                map: Registry::default(),
                observer,
            }),
        }
    }

    /// Replaces the set of routes with exactly `entries` (route, params). A route whose
    /// params are unchanged keeps its budget; a changed one starts with a fresh
    /// budget; a route no longer listed is dropped.
    pub fn update<R: AsRef<str>>(&self, entries: impl IntoIterator<Item = (R, RetryParams)>) {
        self.inner.map.update(
            entries
                .into_iter()
                .map(|(route, params)| (Arc::from(route.as_ref()), params)),
            |held, params| held.params == *params,
            |route, params, _| {
                RouteRetry::new(
                    route.clone(),
                    params.clone(),
                    Arc::clone(&self.inner.observer),
                )
            },
            |_| {},
        );
    }

    /// The retry state of a route, to build a [`RetryLayer`](super::RetryLayer) with.
    pub fn get(&self, route: &str) -> Option<Arc<RouteRetry>> {
        self.inner.map.get(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `outcome` label values the README documents for `sluice_retries_total`.
    #[test]
    fn outcome_labels_are_the_documented_ones() {
        let labels = [
            RetryOutcome::Retried,
            RetryOutcome::AttemptsExhausted,
            RetryOutcome::BudgetExhausted,
            RetryOutcome::SkippedBodyTooLarge,
            RetryOutcome::SkippedBodyInUse,
            RetryOutcome::RetryAfterTooLong,
        ]
        .map(RetryOutcome::as_str);
        assert_eq!(
            labels,
            [
                "retried",
                "attempts_exhausted",
                "budget_exhausted",
                "skipped_body_too_large",
                "skipped_body_in_use",
                "retry_after_too_long",
            ]
        );
    }
}
