//! The governance registries: state that outlives policy swaps (rate-limit buckets,
//! breakers, retry budgets, endpoint health, the inbound concurrency limit), the metric observers they report to, and
//! the admin API's view of the breakers.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use sluice_config::RoutePolicy;
use sluice_filters::balance::BalanceRegistry;
use sluice_filters::breaker::{BreakerObserver, BreakerParams, BreakerRegistry, CircuitState};
use sluice_filters::concurrency::{ConcurrencyObserver, ConcurrencyRegistry};
use sluice_filters::fallback::FallbackObserver;
use sluice_filters::ratelimit::fleet::{FleetRegistry, FleetSettings};
use sluice_filters::ratelimit::{Decision, RateLimitObserver, RateLimitRegistry};
use sluice_filters::reason::Reason;
use sluice_filters::retry::{RetryObserver, RetryOutcome, RetryParams, RetryRegistry};

use crate::metrics::Metrics;
use crate::route::{inbound_concurrency, inbound_limit, key_labels, limit_params, route_key};

/// How often idle rate-limit keys are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The circuit breakers as the admin API (`/breakers`) shows and changes them.
pub trait BreakerAdmin: Send + Sync + 'static {
    /// Every breaker as JSON (one object per route × backend, with its `namespace` and
    /// its `route` as `<policy>.<route>`).
    fn list(&self) -> serde_json::Value;
    /// Closes one breaker by hand; `false` when it does not exist.
    fn reset(&self, key: &str, backend: &str) -> bool;
    /// Opens one breaker by hand; `false` when it does not exist.
    fn open(&self, key: &str, backend: &str) -> bool;
    /// The keys of the breakers of `backend` on `route` (`<policy>.<route>`), in
    /// `namespace` or, without one, in every namespace.
    fn find(&self, namespace: Option<&str>, route: &str, backend: &str) -> Vec<String>;
}

impl BreakerAdmin for BreakerRegistry {
    fn list(&self) -> serde_json::Value {
        let mut list = serde_json::to_value(self.snapshot()).unwrap_or_default();
        for b in list.as_array_mut().into_iter().flatten() {
            let Some(obj) = b.as_object_mut() else {
                continue;
            };
            let key = obj
                .get("route")
                .and_then(|r| r.as_str())
                .unwrap_or_default();
            let (namespace, route) = key_labels(key);
            let (namespace, route) = (namespace.to_string(), route.to_string());
            obj.insert("namespace".into(), namespace.into());
            obj.insert("route".into(), route.into());
        }
        list
    }

    fn reset(&self, key: &str, backend: &str) -> bool {
        BreakerRegistry::reset(self, key, backend)
    }

    fn open(&self, key: &str, backend: &str) -> bool {
        self.force_open(key, backend)
    }

    fn find(&self, namespace: Option<&str>, route: &str, backend: &str) -> Vec<String> {
        self.snapshot()
            .into_iter()
            .filter(|b| {
                let (ns, r) = key_labels(&b.route);
                b.backend == backend && r == route && namespace.is_none_or(|n| n == ns)
            })
            .map(|b| b.route)
            .collect()
    }
}

/// Which rate limit a bucket set belongs to: outbound routes by key, or the inbound one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum LimitKey {
    Outbound(Arc<str>),
    Inbound,
}

/// The governance registries: state kept across policy swaps, shared by every stack.
#[derive(Clone)]
pub struct Governance {
    pub(crate) limits: Arc<RateLimitRegistry<LimitKey>>,
    /// The `scope: fleet` route limits (shares of quotas counted in Redis).
    pub(crate) fleet: Arc<FleetRegistry<LimitKey>>,
    pub(crate) breakers: Arc<BreakerRegistry>,
    pub(crate) retries: Arc<RetryRegistry>,
    pub(crate) endpoints: Arc<BalanceRegistry>,
    /// The inbound concurrency limit (one per proxy: its own service's).
    pub(crate) concurrency: Arc<ConcurrencyRegistry<()>>,
    concurrency_observer: Arc<dyn ConcurrencyObserver>,
}

impl std::fmt::Debug for Governance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governance")
            .field("limits", &self.limits.len())
            .field("breakers", &self.breakers.len())
            .finish_non_exhaustive()
    }
}

impl Governance {
    /// Empty registries whose observers count into `metrics`. Inside a tokio runtime this
    /// also starts the rate-limit sweeper, which ends by itself once the registries go.
    pub fn new(metrics: &Metrics) -> Self {
        Self::with_fleet(metrics, FleetSettings::default())
    }

    /// Like [`new`](Self::new), with fleet limits reconciled as `fleet` says (the
    /// reconciliation task itself is started by [`crate::fleet::spawn`]).
    pub fn with_fleet(metrics: &Metrics, fleet: FleetSettings) -> Self {
        let limits = Arc::new(RateLimitRegistry::new());
        if tokio::runtime::Handle::try_current().is_ok() {
            drop(limits.spawn_sweeper(SWEEP_EVERY));
        }
        metrics
            .ratelimit_fleet_degraded
            .set(i64::from(!fleet.connected));
        Self {
            limits,
            fleet: Arc::new(FleetRegistry::new(fleet)),
            breakers: Arc::new(BreakerRegistry::new(Arc::new(BreakerMetrics(
                metrics.clone(),
            )))),
            retries: Arc::new(RetryRegistry::new(Arc::new(RetryMetrics(metrics.clone())))),
            endpoints: Arc::new(BalanceRegistry::new()),
            concurrency: Arc::new(ConcurrencyRegistry::new()),
            concurrency_observer: Arc::new(ConcurrencyMetrics(metrics.clone())),
        }
    }

    /// Called once per policy swap, before any route stack is built from `policies`:
    /// registries that keep state across swaps (breakers, retry budgets, rate-limit
    /// buckets, endpoint health) learn the new settings, so that unchanged settings keep
    /// their state and the stacks built next pick up changed ones. `own` is the policy
    /// whose `inbound` section applies to this proxy.
    pub fn prepare(&self, policies: &[RoutePolicy], own: Option<&RoutePolicy>) {
        let g = self;
        let routes = || {
            policies
                .iter()
                .flat_map(|p| p.spec.routes.iter().map(move |r| (p, r)))
        };
        g.breakers.update(routes().flat_map(|(p, r)| {
            let params = r.circuit_breaker.as_ref().map(BreakerParams::from_policy);
            let key = route_key(p, r);
            p.spec.backends.keys().filter_map(move |b| {
                params
                    .clone()
                    .map(|params| (key.clone(), b.clone(), params))
            })
        }));
        g.retries.update(routes().filter_map(|(p, r)| {
            r.retry
                .as_ref()
                .map(|retry| (route_key(p, r), RetryParams::from_policy(retry)))
        }));
        let mut live = HashSet::new();
        let mut fleet = HashSet::new();
        for (p, r) in routes() {
            if let Some(params) = r.rate_limit.as_ref().and_then(|c| limit_params(c, &r.name)) {
                let id = route_key(p, r);
                let key = LimitKey::Outbound(id.as_str().into());
                if params.fleet {
                    // Namespace-qualified, so its Redis keys and its fleet size are its own.
                    let policy =
                        format!("{}/{}", p.metadata.namespace_or_default(), p.metadata.name);
                    g.fleet
                        .get_or_rebuild(key.clone(), &id, &policy, &r.name, &params);
                    fleet.insert(key);
                } else {
                    g.limits.get_or_rebuild(key.clone(), &params);
                    live.insert(key);
                }
            }
        }
        if let Some(params) = inbound_limit(own) {
            g.limits.get_or_rebuild(LimitKey::Inbound, &params);
            live.insert(LimitKey::Inbound);
        }
        g.limits.retain(|k| live.contains(k));
        g.fleet.retain(|k| fleet.contains(k));
        if !fleet.is_empty() && g.fleet.is_degraded() {
            tracing::warn!(
                limits = fleet.len(),
                "fleet rate limits enforced locally (perSecond / N): Redis unreachable or no --redis-url"
            );
        }
        match inbound_concurrency(own) {
            Some(params) => {
                let observer = g.concurrency_observer.clone();
                g.concurrency.get_or_rebuild((), &params, || observer);
            }
            None if !g.concurrency.is_empty() => {
                g.concurrency.retain(|_| false);
                g.concurrency_observer.on_limit(0);
            }
            None => {}
        }
        let addresses: HashSet<&str> = policies
            .iter()
            .flat_map(|p| p.spec.backends.values())
            .flat_map(|b| b.addresses.iter().map(String::as_str))
            .collect();
        g.endpoints.retain(|a| addresses.contains(a));
    }
}

/// Counts rate-limit decisions of one route into pre-resolved counters.
pub(crate) fn limit_observer(
    metrics: &Metrics,
    direction: &str,
    key: &str,
) -> Arc<dyn RateLimitObserver> {
    let (namespace, route) = key_labels(key);
    let c = |d: Decision| -> IntCounter {
        metrics
            .ratelimit_decisions
            .with_label_values(&[direction, namespace, route, d.as_str()])
    };
    let (allowed, limited, shadow) = (
        c(Decision::Allowed),
        c(Decision::Limited),
        c(Decision::Shadow),
    );
    Arc::new(move |_: &str, d: Decision| match d {
        Decision::Allowed => allowed.inc(),
        Decision::Limited => limited.inc(),
        Decision::Shadow => shadow.inc(),
    })
}

/// Counts `sluice_fallbacks_total{namespace,route,backend,reason}` (only when a fallback
/// answers).
pub(crate) fn fallback_observer(metrics: &Metrics) -> Arc<dyn FallbackObserver> {
    let fallbacks = metrics.fallbacks.clone();
    Arc::new(move |key: &str, backend: &str, reason: Reason| {
        let (namespace, route) = key_labels(key);
        fallbacks
            .with_label_values(&[namespace, route, backend, reason.as_str()])
            .inc();
    })
}

// === impl BreakerMetrics ===

/// Feeds `sluice_breaker_state` and `sluice_breaker_transitions_total`.
struct BreakerMetrics(Metrics);

impl BreakerMetrics {
    fn set(&self, key: &str, backend: &str, now: CircuitState) {
        let (namespace, route) = key_labels(key);
        for s in CircuitState::ALL {
            self.0
                .breaker_state
                .with_label_values(&[namespace, route, backend, s.as_str()])
                .set(i64::from(s == now));
        }
    }
}

impl BreakerObserver for BreakerMetrics {
    fn on_transition(
        &self,
        route: &str,
        backend: &str,
        from: CircuitState,
        to: CircuitState,
        _reason: &str,
    ) {
        self.set(route, backend, to);
        let (namespace, route) = key_labels(route);
        self.0
            .breaker_transitions
            .with_label_values(&[namespace, route, backend, from.as_str(), to.as_str()])
            .inc();
    }

    fn on_added(&self, route: &str, backend: &str) {
        self.set(route, backend, CircuitState::Closed);
    }

    fn on_removed(&self, route: &str, backend: &str) {
        let (namespace, route) = key_labels(route);
        for s in CircuitState::ALL {
            let _ =
                self.0
                    .breaker_state
                    .remove_label_values(&[namespace, route, backend, s.as_str()]);
        }
    }
}

// === impl RetryMetrics ===

/// Feeds `sluice_retries_total`; called only when a retry decision is made.
struct RetryMetrics(Metrics);

impl RetryObserver for RetryMetrics {
    fn on_outcome(&self, route: &str, backend: &str, outcome: RetryOutcome) {
        let (namespace, route) = key_labels(route);
        self.0
            .retries
            .with_label_values(&[namespace, route, backend, outcome.as_str()])
            .inc();
    }
}

/// Exports the inbound concurrency limit: `sluice_concurrency_limit`,
/// `sluice_concurrency_in_flight`, `sluice_overload_refusals_total{priority}`.
struct ConcurrencyMetrics(Metrics);

impl ConcurrencyObserver for ConcurrencyMetrics {
    fn on_limit(&self, limit: usize) {
        self.0
            .concurrency_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    fn on_refusal(&self, level: &str) {
        self.0.overload_refusals.with_label_values(&[level]).inc();
    }

    fn on_in_flight(&self, delta: i64) {
        self.0.concurrency_in_flight.add(delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The registry keys a breaker by `<namespace>/<policy>.<route>`; the admin view shows
    /// the two parts apart and finds a breaker by its route in one namespace or in all.
    #[test]
    fn breakers_are_shown_and_found_by_namespace_and_route() {
        let metrics = Metrics::new().unwrap();
        let registry = BreakerRegistry::new(Arc::new(BreakerMetrics(metrics.clone())));
        registry.update([
            ("prod/log.ingest", "v1", BreakerParams::default()),
            ("staging/log.ingest", "v1", BreakerParams::default()),
            ("staging/log.query", "v1", BreakerParams::default()),
        ]);
        let admin: &dyn BreakerAdmin = &registry;
        let shown: Vec<(String, String)> = admin
            .list()
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["namespace"].to_string(), b["route"].to_string()))
            .collect();
        let pair = |ns: &str, r: &str| (format!("{ns:?}"), format!("{r:?}"));
        assert_eq!(
            shown,
            [
                pair("prod", "log.ingest"),
                pair("staging", "log.ingest"),
                pair("staging", "log.query"),
            ]
        );
        assert_eq!(
            admin.find(None, "log.ingest", "v1"),
            ["prod/log.ingest", "staging/log.ingest"]
        );
        assert_eq!(
            admin.find(Some("staging"), "log.ingest", "v1"),
            ["staging/log.ingest"]
        );
        assert!(admin.find(Some("qa"), "log.ingest", "v1").is_empty());
        assert!(admin.find(None, "log.ingest", "v2").is_empty());
        assert!(admin.find(None, "ingest", "v1").is_empty());

        assert!(admin.open("staging/log.ingest", "v1"));
        assert!(!admin.open("log.ingest", "v1"), "a key names its namespace");
        let state = |key: &str| registry.get(key, "v1").unwrap().state();
        assert_eq!(state("staging/log.ingest"), CircuitState::Open);
        assert_eq!(state("prod/log.ingest"), CircuitState::Closed);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"sluice_breaker_state{backend="v1",namespace="staging",route="log.ingest",state="open"} 1"#
            ),
            "{text}"
        );
        assert!(admin.reset("staging/log.ingest", "v1"));
        assert!(!admin.reset("qa/log.ingest", "v1"));
        assert_eq!(state("staging/log.ingest"), CircuitState::Closed);
    }

    /// An inbound concurrency limit taken out of the proxy's own policy is dropped, and
    /// `sluice_concurrency_limit` says 0 rather than the old limit; without Redis the
    /// fleet limits start degraded.
    #[test]
    fn a_removed_inbound_concurrency_limit_leaves_no_limit_behind() {
        let with = r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: app, namespace: shop }
spec:
  host: app
  backends:
    v1: { addresses: ["127.0.0.1:1"] }
  routes:
    - name: all
  inbound:
    concurrency:
      fixed: { max: 8 }
"#;
        let without = with.replace(
            "  inbound:\n    concurrency:\n      fixed: { max: 8 }\n",
            "",
        );
        let metrics = Metrics::new().unwrap();
        let g = Governance::new(&metrics);
        let gauge = |name: &str| {
            let text = metrics.encode();
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_owned))
                .unwrap_or_else(|| panic!("{name} in\n{text}"))
        };
        assert_eq!(
            gauge("sluice_ratelimit_fleet_degraded"),
            "1",
            "no --redis-url"
        );
        let set = |yaml: &str| sluice_config::parse_policies("t.yaml", yaml).unwrap();
        let on = set(with);
        g.prepare(&on, on.first());
        assert!(!g.concurrency.is_empty());
        assert_eq!(gauge("sluice_concurrency_limit"), "8");
        let off = set(&without);
        g.prepare(&off, off.first());
        assert!(g.concurrency.is_empty());
        assert_eq!(gauge("sluice_concurrency_limit"), "0");
    }
}
