//! Per-route service stacks, built once per policy swap.
//!
//! A route's stack runs, outermost first, in DESIGN.md's order:
//!
//! ```text
//! route rate limit → total timeout → split → [fallback] → retry → circuit breaker → balancer → pooled connection
//! ```
//!
//! No timeout layer is built: on a route without a fallback the retry layer enforces
//! the total timeout itself
//! ([`RetryLayer::with_total`](sluice_filters::retry::RetryLayer::with_total)), on a
//! route with one the fallback layer does
//! ([`FallbackLayer::with_total`](sluice_filters::fallback::FallbackLayer::with_total)).
//! The split above them never waits, so the request sees the same deadline and the
//! same 504, with one timer instead of two, and the 504 names the backend that had the
//! request when the time ran out (the primary, or the fallback backend).
//!
//! The fallback layer is stacked only on routes with `fallback`.
//!
//! Every step is a `sluice-filters` layer. The split marks its choice as a
//! [`SelectedBackend`] (index = position in the policy's `backends`); retry, breaker and
//! balancer index per-backend state with it; the balancer turns it into an [`Endpoint`];
//! the connection step ([`Upstream`]) sends the request there, failing with a typed
//! [`sluice_filters::UpstreamError`] inside [`crate::ProxyError::Upstream`] so breaker, retry and
//! balancer can tell connect failures from resets. The inbound stack is authorization
//! of the peer identity (`inbound.allow`), then the inbound rate limit, then the inbound
//! concurrency limit (`inbound.concurrency`), in front of the local application.
//!
//! The stacks are built from a route's compiled [`RouteParams`] ([`crate::route`]). State
//! that must survive a swap (rate-limit buckets, breakers, retry budgets, endpoint
//! latency) lives in the registries of [`Governance`] ([`crate::governance`]);
//! [`StackContext::prepare`] tells them the new settings once per swap, then the stacks
//! are built from them.
//!
//! # How each layer is built and kept across swaps
//!
//! Everything below is built once per policy swap; per request nothing is looked up by
//! name.
//!
//! - **Rate limit** ([`ratelimit`](sluice_filters::ratelimit)). Params: [`RateLimitParams::from_config(&cfg)`](sluice_filters::ratelimit::RateLimitParams::from_config)`?.named(route)`.
//!   At swap: `registry.get_or_rebuild(route_key, &params)` on one
//!   [`RateLimitRegistry<K>`](sluice_filters::ratelimit::RateLimitRegistry) the proxy keeps for its lifetime
//!   (keyed by `LimitKey`: the outbound route key, or the inbound limit), then
//!   `registry.retain(|k| live(k))`; a periodic task calls `registry.sweep()` (every ~10 s)
//!   to drop idle keys. Layer:
//!   [`RateLimitLayer::new(limiter)`](sluice_filters::ratelimit::RateLimitLayer::new)`.with_observer(obs)`,
//!   where `obs: Arc<dyn `[`RateLimitObserver`](sluice_filters::ratelimit::RateLimitObserver)`>` counts
//!   `sluice_ratelimit_decisions_total` (the proxy bakes `direction`/`route` into it).
//!   Reads the [`PeerIdentity`](sluice_filters::extensions::PeerIdentity) extension (set by mTLS) for
//!   `key: {peerIdentity: true}`. Error: [`FilterError::RateLimited`](sluice_filters::FilterError::RateLimited); allowed responses get
//!   `RateLimit-Policy`/`RateLimit`. The proxy's rescue (`rescue.rs`) answers any `FilterError` by
//!   its [`Reason`](sluice_filters::reason::Reason) and adds
//!   [`refusal_headers`](sluice_filters::ratelimit::refusal_headers) (`retry-after`, RateLimit headers).
//!   A `scope: fleet` route limit instead comes from the
//!   [`FleetRegistry`](sluice_filters::ratelimit::fleet::FleetRegistry) (reconciled with Redis by
//!   [`crate::fleet::spawn`]) as [`RateLimitLayer::fleet(limiter)`](sluice_filters::ratelimit::RateLimitLayer::fleet);
//!   answers of its local fallback carry `x-sluice-ratelimit-scope: degraded-local`.
//! - **Timeout** ([`timeout`](sluice_filters::timeout)). Params: [`TimeoutParams::from_config(&route)`](sluice_filters::timeout::TimeoutParams::from_config);
//!   the total is enforced by the retry or the fallback layer (`with_total`), so
//!   `params.total_layer()` is not stacked on a route. The per-try
//!   timeout is the retry layer's own. No state, no extensions. Error: [`FilterError::Timeout`](sluice_filters::FilterError::Timeout) (504 `timeout`).
//! - **Split** ([`split`](sluice_filters::split)). Params:
//!   [`SplitParams::from_config(&route, spec.backends.keys().map(String::as_str))`](sluice_filters::split::SplitParams::from_config)`?`
//!   in an `Arc`; layer [`SplitLayer::new(params)`](sluice_filters::split::SplitLayer::new). No state. Writes
//!   the [`SelectedBackend`] into the request's [`Routing`] extension (`index` = position in
//!   `spec.backends`), which the retry, breaker and balancer read to index per-backend
//!   state built for that route × backend. Never fails.
//! - **Balance** ([`balance`](sluice_filters::balance)). Params: [`BalanceParams::from_config(name, &backend)`](sluice_filters::balance::BalanceParams::from_config)
//!   per backend. At swap: `registry.endpoint_set(&params)` on one
//!   [`BalanceRegistry`](sluice_filters::balance::BalanceRegistry) (endpoint latency and ejections are kept
//!   by address), then `registry.retain(|addr| live(addr))`. Layer:
//!   [`BalanceLayer::new(Arc<[Arc<EndpointSet>]>)`](sluice_filters::balance::BalanceLayer::new) with one set
//!   per backend in `spec.backends` order. Reads `SelectedBackend`, writes the
//!   [`Endpoint`] into [`Routing`]: the `host:port` the client must dial. Ejects
//!   an endpoint when the inner error chain holds an [`UpstreamError`](sluice_filters::UpstreamError) of kind
//!   `ConnectFailure` (override with `classify_with`). Error:
//!   [`FilterError::NoHealthyEndpoint`](sluice_filters::FilterError::NoHealthyEndpoint) (503 `no-healthy-endpoint`).
//! - **Fallback** ([`fallback`](sluice_filters::fallback)), only on routes with `fallback`.
//!   Params: [`FallbackParams::from_config(&f, backend names, maxReplayBytes)`](sluice_filters::fallback::FallbackParams::from_config)
//!   in [`RouteParams`]. No state. Layer
//!   [`FallbackLayer::new(params, route_key, observer)`](sluice_filters::fallback::FallbackLayer::new),
//!   the observer counting `sluice_fallbacks_total`. A fallback backend is re-sent through
//!   the same retry → breaker → balancer stack with its own `SelectedBackend`, so it has
//!   its own breaker (route × backend) and endpoint set. Answers carry `x-sluice-degraded`.
//! - **Retry** ([`retry`](sluice_filters::retry)). Params: [`RetryParams::from_policy(&route.retry)`](sluice_filters::retry::RetryParams::from_policy).
//!   At swap: `retries.update([(route_key, params), …])` on one
//!   [`RetryRegistry`](sluice_filters::retry::RetryRegistry) (built with an
//!   `Arc<dyn `[`RetryObserver`](sluice_filters::retry::RetryObserver)`>` counting `sluice_retries_total`); a
//!   route with unchanged params keeps its budget. Layer:
//!   [`RetryLayer::new(retries.get(route_key)?, backend_label)`](sluice_filters::retry::RetryLayer::new), or
//!   [`RetryLayer::disabled(label)`](sluice_filters::retry::RetryLayer::disabled) for a route without `retry`
//!   (same type). It re-calls the same inner service, so every try keeps the split's
//!   `SelectedBackend`; it enforces `perTryTimeout` itself (so no per-try timeout layer sits
//!   below it) and puts a [`Deadline`](sluice_filters::extensions::Deadline) on each try.
//!   The request body becomes [`ReplayBody<B>`](sluice_filters::retry::ReplayBody). Errors: whatever the last
//!   try gave; never retries [`FilterError::BreakerOpen`](sluice_filters::FilterError::BreakerOpen).
//! - **Breaker** ([`breaker`](sluice_filters::breaker)). Params: [`BreakerParams::from_policy(&route.circuit_breaker)`](sluice_filters::breaker::BreakerParams::from_policy).
//!   At swap: `breakers.update([(route_key, backend, params), …])` on one
//!   [`BreakerRegistry`](sluice_filters::breaker::BreakerRegistry) (built with an
//!   `Arc<dyn `[`BreakerObserver`](sluice_filters::breaker::BreakerObserver)`>` for `sluice_breaker_state` and
//!   `sluice_breaker_transitions_total`); unchanged params keep state. Layer:
//!   [`BreakerLayer::per_backend(Arc<[Option<Arc<Circuit>>]>)`](sluice_filters::breaker::BreakerLayer::per_backend)
//!   in `spec.backends` order (reads `SelectedBackend`), or
//!   [`BreakerLayer::new(circuit)`](sluice_filters::breaker::BreakerLayer::new) in a per-backend stack. The
//!   response body becomes [`breaker::ResponseBody<B>`](sluice_filters::breaker::ResponseBody) (watches gRPC trailers, buffers
//!   nothing). Admin: `breakers.snapshot()` (serde) for `GET /breakers`,
//!   `breakers.reset(route, backend)` / `breakers.force_open(route, backend)` for the `POST`s.
//!   Error: [`FilterError::BreakerOpen`](sluice_filters::FilterError::BreakerOpen) (503 `breaker-open`). Transport errors should reach
//!   both layers as an [`UpstreamError`](sluice_filters::UpstreamError) so they can tell connect failures from resets.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use http_body_util::{Either, Full};
use sluice_config::RoutePolicy;
use sluice_filters::authz::{AllowList, AuthzLayer};
use sluice_filters::balance::{BalanceLayer, BalanceParams, EndpointSet};
use sluice_filters::breaker::{BreakerLayer, Circuit};
use sluice_filters::concurrency::ConcurrencyLimitLayer;
use sluice_filters::extensions::{Endpoint, Routing, SelectedBackend};
use sluice_filters::fallback::FallbackLayer;
use sluice_filters::ratelimit::RateLimitLayer;
use sluice_filters::retry::{ReplayBody, RetryLayer};
use sluice_filters::split::SplitLayer;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceBuilder};

use crate::body::{Body, BoxError, boxed};
use crate::governance::{BreakerAdmin, Governance, LimitKey, fallback_observer, limit_observer};
use crate::metrics::{Metrics, RouteMetrics};
use crate::route::{BackendParams, RouteParams};
use crate::upstream::Upstream;

/// A route's compiled service: what a matched request is handed to.
pub type RouteService = BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

/// What outlives policy swaps and every route stack shares: the upstream pools, the
/// metrics and the governance registries that keep state across swaps.
#[derive(Clone)]
pub struct StackContext {
    /// Pooled upstream clients.
    pub upstream: Upstream,
    /// Metric families.
    pub metrics: Metrics,
    /// Circuit breakers as the admin API sees them.
    pub breakers: Arc<dyn BreakerAdmin>,
    /// Governance registries.
    pub governance: Governance,
    /// The tracer, when `--otlp-endpoint` is set.
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    /// The ring of recent requests, when `--recent-requests` is above 0.
    pub recent: Option<Arc<crate::recent::RecentRequests>>,
    /// How many proxies have traffic on each (policy, route), as the control plane
    /// last said (empty without one): what a fleet-wide limit divides by when its
    /// shared counter is out of reach. Read without a lock.
    pub route_traffic: Arc<sluice_api::RouteTraffic>,
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
        Self::with_governance(upstream, metrics, governance)
    }

    /// A context over `upstream` counting into `metrics`, with these registries.
    pub fn with_governance(upstream: Upstream, metrics: Metrics, governance: Governance) -> Self {
        Self {
            upstream,
            metrics,
            breakers: governance.breakers.clone() as Arc<dyn BreakerAdmin>,
            governance,
            telemetry: None,
            recent: None,
            route_traffic: sluice_api::RouteTraffic::new(),
        }
    }

    /// Called once per policy swap, before any route stack is built from `policies`:
    /// the registries learn the new settings ([`Governance::prepare`]). `own` is the
    /// policy whose `inbound` section applies to this proxy.
    pub fn prepare(&self, policies: &[RoutePolicy], own: Option<&RoutePolicy>) {
        self.governance.prepare(policies, own);
    }
}

/// A matched route: its params, its compiled stack and its metric handles.
#[derive(Debug)]
pub struct RouteEntry {
    /// What the stack was built from.
    pub params: Arc<RouteParams>,
    /// The stack a request is handed to: cloned for it, unless its worker kept one
    /// (`crate::kept`).
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
    let layer = match &key {
        LimitKey::Outbound(id) if limit.fleet => {
            RateLimitLayer::fleet(ctx.governance.fleet.get_or_rebuild(
                key.clone(),
                id,
                &params.policy,
                &params.name,
                limit,
            ))
        }
        _ => RateLimitLayer::new(ctx.governance.limits.get_or_rebuild(key, limit)),
    };
    Some(layer.with_observer(limit_observer(&ctx.metrics, direction, &params.key)))
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
    // Without a fallback between them, the retry layer enforces the total timeout
    // itself: one timer per request for the earlier of it and the per-try deadline.
    // With one, the fallback layer does, so that it names the backend it cut off.
    let (total_in_fallback, total_in_retry) = match params.fallback {
        None => (None, params.timeouts.total),
        Some(_) => (params.timeouts.total, None),
    };
    // The retry layer labels outcomes with the split's backend; "-" is never seen.
    let retry = match g.retries.get(&params.key) {
        Some(r) => RetryLayer::new(r, "-"),
        None => RetryLayer::disabled("-"),
    }
    .with_total(total_in_retry);
    let circuits: Arc<[Option<Arc<Circuit>>]> = params
        .backends
        .iter()
        .map(|b| g.breakers.get(&params.key, &b.name))
        .collect();
    let sets: Arc<[Arc<EndpointSet>]> = params
        .backends
        .iter()
        .map(|b| {
            g.endpoints.endpoint_set(
                &BalanceParams::new(&b.name, b.endpoints.iter().map(|e| &**e))
                    .with_slow_start(b.slow_start)
                    .with_identity(b.identity.clone()),
            )
        })
        .collect();
    // Retry enforces `perTryTimeout` itself, so no per-try timeout layer below it.
    let lower = ServiceBuilder::new()
        // A body the breaker no longer watches goes on as it came, not boxed once more.
        .map_response(|r: Response<sluice_filters::breaker::ResponseBody<Body>>| {
            r.map(|b| b.into_untracked().unwrap_or_else(boxed))
        })
        .layer(retry)
        .layer(BreakerLayer::per_backend(circuits))
        .layer(BalanceLayer::new(sets))
        .map_request(|r: Request<ReplayBody<Body>>| r.map(boxed))
        .service(ctx.upstream.for_backends(&params.backends));
    let split = SplitLayer::new(params.split.clone());
    // Only a route with a fallback pays for the fallback layer (and for boxing its bodies
    // once more). Without one the retry layer enforces the total, so no timeout layer is
    // built; and a route with no rate limit gets no layer for it either. A layer that
    // would only pass requests through still costs its call, its future's polls and a
    // move of the whole future below it into its own, on every request.
    let service = match (&params.fallback, limit) {
        (None, Some(limit)) => BoxCloneSyncService::new(
            ServiceBuilder::new()
                .layer(limit)
                .layer(split)
                .service(lower),
        ),
        (None, None) => BoxCloneSyncService::new(split.layer(lower)),
        (Some(fallback), limit) => BoxCloneSyncService::new(
            ServiceBuilder::new()
                .option_layer(limit)
                .layer(split)
                .map_response(|r: Response<Either<Body, Full<Bytes>>>| r.map(boxed))
                .layer(
                    FallbackLayer::new(
                        fallback.clone(),
                        params.key.clone(),
                        fallback_observer(&ctx.metrics),
                    )
                    .with_total(total_in_fallback),
                )
                .map_request(|r: Request<ReplayBody<Body>>| r.map(boxed))
                .service(lower),
        ),
    };
    RouteEntry {
        params,
        service,
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
    let app = AppEndpointLayer::new(params.backends[0].clone()).layer(ctx.upstream.clone());
    let authz = ServiceBuilder::new().layer(AuthzLayer::new(allow));
    // A layer that is off is left out rather than built as a pass-through (as on the
    // outbound side): each would cost a call, a wrapping future and its polls per request.
    let service = match (limit, concurrency) {
        (Some(limit), Some(concurrency)) => {
            BoxCloneSyncService::new(authz.layer(limit).layer(concurrency).service(app))
        }
        (Some(limit), None) => BoxCloneSyncService::new(authz.layer(limit).service(app)),
        (None, Some(concurrency)) => {
            BoxCloneSyncService::new(authz.layer(concurrency).service(app))
        }
        (None, None) => BoxCloneSyncService::new(authz.service(app)),
    };
    RouteEntry {
        params,
        service,
        metrics,
    }
}

// === impl AppEndpoint ===

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
        let routing = Routing::of_mut(req.extensions_mut());
        routing.backend = Some(self.layer.backend.clone());
        routing.endpoint = Some(self.layer.endpoint.clone());
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::compile_backends;

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
        assert_eq!(&*params.key, "default/logs.split");
        assert_eq!(
            (&*params.namespace, &*params.label),
            ("default", "logs.split")
        );
        let g = &ctx.governance;
        assert!(g.breakers.get("default/logs.split", "v1").is_some());
        assert!(g.breakers.get("default/logs.split", "v2").is_some());
        assert!(g.retries.get("default/logs.split").is_some());
        assert_eq!(g.limits.len(), 1);
        let list = ctx.breakers.list();
        assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
        assert!(ctx.metrics.encode().contains("sluice_breaker_state"));
        // A swap without the route drops its state.
        ctx.prepare(&[], None);
        assert!(g.breakers.get("default/logs.split", "v1").is_none());
        assert!(g.retries.get("default/logs.split").is_none());
        assert_eq!(g.limits.len(), 0);
    }
}
