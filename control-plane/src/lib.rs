//! `sluice-control-plane`: validates policies and streams them to every proxy.
//!
//! The pieces, in the order data flows through them:
//!
//! - [`source`]: the policy directory. Every `*.yaml`/`*.yml` file is validated
//!   with `sluice-config`; a broken file is refused with the validator's message
//!   and the last good version of that file stays in force, as it does when a
//!   file claims a host or policy another file has in force. The versions in
//!   force are persisted in the state directory so a restart with a broken file
//!   on disk still serves them. A watcher re-reads the directory on any change.
//! - `state`: what every part shares (`Shared`): the published snapshot, the
//!   policy source, readiness; `source` and `k8s` depend on it, not on this file.
//! - The published snapshot: one `watch` channel holding the mesh's
//!   [`sluice_config::PolicySet`] as a ready-to-send `Snapshot`; it is replaced
//!   with `send_if_modified` only when the content hash changes, so a no-op edit
//!   sends nothing.
//! - `grpc`: the `StreamPolicies` service. Each proxy stream's response body watches
//!   the snapshot channel and sends each version the proxy does not have yet,
//!   recording ACKs and NACKs in the [`proxies`] registry; `push` sends each
//!   version as bytes encoded once and shared by every stream.
//! - `admin`: `/live`, `/ready`, `/metrics`, `/policies`, `/proxies`, `/served`,
//!   `/rollouts` (all but the probes and metrics behind the admin token when bound
//!   beyond loopback).
//! - `serve`: the one accept loop (accept, bounded TLS handshake, graceful drain)
//!   behind the admin, webhook and gRPC listeners.
//! - [`rollout`]: canary rollouts driven from the proxies' reports.
//! - [`inject`]: the sidecar-injection and RoutePolicy-validation webhook.
//! - [`k8s`]: in a cluster, RoutePolicy objects as the source (statuses written by
//!   the elected replica), Service endpoints for `service` backends, TokenReview
//!   and the CA Secret.
//! - [`ca`] and [`identity`]: the mesh certificate authority and the
//!   `sluice.v1.Identity/Certify` service. With an [`IdentityConfig`] the gRPC
//!   port is TLS, its serving certificate signed by the mesh root, and serves
//!   `Certify` beside the policy stream.
//!
//! [`start`] wires them together for in-process use (tests, the demo, the
//! benchmark); [`cli_main`] is the binary.

#![warn(missing_docs, unreachable_pub)]

mod admin;
mod apportion;
pub mod ca;
mod cli;
pub mod crd;
pub mod gateway;
mod grpc;
pub mod identity;
pub mod inject;
pub mod k8s;
mod metrics;
mod operator;
pub mod proxies;
mod push;
mod refusal;
pub mod rollout;
mod serve;
mod serving_cert;
pub mod source;
mod state;
pub mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use cli::{Args, Source, cli_main};

use crate::k8s::endpoints::ServiceEndpoints;
use crate::k8s::policies::KubePolicies;
use crate::source::{DirWatcher, PolicyDir};
use crate::state::{PolicySource, Shared};

/// Errors of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener (`grpc`, `admin`).
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The admin token file cannot be read, or is empty.
    #[error("admin token file {path}: {source}")]
    AdminToken {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The policy directory cannot be read.
    #[error("policy directory {path}: {source}")]
    PolicyDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The policy directory cannot be watched.
    #[error("cannot watch policy directory {path}: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: notify::Error,
    },
    /// The gRPC serving certificate cannot be made into a TLS configuration.
    #[error("gRPC serving certificate: {0}")]
    ServingTls(String),
    /// The webhook's serving certificate or key cannot be loaded.
    #[error("webhook TLS {path}: {reason}")]
    WebhookTls {
        /// The certificate or key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The state directory or the address file cannot be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A CA certificate, key or token file cannot be read or written.
    #[error("CA file {path}: {source}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A line of the bootstrap token file is invalid.
    #[error("token file {path}, line {line}: {reason}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A namespace or service account is not a Kubernetes-style name.
    #[error("invalid identity part {0:?}: expected lowercase letters, digits, '-' or '.'")]
    InvalidIdentity(String),
    /// The bootstrap credential proves no identity.
    #[error("bootstrap credential refused")]
    BootstrapRefused,
    /// A certificate signing request cannot be parsed or its signature is wrong.
    #[error("invalid certificate signing request: {0}")]
    Csr(#[source] rcgen::Error),
    /// Generating, loading or signing a certificate failed.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] ::kube::Error),
    /// HTTPRoute files could not be converted: one line per problem, each naming
    /// its file and field path.
    #[error("{}", .0.join("\n"))]
    Convert(Vec<String>),
    /// The CA Secret exists but does not hold a usable root.
    #[error("CA secret {namespace}/{name}: {reason}")]
    CaSecret {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Everything [`start`] needs; `Default` listens on ephemeral loopback ports.
#[derive(Clone, Debug)]
pub struct ControlPlaneConfig {
    /// The directory of policy YAML files.
    pub policy_dir: PathBuf,
    /// gRPC listen address (policy stream).
    pub grpc_addr: SocketAddr,
    /// Admin HTTP listen address.
    pub admin_addr: SocketAddr,
    /// The admin token: bound beyond loopback, `/policies` and `/proxies` need it
    /// (`Authorization: Bearer …`); without one they are closed there.
    pub admin_token: Option<Arc<str>>,
    /// Where the policy files in force are kept; `None` keeps them only in memory.
    pub state_dir: Option<PathBuf>,
    /// After binding, the bound addresses are written here as JSON.
    pub addr_file: Option<PathBuf>,
    /// Quiet time before re-reading while a policy file is being written (created
    /// or changed and not closed yet), so it is never read half written. A change
    /// already complete on disk (an editor's write-then-rename, a ConfigMap swap, a
    /// file closed after writing) is read after 2 ms of quiet, or this if shorter.
    pub debounce: Duration,
    /// Full re-read even without events, in case the OS dropped some.
    pub rescan_interval: Duration,
    /// In a cluster: discover Service endpoints and, if asked, take policies from
    /// RoutePolicy objects instead of `policy_dir`.
    pub kubernetes: Option<k8s::KubeConfig>,
    /// The CA, and TLS on the gRPC port; `None` serves plaintext gRPC without
    /// the Identity service.
    pub identity: Option<IdentityConfig>,
    /// In a cluster: keep the mesh root in a ConfigMap of every namespace, for
    /// injected proxies (needs `identity`).
    pub publish_trust_root: Option<k8s::PublishTrustRoot>,
    /// In a cluster: keep the webhook configurations' `caBundle` in step with the
    /// webhook's certificate.
    pub webhook_bundles: Option<k8s::ca_bundle::WebhookBundles>,
    /// Bounds on policy input: each file, the directory, each RoutePolicy object.
    pub policy_limits: sluice_config::Limits,
    /// Tests only: the schema version snapshots are stamped with, instead of
    /// [`sluice_config::SCHEMA_VERSION`].
    #[doc(hidden)]
    pub stamp_schema_version: Option<u32>,
}

/// The certificate authority and how the gRPC port presents itself.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// Signs workload certificates and the gRPC serving certificate.
    pub ca: Arc<ca::Ca>,
    /// Proves a proxy's identity from its bootstrap credential.
    pub verifier: Arc<dyn ca::BootstrapVerifier>,
    /// DNS names and IP addresses the gRPC serving certificate carries as SANs.
    pub server_names: Vec<String>,
    /// Lifetime of the gRPC serving certificate; it is renewed at half of it.
    pub server_cert_lifetime: Duration,
    /// Where to write the root certificate (PEM) once started, for `--trust-root`.
    pub write_trust_root: Option<PathBuf>,
}

impl IdentityConfig {
    /// A configuration serving `ca` with `verifier`, named `localhost`,
    /// `127.0.0.1` and `::1` (add the Service's DNS names in a cluster).
    pub fn new(ca: Arc<ca::Ca>, verifier: Arc<dyn ca::BootstrapVerifier>) -> Self {
        Self {
            ca,
            verifier,
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            server_cert_lifetime: Duration::from_secs(24 * 3600),
            write_trust_root: None,
        }
    }
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            policy_dir: PathBuf::from("."),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_token: None,
            state_dir: None,
            addr_file: None,
            debounce: Duration::from_millis(20),
            rescan_interval: Duration::from_secs(30),
            kubernetes: None,
            identity: None,
            publish_trust_root: None,
            webhook_bundles: None,
            policy_limits: sluice_config::Limits::default(),
            stamp_schema_version: None,
        }
    }
}

/// A control plane running on the current tokio runtime.
#[derive(Debug)]
pub struct RunningControlPlane {
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    trust_root: Option<String>,
    webhook_tls: Option<inject::WebhookTls>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    watcher: Option<DirWatcher>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningControlPlane {
    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The URL proxies use for `--control-plane`: `https://` when the gRPC port is TLS.
    pub fn grpc_url(&self) -> String {
        let scheme = if self.trust_root.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.grpc_addr)
    }

    /// The mesh root certificate (PEM) when the CA is on: what `--trust-root` holds.
    pub fn trust_root_pem(&self) -> Option<&str> {
        self.trust_root.as_deref()
    }

    /// When the CA is on: the injection webhook's serving certificate issued by
    /// it, for the gRPC port's names and lifetime, renewed at half of it (counted
    /// in `sluice_cp_webhook_cert_renewals_total`). Its `caBundle` is the mesh root.
    pub fn webhook_tls(&self) -> Option<inject::WebhookTls> {
        self.webhook_tls.clone()
    }

    /// The version (content hash) being served, if any policy was loaded.
    pub fn policy_version(&self) -> Option<String> {
        self.shared.current_version()
    }

    /// A counter bumped whenever what `/policies` or `/proxies` shows may have
    /// changed (a re-read of the source, a proxy connecting, an ACK or NACK), so
    /// callers can wait for a condition instead of polling.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// How many proxies reported requests on `route` of the policy `namespace`/`policy`
    /// in the last few seconds.
    pub fn proxies_with_traffic(&self, namespace: &str, policy: &str, route: &str) -> u32 {
        let now = self.shared.clock.instant();
        self.shared
            .reports
            .proxies_with_traffic(namespace, policy, route, now)
    }

    /// A receiver that changes whenever a new version is published.
    pub fn watch_version(&self) -> watch::Receiver<Option<String>> {
        let mut snapshots = self.shared.snapshots.subscribe();
        let (tx, rx) = watch::channel(self.shared.current_version());
        let mut shutdown = self.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = snapshots.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    _ = shutdown.changed() => return,
                }
                let v = snapshots
                    .borrow_and_update()
                    .as_ref()
                    .and_then(|p| p.views.last())
                    .map(|v| v.snapshot.version.clone());
                tx.send_replace(v);
            }
        });
        rx
    }

    /// Stops watching, ends every proxy stream, closes the listeners and waits
    /// (bounded) for the servers to finish.
    pub async fn shutdown(mut self) {
        self.stop();
        for task in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        drop(self.watcher.take());
    }
}

impl Drop for RunningControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Loads the policy directory, binds the listeners and starts serving.
///
/// Returns once the first load is published and both listeners are bound (and
/// the address file, if asked for, is written). With Kubernetes as the source
/// (or discovery on), the first set is published once the API has been listed;
/// `/ready` says when.
pub async fn start(cfg: ControlPlaneConfig) -> Result<RunningControlPlane, Error> {
    let kube_policies = cfg.kubernetes.as_ref().is_some_and(|k| k.policies);
    let source = if kube_policies {
        PolicySource::Kubernetes(KubePolicies::new(
            cfg.state_dir.as_deref(),
            cfg.policy_limits,
        ))
    } else {
        PolicySource::Dir(PolicyDir::open(
            &cfg.policy_dir,
            cfg.state_dir.as_deref(),
            cfg.policy_limits,
        )?)
    };
    let endpoints = match &cfg.kubernetes {
        Some(k) => ServiceEndpoints::enabled(&k.trust_domain),
        None => ServiceEndpoints::default(),
    };
    let shared = Arc::new(Shared::new(
        source,
        endpoints,
        cfg.state_dir.as_deref(),
        cfg.stamp_schema_version,
    ));
    if kube_policies {
        // With several replicas, the lease holder drives; until elected, follow.
        shared.rollouts.set_leading(false);
    }
    shared.reload();

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let grpc_listener = bind("grpc", cfg.grpc_addr).await?;
    let admin_listener = bind("admin", cfg.admin_addr).await?;
    let grpc_addr = local_addr("grpc", &grpc_listener, cfg.grpc_addr)?;
    let admin_addr = local_addr("admin", &admin_listener, cfg.admin_addr)?;

    let watcher = if kube_policies {
        None
    } else {
        Some(DirWatcher::start(
            &cfg.policy_dir,
            {
                let shared = shared.clone();
                move || shared.reload()
            },
            cfg.debounce,
            cfg.rescan_interval,
        )?)
    };

    let grpc_tls = match &cfg.identity {
        Some(id) => Some(grpc::tls(
            id,
            grpc_addr,
            shared.metrics.serving_cert_renewals.clone(),
        )?),
        None => None,
    };
    let trust_root = cfg.identity.as_ref().map(|id| id.ca.root_pem());
    if let (Some(id), Some(pem)) = (&cfg.identity, &trust_root)
        && let Some(path) = &id.write_trust_root
    {
        sluice_api::write_atomic(path, pem.as_bytes()).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
    }

    let mut tasks = vec![
        tokio::spawn(grpc::serve(
            grpc_listener,
            shared.clone(),
            grpc_tls,
            shutdown_rx.clone(),
        )),
        tokio::spawn(admin::serve(
            admin_listener,
            sluice_api::AdminGate::new(admin_addr, cfg.admin_token.clone()),
            shared.clone(),
            shutdown_rx.clone(),
        )),
    ];
    tasks.push(tokio::spawn(rollout::driver::drive(
        shared.clone(),
        shutdown_rx.clone(),
    )));
    let aging = shared.clone();
    let stop = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        aging
            .reports
            .keep_fresh(|| aging.clock.instant(), stop)
            .await;
    }));
    if let Some(kube) = &cfg.kubernetes {
        let mut kube = kube.clone();
        if kube.lease.admin_url.is_none() {
            let reachable = match kube.pod_ip {
                _ if !admin_addr.ip().is_unspecified() => Some(admin_addr),
                Some(ip) => Some(SocketAddr::new(ip, admin_addr.port())),
                None => None,
            };
            kube.lease.admin_url = reachable.map(|a| format!("http://{a}"));
        }
        tasks.extend(k8s::spawn(
            &kube,
            &shared,
            cfg.admin_token.clone(),
            &shutdown_rx,
        ));
    }
    match (&cfg.publish_trust_root, &trust_root) {
        (Some(publish), Some(pem)) => {
            tasks.push(k8s::spawn_trust_root(publish, pem, &shutdown_rx));
        }
        (Some(publish), None) => {
            tracing::warn!(configmap = %publish.configmap, "the CA is off, so there is no trust root to publish");
        }
        (None, _) => {}
    }
    if let Some(bundles) = &cfg.webhook_bundles {
        tasks.push(tokio::spawn(k8s::ca_bundle::keep(
            bundles.clone(),
            shutdown_rx.clone(),
        )));
    }

    if let Some(path) = &cfg.addr_file {
        let json = serde_json::json!({
            "grpc": grpc_addr.to_string(),
            "admin": admin_addr.to_string(),
        });
        sluice_api::write_atomic(path, json.to_string().as_bytes()).map_err(|source| {
            Error::Write {
                path: path.clone(),
                source,
            }
        })?;
    }

    if kube_policies {
        tracing::info!(%grpc_addr, %admin_addr, tls = trust_root.is_some(), "control plane started; policies from RoutePolicy objects");
    } else {
        tracing::info!(%grpc_addr, %admin_addr, tls = trust_root.is_some(), policy_dir = %cfg.policy_dir.display(), "control plane started");
    }

    let webhook_tls = cfg.identity.as_ref().map(|id| {
        inject::WebhookTls::MeshCa(inject::MeshCaCert {
            ca: id.ca.clone(),
            names: id.server_names.clone(),
            lifetime: id.server_cert_lifetime,
            renewals: shared.metrics.webhook_cert_renewals.clone(),
        })
    });
    Ok(RunningControlPlane {
        grpc_addr,
        admin_addr,
        trust_root,
        webhook_tls,
        shared,
        shutdown: shutdown_tx,
        watcher,
        tasks,
    })
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

fn local_addr(
    what: &'static str,
    l: &tokio::net::TcpListener,
    addr: SocketAddr,
) -> Result<SocketAddr, Error> {
    l.local_addr()
        .map_err(|source| Error::Bind { what, addr, source })
}

/// Milliseconds since the Unix epoch, for the admin API's timestamps.
pub(crate) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
