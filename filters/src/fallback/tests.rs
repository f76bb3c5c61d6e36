use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use sluice_config::{Fallback as FallbackConfig, FallbackOn, FallbackResponse};
use tower::{BoxError, Layer, ServiceExt};

use super::*;
use crate::extensions::SelectedBackend;
use crate::replay::ReplayBody;
use crate::{FilterError, UpstreamError, UpstreamErrorKind};

const BACKENDS: [&str; 2] = ["quote", "quote-cache"];

/// How the upstream of each backend behaves.
#[derive(Clone, Copy, Debug)]
enum Up {
    Ok,
    BreakerOpen,
    Refused,
    Timeout,
    Other,
}

/// What the inner stack saw: (backend, body) per call.
type Calls = Arc<Mutex<Vec<(String, Bytes)>>>;

/// The layer over a scripted inner stack.
type Svc = tower::util::BoxCloneService<
    Request<Full<Bytes>>,
    Response<Either<String, Full<Bytes>>>,
    BoxError,
>;

/// Records every fallback answer.
type Fired = Arc<Mutex<Vec<(String, String, Reason)>>>;

fn stack(cfg: FallbackConfig, primary: Up, fallback: Up, cap: u64) -> (Svc, Calls, Fired) {
    let calls: Calls = Arc::default();
    let fired: Fired = Arc::default();
    let seen = calls.clone();
    let inner = tower::service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
        let seen = seen.clone();
        async move {
            let backend = crate::extensions::Routing::backend(req.extensions())
                .unwrap()
                .clone();
            let body = req.into_body().collect().await?.to_bytes();
            seen.lock().unwrap().push((backend.name.to_string(), body));
            let up = if backend.index == 0 {
                primary
            } else {
                fallback
            };
            match up {
                Up::Ok => Ok(Response::new(format!("from {}", backend.name))),
                Up::BreakerOpen => Err(FilterError::BreakerOpen {
                    route: "shop.quote".into(),
                    backend: backend.name.to_string(),
                }
                .into()),
                Up::Refused => Err(BoxError::from(UpstreamError::new(
                    UpstreamErrorKind::ConnectFailure,
                    "refused",
                ))),
                Up::Timeout => Err(FilterError::Timeout(std::time::Duration::from_secs(1)).into()),
                Up::Other => Err(BoxError::from("protocol error")),
            }
        }
    });
    let params = FallbackParams::from_config(&cfg, BACKENDS, cap).unwrap();
    let log = fired.clone();
    let observer = move |route: &str, backend: &str, reason: Reason| {
        log.lock()
            .unwrap()
            .push((route.to_string(), backend.to_string(), reason));
    };
    let svc = FallbackLayer::new(Arc::new(params), "shop.quote", Arc::new(observer)).layer(inner);
    (Svc::new(svc), calls, fired)
}

fn to_backend(on: &[FallbackOn]) -> FallbackConfig {
    FallbackConfig {
        on: on.to_vec(),
        backend: Some("quote-cache".into()),
        response: None,
    }
}

fn to_response(on: &[FallbackOn]) -> FallbackConfig {
    FallbackConfig {
        on: on.to_vec(),
        backend: None,
        response: Some(FallbackResponse {
            status: 200,
            headers: [("content-type".to_string(), "application/json".to_string())].into(),
            body: Some(r#"{"degraded":true}"#.into()),
            grpc_status: Some(14),
            grpc_message: Some("quote degraded: 100% cached".into()),
        }),
    }
}

fn request(body: &'static str) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::from_static(body.as_bytes())));
    crate::extensions::Routing::of_mut(req.extensions_mut()).backend = Some(SelectedBackend {
        name: "quote".into(),
        index: 0,
    });
    req
}

async fn text(resp: Response<Either<String, Full<Bytes>>>) -> String {
    match resp.into_body() {
        Either::Left(s) => s,
        Either::Right(full) => {
            String::from_utf8(full.collect().await.unwrap().to_bytes().to_vec()).unwrap()
        }
    }
}

#[tokio::test]
async fn a_healthy_primary_answers_unmarked() {
    let (svc, calls, fired) = stack(to_backend(&[FallbackOn::BreakerOpen]), Up::Ok, Up::Ok, 1024);
    let resp = svc.oneshot(request("order")).await.unwrap();
    assert!(!resp.headers().contains_key(crate::reason::DEGRADED_HEADER));
    assert_eq!(text(resp).await, "from quote");
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert!(fired.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_listed_failure_goes_once_to_the_fallback_backend_with_the_body() {
    for (up, reason) in [
        (Up::BreakerOpen, Reason::BreakerOpen),
        (Up::Refused, Reason::UpstreamUnavailable),
        (Up::Timeout, Reason::Timeout),
    ] {
        let on = [
            FallbackOn::BreakerOpen,
            FallbackOn::UpstreamUnavailable,
            FallbackOn::Timeout,
        ];
        let (svc, calls, fired) = stack(to_backend(&on), up, Up::Ok, 1024);
        let resp = svc.oneshot(request("order 42")).await.unwrap();
        assert_eq!(resp.headers()["x-sluice-degraded"], reason.as_str());
        assert_eq!(text(resp).await, "from quote-cache");
        let calls = calls.lock().unwrap();
        assert_eq!(
            *calls,
            [
                ("quote".to_string(), Bytes::from("order 42")),
                ("quote-cache".to_string(), Bytes::from("order 42")),
            ]
        );
        assert_eq!(
            *fired.lock().unwrap(),
            [("shop.quote".to_string(), "quote".to_string(), reason)]
        );
    }
}

#[tokio::test]
async fn a_reason_not_listed_returns_the_original_error() {
    let (svc, calls, fired) = stack(
        to_backend(&[FallbackOn::Timeout]),
        Up::BreakerOpen,
        Up::Ok,
        1024,
    );
    let err = svc.oneshot(request("")).await.unwrap_err();
    assert!(matches!(
        crate::find_filter_error(&*err),
        Some(FilterError::BreakerOpen { .. })
    ));
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert!(fired.lock().unwrap().is_empty());
    // An error no reason names (not a transport failure) never falls back.
    let all = [
        FallbackOn::BreakerOpen,
        FallbackOn::NoHealthyEndpoint,
        FallbackOn::UpstreamUnavailable,
        FallbackOn::Timeout,
    ];
    let (svc, calls, _) = stack(to_backend(&all), Up::Other, Up::Ok, 1024);
    assert!(svc.oneshot(request("")).await.is_err());
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_failing_fallback_backend_answers_its_own_error_and_never_loops() {
    let (svc, calls, fired) = stack(
        to_backend(&[FallbackOn::BreakerOpen, FallbackOn::UpstreamUnavailable]),
        Up::BreakerOpen,
        Up::Refused,
        1024,
    );
    let err = svc.oneshot(request("x")).await.unwrap_err();
    let upstream = err
        .downcast_ref::<UpstreamError>()
        .expect("the fallback's own error");
    assert_eq!(upstream.kind, UpstreamErrorKind::ConnectFailure);
    let backends: Vec<String> = calls.lock().unwrap().iter().map(|c| c.0.clone()).collect();
    assert_eq!(backends, ["quote", "quote-cache"]);
    assert!(fired.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_body_over_the_replay_cap_is_not_sent_to_the_fallback_backend() {
    let (svc, calls, _) = stack(
        to_backend(&[FallbackOn::BreakerOpen]),
        Up::BreakerOpen,
        Up::Ok,
        4,
    );
    let err = svc.oneshot(request("longer than four")).await.unwrap_err();
    assert!(matches!(
        crate::find_filter_error(&*err),
        Some(FilterError::BreakerOpen { .. })
    ));
    assert_eq!(calls.lock().unwrap().len(), 1);
    // A static answer needs no body: it still answers.
    let (svc, _, fired) = stack(
        to_response(&[FallbackOn::BreakerOpen]),
        Up::BreakerOpen,
        Up::Ok,
        4,
    );
    let resp = svc.oneshot(request("longer than four")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["x-sluice-degraded"], "breaker-open");
    assert_eq!(text(resp).await, r#"{"degraded":true}"#);
    assert_eq!(fired.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_grpc_caller_gets_the_static_status_trailers_only() {
    let params =
        FallbackParams::from_config(&to_response(&[FallbackOn::NoHealthyEndpoint]), BACKENDS, 0)
            .unwrap();
    let err = FilterError::NoHealthyEndpoint("quote".into());
    assert_eq!(params.fires_on(&err), Some(Reason::NoHealthyEndpoint));
    let FallbackAction::Response(r) = params.action() else {
        panic!("a response fallback");
    };
    let resp = r.answer::<String>(true, Reason::NoHealthyEndpoint);
    let h = resp.headers();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(h["content-type"], "application/grpc");
    assert_eq!(h["grpc-status"], "14");
    assert_eq!(h["grpc-message"], "quote degraded: 100%25 cached");
    assert_eq!(h["x-sluice-degraded"], "no-healthy-endpoint");
    assert_eq!(text(resp).await, "");
}

/// With the route's total enforced here, a primary answering within it answers; one
/// slower than it is cut at the total, counted from when the request came, as a timeout
/// of the primary: the total running out is not a try's timeout, so no fallback.
#[tokio::test(start_paused = true)]
async fn the_total_enforced_here_runs_from_the_request_and_cuts_a_slow_primary() {
    use std::time::Duration;
    for primary_ms in [300, 2_000] {
        let (inner, mut handle) =
            tower_test::mock::pair::<Request<ReplayBody<Full<Bytes>>>, Response<String>>();
        handle.allow(1);
        let params =
            FallbackParams::from_config(&to_response(&[FallbackOn::Timeout]), BACKENDS, 1024)
                .unwrap();
        let ignore = |_: &str, _: &str, _: Reason| {};
        let svc = FallbackLayer::new(Arc::new(params), "shop.quote", Arc::new(ignore))
            .with_total(Some(Duration::from_secs(1)))
            .layer(inner);
        let start = tokio::time::Instant::now();
        let call = tokio::spawn(svc.oneshot(request("order")));
        let (req, reply) = handle.next_request().await.unwrap();
        let backend = crate::extensions::Routing::backend(req.extensions())
            .unwrap()
            .name
            .clone();
        // The primary answers after `primary_ms` of (paused) time, or the total cuts it.
        let answers_at = Duration::from_millis(primary_ms);
        tokio::time::advance(answers_at.min(Duration::from_millis(999))).await;
        if primary_ms < 1_000 {
            reply.send_response(Response::new(format!("from {backend}")));
        } else {
            tokio::task::yield_now().await;
            assert!(!call.is_finished(), "cut before the total");
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        let out = call.await.unwrap();
        assert_eq!(
            start.elapsed().as_millis(),
            u128::from(primary_ms.min(1_000)),
            "primary {primary_ms} ms"
        );
        if primary_ms < 1_000 {
            assert_eq!(text(out.unwrap()).await, "from quote");
        } else {
            let err = out.unwrap_err();
            assert_eq!(crate::AtBackend::find(&*err), Some("quote"), "{err:?}");
            let timeout =
                std::error::Error::source(&*err).and_then(|e| e.downcast_ref::<FilterError>());
            assert!(matches!(timeout, Some(FilterError::Timeout(_))), "{err:?}");
        }
    }
}

#[tokio::test]
async fn the_fallback_is_ready_when_the_stack_below_it_is() {
    let (inner, mut handle) =
        tower_test::mock::pair::<Request<ReplayBody<Full<Bytes>>>, Response<String>>();
    let params =
        FallbackParams::from_config(&to_backend(&[FallbackOn::BreakerOpen]), BACKENDS, 1024)
            .unwrap();
    let ignore = |_: &str, _: &str, _: Reason| {};
    let layer = FallbackLayer::new(Arc::new(params), "shop.quote", Arc::new(ignore));
    let mut svc = tower_test::mock::Spawn::new(layer.layer(inner));
    handle.allow(0);
    assert!(svc.poll_ready().is_pending());
    handle.allow(1);
    assert!(svc.poll_ready().is_ready());
}
