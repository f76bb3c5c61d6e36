//! The request extensions the layers pass to each other and to the proxy.
//!
//! A layer that records something about a request for a layer below (or for the proxy's
//! client) does it with one of these types in the request's extensions, so layers share
//! these few types and never each other's internals:
//!
//! | type | written by | read by |
//! |---|---|---|
//! | [`PeerIdentity`] | the proxy (mTLS) | authorization, rate limit (`peerIdentity` key) |
//! | [`SelectedBackend`] | split | retry, breaker, balance, the proxy's client |
//! | [`Deadline`] | retry (each try), a route timeout | breaker |
//! | [`Endpoint`] | balance | the proxy's client |
//! | [`RetryCount`] | the proxy (traced or logged requests) | retry |

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::time::Instant;

/// The authenticated peer of a request (its SPIFFE ID), set as a request extension by mTLS.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity(pub Arc<str>);

/// The backend the split chose, set as a request extension for the layers below.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SelectedBackend {
    /// Backend name as written in the policy.
    pub name: Arc<str>,
    /// Position of the backend in the policy's `backends`, in file order.
    pub index: usize,
}

/// The instant at which whoever sent a request stops waiting for it.
///
/// The retry layer sets it for each try (its per-try timeout), and a route timeout
/// above may set it too (the earlier wins). A call the breaker sees dropped at or
/// after its deadline counts as a `timeout` failure; dropped earlier, as cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// The address the request is to be sent to (`host:port`, IP or DNS name), set as a request
/// extension by the balancer for the proxy's connector.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint(pub Arc<str>);

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
