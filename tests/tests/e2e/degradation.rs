//! Degradation: a route's fallback (another backend, or a static answer, also for gRPC
//! callers) once its primary fails, and slow start of an endpoint added under load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::StatusCode;
use sluice_e2e::grpc::proto::EchoRequest;
use sluice_e2e::grpc::proto::echo_client::EchoClient;
use sluice_e2e::{
    HttpConn, Reply, TestProxy, Upstream, WAIT, access_lines, closed_port, metric_sum, scrape,
    wait_until,
};
use tonic::Code;

/// A policy `fb` with a dead-or-alive `primary` and, when given, a `cache` backend, its
/// one route `main` carrying `route` (indented YAML lines).
fn policy(primary: SocketAddr, cache: Option<SocketAddr>, route: &str) -> String {
    let cache = cache.map_or_else(String::new, |c| {
        format!("    cache: {{ addresses: [\"{c}\"] }}\n")
    });
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: fb, namespace: e2e }}
spec:
  host: quote
  backends:
{cache}    primary: {{ addresses: ["{primary}"] }}
  routes:
    - name: main
      circuitBreaker: {{ consecutiveFailures: 3, openFor: 60s }}
{route}"#
    )
}

async fn get(conn: &mut HttpConn) -> Reply {
    conn.get("quote", "/quote/1").await.unwrap()
}

/// The state of the breaker of route `fb.main` × `backend` in `/breakers`.
async fn breaker_state(proxy: &TestProxy, backend: &str) -> String {
    let all = proxy.admin_json("/breakers").await;
    let list = all
        .as_array()
        .cloned()
        .or_else(|| all["breakers"].as_array().cloned());
    list.unwrap_or_default()
        .iter()
        .find(|b| b["route"] == "fb.main" && b["backend"] == backend)
        .map(|b| b["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no breaker fb.main/{backend} in {all}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_is_answered_by_the_fallback_backend_once_its_breaker_opens() {
    let cache = Upstream::auto("cache").await;
    let dead = closed_port().await;
    // Only `breaker-open` is listed: before the breaker opens the caller sees the
    // primary's own failures; afterwards none.
    let route = "      fallback: { on: [breaker-open], backend: cache }\n";
    let proxy = TestProxy::start(&policy(dead, Some(cache.addr()), route)).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let mut before = Vec::new();
    loop {
        let r = get(&mut conn).await;
        if !r.header("x-sluice-degraded").is_empty() {
            break;
        }
        // A reason not in `on` returns the original error, unmarked.
        assert!(
            ["upstream-unavailable", "no-healthy-endpoint"].contains(&r.header("x-sluice-reason")),
            "{r:?}"
        );
        before.push(r.status.as_u16());
        assert!(
            before.len() <= 3,
            "the breaker opens after 3 failures: {before:?}"
        );
    }
    assert_eq!(
        cache.requests(),
        1,
        "no request went to the fallback before"
    );
    let mut failed = 0;
    for _ in 0..50 {
        let r = get(&mut conn).await;
        if r.status != StatusCode::OK
            || r.header("x-upstream") != "cache"
            || r.header("x-sluice-degraded") != "breaker-open"
        {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "every answer came from the fallback, marked");
    assert_eq!(cache.requests(), 51);
    // The primary's breaker is open while traffic is degraded; the fallback's is not.
    assert_eq!(breaker_state(&proxy, "primary").await, "open");
    assert_eq!(breaker_state(&proxy, "cache").await, "closed");
    let metrics = scrape(proxy.admin_addr()).await;
    let fired = metric_sum(
        &metrics,
        "sluice_fallbacks_total",
        &[
            r#"route="fb.main""#,
            r#"backend="primary""#,
            r#"reason="breaker-open""#,
        ],
    );
    assert_eq!(fired, 51.0, "{metrics}");
    let answered = metric_sum(
        &metrics,
        "sluice_requests_total",
        &[r#"route="fb.main""#, r#"backend="cache""#, r#"code="200""#],
    );
    assert_eq!(answered, 51.0);
    proxy.shutdown().await;
    cache.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_response_answers_for_breaker_open() {
    let dead = closed_port().await;
    let route = r#"      fallback:
        on: [breaker-open]
        response:
          status: 200
          headers: { content-type: application/json, cache-control: no-store }
          body: '{"quote":null,"degraded":true}'
"#;
    let proxy = TestProxy::start(&policy(dead, None, route)).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for i in 0..3 {
        let r = get(&mut conn).await;
        assert!(r.status.is_server_error(), "try {i}: {r:?}");
        assert_eq!(r.header("x-sluice-degraded"), "", "{r:?}");
    }
    for _ in 0..20 {
        let r = get(&mut conn).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(r.header("cache-control"), "no-store");
        assert_eq!(r.header("x-sluice-degraded"), "breaker-open");
        assert_eq!(r.text(), r#"{"quote":null,"degraded":true}"#);
    }
    assert_eq!(breaker_state(&proxy, "primary").await, "open");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_fallback_backend_answers_its_own_error() {
    let dead = closed_port().await;
    let dead_cache = closed_port().await;
    let route = "      fallback: { on: [upstream-unavailable, no-healthy-endpoint, breaker-open], backend: cache }\n";
    let proxy = TestProxy::start(&policy(dead, Some(dead_cache), route)).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for _ in 0..10 {
        let r = get(&mut conn).await;
        assert!(r.status.is_server_error(), "{r:?}");
        assert_eq!(r.header("x-sluice-degraded"), "", "{r:?}");
        assert!(
            [
                "upstream-unavailable",
                "no-healthy-endpoint",
                "breaker-open"
            ]
            .contains(&r.header("x-sluice-reason")),
            "{r:?}"
        );
    }
    // Every failure is the fallback backend's own (the primary's never reaches the
    // caller): the answers are counted against `cache`, never fall back again.
    let metrics = scrape(proxy.admin_addr()).await;
    let on_cache = metric_sum(
        &metrics,
        "sluice_requests_total",
        &[r#"route="fb.main""#, r#"backend="cache""#],
    );
    assert_eq!(on_cache, 10.0, "{metrics}");
    assert_eq!(
        metric_sum(&metrics, "sluice_fallbacks_total", &[r#"route="fb.main""#]),
        0.0
    );
    // The fallback backend has its own breaker, and it opened too.
    assert_eq!(breaker_state(&proxy, "cache").await, "open");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_caller_gets_the_static_fallback_status() {
    let dead = closed_port().await;
    let route = r#"      fallback:
        on: [upstream-unavailable, no-healthy-endpoint, breaker-open]
        response: { status: 503, grpcStatus: 14, grpcMessage: "quotes degraded: try later" }
"#;
    let proxy = TestProxy::start(&policy(dead, None, route)).await;
    let channel = sluice_e2e::grpc::channel_to(proxy.outbound_addr(), "quote").await;
    let mut client = EchoClient::new(channel);
    for _ in 0..5 {
        let status = client
            .unary(EchoRequest {
                message: "hi".into(),
                count: 0,
                fail_code: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "quotes degraded: try later");
        let meta = status.metadata();
        assert!(meta.get("x-sluice-degraded").is_some(), "{meta:?}");
    }
    // A plain HTTP caller of the same route gets the HTTP form.
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let r = get(&mut conn).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert!(!r.header("x-sluice-degraded").is_empty());
    proxy.shutdown().await;
}

/// A policy spreading `slow` over `addrs` with `slowStart: 2s`.
/// The `slowStart` of [`spread`]'s backend, in seconds: long beside a window of requests
/// even on a busy machine, so the early windows see a small weight.
const RAMP: f64 = 5.0;

fn spread(addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: slow, namespace: e2e }}
spec:
  host: slow
  backends:
    pods: {{ addresses: [{}], slowStart: {RAMP}s }}
  routes:
    - name: all
"#,
        list.join(", ")
    )
}

/// How long ago the proxy began ramping `addr` in, from its own `/endpoints`.
async fn ramp_age(proxy: &TestProxy, addr: SocketAddr) -> f64 {
    let list = proxy.admin_json("/endpoints").await;
    let addr = addr.to_string();
    list.as_array()
        .and_then(|l| l.iter().find(|e| e["address"] == addr.as_str()))
        .and_then(|e| e["ramp_age_s"].as_f64())
        .unwrap_or_else(|| panic!("{addr} not in /endpoints: {list}"))
}

/// One window of requests: the new endpoint's ramp age (per the proxy) before and after,
/// and the requests each upstream took in between.
struct Window {
    age_before: f64,
    age_after: f64,
    counts: Vec<u64>,
}

/// The new endpoint's share of `windows`, and how many requests they hold.
fn share_of(windows: &[&Window]) -> (f64, u64) {
    let total: u64 = windows.iter().flat_map(|w| &w.counts).sum();
    let new: u64 = windows.iter().map(|w| w.counts[2]).sum();
    (new as f64 / total.max(1) as f64, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_added_under_load_ramps_in_to_an_equal_share() {
    let ups = [
        Upstream::auto("a").await,
        Upstream::auto("b").await,
        Upstream::auto("c").await,
    ];
    // Answers that take a steady 5 ms, and eight requests in flight, so that what the
    // balancer weighs is the backends and the load, not a busy machine's scheduling: on
    // bare loopback a round trip is ~0.2 ms, one late wake-up is a peak many times that,
    // and peak-EWMA (as designed) passes over an endpoint with such a peak until it
    // decays, seconds longer than the late windows below last.
    for u in &ups {
        u.set_stall(sluice_e2e::Stall::Delay(Duration::from_millis(5)));
    }
    let proxy = TestProxy::start(&spread(&[ups[0].addr(), ups[1].addr()])).await;
    let addr = proxy.outbound_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..8 {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut conn = HttpConn::h1(addr).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let r = conn.get("slow", "/").await.unwrap();
                assert_eq!(r.status, StatusCode::OK, "{r:?}");
            }
        }));
    }
    let counts = || ups.iter().map(Upstream::requests).collect::<Vec<u64>>();
    wait_until("load flows", WAIT, || async {
        counts().iter().sum::<u64>() > 500
    })
    .await;
    // The first two were first seen when the proxy started and ramp in too: the new
    // one's share is its weight relative to theirs, so it is added once they are in.
    wait_until("the first endpoints are ramped in", WAIT, || async {
        ramp_age(&proxy, ups[0].addr()).await >= RAMP
            && ramp_age(&proxy, ups[1].addr()).await >= RAMP
    })
    .await;
    assert_eq!(ups[2].requests(), 0);
    let v = proxy.version().await;
    proxy.write_policy(&spread(&[ups[0].addr(), ups[1].addr(), ups[2].addr()]));
    proxy.wait_version_change(v.as_deref()).await;
    // Windows of 50 requests, each bracketed by the proxy's own ramp age of the new
    // endpoint, so that a busy machine (a slow window, a late look at the version) only
    // moves a window along the ramp, never mislabels it. Until the ramp is over and 1500
    // requests were counted after it.
    let mut windows: Vec<Window> = Vec::new();
    loop {
        let age_before = ramp_age(&proxy, ups[2].addr()).await;
        let last = counts();
        let start: u64 = last.iter().sum();
        wait_until("a window of requests", WAIT, || async {
            counts().iter().sum::<u64>() >= start + 50
        })
        .await;
        let now = counts();
        let age_after = ramp_age(&proxy, ups[2].addr()).await;
        windows.push(Window {
            age_before,
            age_after,
            counts: now.iter().zip(&last).map(|(n, l)| n - l).collect(),
        });
        if windows.len() == 1 {
            // Never heard from, it is taken the first time the balancer samples it.
            assert!(ups[2].requests() > 0, "not reached in the first window");
        }
        let ramped: Vec<&Window> = windows.iter().filter(|w| w.age_before >= RAMP).collect();
        if share_of(&ramped).1 >= 1500 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let early: Vec<&Window> = windows
        .iter()
        .filter(|w| w.age_after <= 0.2 * RAMP)
        .collect();
    let late: Vec<&Window> = windows.iter().filter(|w| w.age_before >= RAMP).collect();
    let (early_share, n) = share_of(&early);
    let (late_share, _) = share_of(&late);
    let summary: Vec<(f64, f64, f64)> = windows
        .iter()
        .map(|w| (w.age_before, w.age_after, share_of(&[w]).0))
        .collect();
    // Weight at most 0.2 while early: of the three pairs power of two choices samples,
    // two hold the new endpoint, and it competes in one only with probability of its
    // weight, so at most 2/3 × 0.2 of picks (and the one taken because never heard from).
    // Bound 5σ above that; with enough requests it stays clearly below an equal third.
    eprintln!("early share {early_share:.3} over {n} requests, late {late_share:.3}");
    let p = 2.0 / 3.0 * 0.2;
    let bound = p + 5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1.0 / n as f64;
    assert!(
        bound < 0.29,
        "too few early requests ({n}) to tell: {summary:?}"
    );
    assert!(
        early_share < bound,
        "early share {early_share:.3} over {n} requests, bound {bound:.3}: {summary:?}"
    );
    // Ramped in, it competes at full weight: clearly more than early on, and each of the
    // three takes about a third (0.29 to 0.36 each measured on two cores, with the whole
    // suite running beside it). The bounds leave room for what latency decides: a
    // wake-up late by several answers' time still makes peak-EWMA pass over one
    // endpoint for a while. What would be wrong is the ramp not ending (a share near
    // the early one) or an endpoint left out (a share near none).
    assert!(
        (0.2..0.6).contains(&late_share) && late_share > early_share + 0.1,
        "late share {late_share:.3}, early {early_share:.3}: {summary:?}"
    );
    let late_counts: Vec<u64> = (0..3)
        .map(|i| late.iter().map(|w| w.counts[i]).sum())
        .collect();
    let total: u64 = late_counts.iter().sum();
    for (i, c) in late_counts.iter().enumerate() {
        let s = *c as f64 / total as f64;
        assert!(
            (0.1..0.6).contains(&s),
            "upstream {i} late share {s:.3}: {late_counts:?}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_timeout_falls_back_within_the_route_time() {
    let slow = Upstream::auto("slow").await;
    slow.set_stall(sluice_e2e::Stall::Hang);
    let cache = Upstream::auto("cache").await;
    let route = r#"      timeout: 5s
      retry: { attempts: 1, on: [timeout], perTryTimeout: 150ms, backoff: { base: 1ms, max: 2ms } }
      fallback: { on: [timeout], backend: cache }
"#;
    let proxy = TestProxy::start(&policy(slow.addr(), Some(cache.addr()), route)).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let started = std::time::Instant::now();
    let r = get(&mut conn).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.header("x-upstream"), "cache");
    assert_eq!(r.header("x-sluice-degraded"), "timeout");
    // Both tries of the primary timed out (2 × 150 ms), then the cache answered, well
    // inside the route's 5 s.
    assert_eq!(slow.requests(), 2);
    assert!(started.elapsed() < Duration::from_secs(5));
    slow.set_stall(sluice_e2e::Stall::None);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_answers_show_in_spans_and_access_logs() {
    let receiver = sluice_e2e::otlp::OtlpReceiver::start().await;
    let dead = closed_port().await;
    let route = r#"      accessLog: true
      fallback:
        on: [upstream-unavailable, no-healthy-endpoint, breaker-open]
        response: { status: 200, body: degraded }
"#;
    let endpoint = receiver.http_endpoint();
    let mut proxy = sluice_e2e::ChildProxy::spawn(
        env!("CARGO_BIN_EXE_e2e-proxy").as_ref(),
        &policy(dead, None, route),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "http",
            "--log-format",
            "json",
        ],
    )
    .await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for _ in 0..3 {
        let r = get(&mut conn).await;
        assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "degraded"));
    }
    proxy.sigterm();
    assert!(proxy.wait_exit(WAIT).await.success());
    let log = proxy.log();
    let access = access_lines(&log);
    assert_eq!(access.len(), 3, "{log}");
    for a in &access {
        let f = &a["fields"];
        assert_eq!(f["status"], 200, "{f}");
        assert!(
            [
                "upstream-unavailable",
                "no-healthy-endpoint",
                "breaker-open"
            ]
            .contains(&f["degraded"].as_str().unwrap_or_default()),
            "{f}"
        );
    }
    wait_until("the spans arrive", WAIT, || async {
        receiver
            .spans()
            .iter()
            .filter(|s| s.attributes.contains_key("sluice.degraded"))
            .count()
            == 3
    })
    .await;
}
