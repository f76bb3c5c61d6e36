//! The policy stream end to end within one process: a real control plane on
//! ephemeral loopback ports, real `sluice_api::Subscriber`s over gRPC, and the
//! admin API read over HTTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde_json::Value;
use sluice_api::{Backoff, SnapshotSink, Subscriber, SubscriberConfig};
use sluice_config::PolicySet;
use sluice_control_plane::{ControlPlaneConfig, RunningControlPlane};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Bound on every wait; generous because the machine is shared.
const WAIT: Duration = Duration::from_secs(20);

// === test sink ===

/// Holds the applied set like the proxy does, and reports every change.
struct TestSink {
    set: ArcSwapOption<PolicySet>,
    refuse: AtomicBool,
    applies: AtomicUsize,
    version: watch::Sender<Option<String>>,
}

impl TestSink {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            set: ArcSwapOption::empty(),
            refuse: AtomicBool::new(false),
            applies: AtomicUsize::new(0),
            version: watch::channel(None).0,
        })
    }

    fn refusing() -> Arc<Self> {
        let s = Self::new();
        s.refuse.store(true, Ordering::SeqCst);
        s
    }

    fn version(&self) -> Option<String> {
        self.set.load().as_ref().map(|s| s.hash().to_string())
    }

    async fn wait_version(&self, want: &str) {
        let mut rx = self.version.subscribe();
        let r = tokio::time::timeout(WAIT, rx.wait_for(|v| v.as_deref() == Some(want))).await;
        assert!(r.is_ok(), "sink never got {want}; has {:?}", self.version());
    }
}

impl SnapshotSink for TestSink {
    fn apply(&self, set: PolicySet) -> Result<bool, String> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err("test sink refuses: stricter than the control plane".into());
        }
        self.applies.fetch_add(1, Ordering::SeqCst);
        let changed = self.version().as_deref() != Some(set.hash());
        let hash = set.hash().to_string();
        self.set.store(Some(Arc::new(set)));
        self.version.send_replace(Some(hash));
        Ok(changed)
    }

    fn current_version(&self) -> Option<String> {
        self.version()
    }
}

// === helpers ===

fn policy(name: &str, per_second: u32) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\n\
         kind: RoutePolicy\n\
         metadata: {{ name: {name}, namespace: shop }}\n\
         spec:\n\
         \x20 host: {name}\n\
         \x20 inbound:\n\
         \x20   rateLimit: {{ perSecond: {per_second}, burst: 10 }}\n"
    )
}

/// Writes through a temporary file and a rename, as editors and ConfigMaps do.
fn save(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

fn cp_config(dir: &Path, state: Option<&Path>) -> ControlPlaneConfig {
    ControlPlaneConfig {
        policy_dir: dir.to_path_buf(),
        state_dir: state.map(Path::to_path_buf),
        ..ControlPlaneConfig::default()
    }
}

/// A control plane serving one policy file (`a.yaml`), its directory, and the version it
/// serves.
async fn one_policy_control_plane() -> (tempfile::TempDir, RunningControlPlane, String) {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), "a.yaml", &policy("a", 100));
    let cp = sluice_control_plane::start(cp_config(dir.path(), None))
        .await
        .unwrap();
    let v1 = cp.policy_version().unwrap();
    (dir, cp, v1)
}

fn subscriber(
    cp_grpc: SocketAddr,
    node: &str,
    sink: Arc<TestSink>,
    state_dir: Option<PathBuf>,
) -> Subscriber {
    let mut cfg = SubscriberConfig::new(format!("http://{cp_grpc}"), node);
    cfg.namespace = "shop".into();
    cfg.service = format!("svc-{node}");
    cfg.proxy_version = "test".into();
    cfg.state_dir = state_dir;
    // Fast and deterministic reconnects; the schedule itself has its own test.
    cfg.backoff = Backoff {
        min: Duration::from_millis(20),
        max: Duration::from_millis(200),
        jitter: false,
    };
    Subscriber::spawn(cfg, sink).unwrap()
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

async fn admin_json(cp: &RunningControlPlane, path: &str) -> Value {
    let (status, body) = http_get(cp.admin_addr(), path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Re-reads an admin document until `pred` holds, waking on the control
/// plane's change counter (ACKs are recorded asynchronously).
async fn admin_until(cp: &RunningControlPlane, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut changes = cp.watch_changes();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        changes.borrow_and_update();
        let v = admin_json(cp, path).await;
        if pred(&v) {
            return v;
        }
        let woke = tokio::time::timeout_at(deadline, changes.changed()).await;
        assert!(woke.is_ok(), "{path} never matched: {v:#}");
    }
}

fn proxy<'a>(doc: &'a Value, node: &str) -> Option<&'a Value> {
    doc["proxies"]
        .as_array()?
        .iter()
        .find(|p| p["node_id"] == node)
}

async fn next_version(rx: &mut watch::Receiver<Option<String>>, old: &str) -> String {
    let v = tokio::time::timeout(
        WAIT,
        rx.wait_for(|v| v.as_deref().is_some_and(|v| v != old)),
    )
    .await
    .expect("control plane never published a new version")
    .unwrap()
    .clone();
    v.unwrap()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_reaches_two_subscribers_and_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), "a.yaml", &policy("a", 100));
    save(dir.path(), "b.yml", &policy("b", 100));
    let cp = sluice_control_plane::start(cp_config(dir.path(), None))
        .await
        .unwrap();
    let v1 = cp.policy_version().unwrap();
    let (one, two) = (TestSink::new(), TestSink::new());
    let _s1 = subscriber(cp.grpc_addr(), "one", one.clone(), None);
    let _s2 = subscriber(cp.grpc_addr(), "two", two.clone(), None);
    one.wait_version(&v1).await;
    two.wait_version(&v1).await;
    assert_eq!(one.set.load().as_ref().unwrap().policies().len(), 2);

    let mut versions = cp.watch_version();
    save(dir.path(), "a.yaml", &policy("a", 250));
    let v2 = next_version(&mut versions, &v1).await;
    one.wait_version(&v2).await;
    two.wait_version(&v2).await;

    let doc = admin_until(&cp, "/proxies", |d| {
        ["one", "two"]
            .iter()
            .all(|n| proxy(d, n).is_some_and(|p| p["acked_version"] == v2.as_str()))
    })
    .await;
    let p = proxy(&doc, "one").unwrap();
    assert_eq!(p["connected"], true);
    assert_eq!(p["service"], "svc-one");
    assert_eq!(p["namespace"], "shop");
    assert_eq!(p["version_sent"], v2.as_str());
    assert!(p["nacked_version"].is_null());

    let (_, metrics) = http_get(cp.admin_addr(), "/metrics").await;
    assert_eq!(metric(&metrics, "sluice_cp_connected_proxies"), 2.0);
    assert_eq!(metric(&metrics, "sluice_cp_pushes_total"), 4.0);
    assert_eq!(
        metric(&metrics, "sluice_cp_acks_total{result=\"ack\"}"),
        4.0
    );
    assert!(metric(&metrics, "sluice_cp_push_latency_seconds_count") >= 4.0);
    assert!(metrics.contains(&format!("sluice_cp_policy_info{{hash=\"{v2}\"}} 1")));

    // A save with the same content publishes nothing and sends nothing.
    save(dir.path(), "a.yaml", &policy("a", 250));
    save(dir.path(), "c.yaml", &policy("c", 1));
    let v3 = next_version(&mut versions, &v2).await;
    one.wait_version(&v3).await;
    let (_, metrics) = http_get(cp.admin_addr(), "/metrics").await;
    assert!(metric(&metrics, "sluice_cp_pushes_total") <= 6.0);
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_edit_is_refused_at_the_control_plane_and_never_sent() {
    let (dir, cp, v1) = one_policy_control_plane().await;
    let sink = TestSink::new();
    let _s = subscriber(cp.grpc_addr(), "one", sink.clone(), None);
    sink.wait_version(&v1).await;
    let applies = sink.applies.load(Ordering::SeqCst);

    // `burst` is mistyped: the validator names file, line and column.
    let broken = policy("a", 300).replace("burst: 10", "brust: 10");
    save(dir.path(), "a.yaml", &broken);
    let doc = admin_until(&cp, "/policies", |d| !d["files"][0]["error"].is_null()).await;
    let error = doc["files"][0]["error"].as_str().unwrap();
    assert!(error.starts_with("a.yaml:7:"), "{error}");
    assert!(error.contains("brust"), "{error}");
    assert_eq!(doc["version"], v1.as_str());
    let p = &doc["policies"][0];
    assert_eq!(p["name"], "a");
    assert_eq!(p["host"], "a");
    assert_eq!(p["file"], "a.yaml");
    assert_eq!(p["file_error"], error);
    let (_, metrics) = http_get(cp.admin_addr(), "/metrics").await;
    assert_eq!(metric(&metrics, "sluice_cp_validation_failures_total"), 1.0);
    assert_eq!(metric(&metrics, "sluice_cp_pushes_total"), 1.0);

    // The fix goes out; the broken version never did.
    let mut versions = cp.watch_version();
    save(dir.path(), "a.yaml", &policy("a", 300));
    let v2 = next_version(&mut versions, &v1).await;
    sink.wait_version(&v2).await;
    assert_eq!(sink.applies.load(Ordering::SeqCst), applies + 1);
    let doc = admin_json(&cp, "/policies").await;
    assert!(doc["files"][0]["error"].is_null());
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_refused_by_the_proxy_is_nacked_and_shown() {
    let (_dir, cp, v1) = one_policy_control_plane().await;
    let strict = TestSink::refusing();
    let sub = subscriber(cp.grpc_addr(), "strict", strict.clone(), None);
    let doc = admin_until(&cp, "/proxies", |d| {
        proxy(d, "strict").is_some_and(|p| p["nacked_version"] == v1.as_str())
    })
    .await;
    let p = proxy(&doc, "strict").unwrap();
    assert!(p["nack_error"].as_str().unwrap().contains("stricter"));
    assert!(p["acked_version"].is_null());
    assert!(strict.version().is_none());
    let status = sub.status().borrow().clone();
    assert_eq!(status.last_rejected.unwrap().version, v1);
    let (_, metrics) = http_get(cp.admin_addr(), "/metrics").await;
    assert_eq!(
        metric(&metrics, "sluice_cp_acks_total{result=\"nack\"}"),
        1.0
    );
    cp.shutdown().await;
}

/// A proxy that goes is shown disconnected and leaves the connected gauge, whether it
/// ends its stream or its connection is cut under it (no HTTP/2 frame says goodbye);
/// the proxy that stays still gets the next edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_goes_is_shown_disconnected_and_the_others_keep_their_stream() {
    let (dir, cp, v1) = one_policy_control_plane().await;

    // "cut" reaches the control plane through a relay whose sockets are dropped at once.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let grpc = cp.grpc_addr();
    let relaying = tokio::spawn(async move {
        let (mut proxy_side, _) = relay.accept().await.unwrap();
        let mut cp_side = tokio::net::TcpStream::connect(grpc).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut proxy_side, &mut cp_side).await;
    });
    let (stays, ends, cut) = (TestSink::new(), TestSink::new(), TestSink::new());
    let _stays = subscriber(grpc, "stays", stays.clone(), None);
    let ends_sub = subscriber(grpc, "ends", ends.clone(), None);
    let _cut = subscriber(relay_addr, "cut", cut.clone(), None);
    for sink in [&stays, &ends, &cut] {
        sink.wait_version(&v1).await;
    }
    admin_until(&cp, "/proxies", |d| {
        ["stays", "ends", "cut"]
            .iter()
            .all(|n| proxy(d, n).is_some_and(|p| p["connected"] == true))
    })
    .await;

    ends_sub.shutdown().await;
    relaying.abort();
    let _ = relaying.await;
    let doc = admin_until(&cp, "/proxies", |d| {
        ["ends", "cut"]
            .iter()
            .all(|n| proxy(d, n).is_some_and(|p| p["connected"] == false))
    })
    .await;
    assert_eq!(proxy(&doc, "stays").unwrap()["connected"], true);
    let (_, metrics) = http_get(cp.admin_addr(), "/metrics").await;
    assert_eq!(metric(&metrics, "sluice_cp_connected_proxies"), 1.0);

    let mut versions = cp.watch_version();
    save(dir.path(), "a.yaml", &policy("a", 300));
    let v2 = next_version(&mut versions, &v1).await;
    stays.wait_version(&v2).await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_keeps_policy_while_control_plane_is_down_and_resyncs_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cp_state = tempfile::tempdir().unwrap();
    let proxy_state = tempfile::tempdir().unwrap();
    save(dir.path(), "a.yaml", &policy("a", 100));
    let cp = sluice_control_plane::start(cp_config(dir.path(), Some(cp_state.path())))
        .await
        .unwrap();
    let grpc = cp.grpc_addr();
    let v1 = cp.policy_version().unwrap();
    let sink = TestSink::new();
    let sub = subscriber(
        grpc,
        "one",
        sink.clone(),
        Some(proxy_state.path().to_path_buf()),
    );
    sink.wait_version(&v1).await;
    let mut status = sub.status();

    cp.shutdown().await;
    tokio::time::timeout(WAIT, status.wait_for(|s| !s.connected))
        .await
        .expect("subscriber never noticed the control plane was gone")
        .unwrap();
    assert_eq!(sink.version().as_deref(), Some(v1.as_str()));
    assert_eq!(
        sluice_api::load_saved(proxy_state.path()).unwrap().hash(),
        v1
    );

    // Edited while the control plane is down; the restarted one on the same
    // port (same state dir) brings the subscriber up to date.
    save(dir.path(), "a.yaml", &policy("a", 400));
    let cp = sluice_control_plane::start(ControlPlaneConfig {
        grpc_addr: grpc,
        ..cp_config(dir.path(), Some(cp_state.path()))
    })
    .await
    .unwrap();
    let v2 = cp.policy_version().unwrap();
    assert_ne!(v1, v2);
    sink.wait_version(&v2).await;
    // The status moves once the snapshot is also saved.
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.last_applied.as_deref() == Some(v2.as_str())),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        sluice_api::load_saved(proxy_state.path()).unwrap().hash(),
        v2
    );
    admin_until(&cp, "/proxies", |d| {
        proxy(d, "one").is_some_and(|p| p["acked_version"] == v2.as_str() && p["connected"] == true)
    })
    .await;
    assert!(sub.status().borrow().connects >= 2);
    sub.shutdown().await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_a_broken_file_serves_the_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    let cp_state = tempfile::tempdir().unwrap();
    save(dir.path(), "a.yaml", &policy("a", 100));
    save(dir.path(), "b.yaml", &policy("b", 100));
    let cp = sluice_control_plane::start(cp_config(dir.path(), Some(cp_state.path())))
        .await
        .unwrap();
    let v1 = cp.policy_version().unwrap();
    cp.shutdown().await;

    save(
        dir.path(),
        "a.yaml",
        "apiVersion: sluice.dev/v1alpha1\nkind: [\n",
    );
    let cp = sluice_control_plane::start(cp_config(dir.path(), Some(cp_state.path())))
        .await
        .unwrap();
    assert_eq!(cp.policy_version().as_deref(), Some(v1.as_str()));
    let doc = admin_json(&cp, "/policies").await;
    let a = &doc["files"][0];
    assert_eq!(a["file"], "a.yaml");
    assert_eq!(a["from_state"], true);
    assert!(a["error"].as_str().unwrap().starts_with("a.yaml:"), "{a}");
    assert_eq!(doc["policies"].as_array().unwrap().len(), 2);

    let sink = TestSink::new();
    let _s = subscriber(cp.grpc_addr(), "late", sink.clone(), None);
    sink.wait_version(&v1).await;
    let (status, _) = http_get(cp.admin_addr(), "/ready").await;
    assert_eq!(status, 200);
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap_is_picked_up() {
    // The layout kubelet maintains for a mounted ConfigMap.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::write(d.join("..v1/a.yaml"), policy("a", 100)).unwrap();
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/a.yaml", d.join("a.yaml")).unwrap();
    let cp = sluice_control_plane::start(cp_config(d, None))
        .await
        .unwrap();
    let v1 = cp.policy_version().unwrap();
    let doc = admin_json(&cp, "/policies").await;
    assert_eq!(doc["files"].as_array().unwrap().len(), 1);

    let mut versions = cp.watch_version();
    std::fs::create_dir(d.join("..v2")).unwrap();
    std::fs::write(d.join("..v2/a.yaml"), policy("a", 500)).unwrap();
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    let v2 = next_version(&mut versions, &v1).await;
    let sink = TestSink::new();
    let _s = subscriber(cp.grpc_addr(), "one", sink.clone(), None);
    sink.wait_version(&v2).await;
    let set = sink.set.load_full().unwrap();
    let limit = set.policies()[0]
        .spec
        .inbound
        .as_ref()
        .unwrap()
        .rate_limit
        .as_ref()
        .unwrap()
        .per_second;
    assert_eq!(limit, 500);
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addr_file_names_the_bound_ports() {
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("state/addrs.json");
    let cp = sluice_control_plane::start(ControlPlaneConfig {
        addr_file: Some(addr_file.clone()),
        ..cp_config(dir.path(), None)
    })
    .await
    .unwrap();
    let v: Value = serde_json::from_slice(&std::fs::read(&addr_file).unwrap()).unwrap();
    assert_eq!(v["grpc"], cp.grpc_addr().to_string());
    assert_eq!(v["admin"], cp.admin_addr().to_string());
    let (live, _) = http_get(cp.admin_addr(), "/live").await;
    assert_eq!(live, 200);
    cp.shutdown().await;
}

/// Opens a policy stream whose first message is `first` and returns how it was refused.
async fn refusal(
    cp: &RunningControlPlane,
    first: sluice_api::pb::proxy_message::Message,
) -> tonic::Status {
    use sluice_api::pb;
    let mut client = pb::policy_discovery_client::PolicyDiscoveryClient::connect(format!(
        "http://{}",
        cp.grpc_addr()
    ))
    .await
    .unwrap();
    let opening = pb::ProxyMessage {
        message: Some(first),
    };
    match client.stream_policies(tokio_stream::iter([opening])).await {
        Ok(_) => panic!("the stream was opened"),
        Err(status) => status,
    }
}

/// A stream opens with a `Hello` naming its proxy: one whose `Hello` names none, or
/// that opens with anything else, is refused with a status saying which, and no
/// proxy is recorded for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_a_named_hello_is_refused_and_says_why() {
    use sluice_api::pb::{self, proxy_message::Message};
    let (_dir, cp, _v1) = one_policy_control_plane().await;

    let unnamed = refusal(&cp, Message::Hello(pb::Hello::default())).await;
    assert_eq!(unnamed.code(), tonic::Code::InvalidArgument);
    assert_eq!(unnamed.message(), "Hello.node_id is empty");
    let ack_first = refusal(
        &cp,
        Message::Ack(pb::Ack {
            version: "v1".into(),
        }),
    )
    .await;
    assert_eq!(ack_first.code(), tonic::Code::InvalidArgument);
    assert_eq!(ack_first.message(), "the first message must be Hello");

    let listed = admin_json(&cp, "/proxies").await;
    assert_eq!(
        listed["proxies"].as_array().map(Vec::len),
        Some(0),
        "{listed:#}"
    );
    cp.shutdown().await;
}

/// A proxy's traffic reports are messages from it: `/proxies` shows it seen at the
/// latest report, while its ACK time stays that of its last ACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_is_a_sign_of_life_in_proxies() {
    use sluice_api::pb::{self, proxy_message::Message};
    let (_dir, cp, v1) = one_policy_control_plane().await;
    let mut client = pb::policy_discovery_client::PolicyDiscoveryClient::connect(format!(
        "http://{}",
        cp.grpc_addr()
    ))
    .await
    .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let say = |m: Message| pb::ProxyMessage { message: Some(m) };
    // It has the served version already, so nothing is sent and it acks nothing.
    tx.send(say(Message::Hello(pb::Hello {
        node_id: "reporter".into(),
        last_applied_version: v1.clone(),
        schema_version: 1,
        ..Default::default()
    })))
    .await
    .unwrap();
    let _stream = client
        .stream_policies(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    let hello = admin_until(&cp, "/proxies", |d| {
        proxy(d, "reporter").is_some_and(|p| p["connected"] == true)
    })
    .await;
    let hello = proxy(&hello, "reporter").unwrap().clone();
    let at_hello = hello["last_seen_unix_ms"].as_u64().unwrap();

    // Reports until one lands in a later millisecond than the Hello did.
    let deadline = tokio::time::Instant::now() + WAIT;
    let seen = loop {
        tx.send(say(Message::Report(pb::Report {
            seq: 1,
            ..Default::default()
        })))
        .await
        .unwrap();
        let doc = admin_json(&cp, "/proxies").await;
        let p = proxy(&doc, "reporter").unwrap().clone();
        if p["last_seen_unix_ms"].as_u64().unwrap() > at_hello {
            break p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reports never moved last_seen past the Hello's {at_hello}: {p:#}"
        );
        tokio::task::yield_now().await;
    };
    assert_eq!(seen["acked_at_unix_ms"], hello["acked_at_unix_ms"]);
    assert_eq!(seen["acked_version"], v1.as_str());
    cp.shutdown().await;
}
