//! Reconciliation: every interval, one batch for all keys of all fleet limits, sent to
//! the lease store (Redis) in one round trip; failures switch the limits to their
//! local fallback until a round trip succeeds again.

use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tower::BoxError;

use super::FleetRegistry;
use crate::ErrorChain;

/// One key's part of a reconciliation batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRequest {
    /// The bucket's Redis key (a fixed hash; no raw key value).
    pub key: Arc<str>,
    /// The limit's sustained rate: the bucket refills at this many tokens a second.
    pub per_second: u32,
    /// The bucket's capacity.
    pub capacity: u64,
    /// Tokens already spent on credit, to take from the bucket unconditionally.
    pub debt: u64,
    /// Tokens wanted (> 0: granted as far as the bucket holds them) or given back (< 0).
    pub delta: i64,
}

/// The bucket's answer to one [`LeaseRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Tokens granted to the asking proxy (0 when giving back).
    pub granted: u64,
    /// Whole tokens left in the bucket afterwards; negative while it is in debt.
    pub balance: i64,
}

/// A boxed future a [`LeaseStore`] answers with.
pub type LeaseFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<LeaseGrant>, BoxError>> + Send + 'a>>;

/// Where the fleet's buckets live: applies a whole batch in one round trip.
///
/// An empty batch is a health check (Redis: `PING`), sent on the first reconciliation
/// and then only while degraded.
pub trait LeaseStore: Send + 'static {
    /// Applies every request of `batch` atomically per key, answering in batch order.
    fn exchange<'a>(&'a mut self, batch: &'a [LeaseRequest]) -> LeaseFuture<'a>;
}

/// Why a reconciliation failed, as counted in `sluice_ratelimit_backend_errors_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendError {
    /// No answer within the timeout.
    Timeout,
    /// The store answered with an error or the connection failed.
    Error,
}

impl BackendError {
    /// The metric label value: `timeout` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendError::Timeout => "timeout",
            BackendError::Error => "error",
        }
    }
}

/// Told about the lease store's health; called off the request path.
pub trait FleetObserver: Send + Sync + 'static {
    /// One reconciliation failed.
    fn on_backend_error(&self, error: BackendError);
    /// The fleet limits switched to (true) or back from (false) their local fallback.
    fn on_degraded(&self, degraded: bool);
}

/// An observer that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopFleetObserver;

impl FleetObserver for NoopFleetObserver {
    fn on_backend_error(&self, _: BackendError) {}
    fn on_degraded(&self, _: bool) {}
}

/// The fleet size N each limit's fallback divides by, by (policy name, route name);
/// `None` keeps the registry's default (the `--fleet-size` flag).
pub type FleetSizes = Arc<dyn Fn(&str, &str) -> Option<u32> + Send + Sync>;

/// How the sync task talks to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncOptions {
    /// The longest a round trip may take before it counts as failed.
    pub timeout: Duration,
    /// Without an answer for this long the limits fall back while the round trip goes on.
    pub stale_after: Duration,
}

impl SyncOptions {
    /// `timeout` per round trip; the fallback starts after three silent intervals.
    pub fn new(timeout: Duration, interval: Duration) -> Self {
        Self {
            timeout,
            stale_after: (interval * 3).min(timeout),
        }
    }
}

impl<K> FleetRegistry<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Spawns the reconciliation task: one [`sync_once`](Self::sync_once) per interval,
    /// each wait drawn between half and one and a half intervals. It ends by itself once
    /// the registry is dropped. Needs a tokio runtime.
    ///
    /// Why the jitter: Redis grants on a first-come basis, and what a proxy gets is
    /// what refilled since the last proxy asked. Proxies reconciling at fixed intervals
    /// keep their order and spacing for ever, so one that happens to ask just after
    /// another gets a sliver of every refill under equal demand (measured: 25 against
    /// 1,019 admitted); drawn waits shuffle the order, and each gets its part on average.
    pub fn spawn_sync<S: LeaseStore>(
        self: &Arc<Self>,
        mut store: S,
        opts: SyncOptions,
        sizes: FleetSizes,
        observer: Arc<dyn FleetObserver>,
    ) -> tokio::task::JoinHandle<()> {
        let registry = Arc::downgrade(self);
        let every = self.backend.interval;
        tokio::spawn(async move {
            // The first round at once: it checks the store before any request needs it.
            let mut wait = Duration::ZERO;
            loop {
                tokio::time::sleep(wait).await;
                let Some(r) = registry.upgrade() else { return };
                r.sync_once(&mut store, &opts, &*sizes, &*observer).await;
                drop(r);
                wait = every.mul_f64(0.5 + rand::random::<f64>());
            }
        })
    }

    /// One reconciliation: plans every share of every limit, sends the batch, settles
    /// the answers. Returns whether the store answered.
    pub async fn sync_once<S: LeaseStore + ?Sized>(
        &self,
        store: &mut S,
        opts: &SyncOptions,
        sizes: &(dyn Fn(&str, &str) -> Option<u32> + Send + Sync),
        observer: &dyn FleetObserver,
    ) -> bool {
        let limiters = self.refresh_sizes(sizes);
        let mut batch = Vec::new();
        let mut owners = Vec::new();
        for limiter in &limiters {
            for (share, plan) in limiter.plan() {
                if plan.is_empty() {
                    continue;
                }
                batch.push(LeaseRequest {
                    key: share.redis_key.clone(),
                    per_second: limiter.params().per_second.get(),
                    capacity: limiter.capacity(),
                    debt: plan.debt,
                    delta: plan.delta,
                });
                owners.push((limiter.clone(), share, plan));
            }
        }
        let asked = self.backend.mark_asked();
        if batch.is_empty() && asked && !self.backend.is_degraded() {
            return true;
        }
        let answer = {
            let call = tokio::time::timeout(opts.timeout, store.exchange(&batch));
            tokio::pin!(call);
            tokio::select! {
                biased;
                r = &mut call => r,
                () = tokio::time::sleep(opts.stale_after) => {
                    // Redis is slow: requests fall back now, the round trip may still land.
                    self.set_degraded(true, observer);
                    call.await
                }
            }
        };
        let failed = |error: BackendError, why: String| {
            observer.on_backend_error(error);
            Some(why)
        };
        let (grants, why) = match answer {
            Ok(Ok(grants)) if grants.len() == batch.len() => (Some(grants), None),
            Ok(Ok(grants)) => (
                None,
                failed(
                    BackendError::Error,
                    format!("{} answers to {} requests", grants.len(), batch.len()),
                ),
            ),
            // The client's own time limit (the same length) may fire first.
            Ok(Err(e)) if timed_out(&*e) => (
                None,
                failed(BackendError::Timeout, ErrorChain(&*e).to_string()),
            ),
            Ok(Err(e)) => (
                None,
                failed(BackendError::Error, ErrorChain(&*e).to_string()),
            ),
            Err(_) => (
                None,
                failed(
                    BackendError::Timeout,
                    format!("no answer within {:?}", opts.timeout),
                ),
            ),
        };
        for (i, (limiter, share, plan)) in owners.iter().enumerate() {
            let grant = grants.as_ref().map(|g| &g[i]);
            if !plan.retire {
                share.settle(plan, grant, &limiter.sizing());
            }
        }
        self.set_degraded_because(grants.is_none(), why.as_deref(), observer);
        grants.is_some()
    }

    /// Sets every limit's N from `sizes` (the control plane's count of proxies with
    /// traffic on its route), else the default; returns the limits.
    pub fn refresh_sizes(
        &self,
        sizes: &(dyn Fn(&str, &str) -> Option<u32> + Send + Sync),
    ) -> Vec<Arc<super::FleetLimiter>> {
        let limiters = self.limiters.values();
        for limiter in &limiters {
            let (policy, route) = limiter.names();
            limiter.set_fleet_size(sizes(policy, route).unwrap_or(self.backend.default_size));
        }
        limiters
    }

    /// Without a store (no `--redis-url`) the limits stay on their fallback: this task
    /// only keeps each one's N current, once per interval, until the registry is dropped.
    pub fn spawn_sizes(self: &Arc<Self>, sizes: FleetSizes) -> tokio::task::JoinHandle<()> {
        let registry = Arc::downgrade(self);
        let every = self.backend.interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(r) = registry.upgrade() else { return };
                r.refresh_sizes(&*sizes);
            }
        })
    }

    fn set_degraded(&self, degraded: bool, observer: &dyn FleetObserver) {
        self.set_degraded_because(degraded, None, observer);
    }

    /// Switches the fallback on or off, saying why it goes on: a wrong password and a
    /// dead address must not read alike.
    fn set_degraded_because(
        &self,
        degraded: bool,
        why: Option<&str>,
        observer: &dyn FleetObserver,
    ) {
        if self.backend.set_degraded(degraded) != degraded {
            if degraded {
                tracing::warn!(
                    error = why.unwrap_or("no answer yet"),
                    "fleet rate limits: Redis unreachable, each proxy enforces perSecond / N"
                );
            } else {
                tracing::info!("fleet rate limits: Redis answers again");
            }
            observer.on_degraded(degraded);
        }
    }
}

/// Whether `err` says a time limit ran out.
fn timed_out(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = e.source();
    }
    false
}
