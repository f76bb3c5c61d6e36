//! Service discovery end to end: EndpointSlices from the stateful Kubernetes API
//! double (no API server can run here) become a backend's
//! endpoints in the control plane's snapshot, and a real proxy balances real
//! requests over exactly the pods that are ready, as they come and go.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use hyper::StatusCode;
use serde_json::{Value, json};
use sluice_control_plane::k8s::double::ApiServer;
use sluice_control_plane::k8s::{KubeConfig, LeaseConfig};
use sluice_control_plane::{ControlPlaneConfig, RunningControlPlane};
use sluice_e2e::{
    ChildControlPlane, HttpConn, ProxyOptions, TestProxy, Upstream, WAIT, wait_until,
};

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
        "metadata": { "name": name, "namespace": "shop",
                      "labels": { "kubernetes.io/service-name": "log" } },
        "ports": [{ "name": "http", "port": pod.port(), "protocol": "TCP" }],
        "endpoints": [{ "addresses": [pod.ip().to_string()], "conditions": { "ready": ready } }],
    })
}

/// A control plane reading `POLICY` from a directory, with EndpointSlices from
/// the API double (returned, for the test to change them).
async fn control_plane(slices: Vec<Value>) -> (RunningControlPlane, ApiServer, tempfile::TempDir) {
    let api = ApiServer::new();
    for s in slices {
        api.put(s);
    }
    let client = api.client();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("log.yaml"), POLICY).unwrap();
    let cp = sluice_control_plane::start(ControlPlaneConfig {
        policy_dir: dir.path().to_path_buf(),
        kubernetes: Some(KubeConfig {
            client,
            policies: false,
            lease: LeaseConfig::new("sluice-system", "sluice-control-plane", "cp-0"),
            trust_domain: "cluster.local".into(),
            pod_ip: None,
        }),
        ..ControlPlaneConfig::default()
    })
    .await
    .unwrap();
    (cp, api, dir)
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
    // The proxy's policy in force lists both ready pods as the backend's endpoints, and
    // both take traffic: an endpoint not heard from yet is tried the first time the
    // balancer samples it, so neither starves at low load.
    let config = proxy.admin_json("/config").await;
    let v1 = config["version"].as_str().unwrap().to_string();
    let policies = config["policies"].as_str().unwrap();
    for pod in [a.addr(), b.addr()] {
        assert!(policies.contains(&pod.to_string()), "{policies}");
    }
    assert!(!policies.contains("service:"), "{policies}");
    assert_eq!(
        reached(&proxy, 10).await,
        BTreeSet::from(["pod-a".to_string(), "pod-b".to_string()])
    );

    // pod-b stops being ready: a new version, and only pod-a gets traffic.
    slices.put(slice("log-b", b.addr(), false));
    let v2 = next_version(&proxy, &v1).await;
    let before = b.requests();
    assert_eq!(
        reached(&proxy, 40).await,
        BTreeSet::from(["pod-a".to_string()])
    );
    assert_eq!(b.requests(), before);

    // pod-b is back and then pod-a's slice goes away: everything moves to pod-b.
    slices.put(slice("log-b", b.addr(), true));
    assert!(slices.remove(&slice("log-a", a.addr(), true)));
    wait_until("the proxy enforces pod-b alone", WAIT, || async {
        proxy.version().await.is_some_and(|v| v != v2)
            && reached(&proxy, 10).await == BTreeSet::from(["pod-b".to_string()])
    })
    .await;

    // No pod at all: the backend has no endpoint and the proxy says so.
    assert!(slices.remove(&slice("log-b", b.addr(), true)));
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

/// A RoutePolicy object for host `log` sending everything to `upstream`.
fn route_policy(upstream: SocketAddr, timeout: &str) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RoutePolicy",
        "metadata": { "name": "log", "namespace": "shop" },
        "spec": { "host": "log", "backends": { "pods": { "addresses": [upstream.to_string()] } },
                  "routes": [{ "name": "all", "timeout": timeout }] },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_with_source_kubernetes_runs_against_an_api_over_http() {
    let upstream = Upstream::auto("log-pod").await;
    let api = ApiServer::new();
    api.put(route_policy(upstream.addr(), "2s"));
    let dir = tempfile::tempdir().unwrap();
    let served = api.serve(dir.path()).await.unwrap();
    let kubeconfig = served.kubeconfig.to_str().unwrap();
    // The process finds the API through its kubeconfig, as `kubectl` would.
    let mut cp = ChildControlPlane::spawn(
        env!("CARGO_BIN_EXE_e2e-control-plane").as_ref(),
        &[
            ("KUBECONFIG", kubeconfig),
            ("SLUICE_SOURCE", "kubernetes"),
            ("SLUICE_PLAINTEXT", "true"),
            ("SLUICE_POD_NAME", "cp-0"),
        ],
        &[],
    )
    .await;

    // It elects itself (the Lease in the kubeconfig's namespace) and writes the
    // verdict to the object's status, over HTTP.
    wait_until("the verdict is in the object's status", WAIT, || async {
        api.get("routepolicies", "shop", "log")
            .is_some_and(|o| o["status"]["accepted"] == true)
    })
    .await;
    let lease = api
        .get("leases", "sluice-system", "sluice-control-plane")
        .expect("the Lease");
    assert_eq!(lease["spec"]["holderIdentity"], "cp-0");

    // A real proxy subscribed to it reaches the upstream the object names.
    let state = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_subscribed(
        &format!("http://{}", cp.grpc_addr()),
        "log-client-0",
        state.path(),
        ProxyOptions::default(),
    )
    .await;
    let v1 = proxy.version().await.expect("a version in force");
    assert_eq!(
        reached(&proxy, 3).await,
        BTreeSet::from(["log-pod".to_string()])
    );

    // An edit reaches the process's watch, then the proxy.
    api.put(route_policy(upstream.addr(), "3s"));
    let v2 = next_version(&proxy, &v1).await;
    let status = api.get("routepolicies", "shop", "log").unwrap()["status"].clone();
    assert_eq!(status["observedGeneration"], 2, "{status}");

    // The API compacts and drops every watch: the process relists over HTTP and
    // still follows edits.
    api.compact();
    api.close_watches();
    api.put(route_policy(upstream.addr(), "4s"));
    next_version(&proxy, &v2).await;
    assert!(
        api.calls()
            .iter()
            .filter(|c| c.is_list_of("routepolicies"))
            .count()
            >= 1
    );

    // SIGTERM: a clean exit that hands the Lease back.
    let exit = cp.terminate(WAIT).await;
    assert!(exit.success(), "{exit}\n{}", cp.log());
    let lease = api
        .get("leases", "sluice-system", "sluice-control-plane")
        .unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_its_webhook_with_a_mesh_ca_certificate_and_publishes_the_root_as_ca_bundle()
 {
    let api = ApiServer::new();
    api.put(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": "sluice-injector" },
        "webhooks": [{ "name": "pod.inject.sluice.dev", "sideEffects": "None",
                       "admissionReviewVersions": ["v1"],
                       "clientConfig": { "service": { "name": "sluice", "namespace": "sluice-system" } } }],
    }));
    let dir = tempfile::tempdir().unwrap();
    let served = api.serve(dir.path()).await.unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    // No --webhook-cert: the mesh CA (kept in the Secret) issues the webhook's.
    let mut cp = ChildControlPlane::spawn(
        env!("CARGO_BIN_EXE_e2e-control-plane").as_ref(),
        &[
            ("KUBECONFIG", served.kubeconfig.to_str().unwrap()),
            ("SLUICE_POLICY_DIR", policies.to_str().unwrap()),
            ("SLUICE_CA_SECRET", "sluice-ca"),
            ("SLUICE_WEBHOOK", "127.0.0.1:0"),
            ("SLUICE_MUTATING_WEBHOOK_CONFIG", "sluice-injector"),
            ("SLUICE_SERVER_CERT_LIFETIME", "4s"),
        ],
        &[],
    )
    .await;

    let bytes = |v: &Value| -> Vec<u8> {
        serde_json::from_value::<k8s_openapi::ByteString>(v.clone())
            .map(|b| b.0)
            .unwrap_or_default()
    };
    let mut bundle = Vec::new();
    wait_until("the caBundle is the root in the CA Secret", WAIT, || {
        let root = api
            .get("secrets", "sluice-system", "sluice-ca")
            .map(|s| bytes(&s["data"]["ca.crt"]));
        let now = api
            .get("mutatingwebhookconfigurations", "", "sluice-injector")
            .map(|c| bytes(&c["webhooks"][0]["clientConfig"]["caBundle"]));
        let done = root.is_some() && root == now;
        if done {
            bundle = now.unwrap();
        }
        async move { done }
    })
    .await;
    let mut addr: Option<SocketAddr> = None;
    wait_until("the webhook listens", WAIT, || {
        addr = cp.log().lines().find_map(|l| {
            let rest = l.split("injection webhook listening").nth(1)?;
            rest.split("addr=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        });
        async move { addr.is_some() }
    })
    .await;
    let addr = addr.unwrap();

    // The API server's view: trusting only the caBundle, across a renewal.
    let (mut first, leaf) = HttpConn::h1_tls(addr, &bundle, "localhost")
        .await
        .expect("a TLS handshake the caBundle verifies");
    sluice_e2e::admit(&mut first).await;
    let renewed = std::sync::Mutex::new(None);
    wait_until("a renewed webhook certificate", WAIT, || {
        let (bundle, leaf, renewed) = (bundle.clone(), leaf.clone(), &renewed);
        async move {
            let (conn, now) = HttpConn::h1_tls(addr, &bundle, "localhost")
                .await
                .expect("a TLS handshake the caBundle verifies");
            if now == leaf {
                return false;
            }
            *renewed.lock().unwrap() = Some(conn);
            true
        }
    })
    .await;
    sluice_e2e::admit(&mut renewed.into_inner().unwrap().unwrap()).await;
    sluice_e2e::admit(&mut first).await;
    let exit = cp.terminate(WAIT).await;
    assert!(exit.success(), "{exit}\n{}", cp.log());
}
