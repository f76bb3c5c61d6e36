use std::collections::VecDeque;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::gradient::{Gradient2, WindowSample};
use super::{ConcurrencyObserver, ConcurrencyParams, LimitParams, NoopObserver, RETRY_AFTER};
use crate::FilterError;
use crate::registry::Registry;

/// Responses a sample window needs before it may close early.
const MIN_WINDOW_SAMPLES: u64 = 10;
/// Shortest sample window.
const MIN_WINDOW: Duration = Duration::from_millis(50);
/// Longest sample window: it closes then with whatever it has.
const MAX_WINDOW: Duration = Duration::from_secs(1);

// === impl Limiter ===

/// One concurrency limit: requests in flight, the limit, and the queue of those waiting.
pub struct Limiter {
    params: ConcurrencyParams,
    observer: Arc<dyn ConcurrencyObserver>,
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    /// Waiters in `queue`, readable without its lock.
    waiting: AtomicUsize,
    /// The slow path only: touched when a request must wait or a slot frees while some do.
    queue: Mutex<WaitQueue>,
    adaptive: Option<Adaptive>,
}

/// What [`Limiter::admit`] decided.
pub enum Admission {
    /// Under the limit: go ahead.
    Admitted(Permit),
    /// Over the limit: wait for a slot.
    Queued(Ticket),
    /// Over the limit with no room to wait.
    Refused(FilterError),
}

impl Limiter {
    /// A limiter for `params`, reporting to `observer`.
    pub fn new(params: ConcurrencyParams, observer: Arc<dyn ConcurrencyObserver>) -> Self {
        let (limit, adaptive) = match params.limit {
            LimitParams::Fixed { max } => (max.max(1) as usize, None),
            LimitParams::Adaptive { min, max } => {
                let algo = Gradient2::new(min, max);
                (algo.limit(), Some(Adaptive::new(algo)))
            }
        };
        observer.on_limit(limit);
        let levels = params.priorities.levels.len();
        Self {
            params,
            observer,
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            waiting: AtomicUsize::new(0),
            queue: Mutex::new(WaitQueue::new(levels)),
            adaptive,
        }
    }

    /// A limiter reporting to nobody.
    pub fn unobserved(params: ConcurrencyParams) -> Self {
        Self::new(params, Arc::new(NoopObserver))
    }

    /// The settings this limiter was built from.
    pub fn params(&self) -> &ConcurrencyParams {
        &self.params
    }

    /// The current limit on requests in flight.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Admits a request of priority `level` (an index into the params' levels), queues it,
    /// or refuses it.
    pub fn admit(self: &Arc<Self>, level: usize) -> Admission {
        // The hot path: nobody waiting and a slot free.
        if self.waiting.load(Ordering::SeqCst) == 0 && self.try_acquire() {
            return Admission::Admitted(Permit::new(self.clone()));
        }
        self.admit_slow(level)
    }

    fn admit_slow(self: &Arc<Self>, level: usize) -> Admission {
        let level = level.min(self.params.priorities.levels.len() - 1);
        let mut queue = self.lock_queue();
        if queue.len == 0 && self.try_acquire() {
            return Admission::Admitted(Permit::new(self.clone()));
        }
        if queue.len >= self.params.queue_max {
            match queue.lowest_level() {
                Some(lowest) if lowest > level => {
                    // A full queue sheds its least important, newest waiter for this one.
                    let shed = queue.pop_newest(lowest);
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    drop(shed);
                    self.observer
                        .on_refusal(self.params.priorities.name(lowest).as_ref());
                }
                _ => {
                    drop(queue);
                    return Admission::Refused(self.refuse(level));
                }
            }
        }
        let now = Instant::now();
        let (tx, rx) = oneshot::channel();
        let id = queue.push(level, tx, now);
        // Counted before the dispatch below looks for a slot; a concurrent release that
        // missed this count is seen by that dispatch instead.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.dispatch_locked(&mut queue);
        drop(queue);
        Admission::Queued(Ticket {
            limiter: self.clone(),
            id,
            level,
            rx: Some(rx),
            deadline: now + self.params.queue_timeout,
            finished: false,
        })
    }

    /// The refusal for a request of `level`, counted.
    fn refuse(&self, level: usize) -> FilterError {
        let priority = self.params.priorities.name(level).clone();
        self.observer.on_refusal(&priority);
        tracing::debug!(%priority, limit = self.limit(), "overloaded");
        FilterError::Overloaded {
            retry_after: RETRY_AFTER,
            priority,
        }
    }

    fn try_acquire(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut cur = self.in_flight.load(Ordering::SeqCst);
        loop {
            if cur >= limit {
                return false;
            }
            match self.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    self.observer.on_in_flight(1);
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    fn release_slot(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.observer.on_in_flight(-1);
    }

    fn release(self: &Arc<Self>) {
        self.release_slot();
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let mut queue = self.lock_queue();
            self.dispatch_locked(&mut queue);
        }
    }

    /// Hands free slots to the most important waiters.
    fn dispatch_locked(self: &Arc<Self>, queue: &mut WaitQueue) {
        while queue.len > 0 && self.try_acquire() {
            let Some(waiter) = queue.pop_best(Instant::now(), self.params.queue_timeout) else {
                self.release_slot();
                break;
            };
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            if let Err(permit) = waiter.send(Permit::new(self.clone())) {
                // The waiter is gone; take the slot back without re-entering dispatch.
                permit.disarm();
                self.release_slot();
            }
        }
    }

    fn lock_queue(&self) -> MutexGuard<'_, WaitQueue> {
        // A panic while holding the lock leaves a consistent queue (every step is one
        // push or pop), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one response's latency (adaptive limits only); may close the sample window.
    fn record(&self, started: Instant, in_flight: usize) {
        let Some(a) = &self.adaptive else { return };
        let now = Instant::now();
        let rtt = nanos(now - started);
        a.rtt_sum.fetch_add(rtt, Ordering::Relaxed);
        a.count.fetch_add(1, Ordering::Relaxed);
        a.max_in_flight.fetch_max(in_flight, Ordering::Relaxed);

        let now_ns = nanos(now - a.epoch);
        let start_ns = a.window_start.load(Ordering::Relaxed);
        let elapsed = now_ns.saturating_sub(start_ns);
        if elapsed < a.window_len.load(Ordering::Relaxed)
            || (a.count.load(Ordering::Relaxed) < MIN_WINDOW_SAMPLES && elapsed < nanos(MAX_WINDOW))
        {
            return;
        }
        // One closer per window; everyone else goes on at once.
        let Ok(mut algo) = a.algo.try_lock() else {
            return;
        };
        if a.window_start.load(Ordering::Relaxed) != start_ns {
            return;
        }
        let count = a.count.swap(0, Ordering::Relaxed);
        let sum = a.rtt_sum.swap(0, Ordering::Relaxed);
        let max_in_flight = a.max_in_flight.swap(0, Ordering::Relaxed);
        a.window_start.store(now_ns, Ordering::Relaxed);
        if count == 0 {
            return;
        }
        let limit = algo.update(WindowSample {
            rtt: sum as f64 / count as f64 / 1e9,
            max_in_flight,
        });
        let window = Duration::from_secs_f64(2.0 * algo.baseline()).clamp(MIN_WINDOW, MAX_WINDOW);
        a.window_len.store(nanos(window), Ordering::Relaxed);
        drop(algo);
        // A raised limit needs no dispatch here: the caller, `Permit::complete`, releases
        // its slot next, and that release hands every free slot to the waiters.
        if self.limit.swap(limit, Ordering::SeqCst) != limit {
            self.observer.on_limit(limit);
        }
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("params", &self.params)
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .field("queued", &self.queued())
            .finish()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The sample window of an adaptive limit, filled with atomics by every response.
struct Adaptive {
    /// Taken (with `try_lock`, never waited for) by the one response closing a window.
    algo: Mutex<Gradient2>,
    epoch: Instant,
    window_start: AtomicU64,
    window_len: AtomicU64,
    rtt_sum: AtomicU64,
    count: AtomicU64,
    max_in_flight: AtomicUsize,
}

impl Adaptive {
    fn new(algo: Gradient2) -> Self {
        Self {
            algo: Mutex::new(algo),
            epoch: Instant::now(),
            window_start: AtomicU64::new(0),
            window_len: AtomicU64::new(nanos(MIN_WINDOW)),
            rtt_sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }
}

// === impl Permit ===

/// One request's slot; frees it when dropped.
pub struct Permit {
    limiter: Option<Arc<Limiter>>,
    started: Instant,
    in_flight: usize,
}

impl Permit {
    fn new(limiter: Arc<Limiter>) -> Self {
        let in_flight = limiter.in_flight();
        Self {
            limiter: Some(limiter),
            started: Instant::now(),
            in_flight,
        }
    }

    /// The request got its response: its latency counts towards the limit. Frees the slot.
    pub fn complete(mut self) {
        if let Some(limiter) = self.limiter.take() {
            limiter.record(self.started, self.in_flight);
            limiter.release();
        }
    }

    /// Restarts the latency clock (a queued request's time in the queue is not the app's).
    pub(crate) fn restart(&mut self) {
        self.started = Instant::now();
    }

    fn disarm(mut self) {
        self.limiter = None;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(limiter) = self.limiter.take() {
            limiter.release();
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

// === impl Ticket ===

/// A place in the queue; [`wait`](Ticket::wait) for the slot.
pub struct Ticket {
    limiter: Arc<Limiter>,
    id: u64,
    level: usize,
    rx: Option<oneshot::Receiver<Permit>>,
    deadline: Instant,
    finished: bool,
}

impl Ticket {
    /// Waits for a slot until the queue timeout; refused `overloaded` when it passes or a
    /// more important request takes this one's place.
    pub async fn wait(mut self) -> Result<Permit, FilterError> {
        let rx = self
            .rx
            .as_mut()
            .expect("a ticket holds its receiver until dropped");
        let out = match tokio::time::timeout_at(self.deadline, &mut *rx).await {
            Ok(Ok(permit)) => Ok(permit),
            // Shed for a more important request (already counted).
            Ok(Err(_)) => Err(self.shed_error()),
            Err(_) => {
                let removed = {
                    let mut queue = self.limiter.lock_queue();
                    let removed = queue.remove(self.level, self.id);
                    if removed {
                        self.limiter.waiting.fetch_sub(1, Ordering::SeqCst);
                    }
                    removed
                };
                if removed {
                    Err(self.limiter.refuse(self.level))
                } else {
                    // Granted or shed just as the time ran out.
                    rx.try_recv().map_err(|_| self.shed_error())
                }
            }
        };
        self.finished = true;
        out.map(|mut permit| {
            permit.restart();
            permit
        })
    }

    fn shed_error(&self) -> FilterError {
        FilterError::Overloaded {
            retry_after: RETRY_AFTER,
            priority: self.limiter.params.priorities.name(self.level).clone(),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A caller that went away while waiting leaves the queue; a slot already handed
        // over is freed when `rx` (holding the permit) drops after this.
        if !self.finished {
            let mut queue = self.limiter.lock_queue();
            if queue.remove(self.level, self.id) {
                self.limiter.waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("level", &self.level)
            .finish()
    }
}

// === impl WaitQueue ===

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Permit>,
}

impl Waiter {
    fn send(self, permit: Permit) -> Result<(), Permit> {
        self.tx.send(permit)
    }
}

/// Waiters per level (0 most important), each level first come, first served.
struct WaitQueue {
    levels: Vec<VecDeque<Waiter>>,
    len: usize,
    next_id: u64,
    /// Since when the queue has not been empty.
    busy_since: Option<Instant>,
}

impl WaitQueue {
    fn new(levels: usize) -> Self {
        Self {
            levels: (0..levels.max(1)).map(|_| VecDeque::new()).collect(),
            len: 0,
            next_id: 0,
            busy_since: None,
        }
    }

    /// A queue that has not been empty for longer than `timeout` is standing: sustained
    /// overload, as in CoDel, rather than a burst.
    fn standing(&self, now: Instant, timeout: Duration) -> bool {
        self.busy_since
            .is_some_and(|since| now.duration_since(since) > timeout)
    }

    fn push(&mut self, level: usize, tx: oneshot::Sender<Permit>, now: Instant) -> u64 {
        if self.len == 0 {
            self.busy_since = Some(now);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.levels[level].push_back(Waiter { id, tx });
        self.len += 1;
        id
    }

    /// The next waiter to get a slot: the most important level's oldest, or its newest
    /// while the queue is standing (adaptive LIFO: under sustained overload the requests
    /// served are those whose callers waited least; the oldest time out instead).
    fn pop_best(&mut self, now: Instant, timeout: Duration) -> Option<Waiter> {
        let standing = self.standing(now, timeout);
        let level = self.levels.iter_mut().find(|l| !l.is_empty())?;
        let w = if standing {
            level.pop_back()
        } else {
            level.pop_front()
        }?;
        self.shrunk();
        Some(w)
    }

    fn shrunk(&mut self) {
        self.len -= 1;
        if self.len == 0 {
            self.busy_since = None;
        }
    }

    fn lowest_level(&self) -> Option<usize> {
        self.levels.iter().rposition(|l| !l.is_empty())
    }

    fn pop_newest(&mut self, level: usize) -> Option<Waiter> {
        let w = self.levels[level].pop_back()?;
        self.shrunk();
        Some(w)
    }

    fn remove(&mut self, level: usize, id: u64) -> bool {
        let q = &mut self.levels[level];
        match q.iter().position(|w| w.id == id) {
            Some(i) => {
                q.remove(i);
                self.shrunk();
                true
            }
            None => false,
        }
    }
}

// === impl ConcurrencyRegistry ===

/// The limiters of a proxy, one per key (e.g. per inbound service), kept across policy swaps.
pub struct ConcurrencyRegistry<K> {
    limiters: Registry<K, Limiter>,
}

impl<K: Hash + Eq + Clone> Default for ConcurrencyRegistry<K> {
    fn default() -> Self {
        Self {
            limiters: Registry::default(),
        }
    }
}

impl<K: Hash + Eq + Clone> ConcurrencyRegistry<K> {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The limiter for `key`: the one held if its params equal `params` (keeping its learned
    /// limit and queue), else a new one reporting to `observer()`.
    pub fn get_or_rebuild(
        &self,
        key: K,
        params: &ConcurrencyParams,
        observer: impl FnOnce() -> Arc<dyn ConcurrencyObserver>,
    ) -> Arc<Limiter> {
        self.limiters.get_or_rebuild(
            key,
            |held| held.params() == params,
            |_| Limiter::new(params.clone(), observer()),
        )
    }

    /// The limiter held for `key`.
    pub fn get(&self, key: &K) -> Option<Arc<Limiter>> {
        self.limiters.get(key)
    }

    /// Drops the limiters whose key fails `keep` (services gone from the policy).
    pub fn retain(&self, keep: impl FnMut(&K) -> bool) {
        self.limiters.retain(keep);
    }

    /// True when no limiter is held.
    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }
}

impl<K: Hash + Eq> fmt::Debug for ConcurrencyRegistry<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyRegistry")
            .field("len", &self.limiters.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptive() -> Arc<Limiter> {
        Arc::new(Limiter::unobserved(ConcurrencyParams::new(
            LimitParams::Adaptive { min: 1, max: 1000 },
        )))
    }

    fn fixed(max: u32, queue: usize, timeout: Duration) -> Arc<Limiter> {
        Arc::new(Limiter::unobserved(
            ConcurrencyParams::new(LimitParams::Fixed { max }).with_queue(queue, timeout),
        ))
    }

    fn admitted(limiter: &Arc<Limiter>) -> Permit {
        match limiter.admit(0) {
            Admission::Admitted(p) => p,
            _ => panic!("expected a slot"),
        }
    }

    fn queued(limiter: &Arc<Limiter>) -> Ticket {
        match limiter.admit(0) {
            Admission::Queued(t) => t,
            _ => panic!("expected a place in the queue"),
        }
    }

    /// The slot the ticket was handed already, taken without waiting.
    fn take(t: &mut Ticket) -> Option<Permit> {
        t.rx.as_mut().unwrap().try_recv().ok()
    }

    /// The limits an observer was told of.
    #[derive(Default)]
    struct Limits(Mutex<Vec<usize>>);

    impl ConcurrencyObserver for Limits {
        fn on_limit(&self, limit: usize) {
            self.0.lock().unwrap().push(limit);
        }
        fn on_refusal(&self, _level: &str) {}
    }

    /// Admits `n` requests at once and completes them all `after` from now.
    async fn respond(limiter: &Arc<Limiter>, n: usize, after: Duration) {
        let permits: Vec<Permit> = (0..n)
            .map(|_| match limiter.admit(0) {
                Admission::Admitted(p) => p,
                _ => panic!("under the limit"),
            })
            .collect();
        tokio::time::advance(after).await;
        for p in permits {
            p.complete();
        }
    }

    /// Responses counted in the open window, and when it opened (since the epoch).
    fn window(limiter: &Limiter) -> (u64, u64) {
        let a = limiter.adaptive.as_ref().unwrap();
        (
            a.count.load(Ordering::Relaxed),
            a.window_start.load(Ordering::Relaxed),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_closes_once_it_is_long_enough_and_has_ten_responses() {
        let limiter = adaptive();
        respond(&limiter, 9, Duration::from_millis(60)).await;
        assert_eq!(window(&limiter), (9, 0));
        respond(&limiter, 1, Duration::ZERO).await;
        assert_eq!(window(&limiter), (0, nanos(Duration::from_millis(60))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_with_ten_responses_stays_open_for_its_length() {
        let limiter = adaptive();
        respond(&limiter, 12, Duration::from_millis(10)).await;
        assert_eq!(window(&limiter), (12, 0));
        respond(&limiter, 1, Duration::from_millis(40)).await;
        assert_eq!(window(&limiter), (0, nanos(Duration::from_millis(50))));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_second_a_window_closes_with_what_it_has() {
        let limiter = adaptive();
        respond(&limiter, 3, Duration::from_millis(999)).await;
        assert_eq!(window(&limiter).0, 3);
        respond(&limiter, 1, Duration::from_millis(1)).await;
        assert_eq!(window(&limiter), (0, nanos(MAX_WINDOW)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_to_the_oldest_waiter_of_a_level() {
        let limiter = fixed(1, 10, Duration::from_secs(1));
        let first = admitted(&limiter);
        let mut a = queued(&limiter);
        let mut b = queued(&limiter);
        tokio::time::advance(Duration::from_millis(10)).await;
        drop(first);
        let _a = take(&mut a).expect("the oldest gets the slot");
        assert!(take(&mut b).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_standing_past_its_timeout_serves_its_newest_waiter() {
        let timeout = Duration::from_millis(100);
        let limiter = fixed(1, 10, timeout);
        let first = admitted(&limiter);
        let old = queued(&limiter);
        tokio::time::advance(Duration::from_millis(60)).await;
        let mut middle = queued(&limiter);
        tokio::time::advance(Duration::from_millis(40)).await;
        // The oldest times out; the queue has not been empty since it came.
        assert!(old.wait().await.is_err());
        tokio::time::advance(Duration::from_millis(10)).await;
        let mut newest = queued(&limiter);
        tokio::time::advance(Duration::from_millis(10)).await;
        drop(first);
        let _newest = take(&mut newest).expect("the newest gets the slot");
        assert!(take(&mut middle).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_leaves_the_middle_of_the_queue_takes_only_its_place() {
        let limiter = fixed(1, 10, Duration::from_secs(1));
        let first = admitted(&limiter);
        let mut a = queued(&limiter);
        let b = queued(&limiter);
        let mut c = queued(&limiter);
        drop(b);
        assert_eq!(limiter.queued(), 2);
        drop(first);
        let a = take(&mut a).expect("the first in line gets the slot");
        assert_eq!(limiter.queued(), 1);
        drop(a);
        let _c = take(&mut c).expect("the last in line gets the next");
        assert_eq!((limiter.queued(), limiter.in_flight()), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_granted_a_slot_and_gone_before_taking_it_frees_it() {
        let limiter = fixed(1, 10, Duration::from_secs(1));
        let first = admitted(&limiter);
        let ticket = queued(&limiter);
        drop(first);
        assert_eq!((limiter.queued(), limiter.in_flight()), (0, 1));
        drop(ticket);
        assert_eq!((limiter.queued(), limiter.in_flight()), (0, 0));
        drop(admitted(&limiter));
    }

    #[tokio::test(start_paused = true)]
    async fn time_in_the_queue_is_not_counted_as_the_apps_latency() {
        let limiter = Arc::new(Limiter::unobserved(
            ConcurrencyParams::new(LimitParams::Adaptive { min: 1, max: 1 })
                .with_queue(1, Duration::from_secs(1)),
        ));
        let first = admitted(&limiter);
        let ticket = queued(&limiter);
        tokio::time::advance(Duration::from_millis(100)).await;
        first.complete();
        // The caller comes for its slot a little after it was handed over.
        tokio::time::advance(Duration::from_millis(20)).await;
        let second = ticket.wait().await.unwrap();
        tokio::time::advance(Duration::from_millis(30)).await;
        second.complete();
        let a = limiter.adaptive.as_ref().unwrap();
        assert_eq!(a.count.load(Ordering::Relaxed), 2);
        assert_eq!(
            a.rtt_sum.load(Ordering::Relaxed),
            nanos(Duration::from_millis(130))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_raised_by_a_window_lets_one_more_waiter_in() {
        let limits = Arc::new(Limits::default());
        let limiter = Arc::new(Limiter::new(
            ConcurrencyParams::new(LimitParams::Adaptive { min: 1, max: 1000 })
                .with_queue(100, Duration::from_secs(10)),
            limits.clone(),
        ));
        // A first window at the baseline grows the estimate from 20 to 20.9: the limit
        // stays 20 and nobody is told.
        respond(&limiter, 10, Duration::from_millis(60)).await;
        assert_eq!(*limits.0.lock().unwrap(), [20]);
        // The next window (120 ms long: twice the baseline) takes it to 21.8 while twelve
        // wait behind twenty in flight.
        tokio::time::advance(Duration::from_millis(60)).await;
        let mut permits: Vec<Permit> = (0..20).map(|_| admitted(&limiter)).collect();
        let mut tickets: Vec<Ticket> = (0..12).map(|_| queued(&limiter)).collect();
        tokio::time::advance(Duration::from_millis(61)).await;
        // The last ten admitted saw up to twenty in flight: the window counts.
        for p in permits.drain(10..) {
            p.complete();
        }
        assert_eq!(*limits.0.lock().unwrap(), [20, 21]);
        // Nine releases let nine in; the tenth, after its window raised the limit, two.
        assert_eq!((limiter.in_flight(), limiter.queued()), (21, 1));
        let got: Vec<Permit> = tickets.iter_mut().filter_map(take).collect();
        assert_eq!(got.len(), 11);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_busy_for_exactly_its_timeout_is_not_yet_standing() {
        let timeout = Duration::from_millis(100);
        let limiter = fixed(1, 10, timeout);
        let first = admitted(&limiter);
        let mut old = queued(&limiter);
        tokio::time::advance(Duration::from_millis(50)).await;
        let mut new = queued(&limiter);
        tokio::time::advance(Duration::from_millis(50)).await;
        drop(first);
        let _old = take(&mut old).expect("the oldest gets the slot");
        assert!(take(&mut new).is_none());
    }
}
