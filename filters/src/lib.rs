//! `sluice-filters`: traffic governance as tower layers over `http::Request`/`Response`.
//!
//! Each concern is a module laid out like tower's middleware (`layer`, `service`,
//! `future`), reads its settings from a `Params` value built from the policy once
//! per policy swap, and knows nothing of sockets, files or gRPC transport. Layers
//! fail with [`FilterError`]; the proxy turns it into a response.
//!
//! # Rate limit, timeout, split and balancing: how the proxy composes them
//!
//! Per route, outermost first, the outbound stack is
//! `RateLimit → Timeout(total) → Split → retry → Timeout(per try) → breaker → Balance →`
//! the proxy's client. The inbound stack puts a [`RateLimit`](ratelimit::RateLimit) (the
//! `inbound.rateLimit`) after authorization. Everything below is built once per policy
//! swap; per request nothing is looked up by name.
//!
//! - **Rate limit** ([`ratelimit`]). Params: [`RateLimitParams::from_config(&cfg)`](ratelimit::RateLimitParams::from_config)`?.named(route)`.
//!   At swap: `registry.get_or_rebuild(route_key, &params)` on one
//!   [`RateLimitRegistry<K>`](ratelimit::RateLimitRegistry) the proxy keeps for its lifetime
//!   (route key of its choosing, e.g. `(direction, policy, route)`), then
//!   `registry.retain(|k| live(k))`; a periodic task calls `registry.sweep()` (every ~10 s)
//!   to drop idle keys. Layer:
//!   [`RateLimitLayer::new(limiter)`](ratelimit::RateLimitLayer::new)`.with_observer(obs)`,
//!   where `obs: Arc<dyn `[`RateLimitObserver`](ratelimit::RateLimitObserver)`>` counts
//!   `sluice_ratelimit_decisions_total` (the proxy bakes `direction`/`route` into it).
//!   Reads the [`PeerIdentity`](extensions::PeerIdentity) extension (set by mTLS) for
//!   `key: {peerIdentity: true}`. Error: [`FilterError::RateLimited`]; allowed responses get
//!   `RateLimit-Policy`/`RateLimit`. The proxy's rescue answers any `FilterError` with
//!   [`refusal_response(&err, is_grpc(req.headers()))`](ratelimit::refusal_response)
//!   (429 + `retry-after`, or a gRPC trailers-only status).
//! - **Timeout** ([`timeout`]). Params: [`TimeoutParams::from_config(&route)`](timeout::TimeoutParams::from_config);
//!   layers `params.total_layer()` and `params.per_try_layer()` (a `None` duration passes
//!   through). No state, no extensions. Error: [`FilterError::Timeout`] (504 `timeout`).
//! - **Split** ([`split`]). Params:
//!   [`SplitParams::from_config(&route, spec.backends.keys().map(String::as_str))`](split::SplitParams::from_config)`?`
//!   in an `Arc`; layer [`SplitLayer::new(params)`](split::SplitLayer::new). No state. Writes
//!   the [`SelectedBackend`](extensions::SelectedBackend) extension (`index` = position in
//!   `spec.backends`), which the retry, breaker and balancer read to index per-backend
//!   state built for that route × backend. Never fails.
//! - **Balance** ([`balance`]). Params: [`BalanceParams::from_config(name, &backend)`](balance::BalanceParams::from_config)
//!   per backend. At swap: `registry.endpoint_set(&params)` on one
//!   [`BalanceRegistry`](balance::BalanceRegistry) (endpoint latency and ejections are kept
//!   by address), then `registry.retain(|addr| live(addr))`. Layer:
//!   [`BalanceLayer::new(Arc<[Arc<EndpointSet>]>)`](balance::BalanceLayer::new) with one set
//!   per backend in `spec.backends` order. Reads `SelectedBackend`, writes the
//!   [`Endpoint`](extensions::Endpoint) extension: the `host:port` the client must dial. Ejects
//!   an endpoint when the inner error chain holds an [`UpstreamError`] of kind
//!   `ConnectFailure` (override with `classify_with`). Error:
//!   [`FilterError::NoHealthyEndpoint`] (503 `no-healthy-endpoint`).
//! - **Retry** ([`retry`]). Params: [`RetryParams::from_policy(&route.retry)`](retry::RetryParams::from_policy).
//!   At swap: `retries.update([(route_key, params), …])` on one
//!   [`RetryRegistry`](retry::RetryRegistry) (built with an
//!   `Arc<dyn `[`RetryObserver`](retry::RetryObserver)`>` counting `sluice_retries_total`); a
//!   route with unchanged params keeps its budget. Layer:
//!   [`RetryLayer::new(retries.get(route_key)?, backend_label)`](retry::RetryLayer::new), or
//!   [`RetryLayer::disabled(label)`](retry::RetryLayer::disabled) for a route without `retry`
//!   (same type). It re-calls the same inner service, so every try keeps the split's
//!   `SelectedBackend`; it enforces `perTryTimeout` itself (a `Timeout(per try)` layer below
//!   it is then redundant, harmless) and puts a [`Deadline`](extensions::Deadline) on each try.
//!   The request body becomes [`ReplayBody<B>`](retry::ReplayBody). Errors: whatever the last
//!   try gave; never retries [`FilterError::BreakerOpen`].
//! - **Breaker** ([`breaker`]). Params: [`BreakerParams::from_policy(&route.circuit_breaker)`](breaker::BreakerParams::from_policy).
//!   At swap: `breakers.update([(route_key, backend, params), …])` on one
//!   [`BreakerRegistry`](breaker::BreakerRegistry) (built with an
//!   `Arc<dyn `[`BreakerObserver`](breaker::BreakerObserver)`>` for `sluice_breaker_state` and
//!   `sluice_breaker_transitions_total`); unchanged params keep state. Layer:
//!   [`BreakerLayer::per_backend(Arc<[Option<Arc<Circuit>>]>)`](breaker::BreakerLayer::per_backend)
//!   in `spec.backends` order (reads `SelectedBackend`), or
//!   [`BreakerLayer::new(circuit)`](breaker::BreakerLayer::new) in a per-backend stack. The
//!   response body becomes [`breaker::ResponseBody<B>`] (watches gRPC trailers, buffers
//!   nothing). Admin: `breakers.snapshot()` (serde) for `GET /breakers`,
//!   `breakers.reset(route, backend)` / `breakers.force_open(route, backend)` for the `POST`s.
//!   Error: [`FilterError::BreakerOpen`] (503 `breaker-open`). Transport errors should reach
//!   both layers as an [`UpstreamError`] so they can tell connect failures from resets.

#![warn(missing_docs, unreachable_pub)]

pub mod authz;
pub mod balance;
pub mod breaker;
mod classify;
pub mod concurrency;
mod error;
pub mod extensions;
pub mod ratelimit;
pub mod retry;
pub mod split;
pub mod timeout;

pub use error::{FilterError, find_filter_error};
pub use error::{UpstreamError, UpstreamErrorKind};
