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

/// How many proxies reported traffic on each (policy, route) recently, as the control
/// plane last said: a table swapped whole, read without a lock.
#[derive(Debug, Default)]
pub struct RouteTraffic {
    table: ArcSwap<HashMap<(String, String), u32>>,
}

impl RouteTraffic {
    /// An empty table (nothing heard yet).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The number of proxies with traffic on `route` of the policy named `policy`
    /// (its `metadata.name`) in the control plane's last word, or `None` when the
    /// control plane has not named that route (no traffic, or not heard from yet).
    pub fn proxies(&self, policy: &str, route: &str) -> Option<u32> {
        self.table
            .load()
            .get(&(policy.to_string(), route.to_string()))
            .copied()
    }

    /// The whole table as last received.
    pub fn table(&self) -> Arc<HashMap<(String, String), u32>> {
        self.table.load_full()
    }

    /// Replaces the table with the one in `msg`.
    pub fn replace(&self, msg: &pb::RouteTraffic) {
        let table = msg
            .routes
            .iter()
            .map(|r| ((r.policy.clone(), r.route.clone()), r.proxies))
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
        assert_eq!(t.proxies("log", "ingest"), None);
        let route = |p: &str, r: &str, n| pb::RouteProxies {
            policy: p.into(),
            route: r.into(),
            proxies: n,
        };
        t.replace(&pb::RouteTraffic {
            routes: vec![route("log", "ingest", 3), route("log", "query", 1)],
        });
        assert_eq!(t.proxies("log", "ingest"), Some(3));
        t.replace(&pb::RouteTraffic {
            routes: vec![route("log", "query", 2)],
        });
        assert_eq!(t.proxies("log", "ingest"), None);
        assert_eq!(t.proxies("log", "query"), Some(2));
        assert_eq!(
            *t.table(),
            HashMap::from([(("log".to_string(), "query".to_string()), 2)])
        );
    }
}
