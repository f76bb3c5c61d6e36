//! The inbound listener's TLS accept: one task per connection does the
//! handshake (so a slow client never holds up the accept loop), then serves
//! HTTP/1.1 or HTTP/2 over it with the peer's verified SPIFFE ID in every
//! request's extensions as a [`PeerIdentity`].
//!
//! Strict (the default with mTLS): a connection that does not complete a TLS 1.3
//! handshake with a client certificate chaining to the mesh root is closed.
//! Permissive: the first byte decides; a TLS handshake record (`0x16`) goes
//! through the strict path, anything else is served as plaintext HTTP without
//! an identity (so `inbound.allow` refuses it when a list is set).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use sluice_filters::ratelimit::PeerIdentity;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{TlsStore, peer_identity};
use crate::body::Body;
use crate::transparent::{Intercept, Prefixed};

/// A client that has not finished its handshake (or sent a first byte) by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// How the inbound listener authenticates peers.
#[derive(Clone, Debug)]
pub(crate) struct InboundTls {
    /// The proxy's certificate and the trust root.
    pub(crate) store: Arc<TlsStore>,
    /// Serve plaintext clients too (without an identity).
    pub(crate) permissive: bool,
}

/// What a connection turned out to be after the accept step.
enum Accepted {
    Tls(
        Box<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>>,
        Option<PeerIdentity>,
    ),
    Plain(Prefixed<TcpStream>),
}

/// Decides between TLS and plaintext and completes the handshake.
async fn accept(tls: &InboundTls, stream: Prefixed<TcpStream>) -> std::io::Result<Accepted> {
    // The inbound intercept reads nothing ahead, so the socket's next byte is the first.
    if tls.permissive && !stream.has_prefix() {
        let mut first = [0u8; 1];
        let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.inner().peek(&mut first))
            .await
            .map_err(|_| std::io::Error::other("no first byte in time"))??;
        if n == 0 || first[0] != TLS_HANDSHAKE {
            return Ok(Accepted::Plain(stream));
        }
    }
    // Loaded per connection: a renewed certificate serves the next handshake.
    let Some(config) = tls.store.server_config() else {
        return Err(std::io::Error::other("no workload certificate yet"));
    };
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
    let peer = peer_identity(tls.get_ref().1);
    Ok(Accepted::Tls(Box::new(tls), peer))
}

/// Serves `listener` like `server::serve`, with the TLS accept step of `tls` after
/// the transparent-mode `intercept` (connections redirected to other ports pass
/// through untouched).
pub(crate) fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    tls: InboundTls,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    intercept: Option<Intercept>,
) -> JoinHandle<()>
where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new());
        builder.http2().timer(TokioTimer::new());
        let graceful = GracefulShutdown::new();
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                _ = shutdown.changed() => break,
            };
            if let Err(e) = stream.set_nodelay(true) {
                debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let (handler, tls, builder) = (handler.clone(), tls.clone(), builder.clone());
            let intercept = intercept.clone();
            let watcher = graceful.watcher();
            conns.spawn(async move {
                let stream = match intercept {
                    Some(i) => match i.accept(stream).await {
                        Some((io, _)) => io,
                        None => return,
                    },
                    None => Prefixed::new(stream, Vec::new()),
                };
                let result = match accept(&tls, stream).await {
                    Ok(Accepted::Tls(io, id)) => {
                        serve_conn(&builder, watcher, *io, handler, peer, id).await
                    }
                    Ok(Accepted::Plain(io)) => {
                        serve_conn(&builder, watcher, io, handler, peer, None).await
                    }
                    Err(e) => {
                        debug!(listener = name, %peer, error = %e, "connection refused");
                        return;
                    }
                };
                if let Err(e) = result {
                    debug!(listener = name, %peer, error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        let open = graceful.count();
        if open > 0 {
            info!(listener = name, open, ?drain, "draining connections");
        }
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            warn!(
                listener = name,
                "drain timeout elapsed; closing remaining connections"
            );
        }
        conns.shutdown().await;
    })
}

async fn serve_conn<I, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    handler: H,
    peer: SocketAddr,
    identity: Option<PeerIdentity>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let service = service_fn(move |mut req: Request<Incoming>| {
        // One identity per connection: every request on it carries the same one.
        if let Some(id) = &identity {
            req.extensions_mut().insert(id.clone());
        }
        let fut = handler(peer, req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    watcher.watch(conn.into_owned()).await
}
