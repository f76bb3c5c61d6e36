//! The control plane's one accept loop: every listener (admin, webhook, gRPC) takes
//! its connections, TLS handshakes and graceful shutdown from here, so a fix to
//! how a connection is accepted or drained is made once.
//!
//! HTTP listeners (admin, webhook) are served whole by [`serve_http`]; the gRPC
//! port hands tonic a stream of finished handshakes ([`tls_incoming`]) because
//! tonic owns its connections.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How long a client may take to finish its TLS handshake before it is dropped,
/// so a silent client cannot hold a task and a socket for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which HTTP versions a listener speaks.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Http {
    /// HTTP/1.1 only (the admin port: curl, Prometheus, kubelet probes).
    One,
    /// HTTP/1.1 or HTTP/2, whichever the client speaks (the webhook: the API server).
    Auto,
}

/// Waits for the next connection; `None` once shutdown is signalled. A failed
/// accept (the process out of descriptors, a connection reset in the backlog) is
/// logged and skipped: it must not end the listener.
async fn next(
    listener: &TcpListener,
    what: &'static str,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => return Some(c),
                Err(e) => tracing::warn!(listener = what, error = %e, "accept failed"),
            },
            _ = shutdown.wait_for(|stop| *stop) => return None,
        }
    }
}

/// Completes a TLS handshake within [`HANDSHAKE_TIMEOUT`]; a failed or slow one
/// is logged at debug (a port scan is not news) and yields `None`.
async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    what: &'static str,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(listener = what, %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(listener = what, %peer, "TLS handshake timed out");
            None
        }
    }
}

/// Serves `service` on every connection `listener` accepts (over TLS when
/// `tls` is set) until shutdown; open connections then finish their requests in
/// flight and close. Each connection runs in a task of its own so a slow client
/// holds up no other.
pub(crate) async fn serve_http<S>(
    listener: TcpListener,
    what: &'static str,
    tls: Option<TlsAcceptor>,
    http: Http,
    service: S,
    mut shutdown: watch::Receiver<bool>,
) where
    S: Service<Request<Incoming>, Response = Response<http_body_util::Full<bytes::Bytes>>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    while let Some((tcp, peer)) = next(&listener, what, &mut shutdown).await {
        let service = service.clone();
        let tls = tls.clone();
        let conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    if let Some(stream) = handshake(&acceptor, tcp, peer, what).await {
                        connection(TokioIo::new(stream), http, service, conn_shutdown).await;
                    }
                }
                None => connection(TokioIo::new(tcp), http, service, conn_shutdown).await,
            }
        });
    }
}

/// Serves one connection until the client closes it or shutdown asks it to
/// finish what is in flight.
async fn connection<I, S>(io: I, http: Http, service: S, mut shutdown: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<http_body_util::Full<bytes::Bytes>>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if matches!(http, Http::One) {
        builder = builder.http1_only();
    }
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let stopping = tokio::select! {
        _ = conn.as_mut() => false,
        r = shutdown.wait_for(|stop| *stop) => r.is_ok(),
    };
    if stopping {
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}

/// Accepts TCP connections and completes TLS handshakes, each in a task of its
/// own so a slow client holds up no other, for a server (tonic) that owns its
/// connections; ends with shutdown or when the server drops the stream.
pub(crate) fn tls_incoming(
    listener: TcpListener,
    what: &'static str,
    acceptor: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = next(&listener, what, &mut shutdown) => a,
                _ = tx.closed() => return,
            };
            let Some((tcp, peer)) = accepted else { return };
            // Snapshots are small writes that must leave at once.
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Some(tls) = handshake(&acceptor, tcp, peer, what).await {
                    let _ = tx.send(Ok(tls)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
