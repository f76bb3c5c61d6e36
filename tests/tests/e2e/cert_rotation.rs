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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_certificate_from_the_mesh_ca_rotates_and_its_ca_bundle_is_the_root() {
    use std::sync::Arc;

    use sluice_control_plane::ca::{Ca, TokenFile};
    use sluice_control_plane::inject::{WebhookConfig, start_webhook};
    use sluice_control_plane::k8s::ca_bundle::{BundleSource, WebhookBundles};
    use sluice_control_plane::k8s::double::ApiServer;
    use sluice_control_plane::{ControlPlaneConfig, IdentityConfig};

    let lifetime = Duration::from_secs(4);
    let api = ApiServer::new();
    api.put(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": "sluice-injector" },
        "webhooks": [{ "name": "pod.inject.sluice.dev", "sideEffects": "None",
                       "admissionReviewVersions": ["v1"],
                       "clientConfig": { "service": { "name": "sluice", "namespace": "sluice-system" },
                                         "caBundle": "c3RhbGU=" } }],
    }));
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap());
    let tokens = TokenFile::parse(&dir.path().join("tokens"), "").unwrap();
    let mut identity = IdentityConfig::new(ca.clone(), Arc::new(tokens));
    identity.server_cert_lifetime = lifetime;
    let cp = sluice_control_plane::start(ControlPlaneConfig {
        policy_dir: dir.path().to_path_buf(),
        identity: Some(identity),
        webhook_bundles: Some(WebhookBundles {
            client: api.client(),
            ca: BundleSource::MeshRoot(ca.root_pem()),
            mutating: Some("sluice-injector".into()),
            validating: None,
        }),
        ..ControlPlaneConfig::default()
    })
    .await
    .unwrap();
    let webhook = start_webhook(WebhookConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls: cp.webhook_tls().expect("the CA is on"),
        inject: Default::default(),
        policy_limits: Default::default(),
    })
    .await
    .unwrap();

    // The configuration's caBundle becomes the mesh root...
    let bundle = || -> Vec<u8> {
        let obj = api
            .get("mutatingwebhookconfigurations", "", "sluice-injector")
            .unwrap();
        let b: k8s_openapi::ByteString =
            serde_json::from_value(obj["webhooks"][0]["clientConfig"]["caBundle"].clone()).unwrap();
        b.0
    };
    wait_until(
        "the caBundle is the mesh root",
        Duration::from_secs(20),
        || {
            let now = bundle();
            let root = ca.root_pem();
            async move { now == root.as_bytes() }
        },
    )
    .await;
    // ...and a client trusting exactly that bundle, as the API server does, is
    // answered. This connection stays open across every rotation.
    let bundle = bundle();
    let (mut kept, first) = sluice_e2e::HttpConn::h1_tls(webhook.addr(), &bundle, "127.0.0.1")
        .await
        .expect("a TLS handshake the caBundle verifies");
    sluice_e2e::admit(&mut kept).await;

    // Three renewals, each met by a new connection verified with the same bundle.
    let mut seen = vec![first];
    for n in 1..=3 {
        let fresh = std::sync::Mutex::new(None);
        wait_until(
            &format!("webhook certificate renewal {n}"),
            lifetime * 2,
            || {
                let (addr, bundle, seen, fresh) =
                    (webhook.addr(), bundle.clone(), seen.clone(), &fresh);
                async move {
                    let (conn, leaf) = sluice_e2e::HttpConn::h1_tls(addr, &bundle, "localhost")
                        .await
                        .expect("a TLS handshake the caBundle verifies");
                    if seen.contains(&leaf) {
                        return false;
                    }
                    *fresh.lock().unwrap() = Some((conn, leaf));
                    true
                }
            },
        )
        .await;
        let (mut conn, leaf) = fresh.into_inner().unwrap().unwrap();
        sluice_e2e::admit(&mut conn).await;
        sluice_e2e::admit(&mut kept).await;
        seen.push(leaf);
    }
    let metrics = sluice_e2e::scrape(cp.admin_addr()).await;
    assert!(
        sluice_e2e::metric_sum(&metrics, "sluice_cp_webhook_cert_renewals_total", &[]) >= 3.0,
        "{metrics}"
    );
    // The first leaf has expired; the connection made with it still serves.
    let first = x509_parser::parse_x509_certificate(&seen[0]).unwrap().1;
    assert!(
        first.validity().time_to_expiration().is_none(),
        "the first leaf expired"
    );
    sluice_e2e::admit(&mut kept).await;
    // The bundle never had to change: leaves rotate under the same root.
    assert_eq!(
        api.calls()
            .iter()
            .filter(|c| c.method == hyper::Method::PATCH)
            .count(),
        1
    );
    webhook.shutdown().await;
    cp.shutdown().await;
}
