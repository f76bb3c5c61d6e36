//! What a proxy meets first from a real control plane: a snapshot whose schema
//! version is from the future (refused with a NACK the control plane reports),
//! and a workload certificate that is not there yet (`/ready` says 503 and why
//! until it arrives).

use hyper::StatusCode;
use sluice_e2e::{NackingMesh, ProxyOptions, TestControlPlane, TestProxy};

const POLICY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { name: log }\nspec:\n  host: log\n  backends:\n    v1: { addresses: [\"127.0.0.1:9\"] }\n  routes:\n    - name: all\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_from_a_future_schema_is_nacked_by_a_real_proxy() {
    let mesh = NackingMesh::start(
        env!("CARGO_BIN_EXE_e2e-control-plane").as_ref(),
        POLICY,
        "order-0",
    )
    .await;
    let NackingMesh {
        cp, proxy, future, ..
    } = mesh;
    let v = cp.admin_json("/proxies").await;
    let p = &v["proxies"][0];
    assert_eq!(p["node_id"], "order-0");
    assert!(p["acked_version"].is_null(), "{p}");
    let error = p["nack_error"].as_str().unwrap();
    assert!(
        error.contains(&format!("schema version {future} is not supported")),
        "{error}"
    );
    // The proxy applied nothing: it has no policy and says it is not ready.
    let (status, body) = proxy.admin_get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("no policy loaded"), "{body}");
    assert!(proxy.version().await.is_none());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_until_the_workload_certificate_arrives() {
    let mut cp = TestControlPlane::start_with_ca(
        &[],
        &[("tok-order", "shop", "order")],
        std::time::Duration::from_secs(600),
    )
    .await;
    // The control plane is down when the proxy starts: it has its policy but no
    // certificate, and says so.
    cp.stop().await;
    let proxy = TestProxy::start_with(
        POLICY,
        ProxyOptions {
            mtls: Some(cp.mesh_tls("tok-order")),
            skip_ready_wait: true,
            ..ProxyOptions::default()
        },
    )
    .await;
    let (status, body) = proxy.admin_get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("no workload certificate yet"), "{body}");
    // Once the CA answers, the certificate arrives and the proxy is ready.
    cp.restart().await;
    proxy.wait_ready().await;
    let identity = proxy.admin_json("/identity").await;
    assert_eq!(
        identity["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/order",
        "{identity}"
    );
    proxy.shutdown().await;
}
