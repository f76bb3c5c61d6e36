//! Accept loops: one task per connection, HTTP/1.1 and HTTP/2 (prior knowledge) on
//! every listener, graceful drain on shutdown. Before HTTP, a connection may go through
//! transparent mode's intercept and then the inbound TLS accept, in that order.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use sluice_filters::extensions::PeerIdentity;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::body::Body;
use crate::tls::accept::{Accepted, InboundTls};
use crate::transparent::{Intercept, OriginalDst, Prefixed};

/// The most a request's header section may take, as Envoy's default (60 KiB) and
/// nginx's largest buffers allow; a larger one is refused with 431 (HTTP/1.1) or a
/// stream error (HTTP/2) instead of being buffered. hyper's own default is ~400 KiB.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves `listener` until `shutdown` flips, then stops accepting, asks every open
/// connection to close (GOAWAY on HTTP/2, `connection: close` on HTTP/1) and waits up
/// to `drain` for requests and passed-through connections in flight. With `intercept`,
/// each connection is first handed to transparent mode, which may pass it through
/// itself or return it with its original destination (put in every request's
/// extensions). With `tls`, the connection then goes through the inbound TLS accept,
/// and the peer's verified identity is put in every request's extensions.
pub(crate) fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    intercept: Option<Intercept>,
    tls: Option<InboundTls>,
) -> JoinHandle<()>
where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .max_buf_size(MAX_HEADER_BYTES);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32);
        let graceful = GracefulShutdown::new();
        // Owning the connection tasks means none outlives the listener after the drain.
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: pause briefly rather than spin.
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
            let handler = handler.clone();
            if intercept.is_none() && tls.is_none() {
                let service = service_fn(move |req| {
                    let fut = handler(peer, req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                conns.spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(listener = name, %peer, error = %e, "connection ended with an error");
                    }
                });
                continue;
            }
            // Sniffing and handshakes await the client, so they happen in the
            // connection's own task.
            let (intercept, tls, builder) = (intercept.clone(), tls.clone(), builder.clone());
            let watcher = graceful.watcher();
            conns.spawn(async move {
                let (io, original) = match intercept {
                    Some(i) => match i.accept(stream).await {
                        Some(pair) => pair,
                        None => return,
                    },
                    None => (Prefixed::new(stream, Vec::new()), None),
                };
                let result = match tls {
                    None => serve_conn(&builder, watcher, io, handler, peer, original, None).await,
                    Some(tls) => match crate::tls::accept::accept(&tls, io).await {
                        Ok(Accepted::Tls(io, id)) => {
                            serve_conn(&builder, watcher, *io, handler, peer, original, id).await
                        }
                        Ok(Accepted::Plain(io)) => {
                            serve_conn(&builder, watcher, io, handler, peer, original, None).await
                        }
                        Err(e) => {
                            debug!(listener = name, %peer, error = %e, "connection refused");
                            return;
                        }
                    },
                };
                if let Err(e) = result {
                    debug!(listener = name, %peer, error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        let open = conns.len();
        if open > 0 {
            info!(listener = name, open, ?drain, "draining connections");
        }
        // Passed-through connections cannot be asked to close; they get the same grace.
        let drained = async {
            graceful.shutdown().await;
            while conns.join_next().await.is_some() {}
        };
        if tokio::time::timeout(drain, drained).await.is_err() {
            warn!(
                listener = name,
                "drain timeout elapsed; closing remaining connections"
            );
        }
        conns.shutdown().await;
    })
}

/// Serves HTTP on one accepted connection, putting what the accept step learnt about
/// it in every request's extensions.
async fn serve_conn<I, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    handler: H,
    peer: SocketAddr,
    original: Option<OriginalDst>,
    identity: Option<PeerIdentity>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let service = service_fn(move |mut req: Request<Incoming>| {
        if let Some(dst) = &original {
            req.extensions_mut().insert(dst.clone());
        }
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
