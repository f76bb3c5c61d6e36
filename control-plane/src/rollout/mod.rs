//! Canary rollouts driven by the proxies' own counters.
//!
//! - [`reports`]: the proxies' traffic reports, summed per (policy, route, backend)
//!   until the driver takes them, and the per-route count of proxies with traffic
//!   that is sent back to proxies outside the policy version.

pub mod reports;

pub use reports::{ReportBook, Window};
