//! Per-request cost of a route's compiled stack, as the edge drives it: clone the
//! route's service, wait until it is ready, call it, drain the answer. The stacks are
//! the ones `examples/bench/run.sh` measures end to end (one plain route; the full
//! governance stack: rate limit, timeout, split 90/10, retry with a per-try timeout and
//! a budget, circuit breaker, balancer) over the proxy's pooled HTTP/1.1 client to a
//! hyper upstream on 127.0.0.1 in the same single-threaded runtime, so every figure
//! includes the loopback round trip; the hyper client alone is the baseline.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sluice_proxy::body::{Body, empty};
use sluice_proxy::route::{RouteParams, compile_backends};
use sluice_proxy::stack::{RouteEntry, build_outbound};
use sluice_proxy::upstream::Upstream;
use sluice_proxy::{Metrics, StackContext};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

/// One thread, like the benchmark's `--worker-threads 1` (without a second core).
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A hyper HTTP/1.1 server answering every request with 20 bytes.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"twenty bytes of body",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn policy(upstream: SocketAddr, full: bool) -> String {
    let (backends, route) = if full {
        (
            format!(
                "    stable: {{ addresses: [\"{upstream}\"] }}\n    canary: {{ addresses: [\"{upstream}\"] }}"
            ),
            "      timeout: 2s
      rateLimit: { perSecond: 1000000, burst: 100000 }
      retry: { attempts: 2, on: [connect-failure, refused-stream, gateway-error], perTryTimeout: 500ms,
               budget: { ratio: 0.2, minPerSecond: 10 } }
      circuitBreaker: { consecutiveFailures: 5, failureRate: { percent: 50, window: 30s, minRequests: 20 },
                        openFor: 10s, halfOpenRequests: 2 }
      split:
        - weights: { stable: 90, canary: 10 }",
        )
    } else {
        (
            format!("    upstream: {{ addresses: [\"{upstream}\"] }}"),
            "",
        )
    };
    format!(
        "apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: bench, namespace: bench }}
spec:
  host: bench
  backends:
{backends}
  routes:
    - name: all
{route}
"
    )
}

/// The route stack of `policy`, compiled as a policy swap compiles it.
fn entry(ctx: &StackContext, policy: &str) -> RouteEntry {
    let policies = sluice_config::parse_policies("bench.yaml", policy).unwrap();
    ctx.prepare(&policies, None);
    let backends = compile_backends(&policies[0]).unwrap();
    let params = RouteParams::new(&policies[0], 0, backends).unwrap();
    build_outbound(ctx, Arc::new(params))
}

fn request() -> Request<Body> {
    let mut req = Request::builder()
        .uri("/")
        .header("host", "bench")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .body(empty())
        .unwrap();
    *req.version_mut() = Version::HTTP_11;
    req
}

/// One request as `edge::forward` sends it: a clone of the route's stack per request.
async fn through(entry: &RouteEntry) {
    let svc = entry.service.clone();
    let resp = svc.oneshot(request()).await.unwrap();
    assert_eq!(resp.status(), 200);
    black_box(resp.into_body().collect().await.unwrap());
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let addr = rt.block_on(upstream());
    let ctx = StackContext::new(Upstream::new(), Metrics::new().unwrap());
    let plain = entry(&ctx, &policy(addr, false));
    let ctx_full = StackContext::new(Upstream::new(), Metrics::new().unwrap());
    let full = entry(&ctx_full, &policy(addr, true));

    let mut g = c.benchmark_group("route_stack");
    g.bench_function("clone and drop the full stack", |b| {
        b.iter(|| black_box(full.service.clone()))
    });
    let mut client = Upstream::new();
    let endpoint = sluice_filters::extensions::Endpoint(addr.to_string().into());
    g.bench_function("pooled client alone (baseline)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut req = request();
                sluice_filters::extensions::Routing::of_mut(req.extensions_mut()).endpoint =
                    Some(endpoint.clone());
                let resp = client.ready().await.unwrap().call(req).await.unwrap();
                black_box(resp.into_body().collect().await.unwrap());
            })
        })
    });
    g.bench_function("plain route", |b| b.iter(|| rt.block_on(through(&plain))));
    g.bench_function("full governance stack", |b| {
        b.iter(|| rt.block_on(through(&full)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
