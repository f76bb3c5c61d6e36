//! The request extensions the layers pass to each other and to the proxy.
//!
//! A layer that records something about a request for a layer below (or for the proxy's
//! client) does it with one of these types in the request's extensions, so layers share
//! these few types and never each other's internals:
//!
//! | type | written by | read by |
//! |---|---|---|
//! | [`PeerIdentity`] | the proxy (mTLS) | authorization, rate limit (`peerIdentity` key) |
//! | [`Routing`]`.backend` ([`SelectedBackend`]) | split, fallback | retry, breaker, balance, the proxy's client |
//! | [`Routing`]`.deadline` ([`Deadline`]) | retry (each try) | breaker |
//! | [`Routing`]`.endpoint` ([`Endpoint`]) | balance | the proxy's client |
//! | [`RetryCount`] | the proxy (traced or logged requests) | retry |
//!
//! The three a route's stack writes for every request share one extension, [`Routing`]:
//! each extension is an allocation and a map entry of its own, and these three were
//! written, read and removed on every request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use http::Extensions;
use tokio::time::Instant;

/// The authenticated peer of a request (its SPIFFE ID), set as a request extension by mTLS.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity(pub Arc<str>);

/// The backend the split chose, carried in [`Routing`] for the layers below.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SelectedBackend {
    /// Backend name as written in the policy.
    pub name: Arc<str>,
    /// Position of the backend in the policy's `backends`, in file order.
    pub index: usize,
}

/// The instant at which whoever sent a request stops waiting for it.
///
/// The retry layer sets it in [`Routing`] for each try: its per-try timeout, or the
/// deadline already on the incoming request if that is earlier. A call the breaker sees
/// dropped at or after its deadline counts as a `timeout` failure; dropped earlier, as
/// cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// The address the request is to be sent to (`host:port`, IP or DNS name), carried in
/// [`Routing`] from the balancer to the proxy's connector.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint(pub Arc<str>);

/// What a route's layers decided about one request, for the layers below and the
/// proxy's client: the backend, the try's deadline and the endpoint, in one extension.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    /// The backend the split (or a fallback) chose.
    pub backend: Option<SelectedBackend>,
    /// When the sender of this try stops waiting for it.
    pub deadline: Option<Deadline>,
    /// The address the balancer chose.
    pub endpoint: Option<Endpoint>,
}

impl Routing {
    /// The request's routing, if any layer wrote some.
    pub fn of(ext: &Extensions) -> Option<&Routing> {
        ext.get::<Routing>()
    }

    /// The request's routing, added empty if no layer wrote any yet.
    pub fn of_mut(ext: &mut Extensions) -> &mut Routing {
        ext.get_or_insert_default::<Routing>()
    }

    /// The backend chosen for the request, if any.
    pub fn backend(ext: &Extensions) -> Option<&SelectedBackend> {
        Self::of(ext)?.backend.as_ref()
    }

    /// The deadline of the request's try, if any.
    pub fn deadline(ext: &Extensions) -> Option<Instant> {
        Some(Self::of(ext)?.deadline?.0)
    }

    /// The endpoint chosen for the request, if any.
    pub fn endpoint(ext: &Extensions) -> Option<&Endpoint> {
        Self::of(ext)?.endpoint.as_ref()
    }
}

/// The number of retries sent for one request. Put one into a request's extensions to
/// learn it afterwards (the proxy does so for traced requests, for `sluice.retries`):
/// every try carries a copy of the head, and clones share the count. Requests without
/// one cost nothing extra.
#[derive(Clone, Debug, Default)]
pub struct RetryCount(Arc<AtomicU32>);

impl RetryCount {
    /// A count at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Retries sent so far.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn add_one(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}
