//! Governance enforced by the outbound sidecar: rate limit, timeout, circuit breaker,
//! sticky weighted split, ejection of a dead endpoint. The services behind it have none
//! of this code.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Instant;

use hyper::{Method, StatusCode};
use sluice_e2e::{
    GoingAwayUpstream, HttpConn, Protocol, TestProxy, Upstream, WAIT, metric_sum, scrape,
    wait_until,
};

fn policy(host: &str, backends: &[(&str, SocketAddr)], route: &str) -> String {
    let mut b = String::new();
    for (name, addr) in backends {
        b.push_str(&format!("    {name}: {{ addresses: [\"{addr}\"] }}\n"));
    }
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: {host}, namespace: e2e }}\n\
         spec:\n  host: {host}\n  backends:\n{b}  routes:\n    - name: main\n{route}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after_once_the_burst_is_spent() {
    let up = Upstream::auto("limited").await;
    let route = "      rateLimit: { perSecond: 1, burst: 3 }\n";
    let proxy = TestProxy::start(&policy("limited", &[("up", up.addr())], route)).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..10 {
        let r = conn.get("limited", "/").await.unwrap();
        statuses.push(r.status.as_u16());
        if r.status == StatusCode::TOO_MANY_REQUESTS && limited.is_none() {
            limited = Some(r);
        }
    }
    assert_eq!(
        &statuses[..3],
        [200, 200, 200],
        "the burst passes: {statuses:?}"
    );
    let limited = limited.unwrap_or_else(|| panic!("nothing was limited: {statuses:?}"));
    assert_eq!(limited.header("x-sluice-reason"), "rate-limited");
    assert!(!limited.header("retry-after").is_empty(), "{limited:?}");
    let passed = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert_eq!(
        up.requests(),
        passed,
        "limited requests never reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_answers_504() {
    let up = Upstream::auto("stuck").await;
    let route = "      timeout: 200ms\n";
    let proxy = TestProxy::start(&policy("stuck", &[("up", up.addr())], route)).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    // The upstream holds /hold until released, which this test does only afterwards.
    let r = tokio::time::timeout(WAIT, conn.get("stuck", "/hold"))
        .await
        .expect("the proxy answers before the test gives up")
        .unwrap();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{r:?}");
    assert_eq!(r.header("x-sluice-reason"), "timeout");
    // Counted against the backend it was sent to, as a canary's checks need.
    let metrics = proxy.admin_get("/metrics").await.1;
    assert!(
        metrics.contains(r#"sluice_requests_total{backend="up",code="504",direction="outbound",namespace="e2e",peer_identity="",route="stuck.main"} 1"#),
        "{metrics}"
    );
    up.release_held();
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    assert_eq!(conn.get("stuck", "/").await.unwrap().status, StatusCode::OK);
}

/// A request its client gives up on before the answer is recorded as 499 (nginx's
/// "client closed request") in the metrics and `/recent`; it used to be left out of
/// both, so a storm of client timeouts did not show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_client_abandons_is_recorded_as_499() {
    let up = Upstream::auto("stuck").await;
    let opts = sluice_e2e::ProxyOptions {
        recent_requests: 16,
        ..Default::default()
    };
    let proxy = TestProxy::start_with(&policy("stuck", &[("up", up.addr())], ""), opts).await;
    up.abandon_held_request(proxy.outbound_addr(), "stuck")
        .await;
    let line = r#"sluice_requests_total{backend="",code="499",direction="outbound",namespace="e2e",peer_identity="",route="stuck.main"} 1"#;
    wait_until("the abandoned request is counted", WAIT, || async {
        proxy.admin_get("/metrics").await.1.contains(line)
    })
    .await;
    let recent = proxy.admin_json("/recent").await;
    let held: Vec<_> = recent["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == "/hold")
        .collect();
    assert_eq!(held.len(), 1, "{recent}");
    assert_eq!(held[0]["status"], 499, "{recent}");
    up.release_held();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_after_consecutive_failures_and_fails_fast() {
    let sick = crate::failing_log_service().await;
    let route = "      circuitBreaker: { consecutiveFailures: 3, openFor: 60s }\n";
    let proxy = TestProxy::start(&policy("sick", &[("up", sick.addr())], route)).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for i in 0..3 {
        let r = conn
            .request(Method::POST, "sick", "/logs", &[])
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "try {i}: {r:?}");
        assert_eq!(r.header("x-sluice-reason"), "", "the upstream's own 503");
    }
    for _ in 0..5 {
        let r = conn
            .request(Method::POST, "sick", "/logs", &[])
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.header("x-sluice-reason"), "breaker-open", "{r:?}");
    }
    // The open breaker kept the service from being called again.
    let mut direct = HttpConn::h1(sick.addr()).await.unwrap();
    let stats = direct.get("sick", "/logs/stats").await.unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.body).unwrap();
    assert_eq!(stats["failed"], 3, "{stats}");
    let breakers = proxy.admin_json("/breakers").await;
    assert!(breakers.to_string().contains("open"), "{breakers}");
    sick.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_weighted_split_keeps_each_user_on_one_side() {
    let a = Upstream::auto("a").await;
    let b = Upstream::auto("b").await;
    let route = "      split:\n        - weights: { a: 50, b: 50 }\n          stickyBy: { header: x-user-id }\n";
    let proxy =
        TestProxy::start(&policy("split", &[("a", a.addr()), ("b", b.addr())], route)).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let mut sides = HashSet::new();
    for user in 0..100 {
        let id = format!("user-{user}");
        let mut seen = HashSet::new();
        for _ in 0..3 {
            let r = conn
                .request(Method::GET, "split", "/", &[("x-user-id", &id)])
                .await
                .unwrap();
            assert_eq!(r.status, StatusCode::OK);
            seen.insert(r.header("x-upstream").to_string());
        }
        assert_eq!(seen.len(), 1, "{id} moved between sides: {seen:?}");
        sides.extend(seen);
    }
    assert_eq!(
        sides.len(),
        2,
        "100 users at 50/50 use both sides: {sides:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_among_live_ones_is_ejected_and_no_request_fails() {
    let mut ups = vec![
        Upstream::http1("a").await,
        Upstream::http1("b").await,
        Upstream::http1("c").await,
    ];
    let addresses = ups
        .iter()
        .map(|u| format!("\"{}\"", u.addr()))
        .collect::<Vec<_>>()
        .join(", ");
    let policy = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: pool, namespace: e2e }}\n\
         spec:\n  host: pool\n  backends:\n    pool: {{ addresses: [{addresses}] }}\n  routes:\n    - name: main\n\
         \x20     retry: {{ attempts: 2, on: [connect-failure, reset] }}\n"
    );
    let proxy = TestProxy::start(&policy).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();

    // Warm up to 50 requests: the endpoints that answered have latency samples and
    // pooled connections (one at a time, P2C keeps to the fastest and rarely tries
    // one it has not measured).
    for _ in 0..50 {
        assert_eq!(conn.get("pool", "/").await.unwrap().status, StatusCode::OK);
    }
    // The busiest endpoint dies: its listener and its connections close.
    let busiest = (0..ups.len()).max_by_key(|&i| ups[i].requests()).unwrap();
    let doomed = ups.remove(busiest);
    assert!(doomed.requests() > 0);
    doomed.shutdown().await;

    let retried = |metrics: &str| {
        metric_sum(
            metrics,
            "sluice_retries_total",
            &[r#"route="pool.main""#, r#"outcome="retried""#],
        )
    };
    let retried_before = retried(&scrape(proxy.admin_addr()).await);
    let served_before: Vec<u64> = ups.iter().map(Upstream::requests).collect();
    let started = Instant::now();
    // Requests go on until the dead endpoint has been drawn (its try failed and was
    // retried), then AFTER more. How many it takes to be drawn varies: P2C passes over
    // an endpoint while a latency peak lasts, and a busy machine gives one its peak
    // when it will.
    const AFTER: u64 = 150;
    let mut sent = 0u64;
    let mut drawn_at = None;
    while drawn_at.is_none_or(|at| sent < at + AFTER) {
        let r = conn.get("pool", "/").await.unwrap();
        assert_eq!(
            r.status,
            StatusCode::OK,
            "request {sent} after the death: {r:?}"
        );
        sent += 1;
        if drawn_at.is_none()
            && sent.is_multiple_of(10)
            && retried(&scrape(proxy.admin_addr()).await) > retried_before
        {
            drawn_at = Some(sent);
        }
        assert!(
            sent < 5_000,
            "the dead endpoint not drawn in {sent} requests"
        );
    }
    let elapsed = started.elapsed();
    let retries = retried(&scrape(proxy.admin_addr()).await) - retried_before;

    // Without ejection the dead endpoint, the fastest one measured, would win every
    // pair it is drawn in (two thirds of the requests), each then retried. Ejected
    // after its first refused connect (for 1 s, doubling on each failed probe), it
    // costs one retry for its broken pooled connection, one for the refused connect,
    // and one per probe after each ejection runs out.
    let bound = 2 + elapsed.as_secs() + 1;
    assert!(
        (1.0..=bound as f64).contains(&retries),
        "{retries} retries in {elapsed:?} (at most {bound}) for {sent} requests"
    );
    let served: Vec<u64> = ups
        .iter()
        .zip(served_before)
        .map(|(u, before)| u.requests() - before)
        .collect();
    assert_eq!(
        served.iter().sum::<u64>(),
        sent,
        "every request was answered by a live endpoint: {served:?}"
    );
    assert!(
        served.iter().all(|&n| n > 0),
        "both live endpoints serve: {served:?}"
    );
}

/// An HTTP/2 upstream that resets a stream with `REFUSED_STREAM` did not process the
/// request: a route retrying on `refused-stream` sends it again (here every try is
/// refused, so all three go out), one retrying on other failures does not. A reset with
/// another code may come after the upstream acted on the request: not retried as
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_retried_where_the_route_retries_refused_streams() {
    let up = Upstream::start("refusing", Protocol::Http2).await;
    let retrying = "      retry: { attempts: 2, on: [refused-stream] }\n";
    let proxy = TestProxy::start(&policy("refusing", &[("up", up.addr())], retrying)).await;
    let mut conn = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    let r = conn.get("refusing", "/refused").await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.header("x-sluice-reason"), "upstream-unavailable");
    assert_eq!(up.requests(), 3, "the first try and two retries");
    let served = conn.get("refusing", "/").await.unwrap();
    assert_eq!(served.status, StatusCode::OK, "the connection still serves");
    let before = up.requests();
    let r = conn.get("refusing", "/reset").await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.header("x-sluice-reason"), "upstream-unavailable");
    assert_eq!(
        up.requests() - before,
        1,
        "a stream reset with INTERNAL_ERROR is not a refused one"
    );

    let other = "      retry: { attempts: 2, on: [connect-failure, gateway-error] }\n";
    let up2 = Upstream::start("refusing", Protocol::Http2).await;
    let proxy = TestProxy::start(&policy("refusing", &[("up", up2.addr())], other)).await;
    let mut conn = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    let r = conn.get("refusing", "/refused").await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(up2.requests(), 1, "a refused stream is not a gateway error");
}

// One thread: upstream connections are pooled per thread, as each worker's are.
#[tokio::test(flavor = "current_thread")]
async fn a_stream_the_upstreams_goaway_left_out_is_retried_as_refused() {
    // The upstream's first connection reads the request and answers with a GOAWAY that
    // names no stream: it did not process it (RFC 9113 §6.8), so a route retrying
    // refused streams sends it again, on a new connection.
    let up = GoingAwayUpstream::start(1).await;
    let retrying = "      retry: { attempts: 2, on: [refused-stream] }\n";
    let proxy = TestProxy::start(&policy("leaving", &[("up", up.addr())], retrying)).await;
    let mut conn = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    let r = conn.get("leaving", "/").await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.streams(), 2, "the first try and its retry");
    assert_eq!(up.connections(), 2, "the retry on a connection of its own");
    let again = conn.get("leaving", "/").await.unwrap();
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(up.connections(), 2, "the new connection is pooled");

    // Not processed is not a gateway error: a route retrying only those leaves it.
    let other = "      retry: { attempts: 2, on: [connect-failure, gateway-error] }\n";
    let up2 = GoingAwayUpstream::start(u64::MAX).await;
    let proxy = TestProxy::start(&policy("leaving", &[("up", up2.addr())], other)).await;
    let mut conn = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    let r = conn.get("leaving", "/").await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.header("x-sluice-reason"), "upstream-unavailable");
    assert_eq!(
        up2.streams(),
        1,
        "a stream gone away under is not a gateway error"
    );
}

/// Two namespaces each hold a policy `log` with a route `ingest` (the same manifests
/// applied to staging and to prod). Each is its own route: staging's failing backend
/// opens staging's breaker only, prod's quota is prod's own, and metrics, `/breakers` and
/// a breaker reset by hand tell them apart by their `namespace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_policy_name_in_two_namespaces_shares_no_state() {
    let sick = crate::failing_log_service().await;
    let healthy = Upstream::auto("healthy").await;
    let doc = |ns: &str, addr: SocketAddr| {
        format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: log, namespace: {ns} }}\n\
             spec:\n  host: log.{ns}\n  backends:\n    v1: {{ addresses: [\"{addr}\"] }}\n  routes:\n\
             \x20   - name: ingest\n\
             \x20     circuitBreaker: {{ consecutiveFailures: 3, openFor: 60s }}\n\
             \x20     rateLimit: {{ perSecond: 1, burst: 4 }}\n"
        )
    };
    let yaml = format!(
        "{}---\n{}",
        doc("staging", sick.addr()),
        doc("prod", healthy.addr())
    );
    let proxy = TestProxy::start(&yaml).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();

    // Staging fails three times and its breaker opens.
    for i in 0..4 {
        let r = conn
            .request(Method::POST, "log.staging", "/logs", &[])
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "try {i}: {r:?}");
        let reason = if i < 3 { "" } else { "breaker-open" };
        assert_eq!(r.header("x-sluice-reason"), reason, "try {i}: {r:?}");
    }
    // Prod's breaker of the same route and backend name is another breaker, and prod's
    // bucket is its own: staging's four requests spent staging's burst, not prod's.
    for i in 0..4 {
        let r = conn
            .request(Method::POST, "log.prod", "/logs", &[])
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "prod try {i}: {r:?}");
    }

    let breakers = proxy.admin_json("/breakers").await;
    let states: HashSet<(String, String, String)> = breakers
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let s = |k: &str| b[k].as_str().unwrap_or_default().to_string();
            (s("namespace"), s("route"), s("state"))
        })
        .collect();
    let want: HashSet<(String, String, String)> = [
        ("staging", "log.ingest", "open"),
        ("prod", "log.ingest", "closed"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(states, want, "{breakers}");

    let text = scrape(proxy.admin_addr()).await;
    let ok = |ns: &str| {
        metric_sum(
            &text,
            "sluice_requests_total",
            &[
                &format!("namespace=\"{ns}\""),
                "route=\"log.ingest\"",
                "code=\"200\"",
            ],
        )
    };
    assert_eq!((ok("prod"), ok("staging")), (4.0, 0.0), "{text}");
    let open = |ns: &str| {
        metric_sum(
            &text,
            "sluice_breaker_state",
            &[&format!("namespace=\"{ns}\""), "state=\"open\""],
        )
    };
    assert_eq!((open("staging"), open("prod")), (1.0, 0.0), "{text}");

    // By hand: the route and backend name two breakers, so a namespace must be given.
    let (status, body) = proxy
        .admin_send(Method::POST, "/breakers/log.ingest/v1/reset", "")
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("prod, staging"), "{body}");
    let (status, body) = proxy
        .admin_send(
            Method::POST,
            "/breakers/log.ingest/v1/reset?namespace=staging",
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "staging/log.ingest/v1: reset\n");
    let (status, _) = proxy
        .admin_send(
            Method::POST,
            "/breakers/log.ingest/v1/open?namespace=qa",
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let breakers = proxy.admin_json("/breakers").await;
    assert!(
        breakers
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "closed"),
        "{breakers}"
    );
    sick.shutdown().await;
}
