use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::BalanceParams;
use crate::extensions::Endpoint;
use crate::random::RandomSource;
use crate::registry::Registry;

/// How an endpoint stands at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Takes traffic.
    Healthy,
    /// Ejected after a connect failure; takes nothing until the instant given.
    Ejected,
    /// The ejection has run out; the next request to pick it is its probe.
    ProbeDue,
    /// A probe is in flight; takes nothing else until it ends.
    Probing,
}

// === impl EndpointState ===

/// Latency and health of one address, shared by every request and kept across swaps.
pub struct EndpointState {
    addr: Endpoint,
    /// The SPIFFE ID expected of it, if any (its state is kept per address and identity).
    identity: Option<Arc<str>>,
    epoch: Instant,
    /// Peak-EWMA round-trip time in nanoseconds, as `f64` bits.
    rtt: AtomicU64,
    rtt_at: AtomicU64,
    pending: AtomicU32,
    /// 0 while healthy, else nanoseconds since `epoch` when the ejection ends.
    ejected_until: AtomicU64,
    /// Length of the next ejection, in nanoseconds (0: the base).
    next_ejection: AtomicU64,
    probing: AtomicBool,
    /// Nanoseconds since `epoch` (+1) when the slow-start ramp began: when the address
    /// was first seen, or when it came back from ejection.
    ramp_from: AtomicU64,
    /// Whether a request has come back from it yet; until then it is preferred once.
    heard_from: AtomicBool,
}

impl fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointState")
            .field("addr", &self.addr.0)
            .field("rtt", &self.rtt_estimate())
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .field("health", &self.health())
            .finish()
    }
}

impl EndpointState {
    fn new(addr: Arc<str>, identity: Option<Arc<str>>, default_rtt: Duration) -> Self {
        Self {
            addr: Endpoint(addr),
            identity,
            epoch: Instant::now(),
            rtt: AtomicU64::new((default_rtt.as_nanos() as f64).to_bits()),
            rtt_at: AtomicU64::new(0),
            pending: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            next_ejection: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            ramp_from: AtomicU64::new(1),
            heard_from: AtomicBool::new(false),
        }
    }

    /// The address.
    pub fn endpoint(&self) -> &Endpoint {
        &self.addr
    }

    /// The current peak-EWMA round-trip estimate.
    pub fn rtt_estimate(&self) -> Duration {
        Duration::from_nanos(f64::from_bits(self.rtt.load(Ordering::Relaxed)) as u64)
    }

    /// Requests in flight.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// The endpoint's health now.
    pub fn health(&self) -> Health {
        self.health_at(Instant::now())
    }

    fn nanos(&self, at: Instant) -> u64 {
        // +1 keeps 0 free to mean "healthy" in `ejected_until`.
        at.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    fn health_at(&self, at: Instant) -> Health {
        let now = self.nanos(at);
        let until = self.ejected_until.load(Ordering::Acquire);
        if until == 0 {
            Health::Healthy
        } else if self.probing.load(Ordering::Acquire) {
            Health::Probing
        } else if now < until {
            Health::Ejected
        } else {
            Health::ProbeDue
        }
    }

    /// Its share of traffic relative to a ramped-in endpoint, in (0, 1]: the fraction of
    /// `slow_start` elapsed since it was first seen or came back from ejection.
    pub fn weight_at(&self, at: Instant, slow_start: Duration) -> f64 {
        if slow_start.is_zero() {
            return 1.0;
        }
        let since = self
            .nanos(at)
            .saturating_sub(self.ramp_from.load(Ordering::Relaxed));
        (since as f64 / slow_start.as_nanos() as f64).clamp(f64::MIN_POSITIVE, 1.0)
    }

    /// How long ago its slow-start ramp began (first seen, or back from ejection).
    pub fn ramp_age(&self, at: Instant) -> Duration {
        Duration::from_nanos(
            self.nanos(at)
                .saturating_sub(self.ramp_from.load(Ordering::Relaxed)),
        )
    }

    /// Not heard from yet and nothing in flight: the next pick that samples it takes it,
    /// so a new endpoint is reached (and measured) within a few requests at any load.
    fn unheard(&self) -> bool {
        !self.heard_from.load(Ordering::Relaxed) && self.pending.load(Ordering::Relaxed) == 0
    }

    /// A request came back from it without a connect failure.
    pub(crate) fn heard(&self) {
        if !self.heard_from.load(Ordering::Relaxed) {
            self.heard_from.store(true, Ordering::Relaxed);
        }
    }

    /// Its cost at `at`: the peak-EWMA round trip decayed toward zero over the time since
    /// its last sample, times its requests in flight plus one. Decaying when read is what
    /// brings a starved endpoint back, as in Finagle's and tower's peak-EWMA: one that lost
    /// every comparison after a slow answer gets no new sample, and would otherwise keep
    /// that answer's cost (and next to no traffic) for good.
    fn cost_at(&self, at: Instant, decay: Duration) -> f64 {
        let rtt = f64::from_bits(self.rtt.load(Ordering::Relaxed));
        let since = self
            .nanos(at)
            .saturating_sub(self.rtt_at.load(Ordering::Relaxed));
        let x = since as f64 / decay.as_nanos().max(1) as f64;
        // Sampled within the last thousandth of `decay` (what any endpoint with traffic
        // is): a factor within 0.1 % of one, not worth an `exp` per comparison.
        let rtt = if x < 1e-3 { rtt } else { rtt * (-x).exp() };
        rtt * f64::from(self.pending.load(Ordering::Relaxed) + 1)
    }

    /// Claims the endpoint for one request: always when healthy, once when a probe is due.
    fn try_claim(&self, at: Instant) -> Option<bool> {
        match self.health_at(at) {
            Health::Healthy => Some(false),
            Health::ProbeDue => self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .ok()
                .map(|_| true),
            Health::Ejected | Health::Probing => None,
        }
    }

    pub(crate) fn start(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
    }

    /// Folds one round-trip sample into the peak-EWMA: a slower sample takes over at once,
    /// faster ones pull the estimate down as older samples decay.
    pub(crate) fn observe_rtt(&self, at: Instant, rtt: Duration, decay: Duration) {
        self.heard();
        let now = self.nanos(at);
        let sample = rtt.as_nanos() as f64;
        let last = self.rtt_at.swap(now, Ordering::Relaxed);
        let elapsed = now.saturating_sub(last) as f64;
        let tau = decay.as_nanos().max(1) as f64;
        let _ = self
            .rtt
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let prev = f64::from_bits(bits);
                // The first sample replaces the default guess: an endpoint answering
                // right after it was added would otherwise keep the guess for `decay`.
                let next = if sample > prev || last == 0 {
                    sample
                } else {
                    let w = (-elapsed / tau).exp();
                    prev * w + sample * (1.0 - w)
                };
                Some(next.to_bits())
            });
    }

    /// A connect failure: eject (or re-eject after a failed probe), doubling the next
    /// ejection. Returns how long for when this took an endpoint in rotation out of it
    /// (not a failed probe, not one a concurrent failure had ejected already).
    pub(crate) fn eject(
        &self,
        at: Instant,
        probe: bool,
        base: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let now = self.nanos(at);
        if !probe && self.ejected_until.load(Ordering::Acquire) != 0 {
            // Already ejected by a concurrent failure: one ejection per outage step.
            return None;
        }
        let base = base.as_nanos() as u64;
        let max = (max.as_nanos() as u64).max(base);
        let len = match self.next_ejection.load(Ordering::Relaxed) {
            0 => base,
            n => n.min(max),
        };
        self.next_ejection
            .store(len.saturating_mul(2).min(max), Ordering::Relaxed);
        self.ejected_until.store(now + len, Ordering::Release);
        if probe {
            self.probing.store(false, Ordering::Release);
        }
        (!probe).then(|| Duration::from_nanos(len))
    }

    /// The probe got through: the endpoint takes traffic again.
    pub(crate) fn restore(&self) {
        // Back from ejection it ramps in again instead of taking full load at once.
        self.ramp_from
            .store(self.nanos(Instant::now()), Ordering::Relaxed);
        self.next_ejection.store(0, Ordering::Relaxed);
        self.ejected_until.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
    }

    /// The probe ended without a verdict (cancelled): let another request probe.
    pub(crate) fn release_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }
}

// === impl EndpointSet ===

/// The endpoints of one backend, built once per swap by [`BalanceRegistry::endpoint_set`].
#[derive(Debug)]
pub struct EndpointSet {
    params: BalanceParams,
    endpoints: Box<[Arc<EndpointState>]>,
}

/// One endpoint picked for one request.
pub(crate) struct Pick {
    pub(crate) endpoint: Arc<EndpointState>,
    pub(crate) probe: bool,
    pub(crate) at: Instant,
}

impl EndpointSet {
    /// The params the set was built from.
    pub fn params(&self) -> &BalanceParams {
        &self.params
    }

    /// The endpoints, in the order of the backend's addresses.
    pub fn endpoints(&self) -> &[Arc<EndpointState>] {
        &self.endpoints
    }

    /// Power of two choices: two distinct random endpoints, the cheaper one wins; an
    /// endpoint due for a probe wins (it is only claimable once); when both samples are
    /// out, any claimable endpoint is taken, starting from a random one.
    pub(crate) fn pick(&self, rng: &RandomSource) -> Option<Pick> {
        let n = self.endpoints.len();
        let eps = &self.endpoints;
        let at = |i: usize| &eps[i];
        let t = crate::clock::now();
        let take = |i: usize, probe: bool| {
            Some(Pick {
                endpoint: eps[i].clone(),
                probe,
                at: t,
            })
        };
        match n {
            0 => return None,
            1 => return at(0).try_claim(t).and_then(|p| take(0, p)),
            _ => {}
        }
        let a = rng.below(n as u32) as usize;
        let mut b = rng.below(n as u32 - 1) as usize;
        if b >= a {
            b += 1;
        }
        let (ha, hb) = (at(a).health_at(t), at(b).health_at(t));
        for (i, h) in [(a, ha), (b, hb)] {
            if h == Health::ProbeDue
                && let Some(true) = at(i).try_claim(t)
            {
                return take(i, true);
            }
        }
        match (ha == Health::Healthy, hb == Health::Healthy) {
            (true, true) => return take(self.choose(a, b, t, rng), false),
            (true, false) => return take(a, false),
            (false, true) => return take(b, false),
            (false, false) => {}
        }
        let start = rng.below(n as u32) as usize;
        (0..n)
            .map(|k| (start + k) % n)
            .find_map(|i| at(i).try_claim(t).map(|probe| (i, probe)))
            .and_then(|(i, probe)| take(i, probe))
    }
}

impl EndpointSet {
    /// Of two healthy endpoints: one never heard from wins (once); else the one still
    /// ramping in (slow start) competes only with the probability of its weight relative
    /// to the other's, which makes its share grow linearly with its weight; else the
    /// cheaper one wins.
    fn choose(&self, a: usize, b: usize, t: Instant, rng: &RandomSource) -> usize {
        let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
        if ea.unheard() {
            return a;
        }
        if eb.unheard() {
            return b;
        }
        let slow = self.params.slow_start;
        let (wa, wb) = (ea.weight_at(t, slow), eb.weight_at(t, slow));
        if wa < wb && !admitted(wa / wb, rng) {
            return b;
        }
        if wb < wa && !admitted(wb / wa, rng) {
            return a;
        }
        let decay = self.params.decay;
        if eb.cost_at(t, decay) < ea.cost_at(t, decay) {
            b
        } else {
            a
        }
    }
}

/// A draw that succeeds with probability `p`.
fn admitted(p: f64, rng: &RandomSource) -> bool {
    const SCALE: f64 = (1u64 << 53) as f64;
    ((rng.next_u64() >> 11) as f64) < p * SCALE
}

/// One address as `GET /endpoints` shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EndpointView {
    /// The address, as the policy lists it.
    pub address: String,
    /// The SPIFFE ID the backends listing it expect (mTLS); absent for plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// `healthy`, `ejected`, `probe_due` or `probing`.
    pub health: &'static str,
    /// The peak-EWMA round-trip estimate, in milliseconds.
    pub rtt_ms: f64,
    /// Requests in flight.
    pub pending: u32,
    /// Seconds since its slow-start ramp began (first seen, or back from ejection); its
    /// weight is this over the backend's `slowStart`, capped at 1.
    pub ramp_age_s: f64,
}

// === impl BalanceRegistry ===

/// Endpoint state of the whole mesh, keyed by address (and expected identity) so that
/// latency and ejections survive policy swaps and are shared by backends listing the
/// same address. Not by address alone: a peer that is not the identity one backend
/// expects (a misconfigured policy, an address now held by another workload) is
/// ejected for that backend, not for a backend expecting the identity it proves.
pub struct BalanceRegistry {
    endpoints: Registry<EndpointKey, EndpointState>,
}

/// What endpoint state is kept per.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EndpointKey {
    addr: Arc<str>,
    identity: Option<Arc<str>>,
}

impl fmt::Debug for BalanceRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceRegistry")
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

impl Default for BalanceRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl BalanceRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            endpoints: Registry::default(),
        }
    }

    /// The endpoint set of one backend: known addresses keep their state, new ones start
    /// healthy with the default RTT. Call once per backend at each policy swap.
    pub fn endpoint_set(&self, params: &BalanceParams) -> Arc<EndpointSet> {
        let endpoints = params
            .addresses
            .iter()
            .map(|addr| {
                let key = EndpointKey {
                    addr: addr.clone(),
                    identity: params.identity.clone(),
                };
                // An address keeps its state whatever the backend's settings.
                self.endpoints.get_or_rebuild(
                    key,
                    |_| true,
                    |_| {
                        EndpointState::new(
                            addr.clone(),
                            params.identity.clone(),
                            params.default_rtt,
                        )
                    },
                )
            })
            .collect();
        Arc::new(EndpointSet {
            params: params.clone(),
            endpoints,
        })
    }

    /// Forgets addresses for which `keep` is false (call after a swap with the live set).
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        self.endpoints.retain(|k| keep(&k.addr));
    }

    /// The state of one address expected to prove `identity`, if known.
    pub fn get(&self, addr: &str, identity: Option<&str>) -> Option<Arc<EndpointState>> {
        self.endpoints.get(&EndpointKey {
            addr: addr.into(),
            identity: identity.map(Into::into),
        })
    }

    /// What the admin API shows of every address held, sorted by address.
    pub fn list(&self) -> Vec<EndpointView> {
        let now = Instant::now();
        let mut out: Vec<EndpointView> = self
            .endpoints
            .values()
            .iter()
            .map(|ep| EndpointView {
                address: ep.addr.0.to_string(),
                identity: ep.identity.as_deref().map(str::to_string),
                health: match ep.health_at(now) {
                    Health::Healthy => "healthy",
                    Health::Ejected => "ejected",
                    Health::ProbeDue => "probe_due",
                    Health::Probing => "probing",
                },
                rtt_ms: ep.rtt_estimate().as_secs_f64() * 1e3,
                pending: ep.pending(),
                ramp_age_s: ep.ramp_age(now).as_secs_f64(),
            })
            .collect();
        out.sort_by(|a, b| (&a.address, &a.identity).cmp(&(&b.address, &b.identity)));
        out
    }

    /// Number of addresses held.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// True when no address is held.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cost is the estimate times (in flight + 1); a sample from within the last
    /// thousandth of the decay period is taken as it is (no `exp` per comparison on a
    /// busy endpoint), an older one decays by e^(-age / decay).
    #[tokio::test(start_paused = true)]
    async fn cost_is_the_decayed_estimate_times_requests_in_flight_plus_one() {
        let decay = Duration::from_secs(10);
        let ep = EndpointState::new("a".into(), None, Duration::from_millis(1));
        let t0 = Instant::now() + Duration::from_secs(1);
        ep.observe_rtt(t0, Duration::from_millis(4), decay);
        let rtt = 4e6;
        assert_eq!(ep.cost_at(t0, decay), rtt);
        // 5 ms on is half a thousandth of the period: no decay at all, bit for bit.
        assert_eq!(ep.cost_at(t0 + Duration::from_millis(5), decay), rtt);
        ep.start();
        ep.start();
        assert_eq!(ep.cost_at(t0 + Duration::from_millis(5), decay), 3.0 * rtt);
        ep.finish();
        ep.finish();
        // One whole period on: e⁻¹ of it.
        let decayed = ep.cost_at(t0 + decay, decay);
        assert!((decayed - rtt * (-1.0f64).exp()).abs() < 1.0, "{decayed}");
    }
}
