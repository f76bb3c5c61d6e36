//! Accept loops: one task per connection, HTTP/1.1 and HTTP/2 (prior knowledge) on
//! every listener, graceful drain on shutdown.

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
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::body::Body;
use crate::transparent::Intercept;

/// The most a request's header section may take, as Envoy's default (60 KiB) and
/// nginx's largest buffers allow; a larger one is refused with 431 (HTTP/1.1) or a
/// stream error (HTTP/2) instead of being buffered. hyper's own default is ~400 KiB.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves `listener` until `shutdown` flips, then stops accepting, asks every open
/// connection to close (GOAWAY on HTTP/2, `connection: close` on HTTP/1) and waits up
/// to `drain` for requests and passed-through connections in flight. With `intercept`,
/// each connection is first handed to transparent mode, which may pass it through
/// itself or return it with its original destination (put in every request's
/// extensions).
pub(crate) fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
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
            let Some(intercept) = intercept.clone() else {
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
            };
            // Sniffing awaits the client, so it happens in the connection's own task.
            let builder = builder.clone();
            let watcher = graceful.watcher();
            conns.spawn(async move {
                let Some((io, original)) = intercept.accept(stream).await else {
                    return;
                };
                let service = service_fn(move |mut req: Request<Incoming>| {
                    if let Some(dst) = &original {
                        req.extensions_mut().insert(dst.clone());
                    }
                    let fut = handler(peer, req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
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
