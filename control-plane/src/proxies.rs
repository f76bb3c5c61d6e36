//! What the control plane knows about each proxy, for `/proxies`.

use std::collections::BTreeMap;
use std::sync::Mutex;
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
    records: Mutex<BTreeMap<String, ProxyRecord>>,
    connected: IntGauge,
    changes: watch::Sender<u64>,
}

/// Marks a proxy's stream open; dropping it marks the stream closed.
#[derive(Debug)]
pub(crate) struct StreamGuard<'a> {
    registry: &'a ProxyRegistry,
    node_id: String,
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.registry.connected.dec();
        self.registry.update(&self.node_id, |r| {
            r.streams = r.streams.saturating_sub(1);
            r.connected = r.streams > 0;
        });
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

    pub(crate) fn connect(&self, hello: &pb::Hello) -> StreamGuard<'_> {
        self.connected.inc();
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let r = records.entry(hello.node_id.clone()).or_default();
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
        drop(records);
        self.changes.send_modify(|c| *c += 1);
        StreamGuard {
            registry: self,
            node_id: hello.node_id.clone(),
        }
    }

    pub(crate) fn sent(&self, node_id: &str, version: &str) {
        self.update(node_id, |r| {
            r.version_sent = Some(version.to_string());
            r.sent_at_unix_ms = Some(unix_ms(SystemTime::now()));
        });
    }

    pub(crate) fn acked(&self, node_id: &str, version: &str) {
        self.update(node_id, |r| {
            r.acked_version = Some(version.to_string());
            r.acked_at_unix_ms = Some(unix_ms(SystemTime::now()));
        });
    }

    pub(crate) fn nacked(&self, node_id: &str, version: &str, error: &str) {
        self.update(node_id, |r| {
            r.nacked_version = Some(version.to_string());
            r.nack_error = Some(error.to_string());
            r.nacked_at_unix_ms = Some(unix_ms(SystemTime::now()));
        });
    }

    pub(crate) fn snapshot(&self) -> Vec<ProxyRecord> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records.values().cloned().collect()
    }

    fn update(&self, node_id: &str, f: impl FnOnce(&mut ProxyRecord)) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = records.get_mut(node_id) {
            f(r);
            r.last_seen_unix_ms = unix_ms(SystemTime::now());
        }
        drop(records);
        self.changes.send_modify(|c| *c += 1);
    }
}
