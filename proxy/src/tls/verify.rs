//! Verifying a mesh server by its SPIFFE ID rather than a DNS name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

/// Checks that the server's chain ends at the mesh root (rustls's own webpki
/// path building) and that its leaf's SPIFFE ID is the one expected.
///
/// Mesh certificates carry no DNS names, so the `ServerName` the connection
/// was opened with is ignored: the identity is the URI SAN.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Option<String>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// Accepts servers chaining to `roots` whose SPIFFE ID is `expected` (any when `None`).
    pub fn new(roots: Arc<RootCertStore>, expected: Option<String>) -> Self {
        Self {
            roots,
            expected,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let Some(expected) = &self.expected else {
            return Ok(ServerCertVerified::assertion());
        };
        match spiffe_id_of(end_entity) {
            Some(id) if &id == expected => Ok(ServerCertVerified::assertion()),
            other => Err(Error::General(format!(
                "peer identity {other:?} is not the expected {expected}"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The SPIFFE ID of a verified peer: the one `spiffe://` URI SAN of its leaf
/// (`None` if there is none or more than one). Use it on
/// `ServerConnection::peer_certificates()` to set the `PeerIdentity` extension.
pub fn peer_spiffe_id(chain: &[CertificateDer<'_>]) -> Option<String> {
    spiffe_id_of(chain.first()?)
}

/// The `PeerIdentity` request extension for a connection accepted by the
/// inbound listener, from its verified client certificate.
pub fn peer_identity(
    conn: &rustls::ServerConnection,
) -> Option<sluice_filters::extensions::PeerIdentity> {
    let id = peer_spiffe_id(conn.peer_certificates()?)?;
    Some(sluice_filters::extensions::PeerIdentity(Arc::from(id)))
}

fn spiffe_id_of(leaf: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    // X.509-SVIDs carry exactly one SPIFFE ID; more is ambiguous, so none.
    uris.next().is_none().then(|| first.to_string())
}
