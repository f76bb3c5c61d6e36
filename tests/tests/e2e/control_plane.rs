//! Policies through the control plane: edits reach every subscribed proxy and are
//! enforced, broken edits stop at the control plane, snapshots a proxy cannot accept
//! are NACKed, and an outage of the control plane leaves traffic governed by the
//! last policy.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt, stream};
use hyper::StatusCode;
use sluice_api::pb;
use sluice_api::pb::policy_discovery_server::{PolicyDiscovery, PolicyDiscoveryServer};
use sluice_config::{PolicySet, SCHEMA_VERSION, parse_policies};
use sluice_e2e::{
    HttpConn, ProxyOptions, TestControlPlane, TestProxy, Upstream, WAIT, single_backend_policy,
    wait_until,
};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

const FILE: &str = "svc.yaml";

/// The upstream (its `x-upstream` name) a GET for host `svc` reaches through `proxy`.
async fn reached(proxy: &TestProxy) -> String {
    let mut conn = HttpConn::h1(proxy.outbound_addr())
        .await
        .expect("connect to the proxy");
    let r = conn
        .get("svc", "/work")
        .await
        .expect("request through proxy");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.header("x-upstream").to_string()
}

fn state_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("sluice-e2e-state-")
        .tempdir()
        .expect("temporary directory")
}

async fn subscribed(cp: &TestControlPlane, node: &str, dir: &Path) -> TestProxy {
    TestProxy::start_subscribed(&cp.url(), node, dir, ProxyOptions::default()).await
}

/// Waits until the control plane serves a version other than `old`, and returns it.
async fn wait_published(cp: &TestControlPlane, old: &str) -> String {
    wait_until(
        "the control plane publishes the edit",
        WAIT,
        || async move { cp.version().is_some_and(|v| v != old) },
    )
    .await;
    cp.version().expect("a version is served")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_reaches_every_proxy_and_is_enforced() {
    let blue = Upstream::auto("blue").await;
    let green = Upstream::auto("green").await;
    let cp =
        TestControlPlane::start(&[(FILE, &single_backend_policy("svc", "svc", blue.addr()))]).await;
    let v1 = cp.version().expect("the first load is published");
    let (da, db) = (state_dir(), state_dir());
    let a = subscribed(&cp, "proxy-a", da.path()).await;
    let b = subscribed(&cp, "proxy-b", db.path()).await;
    cp.wait_acked_everywhere(&v1, 2).await;
    for p in [&a, &b] {
        assert_eq!(reached(p).await, "blue");
        let config = p.admin_json("/config").await;
        assert_eq!(config["version"], v1.as_str());
        assert_eq!(config["source"], cp.url().as_str());
    }

    cp.write_policy(FILE, &single_backend_policy("svc", "svc", green.addr()));
    let v2 = wait_published(&cp, &v1).await;
    cp.wait_acked_everywhere(&v2, 2).await;
    for p in [&a, &b] {
        assert_eq!(p.version().await.as_deref(), Some(v2.as_str()));
        assert_eq!(reached(p).await, "green");
    }
    // The snapshot was saved where a restarting proxy reads it.
    for d in [&da, &db] {
        assert!(d.path().join("policy-snapshot.yaml").is_file());
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_edit_is_refused_at_the_control_plane_and_never_reaches_a_proxy() {
    let blue = Upstream::auto("blue").await;
    let green = Upstream::auto("green").await;
    let cp =
        TestControlPlane::start(&[(FILE, &single_backend_policy("svc", "svc", blue.addr()))]).await;
    let v1 = cp.version().expect("the first load is published");
    let (da, db) = (state_dir(), state_dir());
    let a = subscribed(&cp, "proxy-a", da.path()).await;
    let b = subscribed(&cp, "proxy-b", db.path()).await;
    cp.wait_acked_everywhere(&v1, 2).await;

    // Points at green, but with a backend name the route's split does not know.
    let broken = single_backend_policy("svc", "svc", green.addr()).replace(
        "    - name: all\n",
        "    - name: all\n      split:\n        - weights: { nowhere: 100 }\n",
    );
    cp.write_policy(FILE, &broken);
    let cpr = &cp;
    wait_until("/policies shows the file's error", WAIT, || async move {
        let v = cpr.admin_json("/policies").await;
        v["files"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| f["file"].as_str().is_some_and(|n| n.ends_with(FILE)) && !f["error"].is_null())
    })
    .await;
    let policies = cp.admin_json("/policies").await;
    let error = policies["files"][0]["error"].to_string();
    assert!(error.contains(FILE) && error.contains("nowhere"), "{error}");
    assert_eq!(cp.version().as_deref(), Some(v1.as_str()));

    let proxies = cp.admin_json("/proxies").await;
    for p in proxies["proxies"].as_array().expect("proxies list") {
        assert_eq!(p["version_sent"], v1.as_str(), "{p}");
        assert_eq!(p["acked_version"], v1.as_str(), "{p}");
        assert!(p["nacked_version"].is_null(), "{p}");
    }
    for p in [&a, &b] {
        let config = p.admin_json("/config").await;
        assert_eq!(config["version"], v1.as_str());
        assert!(config["last_rejected"].is_null(), "{config}");
        assert_eq!(reached(p).await, "blue");
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A policy file added for a host another file governs is refused at the control
/// plane, even when its name sorts first and across a control-plane restart: the
/// proxies keep the policy in force and never see the newcomer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_added_for_a_governed_host_is_refused_and_the_policy_in_force_stays() {
    let blue = Upstream::auto("blue").await;
    let green = Upstream::auto("green").await;
    let mut cp =
        TestControlPlane::start(&[(FILE, &single_backend_policy("svc", "svc", blue.addr()))]).await;
    let v1 = cp.version().expect("the first load is published");
    let da = state_dir();
    let a = subscribed(&cp, "proxy-a", da.path()).await;
    cp.wait_acked_everywhere(&v1, 1).await;

    // "a-copy.yaml" sorts before "svc.yaml".
    cp.write_policy(
        "a-copy.yaml",
        &single_backend_policy("svc-copy", "svc", green.addr()),
    );
    let cpr = &cp;
    let error_of_copy = || async move {
        let v = cpr.admin_json("/policies").await;
        v["files"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["file"] == "a-copy.yaml")
            .and_then(|f| f["error"].as_str().map(str::to_string))
    };
    wait_until("/policies shows the newcomer refused", WAIT, || async {
        error_of_copy().await.is_some()
    })
    .await;
    assert_eq!(
        error_of_copy().await.as_deref(),
        Some("host \"svc\" is also governed by a policy in svc.yaml")
    );
    assert_eq!(cp.version().as_deref(), Some(v1.as_str()));
    assert_eq!(reached(&a).await, "blue");

    cp.restart().await;
    assert_eq!(cp.version().as_deref(), Some(v1.as_str()));
    cp.wait_acked_everywhere(&v1, 1).await;
    assert_eq!(reached(&a).await, "blue");
    a.shutdown().await;
}

/// A stand-in control plane speaking the real policy stream: it sends every proxy
/// the given snapshots in order and records what each proxy answers. The real
/// control plane validates with the same `sluice-config` as the proxy, so a snapshot
/// the proxy refuses can only come from another build; this plays that build.
struct StubControlPlane {
    url: String,
    replies: Arc<Mutex<Vec<pb::ProxyMessage>>>,
    _shutdown: oneshot::Sender<()>,
}

struct StubService {
    snapshots: Vec<pb::Snapshot>,
    replies: Arc<Mutex<Vec<pb::ProxyMessage>>>,
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::Snapshot, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyDiscovery for StubService {
    type StreamPoliciesStream = SnapshotStream;

    async fn stream_policies(
        &self,
        req: Request<Streaming<pb::ProxyMessage>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let mut inbound = req.into_inner();
        let replies = self.replies.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                replies.lock().expect("replies lock").push(m);
            }
        });
        let out = stream::iter(self.snapshots.clone().into_iter().map(Ok)).chain(stream::pending());
        Ok(Response::new(Box::pin(out)))
    }
}

impl StubControlPlane {
    async fn start(snapshots: Vec<pb::Snapshot>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stub");
        let addr = listener.local_addr().expect("stub address");
        let replies = Arc::new(Mutex::new(Vec::new()));
        let service = StubService {
            snapshots,
            replies: replies.clone(),
        };
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(PolicyDiscoveryServer::new(service))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = rx.await;
                })
                .await;
        });
        Self {
            url: format!("http://{addr}"),
            replies,
            _shutdown: tx,
        }
    }

    /// Whether a proxy answered with an ACK of `version` (`Some(None)`) or a NACK
    /// of it (`Some(Some(reason))`).
    fn answer(&self, version: &str) -> Option<Option<String>> {
        use pb::proxy_message::Message;
        self.replies
            .lock()
            .expect("replies lock")
            .iter()
            .find_map(|m| match &m.message {
                Some(Message::Ack(a)) if a.version == version => Some(None),
                Some(Message::Nack(n)) if n.version == version => Some(Some(n.error.clone())),
                _ => None,
            })
    }
}

fn snapshot_of(version: &str, schema_version: u32, yaml: &str) -> pb::Snapshot {
    pb::Snapshot {
        version: version.into(),
        schema_version,
        canonical: yaml.as_bytes().to_vec().into(),
        policies: Vec::new(),
        route_traffic: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_a_proxy_refuses_is_nacked_and_the_last_policy_stays() {
    let blue = Upstream::auto("blue").await;
    let good_yaml = single_backend_policy("svc", "svc", blue.addr());
    let good =
        PolicySet::new(parse_policies("svc.yaml", &good_yaml).expect("valid")).expect("valid set");
    let v1 = good.hash().to_string();
    // A field from a newer schema, and a newer schema version outright.
    let unknown = good_yaml.replace(
        "  host: svc\n",
        "  host: svc\n  mirror: { backend: only }\n",
    );
    let stub = StubControlPlane::start(vec![
        snapshot_of(
            &v1,
            SCHEMA_VERSION,
            &String::from_utf8_lossy(good.canonical_bytes()),
        ),
        snapshot_of("v-unknown-field", SCHEMA_VERSION, &unknown),
        snapshot_of("v-next-schema", SCHEMA_VERSION + 1, &good_yaml),
    ])
    .await;
    let dir = state_dir();
    let proxy =
        TestProxy::start_subscribed(&stub.url, "proxy-a", dir.path(), ProxyOptions::default())
            .await;
    let stub_ref = &stub;
    wait_until("the proxy answered every snapshot", WAIT, || async move {
        ["v-unknown-field", "v-next-schema"]
            .iter()
            .all(|v| stub_ref.answer(v).is_some())
    })
    .await;
    assert_eq!(stub.answer(&v1), Some(None), "the good snapshot is ACKed");
    let why = stub.answer("v-unknown-field").flatten().expect("NACKed");
    assert!(why.contains("mirror"), "{why}");
    let why = stub.answer("v-next-schema").flatten().expect("NACKed");
    assert!(why.contains("schema version"), "{why}");

    let config = proxy.admin_json("/config").await;
    assert_eq!(config["version"], v1.as_str());
    let rejected = config["last_rejected"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(rejected.contains("v-next-schema"), "{config}");
    assert_eq!(reached(&proxy).await, "blue");
    proxy.shutdown().await;
}

#[derive(Default)]
struct Tally {
    done: AtomicU64,
    failed: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_outage_keeps_the_last_policy_and_a_restart_resynchronises() {
    let blue = Upstream::auto("blue").await;
    let green = Upstream::auto("green").await;
    let mut cp =
        TestControlPlane::start(&[(FILE, &single_backend_policy("svc", "svc", blue.addr()))]).await;
    let v1 = cp.version().expect("the first load is published");
    let (da, db) = (state_dir(), state_dir());
    let a = subscribed(&cp, "proxy-a", da.path()).await;
    let b = subscribed(&cp, "proxy-b", db.path()).await;
    cp.wait_acked_everywhere(&v1, 2).await;

    // One client loops through proxy b for the whole outage and restart.
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (tally, stop) = (tally.clone(), stop.clone());
        let addr = b.outbound_addr();
        tokio::spawn(async move {
            let mut conn = HttpConn::h1(addr).await.expect("connect");
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match conn.get("svc", "/work").await {
                    Ok(r) if r.status == StatusCode::OK => {}
                    Ok(r) => {
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                        errors.push(format!("{} {}", r.status, r.text()));
                    }
                    Err(e) => {
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                        errors.push(e.to_string());
                        conn = HttpConn::h1(addr).await.expect("reconnect");
                    }
                }
                tally.done.fetch_add(1, Ordering::SeqCst);
            }
            errors
        })
    };
    let done_after = |n: u64| {
        let tally = tally.clone();
        async move {
            let target = tally.done.load(Ordering::SeqCst) + n;
            wait_until("the client loop makes progress", WAIT, || {
                let tally = tally.clone();
                async move { tally.done.load(Ordering::SeqCst) >= target }
            })
            .await;
        }
    };
    done_after(50).await;

    cp.stop().await;
    done_after(200).await;
    assert_eq!(b.version().await.as_deref(), Some(v1.as_str()));
    assert_eq!(reached(&b).await, "blue");

    // A proxy restarted while the control plane is away serves its saved snapshot.
    a.shutdown().await;
    let a = subscribed(&cp, "proxy-a", da.path()).await;
    let config = a.admin_json("/config").await;
    assert_eq!(config["version"], v1.as_str());
    assert_eq!(config["source"], "saved");
    assert_eq!(reached(&a).await, "blue");

    // An edit made during the outage is what the restarted control plane serves.
    cp.write_policy(FILE, &single_backend_policy("svc", "svc", green.addr()));
    cp.restart().await;
    let v2 = wait_published(&cp, &v1).await;
    cp.wait_acked_everywhere(&v2, 2).await;
    for p in [&a, &b] {
        assert_eq!(p.version().await.as_deref(), Some(v2.as_str()));
        assert_eq!(reached(p).await, "green");
    }
    done_after(50).await;

    stop.store(true, Ordering::SeqCst);
    let errors = client.await.expect("client task");
    assert_eq!(
        tally.failed.load(Ordering::SeqCst),
        0,
        "failed requests: {errors:?}"
    );
    assert!(tally.done.load(Ordering::SeqCst) >= 300);
    a.shutdown().await;
    b.shutdown().await;
}

/// A policy for `svc` whose route carries `route` (governance lines, six spaces in).
fn governed_policy(backend: std::net::SocketAddr, route: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: svc, namespace: e2e }}
spec:
  host: svc
  backends:
    only: {{ addresses: ["{backend}"] }}
  routes:
    - name: all
{route}"#
    )
}

/// The version of `file` the control plane last read (its bytes' hash).
async fn file_version(cp: &TestControlPlane, file: &str) -> Option<String> {
    let policies = cp.admin_json("/policies").await;
    policies["files"]
        .as_array()?
        .iter()
        .find(|f| f["file"] == file)
        .and_then(|f| f["version"].as_str().map(str::to_string))
}

/// Writing out values equal to their defaults is no edit: the control plane reads the
/// changed file, serves the same version, sends no proxy anything new, and
/// `sluicectl diff` finds the file the same as what it serves. A real edit still goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_that_writes_defaults_pushes_no_new_version() {
    let blue = Upstream::auto("blue").await;
    let terse = governed_policy(
        blue.addr(),
        "      circuitBreaker: { consecutiveFailures: 3 }\n      retry: { attempts: 1 }\n",
    );
    let cp = TestControlPlane::start(&[(FILE, &terse)]).await;
    let v1 = cp.version().expect("the first load is published");
    let dir = state_dir();
    let proxy = subscribed(&cp, "proxy-a", dir.path()).await;
    cp.wait_acked_everywhere(&v1, 1).await;
    let read_before = file_version(&cp, FILE).await.expect("the file is listed");

    let spelled_out = governed_policy(
        blue.addr(),
        "      accessLog: false
      circuitBreaker:
        consecutiveFailures: 3
        openFor: 5s
        maxOpenFor: 1m
        halfOpenRequests: 1
        failureOn: [connect-failure, timeout, 5xx]
      retry:
        attempts: 1
        maxReplayBytes: 65536
        backoff: { base: 25ms, max: 250ms }
        budget: { ratio: 0.2, minPerSecond: 10, window: 10s }
",
    )
    .replace("namespace: e2e", "namespace: e2e, labels: {}")
    .replace("addresses: [", "slowStart: 10s, addresses: [");
    cp.write_policy(FILE, &spelled_out);
    let (cpr, before) = (&cp, &read_before);
    wait_until(
        "the control plane reads the edited file",
        WAIT,
        || async move { file_version(cpr, FILE).await.is_some_and(|v| v != *before) },
    )
    .await;
    assert_eq!(
        cp.version().as_deref(),
        Some(v1.as_str()),
        "same version served"
    );
    let proxies = cp.admin_json("/proxies").await;
    let rows = proxies["proxies"].as_array().expect("proxies list");
    assert_eq!(rows.len(), 1, "{proxies:#}");
    assert_eq!(rows[0]["version_sent"], v1.as_str(), "nothing new was sent");
    assert_eq!(rows[0]["acked_version"], v1.as_str());
    assert_eq!(proxy.version().await.as_deref(), Some(v1.as_str()));

    // `sluicectl diff`'s comparison: the spelled-out file against what is served.
    let served = cp.admin_json("/served").await;
    assert_eq!(served["hash"], v1.as_str(), "{served:#}");
    let served = PolicySet::from_canonical(
        "control plane",
        served["policies"]
            .as_str()
            .expect("served policies")
            .as_bytes(),
    )
    .expect("the served policies validate");
    let files = PolicySet::from_files([(FILE, spelled_out.as_str())]).expect("the file validates");
    assert_eq!(files.hash(), served.hash());
    let compared = sluicectl::cmd::diff::compare(&files, &served);
    assert_eq!(
        compared.iter().map(|c| c.state).collect::<Vec<_>>(),
        ["same"],
        "{compared:?}"
    );

    // A value other than the default is an edit, and reaches the proxy.
    cp.write_policy(FILE, &spelled_out.replace("openFor: 5s", "openFor: 6s"));
    let v2 = wait_published(&cp, &v1).await;
    cp.wait_acked_everywhere(&v2, 1).await;
    assert_eq!(proxy.version().await.as_deref(), Some(v2.as_str()));
    proxy.shutdown().await;
}

/// `sluicectl -o json status` against `cp`: its answer and whether it exited 0.
fn sluicectl_status(cp: &TestControlPlane) -> (serde_json::Value, bool) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-sluicectl"))
        .env_remove("SLUICECTL_CONTROL_PLANE")
        .env_remove("SLUICECTL_PROXY")
        .env_remove("SLUICECTL_TOKEN_FILE")
        .args(["--control-plane", &format!("http://{}", cp.admin_addr())])
        .args(["-o", "json", "status"])
        .output()
        .expect("run sluicectl");
    let answer = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (answer, out.status.success())
}

/// Two proxies started with one `--node-id` are two rows of `/proxies` and of
/// `sluicectl status`, each flagged, each with its own peer; the one that goes takes
/// only its own row with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_sharing_a_node_id_are_listed_apart() {
    let blue = Upstream::auto("blue").await;
    let cp =
        TestControlPlane::start(&[(FILE, &single_backend_policy("svc", "svc", blue.addr()))]).await;
    let v1 = cp.version().expect("the first load is published");
    let (da, db) = (state_dir(), state_dir());
    let a = subscribed(&cp, "twin", da.path()).await;
    let b = subscribed(&cp, "twin", db.path()).await;
    cp.wait_acked_everywhere(&v1, 2).await;

    let proxies = cp.admin_json("/proxies").await;
    let rows = proxies["proxies"].as_array().expect("proxies list");
    assert_eq!(rows.len(), 2, "{proxies:#}");
    for r in rows {
        assert_eq!(r["node_id"], "twin");
        assert_eq!(r["connected"], true);
        assert_eq!(r["duplicate_node_id"], true, "{proxies:#}");
        assert_eq!(r["acked_version"], v1.as_str());
    }
    assert_ne!(rows[0]["peer"], rows[1]["peer"], "{proxies:#}");
    assert_ne!(rows[0]["stream"], rows[1]["stream"]);

    let (status, ok) = sluicectl_status(&cp);
    let listed = status["proxies"].as_array().expect("status rows");
    assert_eq!(listed.len(), 2, "{status:#}");
    assert!(
        listed
            .iter()
            .all(|r| r["duplicate_node_id"] == true && r["state"] == "in-sync")
    );
    assert!(ok, "both are in sync: {status:#}");

    // The second one goes: the first keeps its row, no longer a duplicate.
    b.shutdown().await;
    let cpr = &cp;
    wait_until("the second proxy's row is gone", WAIT, || async move {
        let proxies = cpr.admin_json("/proxies").await;
        proxies["proxies"].as_array().is_some_and(|r| r.len() == 1)
    })
    .await;
    let proxies = cp.admin_json("/proxies").await;
    let row = &proxies["proxies"][0];
    assert_eq!(row["connected"], true, "{proxies:#}");
    assert_eq!(row["duplicate_node_id"], false);
    assert_eq!(row["acked_version"], v1.as_str());
    a.shutdown().await;
}
