//! The control plane's own gRPC serving certificate is short-lived and renewed
//! while proxies hold their policy streams open: with a 10 s lifetime, at least
//! three renewals pass, every new TLS client meets a fresh certificate, and no
//! proxy loses its stream (edits still reach both over the streams they opened).

use std::time::Duration;

use sluice_e2e::{ProxyOptions, TestControlPlane, TestProxy, wait_until};

const TOKENS: &[(&str, &str, &str)] = &[("tok-a", "shop", "order"), ("tok-b", "shop", "log")];

fn policy(timeout: &str) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: log }}\nspec:\n  host: log\n  backends:\n    v1: {{ addresses: [\"127.0.0.1:9\"] }}\n  routes:\n    - name: all\n      timeout: {timeout}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_certificate_rotates_under_open_proxy_streams() {
    let lifetime = Duration::from_secs(10);
    let cp = TestControlPlane::start_with_ca_lifetimes(
        &[("log.yaml", &policy("2s"))],
        TOKENS,
        Duration::from_secs(3600),
        lifetime,
    )
    .await;
    let mut proxies = Vec::new();
    let mut states = Vec::new();
    for (node, token) in [("order-0", "tok-a"), ("log-0", "tok-b")] {
        let state = tempfile::tempdir().unwrap();
        proxies.push(
            TestProxy::start_subscribed(
                &cp.url(),
                node,
                state.path(),
                ProxyOptions {
                    mtls: Some(cp.mesh_tls(token)),
                    ..ProxyOptions::default()
                },
            )
            .await,
        );
        states.push(state);
    }
    let v1 = cp.version().unwrap();
    cp.wait_acked_everywhere(&v1, 2).await;
    assert_eq!(cp.metric("sluice_cp_streams_opened_total").await, Some(2.0));

    // Three renewals, each seen by a new client as a new leaf.
    let seen = std::sync::Mutex::new(vec![cp.serving_cert().await]);
    for n in 1..=3 {
        wait_until(
            &format!("serving certificate renewal {n}"),
            lifetime * 2,
            || async {
                let now = cp.serving_cert().await;
                let mut seen = seen.lock().unwrap();
                if seen.contains(&now) {
                    return false;
                }
                seen.push(now);
                true
            },
        )
        .await;
    }
    let seen = seen.into_inner().unwrap();
    assert!(cp.metric("sluice_cp_serving_cert_renewals_total").await >= Some(3.0));
    // The first certificate has expired by now; the streams made with it live on.
    let first = x509_parser::parse_x509_certificate(&seen[0]).unwrap().1;
    assert!(
        first.validity().time_to_expiration().is_none(),
        "the first leaf expired"
    );

    // No stream was lost: none reopened, both still connected and serving edits.
    assert_eq!(cp.metric("sluice_cp_streams_opened_total").await, Some(2.0));
    cp.write_policy("log.yaml", &policy("3s"));
    wait_until("a new version", Duration::from_secs(20), || async {
        cp.version().is_some_and(|v| v != v1)
    })
    .await;
    let v2 = cp.version().unwrap();
    cp.wait_acked_everywhere(&v2, 2).await;
    assert_eq!(cp.metric("sluice_cp_streams_opened_total").await, Some(2.0));
    for p in proxies {
        p.shutdown().await;
    }
}
