//! Accept loops: one task per connection, HTTP/1.1 and HTTP/2 (prior knowledge) on
//! every listener, graceful drain on shutdown. Before HTTP, a connection may go through
//! transparent mode's intercept and then the inbound TLS accept, in that order.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;

use http::{Request, Response};
use hyper::body::{Body as _, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use sluice_filters::clock::Frozen;
use sluice_filters::extensions::PeerIdentity;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::body::{Body, BoxError};
use crate::h2_limits::{H2Limits, StreamBudget};
use crate::message::MAX_HEADER_BYTES;
use crate::metrics::HeadTimeouts;
use crate::rescue::header_timeout_answer;
use crate::timeouts::{
    Activity, ActivityIo, GuardedBody, HeadPhase, HeaderTimeoutIo, ResponseIdle, Timeouts,
};
use crate::tls::accept::{Accepted, InboundTls};
use crate::transparent::{H2_PREFACE, Intercept, OriginalDst, Prefixed};
use crate::workers::Workers;

/// Runs the tasks hyper spawns for a connection (an HTTP/2 stream each) with one clock
/// reading per poll, as the connection's own task ([`sluice_filters::clock`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Frozen::new(fut));
    }
}

/// Serves `listener` until `shutdown` flips, then stops accepting, asks every open
/// connection to close (GOAWAY on HTTP/2, `connection: close` on HTTP/1) and waits up
/// to `drain` for requests and passed-through connections in flight. With `intercept`,
/// each connection is first handed to transparent mode, which may pass it through
/// itself or return it with its original destination (put in every request's
/// extensions). With `tls`, the connection then goes through the inbound TLS accept,
/// and the peer's verified identity is put in every request's extensions. Every
/// HTTP/2 connection is held to `h2` ([`crate::h2_limits`]). HTTP/1 request heads that
/// miss the header timeout are answered 408 and counted in `head_timeouts`. Each
/// connection runs whole on one of `workers`, reading the clock once per poll
/// ([`sluice_filters::clock`]).
#[allow(clippy::too_many_arguments)] // one listener's whole setting, each used once
pub(crate) fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    workers: Workers,
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
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // Heads are timed from their first byte, with a 408: `HeaderTimeoutIo`.
            .header_read_timeout(None)
            .max_buf_size(MAX_HEADER_BYTES)
            // Body chunks queued and written from where they are, not copied into one
            // contiguous buffer: that buffer grows with the largest response a
            // connection carries (to 64 KiB plus a chunk) and hyper never shrinks it, so
            // every kept-alive connection would keep ~80 KiB after one large answer. The
            // queue costs ~380 instructions per response (hyper's 64 `IoSlice`s per
            // flush) and saves a copy of every body byte.
            .writev(true);
        let mut h2c = http2::Builder::new(StreamExecutor);
        h2c.timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32);
        // Shared by the listener's connections: a connection's task holds a pointer to
        // it, not a copy (about 340 bytes less per connection).
        let shared = Arc::new(Shared {
            builder: Builders { h1, h2: h2c },
            settings: ConnSettings {
                timeouts,
                head_answer: header_timeout_answer(timeouts.request_header),
                head_timeouts,
            },
        });
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
            let (intercept, tls, shared) = (intercept.clone(), tls.clone(), shared.clone());
            let watcher = Watcher {
                shutdown: shutdown.clone(),
                h2,
            };
            workers.spawn(&mut conns, stream, move |stream| Frozen::new(async move {
                // However the connection ends, what it held is freed on its worker.
                let _release = crate::memory::ReleaseOnDrop;
                let (io, original) = match intercept {
                    Some(i) => match Box::pin(i.accept(stream)).await {
                        Some(pair) => pair,
                        None => return,
                    },
                    None => (Prefixed::new(stream, Vec::new()), None),
                };
                // Until the client's first byte the connection holds only this task:
                // hyper's connection (about 6 KiB of state and its 8 KiB write buffer)
                // and a TLS session are built once there is something to read.
                // Boxed: the wait's timer and watchers are not kept in the task's own
                // future for the rest of the connection.
                if !io.has_prefix()
                    && !Box::pin(first_byte(
                        io.inner(),
                        shared.settings.timeouts.idle,
                        watcher.shutdown.clone(),
                    ))
                    .await
                {
                    debug!(listener = name, %peer, "closing a connection that sent nothing");
                    return;
                }
                let result = match tls {
                    // Boxed, so that the task's own future stays small while it waits.
                    None => {
                        Box::pin(serve_conn(&shared, watcher, io, handler, peer, original, None))
                            .await
                    }
                    Some(tls) => match Box::pin(crate::tls::accept::accept(&tls, io)).await {
                        Ok(Accepted::Tls(io, id)) => {
                            // The session stays in its box: it is over a kilobyte.
                            Box::pin(serve_conn(&shared, watcher, io, handler, peer, original, id))
                                .await
                        }
                        Ok(Accepted::Plain(io)) => {
                            Box::pin(serve_conn(&shared, watcher, io, handler, peer, original, None))
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
            }));
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

/// Waits for a connection's first byte (or its end, which hyper then reads): false when
/// it stayed silent for the idle timeout or the listener shut down first.
async fn first_byte(
    stream: &tokio::net::TcpStream,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    let mut byte = [0u8; 1];
    tokio::select! {
        // The peek first: a client that has already spoken (nearly every one) never
        // registers the idle deadline below with the timer.
        biased;
        // A peek, not `readable()`: readiness alone reports a fresh socket ready at once.
        peeked = stream.peek(&mut byte) => peeked.is_ok(),
        // The idle timeout's deadline for a connection that never speaks, not a wait.
        () = tokio::time::sleep(idle) => false,
        _ = shutdown.wait_for(|stop| *stop) => false,
    }
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

/// What a listener's connections share.
#[derive(Debug)]
struct Shared {
    builder: Builders,
    settings: ConnSettings,
}

/// hyper's two servers, configured once per listener.
#[derive(Clone, Debug)]
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<StreamExecutor>,
}

/// How long an HTTP/1 connection stays quiet, between requests and with nothing left to
/// write, before it is parked: hyper's state for it (its read and write buffers, about
/// 16 KiB) is dropped, and built again when the client's next byte arrives.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// A connection's socket, when it can be waited on between requests without reading
/// from it: when everything read from it so far has been handed out, so that its next
/// bytes are what wakes the wait.
trait Parkable {
    /// The socket to wait on, if it can be waited on now.
    fn socket(&self) -> Option<&tokio::net::TcpStream>;
}

impl Parkable for Prefixed<tokio::net::TcpStream> {
    /// Nothing read ahead left to replay.
    fn socket(&self) -> Option<&tokio::net::TcpStream> {
        (!self.has_prefix()).then(|| self.inner())
    }
}

impl Parkable for Box<tokio_rustls::server::TlsStream<Prefixed<tokio::net::TcpStream>>> {
    /// rustls holds no decrypted bytes not yet handed out and nothing left to send
    /// (`wants_read`: no plaintext waiting, no close_notify; every whole record read is
    /// decrypted as it arrives, so what it may still hold is part of a record whose
    /// rest the socket brings), and the socket has nothing read ahead to replay.
    fn socket(&self) -> Option<&tokio::net::TcpStream> {
        let (io, session) = self.get_ref();
        if !session.wants_read() || session.wants_write() {
            return None;
        }
        io.socket()
    }
}

/// Serves HTTP on one accepted connection, putting what the accept step learnt about
/// it in every request's extensions. The connection is asked to close (GOAWAY on
/// HTTP/2, `connection: close` on HTTP/1) when the listener shuts down or when an
/// HTTP/2 client goes over its [`StreamBudget`]; it is closed when idle for `timeouts.idle`,
/// and answered 408 and closed when an HTTP/1 head takes longer than
/// `timeouts.request_header` from its first byte. An HTTP/1 connection quiet for
/// [`PARK_AFTER`] between requests is parked until its next byte.
#[allow(clippy::too_many_arguments)]
async fn serve_conn<I, H, F>(
    shared: &Shared,
    mut watcher: Watcher,
    io: I,
    handler: H,
    peer: SocketAddr,
    original: Option<OriginalDst>,
    identity: Option<PeerIdentity>,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Parkable + Unpin + Send + 'static,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let Shared { builder, settings } = shared;
    let timeouts = settings.timeouts;
    let activity = Activity::new();
    let head = HeadPhase::new();
    // One binding for the whole stack of wrappers, from the start: the connection's
    // future keeps room for every binding it ever had.
    let mut io = Prefixed::new(
        HeaderTimeoutIo::new(
            ActivityIo::new(io, activity.clone()),
            head.clone(),
            timeouts.request_header,
            settings.head_answer.clone(),
        ),
        Vec::new(),
    );
    let conn_head = head.clone();
    let peer_id = identity.as_ref().map(|id| id.0.clone());
    let conn_activity = activity.clone();
    let budget = StreamBudget::new(&watcher.h2);
    let conn_budget = budget.clone();
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
    // What ends a connection from outside, polled only when one of them was woken: the
    // task wakes a few times per request for its I/O, and polling all three each time
    // cost more than the rest of the connection's own bookkeeping.
    let outside = WokenOnly::new(async {
        tokio::select! {
            _ = watcher.shutdown.wait_for(|stop| *stop) => Outside::Close,
            () = conn_budget.tripped() => Outside::Close,
            () = activity.idle_for(timeouts.idle) => Outside::Idle,
        }
    });
    tokio::pin!(outside);
    // HTTP/2's preface or anything else (an HTTP/1 head), told from the first bytes;
    // hyper reads them again. Nothing is in flight yet, so anything outside closes.
    let is_h2 = match tokio::select! {
        biased;
        _ = outside.as_mut() => return Ok(()),
        sniffed = sniff_h2(&mut io) => sniffed,
    } {
        Ok((is_h2, prefix)) => {
            io.replay(&prefix);
            is_h2
        }
        Err(e) => return finish(Err(e.into())),
    };
    let conn_idle = (!timeouts.response_body.is_zero()).then(|| {
        Arc::new(ResponseIdle {
            timeout: timeouts.response_body,
            count: settings
                .head_timeouts
                .as_ref()
                .map(|c| c.response_bodies.clone()),
        })
    });
    // Made once the protocol is known: the sniff's wait does not keep room for it.
    let service = service_fn(move |mut req: Request<Incoming>| {
        crate::memory::request_started();
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
        let response_idle = conn_idle.clone();
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
            Ok(resp.map(|body| GuardedBody::new(body, head_guard, response_idle)))
        }
    });
    if is_h2 {
        // Boxed, as the HTTP/1 connection below: the task's own future stays small.
        let mut conn = Box::pin(builder.h2.serve_connection(TokioIo::new(io), service));
        // The outside first: a shutdown already signalled when a response becomes ready
        // must mark that response `connection: close`, not the one after it (the flag
        // check costs nothing when nothing outside woke the task).
        tokio::select! {
            biased;
            outside = outside.as_mut() => if outside == Outside::Idle {
                debug!(%peer, "closing an idle connection");
                return Ok(());
            },
            ended = conn.as_mut() => return finish(ended.map_err(Into::into)),
        }
        conn.as_mut().graceful_shutdown();
        return finish(conn.await.map_err(Into::into));
    }
    let mut service = service;
    // Set when parking found a head begun and stalled: the requests seen then. No
    // parking again until another request, or a stalled head would be parked each period.
    let mut stalled_at = None;
    loop {
        // Boxed, so that a parked connection's task does not keep room for it.
        let mut conn = Box::new(
            builder
                .h1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        // In a block, as the taking apart below: what only this step needs is not kept
        // in the connection's future while it is parked.
        let closing = {
            let quiet = WokenOnly::new(quiet_between_requests(&activity, &head, stalled_at));
            tokio::pin!(quiet);
            tokio::select! {
                biased;
                outside = outside.as_mut() => Some(outside),
                ended = &mut *conn => return finish(ended.map_err(Into::into)),
                () = quiet.as_mut() => None,
            }
        };
        match closing {
            Some(Outside::Idle) => {
                debug!(%peer, "closing an idle connection");
                return Ok(());
            }
            Some(Outside::Close) => {
                std::pin::Pin::new(&mut *conn).graceful_shutdown();
                return finish((&mut *conn).await.map_err(Into::into));
            }
            None => {}
        }
        // Quiet, between requests, nothing left to write: hyper's state goes, its box and
        // its read buffer with it (the block frees the box before the wait below).
        let head_begun = {
            let Some(parts) = ({ conn }).into_parts() else {
                return Ok(());
            };
            service = parts.service;
            io = parts.io.into_inner();
            let read_ahead = parts.read_buf;
            io.replay(&read_ahead);
            !read_ahead.is_empty()
        };
        if head_begun {
            debug!(%peer, "not parking a connection whose next head has begun");
            stalled_at = Some(activity.requests());
            continue;
        }
        stalled_at = None;
        // Only on the socket itself: what a plaintext connection replays was read by a
        // request answered since, and rustls may still hold decrypted bytes or bytes to
        // send, which hyper, built again at once, reads or writes.
        let Some(socket) = io.inner().get_ref().get_ref().socket() else {
            continue;
        };
        debug!(%peer, "parked an idle connection");
        crate::memory::release_when_quiet();
        let mut byte = [0u8; 1];
        tokio::select! {
            biased;
            // Nothing in flight: a shutdown closes it as an idle one.
            _ = outside.as_mut() => return Ok(()),
            // Bytes, the end, or an error: hyper reads whichever it is.
            _ = socket.peek(&mut byte) => activity.touch(),
        }
    }
}

/// Resolves once an HTTP/1 connection has been quiet for [`PARK_AFTER`] with nothing in
/// flight, between requests, with nothing left to write, and (when `stalled_at` is
/// set) after a request past that count.
async fn quiet_between_requests(activity: &Activity, head: &HeadPhase, stalled_at: Option<u64>) {
    activity
        .idle_for_and(PARK_AFTER, || {
            head.between_heads()
                && !activity.write_blocked()
                && stalled_at.is_none_or(|at| activity.requests() != at)
        })
        .await;
}

/// Reads a connection's first bytes until they tell HTTP/2's preface from anything else
/// (an HTTP/1 head, or the connection's end): whether it is HTTP/2, and the bytes read,
/// for hyper to read again.
async fn sniff_h2<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<(bool, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 || buf[filled..filled + n] != H2_PREFACE[filled..filled + n] {
            buf.truncate(filled + n);
            return Ok((false, buf));
        }
        filled += n;
    }
    Ok((true, buf))
}

/// Why a connection ends from outside its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outside {
    /// Shutdown, or an HTTP/2 client over its stream budget: asked to close.
    Close,
    /// Nothing moved for the idle timeout: closed.
    Idle,
}

pin_project_lite::pin_project! {
    /// A future polled only once its own waker has fired since its last poll (and on
    /// its first poll), however often the task that awaits it wakes for other reasons.
    struct WokenOnly<F> {
        #[pin]
        inner: F,
        flag: Arc<WakeFlag>,
        waker: Waker,
    }
}

/// The waker [`WokenOnly`] polls its future with: notes the wake-up, then wakes the
/// task.
#[derive(Debug, Default)]
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WokenOnly<F> {
    fn new(inner: F) -> Self {
        let flag = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            inner,
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for WokenOnly<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

/// The error that makes hyper reset an HTTP/2 stream with `REFUSED_STREAM`.
fn refused_stream() -> h2::Error {
    h2::Error::from(h2::Reason::REFUSED_STREAM)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A future that counts its polls and hands out the waker it was last polled with.
    struct Counted {
        polls: Arc<AtomicUsize>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
        ready: Arc<AtomicBool>,
    }

    impl Future for Counted {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn a_woken_only_future_is_polled_first_and_then_only_after_its_own_wake_up() {
        let (polls, waker, ready) = Default::default();
        let inner = Counted {
            polls: Arc::clone(&polls),
            waker: Arc::clone(&waker),
            ready: Arc::clone(&ready),
        };
        let task_wakes = Arc::new(TaskWakes::default());
        let task_waker = Waker::from(task_wakes.clone());
        let mut cx = Context::from_waker(&task_waker);
        let mut fut = std::pin::pin!(WokenOnly::new(inner));

        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "the first poll reaches it");
        // The task wakes for other reasons: the inner future is left alone.
        for _ in 0..5 {
            assert!(fut.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);

        // Its own wake-up wakes the task and lets the next poll through.
        ready.store(true, Ordering::SeqCst);
        waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task_wakes.0.load(Ordering::SeqCst), 1);
        assert!(fut.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    /// Drives `sniff_h2` over an in-memory pipe, the client's bytes arriving in
    /// `chunks` (one read each): what it says once the last one is in.
    async fn sniffed(chunks: &[&[u8]], then_close: bool) -> (bool, Vec<u8>) {
        use futures_util::FutureExt;
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut sniff = std::pin::pin!(sniff_h2(&mut server));
        let (last, first) = chunks.split_last().expect("at least one chunk");
        for chunk in first {
            client.write_all(chunk).await.unwrap();
            assert!(
                sniff.as_mut().now_or_never().is_none(),
                "decided after {:?}",
                String::from_utf8_lossy(chunk)
            );
        }
        client.write_all(last).await.unwrap();
        if then_close {
            drop(client);
        }
        sniff
            .now_or_never()
            .expect("decided once the last chunk is in")
            .unwrap()
    }

    #[tokio::test]
    async fn the_http2_preface_is_told_from_its_first_bytes_however_they_arrive() {
        // In one read, and in three.
        assert_eq!(
            sniffed(&[H2_PREFACE], false).await,
            (true, H2_PREFACE.to_vec())
        );
        let pieces: &[&[u8]] = &[&H2_PREFACE[..1], &H2_PREFACE[1..10], &H2_PREFACE[10..]];
        assert_eq!(sniffed(pieces, false).await, (true, H2_PREFACE.to_vec()));

        // What follows the preface is left for hyper to read from the connection.
        let (mut client, mut server) = tokio::io::duplex(1024);
        let settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        tokio::io::AsyncWriteExt::write_all(&mut client, &[H2_PREFACE, settings].concat())
            .await
            .unwrap();
        let (is_h2, read) = sniff_h2(&mut server).await.unwrap();
        assert!(is_h2);
        assert_eq!(read, H2_PREFACE);
        let mut rest = [0u8; 9];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut rest)
            .await
            .unwrap();
        assert_eq!(&rest, settings);
    }

    #[tokio::test]
    async fn anything_else_is_told_at_its_first_difference_with_every_byte_read_kept() {
        // An HTTP/1 head: its first byte settles it.
        assert_eq!(sniffed(&[b"G"], false).await, (false, b"G".to_vec()));
        // One that starts as the preface does: settled in its second read, and both
        // reads kept in order for hyper.
        let pieces: &[&[u8]] = &[b"PRI * HTT", b"P/1.1\r\n\r\n"];
        assert_eq!(
            sniffed(pieces, false).await,
            (false, b"PRI * HTTP/1.1\r\n\r\n".to_vec())
        );
        // A client that leaves before a byte, or halfway through the preface.
        assert_eq!(sniffed(&[b""], true).await, (false, Vec::new()));
        let pieces: &[&[u8]] = &[b"PRI", b" * "];
        assert_eq!(sniffed(pieces, true).await, (false, b"PRI * ".to_vec()));
    }

    #[derive(Default)]
    struct TaskWakes(AtomicUsize);

    impl Wake for TaskWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}
