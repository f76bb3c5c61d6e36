//! `sluice-filters`: traffic governance as tower layers over `http::Request`/`Response`.
//!
//! Each concern is a module laid out like tower's middleware (`layer`, `service`,
//! `future`), reads its settings from a `Params` value built from the policy once
//! per policy swap, and knows nothing of sockets, files or gRPC transport. Layers
//! fail with [`FilterError`]; the proxy turns it into a response.

#![warn(missing_docs, unreachable_pub)]

pub mod balance;
pub mod breaker;
mod error;
pub mod ratelimit;
pub mod retry;
pub mod split;
pub mod timeout;

pub use error::{FilterError, find_filter_error};
pub use error::{UpstreamError, UpstreamErrorKind};
