//! Per-route service stacks, built once per policy swap.
//!
//! A route's stack runs, outermost first, in DESIGN.md's order:
//!
//! ```text
//! route rate limit → total timeout → split → retry → circuit breaker → balancer → pooled connection
//! ```
//!
//! Until the governance layers of `sluice-filters` are wired in, the split slot holds
//! [`PickBackend`] (header rules, else the first weighted backend) and the balancer
//! slot holds [`FirstEndpoint`]. They speak the same request extensions as the
//! `sluice-filters` layers that replace them: the split step marks its choice as a
//! [`SelectedBackend`] (index = position in the policy's `backends`), the balancer step
//! turns that into an [`Endpoint`], and the connection step ([`Upstream`]) sends the
//! request there, failing with a typed [`sluice_filters::UpstreamError`] inside
//! [`ProxyError::Upstream`].

use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::Authority;
use http::{HeaderMap, Request, Response};
use sluice_config::{Route, RoutePolicy};
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::ProxyError;
use crate::body::{Body, BoxError};
use crate::forward::Upstream;
use crate::metrics::{Metrics, RouteMetrics};
use crate::policy::table::{HeaderConds, compile_headers, headers_match};

/// A route's compiled service: what a matched request is handed to.
pub type RouteService = BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

/// Read-only view of the circuit breakers for the admin API (`/breakers`).
pub trait BreakerAdmin: Send + Sync + 'static {
    /// Every breaker as JSON (one object per route × backend).
    fn list(&self) -> serde_json::Value;
    /// Closes one breaker by hand; `false` when it does not exist.
    fn reset(&self, route: &str, backend: &str) -> bool;
    /// Opens one breaker by hand; `false` when it does not exist.
    fn open(&self, route: &str, backend: &str) -> bool;
}

/// What outlives policy swaps and every route stack shares: the upstream pools, the
/// metrics, and (once wired) the governance registries that keep state across swaps.
#[derive(Clone)]
pub struct StackContext {
    /// Pooled upstream clients.
    pub upstream: Upstream,
    /// Metric families.
    pub metrics: Metrics,
    /// Circuit breakers, when a registry is plugged in.
    pub breakers: Option<Arc<dyn BreakerAdmin>>,
}

impl std::fmt::Debug for StackContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackContext")
            .field("breakers", &self.breakers.is_some())
            .finish_non_exhaustive()
    }
}

impl StackContext {
    /// Called once per policy swap, before any route stack is built from `policies`:
    /// the place where registries that keep state across swaps (breakers, rate-limit
    /// buckets, endpoint health) learn the new settings, so that unchanged settings keep
    /// their state and the stacks built next pick up changed ones.
    pub fn prepare(&self, policies: &[RoutePolicy]) {
        let _ = policies;
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
    /// Route name (metrics, admin).
    pub name: Arc<str>,
    /// The route as written: timeout, rate limit, retry, breaker and split rules.
    pub route: Route,
    /// The policy's backends, in file order.
    pub backends: Arc<[Arc<BackendParams>]>,
    /// Header rules of the split, compiled.
    split_rules: Box<[(HeaderConds, usize)]>,
    /// Backend when no header rule matches.
    split_default: Option<usize>,
}

impl RouteParams {
    /// Compiles route `index` of `policy`, sharing the policy's compiled `backends`.
    pub fn new(
        policy: &RoutePolicy,
        index: usize,
        backends: Arc<[Arc<BackendParams>]>,
    ) -> Result<Self, ProxyError> {
        let route = policy.spec.routes[index].clone();
        let find = |name: &str| {
            backends
                .iter()
                .position(|b| &*b.name == name)
                .ok_or_else(|| ProxyError::Compile(format!("unknown backend {name:?}")))
        };
        let mut split_rules = Vec::new();
        let mut split_default = None;
        for rule in &route.split {
            if let Some(backend) = &rule.backend {
                let conds = match &rule.when {
                    Some(w) => compile_headers(&w.headers)?,
                    None => Box::default(),
                };
                split_rules.push((conds, find(backend)?));
            } else if let Some(weights) = &rule.weights
                && split_default.is_none()
            {
                split_default = weights
                    .iter()
                    .find(|(_, w)| **w > 0)
                    .map(|(name, _)| find(name))
                    .transpose()?;
            }
        }
        if route.split.is_empty() && !backends.is_empty() {
            split_default = Some(0);
        }
        Ok(Self {
            policy: policy.metadata.name.as_str().into(),
            host: policy.spec.host.as_str().into(),
            name: route.name.as_str().into(),
            route,
            backends,
            split_rules: split_rules.into_boxed_slice(),
            split_default,
        })
    }

    /// Params of the inbound pseudo-route: one backend, the local application.
    pub fn inbound(app: Authority, policy: Option<&RoutePolicy>) -> Self {
        let backends: Arc<[Arc<BackendParams>]> = Arc::new([Arc::new(BackendParams {
            index: 0,
            name: "app".into(),
            endpoints: Arc::new([Arc::from(app.as_str())]),
            identity: None,
        })]);
        Self {
            policy: policy
                .map(|p| p.metadata.name.as_str())
                .unwrap_or("")
                .into(),
            host: policy.map(|p| p.spec.host.as_str()).unwrap_or("").into(),
            name: "inbound".into(),
            route: Route::default(),
            backends,
            split_rules: Box::default(),
            split_default: Some(0),
        }
    }

    /// The backend a request goes to, until the split layer takes over: the first
    /// `backend` rule whose headers match, else the first weighted backend with a
    /// non-zero share, else the policy's only backend.
    pub fn pick_backend(&self, headers: &HeaderMap) -> Option<&Arc<BackendParams>> {
        let idx = self
            .split_rules
            .iter()
            .find(|(conds, _)| headers_match(conds, headers))
            .map(|(_, i)| *i)
            .or(self.split_default)?;
        self.backends.get(idx)
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

/// Builds the outbound stack of one route.
pub fn build_outbound(ctx: &StackContext, params: Arc<RouteParams>) -> RouteEntry {
    let names: Vec<&str> = params.backends.iter().map(|b| &*b.name).collect();
    let metrics = ctx.metrics.route("outbound", &params.name, &names);
    let service = ServiceBuilder::new()
        // Governance slots, in order: route rate limit, total timeout.
        .layer(PickBackendLayer::new(params.clone()))
        // Then retry and circuit breaker (route × backend).
        .layer(FirstEndpointLayer::new(params.backends.clone()))
        .service(ctx.upstream.clone());
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
    let metrics = ctx.metrics.route("inbound", &params.name, &["app"]);
    let service = ServiceBuilder::new()
        // Governance slots, in order, both from `own.spec.inbound`: authorize the peer
        // identity (`allow`), then the inbound rate limit (`rateLimit`, per serving pod).
        .layer(PickBackendLayer::new(params.clone()))
        .layer(FirstEndpointLayer::new(params.backends.clone()))
        .service(ctx.upstream.clone());
    RouteEntry {
        params,
        service: BoxCloneSyncService::new(service),
        metrics,
    }
}

// === impl PickBackend ===

pub use sluice_filters::balance::Endpoint;
pub use sluice_filters::split::SelectedBackend;

/// Layer of [`PickBackend`].
#[derive(Clone, Debug)]
pub struct PickBackendLayer {
    params: Arc<RouteParams>,
}

impl PickBackendLayer {
    /// Picks among `params`' backends.
    pub fn new(params: Arc<RouteParams>) -> Self {
        Self { params }
    }
}

impl<S> tower::Layer<S> for PickBackendLayer {
    type Service = PickBackend<S>;

    fn layer(&self, inner: S) -> PickBackend<S> {
        PickBackend {
            params: self.params.clone(),
            inner,
        }
    }
}

/// Stand-in for the split layer: chooses a backend with [`RouteParams::pick_backend`].
#[derive(Clone, Debug)]
pub struct PickBackend<S> {
    params: Arc<RouteParams>,
    inner: S,
}

impl<S> tower::Service<Request<Body>> for PickBackend<S>
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
        if let Some(b) = self.params.pick_backend(req.headers()) {
            req.extensions_mut().insert(SelectedBackend {
                name: b.name.clone(),
                index: b.index,
            });
        }
        self.inner.call(req)
    }
}

// === impl FirstEndpoint ===

/// Layer of [`FirstEndpoint`].
#[derive(Clone, Debug)]
pub struct FirstEndpointLayer {
    backends: Arc<[Arc<BackendParams>]>,
}

impl FirstEndpointLayer {
    /// Sends to `backends`, indexed by [`SelectedBackend::index`].
    pub fn new(backends: Arc<[Arc<BackendParams>]>) -> Self {
        Self { backends }
    }
}

impl<S> tower::Layer<S> for FirstEndpointLayer {
    type Service = FirstEndpoint<S>;

    fn layer(&self, inner: S) -> FirstEndpoint<S> {
        FirstEndpoint {
            backends: self.backends.clone(),
            inner,
        }
    }
}

/// Stand-in for the balancer: sends to the chosen backend's first endpoint.
#[derive(Clone, Debug)]
pub struct FirstEndpoint<S> {
    backends: Arc<[Arc<BackendParams>]>,
    inner: S,
}

impl<S> tower::Service<Request<Body>> for FirstEndpoint<S>
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
        let endpoint = req
            .extensions()
            .get::<SelectedBackend>()
            .and_then(|b| self.backends.get(b.index))
            .and_then(|b| b.endpoints.first().cloned());
        if let Some(e) = endpoint {
            req.extensions_mut().insert(Endpoint(e));
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
      split:
        - when: { headers: { x-canary: "true" } }
          backend: v2
        - weights: { v1: 0, v2: 100 }
    - name: weighted
      match: { path: { prefix: /w } }
      split:
        - weights: { v1: 90, v2: 10 }
"#;

    #[test]
    fn picks_by_header_then_weights() {
        let policies = sluice_config::parse_policies("t.yaml", POLICY).unwrap();
        let backends = compile_backends(&policies[0]).unwrap();
        assert_eq!(&*backends[1].endpoints[0], "log-v2.example:9102");
        let split = RouteParams::new(&policies[0], 0, backends.clone()).unwrap();
        let weighted = RouteParams::new(&policies[0], 1, backends).unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(&*split.pick_backend(&h).unwrap().name, "v2");
        assert_eq!(&*weighted.pick_backend(&h).unwrap().name, "v1");
        h.insert("x-canary", HeaderValue::from_static("true"));
        assert_eq!(&*split.pick_backend(&h).unwrap().name, "v2");
        assert_eq!(&*weighted.pick_backend(&h).unwrap().name, "v1");
    }
}
