//! A policy's routes and backends compiled into what the stacks are built from, once
//! per policy swap: [`RouteParams`], [`BackendParams`] and the route keys that name a
//! route in registries, metrics and admin paths.

use std::sync::Arc;

use http::uri::Authority;
use sluice_config::{Route, RoutePolicy};
use sluice_filters::concurrency::ConcurrencyParams;
use sluice_filters::fallback::FallbackParams;
use sluice_filters::ratelimit::RateLimitParams;
use sluice_filters::retry::DEFAULT_MAX_REPLAY_BYTES;
use sluice_filters::split::SplitParams;
use sluice_filters::timeout::TimeoutParams;
use tracing::warn;

use crate::ProxyError;

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
    /// `slowStart` as written (`None`: the default).
    pub slow_start: Option<std::time::Duration>,
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
    /// `<namespace>/<policy>.<route>`: the route's key in breakers, retry budgets,
    /// rate-limit buckets and traffic reports, shown as the `namespace` and `route`
    /// labels of metrics and `/breakers` (split by `route::key_labels`).
    pub key: Arc<str>,
    /// The policy's namespace (`default` when it names none): the `namespace` label.
    pub namespace: Arc<str>,
    /// `<policy>.<route>`: the `route` label of metrics, traces, access logs and `/recent`.
    pub label: Arc<str>,
    /// The route as written: timeout, rate limit, retry, breaker and split rules.
    pub route: Route,
    /// The policy's backends, in file order.
    pub backends: Arc<[Arc<BackendParams>]>,
    /// The split's rules, compiled: what picks a request's backend (and what
    /// `sluicectl explain` asks which backend a header value goes to).
    pub split: Arc<SplitParams>,
    /// The route's (or the inbound) rate limit.
    pub(crate) limit: Option<RateLimitParams>,
    /// Total and per-try timeouts.
    pub(crate) timeouts: TimeoutParams,
    /// What answers once the primary failed (`fallback`).
    pub(crate) fallback: Option<Arc<FallbackParams>>,
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
        let max_replay_bytes = route
            .retry
            .as_ref()
            .and_then(|r| r.max_replay_bytes)
            .unwrap_or(DEFAULT_MAX_REPLAY_BYTES);
        let fallback = route
            .fallback
            .as_ref()
            .map(|f| {
                FallbackParams::from_config(f, backends.iter().map(|b| &*b.name), max_replay_bytes)
                    .map(Arc::new)
                    .map_err(|e| ProxyError::Compile(e.to_string()))
            })
            .transpose()?;
        Ok(Self {
            fallback,
            policy: policy.metadata.name.as_str().into(),
            host: policy.spec.host.as_str().into(),
            name: route.name.as_str().into(),
            key: route_key(policy, &route).into(),
            namespace: policy.metadata.namespace_or_default().into(),
            label: format!("{}.{}", policy.metadata.name, route.name).into(),
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
            slow_start: None,
        })]);
        // The app takes every upgrade some route of its own policy lets callers make.
        let mut upgrades: Vec<String> = policy
            .iter()
            .flat_map(|p| &p.spec.routes)
            .flat_map(|r| r.upgrades.iter().cloned())
            .collect();
        upgrades.sort();
        upgrades.dedup();
        let route = Route {
            access_log: policy
                .and_then(|p| p.spec.inbound.as_ref())
                .and_then(|i| i.access_log),
            upgrades,
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
            // The pseudo-route is one per proxy; its namespace is only a label.
            key: match policy {
                Some(p) => format!("{}/inbound", p.metadata.namespace_or_default()).into(),
                None => "inbound".into(),
            },
            namespace: policy
                .map(|p| p.metadata.namespace_or_default())
                .unwrap_or("")
                .into(),
            label: "inbound".into(),
            limit: inbound_limit(policy),
            timeouts: TimeoutParams::default(),
            fallback: None,
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
                slow_start: b.slow_start.map(|d| d.get()),
            }))
        })
        .collect()
}

/// The key of a route in the registries: `<namespace>/<policy>.<route>`, unique across
/// the snapshot (route names repeat across policies, policy names across namespaces).
/// It is shown as two labels, `namespace` and `route` (see [`key_labels`]).
pub(crate) fn route_key(policy: &RoutePolicy, route: &Route) -> String {
    format!(
        "{}/{}.{}",
        policy.metadata.namespace_or_default(),
        policy.metadata.name,
        route.name
    )
}

/// The `namespace` and `route` (`<policy>.<route>`) labels of a route key; Kubernetes
/// names hold no `/`, so the first one splits them. A key without one (tests' own
/// registries) has an empty namespace.
pub(crate) fn key_labels(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

pub(crate) fn limit_params(cfg: &sluice_config::RateLimit, name: &str) -> Option<RateLimitParams> {
    match RateLimitParams::from_config(cfg) {
        Ok(p) => Some(p.named(name)),
        // The validator refuses these first; a proxy never drops traffic over one.
        Err(e) => {
            warn!(limit = name, "rate limit not applied: {e}");
            None
        }
    }
}

pub(crate) fn inbound_limit(own: Option<&RoutePolicy>) -> Option<RateLimitParams> {
    own.and_then(|p| p.spec.inbound.as_ref())
        .and_then(|i| i.rate_limit.as_ref())
        .and_then(|c| limit_params(c, "inbound"))
}

/// The inbound concurrency limit of this proxy's own policy (`inbound.concurrency`).
pub(crate) fn inbound_concurrency(own: Option<&RoutePolicy>) -> Option<ConcurrencyParams> {
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
