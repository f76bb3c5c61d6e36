//! [`FleetLimiter`]: one fleet limit's shares, spent by requests; and
//! [`FleetRegistry`]: every fleet limit of the proxy, kept across policy swaps.

use std::fmt::{self, Write as _};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderValue, Request};
use sha2::{Digest, Sha256};

use super::share::{Plan, Share, Sizing, Take};
use crate::clock::PollClock;
use crate::ratelimit::limiter::{KeyMix, key_material, policy_header, state_header};
use crate::ratelimit::{DEFAULT_MAX_KEYS, KeyedLimiter, RateLimitParams, Verdict};
use crate::registry::Registry;

/// Prefix of every bucket key in Redis.
pub const REDIS_KEY_PREFIX: &str = "sluice:rl:";

/// A share idle this long is given back to the bucket and dropped.
const IDLE_AFTER: Duration = Duration::from_secs(2);

/// How the fleet limits of one proxy reach their store, shared by all of them.
#[derive(Debug)]
pub(crate) struct FleetBackend {
    degraded: AtomicBool,
    /// Whether the store was ever asked: the first reconciliation checks it even with
    /// nothing to send, so a wrong address shows before the first request needs it.
    asked: AtomicBool,
    /// The reconciliation interval.
    pub(crate) interval: Duration,
    /// N when no one names the fleet size of a route.
    pub(crate) default_size: u32,
}

impl FleetBackend {
    pub(crate) fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Marks the store asked, returning whether it had been before.
    pub(crate) fn mark_asked(&self) -> bool {
        self.asked.swap(true, Ordering::Relaxed)
    }

    /// Sets the flag, returning the previous value.
    pub(crate) fn set_degraded(&self, degraded: bool) -> bool {
        self.degraded.swap(degraded, Ordering::Relaxed)
    }
}

/// What a fleet limit decided about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetVerdict {
    /// The decision and its header values.
    pub verdict: Verdict,
    /// Decided by the local fallback (`perSecond / N`) because Redis is unreachable.
    pub degraded: bool,
}

// === impl FleetLimiter ===

/// One `scope: fleet` rate limit: per key, a share of the fleet's quota held in this
/// proxy, spent by requests without a lock, topped up by the sync task.
pub struct FleetLimiter {
    params: RateLimitParams,
    id: Arc<str>,
    policy: Arc<str>,
    route: Arc<str>,
    scope: [u8; 32],
    shares: papaya::HashMap<u64, Arc<Share>, BuildHasherDefault<KeyMix>>,
    len: AtomicUsize,
    max_keys: usize,
    overflow: Arc<Share>,
    hasher: RandomState,
    backend: Arc<FleetBackend>,
    fleet_size: AtomicU32,
    fallback: ArcSwap<KeyedLimiter<PollClock>>,
    policy_header: HeaderValue,
    capacity: u64,
}

impl fmt::Debug for FleetLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetLimiter")
            .field("id", &self.id)
            .field("params", &self.params)
            .field("keys", &self.keys())
            .finish_non_exhaustive()
    }
}

impl FleetLimiter {
    fn new(
        params: RateLimitParams,
        policy: &str,
        route: &str,
        id: Arc<str>,
        backend: Arc<FleetBackend>,
        max_keys: usize,
    ) -> Self {
        let scope: [u8; 32] = Sha256::new()
            .chain_update(b"sluice-fleet-limit/1")
            .chain_update((policy.len() as u64).to_be_bytes())
            .chain_update(policy)
            .chain_update((route.len() as u64).to_be_bytes())
            .chain_update(route)
            .finalize()
            .into();
        // A bucket smaller than two intervals of refill would drop tokens between
        // reconciliations, so it holds at least that much.
        let refill = (f64::from(params.per_second.get()) * 2.0 * backend.interval.as_secs_f64())
            .ceil() as u64;
        let capacity = u64::from(params.burst.get()).max(refill).max(1);
        let n = backend.default_size.max(1);
        let overflow = Arc::new(Share::on_credit(redis_key(&scope, 255, b""), 0));
        Self {
            fallback: ArcSwap::from_pointee(fallback(&params, n, max_keys)),
            policy_header: policy_header(&params),
            params,
            id,
            policy: policy.into(),
            route: route.into(),
            scope,
            shares: papaya::HashMap::default(),
            len: AtomicUsize::new(0),
            max_keys,
            overflow,
            hasher: RandomState::new(),
            backend,
            fleet_size: AtomicU32::new(n),
            capacity,
        }
    }

    /// The params this limit was built for.
    pub fn params(&self) -> &RateLimitParams {
        &self.params
    }

    /// The policy's and the route's names, by which the control plane counts proxies.
    pub fn names(&self) -> (&str, &str) {
        (&self.policy, &self.route)
    }

    /// The capacity of each key's bucket in Redis: `burst`, or two intervals of
    /// `perSecond` when that is more.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Keys this proxy holds a share of (the overflow share not counted).
    pub fn keys(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// The N the fallback currently divides by.
    pub fn fleet_size(&self) -> u32 {
        self.fleet_size.load(Ordering::Relaxed)
    }

    /// True while requests are decided by the local fallback.
    pub fn is_degraded(&self) -> bool {
        self.backend.is_degraded()
    }

    /// The `RateLimit-Policy` header value: the fleet's quota.
    pub fn policy_header(&self) -> &HeaderValue {
        &self.policy_header
    }

    /// The `RateLimit` header value of `v`, from the fallback's quota when degraded.
    pub fn state_header(&self, v: FleetVerdict) -> HeaderValue {
        if v.degraded {
            self.fallback.load().state_header(v.verdict)
        } else {
            state_header(&self.params, v.verdict)
        }
    }

    /// The Redis key of a request's bucket: a fixed, unseeded hash of (policy, route,
    /// key value), the same in every proxy; the key value itself never leaves the proxy.
    pub fn redis_key_of<B>(&self, req: &Request<B>) -> String {
        let (tag, bytes) = key_material(&self.params.key, req);
        redis_key(&self.scope, tag, bytes).to_string()
    }

    /// Decides one request: spends a token of its key's share, or of the fallback's
    /// bucket while degraded. Never waits; takes no lock.
    pub fn check<B>(&self, req: &Request<B>) -> FleetVerdict {
        if self.backend.is_degraded() {
            return FleetVerdict {
                verdict: self.fallback.load().check(req),
                degraded: true,
            };
        }
        let (tag, bytes) = key_material(&self.params.key, req);
        let h = self.hasher.hash_one((tag, bytes));
        let shares = self.shares.pin();
        // A share retired between lookup and take is looked up (and made) again.
        for _ in 0..3 {
            let share = match shares.get(&h) {
                Some(s) => s,
                None if self.len.load(Ordering::Relaxed) >= self.max_keys => &self.overflow,
                None => {
                    let credit = self.sizing().floor;
                    let fresh =
                        Arc::new(Share::on_credit(redis_key(&self.scope, tag, bytes), credit));
                    match shares.try_insert(h, fresh) {
                        Ok(s) => {
                            self.len.fetch_add(1, Ordering::Relaxed);
                            s
                        }
                        Err(occupied) => occupied.current,
                    }
                }
            };
            let verdict = match share.take() {
                Take::Allowed(remaining) => Verdict::Allowed { remaining },
                Take::Empty => Verdict::Limited {
                    retry_after: share.retry_after(self.backend.interval),
                },
                Take::Closed => continue,
            };
            return FleetVerdict {
                verdict,
                degraded: false,
            };
        }
        FleetVerdict {
            verdict: Verdict::Limited {
                retry_after: self.backend.interval,
            },
            degraded: false,
        }
    }

    /// How this limit's shares are sized now.
    pub(crate) fn sizing(&self) -> Sizing {
        let n = u64::from(self.fleet_size().max(1));
        let idle_syncs = (IDLE_AFTER.as_nanos() / self.backend.interval.as_nanos().max(1))
            .clamp(2, u128::from(u32::MAX)) as u32;
        Sizing {
            floor: u64::from(self.params.burst.get())
                .div_ceil(n)
                .clamp(1, self.capacity),
            capacity: self.capacity,
            idle_syncs,
            per_second: self.params.per_second.get(),
            interval: self.backend.interval,
        }
    }

    /// Sets N; the fallback is rebuilt for `perSecond / N` when it changed.
    pub(crate) fn set_fleet_size(&self, n: u32) {
        let n = n.max(1);
        if self.fleet_size.swap(n, Ordering::Relaxed) != n {
            self.fallback
                .store(Arc::new(fallback(&self.params, n, self.max_keys)));
        }
    }

    /// Plans every share for one reconciliation; idle shares are taken out of the map
    /// and give their tokens back.
    pub(crate) fn plan(&self) -> Vec<(Arc<Share>, Plan)> {
        let sizing = self.sizing();
        let shares = self.shares.pin();
        let mut plans = Vec::new();
        for (h, share) in shares.iter() {
            let mut plan = share.plan(&sizing);
            if plan.retire && shares.remove(h).is_some() {
                self.len.fetch_sub(1, Ordering::Relaxed);
                plan.delta = -i64::try_from(share.close()).unwrap_or(0);
            }
            plans.push((share.clone(), plan));
        }
        // The overflow share is never dropped; idle, it gives its tokens back.
        let mut plan = self.overflow.plan(&sizing);
        if plan.retire {
            plan.delta = -i64::try_from(self.overflow.give_back_all()).unwrap_or(0);
            plan.retire = false;
        }
        plans.push((self.overflow.clone(), plan));
        plans
    }

    /// Tokens held in this proxy over all keys.
    pub fn held(&self) -> u64 {
        let shares = self.shares.pin();
        shares.values().map(|s| s.held()).sum::<u64>() + self.overflow.held()
    }
}

fn redis_key(scope: &[u8; 32], tag: u8, bytes: &[u8]) -> Arc<str> {
    let digest = Sha256::new()
        .chain_update(scope)
        .chain_update([tag])
        .chain_update((bytes.len() as u64).to_be_bytes())
        .chain_update(bytes)
        .finalize();
    let mut key = String::with_capacity(REDIS_KEY_PREFIX.len() + 32);
    key.push_str(REDIS_KEY_PREFIX);
    for b in &digest[..16] {
        let _ = write!(key, "{b:02x}");
    }
    key.into()
}

/// The local limiter used while Redis is unreachable: `perSecond / N`, `burst / N`.
fn fallback(p: &RateLimitParams, n: u32, max_keys: usize) -> KeyedLimiter<PollClock> {
    let div = |v: std::num::NonZeroU32| {
        std::num::NonZeroU32::new(v.get().div_ceil(n)).unwrap_or(std::num::NonZeroU32::MIN)
    };
    let local = RateLimitParams {
        per_second: div(p.per_second),
        burst: div(p.burst),
        ..p.clone()
    };
    KeyedLimiter::new(local, PollClock, max_keys)
}

// === impl FleetRegistry ===

/// How a proxy's fleet limits reconcile, set once at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetSettings {
    /// How often every share is reconciled.
    pub interval: Duration,
    /// N for the fallback where the control plane names none.
    pub default_size: u32,
    /// Whether a store (Redis) is configured; without one the limits run on the
    /// fallback from the start.
    pub connected: bool,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            default_size: 1,
            connected: false,
        }
    }
}

/// Every fleet limit of a proxy, by route; limits with unchanged params keep their
/// shares across a policy swap.
pub struct FleetRegistry<K> {
    pub(crate) limiters: Registry<K, FleetLimiter>,
    pub(crate) backend: Arc<FleetBackend>,
    max_keys: usize,
}

impl<K: Hash + Eq> fmt::Debug for FleetRegistry<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetRegistry")
            .field("limits", &self.limiters.len())
            .field("backend", &self.backend)
            .finish()
    }
}

impl<K: Hash + Eq + Clone> FleetRegistry<K> {
    /// An empty registry.
    pub fn new(settings: FleetSettings) -> Self {
        Self {
            limiters: Registry::default(),
            backend: Arc::new(FleetBackend {
                degraded: AtomicBool::new(!settings.connected),
                asked: AtomicBool::new(false),
                interval: settings.interval.max(Duration::from_millis(1)),
                default_size: settings.default_size.max(1),
            }),
            max_keys: DEFAULT_MAX_KEYS,
        }
    }

    /// Caps the keys each limit holds shares of; beyond it new keys share one.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// The limit of route `key` (`policy`/`route` name its Redis keys; a mesh qualifies
    /// `policy` with its namespace, since policy names repeat across namespaces): the
    /// current one when its params and names are unchanged, else a fresh one.
    pub fn get_or_rebuild(
        &self,
        key: K,
        id: &str,
        policy: &str,
        route: &str,
        params: &RateLimitParams,
    ) -> Arc<FleetLimiter> {
        self.limiters.get_or_rebuild(
            key,
            |held| held.params == *params && *held.id == *id,
            |_| {
                FleetLimiter::new(
                    params.clone(),
                    policy,
                    route,
                    id.into(),
                    self.backend.clone(),
                    self.max_keys,
                )
            },
        )
    }

    /// Keeps only the routes for which `keep` is true (call after a swap).
    pub fn retain(&self, keep: impl FnMut(&K) -> bool) {
        self.limiters.retain(keep);
    }

    /// True while the limits run on their local fallback.
    pub fn is_degraded(&self) -> bool {
        self.backend.is_degraded()
    }
}
