//! The proxy's settings, as the command line and in-process callers give them.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything [`crate::start`] needs. `Default` gives the documented defaults.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Outbound listener (the application's traffic to the mesh).
    pub outbound: SocketAddr,
    /// Inbound listener (the mesh's traffic to the application); used only with `app`.
    pub inbound: SocketAddr,
    /// Admin listener: probes, metrics, config, log level.
    pub admin: SocketAddr,
    /// The local application inbound requests go to; without it no inbound listener opens.
    pub app: Option<SocketAddr>,
    /// Local policy file, watched for changes.
    pub policy: Option<PathBuf>,
    /// This proxy's service: the policy whose host it is supplies the inbound rules.
    pub service: Option<String>,
    /// How long requests in flight may take to finish on shutdown.
    pub drain_timeout: Duration,
    /// Initial log filter (a level or an `EnvFilter` string).
    pub log_level: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// Where to write the bound addresses as JSON once listening.
    pub addr_file: Option<PathBuf>,
    /// File holding the bearer token that unlocks mutating admin routes off loopback.
    pub admin_token_file: Option<PathBuf>,
    /// Control-plane URL to receive policies from.
    pub control_plane: Option<String>,
    /// How often traffic counts are reported to the control plane.
    pub report_interval: Duration,
    /// Where the last good snapshot is persisted, and read back at start.
    pub state_dir: Option<PathBuf>,
    /// This proxy's id towards the control plane; `None` means the host name.
    pub node_id: Option<String>,
    /// Namespace of the workload, told to the control plane.
    pub namespace: String,
    /// Do not open the inbound listener.
    pub no_inbound: bool,
    /// Do not open the outbound listener.
    pub no_outbound: bool,
    /// The application's original HTTP probes as the injection webhook wrote them (JSON),
    /// served on the admin port under `/app-health/`.
    pub app_probes: Option<String>,
    /// Changes the log filter at run time (`PUT /log-level`); set by the CLI's logger.
    pub log_control: Option<LogControl>,
    /// The mesh root (PEM) the control plane's and peers' certificates chain to.
    pub trust_root: Option<PathBuf>,
    /// Bootstrap token file; turns mTLS on (certificate from the control plane).
    pub identity_token_file: Option<PathBuf>,
    /// Where to certify [default: `control_plane`].
    pub identity_url: Option<String>,
    /// With mTLS, also serve plaintext inbound clients (without an identity).
    pub inbound_permissive: bool,
    /// Trace export: OTLP endpoint, protocol, sampling, propagation formats.
    pub trace: crate::telemetry::TraceConfig,
    /// Fleet-wide rate limits: Redis, reconciliation interval, fallback fleet size.
    pub fleet: crate::fleet::FleetConfig,
    /// Bounds on policy input: the `policy` file and snapshots from the control plane.
    pub policy_limits: sluice_config::Limits,
    /// Idle connection, request header and request body timeouts.
    pub timeouts: crate::timeouts::Timeouts,
    /// Per-connection HTTP/2 stream and reset limits of the outbound and inbound listeners.
    pub h2_limits: crate::H2Limits,
    /// How many finished requests the admin's `/recent` keeps (0: none, no cost).
    pub recent_requests: usize,
    /// Keep secret header values in that ring (redacted otherwise).
    pub recent_requests_secrets: bool,
    /// Which header values that ring calls secret.
    pub recent_requests_redaction: crate::recent::Redaction,
    /// The runtimes that serve outbound and inbound connections (default: the one
    /// that accepts them).
    pub workers: crate::workers::Workers,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            outbound: SocketAddr::from((Ipv4Addr::LOCALHOST, 15001)),
            inbound: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15006)),
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 15000)),
            app: None,
            policy: None,
            service: None,
            drain_timeout: Duration::from_secs(20),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            addr_file: None,
            admin_token_file: None,
            control_plane: None,
            report_interval: sluice_api::DEFAULT_REPORT_INTERVAL,
            state_dir: None,
            node_id: None,
            namespace: "default".into(),
            no_inbound: false,
            no_outbound: false,
            app_probes: None,
            log_control: None,
            trust_root: None,
            identity_token_file: None,
            identity_url: None,
            inbound_permissive: false,
            trace: crate::telemetry::TraceConfig::default(),
            fleet: crate::fleet::FleetConfig::default(),
            policy_limits: sluice_config::Limits::default(),
            timeouts: crate::timeouts::Timeouts::default(),
            h2_limits: crate::H2Limits::default(),
            recent_requests: 0,
            recent_requests_secrets: false,
            recent_requests_redaction: crate::recent::Redaction::default(),
            workers: crate::workers::Workers::here(),
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A hook that replaces the log filter, e.g. a `tracing_subscriber` reload handle.
#[derive(Clone)]
pub struct LogControl(Arc<ApplyDirective>);

type ApplyDirective = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl LogControl {
    /// Wraps a function that applies a filter directive string.
    pub fn new(f: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Applies `directive` (`debug`, `sluice_proxy=trace,info`, …).
    pub fn set(&self, directive: &str) -> Result<(), String> {
        (self.0)(directive)
    }
}

impl fmt::Debug for LogControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogControl")
    }
}
