//! The request body the retry and fallback layers send: streamed through on the first
//! try while a copy of its chunks (up to a cap) is kept, then replayed on later tries
//! (a retry, or the request to a fallback backend).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tower::BoxError;

pin_project! {
    /// Request body of a try sent by the retry or the fallback layer.
    ///
    /// Three shapes: the original body passed straight through (a request that will
    /// not be retried); an empty body (the original had nothing in it, so nothing
    /// needs keeping); or a replaying body that first yields the chunks earlier tries
    /// read, then keeps reading the original, copying chunks until the total passes
    /// the cap (then it drops its copies: that request can no longer be replayed).
    /// When a replaying body is dropped it hands the original and the copies back to
    /// the retry loop for the next try.
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Passthrough { #[pin] body: B },
        Empty,
        Replay { state: TryState<B> },
    }
}

/// The original body and what has been copied of it, passed from try to try.
pub(crate) struct Tee<B> {
    /// The original, until it has ended.
    body: Option<Pin<Box<B>>>,
    chunks: Vec<Bytes>,
    len: u64,
    cap: u64,
    /// Copies were dropped (over the cap, or the original failed): no replay.
    unreplayable: bool,
    trailers: Option<HeaderMap>,
}

pub(crate) struct TryState<B> {
    tee: Option<Tee<B>>,
    /// Next chunk to replay.
    pos: usize,
    trailers_sent: bool,
    back: Option<oneshot::Sender<Tee<B>>>,
}

impl<B> Drop for TryState<B> {
    fn drop(&mut self) {
        if let (Some(tx), Some(tee)) = (self.back.take(), self.tee.take()) {
            let _ = tx.send(tee);
        }
    }
}

impl<B> ReplayBody<B> {
    pub(crate) fn passthrough(body: B) -> Self {
        Self {
            kind: Kind::Passthrough { body },
        }
    }

    pub(crate) fn empty() -> Self {
        Self { kind: Kind::Empty }
    }

    fn replay(tee: Tee<B>) -> (Self, oneshot::Receiver<Tee<B>>) {
        let (tx, rx) = oneshot::channel();
        let body = Self {
            kind: Kind::Replay {
                state: TryState {
                    tee: Some(tee),
                    pos: 0,
                    trailers_sent: false,
                    back: Some(tx),
                },
            },
        };
        (body, rx)
    }
}

impl<B> std::fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Empty => "empty",
            Kind::Replay { .. } => "replay",
        };
        f.debug_struct("ReplayBody").field("kind", &kind).finish()
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { body } => Poll::Ready(
                ready!(body.poll_frame(cx))
                    .map(|r| r.map(|f| f.map_data(to_bytes)).map_err(Into::into)),
            ),
            KindProj::Empty => Poll::Ready(None),
            KindProj::Replay { state } => state.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { body } => body.is_end_stream(),
            Kind::Empty => true,
            Kind::Replay { state } => state.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { body } => body.size_hint(),
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Replay { state } => state.size_hint(),
        }
    }
}

fn to_bytes<D: Buf>(mut d: D) -> Bytes {
    // Zero-copy when `D` is already `Bytes`.
    d.copy_to_bytes(d.remaining())
}

impl<B> TryState<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(tee) = self.tee.as_mut() else {
            return Poll::Ready(None);
        };
        if self.pos < tee.chunks.len() {
            self.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(tee.chunks[self.pos - 1].clone()))));
        }
        let Some(body) = tee.body.as_mut() else {
            if !self.trailers_sent
                && let Some(t) = &tee.trailers
            {
                self.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        };
        match ready!(body.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let data = to_bytes(data);
                    tee.keep(&data);
                    self.pos = tee.chunks.len();
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    if let Some(t) = frame.trailers_ref() {
                        tee.trailers = Some(t.clone());
                        tee.body = None;
                        self.trailers_sent = true;
                    }
                    Poll::Ready(Some(Ok(frame.map_data(to_bytes))))
                }
            },
            Some(Err(e)) => {
                tee.body = None;
                tee.unreplayable = true;
                tee.chunks = Vec::new();
                self.pos = 0;
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                tee.body = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.tee {
            None => true,
            Some(tee) => {
                self.pos >= tee.chunks.len()
                    && tee.body.as_ref().is_none_or(|b| b.is_end_stream())
                    && (tee.trailers.is_none() || self.trailers_sent)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let Some(tee) = &self.tee else {
            return SizeHint::with_exact(0);
        };
        let kept: u64 = tee.chunks[self.pos.min(tee.chunks.len())..]
            .iter()
            .map(|c| c.len() as u64)
            .sum();
        let rest = tee
            .body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + kept);
        if let Some(u) = rest.upper() {
            hint.set_upper(u + kept);
        }
        hint
    }
}

impl<B> Tee<B> {
    fn keep(&mut self, data: &Bytes) {
        if self.unreplayable {
            return;
        }
        self.len += data.len() as u64;
        if self.len > self.cap {
            self.unreplayable = true;
            self.chunks = Vec::new();
        } else {
            self.chunks.push(data.clone());
        }
    }
}

/// Where the retry loop gets each try's body from.
pub(crate) enum BodySource<B> {
    /// Nothing to replay: every try gets an empty body.
    Empty,
    /// The original went to the first try as is; there is no second try.
    Spent,
    /// The last try's body has it; it comes back through `rx` when dropped.
    Lent(oneshot::Receiver<Tee<B>>),
    /// Back from the last try, ready to lend again.
    Held(Tee<B>),
    /// The copies were dropped; no replay.
    TooLarge,
}

/// Whether the next try can have the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reclaim {
    Ready,
    TooLarge,
    /// The last try's body is still held below (the connection may still be sending it).
    InUse,
}

impl<B: Body> BodySource<B> {
    /// The first try's body. `replay` false: the original goes as is, no copies.
    pub(crate) fn first(body: B, replay: bool, cap: u64) -> (ReplayBody<B>, Self) {
        if body.is_end_stream() {
            return (ReplayBody::empty(), BodySource::Empty);
        }
        if !replay {
            return (ReplayBody::passthrough(body), BodySource::Spent);
        }
        let tee = Tee {
            body: Some(Box::pin(body)),
            chunks: Vec::new(),
            len: 0,
            cap,
            unreplayable: false,
            trailers: None,
        };
        let (body, rx) = ReplayBody::replay(tee);
        (body, BodySource::Lent(rx))
    }

    /// Takes the body back from the last try, waiting at most `wait` for the try to let
    /// go of it.
    pub(crate) async fn reclaim_within(&mut self, wait: std::time::Duration) -> Reclaim {
        if let BodySource::Lent(rx) = self {
            *self = match tokio::time::timeout(wait, rx).await {
                Ok(Ok(tee)) if !tee.unreplayable => BodySource::Held(tee),
                Ok(_) => BodySource::TooLarge,
                Err(_) => return Reclaim::InUse,
            };
        }
        self.reclaim()
    }

    /// Takes the body back from the last try if it has been dropped.
    pub(crate) fn reclaim(&mut self) -> Reclaim {
        if let BodySource::Lent(rx) = self {
            *self = match rx.try_recv() {
                Ok(tee) if tee.unreplayable => BodySource::TooLarge,
                Ok(tee) => BodySource::Held(tee),
                Err(oneshot::error::TryRecvError::Empty) => return Reclaim::InUse,
                // The body was dropped without handing back: it was consumed in a
                // way we cannot replay.
                Err(oneshot::error::TryRecvError::Closed) => BodySource::TooLarge,
            };
        }
        match self {
            BodySource::Empty | BodySource::Held(_) => Reclaim::Ready,
            BodySource::Spent | BodySource::TooLarge => Reclaim::TooLarge,
            BodySource::Lent(_) => Reclaim::InUse,
        }
    }

    /// The next try's body; call after [`reclaim`](Self::reclaim) said `Ready`.
    pub(crate) fn next(&mut self) -> ReplayBody<B> {
        match std::mem::replace(self, BodySource::Spent) {
            BodySource::Empty => {
                *self = BodySource::Empty;
                ReplayBody::empty()
            }
            BodySource::Held(tee) => {
                let (body, rx) = ReplayBody::replay(tee);
                *self = BodySource::Lent(rx);
                body
            }
            other => {
                *self = other;
                unreachable!("next() without a successful reclaim()")
            }
        }
    }
}

/// The body size as far as the head or the body itself tells.
pub(crate) fn known_len<B: Body>(req: &Request<B>) -> u64 {
    let hint = req.body().size_hint();
    // A body that knows its length exactly (an empty one, or hyper's under a
    // `content-length`) says all the head could; the lookup is left for the others.
    if let Some(exact) = hint.exact() {
        return exact;
    }
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    declared.max(hint.lower())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    type Frames = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
    >;

    /// "ab", "cd", then a trailer: a body that does not know its length.
    fn streamed() -> Frames {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "4".parse().unwrap());
        StreamBody::new(futures_util::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
            Ok(Frame::trailers(trailers)),
        ]))
    }

    /// What a body tells hyper before it is read: its exact length, if known, and
    /// whether it is over.
    fn told<B: Body>(b: &B) -> (Option<u64>, bool) {
        (b.size_hint().exact(), b.is_end_stream())
    }

    async fn data<B: Body<Data = Bytes> + Unpin>(b: &mut B) -> Bytes
    where
        B::Error: std::fmt::Debug,
    {
        let f = b.frame().await.unwrap().unwrap();
        f.into_data().unwrap_or_else(|_| panic!("a trailers frame"))
    }

    /// What hyper reads from a try's body before sending it (its length for a
    /// `content-length`, whether it is over before any frame) matches what the try will
    /// yield, on the first try and on every replay.
    #[tokio::test]
    async fn each_try_reports_the_length_and_end_of_what_it_has_left() {
        let (mut first, mut source) = BodySource::first(Full::new(Bytes::from("hello")), true, 64);
        assert_eq!(told(&first), (Some(5), false));
        assert_eq!(data(&mut first).await, "hello");
        assert_eq!(told(&first), (Some(0), true));
        drop(first);
        assert_eq!(source.reclaim(), Reclaim::Ready);
        let mut again = source.next();
        assert_eq!(told(&again), (Some(5), false));
        assert_eq!(data(&mut again).await, "hello");
        assert!(again.is_end_stream());

        // Unknown length, read partly by the first try: the next try knows at least
        // what was kept, and is not over until the original's trailers have gone.
        let (mut first, mut source) = BodySource::first(streamed(), true, 64);
        assert_eq!(data(&mut first).await, "ab");
        drop(first);
        assert_eq!(source.reclaim(), Reclaim::Ready);
        let mut second = source.next();
        let hint = second.size_hint();
        assert_eq!((hint.lower(), hint.upper()), (2, None));
        assert_eq!(data(&mut second).await, "ab");
        assert!(!second.is_end_stream(), "the original has more");
        assert_eq!(data(&mut second).await, "cd");
        let trailers = second.frame().await.unwrap().unwrap();
        assert!(trailers.is_trailers());
        assert!(second.is_end_stream());
        drop(second);
        assert_eq!(source.reclaim(), Reclaim::Ready);
        let mut third = source.next();
        assert_eq!(told(&third), (Some(4), false));
        assert_eq!(data(&mut third).await, "ab");
        assert_eq!(data(&mut third).await, "cd");
        assert!(!third.is_end_stream(), "the trailers are still to come");
        assert!(third.frame().await.unwrap().unwrap().is_trailers());
        assert!(third.is_end_stream());
        assert!(third.frame().await.is_none());

        // Not replayed: the original as it is; nothing at all: an empty body.
        let (once, source) = BodySource::first(Full::new(Bytes::from("hello")), false, 64);
        assert_eq!(told(&once), (Some(5), false));
        assert!(matches!(source, BodySource::Spent));
        let (none, _) = BodySource::first(Full::new(Bytes::new()), true, 64);
        assert_eq!(told(&none), (Some(0), true));
    }

    /// A body that outgrew the cap while a try read it cannot be replayed, however the
    /// retry loop takes it back.
    #[tokio::test(start_paused = true)]
    async fn a_body_over_the_cap_comes_back_unreplayable() {
        for waited in [false, true] {
            let (mut first, mut source) = BodySource::first(streamed(), true, 3);
            data(&mut first).await;
            data(&mut first).await;
            drop(first);
            let got = if waited {
                source
                    .reclaim_within(std::time::Duration::from_secs(1))
                    .await
            } else {
                source.reclaim()
            };
            assert_eq!(got, Reclaim::TooLarge, "waited: {waited}");
        }
    }

    #[test]
    fn known_len_is_the_bodys_own_or_the_declared_length() {
        let req = |body: Frames, declared: Option<&str>| {
            let mut b = Request::builder();
            if let Some(d) = declared {
                b = b.header("content-length", d);
            }
            b.body(body).unwrap()
        };
        let full = Request::new(Full::new(Bytes::from("hello")));
        assert_eq!(known_len(&full), 5);
        assert_eq!(known_len(&req(streamed(), Some(" 7 "))), 7);
        assert_eq!(known_len(&req(streamed(), Some("seven"))), 0);
        assert_eq!(known_len(&req(streamed(), None)), 0);
    }
}
