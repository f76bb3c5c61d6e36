//! The validating webhook over real TLS on 127.0.0.1: a RoutePolicy that
//! `sluice-config` refuses is denied with the validator's message and field path;
//! a valid one, a delete and other kinds are allowed.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use sluice_control_plane::inject::{
    InjectConfig, RunningWebhook, WebhookConfig, WebhookTls, start_webhook,
};

struct Webhook {
    running: RunningWebhook,
    roots: Arc<rustls::RootCertStore>,
    _dir: tempfile::TempDir,
}

async fn webhook() -> Webhook {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let running = start_webhook(WebhookConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls: WebhookTls::Files { cert, key },
        inject: InjectConfig::default(),
        policy_limits: sluice_config::Limits::default(),
    })
    .await
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ck.cert.der().to_vec()))
        .unwrap();
    Webhook {
        running,
        roots: Arc::new(roots),
        _dir: dir,
    }
}

impl Webhook {
    /// POSTs a review to `/validate` over TLS (HTTP/2, as the API server does).
    async fn validate(&self, review: &Value) -> (u16, Value) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(self.running.addr())
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post("https://localhost/validate?timeout=10s")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(review.to_string())))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

fn review(operation: &str, kind: (&str, &str), object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": kind.0, "version": "v1alpha1", "kind": kind.1 },
            "resource": { "group": kind.0, "version": "v1alpha1", "resource": "routepolicies" },
            "name": "log-service",
            "namespace": "shop",
            "operation": operation,
            "userInfo": { "username": "jane" },
            "object": object,
            "dryRun": false,
        }
    })
}

fn route_policy(spec: Value) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RoutePolicy",
        "metadata": { "name": "log-service", "namespace": "shop" },
        "spec": spec,
    })
}

fn spec(weights: (u32, u32)) -> Value {
    json!({
        "host": "log-service",
        "backends": { "log-v1": { "service": "log-v1.shop" }, "log-v2": { "service": "log-v2.shop" } },
        "routes": [{ "name": "ingest", "split": [{ "weights": { "log-v1": weights.0, "log-v2": weights.1 } }] }],
    })
}

#[tokio::test]
async fn a_valid_route_policy_is_allowed() {
    let hook = webhook().await;
    for op in ["CREATE", "UPDATE"] {
        let (code, body) = hook
            .validate(&review(
                op,
                ("sluice.dev", "RoutePolicy"),
                route_policy(spec((90, 10))),
            ))
            .await;
        assert_eq!(code, 200);
        assert_eq!(
            body["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(body["response"]["allowed"], true, "{body}");
    }
}

#[tokio::test]
async fn a_route_policy_sluice_config_refuses_is_denied_with_the_field_path() {
    let hook = webhook().await;
    let (code, body) = hook
        .validate(&review(
            "CREATE",
            ("sluice.dev", "RoutePolicy"),
            route_policy(spec((90, 20))),
        ))
        .await;
    assert_eq!(code, 200);
    let resp = &body["response"];
    assert_eq!(resp["allowed"], false, "{body}");
    assert_eq!(resp["status"]["code"], 422);
    let message = resp["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("RoutePolicy shop/log-service refused by sluice-config:\nspec.routes[0].split[0].weights: "),
        "{message}"
    );
    assert!(message.contains("100"), "{message}");

    // A field the schema does not know is refused too (the CRD schema cannot say so).
    let mut unknown = spec((90, 10));
    unknown["routes"][0]["retries"] = json!(3);
    let (_, body) = hook
        .validate(&review(
            "UPDATE",
            ("sluice.dev", "RoutePolicy"),
            route_policy(unknown),
        ))
        .await;
    assert_eq!(body["response"]["allowed"], false, "{body}");
    let message = body["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("retries"), "{message}");
}

#[tokio::test]
async fn a_route_policy_over_the_limits_is_denied_without_being_built() {
    let hook = webhook().await;
    // More routes than allowed in one policy.
    let mut many = spec((90, 10));
    let route = many["routes"][0].clone();
    many["routes"] = Value::Array(
        (0..=sluice_config::Limits::default().max_routes)
            .map(|i| {
                let mut r = route.clone();
                r["name"] = json!(format!("r{i}"));
                r
            })
            .collect(),
    );
    // Nested deeper than allowed (serde_json itself stops at 128 levels).
    let mut deep = spec((90, 10));
    let mut nested = json!(1);
    for _ in 0..100 {
        nested = json!([nested]);
    }
    deep["routes"][0]["match"] = json!({ "headers": { "x": nested } });
    for (spec, want) in [
        (
            many,
            "more than 1000 routes in one policy (--policy-max-routes)",
        ),
        (deep, "nested more than 32 levels deep (--policy-max-depth)"),
    ] {
        let (code, body) = hook
            .validate(&review(
                "CREATE",
                ("sluice.dev", "RoutePolicy"),
                route_policy(spec),
            ))
            .await;
        assert_eq!(code, 200);
        assert_eq!(body["response"]["allowed"], false, "{body}");
        let message = body["response"]["status"]["message"].as_str().unwrap();
        assert!(message.ends_with(want), "{message}");
    }
}

#[tokio::test]
async fn deletes_and_other_kinds_are_allowed_and_garbage_is_a_400() {
    let hook = webhook().await;
    let mut delete = review("DELETE", ("sluice.dev", "RoutePolicy"), Value::Null);
    delete["request"]["oldObject"] = route_policy(spec((90, 20)));
    let (_, body) = hook.validate(&delete).await;
    assert_eq!(body["response"]["allowed"], true, "{body}");
    let (_, body) = hook
        .validate(&review(
            "CREATE",
            ("", "ConfigMap"),
            json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "x" } }),
        ))
        .await;
    assert_eq!(body["response"]["allowed"], true, "{body}");
    let (code, _) = hook.validate(&json!({ "kind": "nope" })).await;
    assert_eq!(code, 400);
}
