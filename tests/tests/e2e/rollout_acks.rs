//! Whose acks a rollout step waits for, and who is named left out: a proxy that
//! disconnects (or is dropped as hung) before acking a step is named, with why.

use sluice_api::pb::{self, proxy_message::Message};
use sluice_e2e::WAIT;
use sluice_e2e::rollout::RolloutMesh;

/// A block held at its first step: the interval is long.
fn block(steps: &str) -> String {
    format!(
        "            canary: v2
            steps: {steps}
            interval: 10m
            minRequests: 1
"
    )
}

/// A proxy stand-in that says `Hello` and never acks what it is sent, as a hung
/// proxy does; dropping it closes its stream, as the keepalive does to a hung proxy.
struct SilentProxy {
    _say: tokio::sync::mpsc::Sender<pb::ProxyMessage>,
    answers: tonic::Streaming<pb::Snapshot>,
}

impl SilentProxy {
    async fn connect(cp_url: &str, node: &str) -> Self {
        let mut client =
            pb::policy_discovery_client::PolicyDiscoveryClient::connect(cp_url.to_string())
                .await
                .expect("connect to the control plane's gRPC port");
        let (say, rx) = tokio::sync::mpsc::channel(4);
        say.send(pb::ProxyMessage {
            message: Some(Message::Hello(pb::Hello {
                node_id: node.into(),
                namespace: "e2e".into(),
                service: "silent".into(),
                schema_version: 1,
                accepted_schema_versions: sluice_config::SCHEMA_VERSIONS.to_vec(),
                ..Default::default()
            })),
        })
        .await
        .expect("queue the Hello");
        let answers = tokio::time::timeout(
            WAIT,
            client.stream_policies(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .expect("the stream opens in time")
        .expect("the stream opens")
        .into_inner();
        Self { _say: say, answers }
    }

    /// The next snapshot the control plane sends it.
    async fn next_snapshot(&mut self) -> pb::Snapshot {
        tokio::time::timeout(WAIT, self.answers.message())
            .await
            .expect("a snapshot in time")
            .expect("the stream stays open")
            .expect("a message")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_disconnects_before_acking_a_step_is_named_left_out() {
    let mesh = RolloutMesh::start(&block("[10, 50, 100]")).await;
    mesh.wait_rollout("every proxy acked the first step", |r| {
        r["stepAcked"] == true
    })
    .await;
    let silent = SilentProxy::connect(&mesh.cp.url(), "silent-1").await;

    // A new block: a new rollout, whose first step waits for the silent proxy.
    mesh.write_policy(&block("[20, 100]"), "");
    let r = mesh
        .wait_rollout("the new step waits for the silent proxy alone", |r| {
            r["canaryWeight"] == 20 && r["proxiesAwaited"] == serde_json::json!(["silent-1"])
        })
        .await;
    assert_eq!(r["stepAcked"], false, "{r:#}");

    drop(silent);
    let r = mesh
        .wait_rollout("the step is acked without the silent proxy", |r| {
            r["canaryWeight"] == 20 && r["stepAcked"] == true
        })
        .await;
    assert_eq!(
        r["proxiesLeftOut"],
        serde_json::json!(["silent-1"]),
        "{r:#}"
    );
    assert_eq!(
        r["proxiesLeftOutWhy"]["silent-1"], "disconnected before acking",
        "{r:#}"
    );
    assert_eq!(r["proxiesAwaited"], serde_json::json!([]), "{r:#}");
}

/// A proxy connected when a step's weights are published that goes as soon as they
/// reach it, within one of the control plane's looks at the acks, is named too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_goes_as_a_step_is_published_is_named_left_out() {
    let mesh = RolloutMesh::start(&block("[10, 50, 100]")).await;
    mesh.wait_rollout("every proxy acked the first step", |r| {
        r["stepAcked"] == true
    })
    .await;
    let mut quick = SilentProxy::connect(&mesh.cp.url(), "quick-1").await;
    let first = quick.next_snapshot().await;

    mesh.write_policy(&block("[20, 100]"), "");
    let step = quick.next_snapshot().await;
    assert_ne!(step.version, first.version, "the new step's version");
    drop(quick);
    let r = mesh
        .wait_rollout("the step is acked without the proxy that went", |r| {
            r["canaryWeight"] == 20 && r["stepAcked"] == true
        })
        .await;
    assert_eq!(r["proxiesLeftOut"], serde_json::json!(["quick-1"]), "{r:#}");
    assert_eq!(
        r["proxiesLeftOutWhy"]["quick-1"], "disconnected before acking",
        "{r:#}"
    );
}

/// A proxy that shares its node id with another is waited for on its own: when it
/// goes before acking a step its twin acked, it is named all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_sharing_a_node_id_that_goes_before_acking_is_named_left_out() {
    let mesh = RolloutMesh::start(&block("[10, 50, 100]")).await;
    mesh.wait_rollout("every proxy acked the first step", |r| {
        r["stepAcked"] == true
    })
    .await;
    // The mesh's proxy `p1` acks every step; this one, saying the same id, never does.
    let mut twin = SilentProxy::connect(&mesh.cp.url(), "p1").await;
    let first = twin.next_snapshot().await;

    mesh.write_policy(&block("[20, 100]"), "");
    let r = mesh
        .wait_rollout("the new step waits for the silent twin", |r| {
            r["canaryWeight"] == 20 && r["proxiesAwaited"] == serde_json::json!(["p1"])
        })
        .await;
    assert_eq!(
        r["stepAcked"], false,
        "its twin's ack is not its own: {r:#}"
    );
    let step = twin.next_snapshot().await;
    assert_ne!(step.version, first.version, "the new step's version");
    drop(twin);
    let r = mesh
        .wait_rollout("the step is acked without the twin that went", |r| {
            r["canaryWeight"] == 20 && r["stepAcked"] == true
        })
        .await;
    assert_eq!(r["proxiesLeftOut"], serde_json::json!(["p1"]), "{r:#}");
    assert_eq!(
        r["proxiesLeftOutWhy"]["p1"], "disconnected before acking",
        "{r:#}"
    );
}
