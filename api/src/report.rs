//! What a proxy tells the control plane about its traffic, and what it hears back.
//!
//! A [`ReportSource`] turns the proxy's own counters into per route × backend deltas
//! when a report is due; the [`Subscriber`](crate::Subscriber) numbers them and queues
//! them on the policy stream without waiting: a report that finds the queue full is
//! dropped and counted. The control plane answers with how many proxies have traffic
//! on each route, which lands in a [`RouteTraffic`] table read without a lock.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::pb;

/// Most route × backend entries in one report; the rest wait for the next one.
pub const MAX_REPORT_ENTRIES: usize = 256;

/// The counter deltas of one report, before the subscriber numbers it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Deltas {
    /// Upper bounds (seconds) of the duration buckets, ascending.
    pub bucket_bounds: Vec<f64>,
    /// At most [`MAX_REPORT_ENTRIES`] entries, none of them all zero.
    pub entries: Vec<pb::BackendCounts>,
    /// Entries with news that did not fit; their deltas are carried to the next report.
    pub deferred: u32,
}

/// Where the reports' deltas come from: the proxy's counters, read when a report is due.
pub trait ReportSource: std::fmt::Debug + Send + Sync + 'static {
    /// The deltas since the previous call, at most `max_entries` of them. Called from
    /// the subscriber task, never from a request.
    fn deltas(&self, max_entries: usize) -> Deltas;

    /// Told each time a report is dropped because the stream's queue was full.
    fn dropped(&self) {}
}

/// How many proxies reported traffic on each (namespace, policy, route) recently, as the
/// control plane last said: a table swapped whole, read without a lock.
#[derive(Debug, Default)]
pub struct RouteTraffic {
    table: ArcSwap<HashMap<(String, String, String), u32>>,
}

impl RouteTraffic {
    /// An empty table (nothing heard yet).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The number of proxies with traffic on `route` of the policy `namespace`/`policy`
    /// in the control plane's last word, or `None` when the control plane has not named
    /// that route (no traffic, or not heard from yet). A control plane that predates
    /// namespaces names none; its entry then stands for the name in every namespace.
    pub fn proxies(&self, namespace: &str, policy: &str, route: &str) -> Option<u32> {
        let table = self.table.load();
        let mut key = (namespace.to_string(), policy.to_string(), route.to_string());
        if let Some(n) = table.get(&key) {
            return Some(*n);
        }
        key.0.clear();
        table.get(&key).copied()
    }

    /// The whole table as last received: (namespace, policy, route) → proxies.
    pub fn table(&self) -> Arc<HashMap<(String, String, String), u32>> {
        self.table.load_full()
    }

    /// Replaces the table with the one in `msg`.
    pub fn replace(&self, msg: &pb::RouteTraffic) {
        let table = msg
            .routes
            .iter()
            .map(|r| {
                let key = (r.namespace.clone(), r.policy.clone(), r.route.clone());
                (key, r.proxies)
            })
            .collect();
        self.table.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_replaced_whole() {
        let t = RouteTraffic::new();
        assert_eq!(t.proxies("shop", "log", "ingest"), None);
        let route = |ns: &str, p: &str, r: &str, n| pb::RouteProxies {
            namespace: ns.into(),
            policy: p.into(),
            route: r.into(),
            proxies: n,
        };
        t.replace(&pb::RouteTraffic {
            routes: vec![
                route("shop", "log", "ingest", 3),
                route("staging", "log", "ingest", 5),
                route("shop", "log", "query", 1),
            ],
        });
        assert_eq!(t.proxies("shop", "log", "ingest"), Some(3));
        assert_eq!(t.proxies("staging", "log", "ingest"), Some(5));
        assert_eq!(t.proxies("other", "log", "ingest"), None);
        t.replace(&pb::RouteTraffic {
            routes: vec![route("shop", "log", "query", 2)],
        });
        assert_eq!(t.proxies("shop", "log", "ingest"), None);
        assert_eq!(t.proxies("shop", "log", "query"), Some(2));
        let key = ("shop".to_string(), "log".to_string(), "query".to_string());
        assert_eq!(*t.table(), HashMap::from([(key, 2)]));
    }

    #[test]
    fn a_control_plane_without_namespaces_counts_for_every_namespace() {
        let t = RouteTraffic::new();
        t.replace(&pb::RouteTraffic {
            routes: vec![
                pb::RouteProxies {
                    namespace: String::new(),
                    policy: "log".into(),
                    route: "ingest".into(),
                    proxies: 4,
                },
                pb::RouteProxies {
                    namespace: "shop".into(),
                    policy: "log".into(),
                    route: "ingest".into(),
                    proxies: 2,
                },
            ],
        });
        assert_eq!(t.proxies("staging", "log", "ingest"), Some(4));
        assert_eq!(t.proxies("shop", "log", "ingest"), Some(2));
        assert_eq!(t.proxies("shop", "log", "query"), None);
    }
}
