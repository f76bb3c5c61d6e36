//! `sluice-api`: the gRPC API between Sluice proxies and the control plane.
//!
//! [`pb`] holds the generated protobuf types and tonic client/server for the
//! policy stream (`sluice.v1.PolicyDiscovery/StreamPolicies`), a bidirectional
//! stream in the manner of xDS ADS: the proxy says [`pb::Hello`], the control
//! plane sends [`pb::Snapshot`]s, and the proxy answers each with [`pb::Ack`] or
//! [`pb::Nack`]. It also holds the identity service
//! (`sluice.v1.Identity/Certify`): a proxy sends a CSR and its bootstrap
//! credential and receives its workload certificate.
//!
//! [`subscriber`] is the proxy's side of that stream: it connects, re-validates
//! every snapshot with `sluice-config`, hands good ones to a [`SnapshotSink`],
//! acknowledges or refuses them, persists the last applied snapshot, and
//! reconnects with jittered exponential backoff while the last snapshot stays in
//! force. The control plane's side lives in `sluice-control-plane`.
//!
//! [`report`] is what the proxy says about its traffic on the same stream (counter
//! deltas per route × backend) and what the control plane answers (how many proxies
//! have traffic on each route).
//!
//! [`admin_gate`] is the token rule both admin ports apply; [`clock`] the timestamps
//! they print.

#![warn(missing_docs, unreachable_pub)]

pub mod admin_gate;
pub mod clock;
pub mod report;
pub mod subscriber;

mod state;

pub use admin_gate::AdminGate;
pub use report::{Deltas, MAX_REPORT_ENTRIES, ReportSource, RouteTraffic};
pub use state::{SNAPSHOT_FILE, load_saved, read_policy_file, save_snapshot, write_atomic};
pub use subscriber::{
    Backoff, DEFAULT_REPORT_INTERVAL, Rejected, SnapshotSink, Subscriber, SubscriberConfig,
    SubscriberStatus, control_plane_endpoint, tls_mismatch_hint,
};

/// Generated protobuf messages and tonic client/server for `sluice.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("sluice.v1");
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control-plane URL cannot be used as a gRPC endpoint.
    #[error("invalid control-plane URL {url:?}: {reason}")]
    InvalidEndpoint {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// Reading or writing saved state failed.
    #[error("state file {path}: {source}")]
    State {
        /// The file involved.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
