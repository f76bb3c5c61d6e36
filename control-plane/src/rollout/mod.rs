//! Canary rollouts driven by the proxies' own counters.
//!
//! - [`reports`]: the proxies' traffic reports, summed per (policy, route, backend)
//!   until the driver takes them, and the per-route count of proxies with traffic
//!   that is sent back to proxies outside the policy version.
//! - [`engine`]: one rollout as a pure state machine (steps, acks, windows,
//!   significance, terminal states), tested on a fake clock.
//! - [`driver`]: the rollouts of the published set: the effective weights in the
//!   snapshots, acks, the reports and the time fed to the engine, persistence in
//!   `--state-dir`, metrics and a log event per transition.
//! - [`forward`]: on a replica that does not hold the lease, the proxies' reports
//!   relayed to the one that does (only the holder judges).
//! - [`clock`]: the time the driver judges by and the traffic counts age by; tests
//!   move it forward rather than wait.
//! - `admin`: `GET /rollouts` and `POST /rollouts/<ns>/<policy>/<route>/<command>`.

pub(crate) mod admin;
pub mod clock;
pub mod driver;
pub mod engine;
pub mod forward;
pub mod reports;

pub use clock::Clock;
pub use driver::{FrozenWeights, RolloutId, Rollouts};
pub use reports::{ReportBook, Window};

/// A policy with one rollout, for tests: route `ingest` of RoutePolicy `shop/log`
/// moves from `v1` to `v2` in steps of 10, 50 and 100 %, each interval 1 s.
#[cfg(test)]
pub(crate) const TEST_POLICY: &str = r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log, namespace: shop }
spec:
  host: log
  backends:
    v1: { addresses: ["127.0.0.1:1"] }
    v2: { addresses: ["127.0.0.1:2"] }
  routes:
    - name: ingest
      split:
        - weights: { v1: 100, v2: 0 }
          rollout:
            canary: v2
            steps: [10, 50, 100]
            interval: 1s
"#;
