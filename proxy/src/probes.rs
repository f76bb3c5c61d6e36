//! The application's own HTTP probes, served on the admin port.
//!
//! The injection webhook rewrites every `httpGet` probe of an application container to
//! `GET http://<pod>:15000/app-health/<container>/<livez|readyz|startupz>` and hands the
//! original targets to the proxy as JSON (`--app-probes`, `SLUICE_APP_PROBES`):
//!
//! ```json
//! {"/app-health/orders/livez": {"port": 8080, "path": "/healthz", "scheme": "HTTP",
//!   "host": "10.0.0.7", "httpHeaders": [{"name": "x-probe", "value": "1"}]}}
//! ```
//!
//! The kubelet then probes the admin port, which the iptables redirect leaves alone, so a
//! probe never meets inbound policy or strict mTLS. The proxy calls the original target
//! the way the kubelet would (a fresh connection, the given headers, HTTPS without
//! certificate verification, no redirects followed) and answers with the application's
//! status code; an application that cannot be reached is answered 503. Without `host` the
//! probe goes to `127.0.0.1` (the kubelet would use the pod IP; loopback reaches the same
//! application and is never redirected).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tracing::debug;

use crate::ProxyError;
use crate::body::{Body, full};

/// The longest a probe of the application may take; the kubelet's own timeout is
/// usually shorter and ends the request first.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// One original probe target, as the webhook wrote it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeTarget {
    /// The container port (named ports are resolved by the webhook).
    pub port: u16,
    /// Request path, with any query.
    #[serde(default = "root")]
    pub path: String,
    /// `HTTP` or `HTTPS`.
    #[serde(default)]
    pub scheme: Scheme,
    /// Host to connect to; `127.0.0.1` when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// Extra request headers.
    #[serde(default)]
    pub http_headers: Vec<ProbeHeader>,
}

fn root() -> String {
    "/".to_owned()
}

/// Scheme of a probe, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Scheme {
    /// Plain HTTP.
    #[default]
    Http,
    /// HTTPS, certificate not verified (as the kubelet does).
    Https,
}

/// One `httpHeaders` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProbeHeader {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// The rewritten probe paths and their original targets.
#[derive(Clone, Debug, Default)]
pub struct AppProbes {
    targets: HashMap<String, Prepared>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A target with its connect address and headers checked once, at start.
#[derive(Clone, Debug)]
struct Prepared {
    connect: (String, u16),
    authority: http::uri::Authority,
    server_name: rustls::pki_types::ServerName<'static>,
    path: http::uri::PathAndQuery,
    scheme: Scheme,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl AppProbes {
    /// Parses the webhook's JSON; a malformed entry is an error naming it.
    pub fn from_json(json: &str) -> Result<Self, ProxyError> {
        let bad = |m: String| ProxyError::AppProbes(m);
        let raw: HashMap<String, ProbeTarget> =
            serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let mut targets = HashMap::with_capacity(raw.len());
        let mut any_https = false;
        for (path, t) in raw {
            if !path.starts_with("/app-health/") {
                return Err(bad(format!("{path:?} is not an /app-health/ path")));
            }
            let host = t.host.clone().unwrap_or_else(|| "127.0.0.1".to_owned());
            let server_name =
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| {
                    bad(format!(
                        "{path}: host {host:?} is not an IP address or DNS name"
                    ))
                })?;
            let authority: http::uri::Authority = match host.parse::<IpAddr>() {
                Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", t.port),
                _ => format!("{host}:{}", t.port),
            }
            .parse()
            .map_err(|e| bad(format!("{path}: host {host:?}: {e}")))?;
            let target_path = t
                .path
                .parse()
                .map_err(|e| bad(format!("{path}: path {:?}: {e}", t.path)))?;
            let mut headers = Vec::with_capacity(t.http_headers.len());
            for h in &t.http_headers {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|e| bad(format!("{path}: header name {:?}: {e}", h.name)))?;
                let value = HeaderValue::from_str(&h.value)
                    .map_err(|e| bad(format!("{path}: header {:?} value: {e}", h.name)))?;
                headers.push((name, value));
            }
            any_https |= t.scheme == Scheme::Https;
            targets.insert(
                path,
                Prepared {
                    connect: (host, t.port),
                    authority,
                    server_name,
                    path: target_path,
                    scheme: t.scheme,
                    headers,
                },
            );
        }
        let tls = any_https.then(unverified_tls);
        Ok(Self { targets, tls })
    }

    /// Number of probe paths served.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether no probe is served.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Answers `GET /app-health/...` by probing the application; `None` for an unknown path.
    pub(crate) async fn answer(&self, path: &str, incoming: &HeaderMap) -> Option<Response<Body>> {
        let target = self.targets.get(path)?;
        let result = tokio::time::timeout(PROBE_TIMEOUT, self.call(target, incoming)).await;
        Some(match result {
            Ok(Ok(status)) => {
                let mut resp = Response::new(full(format!("application answered {status}\n")));
                *resp.status_mut() = status;
                resp
            }
            Ok(Err(e)) => {
                debug!(probe = path, target = %target.authority, error = %e, "application probe failed");
                unavailable(format!(
                    "application probe to {} failed: {e}\n",
                    target.authority
                ))
            }
            Err(_) => unavailable(format!(
                "application probe to {} timed out after {PROBE_TIMEOUT:?}\n",
                target.authority
            )),
        })
    }

    async fn call(&self, t: &Prepared, incoming: &HeaderMap) -> Result<StatusCode, BoxErr> {
        let mut req = Request::get(t.path.as_str()).body(Empty::<Bytes>::new())?;
        let h = req.headers_mut();
        h.insert(header::HOST, HeaderValue::from_str(t.authority.as_str())?);
        // The kubelet's own identification, so the application sees what it always saw.
        for name in [header::USER_AGENT, header::ACCEPT] {
            if let Some(v) = incoming.get(&name) {
                h.insert(name, v.clone());
            }
        }
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        for (name, value) in &t.headers {
            h.insert(name.clone(), value.clone());
        }
        let tcp = TcpStream::connect((t.connect.0.as_str(), t.connect.1)).await?;
        let _ = tcp.set_nodelay(true);
        match (t.scheme, &self.tls) {
            (Scheme::Https, Some(tls)) => {
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(t.server_name.clone(), tcp)
                    .await?;
                send(TokioIo::new(stream), req).await
            }
            _ => send(TokioIo::new(tcp), req).await,
        }
    }
}

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

async fn send<I>(io: I, req: Request<Empty<Bytes>>) -> Result<StatusCode, BoxErr>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let conn = tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    // Drain a little of the body so the application sees a clean close, as with the kubelet.
    let _ = http_body_util::Limited::new(resp.into_body(), 10 * 1024)
        .collect()
        .await;
    conn.abort();
    Ok(status)
}

fn unavailable(text: String) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    resp
}

/// A TLS client that, like the kubelet's HTTPS probe, does not verify the application's
/// certificate (it is usually self-signed); handshake signatures are still checked.
fn unverified_tls() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_webhook_format() {
        let p = AppProbes::from_json(
            r#"{"/app-health/orders/livez": {"port": 8080, "path": "/healthz?deep=1", "scheme": "HTTPS",
                "host": "10.1.2.3", "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
               "/app-health/orders/readyz": {"port": 8081}}"#,
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        let live = &p.targets["/app-health/orders/livez"];
        assert_eq!(live.authority, "10.1.2.3:8080");
        assert_eq!(live.path, "/healthz?deep=1");
        assert_eq!(live.scheme, Scheme::Https);
        assert_eq!(live.headers[0].0, "x-probe");
        let ready = &p.targets["/app-health/orders/readyz"];
        assert_eq!(
            (ready.authority.as_str(), ready.path.as_str(), ready.scheme),
            ("127.0.0.1:8081", "/", Scheme::Http)
        );
        assert!(p.tls.is_some());
        assert!(!p.is_empty());

        // An IPv6 host is bracketed in the authority; plain HTTP alone needs no TLS.
        let v6 = AppProbes::from_json(
            r#"{"/app-health/orders/livez": {"port": 8080, "host": "fd00::7"}}"#,
        )
        .unwrap();
        let live = &v6.targets["/app-health/orders/livez"];
        assert_eq!(live.authority, "[fd00::7]:8080");
        assert_eq!(live.connect, ("fd00::7".to_owned(), 8080));
        assert!(v6.tls.is_none(), "no HTTPS probe, no TLS client");
        let none = AppProbes::from_json("{}").unwrap();
        assert!(none.is_empty() && none.tls.is_none());
    }

    #[test]
    fn refuses_malformed_entries_by_name() {
        for (json, needle) in [
            ("{", "EOF"),
            (r#"{"/live": {"port": 1}}"#, "not an /app-health/ path"),
            (r#"{"/app-health/a/livez": {"port": 70000}}"#, "70000"),
            (
                r#"{"/app-health/a/livez": {"port": 1, "host": "a b"}}"#,
                "not an IP address or DNS name",
            ),
            (
                r#"{"/app-health/a/livez": {"port": 1, "httpHeaders": [{"name": "bad name", "value": ""}]}}"#,
                "header name",
            ),
            (
                r#"{"/app-health/a/livez": {"port": 1, "scheme": "GOPHER"}}"#,
                "GOPHER",
            ),
        ] {
            let err = AppProbes::from_json(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
