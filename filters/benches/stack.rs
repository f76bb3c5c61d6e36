//! Per-request cost of the governance stack this crate builds, in process.
//!
//! Each route has its own prebuilt stack — rate limit (keyed by tenant) → total timeout →
//! split (90/10, sticky by user) → per-try timeout → P2C balancer over three endpoints per
//! backend — over an innermost service that answers at once with an empty 200. Requests
//! visit the routes of a table of 10, 1,000 or 10,000 in a scattered order, to show that the
//! cost per request does not grow with the number of routes. A bare `service_fn` is the
//! baseline; both build the same request each time.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Empty;
use sluice_config::{Route, SplitRule, StickyBy};
use sluice_filters::balance::{BalanceLayer, BalanceParams, BalanceRegistry};
use sluice_filters::ratelimit::{RateLimitLayer, RateLimitParams, RateLimitRegistry};
use sluice_filters::split::{SplitLayer, SplitParams};
use sluice_filters::timeout::{TimeoutLayer, TimeoutParams};
use tower::ServiceExt;
use tower::util::ServiceFn;
use tower_layer::Layer;
use tower_service::Service;

type Body = Empty<Bytes>;

fn answer(_req: Request<()>) -> Ready<Result<Response<Body>, Infallible>> {
    ready(Ok(Response::new(Empty::new())))
}

type Inner = ServiceFn<fn(Request<()>) -> Ready<Result<Response<Body>, Infallible>>>;

fn inner() -> Inner {
    tower::service_fn(answer as fn(_) -> _)
}

fn route_config(i: usize) -> Route {
    Route {
        name: format!("route-{i}"),
        timeout: Some(sluice_config::Duration::from_secs(2)),
        rate_limit: Some(sluice_config::RateLimit {
            per_second: 1_000_000_000,
            burst: None,
            key: Some(sluice_config::RateLimitKey {
                header: Some("x-tenant-id".into()),
                ..Default::default()
            }),
            shadow: false,
            scope: Default::default(),
        }),
        retry: Some(sluice_config::Retry {
            attempts: 2,
            per_try_timeout: Some(sluice_config::Duration::from_millis(500)),
            ..Default::default()
        }),
        split: vec![SplitRule {
            weights: Some(
                [("v1".to_string(), 90), ("v2".to_string(), 10)]
                    .into_iter()
                    .collect(),
            ),
            sticky_by: Some(StickyBy {
                header: "x-user-id".into(),
                hash: Default::default(),
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Builds each route's stack once, as the proxy does at a policy swap.
fn build_routes(
    n: usize,
    limits: &RateLimitRegistry<usize>,
    endpoints: &BalanceRegistry,
) -> Vec<impl Service<Request<()>, Response = Response<Body>, Error = tower::BoxError> + use<>> {
    (0..n)
        .map(|i| {
            let route = route_config(i);
            let rl = RateLimitParams::from_config(route.rate_limit.as_ref().unwrap())
                .unwrap()
                .named(route.name.as_str());
            let limiter = limits.get_or_rebuild(i, &rl);
            let timeouts = TimeoutParams::from_config(&route);
            let split = Arc::new(SplitParams::from_config(&route, ["v1", "v2"]).unwrap());
            let sets: Vec<_> = ["v1", "v2"]
                .iter()
                .enumerate()
                .map(|(b, name)| {
                    let addrs: Vec<String> = (0..3)
                        .map(|k| format!("10.{}.{}.{}:8080", b, i % 250, i / 250 * 3 + k))
                        .collect();
                    endpoints
                        .endpoint_set(&BalanceParams::new(name, addrs.iter().map(String::as_str)))
                })
                .collect();
            let stack = BalanceLayer::new(Arc::from(sets)).layer(inner());
            let stack = TimeoutLayer::new(Some(Duration::from_millis(500))).layer(stack);
            let stack = SplitLayer::new(split).layer(stack);
            let stack = timeouts.total_layer().layer(stack);
            RateLimitLayer::new(limiter).layer(stack)
        })
        .collect()
}

fn request(i: usize) -> Request<()> {
    Request::builder()
        .uri("/logs")
        .header("x-tenant-id", TENANTS[i % TENANTS.len()])
        .header("x-user-id", USERS[i % USERS.len()])
        .body(())
        .unwrap()
}

const TENANTS: [&str; 8] = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"];
const USERS: [&str; 10] = ["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9"];

fn call_now<S>(svc: &mut S, req: Request<()>) -> Response<Body>
where
    S: Service<Request<()>, Response = Response<Body>>,
    S::Error: std::fmt::Debug,
{
    svc.ready()
        .now_or_never()
        .expect("ready at once")
        .expect("ready");
    svc.call(req)
        .now_or_never()
        .expect("answers at once")
        .expect("allowed")
}

fn bench(c: &mut Criterion) {
    // Timeouts need a timer in context; the futures complete on their first poll.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _enter = rt.enter();

    let mut group = c.benchmark_group("per_request");
    group.bench_function("baseline_service_fn", |b| {
        let mut svc = inner();
        let mut i = 0usize;
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(call_now(&mut svc, request(i)));
        })
    });
    for n in [10usize, 1_000, 10_000] {
        let limits = RateLimitRegistry::new();
        let endpoints = BalanceRegistry::new();
        let mut routes = build_routes(n, &limits, &endpoints);
        // Traffic concentrated on 8 routes of the table: any cost that grew with the
        // table itself (scans, global maps) would show here.
        group.bench_with_input(BenchmarkId::new("stack_hot8_of", n), &n, |b, &n| {
            let mut i = 0usize;
            b.iter(|| {
                i = i.wrapping_add(1);
                let r = (i % 8) * (n / 8);
                black_box(call_now(&mut routes[r], request(i)));
            })
        });
        // Every request on a different route, scattered over the whole table: the route
        // state no longer fits in the CPU caches, so this adds memory latency.
        group.bench_with_input(BenchmarkId::new("stack_scattered_over", n), &n, |b, &n| {
            let mut i = 0usize;
            b.iter(|| {
                i = i.wrapping_add(1);
                let r = i.wrapping_mul(7_919) % n;
                black_box(call_now(&mut routes[r], request(i)));
            })
        });
    }
    // The refusal path, as under a flood: one tenant far over a tiny limit.
    group.bench_function("refused_by_rate_limit", |b| {
        let limits: RateLimitRegistry<usize> = RateLimitRegistry::new();
        let params = RateLimitParams::from_config(&sluice_config::RateLimit {
            per_second: 1,
            ..Default::default()
        })
        .unwrap()
        .named("flooded");
        let mut svc = RateLimitLayer::new(limits.get_or_rebuild(0, &params)).layer(inner());
        let mut i = 0usize;
        b.iter(|| {
            i = i.wrapping_add(1);
            svc.ready().now_or_never().expect("ready").expect("ready");
            black_box(
                svc.call(request(i))
                    .now_or_never()
                    .expect("at once")
                    .is_err(),
            );
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
