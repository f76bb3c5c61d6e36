use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tokio::time::{Instant, advance};
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_test::mock;

use super::*;
use crate::FilterError;
use crate::extensions::Deadline;

type ReqBody = Empty<Bytes>;

fn req() -> Request<ReqBody> {
    Request::new(Empty::new())
}

fn rsp(status: u16) -> Response<Empty<Bytes>> {
    Response::builder()
        .status(status)
        .body(Empty::new())
        .unwrap()
}

fn params(consecutive: u32, open_for: u64, max_open_for: u64, probes: u32) -> BreakerParams {
    BreakerParams::from_policy(&sluice_config::CircuitBreaker {
        consecutive_failures: Some(consecutive),
        open_for: Some(sluice_config::Duration::from_secs(open_for)),
        max_open_for: Some(sluice_config::Duration::from_secs(max_open_for)),
        half_open_requests: Some(probes),
        ..Default::default()
    })
    .without_jitter()
}

/// An inner service answering each request with the next scripted status (200 when
/// the script is empty; 0 stands for a refused connection), counting calls.
#[derive(Clone)]
struct Scripted {
    script: Arc<Mutex<VecDeque<u16>>>,
    calls: Arc<AtomicUsize>,
}

impl Scripted {
    fn new() -> Self {
        Self {
            script: Arc::default(),
            calls: Arc::default(),
        }
    }
    fn push(&self, statuses: &[u16]) {
        self.script.lock().unwrap().extend(statuses);
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<ReqBody>> for Scripted {
    type Response = Response<Empty<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<ReqBody>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let status = self.script.lock().unwrap().pop_front().unwrap_or(200);
        std::future::ready(if status == 0 {
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into())
        } else {
            Ok(rsp(status))
        })
    }
}

type Upstream = mock::Mock<Request<ReqBody>, Response<Empty<Bytes>>>;
type UpstreamHandle = mock::Handle<Request<ReqBody>, Response<Empty<Bytes>>>;
type Reply = mock::SendResponse<Response<Empty<Bytes>>>;
type Sent = <Breaker<Upstream> as Service<Request<ReqBody>>>::Future;

/// A breaker over `c` in front of an upstream the test answers by hand.
fn over_mock(c: &Arc<Circuit>) -> (Breaker<Upstream>, UpstreamHandle) {
    let (mock, handle) = mock::pair();
    (BreakerLayer::new(c.clone()).layer(mock), handle)
}

/// Sends `req`: its response future and the upstream's side of it, still unanswered.
async fn sent_with(
    svc: &mut Breaker<Upstream>,
    handle: &mut UpstreamHandle,
    req: Request<ReqBody>,
) -> (Sent, Reply) {
    let f = svc.ready().await.unwrap().call(req);
    (f, handle.next_request().await.unwrap().1)
}

/// Sends one plain request, unanswered.
async fn sent(svc: &mut Breaker<Upstream>, handle: &mut UpstreamHandle) -> (Sent, Reply) {
    sent_with(svc, handle, req()).await
}

/// Sends one request the upstream answers with `status`, and waits for its response.
async fn answered(svc: &mut Breaker<Upstream>, handle: &mut UpstreamHandle, status: u16) {
    let (f, tx) = sent(svc, handle).await;
    tx.send_response(rsp(status));
    f.await.unwrap();
}

fn registry_with(p: BreakerParams) -> (BreakerRegistry, Arc<Circuit>) {
    let reg = BreakerRegistry::default();
    reg.update([("ingest", "log-v1", p)]);
    let c = reg.get("ingest", "log-v1").unwrap();
    (reg, c)
}

async fn send<S>(svc: &mut S) -> Result<StatusCode, BoxError>
where
    S: Service<Request<ReqBody>, Error = BoxError>,
    S::Response: HasStatus,
{
    let r = svc.ready().await?.call(req()).await?;
    Ok(r.status())
}

trait HasStatus {
    fn status(&self) -> StatusCode;
}
impl<B> HasStatus for Response<B> {
    fn status(&self) -> StatusCode {
        Response::status(self)
    }
}

fn is_breaker_open(e: &BoxError) -> bool {
    matches!(
        crate::find_filter_error(&**e),
        Some(FilterError::BreakerOpen { route, backend }) if route == "ingest" && backend == "log-v1"
    )
}

fn last_reason(c: &Circuit) -> String {
    c.snapshot()
        .recent_transitions
        .last()
        .unwrap()
        .reason
        .clone()
}

#[tokio::test(start_paused = true)]
async fn closed_to_open_on_consecutive_failures() {
    let (_reg, c) = registry_with(params(3, 10, 60, 1));
    let inner = Scripted::new();
    let mut svc = BreakerLayer::new(c.clone()).layer(inner.clone());

    // A success in between resets the run.
    inner.push(&[503, 503, 200, 500, 0]);
    for _ in 0..5 {
        let _ = send(&mut svc).await;
    }
    assert_eq!(c.state(), CircuitState::Closed);
    assert_eq!(c.snapshot().consecutive_failures, 2);

    inner.push(&[502]);
    assert_eq!(send(&mut svc).await.unwrap(), StatusCode::BAD_GATEWAY);
    assert_eq!(c.state(), CircuitState::Open);
    assert!(
        last_reason(&c).contains("3 consecutive failures"),
        "{}",
        last_reason(&c)
    );

    // Open: fails fast, the inner service is not called.
    let calls = inner.calls();
    let err = send(&mut svc).await.unwrap_err();
    assert!(is_breaker_open(&err), "{err}");
    assert_eq!(inner.calls(), calls);
    let snap = c.snapshot();
    assert_eq!(snap.rejected, 1);
    assert_eq!(snap.failures, 5);
    assert_eq!(snap.successes, 1);
    assert!(snap.opened_at.is_some() && snap.next_probe_at.is_some());
    assert_eq!(snap.open_for_ms, 10_000);
}

/// The reason an operator reads on the admin's breakers names the last failure's
/// class, for errors as for statuses.
#[tokio::test(start_paused = true)]
async fn the_opening_reason_names_the_last_failures_class() {
    let (_reg, c) = registry_with(params(3, 10, 60, 1));
    let inner = Scripted::new();
    let mut svc = BreakerLayer::new(c.clone()).layer(inner.clone());
    inner.push(&[503, 0, 0]);
    for _ in 0..3 {
        let _ = send(&mut svc).await;
    }
    assert_eq!(c.state(), CircuitState::Open);
    assert_eq!(
        last_reason(&c),
        "3 consecutive failures (last: connect-failure)"
    );
}

#[tokio::test(start_paused = true)]
async fn four_xx_and_unlisted_classes_are_not_failures() {
    let mut p = params(1, 10, 60, 1);
    p.failure_on = FailureClasses::from_classes([sluice_config::FailureClass::GatewayError]);
    let (_reg, c) = registry_with(p);
    let inner = Scripted::new();
    let mut svc = BreakerLayer::new(c.clone()).layer(inner.clone());
    inner.push(&[404, 429, 500, 501]);
    for _ in 0..4 {
        let _ = send(&mut svc).await;
    }
    assert_eq!(c.state(), CircuitState::Closed);
    inner.push(&[504]);
    let _ = send(&mut svc).await;
    assert_eq!(c.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn closed_to_open_on_failure_rate_after_min_requests() {
    let p = BreakerParams::from_policy(&sluice_config::CircuitBreaker {
        failure_rate: Some(sluice_config::FailureRate {
            percent: 50,
            window: sluice_config::Duration::from_secs(10),
            min_requests: 10,
        }),
        ..Default::default()
    })
    .without_jitter();
    assert_eq!(p.consecutive_failures, None);
    let (_reg, c) = registry_with(p);
    let inner = Scripted::new();
    let mut svc = BreakerLayer::new(c.clone()).layer(inner.clone());

    // 9 requests, 7 failed: above the rate but below min-requests.
    inner.push(&[500, 500, 500, 200, 500, 500, 200, 500, 500]);
    for _ in 0..9 {
        let _ = send(&mut svc).await;
        advance(Duration::from_millis(100)).await;
    }
    assert_eq!(c.state(), CircuitState::Closed);

    // Failures older than the window fall out of it.
    advance(Duration::from_secs(11)).await;
    inner.push(&[200, 200, 200, 200, 200, 500, 500, 500, 500]);
    for _ in 0..9 {
        let _ = send(&mut svc).await;
    }
    assert_eq!(
        c.state(),
        CircuitState::Closed,
        "only 9 requests in the window"
    );
    inner.push(&[200, 500]);
    let _ = send(&mut svc).await;
    assert_eq!(c.state(), CircuitState::Closed, "4 of 10 failed");
    let _ = send(&mut svc).await;
    assert_eq!(c.state(), CircuitState::Closed, "5 of 11 failed");
    inner.push(&[500]);
    let _ = send(&mut svc).await;
    // 6 of 12 failed: 50 % reaches the threshold.
    assert_eq!(c.state(), CircuitState::Open);
    assert!(
        last_reason(&c).contains("failure rate 50%"),
        "{}",
        last_reason(&c)
    );
}

#[tokio::test(start_paused = true)]
async fn open_to_half_open_after_open_for_then_closed_when_probes_succeed() {
    let (_reg, c) = registry_with(params(1, 10, 60, 2));
    let (mock, mut handle) = mock::pair::<Request<ReqBody>, Response<Empty<Bytes>>>();
    let mut svc = BreakerLayer::new(c.clone()).layer(mock);

    let f = svc.ready().await.unwrap().call(req());
    handle
        .next_request()
        .await
        .unwrap()
        .1
        .send_response(rsp(500));
    f.await.unwrap();
    assert_eq!(c.state(), CircuitState::Open);

    advance(Duration::from_millis(9_999)).await;
    assert!(is_breaker_open(
        &svc.ready().await.unwrap().call(req()).await.unwrap_err()
    ));
    assert_eq!(c.state(), CircuitState::Open);

    advance(Duration::from_millis(1)).await;
    // Two probes are admitted, a third is refused while they are in flight.
    let p1 = svc.ready().await.unwrap().call(req());
    let (_, tx1) = handle.next_request().await.unwrap();
    assert_eq!(c.state(), CircuitState::HalfOpen);
    let p2 = svc.ready().await.unwrap().call(req());
    let (_, tx2) = handle.next_request().await.unwrap();
    let third = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    assert!(is_breaker_open(&third));

    tx1.send_response(rsp(200));
    p1.await.unwrap();
    assert_eq!(c.state(), CircuitState::HalfOpen, "one probe of two");
    tx2.send_response(rsp(204));
    p2.await.unwrap();
    assert_eq!(c.state(), CircuitState::Closed);
    let snap = c.snapshot();
    let states: Vec<_> = snap
        .recent_transitions
        .iter()
        .map(|t| (t.from, t.to))
        .collect();
    assert_eq!(
        states,
        [
            (CircuitState::Closed, CircuitState::Open),
            (CircuitState::Open, CircuitState::HalfOpen),
            (CircuitState::HalfOpen, CircuitState::Closed),
        ]
    );
    assert_eq!(snap.recent_transitions[1].reason, "open time elapsed");
    assert_eq!(snap.recent_transitions[2].reason, "2 probe(s) succeeded");
    assert_eq!(snap.transitions_total, 3);
    assert_eq!(snap.opened_at, None);
}

#[tokio::test(start_paused = true)]
async fn failed_probe_reopens_with_doubled_capped_open_time() {
    let (_reg, c) = registry_with(params(1, 10, 25, 1));
    let inner = Scripted::new();
    let mut svc = BreakerLayer::new(c.clone()).layer(inner.clone());
    inner.push(&[500]);
    let _ = send(&mut svc).await;
    assert_eq!(c.current_open_for(), Duration::from_secs(10));

    for expected in [20, 25, 25] {
        let before = c.current_open_for();
        advance(before - Duration::from_millis(1)).await;
        assert!(is_breaker_open(&send(&mut svc).await.unwrap_err()));
        advance(Duration::from_millis(1)).await;
        assert_eq!(c.state(), CircuitState::HalfOpen);
        let calls = inner.calls();
        inner.push(&[503]);
        assert_eq!(
            send(&mut svc).await.unwrap(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(inner.calls(), calls + 1, "the probe reached the backend");
        assert_eq!(c.state(), CircuitState::Open);
        assert_eq!(c.current_open_for(), Duration::from_secs(expected));
        assert_eq!(last_reason(&c), "probe failed: 5xx");
    }

    // A successful probe closes, and the next opening starts again at openFor.
    advance(c.current_open_for()).await;
    assert_eq!(send(&mut svc).await.unwrap(), StatusCode::OK);
    assert_eq!(c.state(), CircuitState::Closed);
    inner.push(&[500]);
    let _ = send(&mut svc).await;
    assert_eq!(c.current_open_for(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn open_time_is_jittered_within_bounds() {
    let mut p = params(1, 10, 60, 1);
    p.jitter = 0.1;
    let mut seen = Vec::new();
    for _ in 0..500 {
        let (_reg, c) = registry_with(p.clone());
        let inner = Scripted::new();
        inner.push(&[500]);
        let mut svc = BreakerLayer::new(c.clone()).layer(inner);
        let _ = send(&mut svc).await;
        let open = c.current_open_for();
        assert!(
            open >= Duration::from_secs(9) && open <= Duration::from_secs(11),
            "{open:?}"
        );
        seen.push(open);
    }
    // Spread over the whole ±10 %: the last 100 ms at each end (5 % of the range) is
    // reached in 500 openings (a miss at either has odds of 0.95^500, about 1e-11).
    let near = |lo: u64, hi: u64| {
        seen.iter()
            .any(|d| (lo..hi).contains(&(d.as_millis() as u64)))
    };
    assert!(near(9_000, 9_100) && near(10_900, 11_001), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn manual_open_holds_until_reset() {
    let (reg, c) = registry_with(params(5, 10, 60, 1));
    let inner = Scripted::new();
    let mut svc = BreakerLayer::new(c.clone()).layer(inner.clone());

    assert!(reg.force_open("ingest", "log-v1"));
    assert!(!reg.force_open("ingest", "nope"));
    assert_eq!(c.state(), CircuitState::Open);
    assert_eq!(last_reason(&c), "opened by operator");
    // Held open: no probe, however long we wait.
    advance(Duration::from_secs(3600)).await;
    assert!(is_breaker_open(&send(&mut svc).await.unwrap_err()));
    assert_eq!(inner.calls(), 0);
    let snap = &reg.snapshot()[0];
    assert_eq!(snap.state, CircuitState::Open);
    assert_eq!(snap.next_probe_at, None);

    assert!(reg.reset("ingest", "log-v1"));
    assert_eq!(c.state(), CircuitState::Closed);
    assert_eq!(last_reason(&c), "reset by operator");
    assert_eq!(send(&mut svc).await.unwrap(), StatusCode::OK);
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn reset_closes_an_automatically_opened_breaker_and_clears_counts() {
    let (reg, c) = registry_with(params(2, 10, 60, 1));
    let inner = Scripted::new();
    let mut svc = BreakerLayer::new(c.clone()).layer(inner.clone());
    inner.push(&[500, 500]);
    let _ = send(&mut svc).await;
    let _ = send(&mut svc).await;
    assert_eq!(c.state(), CircuitState::Open);
    reg.reset("ingest", "log-v1");
    assert_eq!(c.state(), CircuitState::Closed);
    // One more failure does not re-open: the run was cleared.
    inner.push(&[500]);
    let _ = send(&mut svc).await;
    assert_eq!(c.state(), CircuitState::Closed);
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
}

impl BreakerObserver for Recorder {
    fn on_transition(
        &self,
        route: &str,
        backend: &str,
        from: CircuitState,
        to: CircuitState,
        _: &str,
    ) {
        self.events.lock().unwrap().push(format!(
            "{route}/{backend} {}->{}",
            from.as_str(),
            to.as_str()
        ));
    }
    fn on_added(&self, route: &str, backend: &str) {
        self.events
            .lock()
            .unwrap()
            .push(format!("+{route}/{backend}"));
    }
    fn on_removed(&self, route: &str, backend: &str) {
        self.events
            .lock()
            .unwrap()
            .push(format!("-{route}/{backend}"));
    }
}

#[tokio::test(start_paused = true)]
async fn swap_keeps_state_for_same_params_and_carries_it_into_changed_ones() {
    let obs = Arc::new(Recorder::default());
    let reg = BreakerRegistry::new(obs.clone());
    let p = params(1, 10, 60, 1);
    reg.update([
        ("ingest", "log-v1", p.clone()),
        ("ingest", "log-v2", p.clone()),
        ("query", "log-v1", p.clone()),
    ]);
    assert_eq!(reg.len(), 3);
    let v1 = reg.get("ingest", "log-v1").unwrap();
    let v2 = reg.get("ingest", "log-v2").unwrap();
    v1.force_open();
    v2.force_open();

    // Same params for log-v1, new params for log-v2, `query` gone.
    let changed = params(3, 10, 60, 1);
    reg.update([
        ("ingest", "log-v1", p.clone()),
        ("ingest", "log-v2", changed.clone()),
    ]);
    assert_eq!(reg.len(), 2);
    let v1b = reg.get("ingest", "log-v1").unwrap();
    assert!(Arc::ptr_eq(&v1, &v1b), "unchanged params keep the breaker");
    assert_eq!(v1b.state(), CircuitState::Open);
    let v2b = reg.get("ingest", "log-v2").unwrap();
    assert!(!Arc::ptr_eq(&v2, &v2b));
    // Opened by hand, it stays open until reset, whatever the edit.
    assert_eq!(v2b.state(), CircuitState::Open);
    assert_eq!(v2b.snapshot().next_probe_at, None);
    assert_eq!(v2b.transitions_total(), 1);
    assert_eq!(*v2b.params(), changed);
    assert!(reg.get("query", "log-v1").is_none());

    let events = obs.events.lock().unwrap().clone();
    assert_eq!(
        events,
        [
            "+ingest/log-v1",
            "+ingest/log-v2",
            "+query/log-v1",
            "ingest/log-v1 closed->open",
            "ingest/log-v2 closed->open",
            "-query/log-v1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
    );
}

/// An edit of a breaker's settings keeps a breaker its failures opened open for the
/// time it had left, then probes under the new settings; a closed one keeps its count
/// of consecutive failures and its history.
#[tokio::test(start_paused = true)]
async fn changed_params_keep_an_opening_and_its_time_left() {
    let reg = BreakerRegistry::default();
    reg.update([("ingest", "log-v1", params(2, 10, 60, 1))]);
    let inner = Scripted::new();
    inner.push(&[500, 500]);
    let mut svc = BreakerLayer::new(reg.get("ingest", "log-v1").unwrap()).layer(inner.clone());
    for _ in 0..2 {
        assert_eq!(send(&mut svc).await.unwrap(), 500);
    }
    assert_eq!(
        reg.get("ingest", "log-v1").unwrap().state(),
        CircuitState::Open
    );
    tokio::time::advance(Duration::from_secs(4)).await;

    // openFor 10s -> 30s: the opening goes on, with the 6 s it had left.
    reg.update([("ingest", "log-v1", params(2, 30, 60, 1))]);
    let c = reg.get("ingest", "log-v1").unwrap();
    assert_eq!(c.state(), CircuitState::Open);
    let snap = c.snapshot();
    assert_eq!(snap.failures, 2);
    assert_eq!(snap.recent_transitions.len(), 1);
    let mut svc = BreakerLayer::new(c.clone()).layer(inner.clone());
    assert!(send(&mut svc).await.is_err(), "still open");
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(c.state(), CircuitState::HalfOpen);
    assert_eq!(send(&mut svc).await.unwrap(), 200);
    assert_eq!(c.state(), CircuitState::Closed);

    // Closed, one failure counted: a threshold edit keeps the count.
    inner.push(&[500]);
    assert_eq!(send(&mut svc).await.unwrap(), 500);
    reg.update([("ingest", "log-v1", params(2, 5, 60, 1))]);
    let c = reg.get("ingest", "log-v1").unwrap();
    assert_eq!(c.snapshot().consecutive_failures, 1);
    assert_eq!(c.transitions_total(), 3);
}

fn grpc_rsp(headers: &[(&str, &str)], trailers: Option<&str>) -> Response<BoxBody> {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> =
        vec![Ok(Frame::data(Bytes::from_static(b"msg")))];
    if let Some(code) = trailers {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", code.parse().unwrap());
        frames.push(Ok(Frame::trailers(t)));
    }
    let mut b = Response::builder().header("content-type", "application/grpc");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
        .unwrap()
}

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

#[tokio::test(start_paused = true)]
async fn grpc_status_counts_from_headers_at_once_and_from_trailers_at_body_end() {
    let (_reg, c) = registry_with(params(2, 10, 60, 1));
    let script: Arc<Mutex<VecDeque<Response<BoxBody>>>> = Arc::default();
    let s2 = script.clone();
    let inner = tower::service_fn(move |_: Request<ReqBody>| {
        let r = s2.lock().unwrap().pop_front().unwrap();
        async move { Ok::<_, BoxError>(r) }
    });
    let mut svc = BreakerLayer::new(c.clone()).layer(inner);

    // Trailers-only UNAVAILABLE: counted as soon as the head arrives.
    script
        .lock()
        .unwrap()
        .push_back(grpc_rsp(&[("grpc-status", "14")], None));
    let _r = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(c.snapshot().consecutive_failures, 1);

    // A status in trailers counts only when the body ends.
    script.lock().unwrap().push_back(grpc_rsp(&[], Some("13")));
    let r = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(c.snapshot().consecutive_failures, 1);
    assert_eq!(c.state(), CircuitState::Closed);
    let collected = r.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "13");
    assert_eq!(
        collected.to_bytes(),
        Bytes::from_static(b"msg"),
        "body passes unchanged"
    );
    assert_eq!(c.state(), CircuitState::Open);

    // OK in trailers is a success; a status not in the list too.
    c.reset();
    script.lock().unwrap().push_back(grpc_rsp(&[], Some("13")));
    script.lock().unwrap().push_back(grpc_rsp(&[], Some("0")));
    script.lock().unwrap().push_back(grpc_rsp(&[], Some("5")));
    for _ in 0..3 {
        let r = svc.ready().await.unwrap().call(req()).await.unwrap();
        r.into_body().collect().await.unwrap();
    }
    let snap = c.snapshot();
    assert_eq!(snap.consecutive_failures, 0);
    assert_eq!(snap.state, CircuitState::Closed);
}

/// A body watched for its gRPC status tells hyper what the upstream's tells: its
/// length (a `content-length` downstream) and when it is over.
#[tokio::test(start_paused = true)]
async fn a_watched_body_reports_its_upstreams_length_and_end() {
    let (_reg, c) = registry_with(params(2, 10, 60, 1));
    let inner = tower::service_fn(|_: Request<ReqBody>| async {
        let body: BoxBody = Full::new(Bytes::from_static(b"msg")).boxed_unsync();
        let r = Response::builder().header("content-type", "application/grpc");
        Ok::<_, BoxError>(r.body(body).unwrap())
    });
    let mut svc = BreakerLayer::new(c.clone()).layer(inner);
    let mut body = svc
        .ready()
        .await
        .unwrap()
        .call(req())
        .await
        .unwrap()
        .into_body();
    assert_eq!(
        (
            http_body::Body::size_hint(&body).exact(),
            http_body::Body::is_end_stream(&body)
        ),
        (Some(3), false)
    );
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "msg");
    assert_eq!(
        (
            http_body::Body::size_hint(&body).exact(),
            http_body::Body::is_end_stream(&body)
        ),
        (Some(0), true)
    );
    assert!(body.into_untracked().is_err(), "still watched for trailers");
}

#[tokio::test(start_paused = true)]
async fn only_a_body_still_watched_for_its_grpc_status_stays_wrapped() {
    let (_reg, c) = registry_with(params(2, 10, 60, 1));
    let answering = |rsp: fn() -> Response<BoxBody>| {
        BreakerLayer::new(c.clone()).layer(tower::service_fn(
            move |_: Request<ReqBody>| async move { Ok::<_, BoxError>(rsp()) },
        ))
    };

    // Status in the head: judged already, the body is handed back bare.
    let mut svc = answering(|| grpc_rsp(&[("grpc-status", "0")], None));
    let r = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert!(r.into_body().into_untracked().is_ok());
    // Status in the trailers: the body keeps its watch, and still counts when it ends.
    let mut svc = answering(|| grpc_rsp(&[], Some("13")));
    let r = svc.ready().await.unwrap().call(req()).await.unwrap();
    let body = r.into_body().into_untracked().expect_err("still watched");
    body.collect().await.unwrap();
    assert_eq!(c.snapshot().consecutive_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_after_its_deadline_counts_as_timeout() {
    let (_reg, c) = registry_with(params(2, 10, 60, 1));
    let (mock, mut handle) = mock::pair::<Request<ReqBody>, Response<Empty<Bytes>>>();
    let mut svc = BreakerLayer::new(c.clone()).layer(mock);

    let deadline_req = || {
        let mut r = req();
        crate::extensions::Routing::of_mut(r.extensions_mut()).deadline =
            Some(Deadline(Instant::now() + Duration::from_secs(1)));
        r
    };
    // Dropped before its deadline: cancelled, not a failure.
    let f = svc.ready().await.unwrap().call(deadline_req());
    let _pending = handle.next_request().await.unwrap();
    drop(f);
    assert_eq!(c.snapshot().failures, 0);

    // Dropped at its deadline (a per-try timeout above fired): a timeout failure.
    for _ in 0..2 {
        let f = svc.ready().await.unwrap().call(deadline_req());
        let _pending = handle.next_request().await.unwrap();
        advance(Duration::from_secs(1)).await;
        drop(f);
    }
    assert_eq!(c.state(), CircuitState::Open);
    assert_eq!(last_reason(&c), "2 consecutive failures (last: timeout)");
}

/// A try that ends in an error because the client's body failed (it stalled past the
/// body timeout, or broke its framing) is not the upstream's fault: the breaker counts
/// nothing for it, even once its deadline has passed; the same error with the body whole
/// is a failure.
#[tokio::test(start_paused = true)]
async fn a_try_the_clients_body_broke_is_not_counted() {
    let (_reg, c) = registry_with(params(1, 10, 60, 1));
    let (mut svc, mut handle) = over_mock(&c);
    let with_body = |body: &crate::extensions::BodyProgress| {
        let mut r = req();
        let routing = crate::extensions::Routing::of_mut(r.extensions_mut());
        routing.deadline = Some(Deadline(Instant::now() + Duration::from_secs(1)));
        routing.body = Some(body.clone());
        r
    };
    let reset = || std::io::Error::from(std::io::ErrorKind::ConnectionReset);

    let broken = crate::extensions::BodyProgress::new();
    let (f, tx) = sent_with(&mut svc, &mut handle, with_body(&broken)).await;
    broken.client_failed();
    advance(Duration::from_secs(2)).await;
    tx.send_error(reset());
    f.await.unwrap_err();
    let snap = c.snapshot();
    assert_eq!((c.state(), snap.failures), (CircuitState::Closed, 0));

    let whole = crate::extensions::BodyProgress::new();
    let (f, tx) = sent_with(&mut svc, &mut handle, with_body(&whole)).await;
    whole.ended();
    tx.send_error(reset());
    f.await.unwrap_err();
    assert_eq!(c.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_hands_its_slot_back() {
    let (_reg, c) = registry_with(params(1, 10, 60, 1));
    let (mut svc, mut handle) = over_mock(&c);
    answered(&mut svc, &mut handle, 500).await;
    advance(Duration::from_secs(10)).await;
    let (probe, _pending) = sent(&mut svc, &mut handle).await;
    drop(probe);
    answered(&mut svc, &mut handle, 200).await;
    assert_eq!(c.state(), CircuitState::Closed);
}

/// A probe of a half-open phase that has ended, dropped unanswered in the next one,
/// hands back no slot of the new phase: it still admits exactly its probe count.
#[tokio::test(start_paused = true)]
async fn a_probe_of_an_ended_phase_hands_back_no_slot_of_the_next() {
    let (_reg, c) = registry_with(params(1, 10, 60, 2));
    let (mut svc, mut handle) = over_mock(&c);
    answered(&mut svc, &mut handle, 500).await;
    advance(Duration::from_secs(10)).await;
    let (old, _old_pending) = sent(&mut svc, &mut handle).await;
    answered(&mut svc, &mut handle, 500).await;
    assert_eq!(c.state(), CircuitState::Open);

    advance(Duration::from_secs(20)).await;
    let _probes = [
        sent(&mut svc, &mut handle).await,
        sent(&mut svc, &mut handle).await,
    ];
    drop(old);
    assert_eq!(c.state(), CircuitState::HalfOpen);
    let third = svc.ready().await.unwrap().call(req());
    let third = tokio::time::timeout(Duration::from_secs(1), third).await;
    assert!(
        third.is_ok_and(|r| r.is_err_and(|e| is_breaker_open(&e))),
        "a third probe was admitted"
    );
}

#[tokio::test(start_paused = true)]
async fn snapshot_serialises_to_the_admin_shape() {
    let (reg, c) = registry_with(params(1, 10, 60, 1));
    c.force_open();
    let json = serde_json::to_value(reg.snapshot()).unwrap();
    let b = &json[0];
    assert_eq!(b["route"], "ingest");
    assert_eq!(b["backend"], "log-v1");
    assert_eq!(b["state"], "open");
    for key in [
        "successes",
        "failures",
        "consecutive_failures",
        "rejected",
        "transitions_total",
        "opened_at",
        "next_probe_at",
        "open_for_ms",
    ] {
        assert!(b.get(key).is_some(), "missing {key}: {b}");
    }
    let t = &b["recent_transitions"][0];
    assert_eq!(t["from"], "closed");
    assert_eq!(t["to"], "open");
    assert_eq!(t["reason"], "opened by operator");
    assert!(t["at"].as_u64().unwrap() > 0);
    assert_eq!(b["next_probe_at"], serde_json::Value::Null, "held open");
    c.reset();
    let json = serde_json::to_value(reg.snapshot()).unwrap();
    assert_eq!(json[0]["state"], "closed");

    // Opened by a failure: the next probe is open_for after the opening, wherever in
    // it the snapshot falls.
    c.acquire(None).unwrap().failure("5xx");
    advance(Duration::from_secs(4)).await;
    let snap = c.snapshot();
    let (opened, next) = (snap.opened_at.unwrap(), snap.next_probe_at.unwrap());
    assert_eq!(next - opened, 10_000, "{snap:?}");
}

#[tokio::test(start_paused = true)]
async fn transition_log_is_bounded() {
    let (_reg, c) = registry_with(params(1, 10, 60, 1));
    for _ in 0..20 {
        c.force_open();
        c.reset();
    }
    let snap = c.snapshot();
    assert_eq!(snap.recent_transitions.len(), TRANSITION_LOG_LEN);
    assert_eq!(snap.transitions_total, 40);
}

#[tokio::test(start_paused = true)]
async fn open_breaker_fails_fast_even_when_the_backend_is_never_ready() {
    let (_reg, c) = registry_with(params(1, 10, 60, 1));
    let (mock, mut handle) = mock::pair::<Request<ReqBody>, Response<Empty<Bytes>>>();
    let mut svc = BreakerLayer::new(c.clone()).layer(mock);
    let f = svc.ready().await.unwrap().call(req());
    handle
        .next_request()
        .await
        .unwrap()
        .1
        .send_response(rsp(500));
    f.await.unwrap();
    assert_eq!(c.state(), CircuitState::Open);

    handle.allow(0);
    let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    assert!(is_breaker_open(&err));
    // Ready granted while open, then the open time ends before the call: still
    // refused rather than calling an inner service that was never ready.
    let svc = svc.ready().await.unwrap();
    advance(Duration::from_secs(10)).await;
    assert!(is_breaker_open(&svc.call(req()).await.unwrap_err()));
    assert_eq!(c.snapshot().rejected, 2);
}

#[tokio::test(start_paused = true)]
async fn route_level_stack_picks_the_breaker_of_the_selected_backend() {
    let reg = BreakerRegistry::default();
    let p = params(1, 10, 60, 1);
    reg.update([("ingest", "log-v1", p.clone()), ("ingest", "log-v2", p)]);
    let v1 = reg.get("ingest", "log-v1").unwrap();
    let v2 = reg.get("ingest", "log-v2").unwrap();
    let circuits: Arc<[Option<Arc<Circuit>>]> =
        Arc::from(vec![Some(v1.clone()), Some(v2.clone()), None]);
    let inner = Scripted::new();
    let mut svc = BreakerLayer::per_backend(circuits).layer(inner.clone());
    let to = |index: usize| {
        let mut r = req();
        crate::extensions::Routing::of_mut(r.extensions_mut()).backend =
            Some(crate::extensions::SelectedBackend {
                name: Arc::from(format!("b{index}")),
                index,
            });
        r
    };
    inner.push(&[500]);
    let _ = svc.ready().await.unwrap().call(to(1)).await;
    assert_eq!(v2.state(), CircuitState::Open);
    assert_eq!(v1.state(), CircuitState::Closed);
    let err = svc.ready().await.unwrap().call(to(1)).await.unwrap_err();
    assert!(
        matches!(crate::find_filter_error(&*err), Some(FilterError::BreakerOpen { backend, .. }) if backend == "log-v2")
    );
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(to(0))
            .await
            .unwrap()
            .status(),
        200
    );
    // No breaker for index 2, and none without the extension: unguarded.
    inner.push(&[500, 500]);
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(to(2))
            .await
            .unwrap()
            .status(),
        500
    );
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(req())
            .await
            .unwrap()
            .status(),
        500
    );
    assert_eq!(inner.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn results_from_before_a_transition_change_nothing() {
    let (_reg, c) = registry_with(params(1, 10, 60, 1));
    let (mut svc, mut handle) = over_mock(&c);
    let (a, tx_a) = sent(&mut svc, &mut handle).await;
    let (b, tx_b) = sent(&mut svc, &mut handle).await;
    tx_a.send_response(rsp(500));
    a.await.unwrap();
    assert_eq!(c.state(), CircuitState::Open);
    // A success sent while closed does not close the breaker it finds open.
    tx_b.send_response(rsp(200));
    b.await.unwrap();
    assert_eq!(c.state(), CircuitState::Open);
    let snap = c.snapshot();
    assert_eq!((snap.successes, snap.failures), (1, 1));
}

/// A result carries the generation its permit was taken in: one that comes back after
/// the breaker has moved on (here a call from the closed state, and a probe from a
/// half-open phase that has since ended) is counted, but decides nothing in the
/// half-open phase it finds.
#[tokio::test(start_paused = true)]
async fn late_results_do_not_decide_a_later_half_open_phase() {
    let (_reg, c) = registry_with(params(1, 10, 60, 2));
    let (mut svc, mut handle) = over_mock(&c);
    let (slow, tx_slow) = sent(&mut svc, &mut handle).await;
    answered(&mut svc, &mut handle, 500).await;
    assert_eq!(c.state(), CircuitState::Open);

    advance(Duration::from_secs(10)).await;
    let (p1, tx1) = sent(&mut svc, &mut handle).await;
    let (p2, tx2) = sent(&mut svc, &mut handle).await;
    assert_eq!(c.state(), CircuitState::HalfOpen);
    tx_slow.send_response(rsp(500));
    slow.await.unwrap();
    assert_eq!(
        c.state(),
        CircuitState::HalfOpen,
        "a call from the closed state"
    );

    tx1.send_response(rsp(500));
    p1.await.unwrap();
    assert_eq!(c.state(), CircuitState::Open);
    advance(Duration::from_secs(20)).await;
    let (q, tx_q) = sent(&mut svc, &mut handle).await;
    assert_eq!(c.state(), CircuitState::HalfOpen);
    tx2.send_response(rsp(500));
    p2.await.unwrap();
    assert_eq!(
        c.state(),
        CircuitState::HalfOpen,
        "a probe of the phase before"
    );
    tx_q.send_response(rsp(200));
    q.await.unwrap();
    assert_eq!(c.state(), CircuitState::HalfOpen, "one probe of two");
    let snap = c.snapshot();
    assert_eq!((snap.successes, snap.failures), (1, 4));
}

/// Probes answered at once from several threads each count: compare-and-swap races
/// between them lose no success, and the breaker closes on the last.
#[test]
fn concurrent_probe_successes_all_count() {
    const PROBES: usize = 4_000;
    let mut p = params(1, 0, 0, PROBES as u32);
    p.open_for = Duration::ZERO;
    p.max_open_for = Duration::ZERO;
    for _ in 0..5 {
        let c = Arc::new(Circuit::new(
            Arc::from("ingest"),
            Arc::from("log-v1"),
            p.clone(),
            Arc::new(NoopObserver),
        ));
        c.acquire(None).unwrap().failure("5xx");
        let mut admitted: Vec<_> = (0..PROBES).map(|_| c.acquire(None).unwrap()).collect();
        assert!(c.acquire(None).is_none());
        let barrier = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            for _ in 0..4 {
                let mine: Vec<_> = admitted.drain(..PROBES / 4).collect();
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    mine.into_iter().for_each(super::circuit::Permit::success);
                });
            }
        });
        assert_eq!(c.state(), CircuitState::Closed);
        assert_eq!(c.snapshot().successes, PROBES as u64);
    }
}

#[test]
fn half_open_admits_exactly_the_probe_count_under_contention() {
    let mut p = params(1, 0, 0, 3);
    p.open_for = Duration::ZERO;
    p.max_open_for = Duration::ZERO;
    let c = Arc::new(Circuit::new(
        Arc::from("ingest"),
        Arc::from("log-v1"),
        p,
        Arc::new(NoopObserver),
    ));
    c.acquire(None).unwrap().failure("5xx");
    let admitted: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = &c;
                s.spawn(move || {
                    (0..1000)
                        .filter_map(|_| c.acquire(None))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(admitted.len(), 3);
    assert_eq!(c.state(), CircuitState::HalfOpen);
    assert_eq!(c.snapshot().rejected, 3997);
    for p in admitted {
        p.success();
    }
    assert_eq!(c.state(), CircuitState::Closed);
}

/// What an error from below counts as follows `failureOn`: timeouts only when listed,
/// connection errors only when listed, and never this proxy's own refusals.
#[test]
fn errors_count_as_failures_only_as_failure_on_lists_them() {
    use crate::classify::ErrorClass;
    use sluice_config::FailureClass;
    let mut p = params(1, 10, 60, 1);
    p.failure_on = FailureClasses::from_classes([FailureClass::ConnectFailure]);
    assert!(!p.is_failure_error(ErrorClass::Timeout));
    assert!(!p.counts_timeouts());
    assert!(p.is_failure_error(ErrorClass::ConnectFailure));
    assert!(p.is_failure_error(ErrorClass::Reset));
    p.failure_on = FailureClasses::from_classes([FailureClass::Timeout]);
    assert!(p.is_failure_error(ErrorClass::Timeout));
    assert!(p.counts_timeouts());
    assert!(!p.is_failure_error(ErrorClass::ConnectFailure));
    for own in [ErrorClass::BreakerOpen, ErrorClass::Unready] {
        assert!(!p.is_failure_error(own), "{own:?}");
    }
}
