//! `sluice-filters`: traffic governance as tower layers over `http::Request`/`Response`.
//!
//! Each concern is a module laid out like tower's middleware (`layer`, `service`,
//! `future`), reads its settings from a `Params` value built from the policy once
//! per policy swap, and knows nothing of sockets, files or gRPC transport. Layers
//! fail with [`FilterError`]; the proxy turns it into a response.
//!
//! # The layers
//!
//! - [`ratelimit`]: token buckets per route (optionally per key), kept across swaps.
//! - [`timeout`]: the route's total time.
//! - [`split`]: picks the backend (header rules, weights, sticky) and records it.
//! - [`fallback`]: once the primary has failed for a listed reason, another backend or a
//!   static answer, marked `x-sluice-degraded`.
//! - [`retry`]: re-sends failed tries within a budget; enforces `perTryTimeout` itself.
//! - [`breaker`]: one circuit breaker per route × backend.
//! - [`balance`]: power of two choices over an endpoint set, with ejection.
//! - [`authz`]: the inbound `allow` list of peer identities.
//!
//! The layers pass what they decided to each other only through the request extensions
//! of [`extensions`] (the chosen backend, the endpoint, a try's deadline, the peer's
//! identity), never through each other's types. [`reason::Reason`] is the one list of
//! `x-sluice-reason` values with their HTTP and gRPC status. The layers tell the time
//! with [`clock::now`], which a connection's task run under [`clock::Frozen`] reads once
//! per poll. The order the proxy stacks them in, and how it builds them from the policy
//! at each swap, is documented with the proxy's stack builder (`sluice_proxy::stack`).

#![warn(missing_docs, unreachable_pub)]

pub mod authz;
pub mod balance;
pub mod breaker;
mod classify;
pub mod clock;
pub mod concurrency;
mod error;
pub mod extensions;
pub mod fallback;
pub mod random;
pub mod ratelimit;
pub mod reason;
mod registry;
mod replay;
pub mod retry;
pub mod split;
pub mod timeout;
mod window;

pub use error::{AtBackend, ErrorChain, FilterError, find_filter_error};
pub use error::{UpstreamError, UpstreamErrorKind};
