//! What the control plane knows about each proxy, for `/proxies`.
//!
//! A row per open stream, not per node id: two proxies started with the same
//! `--node-id` are two rows, each with its own versions, NACKs and peer address,
//! both flagged `duplicate_node_id` (as Envoy's control planes list each connection),
//! so neither one's drift hides behind the other's acks. A closed stream's row stays
//! as its node's last state until the node connects again, or goes at once when
//! another stream of its node id is still open: a proxy going removes only its own row.
//! Such a row is still kept apart for [`RECENTLY_CLOSED`], out of `/proxies`, so a
//! rollout step can name the proxy that went before acking though its twin stays.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::IntGauge;
use serde::Serialize;
use sluice_api::pb;
use tokio::sync::watch;

use crate::unix_ms;

/// How long a closed stream's row is kept for the rollouts (and, on a replica not
/// holding the lease, sent to the holder): longer than a rollout step waits for acks
/// (30 s), so a proxy that went while a step waited is still in hand when the holder
/// next looks.
pub const RECENTLY_CLOSED: Duration = Duration::from_secs(60);

/// Most closed rows kept apart from `/proxies` at once; the oldest go first.
const DEPARTED_MAX: usize = 1024;

/// One proxy stream as seen by the control plane.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProxyRecord {
    /// The proxy's node id from its `Hello`.
    pub node_id: String,
    /// This control plane's number for the stream (rows sharing a node id differ by it).
    pub stream: u64,
    /// The address the stream came from, when the transport knows it.
    pub peer: Option<String>,
    /// The control-plane replica the stream is open to, when not this one (the lease
    /// holder's view of the other replicas' proxies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Another open stream says the same node id: two proxies share it (or this one
    /// reconnected before its old stream was found dead).
    pub duplicate_node_id: bool,
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
    /// When the stream opened.
    pub connected_at_unix_ms: u64,
    /// When the stream closed, once it has.
    pub disconnected_at_unix_ms: Option<u64>,
    /// Last message from it, or its stream's end.
    pub last_seen_unix_ms: u64,
    /// Its stream is open now.
    pub connected: bool,
}

impl ProxyRecord {
    /// The stream's name among those of its node id, unique across replicas.
    pub fn conn(&self) -> String {
        match &self.replica {
            Some(replica) => format!("{replica}/{}", self.stream),
            None => format!("#{}", self.stream),
        }
    }
}

/// A row's key: node id, then stream number, so a node's rows sit together.
type Key = (String, u64);

/// The proxies connected now, and the last state of those that went.
#[derive(Debug)]
pub(crate) struct ProxyRegistry {
    /// A record per stream, shared with that stream: a stream updates its own record
    /// without the map's lock or a search by name. Lock order: the map, then records.
    records: Mutex<BTreeMap<Key, Arc<Mutex<ProxyRecord>>>>,
    /// Rows of streams that closed while another of their node id was open, oldest
    /// first: out of `/proxies`, kept for the rollouts. Locked after `records`.
    departed: Mutex<VecDeque<ProxyRecord>>,
    next_stream: AtomicU64,
    connected: IntGauge,
    changes: watch::Sender<u64>,
}

/// One open stream of a proxy: records what is sent to it and what it answers; dropping
/// it marks the stream closed.
#[derive(Debug)]
pub(crate) struct StreamGuard<'a> {
    registry: &'a ProxyRegistry,
    key: Key,
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

    /// This control plane's number for the stream.
    pub(crate) fn stream(&self) -> u64 {
        self.key.1
    }

    /// The proxy sent a message, any message: its traffic reports, every couple of
    /// seconds, are what keeps `last_seen_unix_ms` fresh between policy changes.
    ///
    /// Wakes no watcher: every proxy's every report comes here, and a newer
    /// last-seen time is nothing anyone waits for, while the status writer on
    /// Kubernetes wakes on every change.
    pub(crate) fn seen(&self) {
        let now = unix_ms(SystemTime::now());
        lock(&self.record).last_seen_unix_ms = now;
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
        let out = f(&mut lock(&self.record), now);
        self.registry.changed();
        out
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.registry.connected.dec();
        let now = unix_ms(SystemTime::now());
        {
            let mut r = lock(&self.record);
            r.last_seen_unix_ms = now;
            r.disconnected_at_unix_ms = Some(now);
            r.connected = false;
        }
        {
            let mut records = lock(&self.registry.records);
            // Another open stream of this node id shows it: this row goes. Otherwise
            // it stays as the node's last state.
            let (node, _) = &self.key;
            let open_beside =
                node_rows(&records, node).any(|(k, r)| *k != self.key && lock(r).connected);
            if open_beside {
                records.remove(&self.key);
                let mut departed = lock(&self.registry.departed);
                if departed.len() >= DEPARTED_MAX {
                    departed.pop_front();
                }
                departed.push_back(lock(&self.record).clone());
            }
        }
        self.registry.changed();
        // Here rather than where a stream's loop ends: a stream whose connection is
        // gone is dropped without its loop ever ending.
        tracing::info!(node_id = %self.key.0, stream = self.key.1, "proxy disconnected");
    }
}

impl ProxyRegistry {
    pub(crate) fn new(connected: IntGauge, changes: watch::Sender<u64>) -> Self {
        Self {
            records: Mutex::new(BTreeMap::new()),
            departed: Mutex::default(),
            next_stream: AtomicU64::new(0),
            connected,
            changes,
        }
    }

    /// A stream of the proxy that sent `hello` opened, from `peer`. A node id another
    /// open stream already has is taken, listed on a row of its own and warned about.
    pub(crate) fn connect(&self, hello: &pb::Hello, peer: Option<SocketAddr>) -> StreamGuard<'_> {
        self.connected.inc();
        let now = unix_ms(SystemTime::now());
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
        let record = Arc::new(Mutex::new(ProxyRecord {
            node_id: hello.node_id.clone(),
            stream,
            peer: peer.map(|p| p.to_string()),
            namespace: hello.namespace.clone(),
            service: hello.service.clone(),
            proxy_version: hello.proxy_version.clone(),
            schema_version: hello.schema_version,
            accepted_schema_versions: crate::views::accepted(hello),
            acked_version: (!hello.last_applied_version.is_empty())
                .then(|| hello.last_applied_version.clone()),
            connected_at_unix_ms: now,
            last_seen_unix_ms: now,
            connected: true,
            ..Default::default()
        }));
        let key = (hello.node_id.clone(), stream);
        let open_elsewhere: Vec<String> = {
            let mut records = lock(&self.records);
            let mut closed = Vec::new();
            let mut open = Vec::new();
            for (k, r) in node_rows(&records, &hello.node_id) {
                let r = lock(r);
                if r.connected {
                    open.push(
                        r.peer
                            .clone()
                            .unwrap_or_else(|| format!("stream {}", r.stream)),
                    );
                } else {
                    closed.push(k.clone());
                }
            }
            // The node's last state gives way to its new stream.
            for k in closed {
                records.remove(&k);
            }
            // As do its streams that went beside another: which proxy came back is
            // not known, and one that did is waited for on its new stream.
            lock(&self.departed).retain(|r| r.node_id != hello.node_id);
            records.insert(key.clone(), record.clone());
            open
        };
        if !open_elsewhere.is_empty() {
            tracing::warn!(
                node_id = %hello.node_id,
                peer = ?peer,
                already_connected_from = ?open_elsewhere,
                "a proxy connected with a node id another open stream already has: each is listed in /proxies on its own row, flagged duplicate_node_id; give every proxy its own --node-id (the same proxy reconnecting before its old stream was found dead shows the same way until it is)"
            );
        }
        self.changed();
        StreamGuard {
            registry: self,
            key,
            record,
        }
    }

    /// Every stream's record, by node id, then in the order they connected; open
    /// streams sharing a node id are flagged.
    pub(crate) fn snapshot(&self) -> Vec<ProxyRecord> {
        let records = lock(&self.records);
        let mut all: Vec<ProxyRecord> = records.values().map(|r| lock(r).clone()).collect();
        drop(records);
        let mut i = 0;
        while i < all.len() {
            let same = all[i..]
                .iter()
                .take_while(|r| r.node_id == all[i].node_id)
                .count();
            let open = all[i..i + same].iter().filter(|r| r.connected).count();
            for r in &mut all[i..i + same] {
                r.duplicate_node_id = r.connected && open > 1;
            }
            i += same;
        }
        all
    }

    /// Every stream's record as [`Self::snapshot`] has it, and those closed within
    /// [`RECENTLY_CLOSED`] of `now_ms` while another stream of their node id was
    /// open: what a rollout step's acks are counted from.
    pub(crate) fn with_departed(&self, now_ms: u64) -> Vec<ProxyRecord> {
        let mut all = self.snapshot();
        let since = now_ms.saturating_sub(RECENTLY_CLOSED.as_millis() as u64);
        let mut departed = lock(&self.departed);
        departed.retain(|r| r.disconnected_at_unix_ms.is_some_and(|at| at >= since));
        all.extend(departed.iter().cloned());
        all
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

/// The rows of `node`.
fn node_rows<'a>(
    records: &'a BTreeMap<Key, Arc<Mutex<ProxyRecord>>>,
    node: &str,
) -> impl Iterator<Item = (&'a Key, &'a Arc<Mutex<ProxyRecord>>)> {
    records.range((node.to_string(), 0)..=(node.to_string(), u64::MAX))
}

/// A lock a panicking holder left behind is still good: records are plain data.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

    fn peer(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// Two proxies with one node id get a row each, both flagged, each with its own
    /// answers; one going removes its row alone, and the other is no longer flagged.
    /// The last to go stays as the node's last state until the node connects again.
    #[test]
    fn streams_sharing_a_node_id_are_rows_of_their_own() {
        let (tx, mut rx) = watch::channel(0);
        let gauge = IntGauge::new("connected", "open streams").unwrap();
        let registry = ProxyRegistry::new(gauge.clone(), tx);
        let first = registry.connect(&hello("a"), peer(1001));
        let second = registry.connect(&hello("a"), peer(1002));
        let other = registry.connect(&hello("b"), peer(1003));
        assert_eq!(gauge.get(), 3);
        rx.mark_unchanged();
        first.sent("v2");
        first.acked("v2");
        second.sent("v2");
        second.nacked("v2", "bad route");
        other.acked("v2");
        assert!(rx.has_changed().unwrap(), "a watcher is woken");
        let rows = |r: &ProxyRegistry| {
            r.snapshot()
                .into_iter()
                .map(|p| {
                    (
                        p.node_id,
                        p.peer.unwrap_or_default(),
                        p.connected,
                        p.duplicate_node_id,
                        p.acked_version,
                        p.nack_error,
                    )
                })
                .collect::<Vec<_>>()
        };
        let v2 = || Some("v2".to_string());
        let bad = || Some("bad route".to_string());
        assert_eq!(
            rows(&registry),
            [
                ("a".into(), "127.0.0.1:1001".into(), true, true, v2(), None),
                ("a".into(), "127.0.0.1:1002".into(), true, true, None, bad()),
                ("b".into(), "127.0.0.1:1003".into(), true, false, v2(), None),
            ]
        );

        drop(second);
        assert_eq!(
            rows(&registry),
            [
                ("a".into(), "127.0.0.1:1001".into(), true, false, v2(), None),
                ("b".into(), "127.0.0.1:1003".into(), true, false, v2(), None),
            ],
            "the refusing proxy's row went with it, and only its row"
        );
        drop(first);
        let all = registry.snapshot();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(!all[0].connected && all[0].disconnected_at_unix_ms.is_some());
        assert_eq!(all[0].acked_version, v2(), "the node's last state stays");
        assert_eq!(gauge.get(), 1);

        let back = registry.connect(&hello("a"), peer(1004));
        let all = registry.snapshot();
        assert_eq!(
            all.len(),
            2,
            "the reconnect takes the closed row's place: {all:?}"
        );
        assert!(all[0].connected && all[0].stream > all[1].stream);
        assert_eq!(all[0].peer.as_deref(), Some("127.0.0.1:1004"));
        drop(back);
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
        let stream = registry.connect(&hello("a"), None);
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
