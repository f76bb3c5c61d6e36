//! What the control plane knows about each proxy, for `/proxies`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus::IntGauge;
use serde::Serialize;
use sluice_api::pb;
use tokio::sync::watch;

use crate::unix_ms;

/// One proxy (by node id) as seen by the control plane.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProxyRecord {
    /// The proxy's node id from its `Hello`.
    pub node_id: String,
    /// Namespace of its workload.
    pub namespace: String,
    /// The service it fronts.
    pub service: String,
    /// Its binary version.
    pub proxy_version: String,
    /// The newest policy schema version it understands.
    pub schema_version: u32,
    /// Every schema version it accepts; it receives the view of the newest of them.
    pub accepted_schema_versions: Vec<u32>,
    /// The last version sent to it.
    pub version_sent: Option<String>,
    /// When that version was sent (ms since the Unix epoch).
    pub sent_at_unix_ms: Option<u64>,
    /// The last version it acknowledged (or said it had in `Hello`).
    pub acked_version: Option<String>,
    /// When it acknowledged it.
    pub acked_at_unix_ms: Option<u64>,
    /// The last version it refused.
    pub nacked_version: Option<String>,
    /// Why it refused it.
    pub nack_error: Option<String>,
    /// When it refused it.
    pub nacked_at_unix_ms: Option<u64>,
    /// Last message from it, or its stream's end.
    pub last_seen_unix_ms: u64,
    /// It has a stream open now.
    pub connected: bool,
    #[serde(skip)]
    streams: u32,
}

/// Every proxy that ever connected since the control plane started.
#[derive(Debug)]
pub(crate) struct ProxyRegistry {
    /// A record per node id, shared with that proxy's open streams: a stream updates
    /// its own record without the map's lock or a search by name.
    records: Mutex<BTreeMap<String, Arc<Mutex<ProxyRecord>>>>,
    connected: IntGauge,
    changes: watch::Sender<u64>,
}

/// One open stream of a proxy: records what is sent to it and what it answers; dropping
/// it marks the stream closed.
#[derive(Debug)]
pub(crate) struct StreamGuard<'a> {
    registry: &'a ProxyRegistry,
    record: Arc<Mutex<ProxyRecord>>,
}

impl StreamGuard<'_> {
    /// `version` was sent on this stream. Not a sign of life: a hung proxy is sent
    /// versions too.
    pub(crate) fn sent(&self, version: &str) {
        self.update(|r, now| {
            r.version_sent = Some(version.to_string());
            r.sent_at_unix_ms = Some(now);
        });
    }

    /// The proxy sent a message, any message: its traffic reports, every couple of
    /// seconds, are what keeps `last_seen_unix_ms` fresh between policy changes.
    ///
    /// Wakes no watcher: every proxy's every report comes here, and a newer
    /// last-seen time is nothing anyone waits for, while the status writer on
    /// Kubernetes wakes on every change.
    pub(crate) fn seen(&self) {
        let now = unix_ms(SystemTime::now());
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_seen_unix_ms = now;
    }

    /// The proxy acknowledged `version`.
    pub(crate) fn acked(&self, version: &str) {
        self.update(|r, now| {
            r.last_seen_unix_ms = now;
            r.acked_version = Some(version.to_string());
            r.acked_at_unix_ms = Some(now);
        });
    }

    /// The proxy refused `version` because of `error`.
    pub(crate) fn nacked(&self, version: &str, error: &str) {
        self.update(|r, now| {
            r.last_seen_unix_ms = now;
            r.nacked_version = Some(version.to_string());
            r.nack_error = Some(error.to_string());
            r.nacked_at_unix_ms = Some(now);
        });
    }

    fn update<T>(&self, f: impl FnOnce(&mut ProxyRecord, u64) -> T) -> T {
        let now = unix_ms(SystemTime::now());
        let out = {
            let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut r, now)
        };
        self.registry.changed();
        out
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.registry.connected.dec();
        let node = self.update(|r, now| {
            r.last_seen_unix_ms = now;
            r.streams = r.streams.saturating_sub(1);
            r.connected = r.streams > 0;
            r.node_id.clone()
        });
        // Here rather than where a stream's loop ends: a stream whose connection is
        // gone is dropped without its loop ever ending.
        tracing::info!(node_id = %node, "proxy disconnected");
    }
}

impl ProxyRegistry {
    pub(crate) fn new(connected: IntGauge, changes: watch::Sender<u64>) -> Self {
        Self {
            records: Mutex::new(BTreeMap::new()),
            connected,
            changes,
        }
    }

    /// A stream of the proxy that sent `hello` opened.
    pub(crate) fn connect(&self, hello: &pb::Hello) -> StreamGuard<'_> {
        self.connected.inc();
        let record = {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            records.entry(hello.node_id.clone()).or_default().clone()
        };
        {
            let mut r = record.lock().unwrap_or_else(|e| e.into_inner());
            r.node_id = hello.node_id.clone();
            r.namespace = hello.namespace.clone();
            r.service = hello.service.clone();
            r.proxy_version = hello.proxy_version.clone();
            r.schema_version = hello.schema_version;
            r.accepted_schema_versions = crate::views::accepted(hello);
            if !hello.last_applied_version.is_empty() {
                r.acked_version = Some(hello.last_applied_version.clone());
            }
            r.streams += 1;
            r.connected = true;
            r.last_seen_unix_ms = unix_ms(SystemTime::now());
        }
        self.changed();
        StreamGuard {
            registry: self,
            record,
        }
    }

    /// Every proxy's record, by node id.
    pub(crate) fn snapshot(&self) -> Vec<ProxyRecord> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records
            .values()
            .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// Wakes whoever waits on [`crate::RunningControlPlane::watch_changes`]. Nobody
    /// waiting, nothing to wake: each send and answer of every proxy comes here, and
    /// a bump nobody reads still takes the channel's locks (a later subscriber reads
    /// the records as they are then).
    fn changed(&self) {
        if self.changes.receiver_count() > 0 {
            self.changes.send_modify(|c| *c += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(node: &str) -> pb::Hello {
        pb::Hello {
            node_id: node.into(),
            ..Default::default()
        }
    }

    /// Two streams of one node id share its record: an answer on either shows, and the
    /// proxy reads as connected until both have closed.
    #[test]
    fn streams_of_one_proxy_share_its_record_until_the_last_closes() {
        let (tx, mut rx) = watch::channel(0);
        let gauge = IntGauge::new("connected", "open streams").unwrap();
        let registry = ProxyRegistry::new(gauge.clone(), tx);
        let first = registry.connect(&hello("a"));
        let second = registry.connect(&hello("a"));
        let other = registry.connect(&hello("b"));
        assert_eq!(gauge.get(), 3);
        rx.mark_unchanged();
        first.sent("v1");
        second.acked("v1");
        other.nacked("v1", "bad route");
        assert!(rx.has_changed().unwrap(), "a watcher is woken");
        let all = registry.snapshot();
        assert_eq!(all.len(), 2);
        let a = &all[0];
        assert_eq!(
            (
                a.node_id.as_str(),
                a.version_sent.as_deref(),
                a.acked_version.as_deref()
            ),
            ("a", Some("v1"), Some("v1"))
        );
        assert_eq!(all[1].nack_error.as_deref(), Some("bad route"));
        drop(first);
        assert!(
            registry.snapshot()[0].connected,
            "the second stream is open"
        );
        drop(second);
        assert!(!registry.snapshot()[0].connected);
        assert_eq!(gauge.get(), 1);
        drop(other);
        assert_eq!(gauge.get(), 0);
    }

    /// Any message from the proxy, a report included, is a sign of life; a version
    /// sent to it is not. A report wakes no watcher.
    #[test]
    fn last_seen_follows_what_the_proxy_sends_not_what_it_is_sent() {
        let (tx, mut rx) = watch::channel(0);
        let gauge = IntGauge::new("connected", "open streams").unwrap();
        let registry = ProxyRegistry::new(gauge, tx);
        let stream = registry.connect(&hello("a"));
        let forget = || stream.record.lock().unwrap().last_seen_unix_ms = 0;
        let last_seen = || registry.snapshot()[0].last_seen_unix_ms;

        forget();
        stream.sent("v1");
        assert_eq!(last_seen(), 0, "a version sent says nothing of the proxy");

        rx.mark_unchanged();
        stream.seen();
        assert!(last_seen() > 0, "a report is a message from the proxy");
        assert!(!rx.has_changed().unwrap(), "and wakes nobody");

        forget();
        stream.acked("v1");
        assert!(last_seen() > 0);
        forget();
        stream.nacked("v2", "bad route");
        assert!(last_seen() > 0);
    }
}
