//! Canary rollouts: the proxies' traffic reports reach the control plane, which
//! counts the proxies with traffic per route and tells the proxies, and drives each
//! rollout from them: asserted from `/rollouts` and the weights the proxies enforce.

use std::time::Duration;

use hyper::{Method, StatusCode};
use sluice_e2e::rollout::{RolloutMesh, canary_weight, history, last_reason};
use sluice_e2e::{
    HttpConn, ProxyOptions, Stall, TestControlPlane, TestProxy, Upstream, WAIT, metric_sum, scrape,
    wait_until,
};

fn opts() -> ProxyOptions {
    ProxyOptions {
        report_interval: Duration::from_millis(200),
        ..Default::default()
    }
}

fn two_backends(v1: std::net::SocketAddr, v2: std::net::SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: log, namespace: e2e }}
spec:
  host: log
  backends:
    v1: {{ addresses: ["{v1}"] }}
    v2: {{ addresses: ["{v2}"] }}
  routes:
    - name: ingest
      split:
        - weights: {{ v1: 50, v2: 50 }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_count_the_proxies_with_traffic_and_the_count_reaches_the_proxies() {
    let v1 = Upstream::http1("v1").await;
    let v2 = Upstream::http1("v2").await;
    let cp = TestControlPlane::start(&[("log.yaml", &two_backends(v1.addr(), v2.addr()))]).await;
    let states = tempfile::tempdir().unwrap();
    let mut proxies = Vec::new();
    for i in 0..2 {
        let dir = states.path().join(format!("p{i}"));
        proxies.push(TestProxy::start_subscribed(&cp.url(), &format!("p{i}"), &dir, opts()).await);
    }
    // Only the first proxy has traffic.
    let send = |n| {
        let addr = proxies[0].outbound_addr();
        async move {
            let mut conn = HttpConn::h1(addr).await.unwrap();
            for _ in 0..n {
                let r = conn.get("log", "/").await.unwrap();
                assert_eq!(r.status, StatusCode::OK);
            }
        }
    };
    send(10).await;
    wait_until(
        "the control plane counts one proxy with traffic",
        WAIT,
        || {
            let n = cp.proxies_with_traffic("e2e", "log", "ingest");
            async move { n == 1 }
        },
    )
    .await;
    // Both proxies hear it, although only one has traffic.
    for p in &proxies {
        let table = p.route_traffic();
        wait_until("a proxy hears the count", WAIT, || {
            let n = table.proxies("e2e", "log", "ingest");
            async move { n == Some(1) }
        })
        .await;
    }
    // The second proxy joins in.
    let addrs = [proxies[0].outbound_addr(), proxies[1].outbound_addr()];
    let table = proxies[0].route_traffic();
    wait_until("two proxies with traffic, heard by the first", WAIT, || {
        let table = table.clone();
        async move {
            for addr in addrs {
                let mut c = HttpConn::h1(addr).await.unwrap();
                assert_eq!(c.get("log", "/").await.unwrap().status, StatusCode::OK);
            }
            table.proxies("e2e", "log", "ingest") == Some(2)
        }
    })
    .await;
    assert_eq!(cp.proxies_with_traffic("e2e", "log", "ingest"), 2);
    let metrics = scrape(cp.admin_addr()).await;
    assert!(
        metric_sum(
            &metrics,
            "sluice_cp_reports_total",
            &["result=\"accepted\""]
        ) > 0.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "sluice_cp_reports_total",
            &["result=\"malformed\""]
        ),
        0.0
    );
    for p in proxies {
        p.shutdown().await;
    }
}

// === Rollouts driven by the control plane ===

/// A block stepping 10 → 50 → 100 every second, judged on 20 canary requests. Its
/// p99 bound is far above what loopback takes even on a busy machine.
const HEALTHY: &str = "            canary: v2
            steps: [10, 50, 100]
            interval: 1s
            minRequests: 20
            slo: { errorRate: 0.01, p99: 2s }
            baseline: { errorRateIncrease: 0.01 }
";

/// [`HEALTHY`] with a p99 bound of 150 ms.
const FAST: &str = "            canary: v2
            steps: [10, 50, 100]
            interval: 1s
            minRequests: 20
            slo: { errorRate: 0.01, p99: 150ms }
";

fn passed_each_step(r: &serde_json::Value) {
    let h = history(r);
    assert!(!h.iter().any(|x| x == "rolled-back"), "{r:#}");
    // One conclusive window per step: each step ends with a pass.
    let advanced = h.iter().filter(|x| *x == "advanced").count();
    assert_eq!(advanced, 2, "{r:#}");
    assert_eq!(h.last().map(String::as_str), Some("promoted"), "{r:#}");
    assert_eq!(r["lastWindow"]["decision"], "pass", "{r:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted_at_200_requests_a_second() {
    let mesh = RolloutMesh::start(HEALTHY).await;
    mesh.wait_canary_everywhere(10).await;
    let load = mesh.load(200.0).await;
    let r = mesh
        .wait_rollout("the canary is promoted", |r| r["phase"] == "promoted")
        .await;
    let statuses = load.stop().await;
    passed_each_step(&r);
    mesh.wait_canary_everywhere(100).await;
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        [200],
        "{statuses:?}"
    );
    assert!(mesh.canary.requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_at_5_requests_a_second_waits_for_enough_requests() {
    let block = "            canary: v2
            steps: [50, 100]
            interval: 1s
            minRequests: 10
            slo: { errorRate: 0.01 }
";
    let mesh = RolloutMesh::start(block).await;
    mesh.wait_canary_everywhere(50).await;
    let load = mesh.load(5.0).await;
    let r = mesh
        .wait_rollout("the canary is promoted", |r| r["phase"] == "promoted")
        .await;
    load.stop().await;
    let h = history(&r);
    assert!(!h.iter().any(|x| x == "rolled-back"), "{r:#}");
    // At 2.5 canary requests a second, the first one-second windows cannot hold 10:
    // they are inconclusive and add up until one is conclusive.
    let first_advance = h.iter().position(|x| x == "advanced").expect("advanced");
    assert!(
        h[..first_advance].iter().any(|x| x == "inconclusive"),
        "{r:#}"
    );
    assert_eq!(h.last().map(String::as_str), Some("promoted"));
    mesh.wait_canary_everywhere(100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_half_its_requests_is_rolled_back_at_the_first_report() {
    let mesh = RolloutMesh::start(HEALTHY).await;
    mesh.canary.set_fail_every(2);
    mesh.wait_canary_everywhere(10).await;
    let load = mesh.load(200.0).await;
    let r = mesh
        .wait_rollout("the canary is rolled back", |r| r["phase"] == "rolled-back")
        .await;
    load.stop().await;
    // Rolled back at its first step (windows before the load may be inconclusive).
    let h: Vec<String> = history(&r)
        .into_iter()
        .filter(|x| x != "inconclusive")
        .collect();
    assert_eq!(h, ["started", "rolled-back"], "{r:#}");
    let last = r["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["step"], 0, "{r:#}");
    assert!(last["reason"].as_str().unwrap().contains("gross"), "{r:#}");
    assert_eq!(
        r["lastWindow"]["checks"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["name"],
        "grossErrorRate"
    );
    mesh.wait_canary_everywhere(0).await;
    // From now on the canary gets nothing.
    let before = mesh.canary.requests();
    for p in &mesh.proxies {
        let mut c = HttpConn::h1(p.outbound_addr()).await.unwrap();
        for _ in 0..30 {
            assert_eq!(c.get("log", "/").await.unwrap().status, StatusCode::OK);
        }
    }
    assert_eq!(mesh.canary.requests(), before);
    // Not even by the header rule that named it.
    let mut c = HttpConn::h1(mesh.proxies[0].outbound_addr()).await.unwrap();
    let r = c
        .request(Method::GET, "log", "/", &[("x-canary", "true")])
        .await
        .unwrap();
    assert_eq!(r.header("x-upstream"), "v1");
    assert_eq!(mesh.canary.requests(), before);
    // The rolled-back state holds.
    assert_eq!(mesh.rollout().await["phase"], "rolled-back");
}

/// Makes the canary answer 300 ms late, sends 200 requests a second, and waits until
/// the rollout is rolled back; returns its last state and the statuses the load got.
async fn a_300ms_slower_canary_rolled_back(
    mesh: &RolloutMesh,
) -> (serde_json::Value, std::collections::BTreeMap<u16, u64>) {
    mesh.canary
        .set_stall(Stall::Delay(Duration::from_millis(300)));
    mesh.wait_canary_everywhere(10).await;
    let load = mesh.load(200.0).await;
    let r = mesh
        .wait_rollout("the canary is rolled back", |r| r["phase"] == "rolled-back")
        .await;
    (r, load.stop().await)
}

/// A canary that only times out (the route's 100 ms timeout against a canary 300 ms
/// slow) is rolled back on its error rate: each 504 counts against the canary, as the
/// checks need. Those timeouts were counted under no backend, and the canary looked
/// clean; the p99 bound here (2 s) is far above the timeout, so only the errors can
/// roll it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_only_times_out_is_rolled_back_on_its_errors() {
    let mesh = RolloutMesh::start_with(HEALTHY, "      timeout: 100ms\n").await;
    let (r, statuses) = a_300ms_slower_canary_rolled_back(&mesh).await;
    assert!(statuses.contains_key(&504), "{statuses:?}");
    let reason = last_reason(&r);
    assert!(reason.contains("canary requests failed"), "{r:#}");
    // The load is spread over three proxies and the rollback can come before each
    // has timed out a canary request, so the 504s are summed over all of them.
    let mut texts = String::new();
    for p in &mesh.proxies {
        texts.push_str(&scrape(p.admin_addr()).await);
    }
    assert!(
        metric_sum(
            &texts,
            "sluice_requests_total",
            &[r#"backend="v2""#, r#"code="504""#]
        ) > 0.0,
        "{texts}"
    );
    mesh.wait_canary_everywhere(0).await;
}

/// A canary whose every try times out while the route falls back to the stable
/// backend is rolled back: the callers see only v1's answers, and the canary's
/// reports count no answer of its own, only the fallbacks it caused. Those were counted
/// as failures of no request, so the canary looked idle (inconclusive) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_always_falls_back_is_rolled_back() {
    let route = "      timeout: 2s
      retry: { attempts: 1, on: [timeout], perTryTimeout: 100ms }
      fallback: { on: [timeout], backend: cache }
";
    // The fallback backend is the stable upstream under another name (a route may not
    // fall back to a backend it splits to).
    let mesh = RolloutMesh::start_with_policy(|v1, v2| {
        sluice_e2e::rollout::rollout_policy(v1, v2, HEALTHY, route).replace(
            "  routes:\n",
            &format!("    cache: {{ addresses: [\"{v1}\"] }}\n  routes:\n"),
        )
    })
    .await;
    let (r, statuses) = a_300ms_slower_canary_rolled_back(&mesh).await;
    assert_eq!(statuses.keys().collect::<Vec<_>>(), [&200], "{statuses:?}");
    assert!(last_reason(&r).contains("canary requests failed"), "{r:#}");
    let mut texts = String::new();
    for p in &mesh.proxies {
        texts.push_str(&scrape(p.admin_addr()).await);
    }
    assert!(
        metric_sum(&texts, "sluice_fallbacks_total", &[r#"backend="v2""#]) > 0.0,
        "{texts}"
    );
    mesh.wait_canary_everywhere(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_300ms_slower_breaches_p99_and_is_rolled_back() {
    let mesh = RolloutMesh::start(FAST).await;
    let (r, _) = a_300ms_slower_canary_rolled_back(&mesh).await;
    let reason = last_reason(&r);
    assert!(reason.contains("p99"), "{r:#}");
    let p99 = r["lastWindow"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "p99")
        .unwrap()
        .clone();
    assert_eq!(p99["verdict"], "breach", "{r:#}");
    assert!(p99["value"].as_f64().unwrap() >= 0.25, "{r:#}");
    mesh.wait_canary_everywhere(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_promote_and_abort_by_hand() {
    // Held at its first step: the interval is long.
    let block = |steps: &str| {
        format!(
            "            canary: v2
            steps: {steps}
            interval: 10m
            minRequests: 1
"
        )
    };
    let mesh = RolloutMesh::start(&block("[10, 50, 100]")).await;
    mesh.wait_canary_everywhere(10).await;
    let base = "/rollouts/e2e/log/ingest";
    let (s, body) = mesh.cp.admin_post(&format!("{base}/pause")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(mesh.rollout().await["phase"], "paused");
    assert_eq!(
        mesh.cp.admin_post(&format!("{base}/pause")).await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        mesh.cp.admin_post(&format!("{base}/resume")).await.0,
        StatusCode::OK
    );
    assert_eq!(mesh.rollout().await["phase"], "progressing");
    assert_eq!(
        mesh.cp.admin_post(&format!("{base}/promote")).await.0,
        StatusCode::OK
    );
    mesh.wait_canary_everywhere(100).await;
    let r = mesh.rollout().await;
    assert_eq!(
        history(&r),
        ["started", "paused", "resumed", "promoted"],
        "{r:#}"
    );
    // Terminal: held until the block changes.
    assert_eq!(
        mesh.cp.admin_post(&format!("{base}/abort")).await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        mesh.cp.admin_post("/rollouts/e2e/log/nope/abort").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        mesh.cp.admin_post(&format!("{base}/explode")).await.0,
        StatusCode::NOT_FOUND
    );

    // A new block starts a new rollout, which is aborted by hand.
    mesh.write_policy(&block("[20, 100]"), "");
    mesh.wait_rollout("the new block starts", |r| r["canaryWeight"] == 20)
        .await;
    mesh.wait_canary_everywhere(20).await;
    assert_eq!(
        mesh.cp.admin_post(&format!("{base}/abort")).await.0,
        StatusCode::OK
    );
    mesh.wait_canary_everywhere(0).await;
    let r = mesh.rollout().await;
    assert_eq!(history(&r), ["started", "rolled-back"], "{r:#}");
    assert_eq!(r["history"][1]["reason"], "aborted by hand");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_elsewhere_in_the_policy_does_not_reset_the_rollout() {
    let block = "            canary: v2
            steps: [10, 50, 100]
            interval: 10m
            minRequests: 1
";
    let mesh = RolloutMesh::start(block).await;
    mesh.wait_canary_everywhere(10).await;
    let before = mesh.rollout().await;
    let version = mesh.cp.version().unwrap();
    mesh.write_policy(block, "      timeout: 7s\n");
    wait_until("the edit is published", WAIT, || {
        let v = mesh.cp.version();
        let old = version.clone();
        async move { v.is_some_and(|v| v != old) }
    })
    .await;
    let new = mesh.cp.version().unwrap();
    mesh.cp.wait_acked_everywhere(&new, 3).await;
    let after = mesh.rollout().await;
    assert_eq!(after["block"], before["block"]);
    assert_eq!(history(&after), ["started"], "{after:#}");
    // The new version carries the edit and the rollout's weights, not the file's.
    for p in &mesh.proxies {
        assert_eq!(canary_weight(p), Some(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_down_freezes_the_weights_and_its_restart_resumes_the_step() {
    let mut mesh = RolloutMesh::start(HEALTHY).await;
    mesh.wait_canary_everywhere(10).await;
    // Traffic until the first step passes; the second is held by hand (its own window
    // needs every proxy's ack and a full interval first, so the pause comes in time).
    let load = mesh.load(200.0).await;
    mesh.wait_rollout("the first step passes", |r| r["step"] == 1)
        .await;
    let base = "/rollouts/e2e/log/ingest";
    let (s, body) = mesh.cp.admin_post(&format!("{base}/pause")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    load.stop().await;
    let r = mesh.rollout().await;
    assert_eq!(
        (r["step"].as_u64(), r["phase"].as_str()),
        (Some(1), Some("paused")),
        "{r:#}"
    );
    mesh.wait_canary_everywhere(50).await;
    let version = mesh.cp.version().unwrap();
    mesh.cp.wait_acked_everywhere(&version, 3).await;

    mesh.cp.stop().await;
    // The proxies keep serving with the step's weights.
    for p in &mesh.proxies {
        assert_eq!(canary_weight(p), Some(50));
        let mut c = HttpConn::h1(p.outbound_addr()).await.unwrap();
        for _ in 0..10 {
            assert_eq!(c.get("log", "/").await.unwrap().status, StatusCode::OK);
        }
    }

    mesh.cp.restart().await;
    let r = mesh.rollout().await;
    assert_eq!(
        (r["step"].as_u64(), r["phase"].as_str()),
        (Some(1), Some("paused")),
        "{r:#}"
    );
    assert_eq!(r["canaryWeight"], 50);
    assert!(history(&r).iter().any(|x| x == "restarted"), "{r:#}");
    assert_eq!(
        mesh.cp.version().as_deref(),
        Some(version.as_str()),
        "the same weights, the same version"
    );
    mesh.cp.wait_acked_everywhere(&version, 3).await;
    assert_eq!(
        mesh.cp.admin_post(&format!("{base}/resume")).await.0,
        StatusCode::OK
    );
    // With traffic again it carries on from there.
    let load = mesh.load(200.0).await;
    let r = mesh
        .wait_rollout("the canary is promoted", |r| r["phase"] == "promoted")
        .await;
    load.stop().await;
    assert!(!history(&r).iter().any(|x| x == "rolled-back"), "{r:#}");
    assert_eq!(
        history(&r).iter().filter(|x| *x == "started").count(),
        1,
        "{r:#}"
    );
}
