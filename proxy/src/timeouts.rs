//! Timeouts on slow or silent clients, set by flags (`--idle-timeout`,
//! `--request-header-timeout`, `--request-body-timeout`):
//!
//! - [`Activity`] watches a downstream connection's bytes and requests: one with no
//!   request in flight and no byte either way for the idle timeout is closed, as
//!   Envoy's `idle_timeout` (default 1 h) does;
//! - [`HeaderTimeoutIo`] times an HTTP/1 request head from its first byte: a head not
//!   complete within the header timeout gets the fixed 408 `request-timeout` answer it
//!   was given and the connection is closed, as Envoy's `request_headers_timeout` does.
//!   Before the first byte the connection is merely idle (the idle timeout's business),
//!   so pre-opened pool connections and quiet keep-alive ones live on; a client
//!   trickling a byte now and then is still cut off one header timeout after its first.
//!   hyper's own `header_read_timeout` is off: it starts before the first byte (closing
//!   quiet keep-alive connections) and closes without an answer;
//! - [`BodyTimeout`] wraps a request body on its way upstream: if the client sends
//!   nothing for the body timeout before the upstream has answered, the body fails
//!   with [`RequestBodyTimeout`], which ends the upstream request (freeing its
//!   connection) and is rescued as 408 `request-timeout`;
//! - [`GuardedBody`] wraps every response body on its way to the client: if the
//!   upstream sends nothing for `--response-body-timeout` while the client waits for
//!   more, the body fails with [`ResponseBodyTimeout`] (HTTP/1: the connection is
//!   closed mid-body; HTTP/2: the stream is reset), which frees both connections a
//!   hung upstream would otherwise hold for ever, as Envoy's `stream_idle_timeout`. The
//!   timer exists only while a frame is awaited, and a response that is whole at once
//!   never has one.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use sluice_filters::clock;
use sluice_filters::extensions::BodyProgress;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;

/// The three limits, as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A connection with nothing in flight and no bytes for this long is closed.
    pub idle: Duration,
    /// An HTTP/1 request head must be complete this long after its first byte.
    pub request_header: Duration,
    /// A request body may pause this long before the upstream answers.
    pub request_body: Duration,
    /// A response body may pause this long while the client waits for it (zero: no limit).
    pub response_body: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(3600),
            request_header: Duration::from_secs(30),
            request_body: Duration::from_secs(60),
            response_body: Duration::from_secs(3600),
        }
    }
}

// === impl BodyTimeout ===

/// The client sent no request body bytes for the body timeout before the upstream
/// answered.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body for {0:?}")]
pub struct RequestBodyTimeout(pub Duration);

pin_project_lite::pin_project! {
    /// A request body that fails with [`RequestBodyTimeout`] when its client pauses
    /// longer than the timeout, until the upstream answered
    /// ([`BodyProgress::answered`]), and tells its [`BodyProgress`] how it arrives, so
    /// that the route's timers start once it is in and a client's stall is never the
    /// upstream's fault.
    pub struct BodyTimeout<B> {
        #[pin]
        inner: B,
        timeout: Option<Duration>,
        sleep: Option<Pin<Box<Sleep>>>,
        progress: BodyProgress,
        waiting: bool,
    }
}

impl<B> BodyTimeout<B> {
    /// Wraps `inner` (`timeout` `None`: pauses are not limited); returns the progress
    /// the body reports to, for the request's layers and for the edge to mark answered.
    pub fn new(inner: B, timeout: Option<Duration>) -> (Self, BodyProgress) {
        let progress = BodyProgress::new();
        let body = Self {
            inner,
            timeout,
            sleep: None,
            progress: progress.clone(),
            waiting: false,
        };
        (body, progress)
    }
}

impl<B> HttpBody for BodyTimeout<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                // Activity: the next pause starts counting afresh.
                *this.sleep = None;
                *this.waiting = false;
                match &frame {
                    Some(Ok(f)) if !f.is_trailers() && !this.inner.is_end_stream() => {
                        this.progress.frame();
                    }
                    Some(Ok(_)) | None => this.progress.ended(),
                    Some(Err(_)) => this.progress.client_failed(),
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !*this.waiting {
                    *this.waiting = true;
                    this.progress.waiting_on_client();
                }
                let Some(timeout) = *this.timeout else {
                    return Poll::Pending;
                };
                if this.progress.is_answered() {
                    *this.sleep = None;
                    return Poll::Pending;
                }
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.progress.client_failed();
                        Poll::Ready(Some(Err(RequestBodyTimeout(timeout).into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === impl Activity ===

/// What a downstream connection is doing: when it last moved a byte or a request,
/// and how many requests are in flight. Shared by [`ActivityIo`] and the
/// connection's service.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last byte or request.
    last_ms: AtomicU64,
    in_flight: AtomicU64,
    /// Requests seen so far.
    requests: AtomicU64,
    /// The last write did not go through: the server still holds bytes to send.
    write_blocked: AtomicBool,
}

impl Activity {
    /// A connection that was just accepted.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
        })
    }

    /// Notes that the connection moved just now.
    pub fn touch(&self) {
        let since = clock::now().saturating_duration_since(self.start);
        let ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks a request in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// Requests seen on the connection so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Whether the last write on the connection did not go through, so that the server
    /// may still hold bytes it has to send.
    pub fn write_blocked(&self) -> bool {
        self.write_blocked.load(Ordering::Relaxed)
    }

    /// Resolves once the connection has had nothing in flight and no bytes for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        self.idle_for_and(idle, || true).await;
    }

    /// Resolves once the connection has had nothing in flight and no bytes for `idle`,
    /// and `also` holds then.
    pub async fn idle_for_and(&self, idle: Duration, also: impl Fn() -> bool) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline && self.in_flight.load(Ordering::Relaxed) == 0 && also() {
                return;
            }
            // A request in flight (or `also` not holding) keeps the connection: look
            // again one period later.
            let next = deadline.max(Instant::now() + idle.min(Duration::from_secs(1)));
            tokio::time::sleep_until(next).await;
        }
    }

    /// Notes how a write went.
    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        self.write_blocked.store(r.is_pending(), Ordering::Relaxed);
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.touch();
        }
    }
}

/// A request in flight on a connection (see [`Activity::request`]).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

pin_project_lite::pin_project! {
    /// A connection's I/O that notes every byte in its [`Activity`].
    pub struct ActivityIo<I> {
        #[pin]
        io: I,
        activity: Arc<Activity>,
    }
}

impl<I> ActivityIo<I> {
    /// Wraps `io`.
    pub fn new(io: I, activity: Arc<Activity>) -> Self {
        Self { io, activity }
    }

    /// The wrapped I/O.
    pub fn get_ref(&self) -> &I {
        &self.io
    }
}

/// I/O that knows whether its last write went through ([`HeaderTimeoutIo`] must not
/// cut a 408 into an answer still waiting to go out).
pub trait WriteState {
    /// Whether the last write did not go through.
    fn write_blocked(&self) -> bool;
}

impl<I> WriteState for ActivityIo<I> {
    fn write_blocked(&self) -> bool {
        self.activity.write_blocked()
    }
}

impl<I: AsyncRead> AsyncRead for ActivityIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<I: AsyncWrite> AsyncWrite for ActivityIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.io.poll_write(cx, buf);
        this.activity.wrote(&r);
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.io.poll_write_vectored(cx, bufs);
        this.activity.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

// === impl HeaderTimeoutIo ===

/// An HTTP/1 request head was not complete within the header timeout of its first byte.
#[derive(Debug, thiserror::Error)]
#[error("no complete request head within {0:?} of its first byte")]
pub struct RequestHeaderTimeout(pub Duration);

/// The HTTP/2 connection preface: a connection that opens with it has no HTTP/1 heads
/// to time (hyper-util's protocol detection looks for the same bytes).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long the 408 may take to go out once the header timeout passed: a client that
/// does not read it is cut off without it.
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// [`HeadPhase`]'s phases, in the low two bits of its word.
const PHASE: u64 = 0b11;
/// Waiting for the next request head.
const WAITING: u64 = 0;
/// A head is complete and its request is being answered.
const BUSY: u64 = 1;
/// No HTTP/1 heads to time: HTTP/2, or an upgraded connection.
const OFF: u64 = 2;
/// The header timeout passed and the connection answers 408 and closes.
const TIMED_OUT: u64 = 3;

/// Where a connection stands between HTTP/1 requests, shared by [`HeaderTimeoutIo`]
/// (which sees the bytes) and the connection's service (which sees each complete head
/// and the end of its answer). One word: the phase in the low two bits and the number
/// of heads so far above them, so that the I/O tells one head's wait from the next.
#[derive(Debug, Default)]
pub struct HeadPhase(AtomicU64);

impl HeadPhase {
    /// A connection that was just accepted, waiting for its first head.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A complete HTTP/1 head reached the service: no timer runs until its answer ends,
    /// when the returned guard drops.
    pub fn request(self: &Arc<Self>) -> HeadGuard {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                (word & PHASE == WAITING).then_some((((word >> 2) + 1) << 2) | BUSY)
            });
        HeadGuard(self.clone())
    }

    /// No more HTTP/1 heads on this connection (it speaks HTTP/2 or was upgraded).
    pub fn off(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                (word & PHASE != TIMED_OUT).then_some((word & !PHASE) | OFF)
            });
    }

    /// Whether the connection waits for its next HTTP/1 head: the last answer is over
    /// (or there was none yet), and it is neither HTTP/2, upgraded nor timed out.
    pub fn between_heads(&self) -> bool {
        self.0.load(Ordering::Relaxed) & PHASE == WAITING
    }

    /// Whether the connection was answered 408 for a head that did not arrive in time.
    pub fn timed_out(&self) -> bool {
        self.0.load(Ordering::Relaxed) & PHASE == TIMED_OUT
    }

    fn load(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Moves from `from`'s phase to `to`, unless the phase changed meanwhile.
    fn advance(&self, from: u64, to: u64) -> bool {
        self.0
            .compare_exchange(
                from,
                (from & !PHASE) | to,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }
}

/// One HTTP/1 request being answered (see [`HeadPhase::request`]). Dropped with the
/// answer's body, it starts the wait for the next head; a connection whose answer was
/// a 101 has no next head ([`HeadGuard::upgraded`]).
#[derive(Debug)]
pub struct HeadGuard(Arc<HeadPhase>);

impl HeadGuard {
    /// The answer switched protocols: what follows is no longer HTTP/1.
    pub fn upgraded(self) {
        self.0.off();
    }
}

impl Drop for HeadGuard {
    fn drop(&mut self) {
        let word = self.0.load();
        if word & PHASE == BUSY {
            self.0.advance(word, WAITING);
        }
    }
}

/// The upstream sent no response body bytes for the response body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent no response body for {0:?}")]
pub struct ResponseBodyTimeout(pub Duration);

/// How long a response body may stay silent, and what counts it when it does.
#[derive(Clone, Debug)]
pub struct ResponseIdle {
    /// The longest pause.
    pub timeout: Duration,
    /// Counts bodies cut off.
    pub count: Option<prometheus::IntCounter>,
}

pin_project_lite::pin_project! {
    /// A response body that holds its request's [`HeadGuard`] until it is dropped, which
    /// hyper does once the body is written (or the connection is gone), and fails with
    /// [`ResponseBodyTimeout`] when the upstream stalls it.
    pub struct GuardedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<HeadGuard>,
        // Shared by a connection's responses: a clone per response is a count on the
        // connection's own worker, where one of the listener's counter would bounce its
        // cache line between workers at every request.
        idle: Option<Arc<ResponseIdle>>,
        // Made at the first wait and re-armed at later ones: a streamed body pays one
        // allocation, not one per pause.
        sleep: Option<Pin<Box<Sleep>>>,
        armed: bool,
    }
}

impl<B> GuardedBody<B> {
    /// Wraps `inner`; `guard` is `None` for HTTP/2 answers, which have no heads to time;
    /// `idle` `None`: pauses are not limited.
    pub fn new(inner: B, guard: Option<HeadGuard>, idle: Option<Arc<ResponseIdle>>) -> Self {
        Self {
            inner,
            _guard: guard,
            idle,
            sleep: None,
            armed: false,
        }
    }
}

impl<B> HttpBody for GuardedBody<B>
where
    B: HttpBody,
    B::Error: From<ResponseBodyTimeout>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.armed = false;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let Some(idle) = this.idle.as_ref() else {
                    return Poll::Pending;
                };
                // Polled only when the client can take more: a slow reader is never
                // timed here, only an upstream that has nothing to send.
                let deadline = Instant::now() + idle.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !*this.armed {
                    sleep.as_mut().reset(deadline);
                    *this.armed = true;
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        let timeout = idle.timeout;
                        if let Some(c) = &idle.count {
                            c.inc();
                        }
                        tracing::debug!(?timeout, "response body stalled; cut off");
                        // Once: the body is done after its error.
                        *this.idle = None;
                        *this.sleep = None;
                        Poll::Ready(Some(Err(ResponseBodyTimeout(timeout).into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where [`HeaderTimeoutIo`] is with its own answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Not timed out.
    None,
    /// The header timeout passed; this many bytes of the 408 are written.
    Writing(usize),
    /// Written (or given up on) and the connection shut down.
    Done,
}

pin_project_lite::pin_project! {
    /// A connection's I/O that times HTTP/1 request heads: the first byte that arrives
    /// while its [`HeadPhase`] waits for a head starts the header timeout; if the
    /// service has not seen the complete head when it passes, the I/O writes `answer`
    /// (a complete `408` with `connection: close`), shuts the connection down and fails
    /// the read with [`RequestHeaderTimeout`], which ends hyper's connection. A read
    /// costs one atomic load (and a clock read for a head's first bytes); the timer is
    /// set only once hyper waits for more bytes of a started head, so a head that
    /// arrives whole, or an HTTP/2 connection, never touches it, and it is allocated
    /// once per connection at most.
    ///
    /// The phase comes from the service, not from parsing, so two rare cases are
    /// approximate: a pipelined head that arrived while the previous answer was going
    /// out is timed from the next byte after that answer (a client that then sends
    /// nothing is merely idle), and request body bytes still arriving after the whole
    /// answer was sent count as a head (a body that then pauses past the header timeout
    /// is cut off with the 408 after its answer instead of being read on).
    pub struct HeaderTimeoutIo<I> {
        #[pin]
        io: I,
        phase: Arc<HeadPhase>,
        timeout: Duration,
        answer: Bytes,
        sleep: Option<Pin<Box<Sleep>>>,
        // The phase word of the head being timed, and its deadline.
        armed: Option<(u64, Instant)>,
        // Bytes of the HTTP/2 preface seen so far; `u8::MAX` once it is HTTP/1.
        preface: u8,
        state: Answer,
    }
}

impl<I> HeaderTimeoutIo<I> {
    /// The wrapped I/O.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// Wraps `io`, answering `answer` when a head takes longer than `timeout`.
    pub fn new(io: I, phase: Arc<HeadPhase>, timeout: Duration, answer: Bytes) -> Self {
        Self {
            io,
            phase,
            timeout,
            answer,
            sleep: None,
            armed: None,
            preface: 0,
            state: Answer::None,
        }
    }
}

impl<I: AsyncRead + AsyncWrite + WriteState> HeaderTimeoutIo<I> {
    /// Notes bytes that just arrived: the first of a head starts its timer, and a
    /// complete HTTP/2 preface turns the timer off for good.
    fn arrived(self: Pin<&mut Self>, bytes: &[u8]) {
        let this = self.project();
        let word = this.phase.load();
        if word & PHASE == WAITING && this.armed.is_none_or(|(w, _)| w != word) {
            *this.armed = Some((word, clock::now() + *this.timeout));
        }
        let seen = usize::from(*this.preface);
        if seen < H2_PREFACE.len() {
            let n = bytes.len().min(H2_PREFACE.len() - seen);
            if bytes[..n] == H2_PREFACE[seen..seen + n] {
                *this.preface += n as u8;
                if usize::from(*this.preface) == H2_PREFACE.len() {
                    this.phase.off();
                    *this.armed = None;
                }
            } else {
                *this.preface = u8::MAX;
            }
        }
    }

    /// hyper waits for more bytes: has the started head run out of time?
    fn expired(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let this = self.project();
        let Some((armed, deadline)) = *this.armed else {
            return false;
        };
        if this.phase.load() != armed {
            // The head completed (or the connection turned out not to be HTTP/1).
            *this.armed = None;
            return false;
        }
        let sleep = match this.sleep {
            Some(sleep) => {
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => this
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        if sleep.as_mut().poll(cx).is_pending() || !this.phase.advance(armed, TIMED_OUT) {
            return false;
        }
        *this.armed = None;
        sleep
            .as_mut()
            .reset(Instant::now() + ANSWER_GRACE.min(*this.timeout));
        // hyper's last write did not go through: part of its answer may still wait in
        // its buffer, and a 408 written now would cut into it.
        *this.state = if this.io.write_blocked() {
            Answer::Done
        } else {
            Answer::Writing(0)
        };
        true
    }

    /// Writes the 408 and shuts the connection down, then fails the read.
    fn poll_answer(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        let timed_out = || {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                RequestHeaderTimeout(*this.timeout),
            )))
        };
        loop {
            let step = match *this.state {
                Answer::None | Answer::Done => return timed_out(),
                Answer::Writing(n) if n < this.answer.len() => {
                    this.io.as_mut().poll_write(cx, &this.answer[n..])
                }
                Answer::Writing(_) => this.io.as_mut().poll_shutdown(cx).map_ok(|()| 0),
            };
            match step {
                Poll::Ready(Ok(written)) if written > 0 => {
                    if let Answer::Writing(n) = this.state {
                        *n += written;
                    }
                }
                // Shut down (or the peer takes no more): done either way.
                Poll::Ready(_) => {
                    *this.state = Answer::Done;
                    return timed_out();
                }
                Poll::Pending => {
                    let gave_up = this
                        .sleep
                        .as_mut()
                        .is_none_or(|s| s.as_mut().poll(cx).is_ready());
                    if gave_up {
                        *this.state = Answer::Done;
                        return timed_out();
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<I: AsyncRead + AsyncWrite + WriteState> AsyncRead for HeaderTimeoutIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.state != Answer::None {
            return self.poll_answer(cx);
        }
        let before = buf.filled().len();
        match self.as_mut().project().io.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let bytes = &buf.filled()[before..];
                if !bytes.is_empty() && self.phase.load() & PHASE != OFF {
                    self.as_mut().arrived(bytes);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if self.as_mut().expired(cx) {
                    return self.poll_answer(cx);
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl<I: AsyncWrite> AsyncWrite for HeaderTimeoutIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    type Chunk = Result<Frame<Bytes>, std::convert::Infallible>;

    fn channel_body() -> (
        mpsc::Sender<Chunk>,
        impl HttpBody<Data = Bytes, Error = std::convert::Infallible>,
    ) {
        let (tx, rx) = mpsc::channel::<Chunk>(4);
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
            );
        (tx, StreamBody::new(stream))
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_body_fails_after_the_timeout_and_not_before() {
        let (tx, inner) = channel_body();
        let (body, _answered) = BodyTimeout::new(inner, Some(Duration::from_secs(10)));
        let mut body = std::pin::pin!(body);
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // Each frame restarts the clock: 9 s pauses never trip it.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(9)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"b"))))
                .await
                .unwrap();
            assert!(body.frame().await.unwrap().is_ok());
        }
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<RequestBodyTimeout>(), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn once_answered_a_body_may_pause_freely() {
        let (tx, inner) = channel_body();
        let (body, answered) = BodyTimeout::new(inner, Some(Duration::from_secs(10)));
        let mut body = std::pin::pin!(body);
        answered.answered();
        let next = body.frame();
        let mut next = std::pin::pin!(next);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(next.as_mut().now_or_never().is_none(), "still waiting");
        tx.send(Ok(Frame::data(Bytes::from_static(b"late"))))
            .await
            .unwrap();
        assert!(next.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_bytes_and_requests() {
        let activity = Activity::new();
        let (client, server) = tokio::io::duplex(64);
        let mut io = Box::pin(ActivityIo::new(server, activity.clone()));
        let mut client = client;
        let idle = Duration::from_secs(3600);

        // Bytes 59 minutes in push the deadline back.
        tokio::time::advance(Duration::from_secs(59 * 60)).await;
        client.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await.unwrap();
        let from = Instant::now();
        activity.idle_for(idle).await;
        assert_eq!(from.elapsed(), idle);

        // A request in flight for two hours keeps it; its end starts the clock.
        let req = activity.request();
        let watch = activity.idle_for(idle);
        let mut watch = std::pin::pin!(watch);
        tokio::time::advance(Duration::from_secs(7200)).await;
        assert!(watch.as_mut().now_or_never().is_none(), "busy, not idle");
        drop(req);
        let from = Instant::now();
        watch.await;
        assert!(from.elapsed() >= idle, "{:?}", from.elapsed());
        assert!(
            from.elapsed() <= idle + Duration::from_secs(1),
            "{:?}",
            from.elapsed()
        );
    }

    const ANSWER: &[u8] =
        b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
    const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

    /// The server end as `server::serve_conn` wraps it: its activity noted below the
    /// head timer.
    type HeadTimed = HeaderTimeoutIo<ActivityIo<tokio::io::DuplexStream>>;

    fn head_timed(io: tokio::io::DuplexStream) -> (Pin<Box<HeadTimed>>, Arc<HeadPhase>) {
        let phase = HeadPhase::new();
        let io = HeaderTimeoutIo::new(
            ActivityIo::new(io, Activity::new()),
            phase.clone(),
            HEAD_TIMEOUT,
            Bytes::from_static(ANSWER),
        );
        (Box::pin(io), phase)
    }

    /// Reads what hyper would: the next bytes, or `None` if nothing comes within `wait`.
    async fn read_within<R: AsyncRead + ?Sized>(
        io: &mut Pin<Box<R>>,
        wait: Duration,
    ) -> Option<std::io::Result<Vec<u8>>> {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(wait, io.read(&mut buf)).await.ok()?;
        Some(read.map(|n| buf[..n].to_vec()))
    }

    /// Nothing is read (no bytes, no answer, no error) for an hour of paused time.
    async fn assert_silent_for_an_hour<R: AsyncRead + ?Sized>(io: &mut Pin<Box<R>>) {
        let read = read_within(io, Duration::from_secs(3600)).await;
        assert!(read.is_none(), "{read:?}");
    }

    async fn read_to_end(client: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.unwrap();
        all
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_head_is_answered_408_at_its_deadline_and_closed() {
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut io, phase) = head_timed(server);
        // No byte for an hour: idle, which is not this timer's business.
        assert_silent_for_an_hour(&mut io).await;

        client.write_all(b"GET / HT").await.unwrap();
        let got = read_within(&mut io, Duration::ZERO).await.unwrap().unwrap();
        assert_eq!(got, b"GET / HT");
        let started = Instant::now();
        let err = read_within(&mut io, Duration::from_secs(3600))
            .await
            .expect("the head times out")
            .unwrap_err();
        assert_eq!(started.elapsed(), HEAD_TIMEOUT);
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            err.get_ref()
                .is_some_and(|e| e.is::<RequestHeaderTimeout>()),
            "{err}"
        );
        assert!(phase.timed_out());
        assert_eq!(
            read_to_end(&mut client).await,
            ANSWER,
            "the 408, then the end"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_head_is_cut_off_one_timeout_after_its_first_byte() {
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut io, _phase) = head_timed(server);
        // One byte every 3 s: each keeps the connection busy, none restarts the timer.
        let trickle = tokio::spawn(async move {
            for b in b"GET /slowly HTTP/1.1\r\n" {
                if client.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            client
        });
        let first = read_within(&mut io, Duration::from_secs(3600))
            .await
            .unwrap()
            .unwrap();
        let started = Instant::now();
        let mut bytes = first.len();
        let err = loop {
            match read_within(&mut io, Duration::from_secs(3600))
                .await
                .unwrap()
            {
                Ok(got) => bytes += got.len(),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), HEAD_TIMEOUT);
        assert_eq!(bytes, 4, "bytes at 0, 3, 6 and 9 s");
        drop(io);
        let mut client = trickle.await.unwrap();
        assert!(read_to_end(&mut client).await.starts_with(b"HTTP/1.1 408"));
    }

    #[tokio::test(start_paused = true)]
    async fn each_head_gets_its_own_timer_and_answers_stop_it() {
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut io, phase) = head_timed(server);
        // A whole head in one read, answered at once, 9 s after which the next head
        // starts: its deadline is 10 s from its own first byte, not the first head's.
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        read_within(&mut io, Duration::ZERO).await.unwrap().unwrap();
        drop(phase.request());
        tokio::time::advance(Duration::from_secs(9)).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        read_within(&mut io, Duration::ZERO).await.unwrap().unwrap();
        let started = Instant::now();
        let err = read_within(&mut io, Duration::from_secs(3600))
            .await
            .expect("the second head times out")
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), HEAD_TIMEOUT);

        // A head complete in time, then a slow answer, then a quiet connection.
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut io, phase) = head_timed(server);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        read_within(&mut io, Duration::ZERO).await.unwrap().unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        client.write_all(b"host: a\r\n\r\n").await.unwrap();
        read_within(&mut io, Duration::ZERO).await.unwrap().unwrap();
        // The head was complete in time: the service has it, and a slow answer is fine.
        let guard = phase.request();
        assert_silent_for_an_hour(&mut io).await;
        // The answer ended; a quiet keep-alive connection is idle, not late.
        drop(guard);
        assert_silent_for_an_hour(&mut io).await;
        // The next head's first byte starts a timer of its own.
        client.write_all(b"G").await.unwrap();
        read_within(&mut io, Duration::ZERO).await.unwrap().unwrap();
        let started = Instant::now();
        let err = read_within(&mut io, Duration::from_secs(3600))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), HEAD_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_and_upgraded_connections_have_no_heads_to_time() {
        // The HTTP/2 preface, in two reads, then a quiet client.
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut io, phase) = head_timed(server);
        client.write_all(&H2_PREFACE[..10]).await.unwrap();
        read_within(&mut io, Duration::ZERO).await.unwrap().unwrap();
        client.write_all(&H2_PREFACE[10..]).await.unwrap();
        read_within(&mut io, Duration::ZERO).await.unwrap().unwrap();
        assert_silent_for_an_hour(&mut io).await;
        assert!(!phase.timed_out());

        // An answered upgrade: what follows is a tunnel.
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut io, phase) = head_timed(server);
        phase.request().upgraded();
        client.write_all(b"\x81\x05hel").await.unwrap();
        read_within(&mut io, Duration::ZERO).await.unwrap().unwrap();
        assert_silent_for_an_hour(&mut io).await;
        assert!(!phase.timed_out());
    }

    #[tokio::test(start_paused = true)]
    async fn a_408_never_cuts_into_an_answer_still_queued() {
        let (mut client, server) = tokio::io::duplex(16);
        let (mut io, phase) = head_timed(server);
        // The client reads nothing: the last answer's tail waits to be written.
        let tail = [b'x'; 32];
        assert!(io.write_all(&tail).now_or_never().is_none());
        client.write_all(b"GE").await.unwrap();
        read_within(&mut io, Duration::ZERO).await.unwrap().unwrap();
        // The client reads all along, so the pipe has room again when the head times
        // out: only the rule, not a full pipe, keeps the 408 out.
        let timed_out = async move {
            let read = read_within(&mut io, Duration::from_secs(3600)).await;
            drop(io);
            read
        };
        let (read, seen) = tokio::join!(timed_out, read_to_end(&mut client));
        let err = read.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(phase.timed_out());
        assert_eq!(seen, [b'x'; 16], "no 408 spliced in");
    }

    #[test]
    fn a_timed_body_tells_its_end_and_size_as_the_body_it_wraps() {
        let (body, _) = BodyTimeout::new(
            Full::new(Bytes::from_static(b"four")),
            Some(Duration::from_secs(1)),
        );
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(4));
        let (body, _) = BodyTimeout::new(Empty::<Bytes>::new(), Some(Duration::from_secs(1)));
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));

        let guarded = GuardedBody::new(crate::body::full("four"), None, None);
        assert!(!guarded.is_end_stream());
        assert_eq!(guarded.size_hint().exact(), Some(4));
        let guarded = GuardedBody::new(crate::body::empty(), None, None);
        assert!(guarded.is_end_stream());
        assert_eq!(guarded.size_hint().exact(), Some(0));
    }

    #[tokio::test]
    async fn a_guarded_body_yields_its_frames_and_frees_the_connection_when_dropped() {
        let phase = HeadPhase::new();
        let guard = phase.request();
        let body = GuardedBody::new(crate::body::full("answer"), Some(guard), None);
        assert!(!phase.between_heads(), "answering");
        let mut body = Box::pin(body);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "answer");
        assert!(body.frame().await.is_none());
        assert!(!phase.between_heads(), "held until the body is dropped");
        drop(body);
        assert!(phase.between_heads());
    }

    /// A body whose frames come when a test sends them.
    struct Streamed(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>);

    impl HttpBody for Streamed {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_body_is_cut_off_once_the_upstream_stalls_it_past_the_timeout() {
        let timeout = Duration::from_secs(5);
        let count = prometheus::IntCounter::new("cut", "cut").unwrap();
        let idle = Arc::new(ResponseIdle {
            timeout,
            count: Some(count.clone()),
        });
        // A whole answer never makes a timer.
        let mut whole = Box::pin(GuardedBody::new(
            crate::body::full("answer"),
            None,
            Some(idle.clone()),
        ));
        assert_eq!(
            whole.frame().await.unwrap().unwrap().into_data().unwrap(),
            "answer"
        );
        assert!(whole.frame().await.is_none());
        assert!(
            whole.sleep.is_none(),
            "no timer for a body that never waited"
        );

        // Frames just inside the timeout keep it alive; the timer re-arms each time.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let mut body = Box::pin(GuardedBody::new(
            crate::body::boxed(Streamed(rx)),
            None,
            Some(idle),
        ));
        let started = Instant::now();
        for i in 0..3u8 {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout - Duration::from_millis(1)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from(vec![i])))).await;
            });
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap()[..], [i]);
        }
        assert_eq!(count.get(), 0);
        // Then silence: cut off one timeout after the last frame, counted once.
        let last = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<ResponseBodyTimeout>(), "{err}");
        assert_eq!(Instant::now() - last, timeout);
        assert!(Instant::now() - started >= timeout * 4 - Duration::from_millis(3));
        assert_eq!(count.get(), 1);
        drop(tx);
        assert!(body.frame().await.is_none(), "ended after its error");
        assert_eq!(count.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_response_body_timeout_a_stalled_body_waits() {
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let mut body = Box::pin(GuardedBody::new(
            crate::body::boxed(Streamed(rx)),
            None,
            None,
        ));
        let waited = tokio::time::timeout(Duration::from_secs(86_400), body.frame()).await;
        assert!(waited.is_err(), "still waiting a day later");
        assert!(body.sleep.is_none());
    }

    #[test]
    fn the_head_phase_counts_heads_and_leaves_http1_for_good() {
        let heads = |p: &HeadPhase| p.load() >> 2;
        let phase = HeadPhase::new();
        assert!(phase.between_heads() && !phase.timed_out());
        assert_eq!(heads(&phase), 0);

        let first = phase.request();
        assert!(!phase.between_heads());
        assert_eq!(heads(&phase), 1);
        drop(first);
        assert!(phase.between_heads());
        drop(phase.request());
        assert_eq!(heads(&phase), 2);
        assert!(phase.between_heads());

        // Upgraded: no more heads, and the count stays.
        phase.request().upgraded();
        assert!(!phase.between_heads() && !phase.timed_out());
        assert_eq!(heads(&phase), 3);
        drop(phase.request());
        assert_eq!(heads(&phase), 3, "no head is timed after an upgrade");
        assert!(!phase.between_heads());

        // HTTP/2 from the start.
        let h2 = HeadPhase::new();
        h2.off();
        assert!(!h2.between_heads() && !h2.timed_out());

        // Timed out stays timed out.
        let late = HeadPhase::new();
        assert!(late.advance(late.load(), TIMED_OUT));
        late.off();
        assert!(late.timed_out() && !late.between_heads());
        assert!(
            !late.advance(0b111, WAITING),
            "a stale word does not move it"
        );
    }

    #[tokio::test]
    async fn activity_io_counts_requests_and_passes_writes_through() {
        let activity = Activity::new();
        assert_eq!(activity.requests(), 0);
        drop(activity.request());
        let held = activity.request();
        assert_eq!(activity.requests(), 2);
        drop(held);

        let (client, server) = tokio::io::duplex(64);
        let mut io = Box::pin(ActivityIo::new(
            tokio::io::BufWriter::new(server),
            activity.clone(),
        ));
        assert!(io.is_write_vectored());
        let parts = [io::IoSlice::new(b"one "), io::IoSlice::new(b"two")];
        let n = io.write_vectored(&parts).await.unwrap();
        assert!(n > 0);
        io.flush().await.unwrap();
        drop(io);
        let mut client = client;
        let got = read_to_end(&mut client).await;
        assert_eq!(
            got,
            &b"one two"[..n],
            "written, then flushed before the drop"
        );
    }

    /// Reads on until the started head times out; how long that took.
    async fn until_timed_out(io: &mut Pin<Box<HeadTimed>>) -> Duration {
        let started = Instant::now();
        let err = read_within(io, Duration::from_secs(3600))
            .await
            .expect("the head times out")
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        started.elapsed()
    }

    /// The client sends `bytes`, which the server end reads at once.
    async fn arrive(
        client: &mut tokio::io::DuplexStream,
        io: &mut Pin<Box<HeadTimed>>,
        bytes: &[u8],
    ) {
        client.write_all(bytes).await.unwrap();
        let got = read_within(io, Duration::ZERO).await.unwrap().unwrap();
        assert_eq!(got, bytes);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_like_the_preface_is_still_timed_and_the_preface_may_bring_more() {
        // The preface's first line, then nothing: still possibly HTTP/1, still timed.
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut io, phase) = head_timed(server);
        arrive(&mut client, &mut io, &H2_PREFACE[..16]).await;
        assert_eq!(until_timed_out(&mut io).await, HEAD_TIMEOUT);
        assert!(phase.timed_out());

        // The preface's rest arriving with the first SETTINGS frame in one read.
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut io, phase) = head_timed(server);
        arrive(&mut client, &mut io, &H2_PREFACE[..10]).await;
        let mut rest = H2_PREFACE[10..].to_vec();
        rest.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00");
        arrive(&mut client, &mut io, &rest).await;
        assert_silent_for_an_hour(&mut io).await;
        assert!(!phase.timed_out() && !phase.between_heads());
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_long_after_the_last_deadline_gets_its_own() {
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut io, phase) = head_timed(server);
        arrive(&mut client, &mut io, b"GET / HT").await;
        // hyper waits for the rest of the first head: its timer runs.
        assert!(read_within(&mut io, HEAD_TIMEOUT / 2).await.is_none());
        arrive(&mut client, &mut io, b"TP/1.1\r\n\r\n").await;
        drop(phase.request());
        // Idle between requests, long past the first head's deadline.
        assert_silent_for_an_hour(&mut io).await;

        arrive(&mut client, &mut io, b"GET /2 H").await;
        assert_eq!(
            until_timed_out(&mut io).await,
            HEAD_TIMEOUT,
            "its own deadline, not the first's"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_408_the_client_does_not_read_is_given_up_after_the_grace() {
        let (mut client, server) = tokio::io::duplex(8);
        let (mut io, phase) = head_timed(server);
        arrive(&mut client, &mut io, b"GET / HT").await;
        assert_eq!(
            until_timed_out(&mut io).await,
            HEAD_TIMEOUT + ANSWER_GRACE,
            "eight bytes of the 408 fit, the rest waits for the grace"
        );
        assert!(phase.timed_out());
        drop(io);
        assert_eq!(read_to_end(&mut client).await, ANSWER[..8]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_timer_passes_writes_flushes_and_shutdowns_through() {
        let (client, server) = tokio::io::duplex(64);
        let mut io = Box::pin(HeaderTimeoutIo::new(
            ActivityIo::new(tokio::io::BufWriter::new(server), Activity::new()),
            HeadPhase::new(),
            HEAD_TIMEOUT,
            Bytes::from_static(ANSWER),
        ));
        assert!(io.is_write_vectored());
        let parts = [io::IoSlice::new(b"one "), io::IoSlice::new(b"two")];
        let n = io.write_vectored(&parts).await.unwrap();
        assert!(n > 0);
        io.flush().await.unwrap();
        let mut client = client;
        let mut got = vec![0u8; n];
        // Paused time: bytes a flush never pushed out fail the test at once.
        tokio::time::timeout(Duration::from_secs(3600), client.read_exact(&mut got))
            .await
            .expect("the flush reaches the client")
            .unwrap();
        assert_eq!(got, &b"one two"[..n], "flushed through both layers");
        io.shutdown().await.unwrap();
        // Paused time: a shutdown that never reached the pipe fails at once.
        let mut end = Vec::new();
        tokio::time::timeout(Duration::from_secs(3600), client.read_to_end(&mut end))
            .await
            .expect("the shutdown reaches the client")
            .unwrap();
        assert!(end.is_empty());
    }
}
