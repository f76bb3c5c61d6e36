//! Canary rollouts: the proxies' traffic reports reach the control plane, which
//! counts the proxies with traffic per route and tells the proxies.

use std::time::Duration;

use hyper::StatusCode;
use sluice_e2e::{
    HttpConn, ProxyOptions, TestControlPlane, TestProxy, Upstream, WAIT, metric_sum, scrape,
    wait_until,
};

fn opts() -> ProxyOptions {
    ProxyOptions {
        report_interval: Duration::from_millis(200),
        ..Default::default()
    }
}

fn two_backends(v1: std::net::SocketAddr, v2: std::net::SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: log, namespace: e2e }}
spec:
  host: log
  backends:
    v1: {{ addresses: ["{v1}"] }}
    v2: {{ addresses: ["{v2}"] }}
  routes:
    - name: ingest
      split:
        - weights: {{ v1: 50, v2: 50 }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_count_the_proxies_with_traffic_and_the_count_reaches_the_proxies() {
    let v1 = Upstream::http1("v1").await;
    let v2 = Upstream::http1("v2").await;
    let cp = TestControlPlane::start(&[("log.yaml", &two_backends(v1.addr(), v2.addr()))]).await;
    let states = tempfile::tempdir().unwrap();
    let mut proxies = Vec::new();
    for i in 0..2 {
        let dir = states.path().join(format!("p{i}"));
        proxies.push(TestProxy::start_subscribed(&cp.url(), &format!("p{i}"), &dir, opts()).await);
    }
    // Only the first proxy has traffic.
    let send = |n| {
        let addr = proxies[0].outbound_addr();
        async move {
            let mut conn = HttpConn::h1(addr).await.unwrap();
            for _ in 0..n {
                let r = conn.get("log", "/").await.unwrap();
                assert_eq!(r.status, StatusCode::OK);
            }
        }
    };
    send(10).await;
    wait_until(
        "the control plane counts one proxy with traffic",
        WAIT,
        || {
            let n = cp.proxies_with_traffic("log", "ingest");
            async move { n == 1 }
        },
    )
    .await;
    // Both proxies hear it, although only one has traffic.
    for p in &proxies {
        let table = p.route_traffic();
        wait_until("a proxy hears the count", WAIT, || {
            let n = table.proxies("log", "ingest");
            async move { n == Some(1) }
        })
        .await;
    }
    // The second proxy joins in.
    let addrs = [proxies[0].outbound_addr(), proxies[1].outbound_addr()];
    let table = proxies[0].route_traffic();
    wait_until("two proxies with traffic, heard by the first", WAIT, || {
        let table = table.clone();
        async move {
            for addr in addrs {
                let mut c = HttpConn::h1(addr).await.unwrap();
                assert_eq!(c.get("log", "/").await.unwrap().status, StatusCode::OK);
            }
            table.proxies("log", "ingest") == Some(2)
        }
    })
    .await;
    assert_eq!(cp.proxies_with_traffic("log", "ingest"), 2);
    let metrics = scrape(cp.admin_addr()).await;
    assert!(
        metric_sum(
            &metrics,
            "sluice_cp_reports_total",
            &["result=\"accepted\""]
        ) > 0.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "sluice_cp_reports_total",
            &["result=\"malformed\""]
        ),
        0.0
    );
    for p in proxies {
        p.shutdown().await;
    }
}
