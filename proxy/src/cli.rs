//! The command line: `sluice-proxy run`, `sluice-proxy validate` and `sluice-proxy init`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_config::{Limits, PolicySet, parse_policy_bytes};
use tracing::{error, info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

use crate::config::{LogControl, LogFormat, ProxyConfig};
use crate::telemetry::{OtlpProtocol, Propagation, TraceConfig};

/// The Sluice sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "sluice-proxy", version, about)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Check policy files and report every problem with file:line:column.
    Validate {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Bounds on policy input.
        #[command(flatten)]
        limits: Limits,
    },
    /// Install the pod's iptables redirect to the proxy (run as root, once per pod).
    Init(crate::init::InitArgs),
}

/// Flags of `sluice-proxy run`; each also reads `SLUICE_<FLAG>`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// Outbound listener (application → mesh).
    #[arg(
        long,
        env = "SLUICE_OUTBOUND",
        value_name = "ADDR",
        default_value = "127.0.0.1:15001"
    )]
    pub(crate) outbound: SocketAddr,
    /// Inbound listener (mesh → application); opens only with --app.
    #[arg(
        long,
        env = "SLUICE_INBOUND",
        value_name = "ADDR",
        default_value = "0.0.0.0:15006"
    )]
    pub(crate) inbound: SocketAddr,
    /// Admin listener.
    #[arg(
        long,
        env = "SLUICE_ADMIN",
        value_name = "ADDR",
        default_value = "127.0.0.1:15000"
    )]
    pub(crate) admin: SocketAddr,
    /// The local application inbound requests go to.
    #[arg(long, env = "SLUICE_APP", value_name = "ADDR")]
    pub(crate) app: Option<SocketAddr>,
    /// Local policy file, watched for changes.
    #[arg(long, env = "SLUICE_POLICY", value_name = "FILE")]
    pub(crate) policy: Option<PathBuf>,
    /// This proxy's service (host of the policy whose inbound rules apply).
    #[arg(long, env = "SLUICE_SERVICE", value_name = "NAME")]
    pub(crate) service: Option<String>,
    /// Grace period for requests in flight on shutdown (e.g. 20s, 500ms).
    #[arg(
        long,
        env = "SLUICE_DRAIN_TIMEOUT",
        value_name = "DURATION",
        default_value = "20s"
    )]
    pub(crate) drain_timeout: sluice_config::Duration,
    /// Close a client connection with no request in flight and no bytes for this long.
    #[arg(
        long,
        env = "SLUICE_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "1h"
    )]
    pub(crate) idle_timeout: sluice_config::Duration,
    /// Time an HTTP/1 client has to send a request's header section.
    #[arg(
        long,
        env = "SLUICE_REQUEST_HEADER_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub(crate) request_header_timeout: sluice_config::Duration,
    /// Longest pause in a request body before the upstream answers; then 408.
    #[arg(
        long,
        env = "SLUICE_REQUEST_BODY_TIMEOUT",
        value_name = "DURATION",
        default_value = "60s"
    )]
    pub(crate) request_body_timeout: sluice_config::Duration,
    /// Longest pause in a response body while the client waits for more; then the
    /// stream is cut off (`0s`: no limit).
    #[arg(
        long,
        env = "SLUICE_RESPONSE_BODY_TIMEOUT",
        value_name = "DURATION",
        default_value = "1h"
    )]
    pub(crate) response_body_timeout: sluice_config::Duration,
    /// Log filter: a level or an EnvFilter string.
    #[arg(
        long,
        env = "SLUICE_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "info"
    )]
    pub(crate) log_level: String,
    /// Log format.
    #[arg(
        long,
        env = "SLUICE_LOG_FORMAT",
        value_name = "FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub(crate) log_format: LogFormat,
    /// Write the bound addresses as JSON here once listening.
    #[arg(long, env = "SLUICE_ADDR_FILE", value_name = "FILE")]
    pub(crate) addr_file: Option<PathBuf>,
    /// Bearer token file: on an admin bound beyond loopback, every route but /live,
    /// /ready, /metrics and /app-health/… needs it. Read on each such request, so it may
    /// appear or change after start (a Secret volume); while missing or empty, they are closed.
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub(crate) admin_token_file: Option<PathBuf>,
    /// Control-plane URL (e.g. http://127.0.0.1:15010) to receive policies from.
    // Two sources would overwrite each other's policy; a proxy follows one.
    #[arg(
        long,
        env = "SLUICE_CONTROL_PLANE",
        value_name = "URL",
        conflicts_with = "policy"
    )]
    pub(crate) control_plane: Option<String>,
    /// How often traffic counts (per route × backend deltas) are reported to the control plane.
    #[arg(
        long,
        env = "SLUICE_REPORT_INTERVAL",
        value_name = "DURATION",
        default_value = "2s"
    )]
    pub(crate) report_interval: sluice_config::Duration,
    /// Directory for the last applied snapshot, served at start until the control plane answers.
    #[arg(long, env = "SLUICE_STATE_DIR", value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// This proxy's id towards the control plane [default: the host name].
    #[arg(long, env = "SLUICE_NODE_ID", value_name = "ID")]
    pub(crate) node_id: Option<String>,
    /// Namespace of the workload, told to the control plane.
    #[arg(
        long,
        env = "SLUICE_NAMESPACE",
        value_name = "NAME",
        default_value = "default"
    )]
    pub(crate) namespace: String,
    /// Do not open the inbound listener.
    #[arg(long, env = "SLUICE_NO_INBOUND")]
    pub(crate) no_inbound: bool,
    /// Do not open the outbound listener.
    #[arg(long, env = "SLUICE_NO_OUTBOUND")]
    pub(crate) no_outbound: bool,
    /// The application's original HTTP probes (JSON, written by the injection webhook),
    /// served on the admin port under /app-health/.
    #[arg(long, env = "SLUICE_APP_PROBES", value_name = "JSON")]
    pub(crate) app_probes: Option<String>,
    /// Worker threads, each serving its share of the connections whole on a runtime of
    /// its own [default: one per CPU core].
    #[arg(long, env = "SLUICE_WORKER_THREADS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) worker_threads: Option<u16>,
    /// Mesh root certificate (PEM): verifies an https:// control plane and mesh peers.
    #[arg(long, env = "SLUICE_TRUST_ROOT", value_name = "FILE")]
    pub(crate) trust_root: Option<PathBuf>,
    /// Bootstrap token for the control plane's CA; turns mTLS on.
    #[arg(long, env = "SLUICE_IDENTITY_TOKEN_FILE", value_name = "FILE")]
    pub(crate) identity_token_file: Option<PathBuf>,
    /// Where to request the certificate [default: --control-plane].
    #[arg(long, env = "SLUICE_IDENTITY_URL", value_name = "URL")]
    pub(crate) identity_url: Option<String>,
    /// With mTLS, also accept plaintext on the inbound listener (served without a peer identity).
    #[arg(long, env = "SLUICE_INBOUND_PERMISSIVE")]
    pub(crate) inbound_permissive: bool,
    /// HTTP/2: streams one client connection may open before it is sent GOAWAY.
    #[arg(
        long,
        env = "SLUICE_H2_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub(crate) h2_max_streams_per_connection: u32,
    /// HTTP/2: streams a client connection may reset before their response, per
    /// --h2-reset-interval, before it is sent GOAWAY (paced rapid reset).
    #[arg(
        long,
        env = "SLUICE_H2_MAX_RESETS",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub(crate) h2_max_resets: u32,
    /// HTTP/2: the interval --h2-max-resets refills over.
    #[arg(
        long,
        env = "SLUICE_H2_RESET_INTERVAL",
        default_value = "10s",
        value_name = "DURATION"
    )]
    pub(crate) h2_reset_interval: sluice_config::Duration,
    /// Trace export.
    #[command(flatten)]
    pub(crate) trace: TraceArgs,
    /// Fleet-wide rate limits (Redis).
    #[command(flatten)]
    pub(crate) fleet: crate::fleet::FleetArgs,
    /// Bounds on policy input (the --policy file, snapshots from the control plane).
    #[command(flatten)]
    pub(crate) policy_limits: Limits,
    /// The ring of recent requests (`GET /recent` on the admin port).
    #[command(flatten)]
    pub(crate) recent: crate::recent::RecentArgs,
}

/// Trace flags of `sluice-proxy run`.
#[derive(Debug, clap::Args)]
pub(crate) struct TraceArgs {
    /// OTLP collector to export spans to (e.g. http://127.0.0.1:4317); no spans without it.
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT", value_name = "URL")]
    pub(crate) otlp_endpoint: Option<String>,
    /// OTLP transport: gRPC, or HTTP with protobuf bodies (`/v1/traces` is appended to a bare URL).
    #[arg(
        long,
        env = "SLUICE_OTLP_PROTOCOL",
        value_name = "PROTOCOL",
        value_enum,
        default_value = "grpc"
    )]
    pub(crate) otlp_protocol: OtlpProtocol,
    /// Share of new traces recorded (0.0..=1.0); requests with a trace context follow their parent.
    #[arg(
        long,
        env = "SLUICE_TRACE_SAMPLING",
        value_name = "RATIO",
        default_value = "1.0",
        value_parser = parse_ratio
    )]
    pub(crate) trace_sampling: f64,
    /// Trace-context headers read and written, comma-separated: w3c, b3.
    #[arg(
        long,
        env = "SLUICE_TRACE_PROPAGATION",
        value_name = "FORMATS",
        value_enum,
        value_delimiter = ',',
        default_value = "w3c"
    )]
    pub(crate) trace_propagation: Vec<Propagation>,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("expected a ratio in 0.0..=1.0, got {s:?}")),
    }
}

impl From<RunArgs> for ProxyConfig {
    fn from(a: RunArgs) -> Self {
        ProxyConfig {
            outbound: a.outbound,
            inbound: a.inbound,
            admin: a.admin,
            app: a.app,
            policy: a.policy,
            service: a.service,
            drain_timeout: a.drain_timeout.get(),
            timeouts: crate::timeouts::Timeouts {
                idle: a.idle_timeout.get(),
                request_header: a.request_header_timeout.get(),
                request_body: a.request_body_timeout.get(),
                response_body: a.response_body_timeout.get(),
            },
            log_level: a.log_level,
            log_format: a.log_format,
            addr_file: a.addr_file,
            admin_token_file: a.admin_token_file,
            control_plane: a.control_plane,
            report_interval: a.report_interval.get(),
            state_dir: a.state_dir,
            node_id: a.node_id,
            namespace: a.namespace,
            no_inbound: a.no_inbound,
            no_outbound: a.no_outbound,
            app_probes: a.app_probes,
            log_control: None,
            trust_root: a.trust_root,
            identity_token_file: a.identity_token_file,
            identity_url: a.identity_url,
            inbound_permissive: a.inbound_permissive,
            policy_limits: a.policy_limits,
            recent_requests: a.recent.recent_requests as usize,
            recent_requests_secrets: a.recent.recent_requests_secrets,
            recent_requests_redaction: crate::recent::Redaction::new(
                a.recent.recent_requests_redact,
            ),
            workers: crate::workers::Workers::here(),
            h2_limits: crate::H2Limits {
                max_streams: a.h2_max_streams_per_connection,
                max_resets: a.h2_max_resets,
                reset_interval: a.h2_reset_interval.get(),
            },
            fleet: a.fleet.into(),
            trace: TraceConfig {
                otlp_endpoint: a.trace.otlp_endpoint,
                otlp_protocol: a.trace.otlp_protocol,
                sampling: a.trace.trace_sampling,
                propagation: a.trace.trace_propagation,
            },
        }
    }
}

/// Parses the command line and runs it; `main` is just this.
pub fn cli_main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files, limits } => validate(&files, &limits),
        Command::Run(args) => {
            let workers = args.worker_threads;
            run((*args).into(), workers)
        }
        Command::Init(args) => crate::init::main(&args),
    }
}

/// Prints `ok  FILE (N policies, hash H)` or every diagnostic; fails if any file failed.
#[allow(clippy::print_stdout)] // the command's output
fn validate(files: &[PathBuf], limits: &Limits) -> ExitCode {
    let mut failed = false;
    for file in files {
        let label = file.display().to_string();
        let bytes = match sluice_api::read_policy_file(file, limits.max_file_bytes) {
            Ok(b) => b,
            Err(e) => {
                println!("{label}: {e}");
                failed = true;
                continue;
            }
        };
        match parse_policy_bytes(&label, &bytes, limits)
            .and_then(|p| PolicySet::new_with(p, limits))
        {
            Ok(set) => {
                let n = set.policies().len();
                let noun = if n == 1 { "policy" } else { "policies" };
                println!("ok  {label} ({n} {noun}, hash {})", set.hash())
            }
            Err(e) => {
                failed = true;
                for d in e.diagnostics() {
                    println!("{d}");
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[allow(clippy::print_stderr)] // no logger may exist yet
fn run(mut cfg: ProxyConfig, worker_threads: Option<u16>) -> ExitCode {
    match init_logging(&cfg.log_level, cfg.log_format) {
        Ok(control) => cfg.log_control = Some(control),
        Err(e) => {
            eprintln!("sluice-proxy: invalid --log-level: {e}");
            return ExitCode::FAILURE;
        }
    }
    raise_open_files_limit();
    // Each worker a current-thread runtime: no work-stealing scheduler's shared queues,
    // atomics and cross-thread wake-ups, which a request paid several times as it
    // hopped between its connection's task and the upstream connection's. One worker
    // is this thread; with more, this thread serves no connection ([`crate::workers`]).
    let workers = worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        usize::from,
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    // Dropped after the runtime's `block_on` returns: the workers stop once drained.
    let _threads = match crate::workers::Workers::start(if workers > 1 { workers } else { 0 }) {
        Ok((w, threads)) => {
            cfg.workers = w;
            threads
        }
        Err(e) => {
            error!(error = %e, "cannot start the worker threads");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let proxy = match crate::start(cfg).await {
            Ok(p) => p,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal().await;
        info!("shutting down");
        proxy.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// Raises the soft limit on open files to the hard limit. Every client connection
/// holds a descriptor, and so does every pooled upstream connection; the common soft
/// default of 1,024 would make a busy sidecar refuse connections long before its memory
/// or CPU runs out. Raising the soft limit up to the hard one needs no privilege.
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    if current == maximum {
        info!(open_files = ?current, "open files limit");
        return;
    }
    let raised = Rlimit {
        current: maximum,
        maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => info!(from = ?current, to = ?maximum, "raised the open files limit"),
        Err(e) => warn!(error = %e, limit = ?current, "cannot raise the open files limit"),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn init_logging(level: &str, format: LogFormat) -> Result<LogControl, String> {
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // Colours only for a person at a terminal: in a pod the lines go to a log
    // collector, where escape codes are noise.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    Ok(LogControl::new(move |directive| {
        let filter = EnvFilter::try_new(directive).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_soft_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let before = getrlimit(Resource::Nofile);
        // Start from a soft limit below the hard one, as most distributions set it.
        let low = before.maximum.map_or(4096, |max| max.min(4096) / 2);
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(low),
                maximum: before.maximum,
            },
        )
        .unwrap();
        raise_open_files_limit();
        let after = getrlimit(Resource::Nofile);
        assert_eq!(after.current, before.maximum);
        assert_eq!(after.maximum, before.maximum);
    }

    fn run_args(args: &[&str]) -> Result<ProxyConfig, clap::Error> {
        let cli = Cli::try_parse_from(["sluice-proxy", "run"].iter().chain(args))?;
        match cli.command {
            Command::Run(a) => Ok((*a).into()),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn control_plane_flags() {
        let cfg = run_args(&[
            "--control-plane",
            "http://127.0.0.1:15010",
            "--state-dir",
            "/var/lib/sluice",
            "--node-id",
            "order-1",
            "--namespace",
            "shop",
        ])
        .unwrap();
        assert_eq!(cfg.control_plane.as_deref(), Some("http://127.0.0.1:15010"));
        assert_eq!(cfg.state_dir, Some(PathBuf::from("/var/lib/sluice")));
        assert_eq!(cfg.node_id.as_deref(), Some("order-1"));
        assert_eq!(cfg.namespace, "shop");
    }

    #[test]
    fn mtls_flags() {
        let cfg = run_args(&[
            "--control-plane",
            "https://127.0.0.1:15010",
            "--trust-root",
            "/etc/sluice/root.pem",
            "--identity-token-file",
            "/var/run/sluice/token",
            "--inbound-permissive",
        ])
        .unwrap();
        assert_eq!(cfg.trust_root, Some(PathBuf::from("/etc/sluice/root.pem")));
        assert_eq!(
            cfg.identity_token_file,
            Some(PathBuf::from("/var/run/sluice/token"))
        );
        assert!(cfg.inbound_permissive);
        assert_eq!(cfg.identity_url, None);
    }

    #[test]
    fn trace_flags() {
        let cfg = run_args(&[]).unwrap();
        assert_eq!(cfg.trace, TraceConfig::default());
        let cfg = run_args(&[
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
            "--otlp-protocol",
            "http",
            "--trace-sampling",
            "0.25",
            "--trace-propagation",
            "w3c,b3",
        ])
        .unwrap();
        assert_eq!(
            cfg.trace,
            TraceConfig {
                otlp_endpoint: Some("http://127.0.0.1:4318".into()),
                otlp_protocol: OtlpProtocol::Http,
                sampling: 0.25,
                propagation: vec![Propagation::W3c, Propagation::B3],
            }
        );
        for bad in [
            &["--trace-sampling", "1.5"][..],
            &["--trace-sampling", "lots"],
            &["--trace-propagation", "jaeger"],
            &["--otlp-protocol", "thrift"],
        ] {
            assert!(run_args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn control_plane_and_policy_file_exclude_each_other() {
        let err =
            run_args(&["--control-plane", "http://cp:15010", "--policy", "p.yaml"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn worker_threads_is_at_least_one() {
        let parse = |n: &str| {
            let cli = Cli::try_parse_from(["sluice-proxy", "run", "--worker-threads", n])?;
            match cli.command {
                Command::Run(a) => Ok::<_, clap::Error>(a.worker_threads),
                other => panic!("parsed as {other:?}"),
            }
        };
        assert_eq!(parse("1").unwrap(), Some(1));
        assert!(parse("0").is_err());
        assert!(parse("many").is_err());
    }
}
