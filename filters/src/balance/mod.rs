//! Endpoint balancing: power of two choices over peak-EWMA latency, with ejection.
//!
//! Each backend's addresses form an [`EndpointSet`]. Per request, [`Balance`] reads the
//! [`SelectedBackend`](crate::extensions::SelectedBackend) chosen by the split (backend 0 when
//! absent), samples two endpoints of that backend at random and takes the one with the
//! lower cost — its peak-EWMA round-trip time, decayed toward zero over the time since its
//! last sample (so that an endpoint starved after one slow answer is tried again), times
//! its requests in flight plus one. It
//! records the choice as the [`Endpoint`](crate::extensions::Endpoint) of the request's [`Routing`](crate::extensions::Routing) extension, which tells the proxy's
//! connector what to dial, and calls its single inner service.
//!
//! A request whose inner call fails with a connect failure (by default an
//! [`UpstreamError`] of kind `ConnectFailure` anywhere in the error's
//! source chain) ejects its endpoint for 1 s, doubling on each failed probe up to 30 s. When
//! the ejection ends, one request is let through as a probe; its success restores the
//! endpoint. With every endpoint ejected the request fails with
//! [`FilterError::NoHealthyEndpoint`](crate::FilterError::NoHealthyEndpoint).
//!
//! Slow start (`slowStart`, default 10 s): an endpoint first seen, or back from ejection,
//! ramps in. Its weight is the fraction of `slowStart` elapsed since then; when P2C samples
//! it beside an endpoint of higher weight, it competes only with the probability of the
//! ratio of their weights, so its share grows linearly to an equal one. An endpoint that
//! has not answered a request yet is taken the first time it is sampled with nothing in
//! flight, so at low load a new endpoint is reached within a few requests (and measured)
//! instead of losing every comparison on the default RTT estimate.
//!
//! This is our own implementation over atomics rather than tower's `balance::p2c`: tower's
//! balancer owns one inner service per endpoint behind a `Discover` stream and a ready
//! cache, which would make the proxy rebuild services on every policy swap and poll each
//! endpoint's readiness per request. Here endpoint state is plain atomics shared by every
//! request and kept across swaps by address in a [`BalanceRegistry`].

mod endpoint;
mod future;
mod layer;
mod service;
#[cfg(test)]
mod tests;

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use crate::{UpstreamError, UpstreamErrorKind};

pub use endpoint::{BalanceRegistry, EndpointSet, EndpointState, EndpointView, Health};
pub use future::ResponseFuture;
pub use layer::BalanceLayer;
pub use service::Balance;

/// Balancing settings of one backend, built from the policy once per swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalanceParams {
    /// Backend name, reported in `NoHealthyEndpoint`.
    pub backend: Arc<str>,
    /// The backend's addresses in file order.
    pub addresses: Arc<[Arc<str>]>,
    /// First ejection after a connect failure.
    pub eject_base: Duration,
    /// Longest ejection; each failed probe doubles the previous one up to this.
    pub eject_max: Duration,
    /// Latency assumed for an endpoint that has not answered yet.
    pub default_rtt: Duration,
    /// How fast old latency samples fade (the EWMA's time constant).
    pub decay: Duration,
    /// How long an endpoint first seen, or back from ejection, takes to ramp up to its
    /// full share (`slowStart`; zero: at once).
    pub slow_start: Duration,
    /// The SPIFFE ID the backend expects its endpoints to prove (`identity`), if any.
    /// Endpoint state is kept per address and identity: an address that fails one
    /// backend's identity check is not taken from a backend expecting another.
    pub identity: Option<Arc<str>>,
}

/// `slowStart` when a backend does not say.
pub const DEFAULT_SLOW_START: Duration = sluice_config::defaults::SLOW_START;

impl BalanceParams {
    /// Params for backend `name` with its `addresses` and default tuning
    /// (eject 1 s doubling to 30 s, default RTT 30 ms, decay 10 s, slow start 10 s).
    pub fn new<'a>(name: &str, addresses: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            backend: Arc::from(name),
            addresses: addresses.into_iter().map(Arc::from).collect(),
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(30),
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
            slow_start: DEFAULT_SLOW_START,
            identity: None,
        }
    }

    /// The same params expecting `identity` of every endpoint (a backend's `identity`).
    pub fn with_identity(mut self, identity: Option<Arc<str>>) -> Self {
        self.identity = identity;
        self
    }

    /// The same params with `slow_start` (a backend's `slowStart`, default 10 s).
    pub fn with_slow_start(mut self, slow_start: Option<Duration>) -> Self {
        self.slow_start = slow_start.unwrap_or(DEFAULT_SLOW_START);
        self
    }

    /// Params for one backend of a policy (`spec.backends[name]`).
    pub fn from_config(name: &str, backend: &sluice_config::Backend) -> Self {
        Self::new(name, backend.addresses.iter().map(String::as_str))
            .with_slow_start(backend.slow_start.map(|d| d.get()))
            .with_identity(backend.identity.as_deref().map(Arc::from))
    }
}

/// Decides whether an inner error means the endpoint refused the connection.
pub type ConnectFailureClassifier = fn(&(dyn Error + 'static)) -> bool;

/// The default classifier: an [`UpstreamError`] of kind `ConnectFailure` anywhere in the chain.
pub fn is_connect_failure(err: &(dyn Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(u) = e.downcast_ref::<UpstreamError>() {
            return u.kind == UpstreamErrorKind::ConnectFailure;
        }
        cur = e.source();
    }
    false
}
