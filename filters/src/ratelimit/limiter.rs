use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, Reference};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::{HeaderValue, Request};

use super::{KeyBy, RateLimitParams};
use crate::clock::PollClock;
use crate::extensions::PeerIdentity;
use crate::registry::Registry;

/// Keys a limiter keeps by default before new keys share one overflow bucket.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// Inline sweeps (on a full key table) run at most this often; the proxy's periodic
/// [`RateLimitRegistry::sweep`] does the regular cleaning.
const MIN_INLINE_SWEEP: Duration = Duration::from_secs(1);

// === impl KeyStore ===

/// Request keys are already SipHash outputs (seeded per process), so one multiply-xorshift
/// is enough to spread any `u64` (also small integers passed to `check_key`) over the
/// high bits the map's shards and control bytes use.
#[derive(Default)]
pub(crate) struct KeyMix(u64);

impl Hasher for KeyMix {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Governor state store with bounded memory.
///
/// Each state is a GCRA theoretical arrival time in an `AtomicU64` (0 = fresh), exactly as
/// governor's own stores keep it. Unlike `DashMapStateStore`, this one counts its keys and,
/// once `max_keys` are held, sends new keys to one shared overflow bucket instead of growing:
/// a flood of fresh keys can neither exhaust memory nor reset an existing key's bucket.
pub(crate) struct KeyStore(Arc<StoreInner>);

pub(crate) struct StoreInner {
    keyed: bool,
    map: DashMap<u64, AtomicU64, BuildHasherDefault<KeyMix>>,
    single: AtomicU64,
    overflow: AtomicU64,
    len: AtomicUsize,
    max_keys: usize,
    saturated: AtomicBool,
}

impl StoreInner {
    fn new(keyed: bool, max_keys: usize) -> Self {
        Self {
            keyed,
            map: DashMap::default(),
            single: AtomicU64::new(0),
            overflow: AtomicU64::new(0),
            len: AtomicUsize::new(0),
            max_keys,
            saturated: AtomicBool::new(false),
        }
    }
}

/// Governor's compare-and-swap loop over one state (its `InMemoryState` is crate-private).
fn measure<T, F, E>(state: &AtomicU64, f: F) -> Result<T, E>
where
    F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
{
    let decode = |v: u64| (v != 0).then(|| Nanos::from(v));
    let mut prev = state.load(Ordering::Acquire);
    let mut decision = f(decode(prev));
    while let Ok((result, new)) = decision {
        match state.compare_exchange_weak(prev, new.into(), Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return Ok(result),
            Err(actual) => prev = actual,
        }
        decision = f(decode(prev));
    }
    decision.map(|(result, _)| result)
}

impl StateStore for KeyStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let this = &*self.0;
        if !this.keyed {
            return measure(&this.single, f);
        }
        if let Some(state) = this.map.get(key) {
            return measure(&state, f);
        }
        if this.len.load(Ordering::Relaxed) >= this.max_keys {
            this.saturated.store(true, Ordering::Relaxed);
            return measure(&this.overflow, f);
        }
        let state = this
            .map
            .entry(*key)
            .or_insert_with(|| {
                this.len.fetch_add(1, Ordering::Relaxed);
                AtomicU64::new(0)
            })
            .downgrade();
        measure(&state, f)
    }
}

impl ShrinkableKeyedStateStore<u64> for KeyStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let this = &*self.0;
        let drop_below = u64::from(drop_below);
        this.map.retain(|_, state| {
            // Governor only asks to drop states whose arrival time lies a full emission
            // interval in the past: those already answer like a fresh (full) bucket.
            let keep = state.load(Ordering::Relaxed) > drop_below;
            if !keep {
                this.len.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
        if this.len.load(Ordering::Relaxed) < this.max_keys {
            this.saturated.store(false, Ordering::Relaxed);
        }
    }

    fn shrink_to_fit(&self) {
        self.0.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.len.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// === impl KeyedLimiter ===

type Gcra<C> = RateLimiter<u64, KeyStore, C, StateInformationMiddleware>;

/// The outcome of checking one request against a limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit; `remaining` more requests fit in the bucket right now.
    Allowed {
        /// Requests the bucket still holds after this one.
        remaining: u32,
    },
    /// Over the limit; a token comes back after `retry_after`.
    Limited {
        /// Time until the next request under this key would conform.
        retry_after: Duration,
    },
}

/// Bucket state shared by every [`KeyedLimiter`] built over the same buckets.
struct Buckets<C: Clock> {
    gcra: Gcra<C>,
    store: Arc<StoreInner>,
    clock: C,
    start: C::Instant,
    hasher: RandomState,
    last_sweep: AtomicU64,
    sweeping: AtomicBool,
}

/// The buckets of one rate limit (one route, or one service's inbound limit).
///
/// Built by [`RateLimitRegistry::get_or_rebuild`] once per policy swap and shared by every
/// request through an `Arc`. Checking a request takes no lock beyond a sharded map's read
/// guard and allocates nothing once its key is known.
pub struct KeyedLimiter<C: Clock = PollClock> {
    params: RateLimitParams,
    buckets: Arc<Buckets<C>>,
    policy_header: HeaderValue,
}

impl<C: Clock> fmt::Debug for KeyedLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("params", &self.params)
            .field("keys", &self.keys())
            .finish()
    }
}

impl<C: Clock + Clone> KeyedLimiter<C> {
    /// Builds fresh buckets for `params` on `clock`, keeping at most `max_keys` keys.
    pub fn new(params: RateLimitParams, clock: C, max_keys: usize) -> Self {
        let quota = Quota::per_second(params.per_second).allow_burst(params.burst);
        let store = Arc::new(StoreInner::new(params.key != KeyBy::None, max_keys));
        let gcra: Gcra<C> = RateLimiter::<_, _, _, NoOpMiddleware<C::Instant>>::new(
            quota,
            KeyStore(store.clone()),
            clock.clone(),
        )
        .with_middleware::<StateInformationMiddleware>();
        let start = clock.now();
        Self {
            policy_header: policy_header(&params),
            params,
            buckets: Arc::new(Buckets {
                gcra,
                store,
                clock,
                start,
                hasher: RandomState::new(),
                last_sweep: AtomicU64::new(0),
                sweeping: AtomicBool::new(false),
            }),
        }
    }
}

impl<C: Clock> KeyedLimiter<C> {
    /// The same buckets under new non-bucket settings (name, shadow).
    fn with_params(&self, params: RateLimitParams) -> Self {
        Self {
            policy_header: policy_header(&params),
            params,
            buckets: self.buckets.clone(),
        }
    }

    /// True when `other` shares this limiter's buckets (state carried over a swap).
    pub fn shares_buckets_with(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.buckets, &other.buckets)
    }

    /// The params these buckets were built for.
    pub fn params(&self) -> &RateLimitParams {
        &self.params
    }

    /// Keys currently held (the overflow bucket not counted).
    pub fn keys(&self) -> usize {
        self.buckets.gcra.len()
    }

    /// The `RateLimit-Policy` header value, e.g. `"ingest";q=50;w=1`.
    pub fn policy_header(&self) -> &HeaderValue {
        &self.policy_header
    }

    /// The `RateLimit` header value for `remaining` tokens left, e.g. `"ingest";r=49;t=1`.
    pub fn state_header(&self, verdict: Verdict) -> HeaderValue {
        state_header(&self.params, verdict)
    }

    /// The bucket key of a request under this limit's [`KeyBy`].
    pub fn key_of<B>(&self, req: &Request<B>) -> u64 {
        // One bucket for all: the store ignores the key, so it is not hashed.
        if self.params.key == KeyBy::None {
            return 0;
        }
        self.buckets
            .hasher
            .hash_one(key_material(&self.params.key, req))
    }

    /// Checks (and, when allowed, spends) one token of the request's bucket.
    pub fn check<B>(&self, req: &Request<B>) -> Verdict {
        self.check_key(self.key_of(req))
    }

    /// Checks (and, when allowed, spends) one token of bucket `key`.
    pub fn check_key(&self, key: u64) -> Verdict {
        let b = &*self.buckets;
        let verdict = match b.gcra.check_key(&key) {
            Ok(snapshot) => Verdict::Allowed {
                remaining: snapshot.remaining_burst_capacity(),
            },
            Err(not_until) => Verdict::Limited {
                retry_after: not_until.wait_time_from(b.clock.now()),
            },
        };
        if b.store.saturated.load(Ordering::Relaxed) {
            self.sweep_inline();
        }
        verdict
    }

    /// Drops keys whose bucket is full again (indistinguishable from a new key).
    ///
    /// A dropped key that comes back starts with exactly a full bucket, which is what it
    /// had when dropped, so eviction never hands out extra tokens. Why: a GCRA state is
    /// one theoretical arrival time (TAT); a key whose TAT is at or before `now` admits a
    /// full burst, exactly as a key with no state does. Governor's `retain_recent` drops
    /// only keys with TAT ≤ `now − t` (`t` = one emission interval), a subset of those.
    pub fn sweep(&self) {
        let b = &*self.buckets;
        b.gcra.retain_recent();
        b.gcra.shrink_to_fit();
        b.last_sweep.store(
            b.clock.now().duration_since(b.start).into(),
            Ordering::Relaxed,
        );
    }

    /// A full key table is swept from the request path at most once per second, by one
    /// request; everyone else meanwhile shares the overflow bucket.
    fn sweep_inline(&self) {
        let b = &*self.buckets;
        let now: u64 = b.clock.now().duration_since(b.start).into();
        let last = b.last_sweep.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < MIN_INLINE_SWEEP.as_nanos() as u64 {
            return;
        }
        if b.sweeping
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        b.gcra.retain_recent();
        b.last_sweep.store(now.max(1), Ordering::Relaxed);
        b.sweeping.store(false, Ordering::Release);
    }
}

/// What a request's bucket is keyed by under `key`: a tag telling "no key present" and
/// the key sources apart, and the key's bytes (borrowed from the request).
pub(crate) fn key_material<'a, B>(key: &KeyBy, req: &'a Request<B>) -> (u8, &'a [u8]) {
    match key {
        KeyBy::None => (0, b""),
        KeyBy::Header(name) => match req.headers().get(name) {
            Some(v) => (1, v.as_bytes()),
            None => (0, b""),
        },
        KeyBy::Path => (2, req.uri().path().as_bytes()),
        KeyBy::PeerIdentity => match req.extensions().get::<PeerIdentity>() {
            Some(id) => (3, id.0.as_bytes()),
            None => (0, b""),
        },
    }
}

/// The `RateLimit` header value of `verdict` under `p`, e.g. `"ingest";r=49;t=1`.
pub(crate) fn state_header(p: &RateLimitParams, verdict: Verdict) -> HeaderValue {
    let (r, t) = match verdict {
        Verdict::Allowed { remaining } => {
            // Seconds until the bucket is full again, i.e. until the quota resets.
            let missing = p.burst.get().saturating_sub(remaining);
            (
                remaining,
                u64::from(missing).div_ceil(u64::from(p.per_second.get())),
            )
        }
        Verdict::Limited { retry_after } => (0, ceil_secs(retry_after)),
    };
    // Written on every allowed request when the route sends its limit headers: built
    // in place rather than through `format!`, one allocation (the header's own bytes).
    let (mut r_buf, mut t_buf) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (r, t) = (r_buf.format(r), t_buf.format(t));
    let mut v = Vec::with_capacity(p.name.len() + r.len() + t.len() + 8);
    v.push(b'"');
    v.extend_from_slice(p.name.as_bytes());
    v.extend_from_slice(b"\";r=");
    v.extend_from_slice(r.as_bytes());
    v.extend_from_slice(b";t=");
    v.extend_from_slice(t.as_bytes());
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v))
        .unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
}

pub(crate) fn policy_header(p: &RateLimitParams) -> HeaderValue {
    let v = format!("\"{}\";q={};w={}", p.name, p.burst.get(), p.window_secs());
    HeaderValue::try_from(v).unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
}

/// Whole seconds, rounded up.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

// === impl RateLimitRegistry ===

/// Rate-limit state of every route, keyed by the proxy's route identity.
///
/// At each policy swap the proxy calls [`get_or_rebuild`](Self::get_or_rebuild) for every
/// route that has a limit, then [`retain`](Self::retain) with the routes still present.
/// Unchanged params get the very same limiter back (buckets survive the swap); a change of
/// rate, burst or key builds fresh buckets; a change of only name or shadow keeps them.
pub struct RateLimitRegistry<K, C: Clock = PollClock> {
    limiters: Registry<K, KeyedLimiter<C>>,
    clock: C,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> RateLimitRegistry<K, PollClock> {
    /// An empty registry on the monotonic clock, keeping [`DEFAULT_MAX_KEYS`] keys per limit.
    pub fn new() -> Self {
        Self::with_clock(PollClock)
    }
}

impl<K: Hash + Eq + Clone> Default for RateLimitRegistry<K, PollClock> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq + Clone, C: Clock + Clone> RateLimitRegistry<K, C> {
    /// An empty registry on `clock` (tests pass governor's `FakeRelativeClock`).
    pub fn with_clock(clock: C) -> Self {
        Self {
            limiters: Registry::default(),
            clock,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }

    /// Caps the keys each keyed limit holds; beyond it new keys share one overflow bucket.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// The limiter for `key` under `params`: the current one when its params are equal,
    /// its buckets under new settings when only name/shadow changed, else a fresh one.
    pub fn get_or_rebuild(&self, key: K, params: &RateLimitParams) -> Arc<KeyedLimiter<C>> {
        self.limiters.get_or_rebuild(
            key,
            |current| current.params == *params,
            |current| match current {
                Some(current) if current.params.same_buckets(params) => {
                    current.with_params(params.clone())
                }
                _ => KeyedLimiter::new(params.clone(), self.clock.clone(), self.max_keys),
            },
        )
    }

    /// Keeps only the routes for which `keep` is true (call after a swap).
    pub fn retain(&self, keep: impl FnMut(&K) -> bool) {
        self.limiters.retain(keep);
    }

    /// Sweeps idle keys from every limiter; the proxy calls this periodically (e.g. every 10 s).
    pub fn sweep(&self) {
        for limiter in self.limiters.values() {
            limiter.sweep();
        }
    }

    /// Number of limits held.
    pub fn len(&self) -> usize {
        self.limiters.len()
    }

    /// True when no limit is held.
    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }
}

impl<K, C> RateLimitRegistry<K, C>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// Spawns a task calling [`sweep`](Self::sweep) every `every`; it ends by itself once
    /// the registry is dropped. Needs a tokio runtime.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let registry = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match registry.upgrade() {
                    Some(r) => r.sweep(),
                    None => return,
                }
            }
        })
    }
}
