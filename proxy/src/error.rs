//! The one error type of the proxy library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Errors of the proxy: startup failures and the data-path failures its rescue maps to responses.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A file the proxy needs could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The policy file watcher could not be set up.
    #[error("cannot watch {}: {source}", path.display())]
    Watch {
        /// The watched directory.
        path: PathBuf,
        /// notify's reason.
        source: notify::Error,
    },
    /// Policies were refused by the validator.
    #[error(transparent)]
    Config(#[from] sluice_config::ConfigError),
    /// A validated policy could not be compiled into a route table.
    #[error("{0}")]
    Compile(String),
    /// A metric could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The upstream could not be reached or broke the connection.
    #[error("upstream {backend} unavailable: {source}")]
    Upstream {
        /// Backend name (or `app` on inbound).
        backend: Arc<str>,
        /// What failed, typed for breakers and retries.
        source: sluice_filters::UpstreamError,
    },
    /// A request reached the connection layer without a chosen endpoint.
    #[error("no endpoint selected for backend {0}")]
    NoEndpoint(Arc<str>),
    /// `--app-probes` could not be read.
    #[error("--app-probes: {0}")]
    AppProbes(String),
    /// Trace export could not be set up (`--otlp-endpoint` and friends).
    #[error("tracing: {0}")]
    Telemetry(String),
    /// A TLS configuration could not be built from the certificates at hand.
    #[error("tls: {0}")]
    Tls(String),
    /// A mesh connection was asked for before the control plane certified this proxy.
    #[error("tls: no workload certificate yet")]
    NoWorkloadCertificate,
    /// The control plane refused or failed to certify our key.
    #[error("certify: {0}")]
    Certify(Box<tonic::Status>),
}
