use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use sluice_config::{GrpcCode, RetryOn};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};

use super::*;
use crate::breaker::{BreakerLayer, BreakerParams, BreakerRegistry};
use crate::extensions::Deadline;
use crate::extensions::RetryCount;
use crate::{FilterError, UpstreamError, UpstreamErrorKind};

#[derive(Clone, Copy, Debug)]
enum Step {
    Status(u16),
    RetryAfter(u16, &'static str),
    Grpc(&'static str),
    Fail(UpstreamErrorKind),
    Io(std::io::ErrorKind),
    BreakerOpen,
    Hang,
}

/// An inner service answering with scripted steps (200 once the script is empty),
/// recording when it was called and the body bytes it read.
#[derive(Clone, Default)]
struct Scripted {
    script: Arc<Mutex<VecDeque<Step>>>,
    calls: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
    trailers: Arc<Mutex<Vec<Option<HeaderMap>>>>,
    times: Arc<Mutex<Vec<Instant>>>,
    deadlines: Arc<Mutex<Vec<Option<Instant>>>>,
    /// Each try's head and the extensions the layers share, as text.
    heads: Arc<Mutex<Vec<String>>>,
    /// Read only the first frame of the body on the first call.
    partial_first_read: bool,
}

impl Scripted {
    fn with(steps: &[Step]) -> Self {
        let s = Self::default();
        s.script.lock().unwrap().extend(steps);
        s
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn gaps(&self) -> Vec<Duration> {
        let t = self.times.lock().unwrap();
        t.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

impl<B> Service<Request<ReplayBody<B>>> for Scripted
where
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Empty<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody<B>>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.times.lock().unwrap().push(Instant::now());
        self.deadlines
            .lock()
            .unwrap()
            .push(crate::extensions::Routing::deadline(req.extensions()));
        let ext = req.extensions();
        self.heads.lock().unwrap().push(format!(
            "{} {} {:?} {:?} backend={:?} peer={:?} count={:?}",
            req.method(),
            req.uri(),
            req.version(),
            req.headers(),
            crate::extensions::Routing::backend(ext),
            ext.get::<crate::extensions::PeerIdentity>(),
            ext.get::<RetryCount>().map(RetryCount::get),
        ));
        let step = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Step::Status(200));
        let bodies = self.bodies.clone();
        let trailers = self.trailers.clone();
        let partial = self.partial_first_read && n == 0;
        Box::pin(async move {
            let mut body = Box::pin(req.into_body());
            if partial {
                let first = body.frame().await.unwrap().unwrap();
                bodies.lock().unwrap().push(first.into_data().unwrap());
                drop(body);
            } else {
                let c = body.collect().await?;
                trailers.lock().unwrap().push(c.trailers().cloned());
                bodies.lock().unwrap().push(c.to_bytes());
            }
            match step {
                Step::Status(s) => Ok(Response::builder().status(s).body(Empty::new()).unwrap()),
                Step::RetryAfter(s, v) => Ok(Response::builder()
                    .status(s)
                    .header("retry-after", v)
                    .body(Empty::new())
                    .unwrap()),
                Step::Grpc(code) => Ok(Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", code)
                    .body(Empty::new())
                    .unwrap()),
                Step::Fail(kind) => Err(UpstreamError::new(kind, "boom").into()),
                Step::Io(kind) => Err(std::io::Error::from(kind).into()),
                Step::BreakerOpen => Err(FilterError::BreakerOpen {
                    route: "r".into(),
                    backend: "b".into(),
                }
                .into()),
                Step::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    unreachable!()
                }
            }
        })
    }
}

#[derive(Default)]
struct Outcomes(Mutex<Vec<RetryOutcome>>);

impl RetryObserver for Outcomes {
    fn on_outcome(&self, route: &str, backend: &str, outcome: RetryOutcome) {
        assert_eq!((route, backend), ("ingest", "log-v1"));
        self.0.lock().unwrap().push(outcome);
    }
}

impl Outcomes {
    fn count(&self, o: RetryOutcome) -> usize {
        self.0.lock().unwrap().iter().filter(|x| **x == o).count()
    }
    fn all(&self) -> Vec<RetryOutcome> {
        self.0.lock().unwrap().clone()
    }
}

fn policy(attempts: u32, on: &[RetryOn]) -> sluice_config::Retry {
    sluice_config::Retry {
        attempts,
        on: on.to_vec(),
        ..Default::default()
    }
}

fn route(p: sluice_config::Retry) -> (Arc<RouteRetry>, Arc<Outcomes>) {
    let obs = Arc::new(Outcomes::default());
    let reg = RetryRegistry::new(obs.clone());
    reg.update([("ingest", RetryParams::from_policy(&p).without_jitter())]);
    (reg.get("ingest").unwrap(), obs)
}

fn get() -> Request<Empty<Bytes>> {
    Request::new(Empty::new())
}

async fn send<S, B>(svc: &mut S, req: Request<B>) -> Result<Response<Empty<Bytes>>, BoxError>
where
    S: Service<Request<B>, Response = Response<Empty<Bytes>>, Error = BoxError>,
{
    svc.ready().await?.call(req).await
}

#[tokio::test(start_paused = true)]
async fn attempts_bound_the_number_of_tries() {
    let (r, obs) = route(policy(2, &[RetryOn::GatewayError]));
    let inner = Scripted::with(&[Step::Status(503); 10]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let rsp = send(&mut svc, get()).await.unwrap();
    assert_eq!(
        rsp.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the last try's answer"
    );
    assert_eq!(inner.calls(), 3);
    assert_eq!(
        obs.all(),
        [
            RetryOutcome::Retried,
            RetryOutcome::Retried,
            RetryOutcome::AttemptsExhausted
        ]
    );

    // A `RetryCount` in the request learns how many retries were sent.
    let (r, _) = route(policy(2, &[RetryOn::GatewayError]));
    let inner = Scripted::with(&[Step::Status(503); 10]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let count = RetryCount::new();
    let mut req = get();
    req.extensions_mut().insert(count.clone());
    send(&mut svc, req).await.unwrap();
    assert_eq!(count.get(), 2);

    // A success ends the tries early.
    let (r, _) = route(policy(2, &[RetryOn::GatewayError]));
    let inner = Scripted::with(&[Step::Status(502), Step::Status(200)]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    assert_eq!(
        send(&mut svc, get()).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_on_classes() {
    use RetryOn::*;
    use Step::*;
    let grpc = |codes: &[GrpcCode]| sluice_config::Retry {
        attempts: 1,
        grpc_statuses: codes.to_vec(),
        ..Default::default()
    };
    let status_codes = |codes: &[u16]| sluice_config::Retry {
        attempts: 1,
        status_codes: codes.to_vec(),
        ..Default::default()
    };
    let cases: Vec<(sluice_config::Retry, Step, bool)> = vec![
        (
            policy(1, &[ConnectFailure]),
            Fail(UpstreamErrorKind::ConnectFailure),
            true,
        ),
        (
            policy(1, &[ConnectFailure]),
            Io(std::io::ErrorKind::ConnectionRefused),
            true,
        ),
        (
            policy(1, &[GatewayError]),
            Fail(UpstreamErrorKind::ConnectFailure),
            false,
        ),
        (
            policy(1, &[RefusedStream]),
            Fail(UpstreamErrorKind::RefusedStream),
            true,
        ),
        (
            policy(1, &[ConnectFailure]),
            Fail(UpstreamErrorKind::RefusedStream),
            false,
        ),
        (policy(1, &[Reset]), Fail(UpstreamErrorKind::Reset), true),
        (
            policy(1, &[Reset]),
            Io(std::io::ErrorKind::ConnectionReset),
            true,
        ),
        (
            policy(1, &[ConnectFailure]),
            Fail(UpstreamErrorKind::Reset),
            false,
        ),
        (policy(1, &[GatewayError]), Status(502), true),
        (policy(1, &[GatewayError]), Status(504), true),
        (policy(1, &[GatewayError]), Status(500), false),
        (policy(1, &[ServerError]), Status(500), true),
        (policy(1, &[ServerError]), Status(404), false),
        (policy(1, &[ServerError]), Status(429), false),
        (status_codes(&[409, 429]), Status(409), true),
        (status_codes(&[409]), Status(500), false),
        (grpc(&[GrpcCode::Unavailable]), Grpc("14"), true),
        (grpc(&[GrpcCode::Unavailable]), Grpc("13"), false),
        (
            policy(1, &[ServerError, ConnectFailure, Reset, Timeout]),
            BreakerOpen,
            false,
        ),
        (policy(1, &[ServerError]), Status(200), false),
    ];
    for (i, (p, step, retried)) in cases.into_iter().enumerate() {
        let (r, _) = route(p);
        let inner = Scripted::with(&[step]);
        let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
        let _ = send(&mut svc, get()).await;
        assert_eq!(
            inner.calls(),
            if retried { 2 } else { 1 },
            "case {i}: {step:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_is_retried_only_when_listed() {
    let mut p = policy(2, &[RetryOn::Timeout]);
    p.per_try_timeout = Some(sluice_config::Duration::from_secs(1));
    let (r, _) = route(p.clone());
    let inner = Scripted::with(&[Step::Hang, Step::Hang, Step::Status(200)]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let start = Instant::now();
    assert_eq!(
        send(&mut svc, get()).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(inner.calls(), 3);
    // Two timed-out tries plus backoffs of 25 and 50 ms.
    assert_eq!(start.elapsed(), Duration::from_millis(2075));
    // Each try carries its own deadline for the breaker below.
    let deadlines = inner.deadlines.lock().unwrap().clone();
    let times = inner.times.lock().unwrap().clone();
    for (d, t) in deadlines.iter().zip(&times) {
        assert_eq!(d.unwrap(), *t + Duration::from_secs(1));
    }

    p.on = vec![RetryOn::GatewayError];
    let (r, _) = route(p);
    let inner = Scripted::with(&[Step::Hang]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(
        crate::find_filter_error(&*err),
        Some(&FilterError::Timeout(Duration::from_secs(1)))
    );
    assert_eq!(inner.calls(), 1);

    // A request that cannot be retried still gets the per-try timer.
    let inner = Scripted::with(&[Step::Hang]);
    let mut svc = RetryLayer::new(r_timeout(), "log-v1").layer(inner.clone());
    let post = Request::builder()
        .method(Method::POST)
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let err = send(&mut svc, post).await.unwrap_err();
    assert!(matches!(
        crate::find_filter_error(&*err),
        Some(FilterError::Timeout(_))
    ));
    assert_eq!(inner.calls(), 1);
    assert_eq!(inner.bodies.lock().unwrap()[0], Bytes::from_static(b"x"));
}

fn r_timeout() -> Arc<RouteRetry> {
    let mut p = policy(2, &[RetryOn::Timeout]);
    p.per_try_timeout = Some(sluice_config::Duration::from_secs(1));
    route(p).0
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_methods_need_the_opt_in() {
    let post = || {
        Request::builder()
            .method(Method::POST)
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap()
    };
    let (r, _) = route(policy(2, &[RetryOn::GatewayError]));
    let inner = Scripted::with(&[Step::Status(503); 3]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    assert_eq!(send(&mut svc, post()).await.unwrap().status(), 503);
    assert_eq!(inner.calls(), 1);
    // The same with a per-try timer, which this layer keeps for the one try: still no
    // retry, and no retry outcome to count.
    let mut p = policy(2, &[RetryOn::GatewayError]);
    p.per_try_timeout = Some(sluice_config::Duration::from_secs(1));
    let (r, obs) = route(p);
    let inner = Scripted::with(&[Step::Status(503); 3]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    assert_eq!(send(&mut svc, post()).await.unwrap().status(), 503);
    assert_eq!((inner.calls(), obs.all()), (1, vec![]));

    for m in [Method::PATCH, Method::POST] {
        let (r, _) = route(policy(2, &[RetryOn::GatewayError]));
        let inner = Scripted::with(&[Step::Status(503); 3]);
        let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
        let req = Request::builder()
            .method(m)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let _ = send(&mut svc, req).await;
        assert_eq!(inner.calls(), 1);
    }
    for m in [
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
    ] {
        let (r, _) = route(policy(1, &[RetryOn::GatewayError]));
        let inner = Scripted::with(&[Step::Status(503)]);
        let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
        let req = Request::builder()
            .method(m.clone())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let _ = send(&mut svc, req).await;
        assert_eq!(inner.calls(), 2, "{m}");
    }

    let mut p = policy(2, &[RetryOn::GatewayError]);
    p.non_idempotent = true;
    let (r, _) = route(p);
    let inner = Scripted::with(&[Step::Status(503); 3]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let _ = send(&mut svc, post()).await;
    assert_eq!(inner.calls(), 3);
}

type Chunks =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn chunked(chunks: &[&'static [u8]], trailer: Option<&'static str>) -> Chunks {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c))))
        .collect();
    if let Some(t) = trailer {
        let mut h = HeaderMap::new();
        h.insert("x-checksum", t.parse().unwrap());
        frames.push(Ok(Frame::trailers(h)));
    }
    StreamBody::new(futures_util::stream::iter(frames))
}

fn post_opt_in(attempts: u32) -> sluice_config::Retry {
    let mut p = policy(attempts, &[RetryOn::GatewayError, RetryOn::Reset]);
    p.non_idempotent = true;
    p
}

#[tokio::test(start_paused = true)]
async fn replayed_bodies_are_identical() {
    let (r, obs) = route(post_opt_in(2));
    let inner = Scripted::with(&[Step::Status(503), Step::Fail(UpstreamErrorKind::Reset)]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let req = Request::builder()
        .method(Method::POST)
        .body(chunked(&[b"hello ", b"streaming ", b"world"], Some("abc")))
        .unwrap();
    assert_eq!(send(&mut svc, req).await.unwrap().status(), StatusCode::OK);
    assert_eq!(inner.calls(), 3);
    let bodies = inner.bodies.lock().unwrap().clone();
    assert_eq!(
        bodies,
        vec![Bytes::from_static(b"hello streaming world"); 3]
    );
    let trailers = inner.trailers.lock().unwrap().clone();
    for t in trailers {
        assert_eq!(t.unwrap()["x-checksum"], "abc");
    }
    assert_eq!(obs.count(RetryOutcome::Retried), 2);
}

#[tokio::test(start_paused = true)]
async fn a_body_read_partly_by_one_try_is_replayed_whole() {
    let (r, _) = route(post_opt_in(1));
    let mut inner = Scripted::with(&[Step::Status(503)]);
    inner.partial_first_read = true;
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let req = Request::builder()
        .method(Method::POST)
        .body(chunked(&[b"one,", b"two,", b"three"], None))
        .unwrap();
    assert_eq!(send(&mut svc, req).await.unwrap().status(), StatusCode::OK);
    let bodies = inner.bodies.lock().unwrap().clone();
    assert_eq!(
        bodies,
        [
            Bytes::from_static(b"one,"),
            Bytes::from_static(b"one,two,three")
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn bodies_over_the_cap_go_once_and_the_skip_is_counted() {
    let mut p = post_opt_in(2);
    p.max_replay_bytes = Some(8);
    // A POST of `body` whose head declares its length.
    let declared = |body: &'static [u8]| {
        Request::builder()
            .method(Method::POST)
            .header("content-length", body.len())
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    };

    // Known length over the cap: no copying, counted at once.
    let (r, obs) = route(p.clone());
    let inner = Scripted::with(&[Step::Status(503); 3]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let req = declared(b"123456789");
    assert_eq!(send(&mut svc, req).await.unwrap().status(), 503);
    assert_eq!(inner.calls(), 1);
    assert_eq!(obs.all(), [RetryOutcome::SkippedBodyTooLarge]);

    // No header, but the body knows its size: the same.
    let (r, obs) = route(p.clone());
    let inner = Scripted::with(&[Step::Status(503); 3]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let req = Request::builder()
        .method(Method::POST)
        .body(Full::new(Bytes::from_static(b"123456789")))
        .unwrap();
    assert_eq!(send(&mut svc, req).await.unwrap().status(), 503);
    assert_eq!(inner.calls(), 1);
    assert_eq!(obs.all(), [RetryOutcome::SkippedBodyTooLarge]);

    // Unknown length that grows past the cap: counted when a retry is wanted.
    let (r, obs) = route(p.clone());
    let inner = Scripted::with(&[Step::Status(503); 3]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let req = Request::builder()
        .method(Method::POST)
        .body(chunked(&[b"12345", b"6789"], None))
        .unwrap();
    assert_eq!(send(&mut svc, req).await.unwrap().status(), 503);
    assert_eq!(inner.calls(), 1);
    assert_eq!(
        inner.bodies.lock().unwrap()[0],
        Bytes::from_static(b"123456789")
    );
    assert_eq!(obs.all(), [RetryOutcome::SkippedBodyTooLarge]);

    // At the cap exactly: replayed.
    let (r, _) = route(p.clone());
    let inner = Scripted::with(&[Step::Status(503)]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let req = Request::builder()
        .method(Method::POST)
        .body(chunked(&[b"1234", b"5678"], None))
        .unwrap();
    assert_eq!(send(&mut svc, req).await.unwrap().status(), 200);
    assert_eq!(inner.calls(), 2);

    // A known length at the cap exactly: replayed too.
    let (r, obs) = route(p);
    let inner = Scripted::with(&[Step::Status(503)]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let req = declared(b"12345678");
    assert_eq!(send(&mut svc, req).await.unwrap().status(), 200);
    assert_eq!(inner.calls(), 2);
    assert!(
        !obs.all().contains(&RetryOutcome::SkippedBodyTooLarge),
        "{:?}",
        obs.all()
    );

    // A route that never retries (only its per-try timer is here) skips no retry.
    let mut p = post_opt_in(0);
    p.max_replay_bytes = Some(8);
    p.per_try_timeout = Some(sluice_config::Duration::from_secs(1));
    let (r, obs) = route(p);
    let inner = Scripted::with(&[Step::Status(503)]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let req = declared(b"123456789");
    assert_eq!(send(&mut svc, req).await.unwrap().status(), 503);
    assert_eq!((inner.calls(), obs.all()), (1, vec![]));
}

#[tokio::test(start_paused = true)]
async fn breaker_open_is_never_retried() {
    let (r, obs) = route(policy(3, &[RetryOn::GatewayError, RetryOn::ConnectFailure]));
    let breakers = BreakerRegistry::default();
    let mut bp = BreakerParams::default().without_jitter();
    bp.consecutive_failures = Some(1);
    breakers.update([("ingest", "log-v1", bp)]);
    let circuit = breakers.get("ingest", "log-v1").unwrap();
    let inner = Scripted::with(&[Step::Status(503); 5]);
    let mut svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(r, "log-v1"))
        .layer(BreakerLayer::new(circuit))
        .service(inner.clone());
    let err = ServiceExt::<Request<Empty<Bytes>>>::ready(&mut svc)
        .await
        .unwrap()
        .call(get())
        .await
        .unwrap_err();
    assert!(matches!(
        crate::find_filter_error(&*err),
        Some(FilterError::BreakerOpen { .. })
    ));
    // The 503 opened the breaker; the one retry met it and stopped there.
    assert_eq!(inner.calls(), 1);
    assert_eq!(obs.all(), [RetryOutcome::Retried]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_within_the_cap() {
    let (r, obs) = route(policy(2, &[RetryOn::GatewayError]));
    let inner = Scripted::with(&[Step::RetryAfter(503, "1"), Step::Status(200)]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    assert_eq!(send(&mut svc, get()).await.unwrap().status(), 200);
    assert_eq!(inner.gaps(), [Duration::from_secs(1)]);
    assert_eq!(obs.all(), [RetryOutcome::Retried]);

    // 429 is retried only when listed, then with its Retry-After.
    let mut p = policy(2, &[]);
    p.status_codes = vec![429];
    let (r, _) = route(p);
    let inner = Scripted::with(&[Step::RetryAfter(429, "0"), Step::Status(200)]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    assert_eq!(send(&mut svc, get()).await.unwrap().status(), 200);
    assert_eq!(inner.gaps(), [Duration::ZERO]);

    // Longer than the cap, or a date: the caller gets the response.
    for v in ["5", "Wed, 21 Oct 2026 07:28:00 GMT"] {
        let (r, obs) = route(policy(2, &[RetryOn::GatewayError]));
        let inner = Scripted::with(&[Step::RetryAfter(503, v)]);
        let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
        let rsp = send(&mut svc, get()).await.unwrap();
        assert_eq!(rsp.status(), 503);
        assert_eq!(rsp.headers()["retry-after"], v);
        assert_eq!(inner.calls(), 1);
        assert_eq!(obs.all(), [RetryOutcome::RetryAfterTooLong]);
    }
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_up_to_max_and_jitter_stays_below() {
    let mut p = policy(5, &[RetryOn::GatewayError]);
    p.backoff = Some(sluice_config::Backoff {
        base: Some(sluice_config::Duration::from_millis(25)),
        max: Some(sluice_config::Duration::from_millis(150)),
        ..Default::default()
    });
    let (r, _) = route(p.clone());
    let inner = Scripted::with(&[Step::Status(502); 6]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let _ = send(&mut svc, get()).await;
    let ms: Vec<u128> = inner.gaps().iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, [25, 50, 100, 150, 150]);

    let params = RetryParams::from_policy(&p);
    assert!(params.jitter);
    for retry in 0..8 {
        let cap = RetryParams::from_policy(&p).without_jitter().backoff(retry);
        assert!(params.backoff(retry) <= cap);
    }
    let defaults = RetryParams::default();
    assert_eq!(
        (defaults.backoff_base, defaults.backoff_max),
        (Duration::from_millis(25), Duration::from_millis(250))
    );
}

#[tokio::test(start_paused = true)]
async fn budget_bounds_retries_under_a_total_outage() {
    let ratio = 0.2;
    let min_per_second = 2;
    let mut p = policy(3, &[RetryOn::GatewayError]);
    p.backoff = Some(sluice_config::Backoff {
        base: Some(sluice_config::Duration::from_millis(1)),
        max: Some(sluice_config::Duration::from_millis(4)),
        ..Default::default()
    });
    p.budget = Some(sluice_config::RetryBudget {
        ratio,
        min_per_second,
        window: Some(sluice_config::Duration::from_secs(10)),
    });
    let (r, obs) = route(p);
    let inner = Scripted::default();
    inner
        .script
        .lock()
        .unwrap()
        .extend(std::iter::repeat_n(Step::Status(503), 10_000));
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());

    // Steady load: 20 requests per second for 60 s, every try failing.
    let start = Instant::now();
    let requests = 60 * 20;
    for i in 0..requests {
        tokio::time::sleep_until(start + Duration::from_millis(50) * i).await;
        let _ = send(&mut svc, get()).await;
    }
    let seconds = start.elapsed().as_secs_f64().ceil();
    assert!(seconds <= 61.0);
    let retries = inner.calls() - requests as usize;
    let bound = ratio * f64::from(requests) + f64::from(min_per_second) * seconds;
    assert!(retries as f64 <= bound, "{retries} retries > {bound}");
    // The budget is used, not just refused: close to the bound.
    assert!(
        retries as f64 >= 0.9 * ratio * f64::from(requests),
        "{retries}"
    );
    assert_eq!(obs.count(RetryOutcome::Retried), retries);
    assert!(obs.count(RetryOutcome::BudgetExhausted) > 0);
}

#[tokio::test(start_paused = true)]
async fn swap_keeps_budgets_for_same_params() {
    let reg = RetryRegistry::default();
    let p = RetryParams::from_policy(&policy(2, &[RetryOn::GatewayError]));
    reg.update([("a", p.clone()), ("b", p.clone())]);
    let a = reg.get("a").unwrap();
    let b = reg.get("b").unwrap();
    let mut changed = p.clone();
    changed.attempts = 3;
    reg.update([("a", p.clone()), ("b", changed.clone())]);
    assert!(Arc::ptr_eq(&a, &reg.get("a").unwrap()));
    assert!(!Arc::ptr_eq(&b, &reg.get("b").unwrap()));
    assert_eq!(reg.get("b").unwrap().params(), &changed);
    reg.update([("b", changed)]);
    assert!(reg.get("a").is_none());
}

#[tokio::test(start_paused = true)]
async fn disabled_layer_passes_through() {
    let inner = Scripted::with(&[Step::Status(503)]);
    let mut svc = RetryLayer::disabled("log-v1").layer(inner.clone());
    let req = Request::builder()
        .method(Method::PUT)
        .body(Full::new(Bytes::from_static(b"abc")))
        .unwrap();
    assert_eq!(send(&mut svc, req).await.unwrap().status(), 503);
    assert_eq!(inner.calls(), 1);
    assert_eq!(inner.bodies.lock().unwrap()[0], Bytes::from_static(b"abc"));
}

#[tokio::test(start_paused = true)]
async fn no_retry_past_the_callers_deadline() {
    let mut p = policy(3, &[RetryOn::GatewayError]);
    p.backoff = Some(sluice_config::Backoff {
        base: Some(sluice_config::Duration::from_millis(100)),
        max: Some(sluice_config::Duration::from_millis(100)),
        ..Default::default()
    });
    let (r, _) = route(p);
    let inner = Scripted::with(&[Step::Status(503); 4]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let mut req = get();
    crate::extensions::Routing::of_mut(req.extensions_mut()).deadline =
        Some(Deadline(Instant::now() + Duration::from_millis(150)));
    let _ = send(&mut svc, req).await;
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn every_try_carries_the_head_and_extensions_that_came() {
    use crate::extensions::{PeerIdentity, SelectedBackend};
    let choice = SelectedBackend {
        name: Arc::from("log-v1"),
        index: 1,
    };
    let peer = PeerIdentity(Arc::from("spiffe://mesh/ns/a/sa/b"));
    // Extensions: none; the split's choice alone (kept without a copy of the map);
    // the choice beside others (the map copied).
    let alone = {
        let mut e = http::Extensions::new();
        crate::extensions::Routing::of_mut(&mut e).backend = Some(choice.clone());
        e
    };
    let beside = {
        let mut e = alone.clone();
        e.insert(peer);
        e.insert(RetryCount::new());
        e
    };
    for ext in [http::Extensions::new(), alone, beside] {
        let (r, _) = route(policy(2, &[RetryOn::GatewayError]));
        let inner = Scripted::with(&[Step::Status(503), Step::Status(502)]);
        let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
        let mut req = Request::builder()
            .method(Method::PUT)
            .uri("http://orders:8080/a?b=c")
            .header("x-one", "1")
            .header("x-two", "2")
            .header("x-one", "1b")
            .body(Full::new(Bytes::from_static(b"body")))
            .unwrap();
        let (had_choice, expect_peer) = (!ext.is_empty(), ext.len() > 1);
        *req.extensions_mut() = ext;
        let resp = send(&mut svc, req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let heads = inner.heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 3, "{heads:?}");
        for (i, h) in heads.iter().enumerate() {
            assert!(
                h.starts_with("PUT http://orders:8080/a?b=c HTTP/1.1"),
                "{h}"
            );
            // A name given twice keeps both values, in order, on every try.
            assert!(
                h.contains(r#""x-one": "1", "x-one": "1b", "x-two": "2""#),
                "{h}"
            );
            assert_eq!(
                h.contains(r#"backend=Some(SelectedBackend { name: "log-v1", index: 1 })"#),
                had_choice,
                "{h}"
            );
            assert_eq!(h.contains("spiffe://mesh/ns/a/sa/b"), expect_peer, "{h}");
            // Clones share the count: each try sees the retries sent before it.
            let count = if expect_peer {
                format!("count=Some({i})")
            } else {
                "count=None".into()
            };
            assert!(h.ends_with(&count), "{h}");
        }
        assert_eq!(*inner.bodies.lock().unwrap(), [&b"body"[..]; 3]);
    }
}

#[tokio::test(start_paused = true)]
async fn outcomes_carry_the_selected_backend() {
    #[derive(Default)]
    struct Labels(Mutex<Vec<String>>);
    impl RetryObserver for Labels {
        fn on_outcome(&self, _: &str, backend: &str, _: RetryOutcome) {
            self.0.lock().unwrap().push(backend.to_string());
        }
    }
    let obs = Arc::new(Labels::default());
    let reg = RetryRegistry::new(obs.clone());
    reg.update([(
        "ingest",
        RetryParams::from_policy(&policy(1, &[RetryOn::GatewayError])).without_jitter(),
    )]);
    let inner = Scripted::with(&[Step::Status(503)]);
    let mut svc = RetryLayer::new(reg.get("ingest").unwrap(), "fallback").layer(inner.clone());
    let mut req = get();
    crate::extensions::Routing::of_mut(req.extensions_mut()).backend =
        Some(crate::extensions::SelectedBackend {
            name: Arc::from("log-v2"),
            index: 1,
        });
    let _ = send(&mut svc, req).await;
    assert_eq!(inner.calls(), 2);
    assert_eq!(*obs.0.lock().unwrap(), ["log-v2"]);
}

/// An inner service that answers 503 at once but keeps the request body (as a
/// connection still sending it would) for `hold`.
#[derive(Clone)]
struct Holder {
    hold: Duration,
    calls: Arc<AtomicUsize>,
}

impl<B: Send + 'static> Service<Request<ReplayBody<B>>> for Holder {
    type Response = Response<Empty<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody<B>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let body = req.into_body();
        let hold = self.hold;
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            drop(body);
        });
        std::future::ready(Ok(Response::builder()
            .status(503)
            .body(Empty::new())
            .unwrap()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_still_held_below_is_waited_for_during_the_backoff_only() {
    let post = || {
        Request::builder()
            .method(Method::POST)
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap()
    };
    // Released within the 25 ms backoff: retried.
    let (r, obs) = route(post_opt_in(1));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = RetryLayer::new(r, "log-v1").layer(Holder {
        hold: Duration::from_millis(10),
        calls: calls.clone(),
    });
    let _ = send(&mut svc, post()).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        obs.all(),
        [RetryOutcome::Retried, RetryOutcome::AttemptsExhausted]
    );

    // Still held after the backoff: the response goes back, the skip is counted.
    let (r, obs) = route(post_opt_in(1));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = RetryLayer::new(r, "log-v1").layer(Holder {
        hold: Duration::from_secs(1),
        calls: calls.clone(),
    });
    assert_eq!(send(&mut svc, post()).await.unwrap().status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(obs.all(), [RetryOutcome::SkippedBodyInUse]);
}

#[tokio::test(start_paused = true)]
async fn no_retry_starts_sooner_than_backoff_min() {
    let mut p = policy(4, &[RetryOn::GatewayError]);
    p.backoff = Some(sluice_config::Backoff {
        base: Some(sluice_config::Duration::from_millis(10)),
        max: Some(sluice_config::Duration::from_millis(200)),
        min: Some(sluice_config::Duration::from_millis(50)),
    });
    let (r, _) = route(p.clone());
    let inner = Scripted::with(&[Step::Status(502); 5]);
    let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
    let _ = send(&mut svc, get()).await;
    let ms: Vec<u128> = inner.gaps().iter().map(|d| d.as_millis()).collect();
    // 10, 20 and 40 are raised to the floor; 80 is above it.
    assert_eq!(ms, [50, 50, 50, 80]);
    // With jitter, a draw below the floor is raised to it as well.
    let params = RetryParams::from_policy(&p);
    for retry in 0..100 {
        assert!(params.backoff(retry % 6) >= Duration::from_millis(50));
    }
}

/// What one request through a stack ended with: status or filter error, time taken,
/// tries sent, retry outcomes.
type Ending = (
    Result<u16, Option<FilterError>>,
    Duration,
    usize,
    Vec<RetryOutcome>,
);

/// Sends one request through a retry layer (`None`: disabled) with a total timeout of
/// `total`, either as a timeout layer above it (`above`) or enforced by the retry layer.
async fn with_total(
    p: Option<&sluice_config::Retry>,
    total: Duration,
    steps: &[Step],
    post: bool,
    above: bool,
) -> Ending {
    let (layer, obs) = match p {
        Some(p) => {
            let (r, obs) = route(p.clone());
            (RetryLayer::new(r, "log-v1"), obs)
        }
        None => (
            RetryLayer::disabled("log-v1"),
            Arc::new(Outcomes::default()),
        ),
    };
    let inner = Scripted::with(steps);
    let req: Request<Full<Bytes>> = Request::builder()
        .method(if post { Method::POST } else { Method::GET })
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let start = Instant::now();
    let res = if above {
        let mut svc =
            crate::timeout::TimeoutLayer::new(Some(total)).layer(layer.layer(inner.clone()));
        send(&mut svc, req).await
    } else {
        let mut svc = layer.with_total(Some(total)).layer(inner.clone());
        send(&mut svc, req).await
    };
    let res = res
        .map(|r| r.status().as_u16())
        .map_err(|e| crate::find_filter_error(&*e).cloned());
    (res, start.elapsed(), inner.calls(), obs.all())
}

#[tokio::test(start_paused = true)]
async fn a_total_enforced_here_ends_requests_as_a_timeout_layer_above_did() {
    let ms = Duration::from_millis;
    let mut per_try = policy(2, &[RetryOn::Timeout, RetryOn::GatewayError]);
    per_try.per_try_timeout = Some(sluice_config::Duration::from_millis(500));
    let no_per_try = policy(2, &[RetryOn::GatewayError]);
    let hang = [Step::Hang; 4];
    let cases: Vec<(Option<&sluice_config::Retry>, u64, &[Step], bool)> = vec![
        // Per-try timers fire first every time: the total never does.
        (Some(&per_try), 2000, &hang, false),
        // The total ends the second try, and the first one before its per-try timer.
        (Some(&per_try), 1000, &hang, false),
        (Some(&per_try), 400, &hang, false),
        // A tie: the per-try timeout is seen first, then the total ends the retries.
        (Some(&per_try), 500, &hang, false),
        // Answers within the total.
        (
            Some(&per_try),
            2000,
            &[Step::Status(503), Step::Status(503), Step::Status(200)],
            false,
        ),
        // A Retry-After wait the total cuts short.
        (
            Some(&per_try),
            800,
            &[Step::RetryAfter(503, "1"), Step::Status(200)],
            false,
        ),
        // Not retryable, yet timed.
        (Some(&per_try), 300, &hang, true),
        (Some(&per_try), 700, &hang, true),
        (Some(&no_per_try), 300, &hang, false),
        (
            Some(&no_per_try),
            300,
            &[Step::Status(503), Step::Hang],
            false,
        ),
        (Some(&no_per_try), 300, &hang, true),
        (None, 300, &hang, false),
        (None, 300, &[Step::Status(503)], false),
    ];
    for (i, (p, total, steps, post)) in cases.into_iter().enumerate() {
        let above = with_total(p, ms(total), steps, post, true).await;
        let here = with_total(p, ms(total), steps, post, false).await;
        assert_eq!(here.0, above.0, "case {i}: result");
        assert_eq!(here.1, above.1, "case {i}: time taken");
        assert_eq!(here.2, above.2, "case {i}: tries");
        assert_eq!(here.3, above.3, "case {i}: outcomes");
    }
    // And the figures themselves, for two of them.
    let (res, took, tries, _) = with_total(Some(&per_try), ms(1000), &hang, false, false).await;
    assert_eq!(res, Err(Some(FilterError::Timeout(ms(1000)))));
    assert_eq!((took, tries), (ms(1000), 2));
    let (res, took, tries, _) = with_total(Some(&per_try), ms(2000), &hang, false, false).await;
    assert_eq!(res, Err(Some(FilterError::Timeout(ms(500)))));
    // Three timed-out tries plus backoffs of 25 and 50 ms.
    assert_eq!((took, tries), (ms(1575), 3));
}

/// A try that failed while the client's body was broken (it stalled past the body
/// timeout, or broke its framing) is not retried: there is nothing whole to send again,
/// and the upstream was not at fault. The same answer with the body whole is retried.
#[tokio::test(start_paused = true)]
async fn a_try_the_clients_body_broke_is_not_retried() {
    for broken in [true, false] {
        let (r, obs) = route(policy(2, &[RetryOn::GatewayError]));
        let inner = Scripted::with(&[Step::Status(503)]);
        let mut svc = RetryLayer::new(r, "log-v1").layer(inner.clone());
        let progress = crate::extensions::BodyProgress::new();
        if broken {
            progress.client_failed();
        } else {
            progress.ended();
        }
        let mut req = get();
        crate::extensions::Routing::of_mut(req.extensions_mut()).body = Some(progress);
        let status = send(&mut svc, req).await.unwrap().status();
        let expected = if broken { (503, 1) } else { (200, 2) };
        assert_eq!(
            (status.as_u16(), inner.calls()),
            expected,
            "broken: {broken}"
        );
        assert_eq!(obs.count(RetryOutcome::Retried), expected.1 - 1);
    }
}
