//! The outbound side of mesh TLS: a hyper-util connector that dials TCP, then
//! TLS 1.3 with the proxy's certificate, verifying the server's SPIFFE ID.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::TlsStore;
use crate::body::BoxError;

/// How long the TLS handshake after the TCP connect may take: a peer that accepts the
/// connection and never answers the ClientHello (a hung sidecar, a port that is not a
/// sidecar's) fails the connect, as a TCP connect past its own timeout does, rather
/// than holding the request until the route's timeout, or for ever without one.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Mesh certificates carry no DNS name, so a connection to an IP address still
/// needs some name for rustls; the SPIFFE verifier ignores it.
const MESH_NAME: &str = "mesh.sluice.invalid";

/// Dials a peer sidecar: TCP (with `TCP_NODELAY`), then TLS 1.3 presenting the
/// store's current certificate and accepting only the `expected` SPIFFE ID.
///
/// The client configuration is read from the [`TlsStore`] for every new
/// connection, so after a rotation new connections use the new certificate while
/// pooled connections keep the one they were opened with.
#[derive(Clone)]
pub struct MeshConnector {
    http: HttpConnector,
    tls: Arc<TlsStore>,
    expected: Option<Arc<str>>,
    alpn: &'static [&'static [u8]],
}

impl std::fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConnector")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl MeshConnector {
    /// A connector over `http` (TCP) offering `alpn` and expecting `expected`.
    pub fn new(
        http: HttpConnector,
        tls: Arc<TlsStore>,
        expected: Option<Arc<str>>,
        alpn: &'static [&'static [u8]],
    ) -> Self {
        Self {
            http,
            tls,
            expected,
            alpn,
        }
    }
}

impl tower::Service<Uri> for MeshConnector {
    type Response = TokioIo<MeshStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self
            .tls
            .client_config_for(self.expected.as_deref(), self.alpn);
        let connecting = tower::Service::call(&mut self.http, uri.clone());
        Box::pin(async move {
            let config = config?;
            let tcp = connecting.await?.into_inner();
            let name = uri
                .host()
                .and_then(|h| ServerName::try_from(h.trim_matches(['[', ']'])).ok())
                .unwrap_or_else(|| ServerName::try_from(MESH_NAME).expect("a valid DNS name"))
                .to_owned();
            let handshake = TlsConnector::from(config).connect(name, tcp);
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the peer did not finish the TLS handshake within {HANDSHAKE_TIMEOUT:?}"
                        ),
                    )
                })??;
            Ok(TokioIo::new(MeshStream(tls)))
        })
    }
}

/// A TLS connection to a peer sidecar.
#[derive(Debug)]
pub struct MeshStream(TlsStream<TcpStream>);

impl MeshStream {
    /// The rustls connection (peer certificates, ALPN).
    pub fn tls(&self) -> &rustls::ClientConnection {
        self.0.get_ref().1
    }
}

impl Connection for MeshStream {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.tls().alpn_protocol() == Some(b"h2") {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
