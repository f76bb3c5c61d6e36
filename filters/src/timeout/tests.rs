use std::time::Duration;

use http::{Request, Response};
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;
use tower_test::mock;

use super::*;
use crate::FilterError;

type Mock = mock::Mock<Request<()>, Response<()>>;

#[tokio::test(start_paused = true)]
async fn elapsed_timeout_fails_with_timeout_error() {
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc = TimeoutLayer::new(Some(Duration::from_millis(500))).layer(mock);
    handle.allow(1);
    let fut = svc.ready().await.unwrap().call(Request::new(()));
    let (_req, _send) = handle.next_request().await.unwrap();
    let err = fut.await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<FilterError>(),
        Some(&FilterError::Timeout(Duration::from_millis(500)))
    );
    assert_eq!(
        err.downcast_ref::<FilterError>().unwrap().reason().as_str(),
        "timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn response_before_the_deadline_passes() {
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc = TimeoutLayer::new(Some(Duration::from_secs(2))).layer(mock);
    handle.allow(1);
    let fut = tokio::spawn(svc.ready().await.unwrap().call(Request::new(())));
    let (_req, send) = handle.next_request().await.unwrap();
    tokio::time::advance(Duration::from_millis(1999)).await;
    send.send_response(Response::new(()));
    assert!(fut.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn no_timeout_waits_forever() {
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc: Timeout<Mock> = TimeoutLayer::new(None).layer(mock);
    handle.allow(1);
    let fut = tokio::spawn(svc.ready().await.unwrap().call(Request::new(())));
    let (_req, send) = handle.next_request().await.unwrap();
    tokio::time::advance(Duration::from_secs(3600)).await;
    send.send_response(Response::new(()));
    assert!(fut.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through() {
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc = TimeoutLayer::new(Some(Duration::from_secs(1))).layer(mock);
    handle.allow(1);
    let fut = svc.ready().await.unwrap().call(Request::new(()));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::other("boom"));
    let err = fut.await.unwrap_err();
    assert!(err.downcast_ref::<FilterError>().is_none());
    assert_eq!(err.to_string(), "boom");
}

#[tokio::test(start_paused = true)]
async fn total_from_the_route_and_an_inner_deadline_fires_first() {
    let route = sluice_config::Route {
        name: "ingest".into(),
        timeout: Some(sluice_config::Duration::from_secs(2)),
        retry: Some(sluice_config::Retry {
            attempts: 2,
            per_try_timeout: Some(sluice_config::Duration::from_millis(500)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let p = TimeoutParams::from_config(&route);
    // `perTryTimeout` is the retry layer's: only the total is read here.
    assert_eq!(
        p,
        TimeoutParams {
            total: Some(Duration::from_secs(2))
        }
    );

    // A shorter deadline inside the total one fires first.
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let inner = TimeoutLayer::new(Some(Duration::from_millis(500)));
    let mut svc = p.total_layer().layer(inner.layer(mock));
    handle.allow(1);
    let fut = svc.ready().await.unwrap().call(Request::new(()));
    let (_req, _send) = handle.next_request().await.unwrap();
    let started = tokio::time::Instant::now();
    let err = fut.await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_millis(500));
    assert_eq!(
        err.downcast_ref::<FilterError>(),
        Some(&FilterError::Timeout(Duration::from_millis(500)))
    );
}
