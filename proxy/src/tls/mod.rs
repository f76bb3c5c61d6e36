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
//!   Mesh connections are TLS 1.3 only.
//! - [`MeshConnector`]: the outbound connector of pooled mesh clients; it reads the
//!   store's current credentials per new connection, so a rotation applies to new
//!   connections while pooled ones live on.
//! - `accept`: the inbound listener's TLS accept (strict, or permissive: a
//!   plaintext client is served without an identity).
//! - `identity`: the first certificate and its renewals, from the control plane.
//! - [`run_renewal`]: re-certify at 70–80 % of the certificate's lifetime.

pub(crate) mod accept;
mod connect;
pub(crate) mod identity;
mod renew;
mod verify;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sluice_api::pb;
use sluice_api::pb::identity_client::IdentityClient;
use tokio::sync::watch;

use crate::ProxyError;

pub use connect::{MeshConnector, MeshStream};
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
            .with_protocol_versions(&[&rustls::version::TLS13])
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
///
/// Empty until the first certificate arrives: then the inbound listener refuses
/// handshakes and outbound mesh connections fail, and `/ready` says 503.
pub struct TlsStore {
    current: ArcSwapOption<Material>,
    /// Installs so far; a watch so tests and the admin API can wait on rotations.
    installs: watch::Sender<u64>,
    /// When renewal is next due (Unix ms; 0 = not scheduled).
    next_renewal_ms: AtomicU64,
    expiry_gauge: Option<prometheus::Gauge>,
}

impl std::fmt::Debug for TlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStore")
            .field(
                "credentials",
                &self.current.load().as_ref().map(|m| m.creds.spiffe_id()),
            )
            .finish_non_exhaustive()
    }
}

impl TlsStore {
    /// A store holding `creds`.
    pub fn new(creds: Credentials) -> Result<Self, ProxyError> {
        let store = Self::empty();
        store.install(creds)?;
        Ok(store)
    }

    /// A store without credentials yet.
    pub fn empty() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            installs: watch::channel(0).0,
            next_renewal_ms: AtomicU64::new(0),
            expiry_gauge: None,
        }
    }

    /// Sets `gauge` to the current certificate's expiry (Unix seconds) on every install.
    pub fn with_expiry_gauge(mut self, gauge: prometheus::Gauge) -> Self {
        self.expiry_gauge = Some(gauge);
        self
    }

    /// Replaces the credentials; the next handshake on every listener and every
    /// new outbound connection uses them, while open connections keep theirs.
    /// On error the previous credentials stay in force.
    pub fn install(&self, creds: Credentials) -> Result<(), ProxyError> {
        let material = Material::build(creds)?;
        tracing::info!(spiffe_id = ?material.creds.spiffe_id(), not_after = ?material.creds.not_after, "installed workload certificate");
        if let Some(g) = &self.expiry_gauge {
            g.set(unix_secs(material.creds.not_after) as f64);
        }
        self.current.store(Some(Arc::new(material)));
        self.installs.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Whether a certificate is held.
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Whether the certificate held has expired (renewal kept failing): peers refuse
    /// it, so new mesh connections from and to this proxy fail while pooled ones go on.
    pub fn is_expired(&self) -> bool {
        self.is_ready() && self.not_after() <= SystemTime::now()
    }

    /// How many certificates were installed (the first one counts).
    pub fn installs(&self) -> u64 {
        *self.installs.borrow()
    }

    /// A receiver of the install count, changed on every install.
    pub fn watch_installs(&self) -> watch::Receiver<u64> {
        self.installs.subscribe()
    }

    /// The inbound (server) configuration: TLS 1.3, requires a client
    /// certificate chaining to the trust root. Load it per accepted connection.
    /// `None` until a certificate is held.
    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        self.current.load().as_ref().map(|m| m.server.clone())
    }

    /// An outbound (client) configuration presenting our certificate and
    /// accepting only a server whose SPIFFE ID is `expected` (any mesh identity
    /// when `None`), offering both ALPN protocols.
    pub fn client_config(&self, expected: Option<&str>) -> Result<Arc<ClientConfig>, ProxyError> {
        self.client_config_for(expected, &ALPN)
    }

    /// [`client_config`](Self::client_config) offering only `alpn`.
    pub fn client_config_for(
        &self,
        expected: Option<&str>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, ProxyError> {
        let guard = self.current.load();
        let m = guard.as_ref().ok_or(ProxyError::NoWorkloadCertificate)?;
        let verifier = SpiffeServerVerifier::new(m.roots.clone(), expected.map(str::to_string));
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ProxyError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(m.creds.chain.clone(), m.creds.key())
            .map_err(|e| ProxyError::Tls(e.to_string()))?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// End of the current certificate's validity (`UNIX_EPOCH` when none is held).
    pub fn not_after(&self) -> SystemTime {
        self.current
            .load()
            .as_ref()
            .map_or(UNIX_EPOCH, |m| m.creds.not_after)
    }

    /// Our own SPIFFE ID.
    pub fn spiffe_id(&self) -> Option<String> {
        self.current
            .load()
            .as_ref()
            .and_then(|m| m.creds.spiffe_id())
    }

    /// When the renewal task next renews, if it has scheduled one.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        match self.next_renewal_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    pub(crate) fn set_next_renewal(&self, at: SystemTime) {
        let ms = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.next_renewal_ms.store(ms, Ordering::Relaxed);
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{BasicConstraints, IsCa, Issuer, SanType};

    /// A leaf for `spiffe_id` valid until `not_after` (Unix seconds), signed by a mesh
    /// root of its own.
    /// A leaf for `spiffe_id` valid until `not_after` (Unix seconds), signed by a mesh
    /// root of its own (for the admin API's tests too).
    pub(crate) fn test_credentials(spiffe_id: &str, not_after: u64) -> Credentials {
        credentials(spiffe_id, not_after)
    }

    fn credentials(spiffe_id: &str, not_after: u64) -> Credentials {
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::default();
        root.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let trust_root = root.self_signed(&root_key).unwrap().der().clone();
        let issuer = Issuer::new(root, root_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::default();
        leaf.distinguished_name = DistinguishedName::new();
        leaf.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        Credentials {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            trust_root,
            not_after: UNIX_EPOCH + Duration::from_secs(not_after),
        }
    }

    const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";
    const ORDER_V2: &str = "spiffe://cluster.local/ns/shop/sa/order-v2";

    /// A peer that accepts the TCP connection and never answers the ClientHello fails
    /// the mesh connect after the handshake timeout (5 s), as a TCP connect past its
    /// own timeout does, instead of holding the request for ever.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_answers_the_handshake_fails_the_connect_in_time() {
        use tower::Service;
        let store = Arc::new(TlsStore::new(credentials(ORDER, u64::from(u32::MAX))).unwrap());
        // Accepted by the kernel, never read: the ClientHello gets no answer.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri: http::Uri = format!("http://{}", silent.local_addr().unwrap())
            .parse()
            .unwrap();
        let mut connector = MeshConnector::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
            store,
            Some(ORDER_V2.into()),
            &[b"http/1.1"],
        );
        let started = tokio::time::Instant::now();
        let err = connector.call(uri).await.expect_err("no handshake");
        assert!(err.to_string().contains("TLS handshake"), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    /// Without a certificate yet, a mesh connect fails with the error that tells the
    /// upstream no endpoint is at fault.
    #[tokio::test]
    async fn a_connect_before_the_first_certificate_says_so() {
        use tower::Service;
        let mut connector = MeshConnector::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
            Arc::new(TlsStore::empty()),
            Some(ORDER_V2.into()),
            &[b"http/1.1"],
        );
        let err = connector
            .call("http://127.0.0.1:9".parse().unwrap())
            .await
            .expect_err("no certificate");
        assert!(
            matches!(
                err.downcast_ref::<ProxyError>(),
                Some(ProxyError::NoWorkloadCertificate)
            ),
            "{err}"
        );
    }

    #[test]
    fn a_store_serves_what_was_last_installed_and_counts_the_installs() {
        let gauge = prometheus::Gauge::new("cert_expiry", "test").unwrap();
        let store = TlsStore::empty().with_expiry_gauge(gauge.clone());
        assert!(!store.is_ready());
        assert_eq!(store.installs(), 0);
        assert!(store.server_config().is_none());
        assert!(store.client_config(None).is_err());
        assert_eq!(store.spiffe_id(), None);
        assert_eq!(store.not_after(), UNIX_EPOCH);
        let mut installs = store.watch_installs();

        store.install(credentials(ORDER, 1_900_000_000)).unwrap();
        assert!(store.is_ready());
        assert_eq!(store.installs(), 1);
        assert!(installs.has_changed().unwrap());
        assert_eq!(*installs.borrow_and_update(), 1);
        assert_eq!(store.spiffe_id().as_deref(), Some(ORDER));
        assert_eq!(
            store.not_after(),
            UNIX_EPOCH + Duration::from_secs(1_900_000_000)
        );
        assert_eq!(gauge.get(), 1_900_000_000.0);
        // What is logged of the store names its identity.
        assert!(format!("{store:?}").contains(ORDER), "{store:?}");
        let both = ALPN.map(<[u8]>::to_vec);
        let server = store.server_config().expect("a server configuration");
        assert_eq!(server.alpn_protocols, both);
        let client = store.client_config(Some(ORDER_V2)).unwrap();
        assert_eq!(client.alpn_protocols, both);
        let client = store.client_config_for(None, &[b"h2"]).unwrap();
        assert_eq!(client.alpn_protocols, [b"h2".to_vec()]);

        // A rotation replaces all of it and counts again.
        store.install(credentials(ORDER_V2, 1_900_086_400)).unwrap();
        assert_eq!(store.installs(), 2);
        assert_eq!(*installs.borrow_and_update(), 2);
        assert_eq!(store.spiffe_id().as_deref(), Some(ORDER_V2));
        assert_eq!(gauge.get(), 1_900_086_400.0);
        assert!(!Arc::ptr_eq(&server, &store.server_config().unwrap()));

        // Credentials that do not build are refused and the last good ones stay.
        let mut broken = credentials(ORDER, 1_900_172_800);
        broken.trust_root = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let err = store.install(broken).unwrap_err();
        assert!(err.to_string().contains("trust root"), "{err}");
        assert_eq!(store.installs(), 2);
        assert!(!installs.has_changed().unwrap());
        assert_eq!(store.spiffe_id().as_deref(), Some(ORDER_V2));
        assert_eq!(gauge.get(), 1_900_086_400.0);
    }

    #[test]
    fn the_credentials_name_their_identity_and_never_their_key() {
        let creds = credentials(ORDER, 1_900_000_000);
        assert_eq!(creds.spiffe_id().as_deref(), Some(ORDER));
        let shown = format!("{creds:?}");
        assert!(shown.contains(ORDER), "{shown}");
        assert!(!shown.contains("key"), "{shown}");
    }

    #[test]
    fn the_next_renewal_is_kept_to_the_millisecond() {
        let store = TlsStore::empty();
        assert_eq!(store.next_renewal(), None);
        let at = UNIX_EPOCH + Duration::from_millis(1_900_000_000_123);
        store.set_next_renewal(at);
        assert_eq!(store.next_renewal(), Some(at));
        // Nothing before the epoch can be due: read as not scheduled.
        store.set_next_renewal(UNIX_EPOCH - Duration::from_secs(1));
        assert_eq!(store.next_renewal(), None);
    }
}
