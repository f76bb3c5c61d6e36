//! The example services in a mesh: order-service → its sidecar (outbound) → the log
//! sidecars (inbound) → log-service v1 / v2, as the demo runs them.

use std::net::SocketAddr;

use hyper::{Method, StatusCode};
use sluice_e2e::{HttpConn, ProxyOptions, TestProxy};
use sluice_examples::log_service::{self, LogServiceConfig};
use sluice_examples::order_service::{self, OrderServiceConfig};

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn log_policy(v1: SocketAddr, v2: SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: log-service, namespace: e2e }}
spec:
  host: log-service
  backends:
    log-v1: {{ addresses: ["{v1}"] }}
    log-v2: {{ addresses: ["{v2}"] }}
  routes:
    - name: ingest
      match: {{ path: {{ prefix: /logs }}, method: POST }}
      split:
        - when: {{ headers: {{ x-canary: "true" }} }}
          backend: log-v2
        - backend: log-v1
"#
    )
}

async fn log_sidecar(app: SocketAddr) -> TestProxy {
    // The inbound side needs no backends of its own; any policy for the host will do.
    let policy = log_policy(app, app);
    TestProxy::start_with(
        &policy,
        ProxyOptions {
            outbound: false,
            inbound: true,
            app: Some(app),
            service: Some("log-service".into()),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_logged_through_the_sidecars_with_canary_routing() {
    let v1 = log_service::start(
        any(),
        LogServiceConfig {
            name: "log-v1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let v2 = log_service::start(
        any(),
        LogServiceConfig {
            name: "log-v2".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let v1_sidecar = log_sidecar(v1.addr()).await;
    let v2_sidecar = log_sidecar(v2.addr()).await;
    let order_sidecar = TestProxy::start(&log_policy(
        v1_sidecar.inbound_addr(),
        v2_sidecar.inbound_addr(),
    ))
    .await;
    let order = order_service::start(
        any(),
        OrderServiceConfig {
            log_url: format!("http://{}", order_sidecar.outbound_addr()),
            log_host: "log-service".into(),
        },
    )
    .await
    .unwrap();

    let mut conn = HttpConn::h1(order.addr()).await.unwrap();
    for (canary, want) in [("false", "log-v1"), ("true", "log-v2"), ("false", "log-v1")] {
        for _ in 0..5 {
            let reply = conn
                .request(
                    Method::POST,
                    "order-service",
                    "/orders",
                    &[("x-canary", canary)],
                )
                .await
                .unwrap();
            assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
            let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(body["logged"], true);
            assert_eq!(body["log_status"], 202);
            assert_eq!(body["log_version"], want, "{body}");
        }
    }

    // Each log service counted exactly what it was sent.
    for (svc, want) in [(&v1, 10), (&v2, 5)] {
        let mut c = HttpConn::h1(svc.addr()).await.unwrap();
        let stats = c.get("log", "/logs/stats").await.unwrap();
        let stats: serde_json::Value = serde_json::from_slice(&stats.body).unwrap();
        assert_eq!(stats["accepted"], want, "{stats}");
    }

    // With the log sidecars gone, the order service reports the sidecar's reason.
    v2_sidecar.shutdown().await;
    let reply = conn
        .request(
            Method::POST,
            "order-service",
            "/orders",
            &[("x-canary", "true")],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["log_status"], 502, "{body}");
    assert_eq!(body["reason"], "upstream-unavailable", "{body}");

    order.shutdown().await;
    order_sidecar.shutdown().await;
    v1_sidecar.shutdown().await;
    v1.shutdown().await;
    v2.shutdown().await;
}
