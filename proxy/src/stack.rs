//! Per-route service stacks, built once per policy swap.
//!
//! A route's stack runs, outermost first, in DESIGN.md's order:
//!
//! ```text
//! route rate limit → total timeout → split → retry → circuit breaker → balancer → pooled connection
//! ```
//!
//! Every step is a `sluice-filters` layer. The split marks its choice as a
//! [`SelectedBackend`] (index = position in the policy's `backends`); retry, breaker and
//! balancer index per-backend state with it; the balancer turns it into an [`Endpoint`];
//! the connection step ([`Upstream`]) sends the request there, failing with a typed
//! [`sluice_filters::UpstreamError`] inside [`ProxyError::Upstream`] so breaker, retry and
//! balancer can tell connect failures from resets. The inbound stack is authorization
//! of the peer identity (`inbound.allow`), then the inbound rate limit, then the inbound
//! concurrency limit (`inbound.concurrency`), in front of the local application.
//!
//! State that must survive a swap (rate-limit buckets, breakers, retry budgets, endpoint
//! latency) lives in the registries of [`Governance`]; [`StackContext::prepare`] tells
//! them the new settings once per swap, then the stacks are built from them.

use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use prometheus::IntCounter;
use sluice_config::{Route, RoutePolicy};
use sluice_filters::authz::{AllowList, AuthzLayer};
use sluice_filters::balance::{BalanceLayer, BalanceParams, BalanceRegistry, EndpointSet};
use sluice_filters::breaker::{
    BreakerLayer, BreakerObserver, BreakerParams, BreakerRegistry, Circuit, CircuitState,
};
use sluice_filters::concurrency::{
    ConcurrencyLimitLayer, ConcurrencyObserver, ConcurrencyParams, ConcurrencyRegistry,
};
use sluice_filters::ratelimit::{
    Decision, RateLimitLayer, RateLimitObserver, RateLimitParams, RateLimitRegistry,
};
use sluice_filters::retry::{RetryLayer, RetryObserver, RetryOutcome, RetryParams, RetryRegistry};
use sluice_filters::split::{SplitLayer, SplitParams};
use sluice_filters::timeout::TimeoutParams;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use tracing::warn;

use crate::ProxyError;
use crate::body::{Body, BoxError, boxed};
use crate::forward::Upstream;
use crate::metrics::{Metrics, RouteMetrics};

/// A route's compiled service: what a matched request is handed to.
pub type RouteService = BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

/// How often idle rate-limit keys are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Read-only view of the circuit breakers for the admin API (`/breakers`).
pub trait BreakerAdmin: Send + Sync + 'static {
    /// Every breaker as JSON (one object per route × backend).
    fn list(&self) -> serde_json::Value;
    /// Closes one breaker by hand; `false` when it does not exist.
    fn reset(&self, route: &str, backend: &str) -> bool;
    /// Opens one breaker by hand; `false` when it does not exist.
    fn open(&self, route: &str, backend: &str) -> bool;
}

impl BreakerAdmin for BreakerRegistry {
    fn list(&self) -> serde_json::Value {
        serde_json::to_value(self.snapshot()).unwrap_or_default()
    }

    fn reset(&self, route: &str, backend: &str) -> bool {
        BreakerRegistry::reset(self, route, backend)
    }

    fn open(&self, route: &str, backend: &str) -> bool {
        self.force_open(route, backend)
    }
}

/// Which rate limit a bucket set belongs to: outbound routes by key, or the inbound one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum LimitKey {
    Outbound(Arc<str>),
    Inbound,
}

/// The governance registries: state kept across policy swaps, shared by every stack.
#[derive(Clone)]
pub struct Governance {
    limits: Arc<RateLimitRegistry<LimitKey>>,
    breakers: Arc<BreakerRegistry>,
    retries: Arc<RetryRegistry>,
    endpoints: Arc<BalanceRegistry>,
    /// The inbound concurrency limit (one per proxy: its own service's).
    concurrency: Arc<ConcurrencyRegistry<()>>,
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
        let limits = Arc::new(RateLimitRegistry::new());
        if tokio::runtime::Handle::try_current().is_ok() {
            drop(limits.spawn_sweeper(SWEEP_EVERY));
        }
        Self {
            limits,
            breakers: Arc::new(BreakerRegistry::new(Arc::new(BreakerMetrics(
                metrics.clone(),
            )))),
            retries: Arc::new(RetryRegistry::new(Arc::new(RetryMetrics(metrics.clone())))),
            endpoints: Arc::new(BalanceRegistry::new()),
            concurrency: Arc::new(ConcurrencyRegistry::new()),
            concurrency_observer: Arc::new(ConcurrencyMetrics(metrics.clone())),
        }
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

/// What outlives policy swaps and every route stack shares: the upstream pools, the
/// metrics and the governance registries that keep state across swaps.
#[derive(Clone)]
pub struct StackContext {
    /// Pooled upstream clients.
    pub upstream: Upstream,
    /// Metric families.
    pub metrics: Metrics,
    /// Circuit breakers as the admin API sees them.
    pub breakers: Option<Arc<dyn BreakerAdmin>>,
    /// Governance registries.
    pub governance: Governance,
    /// The tracer, when `--otlp-endpoint` is set.
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
}

impl std::fmt::Debug for StackContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackContext")
            .field("governance", &self.governance)
            .finish_non_exhaustive()
    }
}

impl StackContext {
    /// A context over `upstream` counting into `metrics`, with fresh registries.
    pub fn new(upstream: Upstream, metrics: Metrics) -> Self {
        let governance = Governance::new(&metrics);
        Self {
            upstream,
            metrics,
            breakers: Some(governance.breakers.clone() as Arc<dyn BreakerAdmin>),
            governance,
            telemetry: None,
        }
    }

    /// Called once per policy swap, before any route stack is built from `policies`:
    /// registries that keep state across swaps (breakers, retry budgets, rate-limit
    /// buckets, endpoint health) learn the new settings, so that unchanged settings keep
    /// their state and the stacks built next pick up changed ones. `own` is the policy
    /// whose `inbound` section applies to this proxy.
    pub fn prepare(&self, policies: &[RoutePolicy], own: Option<&RoutePolicy>) {
        let g = &self.governance;
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
        for (p, r) in routes() {
            if let Some(params) = r.rate_limit.as_ref().and_then(|c| limit_params(c, &r.name)) {
                let key = LimitKey::Outbound(route_key(p, r).into());
                g.limits.get_or_rebuild(key.clone(), &params);
                live.insert(key);
            }
        }
        if let Some(params) = inbound_limit(own) {
            g.limits.get_or_rebuild(LimitKey::Inbound, &params);
            live.insert(LimitKey::Inbound);
        }
        g.limits.retain(|k| live.contains(k));
        match inbound_concurrency(own) {
            Some(params) => {
                let observer = g.concurrency_observer.clone();
                g.concurrency.get_or_rebuild((), &params, || observer);
            }
            None => {
                if !g.concurrency.is_empty() {
                    g.concurrency.retain(|_| false);
                    g.concurrency_observer.on_limit(0);
                }
            }
        }
        let addresses: HashSet<&str> = policies
            .iter()
            .flat_map(|p| p.spec.backends.values())
            .flat_map(|b| b.addresses.iter().map(String::as_str))
            .collect();
        g.endpoints.retain(|a| addresses.contains(a));
    }
}

/// The key of a route in the registries, metrics and admin paths: `<policy>.<route>`,
/// unique across the snapshot (route names alone may repeat across policies).
fn route_key(policy: &RoutePolicy, route: &Route) -> String {
    format!("{}.{}", policy.metadata.name, route.name)
}

fn limit_params(cfg: &sluice_config::RateLimit, name: &str) -> Option<RateLimitParams> {
    match RateLimitParams::from_config(cfg) {
        Ok(p) => Some(p.named(name)),
        // The validator refuses these first; a proxy never drops traffic over one.
        Err(e) => {
            warn!(limit = name, "rate limit not applied: {e}");
            None
        }
    }
}

fn inbound_limit(own: Option<&RoutePolicy>) -> Option<RateLimitParams> {
    own.and_then(|p| p.spec.inbound.as_ref())
        .and_then(|i| i.rate_limit.as_ref())
        .and_then(|c| limit_params(c, "inbound"))
}

/// The inbound concurrency limit of this proxy's own policy (`inbound.concurrency`).
pub fn inbound_concurrency(own: Option<&RoutePolicy>) -> Option<ConcurrencyParams> {
    let cfg = own
        .and_then(|p| p.spec.inbound.as_ref())
        .and_then(|i| i.concurrency.as_ref())?;
    match ConcurrencyParams::from_config(cfg) {
        Ok(p) => Some(p),
        // The validator refuses these first; a proxy never drops traffic over one.
        Err(e) => {
            warn!("concurrency limit not applied: {e}");
            None
        }
    }
}

/// Counts rate-limit decisions of one route into pre-resolved counters.
fn limit_observer(metrics: &Metrics, direction: &str, route: &str) -> Arc<dyn RateLimitObserver> {
    let c = |d: Decision| -> IntCounter {
        metrics
            .ratelimit_decisions
            .with_label_values(&[direction, route, d.as_str()])
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

// === impl BreakerMetrics ===

/// Feeds `sluice_breaker_state` and `sluice_breaker_transitions_total`.
struct BreakerMetrics(Metrics);

const STATES: [CircuitState; 3] = [
    CircuitState::Closed,
    CircuitState::Open,
    CircuitState::HalfOpen,
];

impl BreakerMetrics {
    fn set(&self, route: &str, backend: &str, now: CircuitState) {
        for s in STATES {
            self.0
                .breaker_state
                .with_label_values(&[route, backend, s.as_str()])
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
        self.0
            .breaker_transitions
            .with_label_values(&[route, backend, from.as_str(), to.as_str()])
            .inc();
    }

    fn on_added(&self, route: &str, backend: &str) {
        self.set(route, backend, CircuitState::Closed);
    }

    fn on_removed(&self, route: &str, backend: &str) {
        for s in STATES {
            let _ = self
                .0
                .breaker_state
                .remove_label_values(&[route, backend, s.as_str()]);
        }
    }
}

// === impl RetryMetrics ===

/// Feeds `sluice_retries_total`; called only when a retry decision is made.
struct RetryMetrics(Metrics);

impl RetryObserver for RetryMetrics {
    fn on_outcome(&self, route: &str, backend: &str, outcome: RetryOutcome) {
        self.0
            .retries
            .with_label_values(&[route, backend, outcome.as_str()])
            .inc();
    }
}

/// One backend of a policy, compiled.
#[derive(Debug)]
pub struct BackendParams {
    /// Position in the policy's `backends` (also the metrics index).
    pub index: usize,
    /// Name as written in the policy.
    pub name: Arc<str>,
    /// `host:port` endpoints in file order (checked to parse as an authority).
    pub endpoints: Arc<[Arc<str>]>,
    /// SPIFFE identity to expect (mTLS).
    pub identity: Option<Arc<str>>,
}

/// Everything a route's layers are built from, built once per swap.
#[derive(Debug)]
pub struct RouteParams {
    /// The policy's `metadata.name`.
    pub policy: Arc<str>,
    /// The policy's host.
    pub host: Arc<str>,
    /// Route name as written in the policy.
    pub name: Arc<str>,
    /// `<policy>.<route>`: the route's key in breakers, retry budgets, rate-limit buckets,
    /// `/breakers` and every metric's `route` label (route names repeat across policies).
    pub key: Arc<str>,
    /// The route as written: timeout, rate limit, retry, breaker and split rules.
    pub route: Route,
    /// The policy's backends, in file order.
    pub backends: Arc<[Arc<BackendParams>]>,
    /// The split's rules, compiled.
    split: Arc<SplitParams>,
    /// The route's (or the inbound) rate limit.
    limit: Option<RateLimitParams>,
    /// Total and per-try timeouts.
    timeouts: TimeoutParams,
}

impl RouteParams {
    /// Compiles route `index` of `policy`, sharing the policy's compiled `backends`.
    pub fn new(
        policy: &RoutePolicy,
        index: usize,
        backends: Arc<[Arc<BackendParams>]>,
    ) -> Result<Self, ProxyError> {
        let route = policy.spec.routes[index].clone();
        let split = SplitParams::from_config(&route, backends.iter().map(|b| &*b.name))
            .map_err(|e| ProxyError::Compile(e.to_string()))?;
        Ok(Self {
            policy: policy.metadata.name.as_str().into(),
            host: policy.spec.host.as_str().into(),
            name: route.name.as_str().into(),
            key: route_key(policy, &route).into(),
            limit: route
                .rate_limit
                .as_ref()
                .and_then(|c| limit_params(c, &route.name)),
            timeouts: TimeoutParams::from_config(&route),
            split: Arc::new(split),
            route,
            backends,
        })
    }

    /// Params of the inbound pseudo-route: one backend, the local application, behind
    /// the inbound rate limit of `policy` (the one whose host is `--service`).
    pub fn inbound(app: Authority, policy: Option<&RoutePolicy>) -> Self {
        let backends: Arc<[Arc<BackendParams>]> = Arc::new([Arc::new(BackendParams {
            index: 0,
            name: "app".into(),
            endpoints: Arc::new([Arc::from(app.as_str())]),
            identity: None,
        })]);
        let route = Route {
            access_log: policy
                .and_then(|p| p.spec.inbound.as_ref())
                .and_then(|i| i.access_log),
            ..Route::default()
        };
        let split = SplitParams::from_config(&route, ["app"])
            .expect("a route without split rules takes its only backend");
        Self {
            policy: policy
                .map(|p| p.metadata.name.as_str())
                .unwrap_or("")
                .into(),
            host: policy.map(|p| p.spec.host.as_str()).unwrap_or("").into(),
            name: "inbound".into(),
            key: "inbound".into(),
            limit: inbound_limit(policy),
            timeouts: TimeoutParams::default(),
            split: Arc::new(split),
            route,
            backends,
        }
    }
}

/// Compiles a policy's backends.
pub fn compile_backends(policy: &RoutePolicy) -> Result<Arc<[Arc<BackendParams>]>, ProxyError> {
    policy
        .spec
        .backends
        .iter()
        .enumerate()
        .map(|(index, (name, b))| {
            let endpoints = b
                .addresses
                .iter()
                .map(|a| match a.parse::<Authority>() {
                    Ok(_) => Ok(Arc::from(a.as_str())),
                    Err(_) => Err(ProxyError::Compile(format!(
                        "policy {} backend {name}: invalid address {a:?}",
                        policy.metadata.name
                    ))),
                })
                .collect::<Result<Arc<[_]>, _>>()?;
            Ok(Arc::new(BackendParams {
                index,
                name: name.as_str().into(),
                endpoints,
                identity: b.identity.as_deref().map(Into::into),
            }))
        })
        .collect()
}

/// A matched route: its params, its compiled stack and its metric handles.
#[derive(Debug)]
pub struct RouteEntry {
    /// What the stack was built from.
    pub params: Arc<RouteParams>,
    /// The stack a request is handed to (cloned per request).
    pub service: RouteService,
    /// Metric handles for this route × each backend.
    pub metrics: RouteMetrics,
}

fn limit_layer(
    ctx: &StackContext,
    direction: &str,
    key: LimitKey,
    params: &RouteParams,
) -> Option<RateLimitLayer> {
    let limit = params.limit.as_ref()?;
    let limiter = ctx.governance.limits.get_or_rebuild(key, limit);
    Some(RateLimitLayer::new(limiter).with_observer(limit_observer(
        &ctx.metrics,
        direction,
        &params.key,
    )))
}

/// Builds the outbound stack of one route.
pub fn build_outbound(ctx: &StackContext, params: Arc<RouteParams>) -> RouteEntry {
    let g = &ctx.governance;
    let names: Vec<&str> = params.backends.iter().map(|b| &*b.name).collect();
    let metrics = ctx.metrics.route("outbound", &params.key, &names);
    let limit = limit_layer(
        ctx,
        "outbound",
        LimitKey::Outbound(params.key.clone()),
        &params,
    );
    // The retry layer labels outcomes with the split's backend; "-" is never seen.
    let retry = match g.retries.get(&params.key) {
        Some(r) => RetryLayer::new(r, "-"),
        None => RetryLayer::disabled("-"),
    };
    let circuits: Arc<[Option<Arc<Circuit>>]> = params
        .backends
        .iter()
        .map(|b| g.breakers.get(&params.key, &b.name))
        .collect();
    let sets: Arc<[Arc<EndpointSet>]> = params
        .backends
        .iter()
        .map(|b| {
            g.endpoints.endpoint_set(&BalanceParams::new(
                &b.name,
                b.endpoints.iter().map(|e| &**e),
            ))
        })
        .collect();
    let service = ServiceBuilder::new()
        .option_layer(limit)
        .layer(params.timeouts.total_layer())
        .layer(SplitLayer::new(params.split.clone()))
        .map_response(|r: Response<sluice_filters::breaker::ResponseBody<Body>>| r.map(boxed))
        // Retry enforces `perTryTimeout` itself, so no per-try timeout layer below it.
        .layer(retry)
        .layer(BreakerLayer::per_backend(circuits))
        .layer(BalanceLayer::new(sets))
        .map_request(|r: Request<sluice_filters::retry::ReplayBody<Body>>| r.map(boxed))
        .service(ctx.upstream.for_backends(&params.backends));
    RouteEntry {
        params,
        service: BoxCloneSyncService::new(service),
        metrics,
    }
}

/// Builds the inbound stack: everything goes to the local application. `own` is the
/// policy whose host is this proxy's `--service`, whose `inbound` section applies.
pub fn build_inbound(ctx: &StackContext, app: Authority, own: Option<&RoutePolicy>) -> RouteEntry {
    let params = Arc::new(RouteParams::inbound(app, own));
    let metrics = ctx.metrics.route("inbound", &params.key, &["app"]);
    let limit = limit_layer(ctx, "inbound", LimitKey::Inbound, &params);
    // A peer outside `inbound.allow` is refused before it spends the inbound quota.
    let allow = AllowList::from_config(own.and_then(|p| p.spec.inbound.as_ref()));
    // Requests refused above never take a slot of the concurrency limit.
    let concurrency = ctx
        .governance
        .concurrency
        .get(&())
        .map(ConcurrencyLimitLayer::new);
    let service = ServiceBuilder::new()
        .layer(AuthzLayer::new(allow))
        .option_layer(limit)
        .option_layer(concurrency)
        .layer(AppEndpointLayer::new(params.backends[0].clone()))
        .service(ctx.upstream.clone());
    RouteEntry {
        params,
        service: BoxCloneSyncService::new(service),
        metrics,
    }
}

// === impl AppEndpoint ===

pub use sluice_filters::balance::Endpoint;
pub use sluice_filters::split::SelectedBackend;

/// Layer of [`AppEndpoint`].
#[derive(Clone, Debug)]
pub struct AppEndpointLayer {
    backend: SelectedBackend,
    endpoint: Endpoint,
}

impl AppEndpointLayer {
    /// Sends to `backend`'s first endpoint (the inbound application).
    pub fn new(backend: Arc<BackendParams>) -> Self {
        Self {
            endpoint: Endpoint(backend.endpoints[0].clone()),
            backend: SelectedBackend {
                name: backend.name.clone(),
                index: backend.index,
            },
        }
    }
}

impl<S> tower::Layer<S> for AppEndpointLayer {
    type Service = AppEndpoint<S>;

    fn layer(&self, inner: S) -> AppEndpoint<S> {
        AppEndpoint {
            layer: self.clone(),
            inner,
        }
    }
}

/// The inbound side's split and balancer in one: there is one backend with one address.
#[derive(Clone, Debug)]
pub struct AppEndpoint<S> {
    layer: AppEndpointLayer,
    inner: S,
}

impl<S> tower::Service<Request<Body>> for AppEndpoint<S>
where
    S: tower::Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> S::Future {
        let ext = req.extensions_mut();
        ext.insert(self.layer.backend.clone());
        ext.insert(self.layer.endpoint.clone());
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: logs }
spec:
  host: logs
  backends:
    v1: { addresses: ["127.0.0.1:9101"] }
    v2: { addresses: ["log-v2.example:9102", "127.0.0.1:9103"] }
  routes:
    - name: split
      circuitBreaker: { consecutiveFailures: 2 }
      retry: { attempts: 1 }
      rateLimit: { perSecond: 5 }
      split:
        - when: { headers: { x-canary: "true" } }
          backend: v2
        - weights: { v1: 0, v2: 100 }
"#;

    #[tokio::test]
    async fn prepare_registers_breakers_retries_and_limits_per_route_key() {
        let policies = sluice_config::parse_policies("t.yaml", POLICY).unwrap();
        let ctx = StackContext::new(Upstream::new(), Metrics::new().unwrap());
        ctx.prepare(&policies, None);
        let backends = compile_backends(&policies[0]).unwrap();
        assert_eq!(&*backends[1].endpoints[0], "log-v2.example:9102");
        let params = RouteParams::new(&policies[0], 0, backends).unwrap();
        assert_eq!(&*params.key, "logs.split");
        let g = &ctx.governance;
        assert!(g.breakers.get("logs.split", "v1").is_some());
        assert!(g.breakers.get("logs.split", "v2").is_some());
        assert!(g.retries.get("logs.split").is_some());
        assert_eq!(g.limits.len(), 1);
        let list = ctx.breakers.as_ref().unwrap().list();
        assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
        assert!(ctx.metrics.encode().contains("sluice_breaker_state"));
        // A swap without the route drops its state.
        ctx.prepare(&[], None);
        assert!(g.breakers.get("logs.split", "v1").is_none());
        assert!(g.retries.get("logs.split").is_none());
        assert_eq!(g.limits.len(), 0);
    }
}
