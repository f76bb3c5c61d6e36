//! Traffic split: picks the backend of each request (header rules, then weights, sticky).
//!
//! [`Split`] does not own one inner service per backend. It decides, records the choice as
//! a [`SelectedBackend`](crate::extensions::SelectedBackend) in the request's [`Routing`](crate::extensions::Routing) extension and calls its single inner service. The layers
//! below (retry, breaker, balancer) read that choice and index per-backend state that the
//! proxy built once per policy swap in file order (`SelectedBackend::index` is the backend's
//! position in `spec.backends`). So the whole stack below the split is built once per route
//! and swap, readiness stays a single `poll_ready`, and a retry re-sends to the same
//! backend without deciding again.
//!
//! Rules are tried in file order; the first whose `when` headers all match (a repeated
//! request header on any of its values, as a route's match) decides. A
//! weighted rule walks its weights in file order over a point in `[0, 10000)`: a random one
//! per request, or with `stickyBy`, [`sticky_point`] of the header's value — a fixed,
//! unseeded FNV-1a hash, the same on every sidecar and across restarts. Because the walk
//! keeps file order, raising a canary listed last from 10 to 20 moves only the users whose
//! points lie in `[8000, 9000)`, all of them into the canary.

mod layer;
mod params;
mod service;
#[cfg(test)]
mod tests;

pub use layer::SplitLayer;
pub use params::{SplitChoice, SplitConfigError, SplitParams};
pub use service::Split;

/// Points a weighted split is walked over: one point is 0.01 %.
pub const POINTS: u32 = sluice_config::STICKY_POINTS;

/// The sticky point of a header value: `sluice-config`'s fixed, unseeded FNV-1a 64 mod
/// 10000, so the proxy, the validator and every release agree on it.
pub use sluice_config::sticky_point;
