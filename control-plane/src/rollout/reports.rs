//! Ingestion of the proxies' traffic reports.
//!
//! Each [`pb::Report`] is checked (a malformed one is dropped and counted, never
//! fatal) and added to the [`Window`] of every (policy, route, backend) it names;
//! the rollout driver takes those windows when it judges. The book also remembers
//! which proxy last had traffic on which route, which gives "how many proxies have
//! traffic on (policy, route)": the [`pb::RouteTraffic`] table sent to proxies
//! outside the policy version whenever a count changes.
//!
//! With several replicas, the lease holder counts the whole fleet (followers relay
//! their proxies' reports and streams to it, see the `forward` module) and a follower
//! counts only its own proxies. A follower therefore sends its proxies the holder's
//! table, as the holder last answered it ([`ReportBook::set_fleet`]), each route at
//! least at its own count (a report relayed a moment ago may not be in it yet); while
//! it knows no holder, or the holder's table is older than [`FLEET_FRESH`], its own.
//!
//! Proxies are counted by stream, not by node id: two proxies started with the same
//! `--node-id` are two proxies sharing a fleet limit. A stream that closed counts as
//! its node while its traffic is recent, unless another stream of that node id still
//! reports there: a proxy that reconnects is one proxy, not two.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_api::pb;
use tokio::sync::watch;

/// A proxy counts for a route while its last report with requests there is this recent.
pub const TRAFFIC_RECENT: Duration = Duration::from_secs(10);

/// How long a follower uses the lease holder's table after receiving it: a holder
/// gone quiet leaves its proxies with their replica's own count, not a frozen one.
pub const FLEET_FRESH: Duration = super::forward::REMOTE_FRESH;

/// Most entries a report may carry; a longer one is malformed.
const MAX_ENTRIES: usize = 4096;

/// Most duration buckets a report may carry.
const MAX_BUCKETS: usize = 64;

/// (namespace, policy name, route name): how proxies name a route in their reports.
/// The namespace is empty from a proxy that predates it.
pub type RouteName = (String, String, String);

/// (node id, stream): who sent a report. The stream is the receiving replica's
/// name for it (`#<n>` for this replica's own, `<replica>/<n>` for a relayed one);
/// empty when a relaying replica did not say.
pub type Reporter = (String, String);

/// What one backend of one route did over a window, summed over proxies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    /// Answers counted.
    pub requests: u64,
    /// Answers counted against the backend: 5xx (but not the caller's own
    /// `breaker-open`), connect failures and resets, timeouts, fallback answers.
    pub failures: u64,
    /// Requests per duration bucket (not cumulative), the last above the last bound.
    pub durations: Vec<u64>,
}

impl Window {
    /// Adds `other` to this window. Counts saturate: they come from proxies, and a
    /// report's shape is checked but not its sense, so a wrapped sum must not turn a
    /// canary's failures into a few.
    pub fn add(&mut self, other: &Window) {
        self.requests = self.requests.saturating_add(other.requests);
        self.failures = self.failures.saturating_add(other.failures);
        if self.durations.len() < other.durations.len() {
            self.durations.resize(other.durations.len(), 0);
        }
        for (a, b) in self.durations.iter_mut().zip(&other.durations) {
            *a = a.saturating_add(*b);
        }
    }

    /// The upper bound (seconds) of the bucket holding quantile `q` of the durations,
    /// given the buckets' `bounds`; `f64::INFINITY` when it lies above the last bound,
    /// `None` without samples.
    pub fn quantile(&self, q: f64, bounds: &[f64]) -> Option<f64> {
        let total = self.timed();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, n) in self.durations.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= rank {
                return Some(bounds.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }

    /// Requests whose duration is known (the sum of the buckets).
    pub fn timed(&self) -> u64 {
        self.durations.iter().fold(0, |t, n| t.saturating_add(*n))
    }

    /// Of the timed requests, those slower than `secs` (counting whole buckets whose
    /// lower bound is at or above it).
    pub fn slower_than(&self, secs: f64, bounds: &[f64]) -> u64 {
        self.durations
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                let lower = if *i == 0 { 0.0 } else { bounds[*i - 1] };
                lower >= secs
            })
            .fold(0, |t, (_, n)| t.saturating_add(*n))
    }
}

/// Why a report was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Malformed {
    /// More entries than any proxy sends.
    #[error("{0} entries (at most {MAX_ENTRIES})")]
    TooManyEntries(usize),
    /// Bucket bounds that are not finite, positive and ascending, or too many.
    #[error("bucket bounds not finite and ascending, or more than {MAX_BUCKETS}")]
    Bounds,
    /// An entry whose duration counts do not match the bounds.
    #[error("entry {index}: {got} duration counts for {bounds} bounds")]
    Durations {
        /// Index of the entry.
        index: usize,
        /// Counts it carries.
        got: usize,
        /// Bounds in the report.
        bounds: usize,
    },
    /// An entry without a route or backend name.
    #[error("entry {0}: empty route or backend name")]
    Names(usize),
}

/// Checks a report before anything of it is used.
pub fn check(report: &pb::Report) -> Result<(), Malformed> {
    if report.entries.len() > MAX_ENTRIES {
        return Err(Malformed::TooManyEntries(report.entries.len()));
    }
    let b = &report.bucket_bounds;
    if b.len() > MAX_BUCKETS
        || b.iter().any(|x| !x.is_finite() || *x <= 0.0)
        || b.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(Malformed::Bounds);
    }
    for (index, e) in report.entries.iter().enumerate() {
        if e.route.is_empty() || e.backend.is_empty() {
            return Err(Malformed::Names(index));
        }
        if !e.duration_counts.is_empty() && e.duration_counts.len() != b.len() + 1 {
            return Err(Malformed::Durations {
                index,
                got: e.duration_counts.len(),
                bounds: b.len(),
            });
        }
    }
    Ok(())
}

/// Windows taken by the rollout driver: per (policy, route) and backend.
pub type Taken = HashMap<RouteName, BTreeMap<String, Window>>;

#[derive(Debug, Default)]
struct Book {
    /// Added since the driver last took them.
    pending: Taken,
    /// The duration bucket bounds of the pending windows: the first report's, kept
    /// while reports with them keep coming.
    bounds: Vec<f64>,
    /// When a report with `bounds` last came.
    bounds_seen: Option<Instant>,
    /// When each proxy stream last reported requests on each route.
    seen: HashMap<RouteName, HashMap<Reporter, Instant>>,
    /// Streams among `seen` known to have closed.
    closed: HashSet<Reporter>,
    /// The table last sent to proxies.
    sent: BTreeMap<RouteName, u32>,
    /// The counts of this replica's own reports, as of the last refresh.
    counted: BTreeMap<RouteName, u32>,
    /// The lease holder's table of the whole fleet and when it came, on a follower.
    fleet: Option<(BTreeMap<RouteName, u32>, Instant)>,
}

/// The control plane's record of what the proxies reported.
#[derive(Debug)]
pub struct ReportBook {
    book: Mutex<Book>,
    traffic: watch::Sender<Arc<pb::RouteTraffic>>,
    reports: prometheus::IntCounterVec,
}

impl ReportBook {
    /// An empty book counting reports into `reports{result}`.
    pub fn new(reports: prometheus::IntCounterVec) -> Self {
        let (traffic, _) = watch::channel(Arc::new(pb::RouteTraffic::default()));
        Self {
            book: Mutex::new(Book::default()),
            traffic,
            reports,
        }
    }

    /// Adds `report` from the proxy `node` on its stream `conn`, received at `now`. A
    /// malformed report changes nothing; its error is returned (and counted) for the
    /// caller's log.
    pub fn ingest(
        &self,
        node: &str,
        conn: &str,
        report: &pb::Report,
        now: Instant,
    ) -> Result<(), Malformed> {
        if let Err(e) = check(report) {
            self.reports.with_label_values(&["malformed"]).inc();
            return Err(e);
        }
        self.reports.with_label_values(&["accepted"]).inc();
        if report.dropped > 0 {
            self.reports
                .with_label_values(&["dropped_by_proxy"])
                .inc_by(report.dropped);
        }
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        // Bounds no report used for TRAFFIC_RECENT are no proxy's now (the fleet moved
        // to a build with other buckets): this report's are used from here, or every
        // duration would be dropped until the control plane restarts.
        let stale = book
            .bounds_seen
            .is_none_or(|at| now.saturating_duration_since(at) > TRAFFIC_RECENT);
        let timed = if book.bounds == report.bucket_bounds || stale {
            if book.bounds != report.bucket_bounds {
                // What is pending was timed by the old bounds, which these cannot read.
                for w in book.pending.values_mut().flat_map(|b| b.values_mut()) {
                    w.durations.clear();
                }
                book.bounds.clone_from(&report.bucket_bounds);
            }
            book.bounds_seen = Some(now);
            true
        } else {
            // Another build's buckets while proxies still report with these: its
            // counts are used, its durations cannot be.
            false
        };
        for e in &report.entries {
            let route = (e.namespace.clone(), e.policy.clone(), e.route.clone());
            if e.requests > 0 {
                book.seen
                    .entry(route.clone())
                    .or_default()
                    .insert((node.to_string(), conn.to_string()), now);
            }
            let w = Window {
                requests: e.requests,
                failures: e
                    .server_errors
                    .saturating_add(e.unavailable)
                    .saturating_add(e.timeouts)
                    .saturating_add(e.fallbacks),
                durations: if timed {
                    e.duration_counts.clone()
                } else {
                    Vec::new()
                },
            };
            book.pending
                .entry(route)
                .or_default()
                .entry(e.backend.clone())
                .or_default()
                .add(&w);
        }
        drop(book);
        self.refresh(now);
        Ok(())
    }

    /// The stream `conn` of proxy `node` closed: from `now` its traffic counts only
    /// while no other stream of its node id reports on the same route.
    pub fn closed(&self, node: &str, conn: &str, now: Instant) {
        let key = (node.to_string(), conn.to_string());
        {
            let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
            if !book.seen.values().any(|r| r.contains_key(&key)) {
                return;
            }
            book.closed.insert(key);
        }
        self.refresh(now);
    }

    /// Takes the windows added since the last call, with their bucket bounds.
    pub fn take(&self) -> (Taken, Vec<f64>) {
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        let bounds = book.bounds.clone();
        (std::mem::take(&mut book.pending), bounds)
    }

    /// How many proxies reported requests on `route` of policy `namespace`/`policy`
    /// within [`TRAFFIC_RECENT`] of `now`.
    pub fn proxies_with_traffic(
        &self,
        namespace: &str,
        policy: &str,
        route: &str,
        now: Instant,
    ) -> u32 {
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        let key = (namespace.to_string(), policy.to_string(), route.to_string());
        book.seen
            .get(&key)
            .map(|nodes| recent(nodes, &book.closed, now))
            .unwrap_or(0)
    }

    /// Forgets proxies whose traffic is no longer recent and, if any route's count
    /// changed, publishes the new table.
    pub fn refresh(&self, now: Instant) {
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.seen.retain(|_, nodes| {
            nodes.retain(|_, at| now.saturating_duration_since(*at) <= TRAFFIC_RECENT);
            !nodes.is_empty()
        });
        let Book { seen, closed, .. } = &mut *book;
        closed.retain(|k| seen.values().any(|r| r.contains_key(k)));
        let counted: BTreeMap<RouteName, u32> = book
            .seen
            .iter()
            .map(|(r, nodes)| (r.clone(), recent(nodes, &book.closed, now)))
            .collect();
        book.counted.clone_from(&counted);
        book.fleet
            .take_if(|(_, at)| now.saturating_duration_since(*at) > FLEET_FRESH);
        let mut table = counted;
        if let Some((fleet, _)) = &book.fleet {
            for (route, n) in fleet {
                let mine = table.entry(route.clone()).or_default();
                *mine = (*mine).max(*n);
            }
        }
        if table == book.sent {
            return;
        }
        book.sent = table.clone();
        drop(book);
        self.traffic.send_replace(Arc::new(to_message(table)));
    }

    /// On a follower: the lease holder's table of the whole fleet, received at `now`,
    /// or `None` when no holder is known (or it sent none); from now on the table
    /// sent to proxies, each route at least at this replica's own count.
    pub fn set_fleet(&self, table: Option<&pb::RouteTraffic>, now: Instant) {
        let fleet = table.map(|t| {
            let counts = t
                .routes
                .iter()
                .map(|r| {
                    let key = (r.namespace.clone(), r.policy.clone(), r.route.clone());
                    (key, r.proxies)
                })
                .collect();
            (counts, now)
        });
        self.book.lock().unwrap_or_else(|e| e.into_inner()).fleet = fleet;
        self.refresh(now);
    }

    /// The table of this replica's own count at `now` (on the lease holder, the
    /// whole fleet's): what the holder answers a follower with.
    pub fn counted_here(&self, now: Instant) -> pb::RouteTraffic {
        self.refresh(now);
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        to_message(book.counted.clone())
    }

    /// The per-route proxy counts, changed whenever one changes.
    pub fn watch_traffic(&self) -> watch::Receiver<Arc<pb::RouteTraffic>> {
        self.traffic.subscribe()
    }
}

/// `sluice_cp_reports_total{result}`: traffic reports `accepted` or `malformed`, and
/// reports the proxies say they dropped (`dropped_by_proxy`).
pub fn counter() -> prometheus::IntCounterVec {
    prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "sluice_cp_reports_total",
            "Traffic reports from proxies, by result (accepted, malformed, dropped_by_proxy; on a replica not holding the lease, forwarded or forward_dropped).",
        ),
        &["result"],
    )
    .expect("valid metric")
}

impl ReportBook {
    /// Ages the per-route proxy counts once a second (at the time `now` reads), so
    /// a proxy that went quiet stops counting even when no report arrives; ends at
    /// shutdown.
    pub(crate) async fn keep_fresh(
        &self,
        now: impl Fn() -> Instant,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => self.refresh(now()),
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }
}

/// The table as proxies receive it.
fn to_message(table: BTreeMap<RouteName, u32>) -> pb::RouteTraffic {
    pb::RouteTraffic {
        routes: table
            .into_iter()
            .map(|((namespace, policy, route), proxies)| pb::RouteProxies {
                namespace,
                policy,
                route,
                proxies,
            })
            .collect(),
    }
}

/// The proxies among `streams` with recent traffic: each open stream, and the node
/// of each closed one no open stream of its node id stands for.
fn recent(streams: &HashMap<Reporter, Instant>, closed: &HashSet<Reporter>, now: Instant) -> u32 {
    let live = streams
        .iter()
        .filter(|(_, at)| now.saturating_duration_since(**at) <= TRAFFIC_RECENT)
        .map(|(k, _)| k);
    let (mut open, mut gone) = (HashSet::new(), HashSet::new());
    for k in live {
        if closed.contains(k) {
            gone.insert(k.0.as_str());
        } else {
            open.insert(k);
        }
    }
    let open_nodes: HashSet<&str> = open.iter().map(|k| k.0.as_str()).collect();
    let n = open.len() + gone.difference(&open_nodes).count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> prometheus::IntCounterVec {
        prometheus::IntCounterVec::new(prometheus::Opts::new("r", "r"), &["result"]).unwrap()
    }

    /// Counts near the top of u64 (a proxy's report is checked for shape, not sense)
    /// saturate: a wrapped sum would read as a few requests, or a few failures.
    #[test]
    fn counts_saturate_instead_of_wrapping() {
        let mut w = Window {
            requests: u64::MAX - 1,
            failures: u64::MAX - 1,
            durations: vec![u64::MAX, 1],
        };
        w.add(&Window {
            requests: 5,
            failures: 5,
            durations: vec![5, u64::MAX],
        });
        assert_eq!((w.requests, w.failures), (u64::MAX, u64::MAX));
        assert_eq!(w.durations, [u64::MAX, u64::MAX]);
        assert_eq!(w.timed(), u64::MAX);
        assert_eq!(w.slower_than(0.1, &[0.1]), u64::MAX);
        assert_eq!(w.quantile(0.99, &[0.1]), Some(0.1));
    }

    fn entry(route: &str, backend: &str, requests: u64, errors: u64) -> pb::BackendCounts {
        pb::BackendCounts {
            namespace: "shop".into(),
            policy: "log".into(),
            route: route.into(),
            backend: backend.into(),
            requests,
            server_errors: errors,
            duration_counts: vec![requests - 1, 1, 0],
            ..Default::default()
        }
    }

    fn report(entries: Vec<pb::BackendCounts>) -> pb::Report {
        pb::Report {
            seq: 1,
            interval_ms: 2000,
            bucket_bounds: vec![0.01, 0.1],
            entries,
            ..Default::default()
        }
    }

    #[test]
    fn windows_sum_over_proxies_until_taken() {
        let book = ReportBook::new(counter());
        let now = Instant::now();
        book.ingest("a", "#1", &report(vec![entry("ingest", "v1", 10, 1)]), now)
            .unwrap();
        book.ingest(
            "b",
            "#1",
            &report(vec![
                entry("ingest", "v1", 5, 0),
                entry("ingest", "v2", 4, 2),
            ]),
            now,
        )
        .unwrap();
        let (taken, bounds) = book.take();
        assert_eq!(bounds, [0.01, 0.1]);
        let r = &taken[&("shop".to_string(), "log".to_string(), "ingest".to_string())];
        assert_eq!(r["v1"].requests, 15);
        assert_eq!(r["v1"].failures, 1);
        assert_eq!(r["v1"].durations, [13, 2, 0]);
        assert_eq!(r["v2"].failures, 2);
        assert!(book.take().0.is_empty(), "taken once");
    }

    /// A report with other bucket bounds (another build) adds its counts, not its
    /// durations, while proxies keep reporting with the first bounds; once none has
    /// for `TRAFFIC_RECENT`, the next report's bounds are the book's, and durations
    /// still pending under the old ones are dropped rather than misread.
    #[test]
    fn other_bounds_count_untimed_until_no_report_used_the_first_for_a_while() {
        let book = ReportBook::new(counter());
        let t0 = Instant::now();
        let route = ("shop".to_string(), "log".to_string(), "ingest".to_string());
        let first = || report(vec![entry("ingest", "v1", 10, 0)]);
        let newer = || pb::Report {
            bucket_bounds: vec![0.02, 0.2],
            ..first()
        };
        book.ingest("a", "#1", &first(), t0).unwrap();
        book.ingest("b", "#1", &newer(), t0).unwrap();
        let (taken, bounds) = book.take();
        assert_eq!(bounds, [0.01, 0.1]);
        let w = &taken[&route]["v1"];
        assert_eq!((w.requests, w.durations.as_slice()), (20, &[9, 1, 0][..]));
        // `a` upgraded too, but the first bounds were used a moment ago.
        let soon = t0 + TRAFFIC_RECENT;
        book.ingest("a", "#2", &newer(), soon).unwrap();
        let (taken, bounds) = book.take();
        assert_eq!(bounds, [0.01, 0.1]);
        assert_eq!(taken[&route]["v1"].requests, 10);
        assert!(taken[&route]["v1"].durations.is_empty());
        // A last report under the first bounds (`c`'s), still pending when the newer
        // ones take over: its durations cannot be read by them and go.
        book.ingest("c", "#1", &first(), soon).unwrap();
        let later = soon + TRAFFIC_RECENT + Duration::from_secs(1);
        book.ingest("a", "#2", &newer(), later).unwrap();
        let (taken, bounds) = book.take();
        assert_eq!(bounds, [0.02, 0.2]);
        let w = &taken[&route]["v1"];
        assert_eq!((w.requests, w.durations.as_slice()), (20, &[9, 1, 0][..]));
        // Now the first bounds are the other build's.
        book.ingest("c", "#1", &first(), later).unwrap();
        let (taken, bounds) = book.take();
        assert_eq!(bounds, [0.02, 0.2]);
        assert!(taken[&route]["v1"].durations.is_empty());
    }

    #[test]
    fn proxies_with_traffic_counts_recent_reporters_and_publishes_changes() {
        let book = ReportBook::new(counter());
        let mut rx = book.watch_traffic();
        let t0 = Instant::now();
        book.ingest("a", "#1", &report(vec![entry("ingest", "v1", 3, 0)]), t0)
            .unwrap();
        book.ingest("b", "#1", &report(vec![entry("ingest", "v1", 3, 0)]), t0)
            .unwrap();
        assert_eq!(book.proxies_with_traffic("shop", "log", "ingest", t0), 2);
        assert!(rx.has_changed().unwrap());
        let table = rx.borrow_and_update().clone();
        assert_eq!(table.routes.len(), 1);
        assert_eq!(table.routes[0].proxies, 2);
        // The same count again publishes nothing.
        book.ingest("a", "#1", &report(vec![entry("ingest", "v1", 3, 0)]), t0)
            .unwrap();
        assert!(!rx.has_changed().unwrap());
        // `b` goes quiet; `a` keeps reporting.
        let later = t0 + TRAFFIC_RECENT + Duration::from_secs(1);
        book.ingest("a", "#1", &report(vec![entry("ingest", "v1", 3, 0)]), later)
            .unwrap();
        assert_eq!(book.proxies_with_traffic("shop", "log", "ingest", later), 1);
        assert_eq!(rx.borrow_and_update().routes[0].proxies, 1);
        book.refresh(later + TRAFFIC_RECENT + Duration::from_secs(1));
        assert!(rx.borrow_and_update().routes.is_empty());
    }

    /// Two streams sharing a node id are two proxies; a stream that closed counts as
    /// its node until another stream of that node id reports (the proxy reconnected),
    /// or its traffic is no longer recent.
    #[test]
    fn proxies_are_counted_by_stream_and_a_reconnect_is_one() {
        let book = ReportBook::new(counter());
        let t0 = Instant::now();
        let traffic = || report(vec![entry("ingest", "v1", 3, 0)]);
        let count = |at| book.proxies_with_traffic("shop", "log", "ingest", at);
        book.ingest("twin", "#1", &traffic(), t0).unwrap();
        book.ingest("twin", "#2", &traffic(), t0).unwrap();
        book.ingest("twin", "cp-b/1", &traffic(), t0).unwrap();
        assert_eq!(count(t0), 3, "one node id, three proxies");

        // "#2" closes: the others of its node id stand for it.
        book.closed("twin", "#2", t0);
        assert_eq!(count(t0), 2);
        assert_eq!(book.watch_traffic().borrow().routes[0].proxies, 2);

        // A lone proxy's stream closes: it counts while its traffic is recent, and
        // once only when it reconnects and reports on its new stream.
        book.ingest("solo", "#3", &traffic(), t0).unwrap();
        book.closed("solo", "#3", t0);
        assert_eq!(count(t0), 3);
        book.ingest("solo", "#4", &traffic(), t0).unwrap();
        assert_eq!(count(t0), 3, "the reconnected proxy is one");
        // A stream never seen reporting changes nothing.
        book.closed("quiet", "#5", t0);
        assert_eq!(count(t0), 3);
    }

    /// A follower sends its proxies the holder's counts of the whole fleet, each
    /// route at least at its own count, until they are stale or no holder is known;
    /// what it answers as a holder is its own count only.
    #[test]
    fn a_follower_sends_the_holders_counts_until_they_are_stale() {
        let book = ReportBook::new(counter());
        let mut rx = book.watch_traffic();
        let t0 = Instant::now();
        let table = |routes: &[(&str, u32)]| pb::RouteTraffic {
            routes: routes
                .iter()
                .map(|(route, proxies)| pb::RouteProxies {
                    namespace: "shop".into(),
                    policy: "log".into(),
                    route: (*route).into(),
                    proxies: *proxies,
                })
                .collect(),
        };
        let sent =
            |rx: &mut watch::Receiver<Arc<pb::RouteTraffic>>| (**rx.borrow_and_update()).clone();
        book.ingest("a", "#1", &report(vec![entry("ingest", "v1", 3, 0)]), t0)
            .unwrap();
        book.ingest("b", "#2", &report(vec![entry("export", "v1", 3, 0)]), t0)
            .unwrap();
        book.ingest("c", "#3", &report(vec![entry("export", "v1", 3, 0)]), t0)
            .unwrap();
        assert_eq!(sent(&mut rx), table(&[("export", 2), ("ingest", 1)]));

        // The holder counts three on `ingest` and one on `export` (a relayed report
        // not in yet) and two on a route this replica has no traffic on.
        book.set_fleet(
            Some(&table(&[("export", 1), ("ingest", 3), ("search", 2)])),
            t0,
        );
        assert_eq!(
            sent(&mut rx),
            table(&[("export", 2), ("ingest", 3), ("search", 2)])
        );
        assert_eq!(
            book.counted_here(t0),
            table(&[("export", 2), ("ingest", 1)]),
            "its own count, not the holder's"
        );
        assert_eq!(book.proxies_with_traffic("shop", "log", "ingest", t0), 1);

        // Not heard from the holder for longer than FLEET_FRESH: its own counts.
        book.refresh(t0 + FLEET_FRESH);
        assert!(!rx.has_changed().unwrap(), "fresh until then");
        book.refresh(t0 + FLEET_FRESH + Duration::from_millis(1));
        assert_eq!(sent(&mut rx), table(&[("export", 2), ("ingest", 1)]));

        // No holder known: its own counts at once.
        book.set_fleet(Some(&table(&[("ingest", 3)])), t0 + FLEET_FRESH);
        assert_eq!(sent(&mut rx), table(&[("export", 2), ("ingest", 3)]));
        book.set_fleet(None, t0 + FLEET_FRESH);
        assert_eq!(sent(&mut rx), table(&[("export", 2), ("ingest", 1)]));
    }

    #[test]
    fn a_malformed_report_is_dropped_and_counted() {
        let reports = counter();
        let book = ReportBook::new(reports.clone());
        let mut bad = report(vec![entry("ingest", "v1", 3, 0)]);
        bad.bucket_bounds = vec![0.1, 0.01];
        assert_eq!(
            book.ingest("a", "#1", &bad, Instant::now()),
            Err(Malformed::Bounds)
        );
        let mut bad = report(vec![entry("ingest", "v1", 3, 0)]);
        bad.entries[0].duration_counts.pop();
        assert!(matches!(
            book.ingest("a", "#1", &bad, Instant::now()),
            Err(Malformed::Durations { .. })
        ));
        let mut bad = report(vec![entry("ingest", "v1", 3, 0)]);
        bad.entries[0].backend.clear();
        assert_eq!(
            book.ingest("a", "#1", &bad, Instant::now()),
            Err(Malformed::Names(0))
        );
        assert_eq!(reports.with_label_values(&["malformed"]).get(), 3);
        assert!(book.take().0.is_empty());
        assert_eq!(
            book.proxies_with_traffic("shop", "log", "ingest", Instant::now()),
            0
        );
    }

    #[test]
    fn check_allows_exactly_its_bounds() {
        let many = |n| report(vec![entry("ingest", "v1", 3, 0); n]);
        assert_eq!(check(&many(MAX_ENTRIES)), Ok(()));
        assert_eq!(
            check(&many(MAX_ENTRIES + 1)),
            Err(Malformed::TooManyEntries(MAX_ENTRIES + 1))
        );
        let with_bounds = |bucket_bounds: Vec<f64>| {
            check(&pb::Report {
                bucket_bounds,
                ..report(Vec::new())
            })
        };
        let ascending = |n: usize| (1..=n).map(|i| i as f64 / 1000.0).collect::<Vec<_>>();
        assert_eq!(with_bounds(ascending(MAX_BUCKETS)), Ok(()));
        // Each fault alone refuses the bounds.
        for bounds in [
            ascending(MAX_BUCKETS + 1),
            vec![0.01, f64::INFINITY],
            vec![f64::NAN],
            vec![0.0, 0.1],
            vec![0.1, 0.1],
        ] {
            assert_eq!(
                with_bounds(bounds.clone()),
                Err(Malformed::Bounds),
                "{bounds:?}"
            );
        }
    }

    #[test]
    fn accepted_reports_and_the_proxies_drops_are_counted() {
        let reports = counter();
        let book = ReportBook::new(reports.clone());
        let now = Instant::now();
        let mut dropping = report(vec![entry("ingest", "v1", 3, 0)]);
        dropping.dropped = 7;
        book.ingest("a", "#1", &dropping, now).unwrap();
        book.ingest("a", "#1", &report(Vec::new()), now).unwrap();
        assert_eq!(reports.with_label_values(&["accepted"]).get(), 2);
        assert_eq!(reports.with_label_values(&["dropped_by_proxy"]).get(), 7);
    }

    #[test]
    fn an_entry_without_requests_is_no_traffic() {
        let book = ReportBook::new(counter());
        let now = Instant::now();
        let idle = pb::BackendCounts {
            requests: 0,
            duration_counts: Vec::new(),
            ..entry("ingest", "v1", 1, 0)
        };
        book.ingest("a", "#1", &report(vec![idle]), now).unwrap();
        assert_eq!(book.proxies_with_traffic("shop", "log", "ingest", now), 0);
        assert!(book.watch_traffic().borrow().routes.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn keep_fresh_ages_the_counts_without_reports_and_stops_at_shutdown() {
        let book = Arc::new(ReportBook::new(counter()));
        let now = || tokio::time::Instant::now().into_std();
        let t0 = tokio::time::Instant::now();
        book.ingest("a", "#1", &report(vec![entry("ingest", "v1", 3, 0)]), now())
            .unwrap();
        let mut rx = book.watch_traffic();
        assert_eq!(rx.borrow_and_update().routes[0].proxies, 1);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn({
            let book = book.clone();
            async move { book.keep_fresh(now, shutdown).await }
        });
        // No report arrives; the count drops once `a`'s last one is no longer recent.
        tokio::time::timeout(TRAFFIC_RECENT * 3, rx.changed())
            .await
            .expect("the count never aged")
            .unwrap();
        assert!(rx.borrow().routes.is_empty());
        assert!(
            t0.elapsed() > TRAFFIC_RECENT,
            "aged after {:?}",
            t0.elapsed()
        );
        stop.send_replace(true);
        task.await.unwrap();
    }

    #[test]
    fn quantiles_come_from_bucket_bounds() {
        let w = Window {
            requests: 100,
            failures: 0,
            durations: vec![98, 1, 1],
        };
        let bounds = [0.01, 0.1];
        assert_eq!(w.quantile(0.5, &bounds), Some(0.01));
        assert_eq!(w.quantile(0.99, &bounds), Some(0.1));
        assert_eq!(w.quantile(1.0, &bounds), Some(f64::INFINITY));
        assert_eq!(w.slower_than(0.01, &bounds), 2);
        assert_eq!(Window::default().quantile(0.99, &bounds), None);
    }
}
