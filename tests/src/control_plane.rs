//! A `sluice-control-plane` started in process, on a policy directory of its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper::StatusCode;
use std::sync::Arc;
use std::time::Duration;

use sluice_control_plane::ca::{Ca, TokenFile};
use sluice_control_plane::{ControlPlaneConfig, IdentityConfig, RunningControlPlane};

use crate::MeshTls;
use tempfile::TempDir;

use crate::proxy::{admin_get, parse_json, write_atomically};
use crate::{WAIT, wait_until};

/// A control plane watching `policies/` in its own temporary directory and keeping
/// its last good files in `state/` there; restartable on the same ports.
pub struct TestControlPlane {
    running: Option<RunningControlPlane>,
    ca: Option<CaOptions>,
    grpc: SocketAddr,
    admin: SocketAddr,
    policy_dir: PathBuf,
    state_dir: PathBuf,
    _dir: TempDir,
}

impl TestControlPlane {
    /// Starts on ephemeral ports with `files` (name, YAML) in its policy directory.
    pub async fn start(files: &[(&str, &str)]) -> Self {
        Self::start_inner(files, None).await
    }

    /// Starts with its CA on (TLS gRPC, `Certify`): the root is generated in its
    /// state directory and written to [`trust_root`](Self::trust_root); `tokens` are
    /// `(token, namespace, service account)`; issued certificates live `cert_lifetime`.
    pub async fn start_with_ca(
        files: &[(&str, &str)],
        tokens: &[(&str, &str, &str)],
        cert_lifetime: Duration,
    ) -> Self {
        Self::start_with_ca_lifetimes(files, tokens, cert_lifetime, Duration::from_secs(24 * 3600))
            .await
    }

    /// [`start_with_ca`](Self::start_with_ca) with the gRPC port's own serving
    /// certificate living `server_cert_lifetime` (renewed at half of it).
    pub async fn start_with_ca_lifetimes(
        files: &[(&str, &str)],
        tokens: &[(&str, &str, &str)],
        cert_lifetime: Duration,
        server_cert_lifetime: Duration,
    ) -> Self {
        let lines: String = tokens
            .iter()
            .map(|(t, ns, sa)| {
                format!(
                    "{{\"token\":\"{t}\",\"namespace\":\"{ns}\",\"serviceAccount\":\"{sa}\"}}\n"
                )
            })
            .collect();
        Self::start_inner(
            files,
            Some(CaOptions {
                tokens: lines,
                cert_lifetime,
                server_cert_lifetime,
            }),
        )
        .await
    }

    async fn start_inner(files: &[(&str, &str)], ca: Option<CaOptions>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sluice-e2e-cp-")
            .tempdir()
            .expect("temporary directory");
        let policy_dir = dir.path().join("policies");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&policy_dir).expect("create policy directory");
        for (name, yaml) in files {
            std::fs::write(policy_dir.join(name), yaml).expect("write policy file");
        }
        // Ports a restart can have again ([`crate::restartable_addr`]).
        let (grpc, admin) = (crate::restartable_addr(), crate::restartable_addr());
        let running = launch(&policy_dir, &state_dir, ca.as_ref(), grpc, admin).await;
        Self {
            grpc: running.grpc_addr(),
            admin: running.admin_addr(),
            running: Some(running),
            ca,
            policy_dir,
            state_dir,
            _dir: dir,
        }
    }

    /// The URL proxies subscribe to (`--control-plane`): `https://` with the CA on.
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc)
    }

    /// The mesh root (PEM file) proxies trust, with the CA on.
    pub fn trust_root(&self) -> PathBuf {
        self.state_dir.join("ca.pem")
    }

    /// Writes `token` to a file of its own and returns the mTLS options of a proxy
    /// that certifies with it.
    pub fn mesh_tls(&self, token: &str) -> MeshTls {
        let file = self.state_dir.join(format!("token-{token}"));
        std::fs::write(&file, token).expect("write the token file");
        MeshTls {
            identity_url: self.url(),
            trust_root: self.trust_root(),
            token_file: file,
            permissive: false,
        }
    }

    /// Credentials the CA issues for `token` (to a client standing for a workload),
    /// over its TLS gRPC port.
    pub async fn certify(&self, token: &str) -> sluice_proxy::tls::Credentials {
        let root = std::fs::read(self.trust_root()).expect("read the trust root");
        let channel = sluice_api::control_plane_endpoint(&self.url(), Some(&root))
            .expect("the control plane's endpoint")
            .connect()
            .await
            .expect("connect to the control plane over TLS");
        let mut client = sluice_api::pb::identity_client::IdentityClient::new(channel);
        sluice_proxy::tls::Credentials::request(&mut client, token)
            .await
            .expect("certify")
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The leaf certificate (DER) the gRPC port presents to a new TLS client
    /// that trusts the mesh root, after a real handshake.
    pub async fn serving_cert(&self) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(self.trust_root())
            .expect("read the trust root")
        {
            roots.add(cert.expect("a PEM certificate")).expect("a root");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(self.grpc)
            .await
            .expect("connect to the gRPC port");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("a name");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("a TLS handshake the mesh root verifies");
        let (_, session) = tls.get_ref();
        session.peer_certificates().expect("a certificate")[0].to_vec()
    }

    /// One sample of the control plane's `/metrics`, by exact name (no labels).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = admin_get(self.admin, "/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The watched policy directory.
    pub fn policy_dir(&self) -> &Path {
        &self.policy_dir
    }

    /// Replaces (or creates) one policy file atomically, as an editor would.
    pub fn write_policy(&self, name: &str, yaml: &str) {
        write_atomically(&self.policy_dir.join(name), yaml);
    }

    /// GET on the admin port, parsed as JSON (panics unless 2xx and JSON).
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = admin_get(self.admin, path).await;
        parse_json(path, status, &body)
    }

    /// How many proxies reported requests on `route` of policy `namespace`/`policy`
    /// recently.
    pub fn proxies_with_traffic(&self, namespace: &str, policy: &str, route: &str) -> u32 {
        self.running
            .as_ref()
            .map_or(0, |r| r.proxies_with_traffic(namespace, policy, route))
    }

    /// A POST on the admin port: status and body.
    pub async fn admin_post(&self, path: &str) -> (StatusCode, String) {
        crate::proxy::admin_send(self.admin, hyper::Method::POST, path, "").await
    }

    /// The version the control plane serves.
    pub fn version(&self) -> Option<String> {
        self.running
            .as_ref()
            .and_then(RunningControlPlane::policy_version)
    }

    /// Waits until `/proxies` lists `n` connected proxies that all acknowledged `version`.
    pub async fn wait_acked_everywhere(&self, version: &str, n: usize) {
        let admin = self.admin;
        wait_until(
            &format!("{n} connected proxies acknowledged {version}"),
            WAIT,
            || async move {
                let (status, body) = admin_get(admin, "/proxies").await;
                if status != StatusCode::OK {
                    return false;
                }
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let proxies = v["proxies"].as_array().cloned().unwrap_or_default();
                let acked = proxies
                    .iter()
                    .filter(|p| p["connected"] == true && p["acked_version"] == version)
                    .count();
                acked == n
            },
        )
        .await;
    }

    /// Stops the control plane, ending every proxy stream (its ports are kept for
    /// [`TestControlPlane::restart`]).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Starts it again on the same ports, policy directory and state directory.
    pub async fn restart(&mut self) {
        self.stop().await;
        let running = launch(
            &self.policy_dir,
            &self.state_dir,
            self.ca.as_ref(),
            self.grpc,
            self.admin,
        )
        .await;
        self.running = Some(running);
    }
}

/// The CA settings of a test control plane.
#[derive(Clone, Debug)]
struct CaOptions {
    /// Token-file lines.
    tokens: String,
    cert_lifetime: Duration,
    server_cert_lifetime: Duration,
}

async fn launch(
    policy_dir: &Path,
    state_dir: &Path,
    ca: Option<&CaOptions>,
    grpc: SocketAddr,
    admin: SocketAddr,
) -> RunningControlPlane {
    let identity = ca.map(|ca| {
        let root = Ca::load_or_generate(
            "cluster.local",
            &state_dir.join("ca.pem"),
            &state_dir.join("ca.key"),
            ca.cert_lifetime,
        )
        .expect("the mesh CA");
        let tokens = TokenFile::parse(Path::new("tokens"), &ca.tokens).expect("token lines");
        let mut cfg = IdentityConfig::new(Arc::new(root), Arc::new(tokens));
        cfg.server_cert_lifetime = ca.server_cert_lifetime;
        cfg
    });
    let cfg = ControlPlaneConfig {
        policy_dir: policy_dir.to_path_buf(),
        state_dir: Some(state_dir.to_path_buf()),
        grpc_addr: grpc,
        admin_addr: admin,
        identity,
        ..Default::default()
    };
    sluice_control_plane::start(cfg)
        .await
        .expect("start the control plane")
}
