//! Fleet-wide rate limits (`rateLimit.scope: fleet`): one quota for every caller of a
//! route, counted in a store all proxies share (Redis), with no call to it on the
//! request path.
//!
//! Each key of a limit has one token bucket in the store (capacity `burst`, refilled at
//! `perSecond`). A proxy holds a [`share`](FleetLimiter) of each key it sees: tokens
//! taken from the bucket beforehand (a lease), spent by requests with one
//! compare-and-swap. The sync task ([`FleetRegistry::spawn_sync`]) reconciles every
//! share of every limit in one batch per interval ([`LeaseStore::exchange`]): it pays a
//! first-seen key's credit, tops each share up to twice the demand it saw in the last
//! interval (at least `⌈burst / N⌉`), and gives back what an idle share holds. While
//! the store does not answer, requests are decided by a local bucket of
//! `perSecond / N` and marked degraded; the first answer ends that.

mod limiter;
mod share;
mod sync;
#[cfg(test)]
mod tests;

pub use limiter::{FleetLimiter, FleetRegistry, FleetSettings, FleetVerdict, REDIS_KEY_PREFIX};
pub use sync::{
    BackendError, FleetObserver, FleetSizes, LeaseFuture, LeaseGrant, LeaseRequest, LeaseStore,
    NoopFleetObserver, SyncOptions,
};
