//! Overload protection (`inbound.concurrency`): a real app with N workers behind a log
//! service sidecar, under open-loop load from the harness. The assertions are about what
//! the app saw and what callers got back, never about timings.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use sluice_e2e::{
    HttpConn, ProxyOptions, Stall, Tally, TestProxy, Upstream, WorkerUpstream, metric_sum,
    open_loop, scrape, wait_until,
};

// Slow enough that the proxy's own time, on a busy machine, is small beside the app's.
const WORKERS: usize = 8;
const SERVICE_TIME: Duration = Duration::from_millis(250);

/// The adaptive limit the load tests learn with.
const ADAPTIVE: &str = "    concurrency:
      adaptive: { minLimit: 1, maxLimit: 500 }
      queue: { max: 20, timeout: 100ms }
      priority: { header: x-priority, levels: [critical, default, sheddable] }";

/// The log service's policy, its `inbound` section made of `inbound` (indented lines).
fn policy(app: std::net::SocketAddr, inbound: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: log-service, namespace: shop }}
spec:
  host: log-service
  backends:
    log-v1: {{ addresses: ["{app}"] }}
  routes:
    - name: ingest
  inbound:
{inbound}
"#
    )
}

/// The load tests run one at a time: on a small machine, two at once would make each
/// other's latency, which is what the limit learns from.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn sidecar(app: &WorkerUpstream) -> TestProxy {
    sidecar_for(app.addr(), ADAPTIVE).await
}

/// The log service's sidecar, inbound only, in front of `app`.
async fn sidecar_for(app: std::net::SocketAddr, inbound: &str) -> TestProxy {
    TestProxy::start_with(
        &policy(app, inbound),
        ProxyOptions {
            outbound: false,
            inbound: true,
            app: Some(app),
            service: Some("log-service".into()),
            ..Default::default()
        },
    )
    .await
}

/// Samples `sluice_concurrency_limit` every 50 ms while it lives: the lowest and highest.
struct LimitWatch {
    min: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LimitWatch {
    fn start(proxy: &TestProxy) -> Self {
        let admin = proxy.admin_addr();
        let (min, max) = (
            Arc::new(AtomicUsize::new(usize::MAX)),
            Arc::new(AtomicUsize::new(0)),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (mn, mx, st) = (min.clone(), max.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !st.load(Ordering::Relaxed) {
                let limit = limit(admin).await;
                mn.fetch_min(limit, Ordering::Relaxed);
                mx.fetch_max(limit, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self {
            min,
            max,
            stop,
            task,
        }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (
            self.min.load(Ordering::Relaxed),
            self.max.load(Ordering::Relaxed),
        )
    }
}

async fn limit(admin: std::net::SocketAddr) -> usize {
    metric_sum(&scrape(admin).await, "sluice_concurrency_limit", &[]) as usize
}

fn total(t: &BTreeMap<&str, Tally>) -> Tally {
    t.values().fold(Tally::default(), |a, b| Tally {
        sent: a.sent + b.sent,
        ok: a.ok + b.ok,
        overloaded: a.overloaded + b.overloaded,
        other: a.other + b.other,
    })
}

fn plain(_: u64) -> &'static str {
    ""
}

/// Half capacity for a few seconds: the limit learns the app's unloaded latency.
async fn warm_up(proxy: &TestProxy, app: &WorkerUpstream) -> Tally {
    let out = open_loop(
        proxy.inbound_addr(),
        "log-service",
        app.capacity() * 0.5,
        Duration::from_secs(4),
        plain,
    )
    .await;
    total(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_capacity_is_never_refused() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let app = WorkerUpstream::start(WORKERS, SERVICE_TIME).await;
    let proxy = sidecar(&app).await;
    let out = warm_up(&proxy, &app).await;
    assert_eq!(out.overloaded, 0, "{out:?}");
    assert_eq!(out.other, 0, "{out:?}");
    assert_eq!(out.ok, out.sent);
    let text = scrape(proxy.admin_addr()).await;
    assert_eq!(
        metric_sum(&text, "sluice_overload_refusals_total", &[]),
        0.0
    );
    assert!(metric_sum(&text, "sluice_concurrency_limit", &[]) >= WORKERS as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_times_capacity_keeps_the_app_at_the_learned_limit_and_refuses_the_excess() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let app = WorkerUpstream::start(WORKERS, SERVICE_TIME).await;
    let proxy = sidecar(&app).await;
    warm_up(&proxy, &app).await;

    let rate = app.capacity() * 3.0;
    let addr = proxy.inbound_addr();
    // Settle, then watch the app and the limit together.
    open_loop(addr, "log-service", rate, Duration::from_secs(6), plain).await;
    app.take_max_in_flight();
    let served_before = app.served();
    let watch = LimitWatch::start(&proxy);
    let out = total(&open_loop(addr, "log-service", rate, Duration::from_secs(6), plain).await);
    let (low, high) = watch.finish().await;
    let at_app = app.take_max_in_flight();

    // The app never held more than the limit allowed, and was kept busy.
    assert!(
        at_app <= high,
        "app saw {at_app} in flight, limit at most {high}"
    );
    assert!(at_app >= WORKERS, "app saw only {at_app} in flight");
    assert!(
        low >= WORKERS / 2 && high <= WORKERS * 4,
        "learned limit {low}..={high} for {WORKERS} workers"
    );
    assert_eq!(app.served() - served_before, out.ok);
    // The excess was refused 503 overloaded with retry-after, nothing else failed.
    assert_eq!(out.other, 0, "{out:?}");
    assert!(out.refused_share() >= 0.4, "{out:?}");
    let text = scrape(proxy.admin_addr()).await;
    assert!(
        metric_sum(
            &text,
            "sluice_overload_refusals_total",
            &[r#"priority="default""#]
        ) >= out.overloaded as f64
    );
    assert_eq!(metric_sum(&text, "sluice_concurrency_in_flight", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_twice_capacity_sheddable_is_refused_first_and_critical_least() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let app = WorkerUpstream::start(WORKERS, SERVICE_TIME).await;
    let proxy = sidecar(&app).await;
    warm_up(&proxy, &app).await;
    // 20 % critical, 50 % default, 30 % sheddable.
    let mix = |i: u64| match i % 10 {
        0 | 1 => "critical",
        2..=6 => "default",
        _ => "sheddable",
    };
    let out = open_loop(
        proxy.inbound_addr(),
        "log-service",
        app.capacity() * 2.0,
        Duration::from_secs(10),
        mix,
    )
    .await;
    let share = |l: &str| out[l].refused_share();
    assert!(share("sheddable") > share("default"), "{out:?}");
    assert!(share("default") > share("critical"), "{out:?}");
    assert_eq!(total(&out).other, 0, "{out:?}");
    let text = scrape(proxy.admin_addr()).await;
    for level in ["critical", "default", "sheddable"] {
        assert_eq!(
            metric_sum(
                &text,
                "sluice_overload_refusals_total",
                &[&format!(r#"priority="{level}""#)]
            ),
            out[level].overloaded as f64,
            "{level}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_follows_the_apps_worker_count_down_and_back_up() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let app = WorkerUpstream::start(WORKERS, SERVICE_TIME).await;
    let proxy = sidecar(&app).await;
    warm_up(&proxy, &app).await;
    let addr = proxy.inbound_addr();
    let rate = app.capacity() * 3.0;

    open_loop(addr, "log-service", rate, Duration::from_secs(8), plain).await;
    let full = limit(proxy.admin_addr()).await;

    app.set_workers(WORKERS / 2).await;
    open_loop(addr, "log-service", rate, Duration::from_secs(8), plain).await;
    let halved = limit(proxy.admin_addr()).await;
    assert!(
        halved < full,
        "limit {full} with {WORKERS} workers, {halved} with half"
    );

    app.set_workers(WORKERS).await;
    open_loop(addr, "log-service", rate, Duration::from_secs(10), plain).await;
    let restored = limit(proxy.admin_addr()).await;
    assert!(
        restored > halved,
        "limit {halved} with half the workers, {restored} restored"
    );
}

/// An inbound rate limit and a concurrency limit on the same sidecar both apply: a request
/// beyond the one in flight is refused `overloaded`, and the answers that pass carry the
/// inbound limit's headers. No load and no timing: the app holds the first request until
/// released (`/hold`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_rate_limit_and_a_concurrency_limit_apply_together() {
    let app = Upstream::http1("log-app").await;
    let inbound = "    rateLimit: { perSecond: 1, burst: 100 }
    concurrency:
      fixed: { max: 1 }";
    let proxy = sidecar_for(app.addr(), inbound).await;
    let addr = proxy.inbound_addr();
    let first = tokio::spawn(async move {
        let mut conn = HttpConn::h1(addr).await.unwrap();
        conn.get("log-service", "/hold").await.unwrap()
    });
    wait_until(
        "the app holds the first request",
        Duration::from_secs(10),
        || {
            let held = app.held();
            async move { held == 1 }
        },
    )
    .await;
    let admin = proxy.admin_addr();
    let text = scrape(admin).await;
    assert_eq!(
        metric_sum(&text, "sluice_concurrency_limit", &[]),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "sluice_concurrency_in_flight", &[]),
        1.0,
        "{text}"
    );
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let second = conn.get("log-service", "/second").await.unwrap();
    assert_eq!(second.status, 503, "{second:?}");
    let text = scrape(admin).await;
    assert_eq!(
        metric_sum(&text, "sluice_overload_refusals_total", &[]),
        1.0,
        "{text}"
    );
    assert_eq!(second.headers["x-sluice-reason"], "overloaded");
    app.release_held();
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.headers["ratelimit-policy"], "\"inbound\";q=100;w=100");
    assert!(
        first.headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"inbound\";r="),
        "{first:?}"
    );
    assert_eq!(
        app.requests(),
        1,
        "the refused request never reached the app"
    );
    wait_until("nothing in flight", Duration::from_secs(10), || async move {
        metric_sum(&scrape(admin).await, "sluice_concurrency_in_flight", &[]) == 0.0
    })
    .await;

    // The concurrency limit taken out of the policy: its gauge reads no limit, and two
    // requests in flight at once are both let through.
    let before = proxy.version().await;
    proxy.write_policy(&policy(
        app.addr(),
        "    rateLimit: { perSecond: 1, burst: 100 }",
    ));
    proxy.wait_version_change(before.as_deref()).await;
    assert_eq!(limit(admin).await, 0);
    // Two requests at once, both held by the app: neither is refused now.
    app.set_stall(Stall::Hang);
    let pair: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = HttpConn::h1(addr).await.unwrap();
                conn.get("log-service", "/pair").await.unwrap()
            })
        })
        .collect();
    wait_until("both reach the app", Duration::from_secs(10), || {
        let seen = app.requests();
        async move { seen == 3 }
    })
    .await;
    app.set_stall(Stall::None);
    for r in pair {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
}
