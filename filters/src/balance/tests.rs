use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tokio::time::{Instant, advance};
use tower::{BoxError, ServiceExt};
use tower_layer::Layer;
use tower_service::Service;
use tower_test::mock;

use super::*;
use crate::extensions::Endpoint;
use crate::extensions::SelectedBackend;
use crate::random::RandomSource;
use crate::{FilterError, UpstreamError, UpstreamErrorKind};

type Handle = mock::Handle<Request<()>, Response<()>>;
type Mock = mock::Mock<Request<()>, Response<()>>;

fn refused() -> UpstreamError {
    UpstreamError::new(
        UpstreamErrorKind::ConnectFailure,
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
    )
}

/// Sends one request; the mock answers per address: `down` addresses refuse connections.
async fn send<S>(
    svc: &mut S,
    handle: &mut Handle,
    down: &[&str],
) -> (Option<String>, Result<(), BoxError>)
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError>,
{
    let fut = svc.ready().await.unwrap().call(Request::new(()));
    let mut fut = Box::pin(fut);
    // A request refused by the balancer itself never reaches the mock.
    if let Some(r) = futures_util::FutureExt::now_or_never(&mut fut) {
        return (None, r.map(drop));
    }
    let (req, reply) = handle.next_request().await.unwrap();
    let addr = crate::extensions::Routing::endpoint(req.extensions())
        .unwrap()
        .0
        .to_string();
    if down.contains(&addr.as_str()) {
        reply.send_error(refused());
    } else {
        reply.send_response(Response::new(()));
    }
    (Some(addr), fut.await.map(drop))
}

fn balancer(addrs: &[&str]) -> (Arc<EndpointSet>, Balance<Mock>, Handle) {
    let reg = BalanceRegistry::new();
    let set = reg.endpoint_set(&BalanceParams::new("log-v1", addrs.iter().copied()));
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    handle.allow(10_000);
    let svc = BalanceLayer::new(Arc::from(vec![set.clone()]))
        .with_random(RandomSource::seeded(11))
        .layer(mock);
    (set, svc, handle)
}

#[tokio::test(start_paused = true)]
async fn p2c_sends_little_to_a_slow_endpoint() {
    let reg = BalanceRegistry::new();
    let set = reg.endpoint_set(&BalanceParams::new("b", ["a", "b", "c", "slow"]));
    advance(Duration::from_secs(30)).await;
    let now = Instant::now();
    for ep in set.endpoints() {
        let rtt = if &*ep.endpoint().0 == "slow" { 200 } else { 5 };
        ep.observe_rtt(now, Duration::from_millis(rtt), Duration::from_secs(10));
    }
    assert!(set.endpoints()[3].rtt_estimate() >= Duration::from_millis(200));
    let rng = RandomSource::seeded(3);
    let mut counts = [0; 4];
    for _ in 0..4_000 {
        let p = set.pick(&rng).unwrap();
        counts[set
            .endpoints()
            .iter()
            .position(|e| Arc::ptr_eq(e, &p.endpoint))
            .unwrap()] += 1;
    }
    // The slow endpoint only wins when it is not sampled with a fast one: never with two
    // distinct samples, so it gets nothing while the others share the load.
    assert_eq!(counts[3], 0, "{counts:?}");
    for c in &counts[..3] {
        assert!(*c > 1_000, "{counts:?}");
    }
}

/// A slow answer is honoured for a while, then forgotten: the endpoint that gave it loses
/// every comparison and so gives no new sample, and only its estimate decaying while
/// unsampled brings it back into rotation.
#[tokio::test(start_paused = true)]
async fn an_endpoint_starved_after_a_slow_answer_is_tried_again_as_its_estimate_decays() {
    let reg = BalanceRegistry::new();
    let params = BalanceParams::new("b", ["a", "b", "spiked"]);
    let set = reg.endpoint_set(&params);
    advance(Duration::from_secs(30)).await;
    for ep in set.endpoints() {
        let rtt = if &*ep.endpoint().0 == "spiked" {
            200
        } else {
            5
        };
        ep.observe_rtt(Instant::now(), Duration::from_millis(rtt), params.decay);
    }
    let rng = RandomSource::seeded(9);
    // Every pick answers in 5 ms; returns how many of `n` went to the spiked endpoint.
    let spiked = |n: u32| {
        let mut hits = 0;
        for _ in 0..n {
            let p = set.pick(&rng).unwrap();
            if &*p.endpoint.endpoint().0 == "spiked" {
                hits += 1;
            }
            p.endpoint
                .observe_rtt(Instant::now(), Duration::from_millis(5), params.decay);
        }
        hits
    };
    assert_eq!(spiked(1_000), 0, "a 200 ms answer against 5 ms ones");
    // One decay period on (10 s): 200 ms × e⁻¹ is still far above 5 ms.
    advance(params.decay).await;
    assert_eq!(spiked(1_000), 0, "still honoured after one decay period");
    // Four periods on, e⁻⁴ × 200 ms is below 5 ms: it is tried, and its 5 ms answer,
    // weighed against a spike that old, makes most of its new estimate.
    advance(params.decay * 3).await;
    assert!(spiked(100) > 0, "tried again once its estimate decayed");
    let estimate = set.endpoints()[2].rtt_estimate();
    assert!(
        estimate < Duration::from_millis(10),
        "the spike mostly forgotten: {estimate:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn load_in_flight_spreads_requests() {
    let reg = BalanceRegistry::new();
    let set = reg.endpoint_set(&BalanceParams::new("b", ["fast", "slower"]));
    advance(Duration::from_secs(30)).await;
    let now = Instant::now();
    set.endpoints()[0].observe_rtt(now, Duration::from_millis(10), Duration::from_secs(10));
    set.endpoints()[1].observe_rtt(now, Duration::from_millis(40), Duration::from_secs(10));
    let rng = RandomSource::seeded(3);
    let params = set.params().clone();
    // Keep every pick in flight: cost grows with pending, so the slower one gets its turn.
    let in_flight: Vec<_> = (0..50)
        .map(|_| future::Outcome::new(set.pick(&rng).unwrap(), &params, is_connect_failure))
        .collect();
    let (f, s) = (set.endpoints()[0].pending(), set.endpoints()[1].pending());
    assert!(s >= 5 && f > s, "fast {f}, slower {s}");
    drop(in_flight);
    assert_eq!(
        set.endpoints()[0].pending() + set.endpoints()[1].pending(),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn refused_endpoint_is_ejected_probed_and_restored() {
    let (set, mut svc, mut handle) = balancer(&["a:1", "b:1"]);
    let a = set.endpoints()[0].clone();

    // Until a request lands on a:1 and is refused.
    loop {
        let (addr, r) = send(&mut svc, &mut handle, &["a:1"]).await;
        if addr.as_deref() == Some("a:1") {
            let err = r.unwrap_err();
            assert!(
                err.downcast_ref::<UpstreamError>().is_some(),
                "the inner error is passed on"
            );
            break;
        }
    }
    assert_eq!(a.health(), Health::Ejected);
    for _ in 0..50 {
        assert_eq!(
            send(&mut svc, &mut handle, &[]).await.0.as_deref(),
            Some("b:1")
        );
    }

    // After 1 s one probe goes to a:1; while it is out, nothing else does.
    advance(Duration::from_secs(1)).await;
    assert_eq!(a.health(), Health::ProbeDue);
    let probe = Box::pin(svc.ready().await.unwrap().call(Request::new(())));
    let (req, reply) = handle.next_request().await.unwrap();
    assert_eq!(
        crate::extensions::Routing::endpoint(req.extensions())
            .unwrap()
            .0
            .as_ref(),
        "a:1"
    );
    assert_eq!(a.health(), Health::Probing);
    for _ in 0..10 {
        assert_eq!(
            send(&mut svc, &mut handle, &[]).await.0.as_deref(),
            Some("b:1")
        );
    }
    // The probe is refused too: ejected again, now for 2 s.
    reply.send_error(refused());
    assert!(probe.await.is_err());
    assert_eq!(a.health(), Health::Ejected);
    advance(Duration::from_millis(1_999)).await;
    assert_eq!(a.health(), Health::Ejected);
    advance(Duration::from_millis(1)).await;
    assert_eq!(a.health(), Health::ProbeDue);

    // This probe succeeds: a:1 takes traffic again.
    let (addr, r) = send(&mut svc, &mut handle, &[]).await;
    assert_eq!((addr.as_deref(), r.is_ok()), (Some("a:1"), true));
    assert_eq!(a.health(), Health::Healthy);
    let mut to_a = async || {
        let mut n = 0;
        for _ in 0..100 {
            if send(&mut svc, &mut handle, &[]).await.0.as_deref() == Some("a:1") {
                n += 1;
            }
        }
        n
    };
    // Back from ejection it ramps in over `slowStart` (10 s) rather than at once.
    let just_back = to_a().await;
    assert!(just_back < 10, "{just_back}");
    advance(Duration::from_secs(10)).await;
    let ramped = to_a().await;
    assert!(ramped > 20, "{ramped}");
}

#[tokio::test(start_paused = true)]
async fn ejection_doubles_up_to_thirty_seconds() {
    let reg = BalanceRegistry::new();
    let set = reg.endpoint_set(&BalanceParams::new("b", ["a"]));
    let a = set.endpoints()[0].clone();
    let (base, max) = (Duration::from_secs(1), Duration::from_secs(30));
    // Only the ejection that takes it out of rotation reports itself (it is logged).
    assert_eq!(a.eject(Instant::now(), false, base, max), Some(base));
    assert_eq!(
        a.eject(Instant::now(), false, base, max),
        None,
        "already out"
    );
    for secs in [1u64, 2, 4, 8, 16, 30, 30] {
        advance(Duration::from_secs(secs) - Duration::from_millis(1)).await;
        assert_eq!(a.health(), Health::Ejected, "{secs}");
        advance(Duration::from_millis(1)).await;
        assert_eq!(a.health(), Health::ProbeDue, "{secs}");
        // The probe fails again.
        assert_eq!(a.eject(Instant::now(), true, base, max), None, "{secs}");
    }
    a.restore();
    assert_eq!(a.eject(Instant::now(), false, base, max), Some(base));
    advance(Duration::from_secs(1)).await;
    assert_eq!(a.health(), Health::ProbeDue, "a restore resets the backoff");
}

#[tokio::test(start_paused = true)]
async fn all_ejected_fails_with_no_healthy_endpoint() {
    let (_set, mut svc, mut handle) = balancer(&["a:1", "b:1"]);
    let mut refused_by_balancer = None;
    for _ in 0..20 {
        let (addr, r) = send(&mut svc, &mut handle, &["a:1", "b:1"]).await;
        if addr.is_none() {
            refused_by_balancer = Some(r.unwrap_err());
            break;
        }
    }
    let err = refused_by_balancer.expect("both endpoints ejected");
    assert_eq!(
        err.downcast_ref::<FilterError>(),
        Some(&FilterError::NoHealthyEndpoint("log-v1".into()))
    );
}

#[tokio::test(start_paused = true)]
async fn other_errors_do_not_eject() {
    let (set, mut svc, mut handle) = balancer(&["a:1"]);
    let fut = svc.ready().await.unwrap().call(Request::new(()));
    let (_req, reply) = handle.next_request().await.unwrap();
    reply.send_error(UpstreamError::new(
        UpstreamErrorKind::Reset,
        std::io::Error::other("reset"),
    ));
    assert!(fut.await.is_err());
    assert_eq!(set.endpoints()[0].health(), Health::Healthy);
}

#[tokio::test(start_paused = true)]
async fn selected_backend_picks_the_endpoint_set() {
    let reg = BalanceRegistry::new();
    let v1 = reg.endpoint_set(&BalanceParams::new("log-v1", ["10.0.0.1:80"]));
    let v2 = reg.endpoint_set(&BalanceParams::new("log-v2", ["10.0.0.2:80"]));
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    handle.allow(10);
    let mut svc = BalanceLayer::new(Arc::from(vec![v1, v2])).layer(mock);
    let mut req = Request::new(());
    crate::extensions::Routing::of_mut(req.extensions_mut()).backend = Some(SelectedBackend {
        name: Arc::from("log-v2"),
        index: 1,
    });
    let fut = svc.ready().await.unwrap().call(req);
    let (req, reply) = handle.next_request().await.unwrap();
    assert_eq!(
        crate::extensions::Routing::endpoint(req.extensions()),
        Some(&Endpoint(Arc::from("10.0.0.2:80")))
    );
    reply.send_response(Response::new(()));
    fut.await.unwrap();

    let mut unknown = Request::new(());
    crate::extensions::Routing::of_mut(unknown.extensions_mut()).backend = Some(SelectedBackend {
        name: Arc::from("gone"),
        index: 7,
    });
    let err = svc.ready().await.unwrap().call(unknown).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<FilterError>(),
        Some(&FilterError::NoHealthyEndpoint("gone".into()))
    );
}

#[tokio::test(start_paused = true)]
async fn registry_keeps_endpoint_state_across_swaps() {
    let reg = BalanceRegistry::new();
    let before = reg.endpoint_set(&BalanceParams::new("b", ["a", "b"]));
    before.endpoints()[0].eject(
        Instant::now(),
        false,
        Duration::from_secs(1),
        Duration::from_secs(30),
    );
    let after = reg.endpoint_set(&BalanceParams::new("b", ["a", "c"]));
    assert!(Arc::ptr_eq(&before.endpoints()[0], &after.endpoints()[0]));
    assert_eq!(after.endpoints()[0].health(), Health::Ejected);
    assert_eq!(after.endpoints()[1].health(), Health::Healthy);
    reg.retain(|addr| ["a", "c"].contains(&addr));
    assert_eq!(reg.len(), 2);
    assert!(reg.get("b", None).is_none());
    let a = reg.get("a", None).expect("a is kept");
    assert!(Arc::ptr_eq(&a, &after.endpoints()[0]));
    assert!(
        reg.get("a", Some("spiffe://cluster.local/ns/x/sa/y"))
            .is_none()
    );
    assert!(!reg.is_empty());
    reg.retain(|_| false);
    assert!(reg.is_empty());
}

/// What `GET /endpoints` shows: every address held (per identity), sorted, with its
/// health, estimate in milliseconds, requests in flight and time since its ramp began.
#[tokio::test(start_paused = true)]
async fn the_registry_lists_every_address_as_the_admin_api_shows_it() {
    let reg = BalanceRegistry::new();
    assert!(reg.list().is_empty());
    let params = BalanceParams::new("b", ["b:1", "a:1"]);
    let set = reg.endpoint_set(&params);
    let id: Arc<str> = Arc::from("spiffe://cluster.local/ns/shop/sa/log");
    reg.endpoint_set(&BalanceParams::new("m", ["a:1"]).with_identity(Some(id.clone())));
    advance(Duration::from_secs(3)).await;
    let (b, a) = (&set.endpoints()[0], &set.endpoints()[1]);
    a.observe_rtt(Instant::now(), Duration::from_micros(4_500), params.decay);
    a.start();
    b.eject(Instant::now(), false, params.eject_base, params.eject_max);
    let list = reg.list();
    let rows: Vec<_> = list
        .iter()
        .map(|v| {
            (
                v.address.as_str(),
                v.identity.as_deref(),
                v.health,
                v.pending,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("a:1", None, "healthy", 1),
            ("a:1", Some(&*id), "healthy", 0),
            ("b:1", None, "ejected", 0)
        ]
    );
    assert_eq!(list[0].rtt_ms, 4.5);
    assert_eq!(list[0].ramp_age_s, 3.0);
    a.finish();
}

/// The layers of this crate compose as the proxy stacks them, and each leaves its mark.
#[tokio::test(start_paused = true)]
async fn whole_stack_composes() {
    use crate::ratelimit::{KeyBy, RateLimitLayer, RateLimitParams, RateLimitRegistry};
    use crate::split::{SplitLayer, SplitParams};
    use crate::timeout::{TimeoutLayer, TimeoutParams};

    let route = sluice_config::Route {
        name: "ingest".into(),
        timeout: Some(sluice_config::Duration::from_secs(2)),
        rate_limit: Some(sluice_config::RateLimit {
            per_second: 1,
            burst: Some(2),
            ..Default::default()
        }),
        retry: Some(sluice_config::Retry {
            per_try_timeout: Some(sluice_config::Duration::from_millis(500)),
            ..Default::default()
        }),
        split: vec![sluice_config::SplitRule {
            weights: Some(
                [("v1".to_string(), 0), ("v2".to_string(), 100)]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        }],
        ..Default::default()
    };
    // A fake clock: a slow test run must not refill the bucket.
    let limits: RateLimitRegistry<&str, _> =
        RateLimitRegistry::with_clock(governor::clock::FakeRelativeClock::default());
    let rl = RateLimitParams::from_config(route.rate_limit.as_ref().unwrap())
        .unwrap()
        .named("ingest");
    assert_eq!(rl.key, KeyBy::None);
    let endpoints = BalanceRegistry::new();
    let sets = vec![
        endpoints.endpoint_set(&BalanceParams::new("v1", ["10.0.0.1:80"])),
        endpoints.endpoint_set(&BalanceParams::new("v2", ["10.0.0.2:80"])),
    ];
    let timeouts = TimeoutParams::from_config(&route);
    let split = Arc::new(SplitParams::from_config(&route, ["v1", "v2"]).unwrap());

    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    handle.allow(10);
    let svc = BalanceLayer::new(Arc::from(sets)).layer(mock);
    // A per-try deadline, as the retry layer keeps one.
    let svc = TimeoutLayer::new(Some(Duration::from_millis(500))).layer(svc);
    let svc = SplitLayer::new(split).layer(svc);
    let svc = timeouts.total_layer().layer(svc);
    let mut svc = RateLimitLayer::new(limits.get_or_rebuild("ingest", &rl)).layer(svc);

    let fut = svc.ready().await.unwrap().call(Request::new(()));
    let (req, reply) = handle.next_request().await.unwrap();
    assert_eq!(
        crate::extensions::Routing::backend(req.extensions())
            .unwrap()
            .index,
        1
    );
    assert_eq!(
        crate::extensions::Routing::endpoint(req.extensions())
            .unwrap()
            .0
            .as_ref(),
        "10.0.0.2:80"
    );
    reply.send_response(Response::new(()));
    let rsp = fut.await.unwrap();
    assert_eq!(rsp.headers()["ratelimit"], "\"ingest\";r=1;t=1");

    // The per-try timeout fires inside the total one.
    let fut = svc.ready().await.unwrap().call(Request::new(()));
    let (_req, _reply) = handle.next_request().await.unwrap();
    let err = fut.await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<FilterError>(),
        Some(&FilterError::Timeout(Duration::from_millis(500)))
    );

    // The burst of two is spent: the third request is refused before reaching anything.
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<FilterError>().unwrap().reason().as_str(),
        "rate-limited"
    );
}

/// The share of endpoint `i` over `n` picks with nothing in flight.
fn share(set: &EndpointSet, i: usize, n: u32, rng: &RandomSource) -> f64 {
    let mut hits = 0;
    for _ in 0..n {
        let p = set.pick(rng).unwrap();
        if Arc::ptr_eq(&p.endpoint, &set.endpoints()[i]) {
            hits += 1;
        }
    }
    f64::from(hits) / f64::from(n)
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_a_new_endpoint_in_linearly() {
    let reg = BalanceRegistry::new();
    let slow = Duration::from_secs(10);
    let params =
        |addrs: &[&str]| BalanceParams::new("b", addrs.iter().copied()).with_slow_start(Some(slow));
    let old = reg.endpoint_set(&params(&["a", "b"]));
    advance(Duration::from_secs(60)).await;
    let set = reg.endpoint_set(&params(&["a", "b", "c"]));
    assert!(Arc::ptr_eq(&old.endpoints()[0], &set.endpoints()[0]));
    let rng = RandomSource::seeded(7);
    // A new endpoint is taken the first time it is sampled, whatever its weight.
    let mut reached = None;
    for k in 1..=10 {
        let p = set.pick(&rng).unwrap();
        if Arc::ptr_eq(&p.endpoint, &set.endpoints()[2]) {
            reached = Some(k);
            break;
        }
        p.endpoint
            .observe_rtt(Instant::now(), Duration::from_millis(5), slow);
    }
    assert!(reached.is_some_and(|k| k <= 4), "reached at {reached:?}");
    for ep in set.endpoints() {
        ep.observe_rtt(Instant::now(), Duration::from_millis(5), slow);
    }
    // Equal latency: a ramped-in endpoint's share of three is 1/3; the new one's grows
    // with its weight, elapsed / slowStart.
    let mut shares = Vec::new();
    for step in 0..=5u32 {
        let w = (f64::from(step) * 2.5 / 10.0).min(1.0);
        let s = share(&set, 2, 12_000, &rng);
        shares.push(s);
        assert!(
            (s - w / 3.0).abs() < 0.025,
            "at {w}: share {s}, shares {shares:?}"
        );
        advance(Duration::from_millis(2_500)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_back_from_ejection_ramps_in_again() {
    let reg = BalanceRegistry::new();
    let params = BalanceParams::new("b", ["a", "b"]).with_slow_start(Some(Duration::from_secs(10)));
    let set = reg.endpoint_set(&params);
    advance(Duration::from_secs(30)).await;
    for ep in set.endpoints() {
        ep.observe_rtt(Instant::now(), Duration::from_millis(5), params.decay);
    }
    let b = &set.endpoints()[1];
    b.eject(Instant::now(), false, params.eject_base, params.eject_max);
    advance(Duration::from_secs(2)).await;
    let rng = RandomSource::seeded(5);
    let probe = set.pick(&rng).unwrap();
    assert!(probe.probe && Arc::ptr_eq(&probe.endpoint, b));
    b.restore();
    drop(probe);
    // Just back: a tiny weight, so it takes almost nothing.
    assert!(share(&set, 1, 4_000, &rng) < 0.02);
    advance(Duration::from_secs(5)).await;
    let half = share(&set, 1, 12_000, &rng);
    assert!((half - 0.25).abs() < 0.025, "half-way share {half}");
    advance(Duration::from_secs(5)).await;
    let full = share(&set, 1, 12_000, &rng);
    assert!((full - 0.5).abs() < 0.025, "ramped-in share {full}");
    // Off: a returning endpoint takes its full share at once.
    let off = reg.endpoint_set(&params.clone().with_slow_start(Some(Duration::ZERO)));
    b.eject(Instant::now(), false, params.eject_base, params.eject_max);
    b.restore();
    assert!((share(&off, 1, 12_000, &rng) - 0.5).abs() < 0.025);
}

/// Peak EWMA: the first answer replaces the default guess, a slower one takes over at
/// once, and a faster one pulls the estimate down only as time passes.
#[tokio::test(start_paused = true)]
async fn a_slower_answer_takes_over_at_once_and_a_faster_one_with_time() {
    let reg = BalanceRegistry::new();
    let params = BalanceParams::new("b", ["a"]);
    let set = reg.endpoint_set(&params);
    let ep = &set.endpoints()[0];
    let ms = Duration::from_millis;
    ep.observe_rtt(Instant::now(), ms(10), params.decay);
    assert_eq!(
        ep.rtt_estimate(),
        ms(10),
        "the first answer replaces the guess"
    );
    ep.observe_rtt(Instant::now(), ms(100), params.decay);
    assert_eq!(ep.rtt_estimate(), ms(100), "a slower answer takes over");
    ep.observe_rtt(Instant::now(), ms(1), params.decay);
    assert_eq!(
        ep.rtt_estimate(),
        ms(100),
        "a faster one, no time on: no change"
    );
    advance(params.decay).await;
    ep.observe_rtt(Instant::now(), ms(1), params.decay);
    // One decay period on, the old estimate weighs e⁻¹: 100 × 0.368 + 1 × 0.632.
    let estimate = ep.rtt_estimate().as_secs_f64() * 1e3;
    assert!((estimate - 37.42).abs() < 0.01, "{estimate} ms");
}

/// Slow start holds back a new endpoint that answers faster than the others too: it
/// wins its comparisons only in proportion to its weight, from either side of a pair,
/// so its share grows linearly to what its speed earns (every pair it is in: 2/3).
#[tokio::test(start_paused = true)]
async fn slow_start_holds_back_a_faster_new_endpoint_from_either_side() {
    let reg = BalanceRegistry::new();
    let slow = Duration::from_secs(10);
    let params =
        |addrs: &[&str]| BalanceParams::new("b", addrs.iter().copied()).with_slow_start(Some(slow));
    reg.endpoint_set(&params(&["a", "b"]));
    advance(Duration::from_secs(60)).await;
    let set = reg.endpoint_set(&params(&["a", "b", "c"]));
    for (ep, ms) in set.endpoints().iter().zip([5, 5, 1]) {
        ep.observe_rtt(Instant::now(), Duration::from_millis(ms), params(&[]).decay);
    }
    let rng = RandomSource::seeded(11);
    for w in [0.25, 0.5, 1.0] {
        advance(slow.mul_f64(w) - set.endpoints()[2].ramp_age(Instant::now())).await;
        let s = share(&set, 2, 12_000, &rng);
        assert!((s - 2.0 * w / 3.0).abs() < 0.025, "at {w}: share {s}");
    }
}

/// With both samples out, any claimable endpoint is found, wherever it sits; an empty
/// set has nothing to pick.
#[tokio::test(start_paused = true)]
async fn the_one_healthy_endpoint_is_found_when_both_samples_are_out() {
    let reg = BalanceRegistry::new();
    let params = BalanceParams::new("b", ["a", "b", "c", "d"]);
    let set = reg.endpoint_set(&params);
    for ep in &set.endpoints()[..3] {
        ep.eject(Instant::now(), false, params.eject_base, params.eject_max);
    }
    let rng = RandomSource::seeded(3);
    for _ in 0..200 {
        let p = set.pick(&rng).expect("d is healthy");
        assert!(Arc::ptr_eq(&p.endpoint, &set.endpoints()[3]));
    }
    let empty = reg.endpoint_set(&BalanceParams::new("none", Vec::<&str>::new()));
    assert!(empty.pick(&rng).is_none());
}

/// A probe cancelled before its answer (the client left) settles nothing: the endpoint
/// is due for a probe again, and the next request takes it.
#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_lets_the_next_request_probe() {
    let (set, mut svc, mut handle) = balancer(&["a:1", "b:1"]);
    let a = set.endpoints()[0].clone();
    while send(&mut svc, &mut handle, &["a:1"]).await.0.as_deref() != Some("a:1") {}
    advance(Duration::from_secs(1)).await;
    let probe = svc.ready().await.unwrap().call(Request::new(()));
    let (req, _reply) = handle.next_request().await.unwrap();
    let to = |req: &Request<()>| {
        let ep = crate::extensions::Routing::endpoint(req.extensions());
        ep.unwrap().0.to_string()
    };
    assert_eq!((to(&req), a.health()), ("a:1".to_string(), Health::Probing));
    drop(probe);
    assert_eq!(a.health(), Health::ProbeDue);
    let (addr, r) = send(&mut svc, &mut handle, &[]).await;
    assert_eq!((addr.as_deref(), r.is_ok()), (Some("a:1"), true));
    assert_eq!(a.health(), Health::Healthy);
}

/// Two endpoints both ramping in are weighed by the ratio of their weights: one at a
/// quarter against one at a half competes as a half, from either side of the pair, so
/// even when it answers faster it wins only half its comparisons.
#[tokio::test(start_paused = true)]
async fn two_ramping_endpoints_are_weighed_by_the_ratio_of_their_weights() {
    let reg = BalanceRegistry::new();
    let slow = Duration::from_secs(10);
    let params =
        |addrs: &[&str]| BalanceParams::new("b", addrs.iter().copied()).with_slow_start(Some(slow));
    reg.endpoint_set(&params(&["old"]));
    advance(slow / 4).await;
    let set = reg.endpoint_set(&params(&["old", "new"]));
    advance(slow / 4).await;
    let (old, new) = (&set.endpoints()[0], &set.endpoints()[1]);
    assert_eq!(old.weight_at(Instant::now(), slow), 0.5);
    assert_eq!(new.weight_at(Instant::now(), slow), 0.25);
    let decay = params(&[]).decay;
    old.observe_rtt(Instant::now(), Duration::from_millis(5), decay);
    new.observe_rtt(Instant::now(), Duration::from_millis(1), decay);
    let rng = RandomSource::seeded(13);
    let s = share(&set, 1, 12_000, &rng);
    assert!((s - 0.5).abs() < 0.025, "share {s}");
}

/// A plain request to an endpoint, cancelled while that endpoint's probe is in flight,
/// leaves the probe alone: only the probe's own end lets another request probe.
#[tokio::test(start_paused = true)]
async fn a_plain_request_cancelled_during_a_probe_leaves_the_probe_alone() {
    let (set, mut svc, mut handle) = balancer(&["a:1", "b:1"]);
    let a = set.endpoints()[0].clone();
    let to = |req: &Request<()>| {
        let ep = crate::extensions::Routing::endpoint(req.extensions());
        ep.unwrap().0.to_string()
    };
    // A plain request held in flight on a.
    let (plain, _plain_reply) = loop {
        let mut fut = Box::pin(svc.ready().await.unwrap().call(Request::new(())));
        assert!(futures_util::FutureExt::now_or_never(&mut fut).is_none());
        let (req, reply) = handle.next_request().await.unwrap();
        if to(&req) == "a:1" {
            break (fut, reply);
        }
        reply.send_response(Response::new(()));
        fut.await.unwrap();
    };
    // a stops taking connections; once its ejection runs out, the next request probes it.
    let params = BalanceParams::new("x", ["a:1"]);
    a.eject(Instant::now(), false, params.eject_base, params.eject_max);
    advance(params.eject_base).await;
    let probe = svc.ready().await.unwrap().call(Request::new(()));
    let (req, probe_reply) = handle.next_request().await.unwrap();
    assert_eq!((to(&req), a.health()), ("a:1".to_string(), Health::Probing));
    drop(plain);
    assert_eq!(a.health(), Health::Probing, "still the probe's");
    probe_reply.send_response(Response::new(()));
    probe.await.unwrap();
    assert_eq!(a.health(), Health::Healthy);
}
