//! A client connection over one TCP stream: HTTP/1.1, or h2c with prior knowledge.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

use crate::{BoxError, WAIT};

/// The request body type of [`HttpConn`]: anything that streams `Bytes`.
pub type ReqBody = BoxBody<Bytes, BoxError>;

/// A whole body as a [`ReqBody`].
pub fn full_body(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// Everything a raw connection receives until the peer closes it (at most [`WAIT`]),
/// as text; panics if it is not closed by then.
pub async fn read_until_closed<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut all = Vec::new();
    // A reset after the answer still counts as closed; what was read is kept.
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut all)).await;
    assert!(
        read.is_ok(),
        "the peer did not close the connection within {WAIT:?}"
    );
    String::from_utf8_lossy(&all).into_owned()
}

/// Whether an HTTP/2 stream failed because the server's GOAWAY named a last stream below
/// it: the server did not process it (RFC 9113 §6.8), and a client may send it again,
/// as it would a request its connection never took. h2 fails only such streams with
/// the peer's GOAWAY.
fn went_away(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote();
        }
        cur = err.source();
    }
    false
}

/// A request that never left: the connection closed or went away before taking it.
#[derive(Debug)]
pub struct Unsent(pub hyper::Error);

impl std::fmt::Display for Unsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the connection did not take the request: {}", self.0)
    }
}

impl std::error::Error for Unsent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

/// One client connection. HTTP/1.1 requests go out in origin form with an explicit
/// `Host`; HTTP/2 requests in absolute form, so `:authority` carries the host.
pub struct HttpConn {
    sender: Sender,
}

/// A response read to its end.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, when the response had any.
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// A header's value as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl HttpConn {
    /// Opens an HTTP/1.1 connection to `addr`.
    pub async fn h1(addr: SocketAddr) -> Result<Self, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(Self {
            sender: Sender::H1(sender),
        })
    }

    /// Opens an HTTP/1.1 connection over TLS to `addr`, trusting only the PEM
    /// certificates in `roots` and verifying `server_name`; also returns the leaf
    /// certificate (DER) the server presented.
    pub async fn h1_tls(
        addr: SocketAddr,
        roots: &[u8],
        server_name: &str,
    ) -> Result<(Self, Vec<u8>), BoxError> {
        use rustls::pki_types::pem::PemObject as _;
        let mut store = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(roots) {
            store.add(cert?)?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, stream)
            .await?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("the server presented no certificate")?
            .to_vec();
        let (sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((
            Self {
                sender: Sender::H1(sender),
            },
            leaf,
        ))
    }

    /// Opens an h2c (prior knowledge) connection to `addr`.
    pub async fn h2(addr: SocketAddr) -> Result<Self, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        // Response heads as large as the proxy forwards (64 KiB), not hyper's 16 KiB.
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .max_header_list_size(64 * 1024)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            sender: Sender::H2(sender),
        })
    }

    /// Another handle on the same HTTP/2 connection, for concurrent streams
    /// (`None` for HTTP/1.1, which carries one request at a time).
    pub fn try_clone(&self) -> Option<Self> {
        match &self.sender {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Self {
                sender: Sender::H2(s.clone()),
            }),
        }
    }

    /// True for an HTTP/2 connection.
    pub fn is_h2(&self) -> bool {
        matches!(self.sender, Sender::H2(_))
    }

    /// Builds a request to `host` + `path` in the form this connection's protocol wants.
    pub fn request_builder(
        &self,
        method: Method,
        host: &str,
        path: &str,
    ) -> http::request::Builder {
        if self.is_h2() {
            Request::builder()
                .method(method)
                .uri(format!("http://{host}{path}"))
                .version(http::Version::HTTP_2)
        } else {
            Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, host)
        }
    }

    /// Sends a request and returns the response head; the body streams. A request the
    /// connection never took (it closed, or the server's GOAWAY came first) fails with
    /// [`Unsent`], which a client answers by opening a new connection, as pooled
    /// clients do.
    pub async fn send(&mut self, req: Request<ReqBody>) -> Result<Response<Incoming>, BoxError> {
        let unsent = |mut e: hyper::client::conn::TrySendError<Request<ReqBody>>| -> BoxError {
            match e.take_message() {
                Some(_) => Box::new(Unsent(e.into_error())),
                None if went_away(e.error()) => Box::new(Unsent(e.into_error())),
                None => Box::new(e.into_error()),
            }
        };
        match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await.map_err(Unsent)?;
                s.try_send_request(req).await.map_err(unsent)
            }
            Sender::H2(s) => {
                s.ready().await.map_err(Unsent)?;
                s.try_send_request(req).await.map_err(unsent)
            }
        }
    }

    /// Sends a request and reads the whole response.
    pub async fn call(&mut self, req: Request<ReqBody>) -> Result<Reply, BoxError> {
        let resp = self.send(req).await?;
        read_reply(resp).await
    }

    /// `method host path` with extra headers and an empty body, read to its end.
    pub async fn request(
        &mut self,
        method: Method,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, BoxError> {
        let mut b = self.request_builder(method, host, path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.call(b.body(full_body(Bytes::new()))?).await
    }

    /// `GET host path`, read to its end.
    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply, BoxError> {
        self.request(Method::GET, host, path, &[]).await
    }
}

/// Reads a response to its end, keeping trailers.
pub(crate) async fn read_reply(resp: Response<Incoming>) -> Result<Reply, BoxError> {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// An AdmissionReview as the API server sends it for a Deployment's pod.
const REVIEW: &str =
    include_str!("../../control-plane/tests/fixtures/admission/deployment-pod.json");

/// POSTs that review to the injection webhook's `/inject` on `conn`; panics unless
/// it is answered and allowed.
pub async fn admit(conn: &mut HttpConn) {
    let req = Request::post("/inject?timeout=10s")
        .header("host", "sluice.sluice-system.svc")
        .header("content-type", "application/json")
        .body(full_body(REVIEW))
        .expect("a valid request");
    let reply = conn.call(req).await.expect("the webhook answers");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let review: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
    assert_eq!(review["response"]["allowed"], true, "{review}");
}
