//! The mesh certificate authority.
//!
//! One root, generated on first start and persisted (or loaded from the given
//! files), signs short-lived workload certificates. A workload certificate's
//! only SAN is the URI `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, built from
//! what the bootstrap credential proves; nothing the CSR asks for (subject,
//! SANs, extensions) is copied, the CSR only contributes its public key.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use crate::Error;

/// Leaf certificates start this far in the past, so that a peer whose clock is a
/// little behind ours does not see them as not yet valid.
const BACKDATE: Duration = Duration::from_secs(60);

/// The root's lifetime; rotating the root is a manual operation.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A workload identity proven by a bootstrap credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadIdentity {
    /// Kubernetes namespace (or its local equivalent).
    pub namespace: String,
    /// Service account within the namespace.
    pub service_account: String,
}

impl WorkloadIdentity {
    /// Builds an identity, refusing names that could not appear in a Kubernetes
    /// namespace or service account (and so could smuggle `/` into the URI).
    pub fn new(namespace: &str, service_account: &str) -> Result<Self, Error> {
        for part in [namespace, service_account] {
            let ok = !part.is_empty()
                && part.len() <= 253
                && part.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !ok {
                return Err(Error::InvalidIdentity(part.to_string()));
            }
        }
        Ok(Self {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// The SPIFFE ID of this identity in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// Checks a bootstrap credential and says which identity it proves.
pub trait BootstrapVerifier: Send + Sync + fmt::Debug {
    /// The identity `token` proves, or [`Error::BootstrapRefused`].
    fn verify(&self, token: &str) -> Result<WorkloadIdentity, Error>;

    /// The identity `token` proves, for callers that can wait: a verifier that asks
    /// a remote service (Kubernetes TokenReview) answers here without blocking a
    /// runtime thread. The default answers with [`verify`](Self::verify).
    fn verify_async<'a>(&'a self, token: &'a str) -> VerifyFuture<'a> {
        Box::pin(std::future::ready(self.verify(token)))
    }
}

/// What [`BootstrapVerifier::verify_async`] returns.
pub type VerifyFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<WorkloadIdentity, Error>> + Send + 'a>,
>;

/// Bootstrap tokens read from a file, for running without Kubernetes.
///
/// One JSON object per line: `{"token": "…", "namespace": "shop", "serviceAccount": "order"}`;
/// blank lines and lines starting with `#` are skipped.
pub struct TokenFile {
    tokens: HashMap<String, WorkloadIdentity>,
}

impl fmt::Debug for TokenFile {
    // Tokens are secrets: show only how many there are.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenFile")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenLine {
    token: String,
    namespace: String,
    service_account: String,
}

impl TokenFile {
    /// Reads and parses a token file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::CaFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses token-file text; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let mut tokens = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| Error::TokenFile {
                path: path.to_path_buf(),
                line: i + 1,
                reason,
            };
            let parsed: TokenLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            if parsed.token.is_empty() {
                return Err(bad("empty token".into()));
            }
            let id = WorkloadIdentity::new(&parsed.namespace, &parsed.service_account)
                .map_err(|e| bad(e.to_string()))?;
            tokens.insert(parsed.token, id);
        }
        Ok(Self { tokens })
    }
}

impl TokenFile {
    /// Reads a token file, or every regular file of a directory (one identity
    /// per token across all of them; a token listed twice keeps the last file's
    /// entry, in file-name order).
    pub fn load_path(path: &Path) -> Result<Self, Error> {
        if !path.is_dir() {
            return Self::load(path);
        }
        let err = |source| Error::CaFile {
            path: path.to_path_buf(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            // Kubernetes' projected volumes add `..data` links and dot-directories.
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        let mut tokens = HashMap::new();
        for file in files {
            tokens.extend(Self::load(&file)?.tokens);
        }
        Ok(Self { tokens })
    }

    /// How many tokens are known.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is known (every bootstrap is refused).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

impl BootstrapVerifier for TokenFile {
    fn verify(&self, token: &str) -> Result<WorkloadIdentity, Error> {
        self.tokens
            .get(token)
            .cloned()
            .ok_or(Error::BootstrapRefused)
    }
}

/// The `--bootstrap-tokens` file or directory, read again whenever it changed, so that
/// a token added or revoked (a Secret rotated, a line removed) counts from the next
/// certificate request, renewals included, without a restart. A change that does not
/// parse keeps the tokens in force, with a warning. Certificate requests are rare (one
/// per proxy per renewal), so each one looks at the files' metadata.
pub struct TokenSource {
    path: PathBuf,
    state: std::sync::Mutex<(Fingerprint, TokenFile)>,
}

/// What a token file (or each file of a directory) looked like when it was read.
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// Reads the tokens at `path` (a file, or a directory of files).
    pub fn open(path: &Path) -> Result<Self, Error> {
        let seen = fingerprint(path);
        let tokens = TokenFile::load_path(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            state: std::sync::Mutex::new((seen, tokens)),
        })
    }

    /// How many tokens are in force.
    pub fn len(&self) -> usize {
        self.lock().1.len()
    }

    /// Whether no token is in force.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Fingerprint, TokenFile)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the tokens again if the files changed since they were read.
    fn refresh(&self) {
        let now = fingerprint(&self.path);
        let mut state = self.lock();
        if state.0 == now {
            return;
        }
        match TokenFile::load_path(&self.path) {
            Ok(tokens) => {
                tracing::info!(path = %self.path.display(), tokens = tokens.len(), "bootstrap tokens reloaded");
                *state = (now, tokens);
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "bootstrap tokens changed but do not load; the previous ones stay in force");
                // Not read again until it changes once more.
                state.0 = now;
            }
        }
    }
}

impl BootstrapVerifier for TokenSource {
    fn verify(&self, token: &str) -> Result<WorkloadIdentity, Error> {
        self.refresh();
        self.lock().1.verify(token)
    }
}

/// The metadata of `path`, or of each entry of it when it is a directory (symlinks
/// followed: a projected volume's `..data` swap changes what the names point at).
fn fingerprint(path: &Path) -> Fingerprint {
    let one = |p: PathBuf| {
        let meta = std::fs::metadata(&p).ok();
        let modified = meta.as_ref().and_then(|m| m.modified().ok());
        let len = meta.map_or(0, |m| m.len());
        (p, modified, len)
    };
    if !path.is_dir() {
        return vec![one(path.to_path_buf())];
    }
    let mut out: Fingerprint = std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| one(e.path())))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A certificate the CA issued.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf, DER.
    pub cert_der: CertificateDer<'static>,
    /// The SPIFFE ID in its only SAN.
    pub spiffe_id: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The mesh root and the signing operations built on it.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
    root_pem: String,
    leaf_ttl: Duration,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("leaf_ttl", &self.leaf_ttl)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A fresh root kept only in memory (tests, ephemeral demos).
    pub fn generate(trust_domain: &str, leaf_ttl: Duration) -> Result<Self, Error> {
        let (cert_pem, key) = new_root(trust_domain)?;
        Self::from_pem(trust_domain, &cert_pem, key, leaf_ttl)
    }

    /// Loads the root from `cert_path`/`key_path` (PEM), or, when neither file
    /// exists, generates one and writes both (the key readable by its owner only).
    pub fn load_or_generate(
        trust_domain: &str,
        cert_path: &Path,
        key_path: &Path,
        leaf_ttl: Duration,
    ) -> Result<Self, Error> {
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert_pem = read(cert_path)?;
                let key = KeyPair::from_pem(&read(key_path)?)?;
                Self::from_pem(trust_domain, &cert_pem, key, leaf_ttl)
            }
            (false, false) => {
                let (cert_pem, key) = new_root(trust_domain)?;
                // The key first and exclusively: a crash in between leaves a key
                // without a cert, which the next start reports instead of overwriting.
                write_new(key_path, key.serialize_pem().as_bytes(), 0o600)?;
                write_new(cert_path, cert_pem.as_bytes(), 0o644)?;
                tracing::info!(cert = %cert_path.display(), "generated a new mesh root");
                Self::from_pem(trust_domain, &cert_pem, key, leaf_ttl)
            }
            (true, false) | (false, true) => Err(Error::CaFile {
                path: if cert_path.exists() {
                    key_path.to_path_buf()
                } else {
                    cert_path.to_path_buf()
                },
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the CA certificate and key must both exist or both be absent",
                ),
            }),
        }
    }

    /// Loads the root from `cert_path`/`key_path` (PEM); both must exist.
    pub fn load(
        trust_domain: &str,
        cert_path: &Path,
        key_path: &Path,
        leaf_ttl: Duration,
    ) -> Result<Self, Error> {
        let cert_pem = read(cert_path)?;
        let key = KeyPair::from_pem(&read(key_path)?)?;
        Self::from_pem(trust_domain, &cert_pem, key, leaf_ttl)
    }

    fn from_pem(
        trust_domain: &str,
        cert_pem: &str,
        key: KeyPair,
        leaf_ttl: Duration,
    ) -> Result<Self, Error> {
        let der = pem_to_der(cert_pem)?;
        let issuer = Issuer::from_ca_cert_der(&der, key)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            issuer,
            root_der: der,
            root_pem: cert_pem.to_string(),
            leaf_ttl,
        })
    }

    /// The trust domain of the SPIFFE IDs this CA issues.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The lifetime of workload certificates.
    pub fn leaf_ttl(&self) -> Duration {
        self.leaf_ttl
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// The root certificate, PEM (what `--trust-root` files hold).
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// Signs the key of a CSR into a workload certificate for `identity`.
    ///
    /// The CSR's signature is checked (the requester holds the key); everything
    /// else it asks for is ignored.
    pub fn sign_csr(&self, csr_der: &[u8], identity: &WorkloadIdentity) -> Result<Issued, Error> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(Error::Csr)?;
        let spiffe_id = identity.spiffe_id(&self.trust_domain);
        let mut params = leaf_params(self.leaf_ttl)?;
        params.subject_alt_names = vec![SanType::URI(spiffe_id.clone().try_into()?)];
        let not_after = to_system_time(params.not_after);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(Issued {
            cert_der: cert.der().clone(),
            spiffe_id,
            not_after,
        })
    }

    /// Issues a serving certificate (fresh key) for the control plane itself,
    /// with the given DNS names and IP addresses as SANs. Returns the leaf and its
    /// PKCS#8 key, both DER.
    pub fn issue_server_cert(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(CertificateDer<'static>, Vec<u8>), Error> {
        let (cert, key) = self.server_cert(names, ttl)?;
        Ok((cert.der().clone(), key.serialize_der()))
    }

    /// [`issue_server_cert`](Self::issue_server_cert) as PEM: the leaf followed by
    /// the root (the chain a TLS server presents), and the PKCS#8 key.
    pub fn issue_server_pem(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), Error> {
        let (cert, key) = self.server_cert(names, ttl)?;
        Ok((cert.pem() + &self.root_pem, key.serialize_pem()))
    }

    fn server_cert(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(rcgen::Certificate, KeyPair), Error> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params(ttl)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert, key))
    }
}

impl Ca {
    /// A root from its PEM certificate and PEM key (e.g. as kept in a Kubernetes Secret).
    pub fn from_pem_pair(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        leaf_ttl: Duration,
    ) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem)?;
        Self::from_pem(trust_domain, cert_pem, key, leaf_ttl)
    }

    /// A fresh root as PEM `(certificate, key)`, to be stored before it is used.
    pub fn generate_pem(trust_domain: &str) -> Result<(String, String), Error> {
        let (cert_pem, key) = new_root(trust_domain)?;
        Ok((cert_pem, key.serialize_pem()))
    }
}

fn new_root(trust_domain: &str) -> Result<(String, KeyPair), Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sluice");
    dn.push(
        DnType::CommonName,
        format!("sluice mesh root {trust_domain}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ROOT_LIFETIME;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key))
}

#[cfg(any(test, feature = "test-support"))]
impl Ca {
    /// A workload certificate for `spiffe_id`, signed by this root with a fresh key,
    /// that expired an hour ago: what every peer must refuse. Returns the leaf and
    /// its PKCS#8 key, both DER.
    pub fn issue_expired(
        &self,
        spiffe_id: &str,
    ) -> Result<(CertificateDer<'static>, Vec<u8>), Error> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params(Duration::ZERO)?;
        params.subject_alt_names = vec![SanType::URI(spiffe_id.to_string().try_into()?)];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(2);
        params.not_after = now - time::Duration::hours(1);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.der().clone(), key.serialize_der()))
    }
}

fn leaf_params(ttl: Duration) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    // An empty subject: the identity is the URI SAN, as SPIFFE X.509-SVIDs have it.
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every sidecar both serves (inbound) and dials (outbound) with the same certificate.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ttl;
    Ok(params)
}

fn to_system_time(t: OffsetDateTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64)
}

fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, Error> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Error::Certificate(rcgen::Error::PemError(e.to_string())))
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::CaFile {
        path: path.to_path_buf(),
        source,
    })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| Error::CaFile {
        path: PathBuf::from(path),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn csr() -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        // The CSR asks for another identity; the CA must ignore it.
        let params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    #[test]
    fn issued_cert_chains_to_root_with_only_the_proven_spiffe_san() {
        let ca = Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let (_key, csr) = csr();
        let id = WorkloadIdentity::new("shop", "order").unwrap();
        let issued = ca.sign_csr(&csr, &id).unwrap();
        assert_eq!(issued.spiffe_id, "spiffe://cluster.local/ns/shop/sa/order");

        let (_, root) = X509Certificate::from_der(ca.root_der()).unwrap();
        let (_, leaf) = X509Certificate::from_der(&issued.cert_der).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect();
        assert_eq!(
            sans,
            vec!["URI(\"spiffe://cluster.local/ns/shop/sa/order\")".to_string()]
        );
        let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(life, 3600 + BACKDATE.as_secs() as i64);
    }

    #[test]
    fn token_file_proves_listed_identities_and_refuses_others() {
        let f = TokenFile::parse(
            Path::new("tokens.jsonl"),
            "# local tokens\n{\"token\":\"t-order\",\"namespace\":\"shop\",\"serviceAccount\":\"order\"}\n\n",
        )
        .unwrap();
        assert_eq!(
            f.verify("t-order").unwrap(),
            WorkloadIdentity::new("shop", "order").unwrap()
        );
        assert!(matches!(f.verify("nope"), Err(Error::BootstrapRefused)));
        let bad = TokenFile::parse(
            Path::new("t"),
            "{\"token\":\"x\",\"namespace\":\"a/b\",\"serviceAccount\":\"c\"}",
        );
        assert!(matches!(bad, Err(Error::TokenFile { line: 1, .. })));
    }

    /// A token added or revoked in the file counts from the next request, without a
    /// restart; an edit that does not parse keeps the tokens in force.
    #[test]
    fn token_source_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.jsonl");
        let line = |t: &str, sa: &str| {
            format!("{{\"token\":\"{t}\",\"namespace\":\"shop\",\"serviceAccount\":\"{sa}\"}}\n")
        };
        std::fs::write(&path, line("t-order", "order")).unwrap();
        let source = TokenSource::open(&path).unwrap();
        assert!(source.verify("t-order").is_ok());
        assert!(source.verify("t-log").is_err());

        // Revoked and added: the length changes, so does the fingerprint.
        std::fs::write(&path, line("t-log-longer", "log")).unwrap();
        assert!(matches!(
            source.verify("t-order"),
            Err(Error::BootstrapRefused)
        ));
        assert_eq!(
            source.verify("t-log-longer").unwrap(),
            WorkloadIdentity::new("shop", "log").unwrap()
        );

        // Broken: the tokens in force stay.
        std::fs::write(&path, "{not json\n").unwrap();
        assert!(source.verify("t-log-longer").is_ok());
        assert_eq!(source.len(), 1);

        std::fs::write(&path, line("t-a", "a") + &line("t-bb", "b")).unwrap();
        assert!(source.verify("t-bb").is_ok());
        assert_eq!((source.len(), source.is_empty()), (2, false));
        // Emptied: every token revoked, none in force.
        std::fs::write(&path, "").unwrap();
        assert!(source.verify("t-a").is_err());
        assert_eq!((source.len(), source.is_empty()), (0, true));

        // Its Debug names the file, never a token.
        let shown = format!("{source:?}");
        assert!(
            shown.contains("tokens.jsonl") && !shown.contains("t-a"),
            "{shown}"
        );
    }

    #[test]
    fn root_is_persisted_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        let ttl = Duration::from_secs(60);
        let first = Ca::load_or_generate("td", &c, &k, ttl).unwrap();
        let again = Ca::load_or_generate("td", &c, &k, ttl).unwrap();
        assert_eq!(first.root_der(), again.root_der());
        assert_eq!(first.root_pem(), std::fs::read_to_string(&c).unwrap());
        // A cert signed after reload still chains to the persisted root.
        let (_key, csr) = csr();
        let issued = again
            .sign_csr(&csr, &WorkloadIdentity::new("a", "b").unwrap())
            .unwrap();
        let (_, root) = X509Certificate::from_der(first.root_der()).unwrap();
        let (_, leaf) = X509Certificate::from_der(&issued.cert_der).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        std::fs::remove_file(&c).unwrap();
        assert!(matches!(
            Ca::load_or_generate("td", &c, &k, ttl),
            Err(Error::CaFile { .. })
        ));
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = Ca::generate("td", Duration::from_secs(60)).unwrap();
        let id = WorkloadIdentity::new("a", "b").unwrap();
        assert!(matches!(ca.sign_csr(b"nope", &id), Err(Error::Csr(_))));
    }
}
