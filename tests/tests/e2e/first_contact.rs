//! What a proxy meets first from a real control plane: a snapshot whose schema
//! version is from the future (refused with a NACK the control plane reports),
//! a workload certificate that is not there yet (`/ready` says 503 and why
//! until it arrives), and a control plane reached with the wrong scheme.

use hyper::StatusCode;
use std::sync::Arc;

use sluice_e2e::{NackingMesh, ProxyOptions, RecordingSink, TestControlPlane, TestProxy};

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

/// Waits until `subscriber` has failed to reach its control plane, and returns why.
async fn first_failure(subscriber: &sluice_api::Subscriber) -> String {
    let mut status = subscriber.status();
    let failed = status.wait_for(|s| s.last_error.is_some());
    let s = tokio::time::timeout(sluice_e2e::WAIT, failed)
        .await
        .expect("a failure within the wait")
        .expect("subscriber running")
        .clone();
    assert!(!s.connected && s.connects == 0, "{s:?}");
    s.last_error.unwrap()
}

/// A proxy pointed at a control plane with the wrong scheme (`http://` at one
/// serving TLS, its default, or `https://` at one started with `--plaintext`)
/// never connects, and its error says which way round the mismatch is and what
/// to change, instead of only the HTTP/2 or TLS error the other end's bytes cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_scheme_for_the_control_plane_is_named_with_its_fix() {
    let tls = TestControlPlane::start_with_ca(&[], &[], std::time::Duration::from_secs(600)).await;
    let mut plain = TestControlPlane::start(&[]).await;
    let trust_root = std::fs::read(tls.trust_root()).unwrap();
    // A real subscriber to `url`, trusting the mesh root.
    let subscribe = |url: String, node: &str| {
        let mut cfg = sluice_api::SubscriberConfig::new(url, node);
        cfg.trust_root = Some(trust_root.clone());
        sluice_api::Subscriber::spawn(cfg, Arc::new(RecordingSink::default())).unwrap()
    };

    let to_tls = subscribe(tls.url().replace("https://", "http://"), "p1");
    let error = first_failure(&to_tls).await;
    assert!(
        error.contains("(hint: if the control plane serves TLS (its default), use an https:// URL with --trust-root, or start it with --plaintext)"),
        "{error}"
    );

    let to_plain = subscribe(plain.url().replace("http://", "https://"), "p2");
    let error = first_failure(&to_plain).await;
    assert!(
        error.ends_with("(hint: the control plane answers in plaintext (started with --plaintext?): use an http:// URL)"),
        "{error}"
    );
    // Each cause is said once, not repeated by the wrappers around it.
    assert_eq!(error.matches("InvalidContentType").count(), 1, "{error}");

    // The right scheme connects, and a failure of another kind carries no hint.
    let right = subscribe(tls.url(), "p3");
    let mut status = right.status();
    tokio::time::timeout(sluice_e2e::WAIT, status.wait_for(|s| s.connected))
        .await
        .expect("connects within the wait")
        .unwrap();
    let url = plain.url();
    plain.stop().await;
    let refused = subscribe(url, "p4");
    let error = first_failure(&refused).await;
    assert!(!error.contains("hint"), "{error}");

    for s in [to_tls, to_plain, right, refused] {
        s.shutdown().await;
    }
}
