//! Accept loops: one task per connection, HTTP/1.1 and HTTP/2 (prior knowledge) on
//! every listener, graceful drain on shutdown. Before HTTP, a connection may go through
//! transparent mode's intercept and then the inbound TLS accept, in that order.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use sluice_filters::extensions::PeerIdentity;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::body::{Body, BoxError};
use crate::h2_limits::{H2Limits, StreamBudget};
use crate::metrics::HeadTimeouts;
use crate::rescue::header_timeout_answer;
use crate::timeouts::{Activity, ActivityIo, GuardedBody, HeadPhase, HeaderTimeoutIo, Timeouts};
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
/// and the peer's verified identity is put in every request's extensions. Every
/// HTTP/2 connection is held to `h2` ([`crate::h2_limits`]). HTTP/1 request heads that
/// miss the header timeout are answered 408 and counted in `head_timeouts`.
#[allow(clippy::too_many_arguments)] // one listener's whole setting, each used once
pub(crate) fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    timeouts: Timeouts,
    intercept: Option<Intercept>,
    tls: Option<InboundTls>,
    h2: H2Limits,
    head_timeouts: Option<HeadTimeouts>,
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
            // Heads are timed from their first byte, with a 408: `HeaderTimeoutIo`.
            .header_read_timeout(None)
            .max_buf_size(MAX_HEADER_BYTES);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32);
        let settings = ConnSettings {
            timeouts,
            head_answer: header_timeout_answer(timeouts.request_header),
            head_timeouts,
        };
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
            // Sniffing and handshakes await the client, so they happen in the
            // connection's own task.
            let (intercept, tls, builder) = (intercept.clone(), tls.clone(), builder.clone());
            let settings = settings.clone();
            let watcher = Watcher {
                shutdown: shutdown.clone(),
                h2,
            };
            conns.spawn(async move {
                let (io, original) = match intercept {
                    Some(i) => match i.accept(stream).await {
                        Some(pair) => pair,
                        None => return,
                    },
                    None => (Prefixed::new(stream, Vec::new()), None),
                };
                let result = match tls {
                    None => {
                        serve_conn(
                            &builder, watcher, io, handler, peer, original, None, &settings,
                        )
                        .await
                    }
                    Some(tls) => match crate::tls::accept::accept(&tls, io).await {
                        Ok(Accepted::Tls(io, id)) => {
                            serve_conn(
                                &builder, watcher, *io, handler, peer, original, id, &settings,
                            )
                            .await
                        }
                        Ok(Accepted::Plain(io)) => {
                            serve_conn(
                                &builder, watcher, io, handler, peer, original, None, &settings,
                            )
                            .await
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
        // Every HTTP connection was asked to close when `shutdown` flipped; passed-through
        // ones cannot be asked and get the same grace.
        let drained = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(drain, drained).await.is_err() {
            warn!(
                listener = name,
                "drain timeout elapsed; closing remaining connections"
            );
        }
        conns.shutdown().await;
    })
}

/// What a connection task watches besides its client: the listener's shutdown and
/// the HTTP/2 limits.
#[derive(Clone, Debug)]
struct Watcher {
    shutdown: watch::Receiver<bool>,
    h2: H2Limits,
}

/// What every connection of a listener is held to besides its HTTP/2 limits.
#[derive(Clone, Debug)]
struct ConnSettings {
    timeouts: Timeouts,
    /// The 408 a head that misses the header timeout gets, written out once per listener.
    head_answer: bytes::Bytes,
    head_timeouts: Option<HeadTimeouts>,
}

/// Serves HTTP on one accepted connection, putting what the accept step learnt about
/// it in every request's extensions. The connection is asked to close (GOAWAY on
/// HTTP/2, `connection: close` on HTTP/1) when the listener shuts down or when an
/// HTTP/2 client goes over its [`StreamBudget`]; it is closed when idle for `timeouts.idle`,
/// and answered 408 and closed when an HTTP/1 head takes longer than
/// `timeouts.request_header` from its first byte.
#[allow(clippy::too_many_arguments)]
async fn serve_conn<I, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    mut watcher: Watcher,
    io: I,
    handler: H,
    peer: SocketAddr,
    original: Option<OriginalDst>,
    identity: Option<PeerIdentity>,
    settings: &ConnSettings,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let timeouts = settings.timeouts;
    let activity = Activity::new();
    let head = HeadPhase::new();
    let io = HeaderTimeoutIo::new(
        ActivityIo::new(io, activity.clone()),
        head.clone(),
        timeouts.request_header,
        settings.head_answer.clone(),
    );
    let conn_head = head.clone();
    let peer_id = identity.as_ref().map(|id| id.0.clone());
    let conn_activity = activity.clone();
    let budget = StreamBudget::new(&watcher.h2);
    let conn_budget = budget.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        // Only the request body's timeout is read from here on, and a request that
        // arrived whole has none to time: one extension (an allocation) fewer for it.
        if !req.body().is_end_stream() {
            req.extensions_mut().insert(timeouts);
        }
        let h2 = req.version() == http::Version::HTTP_2;
        // Refused before any route sees it; the client may retry elsewhere.
        let admitted = if h2 {
            budget.open().map(Some)
        } else {
            Some(None)
        };
        if let Some(dst) = &original {
            req.extensions_mut().insert(dst.clone());
        }
        // One identity per connection: every request on it carries the same one.
        if let Some(id) = &identity {
            req.extensions_mut().insert(id.clone());
        }
        let in_flight = conn_activity.request();
        // An HTTP/1 head is complete: its timer waits for the next one until the answer ends.
        let head_guard = if h2 {
            conn_head.off();
            None
        } else {
            Some(conn_head.request())
        };
        // Boxed: hyper moves the service future around whole (into an HTTP/2 stream's
        // task, into the HTTP/1 dispatcher's slot), and the handler's future is about
        // 2 KiB; an allocation costs less than copying it at each step.
        let fut = admitted.map(|guard| (guard, Box::pin(handler(peer, req))));
        async move {
            let Some((guard, fut)) = fut else {
                return Err(refused_stream());
            };
            let resp = fut.await;
            drop(in_flight);
            if let Some(g) = guard {
                g.answered();
            }
            let head_guard = match head_guard {
                Some(g) if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                    g.upgraded();
                    None
                }
                g => g,
            };
            Ok(resp.map(|body| GuardedBody::new(body, head_guard)))
        }
    });
    // The 408 ends hyper's connection with an I/O error: counted, not an error here.
    let finish = |ended: Result<(), BoxError>| {
        if !head.timed_out() {
            return ended;
        }
        debug!(%peer, timeout = ?timeouts.request_header, "request head timed out; answered 408");
        if let Some(count) = &settings.head_timeouts {
            count.count(peer_id.as_deref());
        }
        Ok(())
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => return finish(ended),
        _ = watcher.shutdown.wait_for(|stop| *stop) => {}
        () = conn_budget.tripped() => {}
        () = activity.idle_for(timeouts.idle) => {
            debug!(%peer, "closing an idle connection");
            return Ok(());
        }
    }
    conn.as_mut().graceful_shutdown();
    finish(conn.await)
}

/// The error that makes hyper reset an HTTP/2 stream with `REFUSED_STREAM`.
fn refused_stream() -> h2::Error {
    h2::Error::from(h2::Reason::REFUSED_STREAM)
}
