//! Per-request cost of the breaker and retry layers when nothing fails.
//!
//! The innermost service answers at once with an empty 200; requests are GETs with
//! no body, so a retry-enabled route takes the retry loop (boxed future, head copy)
//! while the breaker stays closed. A bare `service_fn` is the baseline; every variant
//! builds the same request each time. Futures complete on their first poll, so they
//! are polled once with `now_or_never` inside an entered runtime (for the per-try timer).

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Empty;
use sluice_config::RetryOn;
use sluice_filters::breaker::{BreakerLayer, BreakerParams, BreakerRegistry};
use sluice_filters::retry::{RetryLayer, RetryParams, RetryRegistry};
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

type Body = Empty<Bytes>;

fn answer<B>(_req: Request<B>) -> Ready<Result<Response<Body>, Infallible>> {
    ready(Ok(Response::new(Empty::new())))
}

fn request() -> Request<Body> {
    Request::builder()
        .uri("http://log-service/logs")
        .header("x-tenant-id", "t1")
        .body(Empty::new())
        .unwrap()
}

fn drive<S, R>(svc: &mut S)
where
    S: Service<Request<Body>, Response = Response<R>>,
    S::Error: std::fmt::Debug,
{
    let svc = svc.ready().now_or_never().unwrap().unwrap();
    let rsp = svc.call(request()).now_or_never().unwrap().unwrap();
    black_box(rsp);
}

fn retry_params(per_try: bool) -> RetryParams {
    RetryParams::from_policy(&sluice_config::Retry {
        attempts: 2,
        on: vec![RetryOn::ConnectFailure, RetryOn::GatewayError],
        per_try_timeout: per_try.then(|| sluice_config::Duration::from_millis(500)),
        ..Default::default()
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _enter = rt.enter();

    let breakers = BreakerRegistry::default();
    breakers.update([("ingest", "log-v1", BreakerParams::default())]);
    let circuit = breakers.get("ingest", "log-v1").unwrap();
    let retries = RetryRegistry::default();
    retries.update([
        ("ingest", retry_params(false)),
        ("ingest-pt", retry_params(true)),
    ]);
    let retry = retries.get("ingest").unwrap();
    let retry_pt = retries.get("ingest-pt").unwrap();

    let mut g = c.benchmark_group("breaker_retry");
    let mut bare = tower::service_fn(answer::<Body>);
    g.bench_function("bare", |b| b.iter(|| drive(&mut bare)));

    let mut breaker =
        BreakerLayer::new(Arc::clone(&circuit)).layer(tower::service_fn(answer::<Body>));
    g.bench_function("breaker", |b| b.iter(|| drive(&mut breaker)));

    let mut retry_only =
        RetryLayer::new(Arc::clone(&retry), "log-v1").layer(tower::service_fn(answer));
    g.bench_function("retry", |b| b.iter(|| drive(&mut retry_only)));

    let mut disabled = RetryLayer::disabled("log-v1")
        .layer(BreakerLayer::new(Arc::clone(&circuit)).layer(tower::service_fn(answer)));
    g.bench_function("retry_off+breaker", |b| b.iter(|| drive(&mut disabled)));

    let mut both = RetryLayer::new(Arc::clone(&retry), "log-v1")
        .layer(BreakerLayer::new(Arc::clone(&circuit)).layer(tower::service_fn(answer)));
    g.bench_function("retry+breaker", |b| b.iter(|| drive(&mut both)));

    let mut both_pt = RetryLayer::new(Arc::clone(&retry_pt), "log-v1")
        .layer(BreakerLayer::new(Arc::clone(&circuit)).layer(tower::service_fn(answer)));
    g.bench_function("retry+per_try_timeout+breaker", |b| {
        b.iter(|| drive(&mut both_pt))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
