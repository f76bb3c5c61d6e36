//! The proxy's traffic reports: deltas of the counters it keeps anyway.
//!
//! When a report is due (every `--report-interval`, from the subscriber task) the
//! outbound series of `sluice_requests_total`, `sluice_request_duration_seconds` and
//! `sluice_fallbacks_total`, and the breakers' refusal counts, are read and compared
//! with what the previous report saw. Requests pay nothing for it: the counters are
//! the ones `/metrics` shows, and nothing here runs on a request's path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::IntCounter;
use prometheus::core::Collector;
use prometheus::proto::Metric;
use sluice_api::pb;
use sluice_api::{Deltas, ReportSource};

use crate::PolicyStore;
use crate::route::key_labels;

/// One outbound route × backend: the route key (`<namespace>/<policy>.<route>`) and the
/// backend.
type Series = (String, String);

/// Running totals of one route × backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Totals {
    requests: u64,
    server_errors: u64,
    unavailable: u64,
    timeouts: u64,
    fallbacks: u64,
    breaker_open: u64,
    /// Breaker refusals the route's fallback answered: not this proxy's own 503s.
    refusals_answered: u64,
    /// Per bucket, not cumulative, the last one above the last bound.
    durations: Vec<u64>,
}

impl Totals {
    /// What happened since `before` (a counter that went backwards was rebuilt: all
    /// of it is new).
    fn since(&self, before: &Totals) -> Totals {
        let d = |now: u64, then: u64| if now >= then { now - then } else { now };
        let breaker_open = d(self.breaker_open, before.breaker_open);
        let refusals_answered = d(self.refusals_answered, before.refusals_answered);
        Totals {
            requests: d(self.requests, before.requests),
            // Refusals of this proxy's own breaker are counted as 503s too: they are
            // not the backend's answers. One the fallback answered is counted with the
            // fallback's answer instead.
            server_errors: d(self.server_errors, before.server_errors)
                .saturating_sub(breaker_open.saturating_sub(refusals_answered)),
            unavailable: d(self.unavailable, before.unavailable),
            timeouts: d(self.timeouts, before.timeouts),
            fallbacks: d(self.fallbacks, before.fallbacks),
            breaker_open,
            refusals_answered,
            durations: self
                .durations
                .iter()
                .enumerate()
                .map(|(i, n)| d(*n, before.durations.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Reads a delta's fallbacks by the route's fallback in force now (`handed_on`: it
    /// is another backend; `answered`: the status of its static answer). Applied to
    /// deltas, not to running totals, so that an edit of the fallback reinterprets no
    /// count already reported.
    fn with_fallbacks(mut self, handed_on: bool, answered: Option<u16>) -> Totals {
        // A fallback backend's answer is counted for that backend: the request the
        // primary failed appears under the primary only as a fallback. It was one of the
        // primary's requests all the same; without it a canary whose every try fails
        // behind a fallback backend reports failures of no request, and looks idle.
        if handed_on {
            self.requests = self.requests.saturating_add(self.fallbacks);
        }
        // A static answer is counted for the primary with its own status: a 5xx there
        // is the fallback (counted once, as such), not a second failure of the backend.
        let class = match answered {
            Some(502) => Some(&mut self.unavailable),
            Some(504) => Some(&mut self.timeouts),
            Some(500..=599) => Some(&mut self.server_errors),
            _ => None,
        };
        if let Some(class) = class {
            *class = class.saturating_sub(self.fallbacks);
        }
        self
    }

    fn is_zero(&self) -> bool {
        self.requests == 0
            && self.fallbacks == 0
            && self.breaker_open == 0
            && self.durations.iter().all(|n| *n == 0)
    }
}

/// Reads the proxy's counters into reports.
#[derive(Debug)]
pub(crate) struct CounterReports {
    store: PolicyStore,
    /// What the last report (or the stream's start) saw. Only the subscriber task
    /// takes this lock.
    seen: Mutex<HashMap<Series, Totals>>,
    dropped: IntCounter,
}

impl CounterReports {
    pub(crate) fn new(store: PolicyStore) -> Arc<Self> {
        let dropped = store.context().metrics.reports_dropped.clone();
        Arc::new(Self {
            store,
            seen: Mutex::new(HashMap::new()),
            dropped,
        })
    }

    /// Every outbound route × backend's totals now, and the duration buckets' bounds.
    fn totals(&self) -> (Vec<f64>, HashMap<Series, Totals>) {
        let ctx = self.store.context();
        let m = &ctx.metrics;
        let mut all: HashMap<Series, Totals> = HashMap::new();
        let mut bounds = Vec::new();
        for family in m.requests.collect() {
            for metric in family.get_metric() {
                let Some((series, labels)) = outbound_series(metric) else {
                    continue;
                };
                let n = metric.get_counter().get_value() as u64;
                let t = all.entry(series).or_default();
                t.requests += n;
                match labels.code {
                    502 => t.unavailable += n,
                    504 => t.timeouts += n,
                    500..=599 => t.server_errors += n,
                    _ => {}
                }
            }
        }
        for family in m.duration.collect() {
            for metric in family.get_metric() {
                let Some((series, _)) = outbound_series(metric) else {
                    continue;
                };
                let h = metric.get_histogram();
                let buckets = h.get_bucket();
                if bounds.is_empty() {
                    bounds = buckets.iter().map(|b| b.upper_bound()).collect();
                }
                let t = all.entry(series).or_default();
                t.durations.resize(buckets.len() + 1, 0);
                let mut below = 0;
                for (i, b) in buckets.iter().enumerate() {
                    let c = b.cumulative_count();
                    t.durations[i] += c.saturating_sub(below);
                    below = c;
                }
                t.durations[buckets.len()] += h.get_sample_count().saturating_sub(below);
            }
        }
        for family in m.fallbacks.collect() {
            for metric in family.get_metric() {
                let (mut namespace, mut route, mut backend, mut reason) = ("", None, None, "");
                for l in metric.get_label() {
                    match l.name() {
                        "namespace" => namespace = l.value(),
                        "route" => route = Some(l.value()),
                        "backend" => backend = Some(l.value()),
                        "reason" => reason = l.value(),
                        _ => {}
                    }
                }
                if let (Some(r), Some(b)) = (route, backend) {
                    let n = metric.get_counter().get_value() as u64;
                    let t = all.entry((key_of(namespace, r), b.into())).or_default();
                    t.fallbacks += n;
                    if reason == "breaker-open" {
                        t.refusals_answered += n;
                    }
                }
            }
        }
        for b in ctx.governance.breakers.snapshot() {
            if b.rejected > 0 {
                all.entry((b.route, b.backend)).or_default().breaker_open += b.rejected;
            }
        }
        (bounds, all)
    }

    /// The routes in force whose fallback is another backend (by key), and the HTTP
    /// status of those whose fallback is a static answer.
    fn fallbacks_in_force(&self) -> (std::collections::HashSet<String>, HashMap<String, u16>) {
        let (mut handed_on, mut answered) = (std::collections::HashSet::new(), HashMap::new());
        let snapshot = self.store.current();
        let Some(set) = snapshot.policy_set() else {
            return (handed_on, answered);
        };
        for p in set.policies() {
            for r in &p.spec.routes {
                let Some(f) = &r.fallback else { continue };
                if f.backend.is_some() {
                    handed_on.insert(crate::route::route_key(p, r));
                } else if let Some(resp) = f.response.as_ref().filter(|r| r.grpc_status.is_none()) {
                    // With `grpcStatus` a gRPC caller gets HTTP 200 and others the status:
                    // which one a count holds is not known, so it is left as it is.
                    answered.insert(crate::route::route_key(p, r), resp.status);
                }
            }
        }
        (handed_on, answered)
    }

    /// A route key back into its namespace, policy and route names, from the policies in
    /// force.
    fn names(&self) -> HashMap<String, (String, String, String)> {
        let snapshot = self.store.current();
        let Some(set) = snapshot.policy_set() else {
            return HashMap::new();
        };
        set.policies()
            .iter()
            .flat_map(|p| {
                p.spec.routes.iter().map(|r| {
                    let names = (
                        p.metadata.namespace_or_default().to_string(),
                        p.metadata.name.clone(),
                        r.name.clone(),
                    );
                    (crate::route::route_key(p, r), names)
                })
            })
            .collect()
    }
}

/// The labels of an outbound `sluice_requests_total` or duration series that has a
/// backend.
struct Labels {
    code: u16,
}

fn outbound_series(metric: &Metric) -> Option<(Series, Labels)> {
    let (mut outbound, mut namespace, mut route, mut backend, mut code) = (false, "", "", "", 0);
    for l in metric.get_label() {
        match l.name() {
            "direction" => outbound = l.value() == "outbound",
            "namespace" => namespace = l.value(),
            "route" => route = l.value(),
            "backend" => backend = l.value(),
            "code" => code = l.value().parse().unwrap_or(0),
            _ => {}
        }
    }
    (outbound && !route.is_empty() && !backend.is_empty()).then(|| {
        (
            (key_of(namespace, route), backend.to_string()),
            Labels { code },
        )
    })
}

/// The route key a series' `namespace` and `route` labels were split from.
fn key_of(namespace: &str, route: &str) -> String {
    if namespace.is_empty() {
        route.to_string()
    } else {
        format!("{namespace}/{route}")
    }
}

impl ReportSource for CounterReports {
    fn deltas(&self, max_entries: usize) -> Deltas {
        let (bucket_bounds, now) = self.totals();
        let names = self.names();
        let (handed_on, answered) = self.fallbacks_in_force();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut news: Vec<(Series, Totals, Totals)> = now
            .into_iter()
            .filter_map(|(series, total)| {
                let delta = match seen.get(&series) {
                    Some(before) => total.since(before),
                    None => total.since(&Totals::default()),
                }
                .with_fallbacks(
                    handed_on.contains(&series.0),
                    answered.get(&series.0).copied(),
                );
                (!delta.is_zero()).then_some((series, total, delta))
            })
            .collect();
        // The busiest go first; the rest keep their old baseline and come next time.
        news.sort_by_key(|n| std::cmp::Reverse(n.2.requests));
        let deferred = u32::try_from(news.len().saturating_sub(max_entries)).unwrap_or(u32::MAX);
        news.truncate(max_entries);
        let mut entries = Vec::with_capacity(news.len());
        for (series, total, delta) in news {
            seen.insert(series.clone(), total);
            let (namespace, policy, route) = names.get(&series.0).cloned().unwrap_or_else(|| {
                // A route no longer in force: its last counts still belong to it.
                let (namespace, route) = key_labels(&series.0);
                match route.split_once('.') {
                    Some((p, r)) => (namespace.into(), p.into(), r.into()),
                    None => (namespace.into(), String::new(), route.into()),
                }
            });
            entries.push(pb::BackendCounts {
                namespace,
                policy,
                route,
                backend: series.1,
                requests: delta.requests,
                server_errors: delta.server_errors,
                unavailable: delta.unavailable,
                timeouts: delta.timeouts,
                fallbacks: delta.fallbacks,
                breaker_open: delta.breaker_open,
                duration_counts: delta.durations,
            });
        }
        Deltas {
            bucket_bounds,
            entries,
            deferred,
        }
    }

    fn dropped(&self) {
        self.dropped.inc();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::store_for_tests;

    fn policy_set() -> sluice_config::PolicySet {
        policy_set_with("")
    }

    /// `log.svc`'s route `ingest` split 90/10 over v1 and v2, with `route_fields` added
    /// (each line starting with six spaces).
    fn policy_set_with(route_fields: &str) -> sluice_config::PolicySet {
        let text = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: log.svc }}\nspec:\n  host: log\n  backends:\n    v1: {{ addresses: [\"127.0.0.1:1\"] }}\n    v2: {{ addresses: [\"127.0.0.1:2\"] }}\n  routes:\n    - name: ingest\n{route_fields}      split:\n        - weights: {{ v1: 90, v2: 10 }}\n"
        );
        sluice_config::PolicySet::new(sluice_config::parse_policies("t.yaml", &text).unwrap())
            .unwrap()
    }

    /// A store serving log.svc's route `ingest` over v1 (90) and v2 (10) with `route_fields`
    /// and `backends` added, and that route's outbound metrics over `names`.
    fn serving(
        backends: &str,
        route_fields: &str,
        names: &[&str],
    ) -> (
        PolicyStore,
        crate::metrics::Metrics,
        crate::metrics::RouteMetrics,
    ) {
        let text = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: log.svc }}\nspec:\n  host: log\n  backends:\n    v1: {{ addresses: [\"127.0.0.1:1\"] }}\n    v2: {{ addresses: [\"127.0.0.1:2\"] }}\n{backends}  routes:\n    - name: ingest\n{route_fields}      split:\n        - weights: {{ v1: 90, v2: 10 }}\n"
        );
        let set =
            sluice_config::PolicySet::new(sluice_config::parse_policies("t.yaml", &text).unwrap())
                .unwrap();
        let store = store_for_tests();
        store.apply("t", set).unwrap();
        let m = store.context().metrics.clone();
        let route = m.route("outbound", "default/log.svc.ingest", names);
        (store, m, route)
    }

    /// A backend that would answer, behind v2's breaker opened by hand.
    fn v2_opened_by_hand(
        store: &PolicyStore,
    ) -> impl tower::Service<http::Request<()>, Error = tower::BoxError> + Clone {
        use tower::Layer;
        let breakers = &store.context().governance.breakers;
        assert!(breakers.force_open("default/log.svc.ingest", "v2"));
        let circuit = breakers.get("default/log.svc.ingest", "v2").unwrap();
        let backend = tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        });
        sluice_filters::breaker::BreakerLayer::new(circuit).layer(backend)
    }

    /// One request v2 failed for `reason` that the fallback answered: the fallback's
    /// count, and the answer recorded for backend `answered_by` with `status`.
    fn fell_back(
        m: &crate::metrics::Metrics,
        route: &crate::metrics::RouteMetrics,
        reason: &str,
        answered_by: usize,
        status: u16,
    ) {
        m.fallbacks
            .with_label_values(&["default", "log.svc.ingest", "v2", reason])
            .inc();
        route.record(Some(answered_by), None, status, Duration::from_millis(1));
    }

    /// A request the primary failed and the fallback backend answered is one of the
    /// primary's requests (and a fallback); the answer is the fallback backend's.
    #[test]
    fn a_request_a_fallback_backend_answered_counts_for_the_primary_too() {
        let (store, m, route) = serving(
            "    cache: { addresses: [\"127.0.0.1:3\"] }\n",
            "      fallback: { on: [timeout], backend: cache }\n",
            &["v1", "v2", "cache"],
        );
        let reports = CounterReports::new(store);
        for _ in 0..3 {
            route.record(Some(1), None, 200, Duration::from_millis(1));
        }
        for _ in 0..2 {
            fell_back(&m, &route, "timeout", 2, 200);
        }
        let d = reports.deltas(10);
        let find = |b: &str| d.entries.iter().find(|e| e.backend == b).cloned().unwrap();
        let v2 = find("v2");
        assert_eq!((v2.requests, v2.fallbacks, v2.server_errors), (5, 2, 0));
        assert_eq!(find("cache").requests, 2);
    }

    /// A static fallback answer is counted for the primary with its status; a 5xx
    /// there is the fallback, counted once, not a backend failure as well.
    #[test]
    fn a_static_5xx_fallback_is_one_failure_not_two() {
        let (store, m, route) = serving(
            "",
            "      fallback: { on: [upstream-unavailable], response: { status: 503 } }\n",
            &["v1", "v2"],
        );
        let reports = CounterReports::new(store.clone());
        // v2 answered one 500 itself; two of its requests failed to connect and got the
        // route's static 503.
        route.record(Some(1), None, 500, Duration::from_millis(1));
        for _ in 0..2 {
            fell_back(&m, &route, "upstream-unavailable", 1, 503);
        }
        let d = reports.deltas(10);
        let v2 = d.entries.iter().find(|e| e.backend == "v2").unwrap();
        assert_eq!((v2.requests, v2.server_errors, v2.fallbacks), (3, 1, 2));

        // The fallback edited away: counts already reported are not read again.
        store.apply("t", policy_set()).unwrap();
        assert!(reports.deltas(10).entries.is_empty());
    }

    /// A breaker refusal the fallback answered is not also taken off the backend's own
    /// 5xx (it was never this proxy's own 503), whatever the fallback answered.
    #[tokio::test]
    async fn a_refusal_the_fallback_answered_takes_nothing_off_the_backends_errors() {
        use tower::ServiceExt;
        for (fallback, status) in [
            ("response: { status: 503 }", 503),
            ("response: { status: 200 }", 200),
        ] {
            let (store, m, route) = serving(
                "",
                &format!(
                    "      circuitBreaker: {{ consecutiveFailures: 2 }}\n      fallback: {{ on: [breaker-open], {fallback} }}\n"
                ),
                &["v1", "v2"],
            );
            let reports = CounterReports::new(store.clone());
            // v2 answered one 500; then its breaker, opened by hand, refused one request,
            // which the fallback answered.
            route.record(Some(1), None, 500, Duration::from_millis(1));
            let guarded = v2_opened_by_hand(&store);
            assert!(guarded.oneshot(http::Request::new(())).await.is_err());
            fell_back(&m, &route, "breaker-open", 1, status);
            let d = reports.deltas(10);
            let v2 = d.entries.iter().find(|e| e.backend == "v2").unwrap();
            assert_eq!(
                (v2.requests, v2.server_errors, v2.fallbacks, v2.breaker_open),
                (2, 1, 1, 1),
                "{fallback}"
            );
        }
    }

    #[test]
    fn reports_carry_deltas_by_class_and_bucket() {
        let store = store_for_tests();
        store.apply("t", policy_set()).unwrap();
        let m = store.context().metrics.clone();
        let route = m.route("outbound", "default/log.svc.ingest", &["v1", "v2"]);
        let inbound = m.route("inbound", "inbound", &["app"]);
        let reports = CounterReports::new(store);
        assert_eq!(reports.deltas(10), Deltas::default());

        for _ in 0..7 {
            route.record(Some(0), None, 200, Duration::from_millis(1));
        }
        route.record(Some(1), None, 500, Duration::from_millis(30));
        route.record(Some(1), None, 502, Duration::from_millis(1));
        route.record(Some(1), None, 504, Duration::from_secs(20));
        route.record(None, None, 429, Duration::from_millis(1));
        inbound.record(Some(0), None, 500, Duration::from_millis(1));
        let d = reports.deltas(10);
        assert_eq!(d.deferred, 0);
        assert_eq!(d.bucket_bounds.len(), 16);
        assert_eq!(d.entries.len(), 2, "{:?}", d.entries);
        let v1 = &d.entries[0];
        assert_eq!(
            (&*v1.namespace, &*v1.policy, &*v1.route, &*v1.backend),
            ("default", "log.svc", "ingest", "v1")
        );
        assert_eq!((v1.requests, v1.server_errors), (7, 0));
        assert_eq!(v1.duration_counts.iter().sum::<u64>(), 7);
        let v2 = &d.entries[1];
        assert_eq!(v2.requests, 3);
        assert_eq!((v2.server_errors, v2.unavailable, v2.timeouts), (1, 1, 1));
        assert_eq!(v2.duration_counts.len(), 17);
        assert_eq!(v2.duration_counts[16], 1, "20 s is above the last bound");

        // Only what is new shows up next time.
        route.record(Some(1), None, 200, Duration::from_millis(1));
        let d = reports.deltas(10);
        assert_eq!(d.entries.len(), 1);
        assert_eq!(
            (d.entries[0].backend.as_str(), d.entries[0].requests),
            ("v2", 1)
        );
        assert!(reports.deltas(10).entries.is_empty());
    }

    #[tokio::test]
    async fn fallbacks_and_breaker_refusals_are_reported_and_refusals_are_not_server_errors() {
        use tower::ServiceExt;
        let store = store_for_tests();
        store
            .apply(
                "t",
                policy_set_with("      circuitBreaker: { consecutiveFailures: 2 }\n"),
            )
            .unwrap();
        let ctx = store.context();
        let m = ctx.metrics.clone();
        let route = m.route("outbound", "default/log.svc.ingest", &["v1", "v2"]);
        let reports = CounterReports::new(store.clone());

        // v2's breaker opened by hand refuses two requests; the proxy answers each 503.
        let guarded = v2_opened_by_hand(&store);
        for _ in 0..2 {
            let answer = guarded.clone().oneshot(http::Request::new(())).await;
            assert!(answer.is_err(), "refused by the open breaker");
            route.record(Some(1), None, 503, Duration::from_millis(1));
        }
        // And v2 itself answered one 500.
        route.record(Some(1), None, 500, Duration::from_millis(1));
        // v1 took no request; its fallback answered one.
        m.fallbacks
            .with_label_values(&["default", "log.svc.ingest", "v1", "breaker-open"])
            .inc();

        let d = reports.deltas(10);
        let find = |b: &str| d.entries.iter().find(|e| e.backend == b).cloned();
        let v2 = find("v2").expect("v2 reported");
        assert_eq!(
            (v2.requests, v2.server_errors, v2.breaker_open),
            (3, 1, 2),
            "the refusals are the breaker's, not the backend's errors"
        );
        let v1 = find("v1").expect("a fallback alone is worth reporting");
        assert_eq!((v1.requests, v1.fallbacks, v1.breaker_open), (0, 1, 0));
        assert_eq!((&*v1.policy, &*v1.route), ("log.svc", "ingest"));

        // Nothing new: nothing reported; one more refusal: only it.
        assert!(reports.deltas(10).entries.is_empty());
        let _ = guarded.oneshot(http::Request::new(())).await;
        let d = reports.deltas(10);
        assert_eq!(d.entries.len(), 1, "{:?}", d.entries);
        assert_eq!(
            (d.entries[0].backend.as_str(), d.entries[0].breaker_open),
            ("v2", 1)
        );
    }

    #[test]
    fn a_full_report_defers_the_rest_to_the_next() {
        let store = store_for_tests();
        let m = store.context().metrics.clone();
        let route = m.route("outbound", "p.r", &["a", "b", "c"]);
        let reports = CounterReports::new(store);
        for (i, n) in [(0, 3), (1, 2), (2, 1)] {
            for _ in 0..n {
                route.record(Some(i), None, 200, Duration::from_millis(1));
            }
        }
        let d = reports.deltas(2);
        assert_eq!(d.deferred, 1);
        let names: Vec<_> = d.entries.iter().map(|e| e.backend.as_str()).collect();
        assert_eq!(names, ["a", "b"], "the busiest first");
        let d = reports.deltas(2);
        assert_eq!(d.entries.len(), 1);
        assert_eq!(
            (d.entries[0].backend.as_str(), d.entries[0].requests),
            ("c", 1)
        );
        assert_eq!(d.deferred, 0);
        reports.dropped();
        assert_eq!(reports.dropped.get(), 1);
    }
}
