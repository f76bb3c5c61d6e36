use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use http::{Request, Response};
use tower::{BoxError, ServiceExt};
use tower_layer::Layer;
use tower_service::Service;
use tower_test::mock;

use super::*;
use crate::FilterError;
use crate::extensions::PeerIdentity;

fn params(per_second: u32, burst: u32, key: KeyBy) -> RateLimitParams {
    RateLimitParams {
        name: Arc::from("ingest"),
        per_second: NonZeroU32::new(per_second).unwrap(),
        burst: NonZeroU32::new(burst).unwrap(),
        key,
        shadow: false,
        fleet: false,
    }
}

fn limiter(
    p: RateLimitParams,
    clock: &FakeRelativeClock,
    max_keys: usize,
) -> KeyedLimiter<FakeRelativeClock> {
    KeyedLimiter::new(p, clock.clone(), max_keys)
}

fn admitted(l: &KeyedLimiter<FakeRelativeClock>, key: u64, n: usize) -> usize {
    (0..n)
        .filter(|_| matches!(l.check_key(key), Verdict::Allowed { .. }))
        .count()
}

#[test]
fn from_config_defaults_burst_and_reads_key() {
    let cfg = sluice_config::RateLimit {
        per_second: 200,
        burst: None,
        key: Some(sluice_config::RateLimitKey {
            header: Some("x-tenant-id".into()),
            ..Default::default()
        }),
        shadow: true,
        ..Default::default()
    };
    let p = RateLimitParams::from_config(&cfg).unwrap().named("ingest");
    assert_eq!(p.burst.get(), 200);
    assert_eq!(
        p.key,
        KeyBy::Header(http::HeaderName::from_static("x-tenant-id"))
    );
    assert!(p.shadow);
    assert_eq!(&*p.name, "ingest");

    let peer = sluice_config::RateLimit {
        per_second: 5,
        burst: Some(12),
        key: Some(sluice_config::RateLimitKey {
            peer_identity: Some(true),
            ..Default::default()
        }),
        shadow: false,
        ..Default::default()
    };
    let p = RateLimitParams::from_config(&peer).unwrap();
    assert_eq!((p.burst.get(), p.key.clone()), (12, KeyBy::PeerIdentity));
    assert_eq!(p.window_secs(), 3);
    assert!(!p.fleet, "local unless the policy says fleet");
    let fleet = sluice_config::RateLimit {
        scope: sluice_config::RateLimitScope::Fleet,
        ..peer
    };
    assert!(RateLimitParams::from_config(&fleet).unwrap().fleet);

    let zero = sluice_config::RateLimit {
        per_second: 0,
        ..Default::default()
    };
    assert_eq!(
        RateLimitParams::from_config(&zero),
        Err(RateLimitConfigError::Zero)
    );
}

/// Offering three times the limit for 100 s admits rate × seconds + burst, within 1 %.
#[test]
fn admits_rate_times_seconds_plus_burst_within_one_percent() {
    for (rate, burst) in [(100u32, 100u32), (200, 50), (7, 20)] {
        let clock = FakeRelativeClock::default();
        let l = limiter(params(rate, burst, KeyBy::None), &clock, 10);
        let secs = 100u64;
        let offered_per_sec = u64::from(rate) * 3;
        let step = Duration::from_nanos(1_000_000_000 / offered_per_sec);
        let mut ok = 0u64;
        for _ in 0..offered_per_sec * secs {
            if matches!(l.check_key(0), Verdict::Allowed { .. }) {
                ok += 1;
            }
            clock.advance(step);
        }
        let expected = (u64::from(rate) * secs + u64::from(burst)) as f64;
        let err = (ok as f64 - expected).abs() / expected;
        assert!(
            err <= 0.01,
            "rate {rate} burst {burst}: admitted {ok}, expected {expected}"
        );
    }
}

#[test]
fn new_key_gets_exactly_one_full_bucket() {
    let clock = FakeRelativeClock::default();
    let l = limiter(params(10, 5, KeyBy::Path), &clock, 100);
    assert_eq!(admitted(&l, 42, 20), 5);
    assert_eq!(admitted(&l, 43, 20), 5, "keys are independent");
}

/// Eviction only drops keys that already have a full bucket, so a key that comes back
/// after eviction gets exactly what it would have had without it.
#[test]
fn evicted_key_never_returns_with_more_than_a_full_bucket() {
    let clock = FakeRelativeClock::default();
    let l = limiter(params(10, 5, KeyBy::Path), &clock, 100);
    assert_eq!(admitted(&l, 7, 5), 5);
    assert!(matches!(l.check_key(7), Verdict::Limited { .. }));

    // Half refilled: the key must survive a sweep with its drained state.
    clock.advance(Duration::from_millis(250));
    l.sweep();
    assert_eq!(l.keys(), 1, "a partly drained key is kept");
    assert_eq!(
        admitted(&l, 7, 20),
        2,
        "250 ms at 10/s gives back two tokens, not a bucket"
    );

    // Fully rested: the state is indistinguishable from a fresh key and goes.
    clock.advance(Duration::from_secs(2));
    l.sweep();
    assert_eq!(l.keys(), 0);
    assert_eq!(
        admitted(&l, 7, 20),
        5,
        "exactly one full bucket, never more"
    );
}

/// A key is dropped exactly when governor's rule says (its arrival time one emission
/// interval in the past), not an instant later: at 10/s with a burst of 5, five requests
/// at once leave the bucket full again 500 ms on, and the key goes 100 ms after that.
#[test]
fn a_key_is_dropped_at_the_first_sweep_its_rule_allows() {
    let clock = FakeRelativeClock::default();
    let l = limiter(params(10, 5, KeyBy::Path), &clock, 100);
    assert_eq!(admitted(&l, 7, 5), 5);
    clock.advance(Duration::from_millis(600) - Duration::from_nanos(1));
    l.sweep();
    assert_eq!(l.keys(), 1, "a nanosecond early");
    clock.advance(Duration::from_nanos(1));
    l.sweep();
    assert_eq!(l.keys(), 0, "on time");
}

#[test]
fn a_million_keys_stay_within_the_key_cap() {
    let clock = FakeRelativeClock::default();
    let cap = 10_000;
    let l = limiter(params(1, 1, KeyBy::Path), &clock, cap);
    for key in 0..1_000_000u64 {
        l.check_key(key);
        if key % 1000 == 0 {
            clock.advance(Duration::from_millis(1));
        }
    }
    assert!(l.keys() <= cap, "{} keys held", l.keys());
    // Keys beyond the cap share the overflow bucket: they are limited, not free.
    let fresh = 5_000_000u64;
    let _ = l.check_key(fresh);
    assert!(matches!(l.check_key(fresh + 1), Verdict::Limited { .. }));

    clock.advance(Duration::from_secs(5));
    l.sweep();
    assert_eq!(l.keys(), 0, "idle keys are dropped");
    assert_eq!(
        admitted(&l, fresh + 2, 3),
        1,
        "new keys get their own bucket again"
    );
}

#[test]
fn full_key_table_is_swept_inline_once_idle_keys_refill() {
    let clock = FakeRelativeClock::default();
    let l = limiter(params(10, 1, KeyBy::Path), &clock, 100);
    for key in 0..100 {
        l.check_key(key);
    }
    clock.advance(Duration::from_secs(2));
    // This key overflows, marks the table saturated and triggers an inline sweep.
    l.check_key(1000);
    assert_eq!(l.keys(), 0);
    assert!(matches!(l.check_key(1001), Verdict::Allowed { .. }));
    assert_eq!(l.keys(), 1);

    // No longer full: requests sweep nothing inline any more, and idle keys wait for
    // the periodic sweep.
    for key in 2000..2050 {
        l.check_key(key);
    }
    clock.advance(Duration::from_secs(2));
    l.check_key(3000);
    assert_eq!(l.keys(), 52);
}

/// An inline sweep that frees nothing leaves the table marked full, so requests for
/// keys it already holds go on sweeping (no new key needed), at most once a second.
#[test]
fn a_full_table_is_swept_inline_once_a_second_until_it_is_not_full() {
    let clock = FakeRelativeClock::default();
    let l = limiter(params(10, 1, KeyBy::Path), &clock, 100);
    clock.advance(Duration::from_millis(1));
    for key in 0..100 {
        l.check_key(key);
    }
    // Overflows and sweeps at once: every key is still drained, none goes.
    l.check_key(1000);
    assert_eq!(l.keys(), 100);
    // The idle keys have refilled, but the last sweep was under a second ago.
    clock.advance(Duration::from_secs(1) - Duration::from_nanos(1));
    l.check_key(5);
    assert_eq!(l.keys(), 100, "swept again within the second");
    clock.advance(Duration::from_nanos(1));
    l.check_key(6);
    assert_eq!(l.keys(), 2, "not swept a second after the last sweep");
}

#[test]
fn registry_keeps_buckets_across_equal_swaps_and_rebuilds_on_change() {
    let clock = FakeRelativeClock::default();
    let reg: RateLimitRegistry<&str, _> = RateLimitRegistry::with_clock(clock.clone());
    let p = params(10, 3, KeyBy::None);
    let a = reg.get_or_rebuild("r1", &p);
    assert_eq!(admitted(&a, 0, 10), 3);

    let again = reg.get_or_rebuild("r1", &p.clone());
    assert!(Arc::ptr_eq(&a, &again));
    assert_eq!(
        admitted(&again, 0, 10),
        0,
        "drained bucket survives the swap"
    );

    let shadowed = RateLimitParams {
        shadow: true,
        ..p.clone()
    };
    let s = reg.get_or_rebuild("r1", &shadowed);
    assert!(
        s.shares_buckets_with(&a),
        "only shadow changed: same buckets"
    );
    assert!(s.params().shadow);

    let faster = params(20, 3, KeyBy::None);
    let f = reg.get_or_rebuild("r1", &faster);
    assert!(!f.shares_buckets_with(&a));
    assert_eq!(admitted(&f, 0, 10), 3, "new rate: fresh buckets");

    reg.get_or_rebuild("r2", &p);
    assert_eq!(reg.len(), 2);
    reg.retain(|k| *k == "r2");
    assert_eq!(reg.len(), 1);
    assert!(!reg.is_empty());
    reg.retain(|_| false);
    assert!(reg.is_empty());
}

#[test]
fn keys_by_header_path_and_peer_identity() {
    let clock = FakeRelativeClock::default();
    let by_header = limiter(
        params(
            1,
            1,
            KeyBy::Header(http::HeaderName::from_static("x-tenant")),
        ),
        &clock,
        100,
    );
    let req = |tenant: Option<&str>| {
        let mut b = Request::builder().uri("/a");
        if let Some(t) = tenant {
            b = b.header("x-tenant", t);
        }
        b.body(()).unwrap()
    };
    assert!(matches!(
        by_header.check(&req(Some("a"))),
        Verdict::Allowed { .. }
    ));
    assert!(matches!(
        by_header.check(&req(Some("a"))),
        Verdict::Limited { .. }
    ));
    assert!(matches!(
        by_header.check(&req(Some("b"))),
        Verdict::Allowed { .. }
    ));
    assert!(matches!(
        by_header.check(&req(None)),
        Verdict::Allowed { .. }
    ));
    assert!(matches!(
        by_header.check(&req(None)),
        Verdict::Limited { .. }
    ));

    let by_peer = limiter(params(1, 1, KeyBy::PeerIdentity), &clock, 100);
    let peer = |id: &str| {
        let mut r = req(None);
        r.extensions_mut().insert(PeerIdentity(Arc::from(id)));
        r
    };
    assert!(matches!(
        by_peer.check(&peer("spiffe://a")),
        Verdict::Allowed { .. }
    ));
    assert!(matches!(
        by_peer.check(&peer("spiffe://a")),
        Verdict::Limited { .. }
    ));
    assert!(matches!(
        by_peer.check(&peer("spiffe://b")),
        Verdict::Allowed { .. }
    ));

    let by_path = limiter(params(1, 1, KeyBy::Path), &clock, 100);
    let at = |p: &str| Request::builder().uri(p).body(()).unwrap();
    assert_eq!(by_path.key_of(&at("/x?q=1")), by_path.key_of(&at("/x?q=2")));
    assert_ne!(by_path.key_of(&at("/x")), by_path.key_of(&at("/y")));
}

#[derive(Default)]
struct Counts([AtomicU64; 3]);

impl RateLimitObserver for Counts {
    fn on_decision(&self, limit: &str, decision: Decision) {
        assert_eq!(limit, "ingest");
        self.0[decision as usize].fetch_add(1, Ordering::Relaxed);
    }
}

impl Counts {
    fn get(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// The `RateLimit` value is written anew whenever the tokens left change, and the same
/// value again (the one kept from the last response) while they do not.
#[tokio::test]
async fn state_header_follows_the_tokens_left_across_requests() {
    let clock = FakeRelativeClock::default();
    let reg: RateLimitRegistry<&str, _> = RateLimitRegistry::with_clock(clock.clone());
    let lim = reg.get_or_rebuild("r", &params(2, 4, KeyBy::None));
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc = RateLimitLayer::new(lim).layer(mock);
    handle.allow(10);
    let mut seen = Vec::new();
    // Refilled between the first three (a token every 500 ms), then two back to back.
    for gap_ms in [0, 500, 500, 0, 0] {
        clock.advance(Duration::from_millis(gap_ms));
        let fut = svc.ready().await.unwrap().call(Request::new(()));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        let rsp = fut.await.unwrap();
        seen.push(rsp.headers()["ratelimit"].to_str().unwrap().to_owned());
    }
    assert_eq!(
        seen,
        [
            "\"ingest\";r=3;t=1",
            "\"ingest\";r=3;t=1",
            "\"ingest\";r=3;t=1",
            "\"ingest\";r=2;t=1",
            "\"ingest\";r=1;t=2",
        ]
    );
}

#[tokio::test]
async fn layer_refuses_with_headers_and_reports_decisions() {
    let clock = FakeRelativeClock::default();
    let reg: RateLimitRegistry<&str, _> = RateLimitRegistry::with_clock(clock.clone());
    let lim = reg.get_or_rebuild("r", &params(2, 2, KeyBy::None));
    let counts = Arc::new(Counts::default());
    let layer = RateLimitLayer::new(lim).with_observer(counts.clone());
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc = layer.layer(mock);
    handle.allow(10);

    for remaining in [1, 0] {
        let fut = svc.ready().await.unwrap().call(Request::new(()));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        let rsp = fut.await.unwrap();
        assert_eq!(rsp.headers()["ratelimit-policy"], "\"ingest\";q=2;w=1");
        assert_eq!(
            rsp.headers()["ratelimit"],
            format!("\"ingest\";r={remaining};t=1").as_str()
        );
    }

    let err: BoxError = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap_err();
    let err = err.downcast_ref::<FilterError>().unwrap();
    let FilterError::RateLimited {
        retry_after,
        policy,
        state,
        degraded: false,
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*retry_after, Duration::from_millis(500));
    assert_eq!(policy, "\"ingest\";q=2;w=1");
    assert_eq!(state, "\"ingest\";r=0;t=1");
    assert_eq!(counts.get(), [2, 1, 0]);
}

#[tokio::test]
async fn shadow_mode_lets_everything_through_but_counts() {
    let clock = FakeRelativeClock::default();
    let p = RateLimitParams {
        shadow: true,
        ..params(1, 1, KeyBy::None)
    };
    let lim = Arc::new(KeyedLimiter::new(p, clock.clone(), 10));
    let counts = Arc::new(Counts::default());
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc = RateLimitLayer::new(lim)
        .with_observer(counts.clone())
        .layer(mock);
    handle.allow(10);
    for _ in 0..3 {
        let fut = svc.ready().await.unwrap().call(Request::new(()));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        fut.await.unwrap();
    }
    assert_eq!(counts.get(), [1, 0, 2]);

    // A closure is an observer too.
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let obs: Arc<dyn RateLimitObserver> = Arc::new(move |limit: &str, d: Decision| {
        assert_eq!((limit, d.as_str()), ("ingest", "shadow"));
        s.fetch_add(1, Ordering::Relaxed);
    });
    obs.on_decision("ingest", Decision::Shadow);
    assert_eq!(seen.load(Ordering::Relaxed), 1);
}

#[test]
fn refusal_headers_tell_the_caller_when_to_come_back() {
    let err = FilterError::RateLimited {
        retry_after: Duration::from_millis(1200),
        policy: "\"ingest\";q=50;w=1".into(),
        state: "\"ingest\";r=0;t=2".into(),
        degraded: false,
    };
    let mut h = http::HeaderMap::new();
    refusal_headers(&err, &mut h);
    assert_eq!(h["retry-after"], "2");
    assert_eq!(h["ratelimit-policy"], "\"ingest\";q=50;w=1");
    assert_eq!(h["ratelimit"], "\"ingest\";r=0;t=2");
    let mut h = http::HeaderMap::new();
    refusal_headers(&FilterError::Timeout(Duration::from_secs(2)), &mut h);
    assert!(h.is_empty());
}

#[tokio::test(start_paused = true)]
async fn sweeper_task_cleans_periodically_and_ends_with_the_registry() {
    let clock = FakeRelativeClock::default();
    let reg: Arc<RateLimitRegistry<&str, _>> =
        Arc::new(RateLimitRegistry::with_clock(clock.clone()));
    let lim = reg.get_or_rebuild("r", &params(10, 1, KeyBy::Path));
    for key in 0..100 {
        lim.check_key(key);
    }
    let task = reg.spawn_sweeper(Duration::from_secs(10));
    clock.advance(Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(lim.keys(), 0);
    drop(lim);
    drop(reg);
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(task.is_finished());
}
