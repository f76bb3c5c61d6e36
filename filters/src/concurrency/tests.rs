use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderName, Request, Response, StatusCode};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{BoxError, ServiceExt};
use tower_layer::Layer;
use tower_service::Service;

use super::*;
use crate::FilterError;
use crate::ratelimit::refusal_headers;

const PRIORITY: HeaderName = HeaderName::from_static("x-priority");

fn priorities() -> Priorities {
    Priorities::new(PRIORITY, ["critical", "default", "sheddable"])
}

// === a server with N workers ===

/// An app with `workers` workers, each taking `service_time` per request: latency stays at
/// `service_time` up to `workers` requests in flight and grows with the queue past that knee.
#[derive(Clone)]
struct Server {
    workers: Arc<Semaphore>,
    worker_count: Arc<AtomicUsize>,
    service_us: Arc<AtomicU64>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    completed: Arc<AtomicU64>,
}

impl Server {
    fn new(workers: usize, service_time: Duration) -> Self {
        Self {
            workers: Arc::new(Semaphore::new(workers)),
            worker_count: Arc::new(AtomicUsize::new(workers)),
            service_us: Arc::new(AtomicU64::new(service_time.as_micros() as u64)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: Arc::new(AtomicUsize::new(0)),
            completed: Arc::new(AtomicU64::new(0)),
        }
    }

    fn set_service_time(&self, d: Duration) {
        self.service_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Capacity in requests per second.
    fn capacity(&self) -> f64 {
        self.worker_count.load(Ordering::Relaxed) as f64 * 1e6
            / self.service_us.load(Ordering::Relaxed) as f64
    }

    fn take_max_in_flight(&self) -> usize {
        self.max_in_flight.swap(0, Ordering::Relaxed)
    }

    async fn handle(self, _req: Request<()>) -> Result<Response<()>, Infallible> {
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight.fetch_max(n, Ordering::Relaxed);
        {
            let _worker = self.workers.acquire().await.expect("never closed");
            let us = self.service_us.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.completed.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(()))
    }
}

type Stack = ConcurrencyLimit<tower::util::BoxCloneService<Request<()>, Response<()>, Infallible>>;

fn stack(server: &Server, limiter: Arc<Limiter>) -> Stack {
    let server = server.clone();
    let svc = tower::service_fn(move |req| server.clone().handle(req));
    ConcurrencyLimitLayer::new(limiter).layer(tower::util::BoxCloneService::new(svc))
}

/// What a load run saw, per priority level.
#[derive(Debug, Default)]
struct Outcome {
    ok: HashMap<&'static str, u64>,
    overloaded: HashMap<&'static str, u64>,
    latencies: Vec<Duration>,
}

impl Outcome {
    fn ok(&self) -> u64 {
        self.ok.values().sum()
    }
    fn overloaded(&self) -> u64 {
        self.overloaded.values().sum()
    }
    fn refused(&self, level: &str) -> u64 {
        self.overloaded.get(level).copied().unwrap_or(0)
    }
    fn sent(&self, level: &str) -> u64 {
        self.refused(level) + self.ok.get(level).copied().unwrap_or(0)
    }
    fn median_latency(&mut self) -> Duration {
        self.latencies.sort();
        self.latencies
            .get(self.latencies.len() / 2)
            .copied()
            .unwrap_or_default()
    }
}

/// Sends `rate` requests a second for `duration` (open loop: arrivals do not wait for
/// answers), the level of request i being `level(i)`; returns once all are answered.
async fn load(
    svc: &Stack,
    rate: f64,
    duration: Duration,
    level: impl Fn(u64) -> &'static str,
) -> Outcome {
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = start;
    while tick < start + duration {
        let due = (tick.duration_since(start).as_secs_f64() * rate) as u64;
        while sent < due {
            let lvl = level(sent);
            let mut svc = svc.clone();
            let outcome = outcome.clone();
            tasks.spawn(async move {
                let req = Request::builder().header(PRIORITY, lvl).body(()).unwrap();
                let t0 = Instant::now();
                let res = svc.ready().await.unwrap().call(req).await;
                let mut o = outcome.lock().unwrap();
                match res {
                    Ok(_) => {
                        *o.ok.entry(lvl).or_default() += 1;
                        o.latencies.push(t0.elapsed());
                    }
                    Err(e) => {
                        let err = e.downcast_ref::<FilterError>().expect("a filter error");
                        assert_eq!(err.reason().as_str(), "overloaded");
                        *o.overloaded.entry(lvl).or_default() += 1;
                    }
                }
            });
            sent += 1;
        }
        tick += Duration::from_millis(1);
        tokio::time::sleep_until(tick).await;
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(outcome).ok().unwrap().into_inner().unwrap()
}

fn default_level(_: u64) -> &'static str {
    "default"
}

fn adaptive() -> Arc<Limiter> {
    Arc::new(Limiter::unobserved(
        ConcurrencyParams::new(LimitParams::Adaptive { min: 4, max: 2000 })
            .with_queue(50, Duration::from_millis(50))
            .with_priorities(priorities()),
    ))
}

// === adaptive limit ===

#[tokio::test(start_paused = true)]
async fn steady_load_below_capacity_is_never_refused() {
    let server = Server::new(10, Duration::from_millis(10));
    let limiter = adaptive();
    let svc = stack(&server, limiter.clone());
    for share in [0.5, 0.9] {
        let out = load(
            &svc,
            server.capacity() * share,
            Duration::from_secs(30),
            default_level,
        )
        .await;
        assert_eq!(out.overloaded(), 0, "at {share} of capacity: {out:?}");
        assert!(out.ok() > 0);
        assert!(limiter.limit() >= 10, "limit {}", limiter.limit());
    }
}

/// Warms the limit up at half load, then overloads the server 3×; returns the limit.
async fn converge(server: &Server, svc: &Stack, limiter: &Limiter) -> usize {
    load(
        svc,
        server.capacity() * 0.5,
        Duration::from_secs(2),
        default_level,
    )
    .await;
    let out = load(
        svc,
        server.capacity() * 3.0,
        Duration::from_secs(20),
        default_level,
    )
    .await;
    assert!(out.overloaded() > 0);
    limiter.limit()
}

#[tokio::test(start_paused = true)]
async fn limit_converges_past_the_knee() {
    let server = Server::new(10, Duration::from_millis(10));
    let limiter = adaptive();
    let svc = stack(&server, limiter.clone());
    let limit = converge(&server, &svc, &limiter).await;
    assert!((10..=30).contains(&limit), "limit {limit}");

    // Settled: the app is kept busy (goodput near capacity), its queue short (admitted
    // latency within 2× the unloaded latency) and never holds more than the limit.
    server.take_max_in_flight();
    let before = server.completed.load(Ordering::Relaxed);
    let mut out = load(
        &svc,
        server.capacity() * 3.0,
        Duration::from_secs(10),
        default_level,
    )
    .await;
    let done = server.completed.load(Ordering::Relaxed) - before;
    let goodput = done as f64 / 10.0;
    assert!(goodput >= 0.9 * server.capacity(), "goodput {goodput}");
    assert!(
        out.median_latency() <= Duration::from_millis(20),
        "{:?}",
        out.median_latency()
    );
    assert!(server.take_max_in_flight() <= limiter.limit().max(limit) + 2);
    assert!(
        (10..=30).contains(&limiter.limit()),
        "limit {}",
        limiter.limit()
    );
}

#[tokio::test(start_paused = true)]
async fn limit_backs_off_when_latency_jumps_and_recovers_after_a_sustained_slowdown() {
    let server = Server::new(10, Duration::from_millis(20));
    let limiter = adaptive();
    let svc = stack(&server, limiter.clone());
    let settled = converge(&server, &svc, &limiter).await;

    // The app slows down 3× under the same offered load: the limit backs off at once.
    let offered = server.capacity() * 3.0;
    server.set_service_time(Duration::from_millis(60));
    load(&svc, offered, Duration::from_secs(2), default_level).await;
    let backed_off = limiter.limit();
    assert!(backed_off * 2 <= settled, "{backed_off} after {settled}");

    // The slowdown lasts: the limit learns the new latency and the app stays busy.
    load(&svc, offered, Duration::from_secs(60), default_level).await;
    let before = server.completed.load(Ordering::Relaxed);
    load(&svc, offered, Duration::from_secs(10), default_level).await;
    let goodput = (server.completed.load(Ordering::Relaxed) - before) as f64 / 10.0;
    assert!(
        goodput >= 0.8 * server.capacity(),
        "degraded goodput {goodput}"
    );

    // It ends: the limit climbs back to where it was and the app is busy again.
    server.set_service_time(Duration::from_millis(20));
    load(&svc, offered, Duration::from_secs(20), default_level).await;
    let recovered = limiter.limit();
    assert!(recovered * 10 >= settled * 8, "{recovered} after {settled}");
    let before = server.completed.load(Ordering::Relaxed);
    load(&svc, offered, Duration::from_secs(10), default_level).await;
    let goodput = (server.completed.load(Ordering::Relaxed) - before) as f64 / 10.0;
    assert!(
        goodput >= 0.9 * server.capacity(),
        "recovered goodput {goodput}"
    );
}

#[tokio::test(start_paused = true)]
async fn priorities_at_twice_capacity_shed_sheddable_first() {
    let server = Server::new(10, Duration::from_millis(10));
    let limiter = adaptive();
    let svc = stack(&server, limiter.clone());
    load(
        &svc,
        server.capacity() * 0.5,
        Duration::from_secs(2),
        default_level,
    )
    .await;
    // 20 % critical, 50 % default, 30 % sheddable.
    let mix = |i: u64| match i % 10 {
        0 | 1 => "critical",
        2..=6 => "default",
        _ => "sheddable",
    };
    let out = load(&svc, server.capacity() * 2.0, Duration::from_secs(20), mix).await;
    let share = |l: &str| out.refused(l) as f64 / out.sent(l) as f64;
    assert!(share("sheddable") > share("default"), "{out:?}");
    assert!(share("default") > share("critical"), "{out:?}");
    assert!(share("critical") <= 0.01, "{out:?}");
}

// === queue and priorities ===

/// A service whose requests finish only when the test adds permits to `gate`.
fn gated(limiter: Arc<Limiter>) -> (Arc<Semaphore>, Stack) {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let svc = tower::service_fn(move |_req: Request<()>| {
        let g = g.clone();
        async move {
            g.acquire().await.unwrap().forget();
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    (
        gate,
        ConcurrencyLimitLayer::new(limiter).layer(tower::util::BoxCloneService::new(svc)),
    )
}

fn fixed(max: u32, queue: usize, timeout: Duration) -> Arc<Limiter> {
    Arc::new(Limiter::unobserved(
        ConcurrencyParams::new(LimitParams::Fixed { max })
            .with_queue(queue, timeout)
            .with_priorities(priorities()),
    ))
}

fn call(
    svc: &Stack,
    level: Option<&str>,
) -> tokio::task::JoinHandle<Result<Response<()>, BoxError>> {
    let mut svc = svc.clone();
    let mut req = Request::builder();
    if let Some(l) = level {
        req = req.header(PRIORITY, l);
    }
    let req = req.body(()).unwrap();
    tokio::spawn(async move { svc.ready().await?.call(req).await })
}

fn overloaded(res: Result<Response<()>, BoxError>) -> Arc<str> {
    match res.unwrap_err().downcast_ref::<FilterError>() {
        Some(FilterError::Overloaded { priority, .. }) => priority.clone(),
        other => panic!("expected overloaded, got {other:?}"),
    }
}

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn fixed_limit_queues_then_refuses_with_overloaded_and_retry_after() {
    let limiter = fixed(2, 1, Duration::from_millis(50));
    let (gate, svc) = gated(limiter.clone());
    let a = call(&svc, None);
    let b = call(&svc, None);
    settle().await;
    assert_eq!(limiter.in_flight(), 2);
    let queued = call(&svc, None);
    settle().await;
    assert_eq!(limiter.queued(), 1);
    // The queue is full: refused at once.
    let refused = call(&svc, None).await.unwrap();
    assert_eq!(&*overloaded(refused), "default");

    // The queued one times out.
    let err = queued.await.unwrap().unwrap_err();
    let err = err.downcast_ref::<FilterError>().unwrap();
    assert_eq!(err.reason().as_str(), "overloaded");
    assert_eq!(err.reason().status(), StatusCode::SERVICE_UNAVAILABLE);
    let mut headers = http::HeaderMap::new();
    refusal_headers(err, &mut headers);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(limiter.queued(), 0);

    gate.add_permits(2);
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(limiter.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_freed_slot_goes_to_the_most_important_waiter() {
    let limiter = fixed(1, 10, Duration::from_secs(10));
    let (gate, svc) = gated(limiter.clone());
    let first = call(&svc, None);
    settle().await;
    let shed = call(&svc, Some("sheddable"));
    settle().await;
    let dflt = call(&svc, Some("no-such-level"));
    settle().await;
    let crit = call(&svc, Some("critical"));
    settle().await;
    assert_eq!(limiter.queued(), 3);

    gate.add_permits(1);
    first.await.unwrap().unwrap();
    settle().await;
    // Critical got the slot, although it came last.
    assert_eq!(limiter.queued(), 2);
    gate.add_permits(1);
    crit.await.unwrap().unwrap();
    settle().await;
    // An unknown value counts as default, ahead of sheddable.
    assert!(!dflt.is_finished());
    gate.add_permits(1);
    dflt.await.unwrap().unwrap();
    gate.add_permits(1);
    shed.await.unwrap().unwrap();
    assert_eq!(limiter.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_sheds_its_lowest_level_first() {
    let limiter = fixed(1, 2, Duration::from_secs(10));
    let (gate, svc) = gated(limiter.clone());
    let first = call(&svc, None);
    settle().await;
    let shed = call(&svc, Some("sheddable"));
    let dflt = call(&svc, None);
    settle().await;
    // Full. A critical request pushes the sheddable one out…
    let crit = call(&svc, Some("critical"));
    settle().await;
    assert_eq!(&*overloaded(shed.await.unwrap()), "sheddable");
    // …and a sheddable newcomer finds no one below it: refused itself.
    let late = call(&svc, Some("sheddable")).await.unwrap();
    assert_eq!(&*overloaded(late), "sheddable");
    // A default newcomer is refused too: only lower levels give way.
    let late = call(&svc, None).await.unwrap();
    assert_eq!(&*overloaded(late), "default");

    gate.add_permits(3);
    first.await.unwrap().unwrap();
    crit.await.unwrap().unwrap();
    dflt.await.unwrap().unwrap();
    assert_eq!((limiter.in_flight(), limiter.queued()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_leaves_frees_its_place_and_its_slot() {
    let limiter = fixed(1, 5, Duration::from_secs(10));
    let (gate, svc) = gated(limiter.clone());
    let first = call(&svc, None);
    settle().await;
    let waiting = call(&svc, None);
    settle().await;
    assert_eq!(limiter.queued(), 1);
    waiting.abort();
    settle().await;
    assert_eq!(limiter.queued(), 0);
    first.abort();
    settle().await;
    assert_eq!(limiter.in_flight(), 0);
    // The slot is usable again.
    let next = call(&svc, None);
    settle().await;
    gate.add_permits(1);
    next.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn no_queue_refuses_at_once_over_the_limit() {
    let limiter = Arc::new(Limiter::unobserved(ConcurrencyParams::new(
        LimitParams::Fixed { max: 1 },
    )));
    let (gate, svc) = gated(limiter.clone());
    let first = call(&svc, None);
    settle().await;
    assert_eq!(&*overloaded(call(&svc, None).await.unwrap()), "default");
    gate.add_permits(1);
    first.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_level_past_the_last_waits_as_the_last() {
    let limiter = fixed(1, 1, Duration::from_secs(10));
    let Admission::Admitted(first) = limiter.admit(0) else {
        panic!("a free slot admits");
    };
    let Admission::Queued(beyond) = limiter.admit(99) else {
        panic!("a full limit queues");
    };
    // A critical request finds the queue full and pushes the "level 99" one out as the
    // least important there is.
    let Admission::Queued(critical) = limiter.admit(0) else {
        panic!("a more important request takes the place");
    };
    match beyond.wait().await {
        Err(FilterError::Overloaded { priority, .. }) => assert_eq!(&*priority, "sheddable"),
        other => panic!("expected overloaded, got {other:?}"),
    }
    drop(first);
    critical.wait().await.unwrap();
}

#[derive(Default)]
struct Counting {
    limits: Mutex<Vec<usize>>,
    refusals: Mutex<HashMap<String, u64>>,
    in_flight: std::sync::atomic::AtomicI64,
}

impl ConcurrencyObserver for Counting {
    fn on_limit(&self, limit: usize) {
        self.limits.lock().unwrap().push(limit);
    }
    fn on_refusal(&self, level: &str) {
        *self
            .refusals
            .lock()
            .unwrap()
            .entry(level.into())
            .or_default() += 1;
    }
    fn on_in_flight(&self, delta: i64) {
        self.in_flight.fetch_add(delta, Ordering::Relaxed);
    }
}

#[tokio::test(start_paused = true)]
async fn registry_keeps_a_limiter_across_unchanged_swaps_and_reports_refusals() {
    let registry = ConcurrencyRegistry::new();
    let observer = Arc::new(Counting::default());
    let params =
        ConcurrencyParams::new(LimitParams::Fixed { max: 1 }).with_priorities(priorities());
    let obs: Arc<dyn ConcurrencyObserver> = observer.clone();
    let a = registry.get_or_rebuild("svc", &params, || obs.clone());
    let b = registry.get_or_rebuild("svc", &params.clone(), || obs.clone());
    assert!(Arc::ptr_eq(&a, &b));
    assert!(!registry.is_empty());
    assert!(Arc::ptr_eq(&registry.get(&"svc").unwrap(), &a));
    assert_eq!(*observer.limits.lock().unwrap(), [1]);

    let (gate, svc) = gated(a.clone());
    let first = call(&svc, None);
    settle().await;
    assert_eq!(observer.in_flight.load(Ordering::Relaxed), 1);
    overloaded(call(&svc, Some("sheddable")).await.unwrap());
    assert_eq!(observer.refusals.lock().unwrap()["sheddable"], 1);
    gate.add_permits(1);
    first.await.unwrap().unwrap();
    // The gauge the observer keeps comes back down with the request.
    assert_eq!(observer.in_flight.load(Ordering::Relaxed), 0);

    let changed = ConcurrencyParams::new(LimitParams::Fixed { max: 2 });
    let c = registry.get_or_rebuild("svc", &changed, || obs.clone());
    assert!(!Arc::ptr_eq(&a, &c));
    assert_eq!(c.limit(), 2);
    registry.retain(|k| *k != "svc");
    assert!(registry.is_empty());
}

#[tokio::test]
async fn the_limit_is_ready_when_the_service_behind_it_is() {
    let (inner, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let limiter = fixed(1, 0, Duration::from_secs(1));
    let mut svc = tower_test::mock::Spawn::new(ConcurrencyLimitLayer::new(limiter).layer(inner));
    handle.allow(0);
    assert!(svc.poll_ready().is_pending());
    handle.allow(1);
    assert!(svc.poll_ready().is_ready());
}

#[test]
fn a_level_past_the_last_is_named_as_the_last() {
    assert_eq!(&**priorities().name(99), "sheddable");
    assert_eq!(&**priorities().name(0), "critical");
}

#[test]
fn params_from_the_policy() {
    let yaml = r#"
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log-service, namespace: shop }
spec:
  host: log-service
  inbound:
    concurrency:
      adaptive: { minLimit: 8 }
      queue: { max: 100, timeout: 20ms }
      priority: { header: x-priority, levels: [critical, default, sheddable] }
"#;
    let policies = sluice_config::parse_policies("p.yaml", yaml).unwrap();
    let cfg = policies[0]
        .spec
        .inbound
        .as_ref()
        .unwrap()
        .concurrency
        .as_ref()
        .unwrap();
    let p = ConcurrencyParams::from_config(cfg).unwrap();
    assert_eq!(p.limit, LimitParams::Adaptive { min: 8, max: 2000 });
    assert_eq!(
        (p.queue_max, p.queue_timeout),
        (100, Duration::from_millis(20))
    );
    assert_eq!(p.priorities, priorities());
    let req = Request::builder()
        .header("x-priority", "sheddable")
        .body(())
        .unwrap();
    assert_eq!(
        &**p.priorities.name(p.priorities.level_of(&req)),
        "sheddable"
    );

    let fixed = sluice_config::Concurrency {
        fixed: Some(sluice_config::FixedLimit { max: 200 }),
        ..Default::default()
    };
    let p = ConcurrencyParams::from_config(&fixed).unwrap();
    assert_eq!(p, ConcurrencyParams::new(LimitParams::Fixed { max: 200 }));
}
