//! Command-line flags; every flag can also be set as `SLUICE_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::ControlPlaneConfig;

/// The control plane's flags.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "sluice-control-plane",
    version,
    about = "Validates Sluice policies and streams them to every proxy."
)]
pub struct Args {
    /// Where policies come from: a directory of YAML files, or RoutePolicy objects.
    #[arg(long, env = "SLUICE_SOURCE", value_enum, default_value = "dir")]
    pub source: Source,
    /// Directory of RoutePolicy YAML files (`*.yaml`, `*.yml`), watched for changes.
    #[arg(long, env = "SLUICE_POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,
    /// gRPC listen address (policy stream).
    #[arg(long, env = "SLUICE_GRPC", default_value = "0.0.0.0:15010")]
    pub grpc: SocketAddr,
    /// Admin HTTP listen address (/live, /ready, /metrics, /policies, /proxies).
    #[arg(long, env = "SLUICE_ADMIN", default_value = "0.0.0.0:15014")]
    pub admin: SocketAddr,
    /// Directory where the last good version of every policy file is kept.
    #[arg(long, env = "SLUICE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log filter (`info`, `debug`, `sluice_control_plane=debug,info`, ...).
    #[arg(long, env = "SLUICE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// After binding, write the bound addresses here as JSON (`{"grpc": …, "admin": …}`).
    #[arg(long, env = "SLUICE_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// The sidecar-injection webhook (off unless `--webhook` is given).
    #[command(flatten)]
    pub webhook: crate::inject::WebhookArgs,
    /// Kubernetes: discovery, election, identity.
    #[command(flatten)]
    pub kubernetes: crate::k8s::KubeArgs,
}

/// Where policies come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// `--policy-dir`: a directory of YAML files.
    Dir,
    /// RoutePolicy objects in the Kubernetes API (all namespaces).
    Kubernetes,
}

impl Args {
    /// What clap cannot check: `--source dir` (the default) needs `--policy-dir`.
    pub fn check(&self) -> Result<(), String> {
        if self.source == Source::Dir && self.policy_dir.is_none() {
            return Err("--policy-dir is required with --source dir (the default)".to_string());
        }
        Ok(())
    }

    /// The library configuration these flags describe.
    pub fn to_config(&self) -> ControlPlaneConfig {
        ControlPlaneConfig {
            policy_dir: self.policy_dir.clone().unwrap_or_default(),
            grpc_addr: self.grpc,
            admin_addr: self.admin,
            state_dir: self.state_dir.clone(),
            addr_file: self.addr_file.clone(),
            ..ControlPlaneConfig::default()
        }
    }
}

/// The `sluice-control-plane` binary: parse flags, serve until SIGTERM/SIGINT.
pub fn cli_main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.check() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("invalid --log-level {:?}: {e}", args.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let mut cfg = args.to_config();
        let policies = args.source == Source::Kubernetes;
        if args.kubernetes.needs_client(policies) {
            // kube-rs builds its TLS config from the process default provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client = match kube::Client::try_default().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot reach the Kubernetes API");
                    return ExitCode::FAILURE;
                }
            };
            cfg.kubernetes = args
                .kubernetes
                .to_config(&client, policies, crate::k8s::TRUST_DOMAIN);
        }
        let cp = match crate::start(cfg).await {
            Ok(cp) => cp,
            Err(e) => {
                tracing::error!(error = %e, "control plane failed to start");
                return ExitCode::FAILURE;
            }
        };
        let webhook = match args.webhook.to_config() {
            Some(cfg) => match crate::inject::start_webhook(cfg).await {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::error!(error = %e, "injection webhook failed to start");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        wait_for_signal().await;
        tracing::info!("shutting down");
        if let Some(w) = webhook {
            w.shutdown().await;
        }
        cp.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the control plane");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_outside_contract() {
        let args = Args::try_parse_from(["sluice-control-plane", "--policy-dir", "/p"]).unwrap();
        assert_eq!(args.grpc, "0.0.0.0:15010".parse().unwrap());
        assert_eq!(args.admin, "0.0.0.0:15014".parse().unwrap());
        assert_eq!(args.log_level, "info");
        assert_eq!(args.source, Source::Dir);
        assert_eq!(args.kubernetes.lease_name, "sluice-control-plane");
    }

    #[test]
    fn the_directory_source_needs_a_directory_and_kubernetes_does_not() {
        let bare = Args::try_parse_from(["sluice-control-plane"]).unwrap();
        assert!(bare.check().unwrap_err().contains("--policy-dir"));
        let args =
            Args::try_parse_from(["sluice-control-plane", "--source", "kubernetes"]).unwrap();
        assert_eq!(args.source, Source::Kubernetes);
        args.check().unwrap();
        assert!(args.kubernetes.needs_client(true));
        let args = Args::try_parse_from([
            "sluice-control-plane",
            "--policy-dir",
            "/p",
            "--ca-secret",
            "sluice-ca",
        ])
        .unwrap();
        assert!(args.kubernetes.needs_client(false));
    }
}
