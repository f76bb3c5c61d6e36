//! Command-line flags; every flag can also be set as `SLUICE_<FLAG>`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::ca::{BootstrapVerifier, Ca, TokenFile, TokenSource};
use crate::{ControlPlaneConfig, Error, IdentityConfig};

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The control plane's flags.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "sluice-control-plane",
    version,
    about = "Validates Sluice policies and streams them to every proxy.",
    after_help = "`sluice-control-plane convert FILE...` translates Gateway API HTTPRoutes into RoutePolicies offline (see `convert --help`)."
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
    /// Bearer token file: on an admin bound beyond loopback, /policies and /proxies
    /// answer only with `Authorization: Bearer <token>` (and not at all without it).
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Directory where the version in force of every policy file is kept.
    #[arg(long, env = "SLUICE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log filter (`info`, `debug`, `sluice_control_plane=debug,info`, ...).
    #[arg(long, env = "SLUICE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log line format on stdout: `text` (human-readable) or `json` (one object per line).
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// After binding, write the bound addresses here as JSON (`{"grpc": …, "admin": …}`).
    #[arg(long, env = "SLUICE_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Tests only: stamp snapshots with this schema version instead of ours, to
    /// prove proxies refuse one from the future.
    #[arg(long, hide = true, value_name = "N")]
    pub test_stamp_schema_version: Option<u32>,
    /// The sidecar-injection webhook (off unless `--webhook` is given).
    #[command(flatten)]
    pub webhook: crate::inject::WebhookArgs,
    /// Bounds on policy input (files, the directory, RoutePolicy objects).
    #[command(flatten)]
    pub policy_limits: sluice_config::Limits,
    /// Kubernetes: discovery, election, identity.
    #[command(flatten)]
    pub kubernetes: crate::k8s::KubeArgs,
    /// The certificate authority and TLS on the gRPC port.
    #[command(flatten)]
    pub ca: CaArgs,
}

/// Flags of the mesh CA. The gRPC port is TLS unless `--plaintext`.
#[derive(Clone, Debug, clap::Args)]
pub struct CaArgs {
    /// SPIFFE trust domain of issued identities (`spiffe://<domain>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "SLUICE_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Mesh root certificate (PEM) to sign with [default: `<state-dir>/ca.pem`,
    /// generated on first start; in memory without --state-dir].
    #[arg(long, env = "SLUICE_CA_CERT", requires = "ca_key", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Private key (PEM) of --ca-cert.
    #[arg(long, env = "SLUICE_CA_KEY", requires = "ca_cert", value_name = "FILE")]
    pub ca_key: Option<PathBuf>,
    /// Lifetime of issued workload certificates (e.g. 24h, 10s).
    #[arg(
        long,
        env = "SLUICE_CERT_LIFETIME",
        default_value = "24h",
        value_name = "DURATION"
    )]
    pub cert_lifetime: sluice_config::Duration,
    /// Lifetime of the gRPC port's own serving certificate, renewed at half of it
    /// without dropping open streams.
    #[arg(
        long,
        env = "SLUICE_SERVER_CERT_LIFETIME",
        default_value = "24h",
        value_name = "DURATION"
    )]
    pub server_cert_lifetime: sluice_config::Duration,
    /// Bootstrap tokens: a file (or a directory of files) of JSON lines
    /// `{"token": …, "namespace": …, "serviceAccount": …}`. Without it every
    /// certificate request is refused.
    #[arg(long, env = "SLUICE_BOOTSTRAP_TOKENS", value_name = "PATH")]
    pub bootstrap_tokens: Option<PathBuf>,
    /// Extra DNS name or IP address of the gRPC serving certificate (repeatable;
    /// `localhost`, `127.0.0.1`, `::1` and the host name are always included).
    #[arg(
        long = "server-name",
        env = "SLUICE_SERVER_NAMES",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub server_names: Vec<String>,
    /// Write the mesh root certificate (PEM) here once started (what proxies' --trust-root reads).
    #[arg(long, env = "SLUICE_WRITE_TRUST_ROOT", value_name = "FILE")]
    pub write_trust_root: Option<PathBuf>,
    /// Serve gRPC without TLS and without the Identity service (development only).
    #[arg(long, env = "SLUICE_PLAINTEXT", conflicts_with_all = ["ca_cert", "bootstrap_tokens", "write_trust_root"])]
    pub plaintext: bool,
}

impl CaArgs {
    /// Loads or generates the CA and the token source these flags name.
    pub fn to_config(&self, state_dir: Option<&Path>) -> Result<Option<IdentityConfig>, Error> {
        if self.plaintext {
            return Ok(None);
        }
        let ttl = self.cert_lifetime.get();
        let ca = match (&self.ca_cert, &self.ca_key, state_dir) {
            (Some(cert), Some(key), _) => Ca::load(&self.trust_domain, cert, key, ttl)?,
            (_, _, Some(dir)) => Ca::load_or_generate(
                &self.trust_domain,
                &dir.join("ca.pem"),
                &dir.join("ca.key"),
                ttl,
            )?,
            _ => {
                tracing::warn!(
                    "no --state-dir or --ca-cert: the mesh root lives in memory and changes on every restart"
                );
                Ca::generate(&self.trust_domain, ttl)?
            }
        };
        let verifier: Arc<dyn BootstrapVerifier> = match &self.bootstrap_tokens {
            Some(path) => {
                let tokens = TokenSource::open(path)?;
                tracing::info!(path = %path.display(), tokens = tokens.len(), "bootstrap tokens loaded; read again when they change");
                Arc::new(tokens)
            }
            None => {
                tracing::warn!("no --bootstrap-tokens: every certificate request will be refused");
                Arc::new(TokenFile::parse(Path::new("(none)"), "")?)
            }
        };
        let mut cfg = IdentityConfig::new(Arc::new(ca), verifier);
        cfg.server_cert_lifetime = self.server_cert_lifetime.get();
        if let Some(host) = host_name() {
            cfg.server_names.push(host);
        }
        for name in &self.server_names {
            if !cfg.server_names.contains(name) {
                cfg.server_names.push(name.clone());
            }
        }
        cfg.write_trust_root = self.write_trust_root.clone();
        Ok(Some(cfg))
    }
}

/// The host name (the pod name in a cluster), if it is a valid DNS name.
fn host_name() -> Option<String> {
    dns_name(&std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?)
}

/// `raw` (a file's text) as a lower-case DNS name, if it is one.
fn dns_name(raw: &str) -> Option<String> {
    let s = raw.trim().to_ascii_lowercase();
    let valid = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then_some(s)
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
        if self.ca.plaintext && self.kubernetes.trust_root_configmap.is_some() {
            return Err(
                "--trust-root-configmap publishes the CA's root, and --plaintext turns the CA off"
                    .to_string(),
            );
        }
        let kept = self.kubernetes.mutating_webhook_config.is_some()
            || self.kubernetes.validating_webhook_config.is_some();
        let mesh_webhook = self.webhook.from_mesh_ca();
        if mesh_webhook && self.ca.plaintext {
            return Err(
                "--webhook without --webhook-cert/--webhook-key has the mesh CA issue its \
                 certificate, and --plaintext turns the CA off"
                    .to_string(),
            );
        }
        if kept && self.kubernetes.webhook_ca.is_none() && !mesh_webhook {
            return Err(
                "a webhook configuration's caBundle follows --webhook-ca, or the mesh root \
                 when the mesh CA issues the webhook's certificate (--webhook without \
                 --webhook-cert): give one of them"
                    .to_string(),
            );
        }
        let https = self
            .webhook
            .inject_control_plane
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"));
        if self.webhook.webhook.is_some() && https && self.kubernetes.trust_root_configmap.is_none()
        {
            return Err(
                "--inject-control-plane is https://, but injected proxies would have no \
                 root to verify it with: give --trust-root-configmap"
                    .to_string(),
            );
        }
        Ok(())
    }

    /// The library configuration these flags describe (loading or generating the CA).
    pub fn to_config(&self) -> Result<ControlPlaneConfig, Error> {
        Ok(ControlPlaneConfig {
            policy_dir: self.policy_dir.clone().unwrap_or_default(),
            grpc_addr: self.grpc,
            admin_addr: self.admin,
            admin_token: match &self.admin_token_file {
                Some(path) => Some(sluice_api::AdminGate::read_token(path).map_err(|source| {
                    Error::AdminToken {
                        path: path.clone(),
                        source,
                    }
                })?),
                None => None,
            },
            state_dir: self.state_dir.clone(),
            addr_file: self.addr_file.clone(),
            stamp_schema_version: self.test_stamp_schema_version,
            identity: self.ca.to_config(self.state_dir.as_deref())?,
            policy_limits: self.policy_limits,
            ..ControlPlaneConfig::default()
        })
    }
}

/// In a cluster: the mesh root from `--ca-secret` and bootstrap tokens checked
/// with TokenReview (`--token-review`) replace the local ones.
async fn kube_identity(
    args: &Args,
    client: &kube::Client,
    cfg: &mut ControlPlaneConfig,
) -> Result<(), Error> {
    let Some(identity) = cfg.identity.as_mut() else {
        return Ok(());
    };
    let k = &args.kubernetes;
    if let Some(ca) = k
        .ca(client, &args.ca.trust_domain, args.ca.cert_lifetime.get())
        .await?
    {
        identity.ca = Arc::new(ca);
    }
    if let Some(verifier) = k.verifier(client) {
        identity.verifier = Arc::new(verifier);
    }
    Ok(())
}

/// `sluice-control-plane convert FILE...`: Gateway API HTTPRoutes to RoutePolicies.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "sluice-control-plane convert",
    about = "Translates Gateway API HTTPRoute YAML files (with the Services and ReferenceGrants they name, if given) into the RoutePolicy YAML the control plane would serve; refusals name the file and the field."
)]
pub(crate) struct ConvertArgs {
    /// HTTPRoute YAML files (`-` reads standard input).
    #[arg(required = true, value_name = "FILE")]
    pub(crate) files: Vec<PathBuf>,
    /// Write the policies here instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
}

/// Runs `convert`: the policies on stdout (or `--output`), refusals on stderr.
fn convert_main(args: impl Iterator<Item = std::ffi::OsString>) -> ExitCode {
    use std::io::{Read as _, Write as _};
    let args = ConvertArgs::parse_from(args);
    let mut texts = Vec::new();
    for f in &args.files {
        let read = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map(|_| s)
        } else {
            std::fs::read_to_string(f)
        };
        match read {
            Ok(t) => texts.push((f.display().to_string(), t)),
            Err(e) => {
                eprintln!("{}: {e}", f.display());
                return ExitCode::from(2);
            }
        }
    }
    match crate::gateway::convert_files(texts.iter().map(|(f, t)| (f.as_str(), t.as_str()))) {
        Ok(converted) => {
            for w in &converted.warnings {
                eprintln!("warning: {w}");
            }
            let yaml = converted.yaml;
            let written = match &args.output {
                Some(path) => sluice_api::write_atomic(path, yaml.as_bytes()),
                None => std::io::stdout().lock().write_all(yaml.as_bytes()),
            };
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cannot write the policies: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The `sluice-control-plane` binary: parse flags, serve until SIGTERM/SIGINT
/// (or, as `sluice-control-plane convert FILE...`, translate HTTPRoutes offline).
pub fn cli_main() -> ExitCode {
    let mut raw = std::env::args_os();
    if std::env::args_os().nth(1).is_some_and(|a| a == "convert") {
        let program = raw.next().unwrap_or_default();
        raw.next();
        return convert_main(std::iter::once(program).chain(raw));
    }
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
    // Colours only for a person at a terminal: in a pod the lines go to a log
    // collector, where escape codes are noise.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match args.log_format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().init(),
    }
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
        // Listen before starting: a SIGTERM right after the start line must not kill
        // the process with the default action.
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        let mut cfg = match args.to_config() {
            Ok(cfg) => cfg,
            Err(e) => {
                tracing::error!(error = %e, "certificate authority failed to start");
                return ExitCode::FAILURE;
            }
        };
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
                .to_config(&client, policies, &args.ca.trust_domain);
            cfg.publish_trust_root = args.kubernetes.publish_trust_root(&client);
            if let Err(e) = kube_identity(&args, &client, &mut cfg).await {
                tracing::error!(error = %e, "certificate authority failed to start");
                return ExitCode::FAILURE;
            }
            // After `kube_identity`: the root may come from the CA Secret.
            let mesh_root = cfg
                .identity
                .as_ref()
                .filter(|_| args.webhook.from_mesh_ca())
                .map(|id| id.ca.root_pem());
            cfg.webhook_bundles = args
                .kubernetes
                .webhook_bundles(&client, mesh_root.as_deref());
        }
        let cp = match crate::start(cfg).await {
            Ok(cp) => cp,
            Err(e) => {
                tracing::error!(error = %e, "control plane failed to start");
                return ExitCode::FAILURE;
            }
        };
        let webhook_cfg = args.webhook.to_config(cp.webhook_tls()).map(|mut cfg| {
            cfg.inject.trust_root_configmap = args.kubernetes.trust_root_configmap.clone();
            cfg.policy_limits = args.policy_limits;
            cfg
        });
        let webhook = match webhook_cfg {
            Some(cfg) => match crate::inject::start_webhook(cfg).await {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::error!(error = %e, "injection webhook failed to start");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        wait_for_signal(term).await;
        tracing::info!("shutting down");
        if let Some(w) = webhook {
            w.shutdown().await;
        }
        cp.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal(term: std::io::Result<tokio::signal::unix::Signal>) {
    let mut term = match term {
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
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(args.source, Source::Dir);
        assert_eq!(args.kubernetes.lease_name, "sluice-control-plane");
        assert_eq!(args.ca.trust_domain, "cluster.local");
        assert!(!args.ca.plaintext);
    }

    #[test]
    fn log_format_json() {
        let parse = |f: &str| {
            Args::try_parse_from([
                "sluice-control-plane",
                "--policy-dir",
                "/p",
                "--log-format",
                f,
            ])
        };
        assert_eq!(parse("json").unwrap().log_format, LogFormat::Json);
        assert!(parse("xml").is_err());
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

    /// The webhook serving a certificate from files.
    const WEBHOOK_FROM_FILES: [&str; 6] = [
        "--webhook",
        "0.0.0.0:15017",
        "--webhook-cert",
        "/c",
        "--webhook-key",
        "/k",
    ];

    #[test]
    fn injected_proxies_get_the_root_of_an_https_control_plane() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["sluice-control-plane", "--policy-dir", "/p"];
            argv.extend_from_slice(&WEBHOOK_FROM_FILES);
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).unwrap()
        };
        let https = ["--inject-control-plane", "https://sluice.sluice:15010"];
        let err = parse(&https).check().unwrap_err();
        assert!(err.contains("--trust-root-configmap"), "{err}");
        let args = parse(&[&https[..], &["--trust-root-configmap", "sluice-trust-root"]].concat());
        args.check().unwrap();
        assert!(args.kubernetes.needs_client(false));
        // A plaintext control plane needs no root.
        parse(&["--inject-control-plane", "http://sluice.sluice:15010"])
            .check()
            .unwrap();
        // Without the CA there is no root to publish.
        let err = parse(&["--plaintext", "--trust-root-configmap", "sluice-trust-root"])
            .check()
            .unwrap_err();
        assert!(err.contains("--plaintext"), "{err}");
    }

    #[test]
    fn webhook_configurations_need_the_ca_they_are_kept_with() {
        let base = ["sluice-control-plane", "--policy-dir", "/p"];
        let without = [&base[..], &["--mutating-webhook-config", "sluice-injector"]].concat();
        let err = Args::try_parse_from(&without).unwrap().check().unwrap_err();
        assert!(err.contains("--webhook-ca"), "{err}");
        // A webhook whose certificate comes from files still needs their CA.
        let files = [&without[..], &WEBHOOK_FROM_FILES].concat();
        let err = Args::try_parse_from(files).unwrap().check().unwrap_err();
        assert!(err.contains("--webhook-ca"), "{err}");
        // Issued by the mesh CA: the bundle is the mesh root.
        let mesh = [&without[..], &["--webhook", "0.0.0.0:15017"]].concat();
        let args = Args::try_parse_from(&mesh).unwrap();
        args.check().unwrap();
        assert!(args.webhook.from_mesh_ca());
        let err = Args::try_parse_from([&mesh[..], &["--plaintext"]].concat())
            .unwrap()
            .check()
            .unwrap_err();
        assert!(err.contains("--plaintext"), "{err}");
        // A certificate without its key is refused by the parser.
        assert!(
            Args::try_parse_from(
                [
                    &base[..],
                    &["--webhook", "0.0.0.0:15017", "--webhook-cert", "/c"]
                ]
                .concat()
            )
            .is_err()
        );
        let with = [
            &base[..],
            &[
                "--webhook-ca",
                "/etc/sluice/webhook/ca.crt",
                "--validating-webhook-config",
                "sluice-validator",
            ],
        ]
        .concat();
        let args = Args::try_parse_from(with).unwrap();
        assert!(args.kubernetes.needs_client(false));
        assert_eq!(
            args.kubernetes.validating_webhook_config.as_deref(),
            Some("sluice-validator")
        );
    }

    #[test]
    fn a_host_name_is_a_server_name_when_it_is_a_dns_name() {
        assert_eq!(
            dns_name("Sluice-CP-0.shop\n").as_deref(),
            Some("sluice-cp-0.shop")
        );
        for bad in ["", " \n", "cp_0", "cp 0", "cp/0", "cp:0"] {
            assert_eq!(dns_name(bad), None, "{bad:?}");
        }
        // This machine's own name goes into the certificate when it is one.
        let here = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let args = Args::try_parse_from(["sluice-control-plane", "--policy-dir", "/p"]).unwrap();
        let names = args.to_config().unwrap().identity.unwrap().server_names;
        match dns_name(&here) {
            Some(host) => assert!(names.contains(&host), "{names:?} lacks {host}"),
            None => assert!(!names.iter().any(|n| n.is_empty()), "{names:?}"),
        }
    }

    #[test]
    fn every_flag_reaches_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("admin-token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let (state, addr) = (dir.path().join("state"), dir.path().join("addr"));
        let args = Args::try_parse_from([
            "sluice-control-plane",
            "--policy-dir",
            "/policies",
            "--grpc",
            "127.0.0.1:7001",
            "--admin",
            "127.0.0.1:7002",
            "--admin-token-file",
            token.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--addr-file",
            addr.to_str().unwrap(),
            "--test-stamp-schema-version",
            "9",
            "--policy-max-depth",
            "7",
        ])
        .unwrap();
        let cfg = args.to_config().unwrap();
        assert_eq!(cfg.policy_dir, Path::new("/policies"));
        assert_eq!(cfg.grpc_addr, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(cfg.admin_addr, "127.0.0.1:7002".parse().unwrap());
        assert_eq!(cfg.admin_token.as_deref(), Some("s3cret"));
        assert_eq!(cfg.state_dir.as_deref(), Some(state.as_path()));
        assert_eq!(cfg.addr_file.as_deref(), Some(addr.as_path()));
        assert_eq!(cfg.stamp_schema_version, Some(9));
        assert_eq!(cfg.policy_limits.max_depth, 7);
        assert_ne!(
            cfg.policy_limits.max_depth,
            sluice_config::Limits::default().max_depth
        );
    }

    /// A bootstrap-token file in `dir` accepting `token` as shop/order.
    fn token_file(dir: &Path, token: &str) -> PathBuf {
        let path = dir.join("tokens");
        let line = format!(r#"{{"token":"{token}","namespace":"shop","serviceAccount":"order"}}"#);
        std::fs::write(&path, line).unwrap();
        path
    }

    #[tokio::test]
    async fn in_a_cluster_the_ca_secret_and_token_review_replace_the_local_identity() {
        use crate::k8s::double::ApiServer;
        let dir = tempfile::tempdir().unwrap();
        let tokens = token_file(dir.path(), "local");
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "sluice-control-plane",
                "--policy-dir",
                "/p",
                "--trust-domain",
                "mesh.test",
                "--cert-lifetime",
                "90s",
                "--bootstrap-tokens",
                tokens.to_str().unwrap(),
            ];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).unwrap()
        };
        let api = ApiServer::new();
        api.respond("tokenreviews", |review| {
            let ok = review["spec"]["token"] == "projected";
            serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "metadata": {}, "spec": {},
                "status": {
                    "authenticated": ok,
                    "user": { "username": "system:serviceaccount:shop:log", "uid": "u1" },
                    "audiences": ["sluice"],
                }
            })
        });
        let client = api.client();

        // Without the flags the cluster changes nothing and is not asked.
        let args = parse(&[]);
        let mut cfg = args.to_config().unwrap();
        let local_root = cfg.identity.as_ref().unwrap().ca.root_pem();
        kube_identity(&args, &client, &mut cfg).await.unwrap();
        let id = cfg.identity.as_ref().unwrap();
        assert_eq!(id.ca.root_pem(), local_root);
        assert!(id.verifier.verify_async("local").await.is_ok());
        assert!(api.calls().is_empty(), "{:?}", api.calls());

        let args = parse(&[
            "--ca-secret",
            "sluice-ca",
            "--pod-namespace",
            "mesh",
            "--token-review",
        ]);
        let mut cfg = args.to_config().unwrap();
        kube_identity(&args, &client, &mut cfg).await.unwrap();
        let id = cfg.identity.as_ref().unwrap();
        let secret = api.get("secrets", "mesh", "sluice-ca").expect("the Secret");
        assert!(secret["data"]["ca.crt"].is_string(), "{secret}");
        assert_ne!(id.ca.root_pem(), local_root);
        // The root in the Secret, with the command line's trust domain and lifetime.
        assert_eq!(id.ca.trust_domain(), "mesh.test");
        assert_eq!(id.ca.leaf_ttl(), std::time::Duration::from_secs(90));
        let again = crate::k8s::load_or_create_ca_secret(
            client.clone(),
            "mesh",
            "sluice-ca",
            "mesh.test",
            std::time::Duration::from_secs(90),
        )
        .await
        .unwrap();
        assert_eq!(id.ca.root_der(), again.root_der());
        // Tokens are now the API server's to judge; the local file is not read.
        assert_eq!(
            id.verifier.verify_async("projected").await.unwrap(),
            crate::ca::WorkloadIdentity::new("shop", "log").unwrap()
        );
        assert!(id.verifier.verify_async("local").await.is_err());

        // Plaintext: no identity to replace, and the cluster is not asked.
        let args = Args::try_parse_from([
            "sluice-control-plane",
            "--policy-dir",
            "/p",
            "--plaintext",
            "--ca-secret",
            "other",
            "--token-review",
        ])
        .unwrap();
        let mut cfg = args.to_config().unwrap();
        let before = api.calls().len();
        kube_identity(&args, &client, &mut cfg).await.unwrap();
        assert!(cfg.identity.is_none());
        assert_eq!(api.calls().len(), before);
    }

    #[test]
    fn ca_is_generated_in_the_state_dir_and_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = token_file(dir.path(), "t");
        let state = dir.path().join("state");
        let args = Args::try_parse_from([
            "sluice-control-plane",
            "--policy-dir",
            "/p",
            "--state-dir",
            state.to_str().unwrap(),
            "--trust-domain",
            "mesh.test",
            "--cert-lifetime",
            "10s",
            "--bootstrap-tokens",
            tokens.to_str().unwrap(),
            "--server-name",
            "cp.example,10.0.0.7",
        ])
        .unwrap();
        let first = args.to_config().unwrap().identity.unwrap();
        assert_eq!(first.ca.trust_domain(), "mesh.test");
        assert_eq!(first.ca.leaf_ttl(), std::time::Duration::from_secs(10));
        assert!(first.server_names.iter().any(|n| n == "cp.example"));
        assert!(first.server_names.iter().any(|n| n == "10.0.0.7"));
        assert!(first.verifier.verify("t").is_ok());
        let again = args.to_config().unwrap().identity.unwrap();
        assert_eq!(first.ca.root_der(), again.ca.root_der());
        // The persisted files load as --ca-cert/--ca-key too.
        let loaded = Args::try_parse_from([
            "sluice-control-plane",
            "--policy-dir",
            "/p",
            "--ca-cert",
            state.join("ca.pem").to_str().unwrap(),
            "--ca-key",
            state.join("ca.key").to_str().unwrap(),
        ])
        .unwrap()
        .to_config()
        .unwrap()
        .identity
        .unwrap();
        assert_eq!(first.ca.root_der(), loaded.ca.root_der());
        assert!(loaded.verifier.verify("t").is_err());
    }

    #[test]
    fn plaintext_turns_the_ca_off_and_a_missing_ca_file_is_an_error() {
        let args =
            Args::try_parse_from(["sluice-control-plane", "--policy-dir", "/p", "--plaintext"])
                .unwrap();
        assert!(args.to_config().unwrap().identity.is_none());
        let args = Args::try_parse_from([
            "sluice-control-plane",
            "--policy-dir",
            "/p",
            "--ca-cert",
            "/nonexistent/ca.pem",
            "--ca-key",
            "/nonexistent/ca.key",
        ])
        .unwrap();
        assert!(matches!(args.to_config(), Err(Error::CaFile { .. })));
        assert!(
            Args::try_parse_from([
                "sluice-control-plane",
                "--policy-dir",
                "/p",
                "--ca-cert",
                "x"
            ])
            .is_err()
        );
    }
}
