//! Workload identity and mTLS: the proxy's key, its certificate from the
//! control plane's CA, and the rustls configurations built from them.
//!
//! - [`Credentials::request`]: generate a key (it never leaves the process), send a
//!   CSR with the bootstrap token to `sluice.v1.Identity/Certify`, keep what comes back.
//! - [`TlsStore`]: the current credentials and the rustls [`ServerConfig`] built from
//!   them, behind an `ArcSwap`. Listeners load the server config per accepted
//!   connection, so installing renewed credentials changes the next handshake
//!   without restarting a listener or touching connections already open. Inbound
//!   requires a client certificate chaining to the trust root; outbound presents
//!   the proxy's certificate and checks the server's SPIFFE ID ([`SpiffeServerVerifier`]).
//! - [`renew`]: re-certify at 70–80 % of the certificate's lifetime.

mod renew;
mod verify;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sluice_api::pb;
use sluice_api::pb::identity_client::IdentityClient;

use crate::ProxyError;

pub use renew::{RENEW_AT, RENEW_JITTER, renew_delay, run_renewal};
pub use verify::{SpiffeServerVerifier, peer_identity, peer_spiffe_id};

/// ALPN protocols offered and accepted on mesh connections, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A certificate chain, its private key and the mesh trust root.
pub struct Credentials {
    /// The leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key, PKCS#8.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The mesh root every peer must chain to.
    pub trust_root: CertificateDer<'static>,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Credentials {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("spiffe_id", &self.spiffe_id())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Generates a key and asks the control plane to certify it with `token`.
    pub async fn request(
        client: &mut IdentityClient<tonic::transport::Channel>,
        token: &str,
    ) -> Result<Self, ProxyError> {
        let key = KeyPair::generate().map_err(|e| ProxyError::Tls(e.to_string()))?;
        let mut params = CertificateParams::default();
        // The CA decides the identity from the token; the CSR carries only the key.
        params.distinguished_name = DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| ProxyError::Tls(e.to_string()))?;
        let resp = client
            .certify(pb::CertifyRequest {
                token: token.to_string(),
                csr_der: csr.der().to_vec(),
            })
            .await
            .map_err(|s| ProxyError::Certify(Box::new(s)))?
            .into_inner();
        if resp.cert_chain_der.is_empty() {
            return Err(ProxyError::Tls("control plane sent an empty chain".into()));
        }
        Ok(Self {
            chain: resp
                .cert_chain_der
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            trust_root: CertificateDer::from(resp.trust_root_der),
            not_after: UNIX_EPOCH + Duration::from_secs(resp.not_after),
        })
    }

    /// The SPIFFE ID in the leaf's URI SAN.
    pub fn spiffe_id(&self) -> Option<String> {
        peer_spiffe_id(&self.chain)
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, ProxyError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.trust_root.clone())
            .map_err(|e| ProxyError::Tls(format!("trust root: {e}")))?;
        Ok(Arc::new(roots))
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Material {
    creds: Credentials,
    roots: Arc<RootCertStore>,
    server: Arc<ServerConfig>,
}

impl Material {
    fn build(creds: Credentials) -> Result<Self, ProxyError> {
        let roots = creds.roots()?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| ProxyError::Tls(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ProxyError::Tls(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(creds.chain.clone(), creds.key())
            .map_err(|e| ProxyError::Tls(e.to_string()))?;
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            creds,
            roots,
            server: Arc::new(server),
        })
    }
}

/// The current credentials and the TLS configurations built from them.
pub struct TlsStore {
    current: ArcSwap<Material>,
}

impl std::fmt::Debug for TlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStore")
            .field("credentials", &self.current.load().creds)
            .finish()
    }
}

impl TlsStore {
    /// A store holding `creds`.
    pub fn new(creds: Credentials) -> Result<Self, ProxyError> {
        Ok(Self {
            current: ArcSwap::from_pointee(Material::build(creds)?),
        })
    }

    /// Replaces the credentials; the next handshake on every listener uses them.
    /// On error the previous credentials stay in force.
    pub fn install(&self, creds: Credentials) -> Result<(), ProxyError> {
        let material = Material::build(creds)?;
        tracing::info!(spiffe_id = ?material.creds.spiffe_id(), not_after = ?material.creds.not_after, "installed workload certificate");
        self.current.store(Arc::new(material));
        Ok(())
    }

    /// The inbound (server) configuration: requires a client certificate chaining
    /// to the trust root. Load it per accepted connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load().server.clone()
    }

    /// An outbound (client) configuration presenting our certificate and
    /// accepting only a server whose SPIFFE ID is `expected` (any mesh identity
    /// when `None`).
    pub fn client_config(&self, expected: Option<&str>) -> Result<Arc<ClientConfig>, ProxyError> {
        let m = self.current.load();
        let verifier = SpiffeServerVerifier::new(m.roots.clone(), expected.map(str::to_string));
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ProxyError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(m.creds.chain.clone(), m.creds.key())
            .map_err(|e| ProxyError::Tls(e.to_string()))?;
        cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// End of the current certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.current.load().creds.not_after
    }

    /// Our own SPIFFE ID.
    pub fn spiffe_id(&self) -> Option<String> {
        self.current.load().creds.spiffe_id()
    }
}
