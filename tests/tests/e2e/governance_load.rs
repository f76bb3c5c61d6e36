//! Governance over many requests: split shares and live weight edits, stickiness across
//! sidecars, and the retry budget against an upstream that always fails.

use std::net::SocketAddr;
use std::time::Instant;

use hyper::{Method, StatusCode};
use sluice_e2e::{HttpConn, TestProxy, Upstream};
use sluice_examples::log_service::{self, LogServiceConfig};

fn split_policy(a: SocketAddr, b: SocketAddr, weights: (u32, u32), sticky: bool) -> String {
    let sticky = if sticky {
        "\n          stickyBy: { header: x-user-id }"
    } else {
        ""
    };
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: split, namespace: e2e }}\n\
         spec:\n  host: split\n  backends:\n    a: {{ addresses: [\"{a}\"] }}\n    b: {{ addresses: [\"{b}\"] }}\n\
         \x20 routes:\n    - name: main\n      split:\n        - weights: {{ a: {}, b: {} }}{sticky}\n",
        weights.0, weights.1
    )
}

/// The value of one series in Prometheus text, 0 when absent.
fn metric(text: &str, series_prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ninety_ten_split_holds_over_two_thousand_requests_and_an_edit_applies_at_once() {
    let a = Upstream::auto("a").await;
    let b = Upstream::auto("b").await;
    let proxy = TestProxy::start(&split_policy(a.addr(), b.addr(), (90, 10), false)).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let total = 2_000u32;
    let mut to_b = 0u32;
    for _ in 0..total {
        let r = conn.get("split", "/").await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        to_b += u32::from(r.header("x-upstream") == "b");
    }
    let share = f64::from(to_b) * 100.0 / f64::from(total);
    assert!((share - 10.0).abs() <= 2.0, "b got {share:.1} % of {total}");

    let old = proxy.version().await;
    proxy.write_policy(&split_policy(a.addr(), b.addr(), (0, 100), false));
    proxy.wait_version_change(old.as_deref()).await;
    let r = conn.get("split", "/").await.unwrap();
    assert_eq!(
        r.header("x-upstream"),
        "b",
        "the next request follows the edit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_send_each_user_to_the_same_side() {
    let a = Upstream::auto("a").await;
    let b = Upstream::auto("b").await;
    let policy = split_policy(a.addr(), b.addr(), (50, 50), true);
    let p1 = TestProxy::start(&policy).await;
    let p2 = TestProxy::start(&policy).await;
    let mut c1 = HttpConn::h1(p1.outbound_addr()).await.unwrap();
    let mut c2 = HttpConn::h1(p2.outbound_addr()).await.unwrap();
    let mut sides = std::collections::HashSet::new();
    for user in 0..50 {
        let id = format!("user-{user}");
        let h = [("x-user-id", id.as_str())];
        let r1 = c1.request(Method::GET, "split", "/", &h).await.unwrap();
        let r2 = c2.request(Method::GET, "split", "/", &h).await.unwrap();
        assert_eq!(r1.header("x-upstream"), r2.header("x-upstream"), "{id}");
        sides.insert(r1.header("x-upstream").to_string());
    }
    assert_eq!(sides.len(), 2, "50 users at 50/50 use both sides");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_against_a_failing_upstream_stay_within_the_budget() {
    let sick = log_service::start(
        "127.0.0.1:0".parse().unwrap(),
        LogServiceConfig {
            name: "sick".into(),
            fail_rate: 1.0,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (ratio, min_per_second, window) = (0.2, 1.0, 10.0);
    let policy = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: sick, namespace: e2e }}\n\
         spec:\n  host: sick\n  backends:\n    up: {{ addresses: [\"{}\"] }}\n  routes:\n    - name: main\n\
         \x20     rateLimit: {{ perSecond: 100000, burst: 100000 }}\n\
         \x20     circuitBreaker: {{ consecutiveFailures: 10000 }}\n\
         \x20     retry: {{ attempts: 2, on: [gateway-error], nonIdempotent: true, \
         backoff: {{ base: 1ms, max: 2ms }}, budget: {{ ratio: {ratio}, minPerSecond: 1 }} }}\n",
        sick.addr()
    );
    let proxy = TestProxy::start(&policy).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let started = Instant::now();
    let requests = 200u32;
    for _ in 0..requests {
        let r = conn
            .request(Method::POST, "sick", "/logs", &[])
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let seconds = started.elapsed().as_secs_f64().max(window);
    let (_, text) = proxy.admin_get("/metrics").await;
    let retried = metric(
        &text,
        "sluice_retries_total{backend=\"up\",outcome=\"retried\"",
    );
    let bound = ratio * f64::from(requests) + min_per_second * seconds;
    assert!(retried > 0.0, "some retries happen:\n{text}");
    assert!(retried <= bound, "{retried} retries > {bound}");
    assert!(
        metric(
            &text,
            "sluice_retries_total{backend=\"up\",outcome=\"budget_exhausted\""
        ) > 0.0,
        "the budget ran out:\n{text}"
    );
    // The metric families the dashboards read are all there.
    assert!(text.contains("sluice_ratelimit_decisions_total{decision=\"allowed\",direction=\"outbound\",route=\"main\"}"), "{text}");
    assert!(
        text.contains(
            "sluice_breaker_state{backend=\"up\",route=\"sick.main\",state=\"closed\"} 1"
        ),
        "{text}"
    );
    sick.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_when_a_backend_dies_and_half_open_probes_close_it_when_it_returns() {
    let cfg = || LogServiceConfig {
        name: "logs".into(),
        ..Default::default()
    };
    let svc = log_service::start("127.0.0.1:0".parse().unwrap(), cfg())
        .await
        .unwrap();
    let addr = svc.addr();
    let policy = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: logs, namespace: e2e }}\n\
         spec:\n  host: logs\n  backends:\n    v2: {{ addresses: [\"{addr}\"] }}\n  routes:\n    - name: main\n\
         \x20     circuitBreaker: {{ consecutiveFailures: 3, openFor: 200ms, halfOpenRequests: 1 }}\n"
    );
    let proxy = TestProxy::start(&policy).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for _ in 0..20 {
        let r = conn.get("logs", "/health").await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }

    svc.shutdown().await;
    // Until the breaker opens, each request is answered with the transport failure; once it
    // is open, with `breaker-open`. Every request gets an answer.
    let mut failed_upstream = 0;
    let mut fast = 0;
    for _ in 0..50 {
        let r = conn.get("logs", "/health").await.unwrap();
        match r.header("x-sluice-reason") {
            "breaker-open" => {
                assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
                fast += 1;
                if fast == 5 {
                    break;
                }
            }
            "upstream-unavailable" | "no-healthy-endpoint" => failed_upstream += 1,
            other => panic!("unexpected answer {other:?}: {r:?}"),
        }
    }
    assert_eq!(fast, 5, "the breaker opened");
    assert!(
        failed_upstream <= 3,
        "{failed_upstream} requests reached the dead backend"
    );
    let breakers = proxy.admin_json("/breakers").await;
    let b = breakers
        .as_array()
        .and_then(|l| l.iter().find(|b| b["route"] == "logs.main"))
        .unwrap_or_else(|| panic!("no breaker for logs.main: {breakers}"))
        .clone();
    assert!(b["state"] == "open" || b["state"] == "half_open", "{b}");
    let reasons = b["recent_transitions"].to_string();
    assert!(reasons.contains("consecutive"), "the opening says why: {b}");

    // The backend returns on the same address; half-open probes close the breaker.
    let svc = log_service::start(addr, cfg()).await.unwrap();
    let conn = tokio::sync::Mutex::new(conn);
    sluice_e2e::wait_until("a request succeeds again", sluice_e2e::WAIT, || async {
        let r = conn.lock().await.get("logs", "/health").await.unwrap();
        if r.status != StatusCode::OK {
            let reason = r.header("x-sluice-reason");
            assert!(
                matches!(
                    reason,
                    "breaker-open" | "no-healthy-endpoint" | "upstream-unavailable"
                ),
                "{r:?}"
            );
        }
        r.status == StatusCode::OK
    })
    .await;
    let breakers = proxy.admin_json("/breakers").await;
    let b = breakers
        .as_array()
        .and_then(|l| l.iter().find(|b| b["route"] == "logs.main"))
        .unwrap()
        .clone();
    assert_eq!(b["state"], "closed", "{b}");
    let (_, text) = proxy.admin_get("/metrics").await;
    assert!(
        text.contains(
            "sluice_breaker_state{backend=\"v2\",route=\"logs.main\",state=\"closed\"} 1"
        ),
        "{text}"
    );
    svc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_by_hand_fails_fast_until_reset() {
    let up = Upstream::auto("up").await;
    let policy = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: hand, namespace: e2e }}\n\
         spec:\n  host: hand\n  backends:\n    up: {{ addresses: [\"{}\"] }}\n  routes:\n    - name: main\n\
         \x20     circuitBreaker: {{ consecutiveFailures: 5 }}\n",
        up.addr()
    );
    let proxy = TestProxy::start(&policy).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    assert_eq!(conn.get("hand", "/").await.unwrap().status, StatusCode::OK);
    let (status, _) = proxy
        .admin_send(Method::POST, "/breakers/hand.main/up/open", "")
        .await;
    assert!(status.is_success(), "{status}");
    let r = conn.get("hand", "/").await.unwrap();
    assert_eq!(r.header("x-sluice-reason"), "breaker-open", "{r:?}");
    let (status, _) = proxy
        .admin_send(Method::POST, "/breakers/nope.main/up/reset", "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = proxy
        .admin_send(Method::POST, "/breakers/hand.main/up/reset", "")
        .await;
    assert!(status.is_success(), "{status}");
    assert_eq!(conn.get("hand", "/").await.unwrap().status, StatusCode::OK);
}
