//! The subscriber against a scripted policy server on a loopback port: it sends
//! exactly the snapshots a test needs, including ones the real control plane
//! never would (unknown fields, another schema version).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_api::pb;
use sluice_api::pb::policy_discovery_server::{PolicyDiscovery, PolicyDiscoveryServer};
use sluice_api::{Backoff, SnapshotSink, Subscriber, SubscriberConfig};
use sluice_config::{PolicySet, SCHEMA_VERSION};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const WAIT: Duration = Duration::from_secs(20);

const POLICY: &str = "apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: a, namespace: shop }
spec:
  host: a
  inbound: { rateLimit: { perSecond: 100, burst: 10 } }
";

/// What the scripted server saw on one stream.
#[derive(Debug)]
enum Seen {
    Hello(pb::Hello),
    Answer(pb::proxy_message::Message),
    Closed,
}

/// Sends the given snapshots on every stream and reports what comes back.
#[derive(Clone)]
struct ScriptedServer {
    snapshots: Vec<pb::Snapshot>,
    seen: mpsc::UnboundedSender<Seen>,
}

#[tonic::async_trait]
impl PolicyDiscovery for ScriptedServer {
    type StreamPoliciesStream = ReceiverStream<Result<pb::Snapshot, Status>>;

    async fn stream_policies(
        &self,
        request: Request<Streaming<pb::ProxyMessage>>,
    ) -> Result<Response<Self::StreamPoliciesStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let script = self.clone();
        tokio::spawn(async move {
            let mut sent = false;
            loop {
                match inbound.message().await {
                    Ok(Some(pb::ProxyMessage { message: Some(m) })) => {
                        let seen = match m {
                            pb::proxy_message::Message::Hello(h) => Seen::Hello(h),
                            other => Seen::Answer(other),
                        };
                        let _ = script.seen.send(seen);
                    }
                    _ => {
                        let _ = script.seen.send(Seen::Closed);
                        return;
                    }
                }
                if !sent {
                    sent = true;
                    for s in &script.snapshots {
                        let _ = tx.send(Ok(s.clone())).await;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn serve(snapshots: Vec<pb::Snapshot>) -> (String, mpsc::UnboundedReceiver<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (seen, rx) = mpsc::unbounded_channel();
    let svc = PolicyDiscoveryServer::new(ScriptedServer { snapshots, seen });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (url, rx)
}

#[derive(Default)]
struct Sink(Mutex<Option<PolicySet>>, Mutex<Vec<String>>);

impl SnapshotSink for Sink {
    fn apply(&self, set: PolicySet) -> Result<bool, String> {
        let mut cur = self.0.lock().unwrap();
        let changed = cur.as_ref().map(|c| c.hash()) != Some(set.hash());
        *cur = Some(set);
        Ok(changed)
    }

    fn current_version(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| s.hash().to_string())
    }

    fn rejected(&self, version: &str, _error: &str) {
        self.1.lock().unwrap().push(version.to_string());
    }
}

fn snapshot(version: &str, canonical: &[u8]) -> pb::Snapshot {
    pb::Snapshot {
        version: version.into(),
        schema_version: SCHEMA_VERSION,
        canonical: canonical.to_vec().into(),
        policies: Vec::new(),
        route_traffic: None,
    }
}

fn good_set() -> PolicySet {
    PolicySet::new(sluice_config::parse_policies("a.yaml", POLICY).unwrap()).unwrap()
}

fn config(url: &str, state_dir: Option<&std::path::Path>) -> SubscriberConfig {
    let mut cfg = SubscriberConfig::new(url, "node-1");
    cfg.service = "a".into();
    cfg.state_dir = state_dir.map(|p| p.to_path_buf());
    cfg.backoff = Backoff {
        min: Duration::from_millis(20),
        max: Duration::from_millis(200),
        jitter: false,
    };
    cfg
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("nothing seen in time")
        .expect("server gone")
}

async fn next_answer(rx: &mut mpsc::UnboundedReceiver<Seen>) -> pb::proxy_message::Message {
    loop {
        if let Seen::Answer(m) = next(rx).await {
            return m;
        }
    }
}

#[tokio::test]
async fn unknown_field_is_nacked_with_the_validator_message_then_good_one_acked() {
    let good = good_set();
    let unknown = POLICY.replace("  host: a\n", "  host: a\n  futureField: 1\n");
    let (url, mut seen) = serve(vec![
        snapshot("v-unknown", unknown.as_bytes()),
        snapshot(good.hash(), good.canonical_bytes()),
    ])
    .await;
    let sink = Arc::new(Sink::default());
    let sub = Subscriber::spawn(config(&url, None), sink.clone()).unwrap();

    let Seen::Hello(hello) = next(&mut seen).await else {
        panic!("the first message must be Hello")
    };
    assert_eq!(hello.node_id, "node-1");
    assert_eq!(hello.schema_version, SCHEMA_VERSION);
    assert!(hello.last_applied_version.is_empty());

    match next_answer(&mut seen).await {
        pb::proxy_message::Message::Nack(n) => {
            assert_eq!(n.version, "v-unknown");
            assert!(n.error.contains("futureField"), "{}", n.error);
            assert!(n.error.starts_with("snapshot v-unknown:"), "{}", n.error);
        }
        other => panic!("expected NACK, got {other:?}"),
    }
    match next_answer(&mut seen).await {
        pb::proxy_message::Message::Ack(a) => assert_eq!(a.version, good.hash()),
        other => panic!("expected ACK, got {other:?}"),
    }
    assert_eq!(sink.current_version().as_deref(), Some(good.hash()));
    assert_eq!(*sink.1.lock().unwrap(), ["v-unknown"]);
    let status = sub.status().borrow().clone();
    assert!(status.connected);
    assert_eq!(status.connects, 1);
    assert_eq!(status.last_rejected.unwrap().version, "v-unknown");

    // Dropping the handle ends the task, and with it the stream.
    drop(sub);
    loop {
        if let Seen::Closed = next(&mut seen).await {
            break;
        }
    }
}

#[tokio::test]
async fn other_schema_version_is_nacked() {
    let good = good_set();
    let mut s = snapshot(good.hash(), good.canonical_bytes());
    s.schema_version = SCHEMA_VERSION + 1;
    let (url, mut seen) = serve(vec![s]).await;
    let sink = Arc::new(Sink::default());
    let _sub = Subscriber::spawn(config(&url, None), sink.clone()).unwrap();
    match next_answer(&mut seen).await {
        pb::proxy_message::Message::Nack(n) => {
            assert!(n.error.contains("schema version"), "{}", n.error)
        }
        other => panic!("expected NACK, got {other:?}"),
    }
    assert!(sink.current_version().is_none());
}

#[tokio::test]
async fn applied_snapshot_is_saved_and_a_restart_starts_from_it() {
    let state = tempfile::tempdir().unwrap();
    assert!(sluice_api::load_saved(state.path()).is_none());
    let good = good_set();
    let (url, mut seen) = serve(vec![snapshot(good.hash(), good.canonical_bytes())]).await;
    let sub =
        Subscriber::spawn(config(&url, Some(state.path())), Arc::new(Sink::default())).unwrap();
    assert!(matches!(
        next_answer(&mut seen).await,
        pb::proxy_message::Message::Ack(_)
    ));
    sub.shutdown().await;

    // A restarting proxy loads its last snapshot before the control plane
    // answers, and says so in Hello.
    let saved = sluice_api::load_saved(state.path()).expect("snapshot saved");
    assert_eq!(saved, good);
    let sink = Arc::new(Sink::default());
    sink.apply(saved).unwrap();
    let _sub = Subscriber::spawn(config(&url, Some(state.path())), sink).unwrap();
    loop {
        if let Seen::Hello(h) = next(&mut seen).await {
            assert_eq!(h.last_applied_version, good.hash());
            break;
        }
    }
}

#[tokio::test]
async fn unreachable_control_plane_is_retried_and_reported() {
    // A port with nothing listening: bind, note it, close.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let sub = Subscriber::spawn(
        config(&format!("http://{addr}"), None),
        Arc::new(Sink::default()),
    )
    .unwrap();
    let mut status = sub.status();
    tokio::time::timeout(WAIT, status.wait_for(|s| s.last_error.is_some()))
        .await
        .unwrap()
        .unwrap();
    let s = status.borrow().clone();
    assert!(!s.connected);
    let error = s.last_error.unwrap();
    assert!(error.starts_with("connect:"), "{error}");
    // The whole chain of causes, down to the socket's.
    assert!(error.contains("refused"), "{error}");
}

/// `shutdown` returns once the task has ended (its status sender is gone).
#[tokio::test]
async fn shutdown_waits_for_the_task() {
    let good = good_set();
    let (url, mut seen) = serve(vec![snapshot(good.hash(), good.canonical_bytes())]).await;
    let sub = Subscriber::spawn(config(&url, None), Arc::new(Sink::default())).unwrap();
    next_answer(&mut seen).await;
    let status = sub.status();
    sub.shutdown().await;
    assert!(status.has_changed().is_err(), "the task still runs");
}

/// A snapshot stamped with exactly the schema version its policies need is applied;
/// one with a version but no policies is a policy set too (an empty one), answered
/// like any other, not taken for the per-route traffic counts.
#[tokio::test]
async fn a_snapshot_at_its_own_schema_version_and_an_empty_one_are_answered() {
    let good = good_set();
    let mut exact = snapshot(good.hash(), good.canonical_bytes());
    exact.schema_version = good.schema_version();
    let empty = snapshot("v-empty", b"");
    let (url, mut seen) = serve(vec![exact, empty]).await;
    let sink = Arc::new(Sink::default());
    let _sub = Subscriber::spawn(config(&url, None), sink.clone()).unwrap();
    match next_answer(&mut seen).await {
        pb::proxy_message::Message::Ack(a) => assert_eq!(a.version, good.hash()),
        other => panic!("expected ACK, got {other:?}"),
    }
    let version = match next_answer(&mut seen).await {
        pb::proxy_message::Message::Ack(a) => a.version,
        pb::proxy_message::Message::Nack(n) => n.version,
        other => panic!("expected an answer, got {other:?}"),
    };
    assert_eq!(version, "v-empty");
}

/// Applies every set but panics while taking the first, as a bug in compiling one
/// policy would.
#[derive(Default)]
struct PanicsOnce {
    taken: std::sync::atomic::AtomicUsize,
    inner: Sink,
}

impl SnapshotSink for PanicsOnce {
    fn apply(&self, set: PolicySet) -> Result<bool, String> {
        if self.taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            panic!("a bug while compiling {}", set.hash());
        }
        self.inner.apply(set)
    }

    fn current_version(&self) -> Option<String> {
        self.inner.current_version()
    }

    fn rejected(&self, version: &str, error: &str) {
        self.inner.rejected(version, error)
    }
}

/// A panic while taking one snapshot NACKs that snapshot with the panic's message and
/// keeps the stream: the next push is still taken.
#[tokio::test]
async fn a_panic_while_taking_a_snapshot_nacks_it_and_the_next_one_is_taken() {
    let first = good_set();
    let second = PolicySet::new(
        sluice_config::parse_policies("a.yaml", &POLICY.replace("burst: 10", "burst: 20")).unwrap(),
    )
    .unwrap();
    let (url, mut seen) = serve(vec![
        snapshot(first.hash(), first.canonical_bytes()),
        snapshot(second.hash(), second.canonical_bytes()),
    ])
    .await;
    let sink = Arc::new(PanicsOnce::default());
    let sub = Subscriber::spawn(config(&url, None), sink.clone()).unwrap();
    match next_answer(&mut seen).await {
        pb::proxy_message::Message::Nack(n) => {
            assert_eq!(n.version, first.hash());
            assert_eq!(
                n.error,
                format!(
                    "snapshot {0}: the proxy failed while taking this content (a bug while compiling {0}); the policy in force keeps serving",
                    first.hash()
                )
            );
        }
        other => panic!("expected NACK, got {other:?}"),
    }
    match next_answer(&mut seen).await {
        pb::proxy_message::Message::Ack(a) => assert_eq!(a.version, second.hash()),
        other => panic!("expected ACK, got {other:?}"),
    }
    assert_eq!(sink.current_version().as_deref(), Some(second.hash()));
    assert_eq!(*sink.inner.1.lock().unwrap(), [first.hash()]);
    let status = sub.status().borrow().clone();
    assert_eq!(status.connects, 1, "the stream was kept");
    assert_eq!(status.last_applied.as_deref(), Some(second.hash()));
}

/// Holds `apply` until the test lets it go: a sink as slow as compiling a large set.
struct Held {
    started: mpsc::UnboundedSender<()>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
    inner: Sink,
}

impl SnapshotSink for Held {
    fn apply(&self, set: PolicySet) -> Result<bool, String> {
        let _ = self.started.send(());
        // Run on the runtime's only thread, this would wait out WAIT: the test's task,
        // which lets it go, could not run meanwhile.
        self.release
            .lock()
            .unwrap()
            .recv_timeout(WAIT)
            .map_err(|_| "apply held the runtime's thread".to_string())?;
        self.inner.apply(set)
    }

    fn current_version(&self) -> Option<String> {
        self.inner.current_version()
    }
}

/// Taking a snapshot runs off the runtime's threads: on a one-thread runtime (a proxy
/// with one worker, which serves every connection on it) other tasks run while a slow
/// apply is under way.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_apply_leaves_the_runtime_free() {
    let good = good_set();
    let (url, mut seen) = serve(vec![snapshot(good.hash(), good.canonical_bytes())]).await;
    let (started, mut started_rx) = mpsc::unbounded_channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let sink = Arc::new(Held {
        started,
        release: Mutex::new(release_rx),
        inner: Sink::default(),
    });
    let _sub = Subscriber::spawn(config(&url, None), sink.clone()).unwrap();
    tokio::time::timeout(WAIT, started_rx.recv())
        .await
        .expect("apply started")
        .unwrap();
    // This task runs while apply waits: the runtime's thread is free.
    release.send(()).unwrap();
    match next_answer(&mut seen).await {
        pb::proxy_message::Message::Ack(a) => assert_eq!(a.version, good.hash()),
        other => panic!("expected ACK, got {other:?}"),
    }
    assert_eq!(sink.current_version().as_deref(), Some(good.hash()));
}
