//! A serving certificate issued by the mesh CA, short-lived, and renewed at half
//! its lifetime: the gRPC port's always, the injection webhook's when no
//! certificate files are given for it.
//!
//! Each TLS handshake is handed the certificate current at that moment (a
//! `ResolvesServerCert` over an `ArcSwap`), so a renewal needs no restart and
//! touches no open connection: a proxy's stream keeps the session it made, and
//! its next connection meets the new certificate. A renewal that fails is
//! retried at a tenth of the lifetime while the current certificate is still
//! valid.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::Error;
use crate::ca::Ca;

/// The certificate every new handshake on a port gets.
#[derive(Debug)]
pub(crate) struct ServingCert {
    /// What serves with it, for the logs (`gRPC`, `webhook`).
    what: &'static str,
    current: ArcSwap<CertifiedKey>,
    ca: Arc<Ca>,
    names: Vec<String>,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    renewals: IntCounter,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ServingCert {
    /// Issues the first certificate for `names` (DNS names and IP addresses) of
    /// the `what` port.
    pub(crate) fn issue(
        what: &'static str,
        ca: Arc<Ca>,
        names: Vec<String>,
        lifetime: Duration,
        renewals: IntCounter,
    ) -> Result<Arc<Self>, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let first = certified(&ca, &names, lifetime, &provider)?;
        Ok(Arc::new(Self {
            what,
            current: ArcSwap::from_pointee(first),
            ca,
            names,
            lifetime,
            provider,
            renewals,
        }))
    }

    /// The TLS configuration of the gRPC port (HTTP/2 only, as tonic needs).
    pub(crate) fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::ServingTls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The certificate (leaf first) handed out now.
    #[cfg(test)]
    pub(crate) fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }

    /// Replaces the certificate with a freshly issued one.
    pub(crate) fn renew(&self) -> Result<(), Error> {
        let next = certified(&self.ca, &self.names, self.lifetime, &self.provider)?;
        self.current.store(Arc::new(next));
        self.renewals.inc();
        Ok(())
    }

    /// Renews at half the lifetime until `shutdown`.
    pub(crate) async fn keep_renewed(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut wait = self.lifetime / 2;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            wait = match self.renew() {
                Ok(()) => {
                    tracing::info!(port = self.what, lifetime = ?self.lifetime, "serving certificate renewed");
                    self.lifetime / 2
                }
                Err(e) => {
                    tracing::warn!(port = self.what, error = %e, "cannot renew the serving certificate; retrying");
                    self.lifetime / 10
                }
            };
        }
    }
}

fn certified(
    ca: &Ca,
    names: &[String],
    lifetime: Duration,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, Error> {
    let (cert, key) = ca.issue_server_pem(names, lifetime)?;
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::ServingTls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| Error::ServingTls(e.to_string()))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| Error::ServingTls(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_its_lifetime_until_shutdown() {
        let ca = Arc::new(Ca::generate("cluster.local", Duration::from_secs(60)).unwrap());
        let renewals = IntCounter::new("renewals", "renewals").unwrap();
        let cert = ServingCert::issue(
            "gRPC",
            ca,
            vec!["localhost".into()],
            Duration::from_secs(10),
            renewals.clone(),
        )
        .unwrap();
        let first = cert.current_chain();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(cert.clone().keep_renewed(stopped));
        tokio::time::sleep(Duration::from_millis(4900)).await;
        assert_eq!(renewals.get(), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(renewals.get(), 1);
        assert_ne!(cert.current_chain()[0], first[0], "a new leaf");
        assert_eq!(cert.current_chain()[1], first[1], "the same root");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(renewals.get(), 3);
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
