//! Service discovery end to end: EndpointSlices from a scripted Kubernetes API
//! (kube-rs's mock client; no API server can run here) become a backend's
//! endpoints in the control plane's snapshot, and a real proxy balances real
//! requests over exactly the pods that are ready, as they come and go.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::StatusCode;
use serde_json::{Value, json};
use sluice_control_plane::k8s::testing::{Reply, fake_api};
use sluice_control_plane::k8s::{KubeConfig, LeaseConfig};
use sluice_control_plane::{ControlPlaneConfig, RunningControlPlane};
use sluice_e2e::{HttpConn, ProxyOptions, TestProxy, Upstream, WAIT, wait_until};
use tokio::sync::mpsc;

const POLICY: &str = r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log, namespace: shop }
spec:
  host: log
  backends:
    pods: { service: log.shop }
  routes:
    - name: all
"#;

/// One EndpointSlice of Service `log` with one endpoint (a "pod" on 127.0.0.1).
fn slice(name: &str, pod: SocketAddr, ready: bool) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": { "name": name, "namespace": "shop", "resourceVersion": name,
                      "labels": { "kubernetes.io/service-name": "log" } },
        "ports": [{ "name": "http", "port": pod.port(), "protocol": "TCP" }],
        "endpoints": [{ "addresses": [pod.ip().to_string()], "conditions": { "ready": ready } }],
    })
}

/// A control plane reading `POLICY` from a directory, with EndpointSlices from a
/// fake API whose watch the returned sender feeds.
async fn control_plane(
    slices: Vec<Value>,
) -> (
    RunningControlPlane,
    mpsc::UnboundedSender<Value>,
    tempfile::TempDir,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = Arc::new(Mutex::new(Some(rx)));
    let (client, _calls) = fake_api(move |c| {
        assert_eq!(c.path, "/apis/discovery.k8s.io/v1/endpointslices", "{c:?}");
        if !c.is_watch() {
            return Reply::Json(
                200,
                json!({ "kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                        "metadata": { "resourceVersion": "1" }, "items": slices }),
            );
        }
        match rx.lock().unwrap().take() {
            Some(rx) => Reply::Stream(rx),
            None => Reply::Hang,
        }
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("log.yaml"), POLICY).unwrap();
    let cp = sluice_control_plane::start(ControlPlaneConfig {
        policy_dir: dir.path().to_path_buf(),
        kubernetes: Some(KubeConfig {
            client,
            policies: false,
            lease: LeaseConfig::new("sluice-system", "sluice-control-plane", "cp-0"),
            trust_domain: "cluster.local".into(),
        }),
        ..ControlPlaneConfig::default()
    })
    .await
    .unwrap();
    (cp, tx, dir)
}

/// The upstreams that answered `n` requests through `proxy`.
async fn reached(proxy: &TestProxy, n: usize) -> BTreeSet<String> {
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let r = conn.get("log", "/logs").await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        seen.insert(r.header("x-upstream").to_string());
    }
    seen
}

/// Waits until the proxy enforces a version other than `old` (and returns it).
async fn next_version(proxy: &TestProxy, old: &str) -> String {
    proxy.wait_version_change(Some(old)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_coming_and_going_reach_the_proxys_balancer() {
    let a = Upstream::auto("pod-a").await;
    let b = Upstream::auto("pod-b").await;
    let (cp, slices, _dir) = control_plane(vec![
        slice("log-a", a.addr(), true),
        slice("log-b", b.addr(), true),
    ])
    .await;
    wait_until("the control plane publishes", WAIT, || async {
        cp.policy_version().is_some()
    })
    .await;
    let state = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_subscribed(
        &format!("http://{}", cp.grpc_addr()),
        "order-0",
        state.path(),
        ProxyOptions::default(),
    )
    .await;
    // The proxy's policy in force lists both ready pods as the backend's endpoints
    // (the balancer prefers the faster one, so traffic alone does not show both).
    let config = proxy.admin_json("/config").await;
    let v1 = config["version"].as_str().unwrap().to_string();
    let policies = config["policies"].as_str().unwrap();
    for pod in [a.addr(), b.addr()] {
        assert!(policies.contains(&pod.to_string()), "{policies}");
    }
    assert!(!policies.contains("service:"), "{policies}");
    assert_eq!(reached(&proxy, 10).await.len(), 1);

    // pod-b stops being ready: a new version, and only pod-a gets traffic.
    slices
        .send(json!({ "type": "MODIFIED", "object": slice("log-b", b.addr(), false) }))
        .unwrap();
    let v2 = next_version(&proxy, &v1).await;
    let before = b.requests();
    assert_eq!(
        reached(&proxy, 40).await,
        BTreeSet::from(["pod-a".to_string()])
    );
    assert_eq!(b.requests(), before);

    // pod-b is back and then pod-a's slice goes away: everything moves to pod-b.
    slices
        .send(json!({ "type": "MODIFIED", "object": slice("log-b", b.addr(), true) }))
        .unwrap();
    slices
        .send(json!({ "type": "DELETED", "object": slice("log-a", a.addr(), true) }))
        .unwrap();
    wait_until("the proxy enforces pod-b alone", WAIT, || async {
        proxy.version().await.is_some_and(|v| v != v2)
            && reached(&proxy, 10).await == BTreeSet::from(["pod-b".to_string()])
    })
    .await;

    // No pod at all: the backend has no endpoint and the proxy says so.
    slices
        .send(json!({ "type": "DELETED", "object": slice("log-b", b.addr(), true) }))
        .unwrap();
    wait_until("the proxy answers no-healthy-endpoint", WAIT, || async {
        let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
        let r = conn.get("log", "/logs").await.unwrap();
        r.status == StatusCode::SERVICE_UNAVAILABLE
            && r.header("x-sluice-reason") == "no-healthy-endpoint"
    })
    .await;
    proxy.shutdown().await;
    cp.shutdown().await;
}
