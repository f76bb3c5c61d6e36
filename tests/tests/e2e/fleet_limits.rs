//! Fleet-wide rate limits (`rateLimit.scope: fleet`) through real proxies sharing a real
//! `redis-server`: the fleet admits within the README's bound, Redis killed, restarted
//! or paused under load fails no request, and Redis keys expire; without Redis each
//! proxy enforces perSecond / N with N from the control plane; `rediss://` works with
//! rustls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use sluice_e2e::{
    HttpConn, ProxyOptions, TestControlPlane, TestProxy, TestRedis, Upstream, WAIT, metric_sum,
    scrape, wait_keys, wait_until,
};
use sluice_proxy::fleet::FleetConfig;

/// A request that takes this long failed: far below every Redis timeout set here, so a
/// request that waited on Redis would show as failed.
const STALL: Duration = Duration::from_secs(10);

fn policy(up: SocketAddr, per_second: u32, burst: u32) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: quota, namespace: e2e }}\n\
         spec:\n  host: quota\n  backends:\n    up: {{ addresses: [\"{up}\"] }}\n  routes:\n    - name: api\n\
         \x20     rateLimit: {{ perSecond: {per_second}, burst: {burst}, key: {{ header: x-tenant }}, scope: fleet }}\n"
    )
}

async fn proxies(n: usize, yaml: &str, fleet: FleetConfig) -> Vec<TestProxy> {
    let mut v = Vec::new();
    for _ in 0..n {
        let opts = ProxyOptions {
            fleet: fleet.clone(),
            ..Default::default()
        };
        v.push(TestProxy::start_with(yaml, opts).await);
    }
    v
}

fn fleet(redis: &TestRedis, timeout: Duration, interval: Duration) -> FleetConfig {
    FleetConfig {
        redis_url: Some(redis.url()),
        redis_timeout: timeout,
        sync_interval: interval,
        fleet_size: 3.try_into().unwrap(),
        ..Default::default()
    }
}

/// What the clients saw, by answer.
#[derive(Default)]
struct Tally {
    admitted: AtomicU64,
    limited: AtomicU64,
    degraded_admitted: AtomicU64,
    degraded_limited: AtomicU64,
    /// Anything but 200 or 429, a broken connection or a stalled request.
    failed: AtomicU64,
}

impl Tally {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    fn requests(&self) -> u64 {
        [
            &self.admitted,
            &self.limited,
            &self.degraded_admitted,
            &self.degraded_limited,
            &self.failed,
        ]
        .iter()
        .map(|c| Self::get(c))
        .sum()
    }
    fn degraded(&self) -> u64 {
        Self::get(&self.degraded_admitted) + Self::get(&self.degraded_limited)
    }
    fn fleet_answers(&self) -> u64 {
        Self::get(&self.admitted) + Self::get(&self.limited)
    }
}

/// Closed-loop clients: `conns` connections to `proxy`, each sending GETs for tenant
/// `acme` until `stop`.
fn load(
    proxy: SocketAddr,
    conns: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..conns)
        .map(|_| {
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                let mut conn = None;
                while !stop.load(Ordering::Relaxed) {
                    if conn.is_none() {
                        conn = HttpConn::h1(proxy).await.ok();
                    }
                    let Some(c) = conn.as_mut() else {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let r = tokio::time::timeout(
                        STALL,
                        c.request(Method::GET, "quota", "/", &[("x-tenant", "acme")]),
                    )
                    .await;
                    let counter = match r {
                        Ok(Ok(r)) => {
                            let degraded = r.header("x-sluice-ratelimit-scope") == "degraded-local";
                            match (r.status, degraded) {
                                (StatusCode::OK, false) => &tally.admitted,
                                (StatusCode::OK, true) => &tally.degraded_admitted,
                                (StatusCode::TOO_MANY_REQUESTS, false) => &tally.limited,
                                (StatusCode::TOO_MANY_REQUESTS, true) => &tally.degraded_limited,
                                _ => &tally.failed,
                            }
                        }
                        _ => {
                            conn = None;
                            &tally.failed
                        }
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

async fn stop_load(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
}

async fn degraded_gauge(p: &TestProxy) -> f64 {
    metric_sum(
        &scrape(p.admin_addr()).await,
        "sluice_ratelimit_fleet_degraded",
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_with_uneven_load_admit_within_the_stated_bound() {
    let (per_second, burst): (f64, f64) = (100.0, 100.0);
    let redis = TestRedis::start().await;
    let up = Upstream::auto("quota").await;
    let interval = Duration::from_millis(200);
    let ps = proxies(
        3,
        &policy(up.addr(), 100, 100),
        fleet(&redis, Duration::from_secs(10), interval),
    )
    .await;
    let tallies: Vec<Arc<Tally>> = (0..3).map(|_| Arc::default()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    // Uneven: 4, 2 and 1 connections, each as fast as it goes.
    for (i, conns) in [4, 2, 1].into_iter().enumerate() {
        tasks.extend(load(
            ps[i].outbound_addr(),
            conns,
            tallies[i].clone(),
            stop.clone(),
        ));
    }
    let admitted = || tallies.iter().map(|t| Tally::get(&t.admitted)).sum::<u64>();
    wait_until("the fleet admitted 400 requests", WAIT * 3, || async {
        admitted() >= 400
    })
    .await;
    stop_load(&stop, tasks).await;
    let t = start.elapsed().as_secs_f64();

    let total = admitted();
    let requests: u64 = tallies.iter().map(|t| t.requests()).sum();
    let failed: u64 = tallies.iter().map(|t| Tally::get(&t.failed)).sum();
    let degraded: u64 = tallies
        .iter()
        .map(|t| Tally::get(&t.degraded_admitted))
        .sum();
    assert_eq!(failed, 0, "every request is answered 200 or 429");
    // The README's bound: capacity + perSecond × t + ⌈burst / N⌉ per proxy of credit.
    // (Answers of the local fallback, if Redis was ever slower than three intervals on a
    // busy machine, are marked and counted apart.)
    let capacity = burst.max(per_second * 2.0 * interval.as_secs_f64());
    // Shares idle through a fallback episode are dropped and start again on credit.
    let episodes = if degraded > 0 { 2.0 } else { 1.0 };
    let upper = capacity + per_second * t + episodes * 3.0 * (burst / 3.0).ceil();
    assert!(
        total as f64 <= upper,
        "admitted {total} in {t:.2}s > bound {upper:.0} ({requests} requests, {degraded} by the fallback)"
    );
    // And most of the quota is used.
    let quota = per_second * t;
    assert!(
        (total + degraded) as f64 >= 0.5 * quota.min(requests as f64),
        "admitted only {total} of a quota of {quota:.0} in {t:.2}s ({requests} requests)"
    );
    // Every proxy, even the one with one connection, got part of it.
    for (i, tally) in tallies.iter().enumerate() {
        assert!(
            Tally::get(&tally.admitted) > 0,
            "proxy {i} admitted nothing"
        );
    }
    // Fleet answers are the rule here.
    assert!(tallies.iter().map(|t| t.fleet_answers()).sum::<u64>() > requests / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_fails_no_request() {
    let mut redis = TestRedis::start().await;
    let up = Upstream::auto("quota").await;
    let ps = proxies(
        2,
        &policy(up.addr(), 200, 200),
        fleet(&redis, Duration::from_secs(1), Duration::from_millis(100)),
    )
    .await;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = load(ps[0].outbound_addr(), 2, tally.clone(), stop.clone());
    tasks.extend(load(ps[1].outbound_addr(), 1, tally.clone(), stop.clone()));
    wait_until("requests admitted with Redis up", WAIT, || async {
        Tally::get(&tally.admitted) >= 50
    })
    .await;

    redis.kill();
    wait_until("answers from the local fallback", WAIT, || async {
        tally.degraded() >= 50
    })
    .await;
    // The answers are both proxies'; each counts its own failed reconciliations and
    // goes degraded on its own reconciliation's schedule.
    wait_until("the failed reconciliations are counted", WAIT, || async {
        metric_sum(
            &scrape(ps[0].admin_addr()).await,
            "sluice_ratelimit_backend_errors_total",
            &[],
        ) >= 1.0
    })
    .await;
    wait_until("the first proxy says it is degraded", WAIT, || async {
        degraded_gauge(&ps[0]).await == 1.0
    })
    .await;

    redis.restart().await;
    for p in &ps {
        wait_until("the proxy reconciles with Redis again", WAIT, || async {
            degraded_gauge(p).await == 0.0
        })
        .await;
    }
    let fleet_before = tally.fleet_answers();
    wait_until("fleet answers after the restart", WAIT, || async {
        tally.fleet_answers() >= fleet_before + 50
    })
    .await;
    stop_load(&stop, tasks).await;
    assert_eq!(
        Tally::get(&tally.failed),
        0,
        "no request failed beyond the limit's own 429s ({} requests)",
        tally.requests()
    );
    assert!(
        redis.dbsize().await >= 1,
        "the bucket is back in the new Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_under_load_every_request_still_completes() {
    let redis = TestRedis::start().await;
    let up = Upstream::auto("quota").await;
    // Redis timeout far above the test's own bound (STALL): requests must not wait on it.
    let ps = proxies(
        2,
        &policy(up.addr(), 200, 200),
        fleet(&redis, Duration::from_secs(120), Duration::from_millis(100)),
    )
    .await;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = load(ps[0].outbound_addr(), 2, tally.clone(), stop.clone());
    tasks.extend(load(ps[1].outbound_addr(), 1, tally.clone(), stop.clone()));
    wait_until("requests admitted with Redis up", WAIT, || async {
        Tally::get(&tally.admitted) >= 50
    })
    .await;

    redis.pause();
    wait_until(
        "answers from the local fallback while Redis is paused",
        WAIT,
        || async { tally.degraded() >= 100 },
    )
    .await;
    assert_eq!(degraded_gauge(&ps[0]).await, 1.0);
    let during = tally.requests();

    redis.resume();
    for p in &ps {
        wait_until("the proxy hears from Redis again", WAIT, || async {
            degraded_gauge(p).await == 0.0
        })
        .await;
    }
    let fleet_before = tally.fleet_answers();
    wait_until("fleet answers after the pause", WAIT, || async {
        tally.fleet_answers() >= fleet_before + 50
    })
    .await;
    stop_load(&stop, tasks).await;
    assert_eq!(
        Tally::get(&tally.failed),
        0,
        "every request completed while Redis was paused ({during} by then)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_keys_expire_from_redis() {
    let redis = TestRedis::start().await;
    let up = Upstream::auto("quota").await;
    let ps = proxies(
        1,
        &policy(up.addr(), 100, 10),
        fleet(&redis, Duration::from_secs(5), Duration::from_millis(100)),
    )
    .await;
    let mut conn = HttpConn::h1(ps[0].outbound_addr()).await.unwrap();
    for i in 0..30 {
        let tenant = format!("tenant-{i}");
        let r = conn
            .request(Method::GET, "quota", "/", &[("x-tenant", &tenant)])
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }
    wait_keys(&redis, "one bucket per tenant in Redis", 30).await;
    let keys: Vec<String> = redis.query(&["KEYS", "*"]).await.unwrap();
    for key in &keys {
        assert!(
            key.starts_with("sluice:rl:") && !key.contains("tenant"),
            "{key}: a fixed hash, no raw key value"
        );
        let ttl: i64 = redis.query(&["PTTL", key]).await.unwrap();
        assert!(ttl > 0, "{key} has an expiry ({ttl})");
    }
    // Idle shares go back to their buckets, which then expire once full.
    wait_keys(&redis, "every bucket expired", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_proxy_takes_the_control_planes_share() {
    fallback_splits_between(["p0", "p1"]).await;
}

/// Two proxies started with one `--node-id` are still two proxies sharing a fleet
/// limit: the control plane counts them apart, and each takes half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_sharing_a_node_id_each_take_their_own_share() {
    fallback_splits_between(["twin", "twin"]).await;
}

/// Two proxies subscribed as `nodes`, without Redis, both sending on a fleet-limited
/// route: each enforces half of perSecond, the control plane having counted two.
async fn fallback_splits_between(nodes: [&str; 2]) {
    let up = Upstream::auto("quota").await;
    let cp = TestControlPlane::start(&[("quota.yaml", &policy(up.addr(), 1000, 1000))]).await;
    let states = tempfile::tempdir().unwrap();
    let mut ps = Vec::new();
    for (i, node) in nodes.into_iter().enumerate() {
        let opts = ProxyOptions {
            report_interval: Duration::from_millis(200),
            // No Redis: fleet limits run on their fallback, perSecond / N.
            fleet: FleetConfig::default(),
            ..Default::default()
        };
        let dir = states.path().join(format!("p{i}"));
        ps.push(TestProxy::start_subscribed(&cp.url(), node, &dir, opts).await);
    }
    let addrs = [ps[0].outbound_addr(), ps[1].outbound_addr()];
    // --fleet-size is 1 here: the first answer's bucket is the whole burst.
    let mut conn = HttpConn::h1(addrs[0]).await.unwrap();
    let r = conn
        .request(Method::GET, "quota", "/", &[("x-tenant", "acme")])
        .await
        .unwrap();
    assert_eq!(r.header("x-sluice-ratelimit-scope"), "degraded-local");
    assert_eq!(r.header("ratelimit"), "\"api\";r=999;t=1");
    // Both proxies send; the control plane counts two, and the fallback halves.
    wait_until("the fallback's bucket is burst / 2", WAIT, || async move {
        let mut last = String::new();
        for addr in addrs {
            let mut c = HttpConn::h1(addr).await.unwrap();
            let r = c
                .request(Method::GET, "quota", "/", &[("x-tenant", "acme")])
                .await
                .unwrap();
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.header("x-sluice-ratelimit-scope"), "degraded-local");
            last = r.header("ratelimit").to_string();
        }
        let remaining: u32 = last
            .split(";r=")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        remaining < 500
    })
    .await;
    assert_eq!(
        ps[0].route_traffic().proxies("e2e", "quota", "api"),
        Some(2)
    );
    for p in ps {
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_limit_reconciles_over_rediss_with_rustls() {
    let redis = TestRedis::start_tls().await;
    let up = Upstream::auto("quota").await;
    let cfg = FleetConfig {
        redis_url: Some(redis.tls_url()),
        redis_ca_file: Some(redis.ca_file()),
        redis_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let ps = proxies(1, &policy(up.addr(), 100, 10), cfg).await;
    let mut conn = HttpConn::h1(ps[0].outbound_addr()).await.unwrap();
    let r = conn
        .request(Method::GET, "quota", "/", &[("x-tenant", "acme")])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-sluice-ratelimit-scope"), "");
    // The share's credit is charged over TLS: the bucket appears in Redis.
    wait_keys(&redis, "the bucket written over rediss://", 1).await;
    assert_eq!(degraded_gauge(&ps[0]).await, 0.0);
    let errors = metric_sum(
        &scrape(ps[0].admin_addr()).await,
        "sluice_ratelimit_backend_errors_total",
        &[],
    );
    assert_eq!(errors, 0.0, "no failed reconciliation");
}

/// A route's limit without `scope: fleet` stays the proxy's own even where fleet limits
/// are in force: none of its answers says it is a fleet limit's local fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_without_fleet_scope_beside_a_fleet_one_stays_local() {
    let up = Upstream::auto("quota").await;
    let yaml = policy(up.addr(), 100, 10).replace(
        "  routes:\n",
        "  routes:\n    - name: own\n      match: { path: { prefix: /own } }\n\
         \x20     rateLimit: { perSecond: 1, burst: 2, key: { header: x-tenant } }\n",
    );
    // No Redis: a fleet limit answers from its fallback, and says so.
    let ps = proxies(1, &yaml, FleetConfig::default()).await;
    let mut conn = HttpConn::h1(ps[0].outbound_addr()).await.unwrap();
    let tenant = [("x-tenant", "acme")];
    let r = conn
        .request(Method::GET, "quota", "/", &tenant)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-sluice-ratelimit-scope"), "degraded-local");
    assert_eq!(
        degraded_gauge(&ps[0]).await,
        1.0,
        "no Redis: degraded from the start"
    );
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = conn
            .request(Method::GET, "quota", "/own", &tenant)
            .await
            .unwrap();
        assert_eq!(r.header("x-sluice-ratelimit-scope"), "", "{r:?}");
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    for p in ps {
        p.shutdown().await;
    }
}

/// A proxy given a Redis nobody answers at says so from the start, before any request
/// needs the fleet limit: the fallback gauge is 1 and the failure is counted, while the
/// timeout series stands at 0 rather than missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_shows_before_the_first_request() {
    let up = Upstream::auto("quota").await;
    let url = format!("redis://{}", sluice_e2e::closed_port().await);
    let cfg = FleetConfig {
        redis_url: Some(url),
        redis_timeout: Duration::from_secs(1),
        sync_interval: Duration::from_millis(100),
        fleet_size: 3.try_into().unwrap(),
        ..Default::default()
    };
    let p = &proxies(1, &policy(up.addr(), 90, 90), cfg).await[0];
    wait_until("the fallback gauge at 1", WAIT, || async {
        degraded_gauge(p).await == 1.0
    })
    .await;
    let text = scrape(p.admin_addr()).await;
    assert!(
        metric_sum(
            &text,
            "sluice_ratelimit_backend_errors_total",
            &[r#"reason="error""#]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        text.contains(r#"sluice_ratelimit_backend_errors_total{reason="timeout"} 0"#),
        "{text}"
    );
    assert_eq!(up.requests(), 0);
}

/// Two control-plane replicas on one Kubernetes API (the double), a proxy subscribed
/// to each, both sending on a fleet-limited route: each proxy is told N = 2, the one
/// on the follower included, though each replica has one proxy of its own (the
/// follower takes the fleet's count from the lease holder). Once the holder is gone,
/// the remaining replica's proxy is told that replica's own count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_on_a_follower_replica_is_told_the_fleet_wide_count() {
    use serde_json::json;
    use sluice_control_plane::k8s::double::ApiServer;
    use sluice_control_plane::k8s::{KubeConfig, LeaseConfig};
    use sluice_control_plane::{ControlPlaneConfig, RunningControlPlane};

    let up = Upstream::auto("quota").await;
    let api = ApiServer::new();
    api.put(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RoutePolicy",
        "metadata": { "name": "quota", "namespace": "e2e" },
        "spec": {
            "host": "quota",
            "backends": { "up": { "addresses": [up.addr().to_string()] } },
            "routes": [{ "name": "api", "rateLimit": {
                "perSecond": 1000, "burst": 1000, "key": { "header": "x-tenant" },
                "scope": "fleet" } }],
        },
    }));
    let empty = tempfile::tempdir().unwrap();
    let replica = |name: &'static str| {
        let mut lease = LeaseConfig::new("sluice-system", "sluice-control-plane", name);
        lease.retry_every = Duration::from_millis(200);
        sluice_control_plane::start(ControlPlaneConfig {
            policy_dir: empty.path().to_path_buf(),
            kubernetes: Some(KubeConfig {
                client: api.client(),
                policies: true,
                lease,
                trust_domain: "cluster.local".into(),
                pod_ip: None,
            }),
            ..ControlPlaneConfig::default()
        })
    };
    let a: RunningControlPlane = replica("cp-a").await.unwrap();
    wait_until("cp-a holds the lease", WAIT, || async {
        api.get("leases", "sluice-system", "sluice-control-plane")
            .is_some_and(|l| l["spec"]["holderIdentity"] == "cp-a")
    })
    .await;
    let b = replica("cp-b").await.unwrap();

    let states = tempfile::tempdir().unwrap();
    let mut ps = Vec::new();
    for (cp, node) in [(&a, "on-holder"), (&b, "on-follower")] {
        let opts = ProxyOptions {
            report_interval: Duration::from_millis(200),
            fleet: FleetConfig::default(),
            ..Default::default()
        };
        let dir = states.path().join(node);
        ps.push(TestProxy::start_subscribed(&cp.grpc_url(), node, &dir, opts).await);
    }
    // Both proxies keep sending; each replica counts its own proxy, the holder both.
    let told = || {
        ps.iter()
            .map(|p| p.route_traffic().proxies("e2e", "quota", "api"))
            .collect::<Vec<_>>()
    };
    wait_until(
        "both proxies are told N = 2, the follower's too (its replica alone counts 1)",
        WAIT,
        || async {
            for p in &ps {
                let mut c = HttpConn::h1(p.outbound_addr()).await.unwrap();
                let r = c
                    .request(Method::GET, "quota", "/", &[("x-tenant", "acme")])
                    .await
                    .unwrap();
                assert_eq!(r.status, StatusCode::OK);
            }
            told() == [Some(2), Some(2)]
        },
    )
    .await;

    // The holder goes (its proxy with it): the remaining replica's proxy is told
    // that replica's own count again.
    let mut ps = ps.into_iter();
    ps.next().unwrap().shutdown().await;
    a.shutdown().await;
    let on_follower = ps.next().unwrap();
    wait_until(
        "the follower's proxy is told its replica's own count",
        WAIT,
        || async {
            let mut c = HttpConn::h1(on_follower.outbound_addr()).await.unwrap();
            let r = c
                .request(Method::GET, "quota", "/", &[("x-tenant", "acme")])
                .await
                .unwrap();
            assert_eq!(r.status, StatusCode::OK);
            on_follower.route_traffic().proxies("e2e", "quota", "api") == Some(1)
        },
    )
    .await;
    on_follower.shutdown().await;
    b.shutdown().await;
}
