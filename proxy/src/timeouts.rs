//! Timeouts on slow or silent clients, set by flags (`--idle-timeout`,
//! `--request-header-timeout`, `--request-body-timeout`):
//!
//! - [`Activity`] watches a downstream connection's bytes and requests: one with no
//!   request in flight and no byte either way for the idle timeout is closed, as
//!   Envoy's `idle_timeout` (default 1 h) does;
//! - the request header timeout is hyper's HTTP/1 header read timeout, set in
//!   `server.rs`;
//! - [`BodyTimeout`] wraps a request body on its way upstream: if the client sends
//!   nothing for the body timeout before the upstream has answered, the body fails
//!   with [`RequestBodyTimeout`], which ends the upstream request (freeing its
//!   connection) and is rescued as 408 `request-timeout`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;

/// The three limits, as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A connection with nothing in flight and no bytes for this long is closed.
    pub idle: Duration,
    /// An HTTP/1 request head must arrive within this.
    pub request_header: Duration,
    /// A request body may pause this long before the upstream answers.
    pub request_body: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(3600),
            request_header: Duration::from_secs(30),
            request_body: Duration::from_secs(60),
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
    /// longer than the timeout, until [`BodyTimeout::answered`]'s flag is set.
    pub struct BodyTimeout<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        sleep: Option<Pin<Box<Sleep>>>,
        answered: Arc<AtomicBool>,
    }
}

impl<B> BodyTimeout<B> {
    /// Wraps `inner`; returns the flag that, once set, lets the body pause freely
    /// (the upstream answered: a streaming call's quiet request side is its own business).
    pub fn new(inner: B, timeout: Duration) -> (Self, Arc<AtomicBool>) {
        let answered = Arc::new(AtomicBool::new(false));
        let body = Self {
            inner,
            timeout,
            sleep: None,
            answered: answered.clone(),
        };
        (body, answered)
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
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                // Activity: the next pause starts counting afresh.
                *this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if this.answered.load(Ordering::Relaxed) {
                    *this.sleep = None;
                    return Poll::Pending;
                }
                let timeout = *this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(RequestBodyTimeout(timeout).into()))),
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
}

impl Activity {
    /// A connection that was just accepted.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks a request in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// Resolves once the connection has had nothing in flight and no bytes for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline && self.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            // A request in flight keeps the connection: look again one period later.
            let next = deadline.max(Instant::now() + idle.min(Duration::from_secs(1)));
            tokio::time::sleep_until(next).await;
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
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
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
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use http_body_util::{BodyExt, StreamBody};
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
        let (body, _answered) = BodyTimeout::new(inner, Duration::from_secs(10));
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
        let (body, answered) = BodyTimeout::new(inner, Duration::from_secs(10));
        let mut body = std::pin::pin!(body);
        answered.store(true, Ordering::Relaxed);
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
}
