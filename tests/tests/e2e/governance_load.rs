//! Governance over many requests: split shares and live weight edits, stickiness across
//! sidecars, and the retry budget against an upstream that always fails.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hyper::{Method, StatusCode};
use sluice_e2e::{HttpConn, Protocol, TestProxy, Upstream, restartable_addr};

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
    // The picks are independent draws, so the share is binomial: allow five standard
    // deviations (about 3.4 points at 2,000 requests) so the check fails on a biased
    // split, not on a one-in-a-thousand run of luck.
    let share = f64::from(to_b) * 100.0 / f64::from(total);
    let sigma = 100.0 * (0.1 * 0.9 / f64::from(total)).sqrt();
    assert!(
        (share - 10.0).abs() <= 5.0 * sigma,
        "b got {share:.1} % of {total} (allowed 10 ± {:.1})",
        5.0 * sigma
    );

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
    let sick = crate::failing_log_service().await;
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
        "sluice_retries_total{backend=\"up\",namespace=\"e2e\",outcome=\"retried\"",
    );
    let bound = ratio * f64::from(requests) + min_per_second * seconds;
    assert!(retried > 0.0, "some retries happen:\n{text}");
    assert!(retried <= bound, "{retried} retries > {bound}");
    assert!(
        metric(
            &text,
            "sluice_retries_total{backend=\"up\",namespace=\"e2e\",outcome=\"budget_exhausted\""
        ) > 0.0,
        "the budget ran out:\n{text}"
    );
    // The metric families the dashboards read are all there.
    assert!(text.contains("sluice_ratelimit_decisions_total{decision=\"allowed\",direction=\"outbound\",namespace=\"e2e\",route=\"sick.main\"}"), "{text}");
    assert!(
        text.contains(
            "sluice_breaker_state{backend=\"up\",namespace=\"e2e\",route=\"sick.main\",state=\"closed\"} 1"
        ),
        "{text}"
    );
    sick.shutdown().await;
}

/// How the answers of a concurrent load split.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    /// 502 `upstream-unavailable`: the proxy tried the backend and could not reach it.
    unavailable: u64,
    /// 503 `breaker-open`.
    breaker_open: u64,
    /// 503 `no-healthy-endpoint`.
    no_healthy: u64,
    /// Anything else, and transport errors: lost requests.
    unexpected: Vec<String>,
}

/// Client tasks over keep-alive HTTP/1.1 connections that send `GET host path` as fast as
/// the test hands out requests: [`Load::run`] releases a batch and waits for every answer,
/// so the test bounds how many requests go out and knows none is in flight between batches.
struct Load {
    permits: tokio::sync::Semaphore,
    tally: std::sync::Mutex<Tally>,
    sent: std::sync::atomic::AtomicU64,
    answered: std::sync::atomic::AtomicU64,
}

impl Load {
    async fn start(
        proxy: SocketAddr,
        clients: usize,
        host: &'static str,
    ) -> (std::sync::Arc<Self>, tokio::task::JoinSet<()>) {
        let load = std::sync::Arc::new(Self {
            permits: tokio::sync::Semaphore::new(0),
            tally: Default::default(),
            sent: Default::default(),
            answered: Default::default(),
        });
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let mut conn = HttpConn::h1(proxy).await.unwrap();
            let load = load.clone();
            tasks.spawn(async move {
                while let Ok(permit) = load.permits.acquire().await {
                    permit.forget();
                    load.sent.fetch_add(1, Ordering::SeqCst);
                    let answer = conn.get(host, "/").await;
                    let mut t = load.tally.lock().unwrap();
                    match answer {
                        Ok(r) => match (r.status.as_u16(), r.header("x-sluice-reason")) {
                            (200..=299, _) => t.ok += 1,
                            (502, "upstream-unavailable") => t.unavailable += 1,
                            (503, "breaker-open") => t.breaker_open += 1,
                            (503, "no-healthy-endpoint") => t.no_healthy += 1,
                            _ => t.unexpected.push(format!("{r:?}")),
                        },
                        Err(e) => t.unexpected.push(format!("transport error: {e}")),
                    }
                    drop(t);
                    load.answered.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        (load, tasks)
    }

    /// Sends `n` more requests across the clients and waits until all are answered.
    async fn run(&self, n: u64) {
        let target = self.answered.load(Ordering::SeqCst) + n;
        self.permits.add_permits(n as usize);
        sluice_e2e::wait_until(
            "every request of the batch is answered",
            sluice_e2e::WAIT,
            || async { self.answered.load(Ordering::SeqCst) >= target },
        )
        .await;
    }

    fn snapshot(&self) -> (u64, u64, u64, u64, usize) {
        let t = self.tally.lock().unwrap();
        (
            t.ok,
            t.unavailable,
            t.breaker_open,
            t.no_healthy,
            t.unexpected.len(),
        )
    }
}

async fn breaker_of(proxy: &TestProxy, route: &str) -> serde_json::Value {
    let breakers = proxy.admin_json("/breakers").await;
    breakers
        .as_array()
        .and_then(|l| l.iter().find(|b| b["route"] == route))
        .unwrap_or_else(|| panic!("no breaker for {route}: {breakers}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn breaker_opens_when_a_backend_dies_under_load_and_half_open_probes_close_it_when_it_returns()
 {
    const CLIENTS: u64 = 12;
    const CONSECUTIVE: u64 = 5;
    // It dies and returns on its port: one a restart can have again.
    let svc = Upstream::start_on("v2", Protocol::Http1, restartable_addr()).await;
    let addr = svc.addr();
    let policy = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: logs, namespace: e2e }}\n\
         spec:\n  host: logs\n  backends:\n    v2: {{ addresses: [\"{addr}\"] }}\n  routes:\n    - name: main\n\
         \x20     circuitBreaker: {{ consecutiveFailures: {CONSECUTIVE}, openFor: 200ms, halfOpenRequests: 1 }}\n"
    );
    let proxy = TestProxy::start(&policy).await;
    let (load, mut clients) = Load::start(proxy.outbound_addr(), CLIENTS as usize, "logs").await;

    // Healthy: every request succeeds.
    load.run(20 * CLIENTS).await;
    assert_eq!(load.snapshot(), (20 * CLIENTS, 0, 0, 0, 0));
    assert_eq!(svc.requests(), 20 * CLIENTS);
    svc.shutdown().await;

    // The backend is gone: the first tries fail with `upstream-unavailable` until the
    // breaker opens, then traffic fails fast with `breaker-open`.
    sluice_e2e::wait_until("the breaker opens under load", sluice_e2e::WAIT, || async {
        load.run(CLIENTS).await;
        let (_, _, fast, _, _) = load.snapshot();
        fast >= 10 * CLIENTS && breaker_of(&proxy, "logs.main").await["state"] == "open"
    })
    .await;
    let b = breaker_of(&proxy, "logs.main").await;
    assert!(
        b["recent_transitions"].to_string().contains("consecutive"),
        "the opening says why: {b}"
    );
    // While open the dead backend is tried only by half-open probes (one per probe window):
    // beyond the tries before the breaker opened, each try is a probe.
    let (_, text) = proxy.admin_get("/metrics").await;
    // The gauge and the transitions counter say so too.
    for want in [
        "sluice_breaker_state{backend=\"v2\",namespace=\"e2e\",route=\"logs.main\",state=\"closed\"} 0",
        "sluice_breaker_transitions_total{backend=\"v2\",from=\"closed\",namespace=\"e2e\",route=\"logs.main\",to=\"open\"} 1",
    ] {
        assert!(text.lines().any(|l| l == want), "{want} in\n{text}");
    }
    let probe_windows: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("sluice_breaker_transitions_total{")
                && l.contains("route=\"logs.main\"")
                && l.contains("to=\"half_open\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let (_, unavailable, _, _, unexpected) = load.snapshot();
    assert_eq!(unexpected, 0, "{:?}", load.tally.lock().unwrap());
    assert!(unavailable >= 1, "the dead backend was tried");
    assert!(
        unavailable as f64 <= (CONSECUTIVE + CLIENTS) as f64 + probe_windows,
        "{unavailable} tries reached the dead backend ({probe_windows} probe windows)"
    );

    // The backend returns on the same address; half-open probes close the breaker and
    // traffic succeeds again.
    let svc = Upstream::start_on("v2", Protocol::Http1, addr).await;
    sluice_e2e::wait_until("the breaker closes again", sluice_e2e::WAIT, || async {
        load.run(CLIENTS).await;
        breaker_of(&proxy, "logs.main").await["state"] == "closed"
    })
    .await;
    let (ok_before, ..) = load.snapshot();
    load.run(20 * CLIENTS).await;
    let (ok_after, unavailable_after, ..) = load.snapshot();
    assert_eq!(
        ok_after - ok_before,
        20 * CLIENTS,
        "{:?}",
        load.tally.lock().unwrap()
    );
    assert_eq!(
        unavailable_after, unavailable,
        "a returned backend is reachable"
    );

    // Every request got an answer, and each is a success or a failure by design.
    load.permits.close();
    while let Some(joined) = clients.join_next().await {
        joined.unwrap();
    }
    {
        let t = load.tally.lock().unwrap();
        assert!(t.unexpected.is_empty(), "{t:?}");
        let answered = t.ok + t.unavailable + t.breaker_open + t.no_healthy;
        assert_eq!(load.sent.load(Ordering::SeqCst), answered, "{t:?}");
        assert_eq!(load.answered.load(Ordering::SeqCst), answered, "{t:?}");
        assert!(answered <= 5_000, "the run stays bounded: {t:?}");
        assert!(t.unavailable >= 1 && t.breaker_open >= 1, "{t:?}");
    }
    let b = breaker_of(&proxy, "logs.main").await;
    assert_eq!(b["state"], "closed", "{b}");
    let (_, text) = proxy.admin_get("/metrics").await;
    assert!(
        text.contains(
            "sluice_breaker_state{backend=\"v2\",namespace=\"e2e\",route=\"logs.main\",state=\"closed\"} 1"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_of_the_same_name_in_two_policies_keep_apart_in_metrics_and_breakers() {
    let up = Upstream::auto("up").await;
    let doc = |name: &str| {
        format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: {name}, namespace: e2e }}\n\
             spec:\n  host: {name}\n  backends:\n    up: {{ addresses: [\"{}\"] }}\n  routes:\n    - name: main\n\
             \x20     rateLimit: {{ perSecond: 100000, burst: 100000 }}\n\
             \x20     circuitBreaker: {{ consecutiveFailures: 5 }}\n",
            up.addr()
        )
    };
    let proxy = TestProxy::start(&format!("{}---\n{}", doc("one"), doc("two"))).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for host in ["one", "two", "two"] {
        assert_eq!(conn.get(host, "/").await.unwrap().status, StatusCode::OK);
    }
    let (_, text) = proxy.admin_get("/metrics").await;
    for (route, n) in [("one.main", 1), ("two.main", 2)] {
        let requests = format!(
            "sluice_requests_total{{backend=\"up\",code=\"200\",direction=\"outbound\",namespace=\"e2e\",peer_identity=\"\",route=\"{route}\"}} {n}\n"
        );
        let decisions = format!(
            "sluice_ratelimit_decisions_total{{decision=\"allowed\",direction=\"outbound\",namespace=\"e2e\",route=\"{route}\"}} {n}\n"
        );
        let duration = format!(
            "sluice_request_duration_seconds_count{{backend=\"up\",direction=\"outbound\",namespace=\"e2e\",peer_identity=\"\",route=\"{route}\"}} {n}\n"
        );
        for series in [requests, decisions, duration] {
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
    }
    assert!(!text.contains("route=\"main\""), "{text}");
    let breakers = proxy.admin_json("/breakers").await.to_string();
    assert!(
        breakers.contains("\"one.main\"") && breakers.contains("\"two.main\""),
        "{breakers}"
    );
}
