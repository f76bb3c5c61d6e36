//! The share accounting on paused time, against an in-memory bucket store that does
//! what the Redis script does (the end-to-end tests run the script in a real Redis).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use tokio::time::Instant;

use super::*;
use crate::ratelimit::{KeyBy, RateLimitParams, Verdict};

const INTERVAL: Duration = Duration::from_millis(100);

/// Per key: thousandths of a token, and when they were counted.
type Buckets = HashMap<Arc<str>, (i64, Instant)>;

/// Token buckets in thousandths of a token, refilled on (paused) tokio time: the
/// Redis script's arithmetic.
#[derive(Clone, Default)]
struct MemoryBuckets {
    buckets: Arc<Mutex<Buckets>>,
    round_trips: Arc<Mutex<usize>>,
}

impl MemoryBuckets {
    fn apply(&self, r: &LeaseRequest) -> LeaseGrant {
        let now = Instant::now();
        let cap = i64::try_from(r.capacity).unwrap() * 1000;
        let mut b = self.buckets.lock().unwrap();
        let (m, at) = b.get(&r.key).copied().unwrap_or((cap, now));
        let ms = i64::try_from(now.duration_since(at).as_millis()).unwrap();
        let mut m = (m + ms * i64::from(r.per_second)).min(cap);
        m -= i64::try_from(r.debt).unwrap() * 1000;
        let mut granted = 0;
        if r.delta < 0 {
            m = (m - r.delta * 1000).min(cap);
        } else if r.delta > 0 && m >= 1000 {
            granted = r.delta.min(m / 1000);
            m -= granted * 1000;
        }
        b.insert(r.key.clone(), (m, now));
        LeaseGrant {
            granted: u64::try_from(granted).unwrap(),
            balance: m.div_euclid(1000),
        }
    }
}

impl LeaseStore for MemoryBuckets {
    fn exchange<'a>(&'a mut self, batch: &'a [LeaseRequest]) -> LeaseFuture<'a> {
        *self.round_trips.lock().unwrap() += 1;
        let answers = batch.iter().map(|r| self.apply(r)).collect();
        Box::pin(async move { Ok(answers) })
    }
}

/// A store that never answers (Redis stopped).
struct Silent;

impl LeaseStore for Silent {
    fn exchange<'a>(&'a mut self, _: &'a [LeaseRequest]) -> LeaseFuture<'a> {
        Box::pin(std::future::pending())
    }
}

/// A store that refuses at once (Redis down).
struct Down;

impl LeaseStore for Down {
    fn exchange<'a>(&'a mut self, _: &'a [LeaseRequest]) -> LeaseFuture<'a> {
        Box::pin(async { Err("connection refused".into()) })
    }
}

/// A store that answers fewer grants than it was asked for.
struct Short;

impl LeaseStore for Short {
    fn exchange<'a>(&'a mut self, _: &'a [LeaseRequest]) -> LeaseFuture<'a> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// A store whose client gives up first (its own response timeout).
struct ClientTimeout;

impl LeaseStore for ClientTimeout {
    fn exchange<'a>(&'a mut self, _: &'a [LeaseRequest]) -> LeaseFuture<'a> {
        Box::pin(async {
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "response timed out").into())
        })
    }
}

/// Records what an observer is told: each error as `(error, true)`, each switch of the
/// fallback as `(Error, degraded)`.
struct Errors(Arc<Mutex<Vec<(BackendError, bool)>>>);

impl FleetObserver for Errors {
    fn on_backend_error(&self, e: BackendError) {
        self.0.lock().unwrap().push((e, true));
    }
    fn on_degraded(&self, d: bool) {
        self.0.lock().unwrap().push((BackendError::Error, d));
    }
}

fn params(per_second: u32, burst: u32) -> RateLimitParams {
    RateLimitParams {
        name: Arc::from("quota"),
        per_second: NonZeroU32::new(per_second).unwrap(),
        burst: NonZeroU32::new(burst).unwrap(),
        key: KeyBy::Header(http::HeaderName::from_static("x-tenant")),
        shadow: false,
        fleet: true,
    }
}

fn proxy(n: u32, p: &RateLimitParams) -> (FleetRegistry<&'static str>, Arc<FleetLimiter>) {
    let reg = FleetRegistry::new(FleetSettings {
        interval: INTERVAL,
        default_size: n,
        connected: true,
    });
    let lim = reg.get_or_rebuild("r", "shop.quota", "shop", "quota", p);
    (reg, lim)
}

fn req(tenant: &str) -> Request<()> {
    Request::builder()
        .header("x-tenant", tenant)
        .body(())
        .unwrap()
}

fn allowed(lim: &FleetLimiter, tenant: &str, n: usize) -> usize {
    let r = req(tenant);
    (0..n)
        .filter(|_| matches!(lim.check(&r).verdict, Verdict::Allowed { .. }))
        .count()
}

fn opts() -> SyncOptions {
    SyncOptions::new(Duration::from_secs(1), INTERVAL)
}

fn no_sizes(_: &str, _: &str) -> Option<u32> {
    None
}

#[tokio::test(start_paused = true)]
async fn a_first_seen_key_spends_its_part_of_the_burst_at_once_and_pays_it_as_debt() {
    let p = params(10, 30);
    let (reg, lim) = proxy(3, &p);
    let mut store = MemoryBuckets::default();
    // ⌈30 / 3⌉ on credit, before any round trip.
    assert_eq!(allowed(&lim, "acme", 50), 10);
    assert!(
        reg.sync_once(&mut store, &opts(), &no_sizes, &NoopFleetObserver)
            .await
    );
    // The bucket paid the 10 of credit and granted twice the 50 asked for, capped by
    // what is left of the burst: 30 - 10 = 20.
    assert_eq!(lim.held(), 20);
    let key = lim.redis_key_of(&req("acme"));
    assert_eq!(store.buckets.lock().unwrap()[key.as_str()].0, 0);
    assert_eq!(allowed(&lim, "acme", 50), 20);
}

#[tokio::test(start_paused = true)]
async fn three_proxies_with_uneven_load_admit_at_most_the_fleet_quota() {
    let p = params(100, 100);
    let store = MemoryBuckets::default();
    let proxies: Vec<_> = (0..3).map(|_| proxy(3, &p)).collect();
    let mut stores: Vec<_> = (0..3).map(|_| store.clone()).collect();
    // Requests per 10 ms tick: 3/s, 60/s and 400/s offered, 463/s together.
    let load = [0.03, 0.6, 4.0];
    let mut owed = [0.0f64; 3];
    let mut admitted = [0usize; 3];
    let start = Instant::now();
    let secs = 30;
    for tick in 0..(secs * 100) {
        for (i, (_, lim)) in proxies.iter().enumerate() {
            owed[i] += load[i];
            let n = owed[i].floor();
            owed[i] -= n;
            admitted[i] += allowed(lim, "acme", n as usize);
        }
        // Each proxy reconciles on its own phase of the interval.
        if tick % 10 < 3 {
            let i = (tick % 10) as usize;
            proxies[i]
                .0
                .sync_once(&mut stores[i], &opts(), &no_sizes, &NoopFleetObserver)
                .await;
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let total: usize = admitted.iter().sum();
    // The stated bound: capacity + perSecond × t + the first-seen credit of each proxy.
    let upper = 100.0 + 100.0 * elapsed + 3.0 * 34.0;
    assert!((total as f64) <= upper, "admitted {total} > {upper}");
    // And the quota is used: the shortfall is at most what the shares hold.
    assert!(
        (total as f64) >= 100.0 * elapsed * 0.95,
        "admitted {total} of {}",
        100.0 * elapsed
    );
    // The lightly loaded proxy is never starved by the heavy one.
    assert_eq!(
        admitted[0],
        (0.03f64 * 100.0 * secs as f64).round() as usize
    );
    // At most one round trip per proxy per interval (none with nothing to tell).
    let trips = *store.round_trips.lock().unwrap();
    assert!(
        trips <= (secs * 100 / 10 * 3) as usize,
        "{trips} round trips"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_store_switches_to_the_local_fallback_and_an_answer_ends_it() {
    let p = params(90, 90);
    let (reg, lim) = proxy(3, &p);
    let mut store = MemoryBuckets::default();
    assert_eq!(allowed(&lim, "acme", 1), 1);
    assert!(
        reg.sync_once(&mut store, &opts(), &no_sizes, &NoopFleetObserver)
            .await
    );
    assert!(!lim.is_degraded());

    // Redis stops answering: after three intervals of silence requests fall back,
    // while the round trip itself waits out its timeout.
    assert_eq!(allowed(&lim, "acme", 1), 1);
    let reg = Arc::new(reg);
    let sync = {
        let reg = reg.clone();
        tokio::spawn(async move {
            reg.sync_once(&mut Silent, &opts(), &no_sizes, &NoopFleetObserver)
                .await
        })
    };
    tokio::time::sleep(INTERVAL * 3 + Duration::from_millis(1)).await;
    assert!(lim.is_degraded());
    let v = lim.check(&req("acme"));
    assert!(v.degraded);
    // perSecond / N = 30: the fallback's burst is 30.
    assert_eq!(allowed(&lim, "acme", 100), 29);
    assert!(
        !sync.await.unwrap(),
        "a timed-out round trip counts as failed"
    );

    // Down: still degraded, errors counted.
    let errors = Arc::new(Mutex::new(Vec::new()));
    let obs = Errors(errors.clone());
    assert!(!reg.sync_once(&mut Down, &opts(), &no_sizes, &obs).await);
    assert!(lim.is_degraded());
    // Back: the next round trip (a health check even without demand) ends it.
    assert!(reg.sync_once(&mut store, &opts(), &no_sizes, &obs).await);
    assert!(!lim.is_degraded());
    assert!(!lim.check(&req("acme")).degraded);
    assert_eq!(
        *errors.lock().unwrap(),
        [(BackendError::Error, true), (BackendError::Error, false)]
    );
}

/// A store that cannot be reached shows at the first reconciliation, before any
/// request needs it; later ones with nothing to send leave a healthy store alone. A
/// client that gives up on its own time limit counts as a timeout, not an error.
#[tokio::test(start_paused = true)]
async fn the_first_reconciliation_checks_the_store_and_a_client_timeout_is_a_timeout() {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let obs = Errors(errors.clone());
    let (reg, lim) = proxy(3, &params(90, 90));
    assert!(!reg.sync_once(&mut Down, &opts(), &no_sizes, &obs).await);
    assert!(lim.is_degraded());
    assert!(
        !reg.sync_once(&mut ClientTimeout, &opts(), &no_sizes, &obs)
            .await
    );
    assert_eq!(
        *errors.lock().unwrap(),
        [
            (BackendError::Error, true),
            (BackendError::Error, true),
            (BackendError::Timeout, true)
        ]
    );

    // An answer that does not match the batch is an error, not grants.
    let (reg, lim) = proxy(3, &params(90, 90));
    assert_eq!(allowed(&lim, "acme", 1), 1);
    assert!(!reg.sync_once(&mut Short, &opts(), &no_sizes, &obs).await);
    assert!(lim.is_degraded());

    let (reg, lim) = proxy(3, &params(90, 90));
    let mut store = MemoryBuckets::default();
    for _ in 0..3 {
        assert!(reg.sync_once(&mut store, &opts(), &no_sizes, &obs).await);
    }
    assert!(!lim.is_degraded());
    assert_eq!(
        *store.round_trips.lock().unwrap(),
        1,
        "one check, then quiet"
    );
}

/// Two proxies started together, with the same demand over the fleet limit, each get
/// a fair part of it: their reconciliations must not fall into one fixed order in which
/// the first to ask after each refill takes it all.
#[tokio::test(start_paused = true)]
async fn two_proxies_with_equal_demand_share_the_limit() {
    let p = params(50, 50);
    let store = MemoryBuckets::default();
    let proxies: Vec<_> = (0..2)
        .map(|_| {
            let (reg, lim) = proxy(2, &p);
            (Arc::new(reg), lim)
        })
        .collect();
    let _syncs: Vec<_> = proxies
        .iter()
        .map(|(reg, _)| {
            reg.spawn_sync(
                store.clone(),
                opts(),
                Arc::new(no_sizes),
                Arc::new(NoopFleetObserver),
            )
        })
        .collect();
    // 60 requests a second offered to each, 120 against a limit of 50.
    let mut owed = [0.0f64; 2];
    let mut admitted = [0usize; 2];
    for _ in 0..2000 {
        for (i, (_, lim)) in proxies.iter().enumerate() {
            owed[i] += 0.6;
            let n = owed[i].floor();
            owed[i] -= n;
            admitted[i] += allowed(lim, "acme", n as usize);
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    let total = (admitted[0] + admitted[1]) as f64;
    // 20 s at 50 a second, within the burst and the first-seen credit: the limit held
    // and kept admitting, so reconciliation ran all along.
    assert!((900.0..=1100.0).contains(&total), "{admitted:?}");
    // Waits average one interval: about 200 rounds each in 20 s.
    let trips = *store.round_trips.lock().unwrap();
    assert!((300..=500).contains(&trips), "{trips} round trips");
    for a in admitted {
        let part = a as f64 / total;
        assert!((0.35..=0.65).contains(&part), "{admitted:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_round_trip_keeps_the_debt_for_the_next_one() {
    let p = params(10, 30);
    let (reg, lim) = proxy(1, &p);
    assert_eq!(allowed(&lim, "acme", 5), 5);
    assert!(
        !reg.sync_once(&mut Down, &opts(), &no_sizes, &NoopFleetObserver)
            .await
    );
    let mut store = MemoryBuckets::default();
    assert!(
        reg.sync_once(&mut store, &opts(), &no_sizes, &NoopFleetObserver)
            .await
    );
    // The 30 of credit was paid once, when the store answered.
    let key = lim.redis_key_of(&req("acme"));
    let (m, _) = store.buckets.lock().unwrap()[key.as_str()];
    assert_eq!(m, 0);
}

#[tokio::test(start_paused = true)]
async fn an_idle_share_goes_back_to_the_bucket_and_its_key_is_dropped() {
    let p = params(10, 30);
    let (reg, lim) = proxy(1, &p);
    let mut store = MemoryBuckets::default();
    assert_eq!(allowed(&lim, "acme", 1), 1);
    assert_eq!(lim.keys(), 1);
    let mut syncs = 0;
    while lim.keys() > 0 && syncs < 100 {
        reg.sync_once(&mut store, &opts(), &no_sizes, &NoopFleetObserver)
            .await;
        syncs += 1;
        tokio::time::advance(INTERVAL).await;
    }
    // One round with demand, then 2 s of idle rounds at 100 ms.
    assert_eq!(syncs, 21);
    assert_eq!(lim.held(), 0);
    // The 29 unspent tokens went back: the bucket is full again.
    let key = lim.redis_key_of(&req("acme"));
    let (m, _) = store.buckets.lock().unwrap()[key.as_str()];
    assert_eq!(m, 30_000);
}

#[tokio::test(start_paused = true)]
async fn the_fleet_size_from_the_control_plane_wins_over_the_flag() {
    let p = params(100, 100);
    let (reg, lim) = proxy(2, &p);
    assert_eq!(lim.fleet_size(), 2);
    let sizes = |policy: &str, route: &str| (policy == "shop" && route == "quota").then_some(4);
    reg.sync_once(&mut Down, &opts(), &sizes, &NoopFleetObserver)
        .await;
    assert_eq!(lim.fleet_size(), 4);
    // perSecond / 4 = 25 while degraded, as burst and as refill.
    assert_eq!(allowed(&lim, "acme", 100), 25);
    tokio::time::advance(Duration::from_millis(200)).await;
    assert_eq!(allowed(&lim, "acme", 100), 5);
}

/// Past `max_keys` new keys get no credit of their own: they spend one overflow share,
/// leased like any other, which stays in place and gives its tokens back when idle.
#[tokio::test(start_paused = true)]
async fn keys_past_the_cap_share_one_overflow_share_that_gives_back_when_idle() {
    // One token a second: what comes back to the bucket is what was given back.
    let p = params(1, 30);
    let reg = FleetRegistry::new(FleetSettings {
        interval: INTERVAL,
        default_size: 1,
        connected: true,
    })
    .max_keys(1);
    let lim = reg.get_or_rebuild("r", "shop.quota", "shop", "quota", &p);
    let mut store = MemoryBuckets::default();
    assert_eq!(allowed(&lim, "acme", 1), 1);
    assert_eq!(allowed(&lim, "globex", 1), 0);
    assert_eq!(allowed(&lim, "initech", 1), 0);
    assert_eq!(lim.keys(), 1);
    assert!(
        reg.sync_once(&mut store, &opts(), &no_sizes, &NoopFleetObserver)
            .await
    );
    // acme keeps 29 of its credit; the overflow share was granted the floor, 30, from
    // a bucket of its own.
    assert_eq!(lim.held(), 59);
    assert_eq!(
        allowed(&lim, "globex", 10) + allowed(&lim, "initech", 10),
        20
    );
    assert_eq!(lim.keys(), 1);
    let acme = lim.redis_key_of(&req("acme"));
    for _ in 0..30 {
        tokio::time::advance(INTERVAL).await;
        reg.sync_once(&mut store, &opts(), &no_sizes, &NoopFleetObserver)
            .await;
    }
    assert_eq!((lim.keys(), lim.held()), (0, 0));
    // The overflow bucket got its 10 unspent tokens back (plus about 3 s of refill).
    let buckets = store.buckets.lock().unwrap();
    let (overflow, _) = buckets
        .iter()
        .find(|(k, _)| ***k != *acme)
        .map(|(_, v)| *v)
        .unwrap();
    assert!((10_000..=14_000).contains(&overflow), "{overflow}");
    // acme dropped, a new key is under the cap again and gets a share and credit.
    drop(buckets);
    assert_eq!(allowed(&lim, "globex", 1), 1);
    assert_eq!(lim.keys(), 1);
}

#[test]
fn a_limit_is_kept_across_swaps_only_while_its_params_and_route_are_unchanged() {
    let reg = FleetRegistry::new(FleetSettings::default());
    assert!(
        reg.is_degraded(),
        "without a store the limits start on the fallback"
    );
    let a = reg.get_or_rebuild("r", "shop.quota", "shop", "quota", &params(10, 10));
    let same = reg.get_or_rebuild("r", "shop.quota", "shop", "quota", &params(10, 10));
    assert!(Arc::ptr_eq(&a, &same));
    let other_params = reg.get_or_rebuild("r", "shop.quota", "shop", "quota", &params(10, 20));
    assert!(!Arc::ptr_eq(&a, &other_params));
    let renamed = reg.get_or_rebuild("r", "shop.other", "shop", "other", &params(10, 20));
    assert!(!Arc::ptr_eq(&other_params, &renamed));
    assert_eq!(renamed.names(), ("shop", "other"));
    reg.retain(|k| *k != "r");
    let fresh = reg.get_or_rebuild("r", "shop.other", "shop", "other", &params(10, 20));
    assert!(
        !Arc::ptr_eq(&renamed, &fresh),
        "a retained-out limit is gone"
    );

    let connected = FleetRegistry::<&str>::new(FleetSettings {
        connected: true,
        ..FleetSettings::default()
    });
    assert!(!connected.is_degraded());
    assert_eq!(BackendError::Timeout.as_str(), "timeout");
    assert_eq!(BackendError::Error.as_str(), "error");
}

#[test]
fn redis_keys_are_a_fixed_hash_of_policy_route_and_key_value() {
    let p = params(10, 10);
    let (_, a) = proxy(1, &p);
    let (_, b) = proxy(1, &p);
    let key = a.redis_key_of(&req("acme"));
    assert_eq!(key, b.redis_key_of(&req("acme")), "every proxy agrees");
    assert_ne!(key, a.redis_key_of(&req("globex")));
    assert!(
        key.starts_with(REDIS_KEY_PREFIX) && !key.contains("acme"),
        "{key}"
    );
    assert_eq!(key.len(), REDIS_KEY_PREFIX.len() + 32);
    // Pinned: a change of the hash would split one quota in two during a rollout.
    assert_eq!(key, "sluice:rl:0588b96c793755e9fafcb0d83fc754f6");
}
