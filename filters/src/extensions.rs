//! The request extensions the layers pass to each other and to the proxy.
//!
//! A layer that records something about a request for a layer below (or for the proxy's
//! client) does it with one of these types in the request's extensions, so layers share
//! these few types and never each other's internals:
//!
//! | type | written by | read by |
//! |---|---|---|
//! | [`PeerIdentity`] | the proxy (mTLS) | authorization, rate limit (`peerIdentity` key) |
//! | [`Routing`]`.backend` ([`SelectedBackend`]) | split, fallback | retry, breaker, balance, the proxy's client |
//! | [`Routing`]`.deadline` ([`Deadline`]) | retry (each try) | breaker |
//! | [`Routing`]`.endpoint` ([`Endpoint`]) | balance | the proxy's client |
//! | [`Routing`]`.body` ([`BodyProgress`]) | the proxy (a request body still arriving) | retry, fallback, breaker |
//! | [`RetryCount`] | the proxy (traced or logged requests) | retry |
//!
//! The three a route's stack writes for every request share one extension, [`Routing`]:
//! each extension is an allocation and a map entry of its own, and these three were
//! written, read and removed on every request.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use http::Extensions;
use tokio::time::Instant;

/// The authenticated peer of a request (its SPIFFE ID), set as a request extension by mTLS.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity(pub Arc<str>);

/// The backend the split chose, carried in [`Routing`] for the layers below.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SelectedBackend {
    /// Backend name as written in the policy.
    pub name: Arc<str>,
    /// Position of the backend in the policy's `backends`, in file order.
    pub index: usize,
}

/// The instant at which whoever sent a request stops waiting for it.
///
/// The retry layer sets it in [`Routing`] for each try: its per-try timeout, or the
/// deadline already on the incoming request if that is earlier. A call the breaker sees
/// dropped at or after its deadline counts as a `timeout` failure; dropped earlier, as
/// cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// The address the request is to be sent to (`host:port`, IP or DNS name), carried in
/// [`Routing`] from the balancer to the proxy's connector.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint(pub Arc<str>);

/// What a route's layers decided about one request, for the layers below and the
/// proxy's client: the backend, the try's deadline and the endpoint, in one extension.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    /// The backend the split (or a fallback) chose.
    pub backend: Option<SelectedBackend>,
    /// When the sender of this try stops waiting for it.
    pub deadline: Option<Deadline>,
    /// The address the balancer chose.
    pub endpoint: Option<Endpoint>,
    /// How the client's request body is arriving, when it had not all arrived with the head.
    pub body: Option<BodyProgress>,
}

impl Routing {
    /// The request's routing, if any layer wrote some.
    pub fn of(ext: &Extensions) -> Option<&Routing> {
        ext.get::<Routing>()
    }

    /// The request's routing, added empty if no layer wrote any yet.
    pub fn of_mut(ext: &mut Extensions) -> &mut Routing {
        ext.get_or_insert_default::<Routing>()
    }

    /// The backend chosen for the request, if any.
    pub fn backend(ext: &Extensions) -> Option<&SelectedBackend> {
        Self::of(ext)?.backend.as_ref()
    }

    /// The deadline of the request's try, if any.
    pub fn deadline(ext: &Extensions) -> Option<Instant> {
        Some(Self::of(ext)?.deadline?.0)
    }

    /// The endpoint chosen for the request, if any.
    pub fn endpoint(ext: &Extensions) -> Option<&Endpoint> {
        Self::of(ext)?.endpoint.as_ref()
    }
}

/// The number of retries sent for one request. Put one into a request's extensions to
/// learn it afterwards (the proxy does so for traced requests, for `sluice.retries`):
/// every try carries a copy of the head, and clones share the count. Requests without
/// one cost nothing extra.
#[derive(Clone, Debug, Default)]
pub struct RetryCount(Arc<AtomicU32>);

impl RetryCount {
    /// A count at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Retries sent so far.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn add_one(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a client's request body is arriving, written by the proxy's request-body wrapper
/// and read by the layers that time a request, so that time spent waiting on the client
/// is not charged to the upstream.
///
/// The per-try and total timers of a request start when its body has ended (as Envoy's
/// route and per-try timeouts do): a paused upload is the client's business, bounded by
/// the proxy's request body timeout. Before that, a timer counts only while the upstream
/// has not taken a body frame the client already gave (the upstream stopped reading).
/// Requests whose body came whole with the head carry none and pay nothing for it.
#[derive(Clone, Debug)]
pub struct BodyProgress(Arc<ProgressState>);

#[derive(Debug)]
struct ProgressState {
    base: Instant,
    /// Microseconds since `base` of the last change, shifted past the flag bits.
    word: AtomicU64,
    /// The upstream answered: the request side is now a stream's own.
    answered: AtomicBool,
}

const WAITING: u64 = 0b001;
const ENDED: u64 = 0b010;
const FAILED: u64 = 0b100;
const FLAGS: u32 = 3;

impl PartialEq for BodyProgress {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for BodyProgress {}

impl Default for BodyProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl BodyProgress {
    /// A body that has not ended, its upstream not yet waiting on the client.
    pub fn new() -> Self {
        Self(Arc::new(ProgressState {
            base: crate::clock::now(),
            word: AtomicU64::new(0),
            answered: AtomicBool::new(false),
        }))
    }

    fn stamp(&self, flags: u64) {
        let micros = crate::clock::now()
            .saturating_duration_since(self.0.base)
            .as_micros();
        let micros = u64::try_from(micros).unwrap_or(u64::MAX >> FLAGS);
        self.0
            .word
            .store((micros << FLAGS) | flags, Ordering::Relaxed);
    }

    /// The upstream asked for the next frame and the client has none yet.
    pub fn waiting_on_client(&self) {
        self.stamp(WAITING);
    }

    /// The client gave a frame, which the upstream now has to take.
    pub fn frame(&self) {
        self.stamp(0);
    }

    /// The body is complete.
    pub fn ended(&self) {
        self.stamp(ENDED);
    }

    /// The client's body failed (it stalled past the body timeout, or broke its
    /// framing): whatever the request's try ends in, the upstream is not at fault.
    pub fn client_failed(&self) {
        self.0.word.fetch_or(FAILED, Ordering::Relaxed);
    }

    /// Whether the client's body failed.
    pub fn is_client_failed(&self) -> bool {
        self.0.word.load(Ordering::Relaxed) & FAILED != 0
    }

    /// Notes that the upstream answered.
    pub fn answered(&self) {
        self.0.answered.store(true, Ordering::Relaxed);
    }

    /// Whether the upstream answered.
    pub fn is_answered(&self) -> bool {
        self.0.answered.load(Ordering::Relaxed)
    }

    /// From when a timer started at `start` counts, as far as is known now: `start`, or
    /// later when the body ended or the upstream last took a frame after it; `None` while
    /// the proxy waits on the client (or the client failed), when it does not count.
    pub fn counting_from(&self, start: Instant) -> Option<Instant> {
        let word = self.0.word.load(Ordering::Relaxed);
        if word & (WAITING | FAILED) != 0 {
            return None;
        }
        let at = self.0.base + Duration::from_micros(word >> FLAGS);
        Some(start.max(at))
    }

    /// When a timer of `after` started at `start` is due, given `body` (none: at
    /// `start + after`): `Ok(())` if it is due by `now`, else `Err` with when to look again.
    pub fn due(
        body: Option<&BodyProgress>,
        start: Instant,
        after: Duration,
        now: Instant,
    ) -> Result<(), Instant> {
        let at = match body {
            None => start + after,
            Some(b) => match b.counting_from(start) {
                Some(from) => from + after,
                // Not counting: look again one period on, which keeps the deadline exact
                // once it counts again (it then lies at least that far ahead).
                None => return Err(now + after),
            },
        };
        if at <= now { Ok(()) } else { Err(at) }
    }
}

/// Polls `sleep`, armed for a timer of `after` started at `start`, until that timer is
/// due given `body`; re-arms the same `sleep` while it is not (no other timer).
pub(crate) fn poll_due(
    mut sleep: std::pin::Pin<&mut tokio::time::Sleep>,
    cx: &mut std::task::Context<'_>,
    body: Option<&BodyProgress>,
    start: Instant,
    after: Duration,
) -> std::task::Poll<()> {
    loop {
        std::task::ready!(sleep.as_mut().poll(cx));
        match BodyProgress::due(body, start, after, Instant::now()) {
            Ok(()) => return std::task::Poll::Ready(()),
            Err(again) => sleep.as_mut().reset(again),
        }
    }
}

/// `fut`'s output, or `Err(())` once a timer of `after` started at `start` is due given
/// `body` (the slow paths' form of [`poll_due`]); `fut` goes first, so that an answer
/// ready at the deadline wins.
pub(crate) async fn within<F: Future>(
    fut: F,
    body: Option<&BodyProgress>,
    start: Instant,
    after: Duration,
) -> Result<F::Output, ()> {
    let mut fut = std::pin::pin!(fut);
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(start + after));
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(cx) {
            return std::task::Poll::Ready(Ok(out));
        }
        poll_due(sleep.as_mut(), cx, body, start, after).map(|()| Err(()))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_timer_counts_from_the_body_end_and_not_while_the_client_pauses() {
        let after = Duration::from_millis(500);
        let body = BodyProgress::new();
        let start = Instant::now();
        // The upstream has the first frame and has not taken more: its time runs.
        body.frame();
        let late = start + Duration::from_secs(1);
        assert_eq!(BodyProgress::due(Some(&body), start, after, late), Ok(()));
        // Waiting on the client: not counted, look again one period on.
        body.waiting_on_client();
        assert_eq!(
            BodyProgress::due(Some(&body), start, after, late),
            Err(late + after)
        );
        // The body ends 2 s in: the timer runs from there.
        tokio::time::advance(Duration::from_secs(2)).await;
        body.ended();
        let end = Instant::now();
        assert_eq!(
            BodyProgress::due(Some(&body), start, after, end),
            Err(end + after)
        );
        assert_eq!(
            BodyProgress::due(Some(&body), start, after, end + after),
            Ok(())
        );
        // Without a body the timer runs from its start.
        assert_eq!(BodyProgress::due(None, start, after, start + after), Ok(()));
        body.client_failed();
        assert!(body.is_client_failed());
        assert_eq!(
            BodyProgress::due(Some(&body), start, after, end + after),
            Err(end + after + after),
            "a client that failed is never the upstream's timeout"
        );
    }
}
