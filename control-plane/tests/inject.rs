//! The injection webhook over real TLS on 127.0.0.1: AdmissionReviews shaped as the
//! API server sends them, the returned JSON Patch applied both with `json-patch` and
//! with `kubectl patch --local`, the result read back as a typed `k8s_openapi` Pod.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, Pod};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use sluice_control_plane::inject::{
    INIT_CONTAINER, InjectConfig, PROXY_CONTAINER, PROXY_UID, RunningWebhook, TRUST_ROOT_DIR,
    TRUST_ROOT_VOLUME, WebhookConfig, WebhookTls, start_webhook,
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
        inject: InjectConfig {
            proxy_image: "registry.example/sluice-proxy:test".to_owned(),
            control_plane_url: Some("https://sluice-control-plane.sluice:15010".to_owned()),
            trust_root_configmap: Some("sluice-trust-root".to_owned()),
            redis_url_secret: Some("sluice-redis".to_owned()),
            ..InjectConfig::default()
        },
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
    /// POSTs `body` to `/inject` over TLS; returns the status and body.
    async fn post(&self, body: Vec<u8>) -> (u16, Vec<u8>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.running.addr())
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post("/inject?timeout=10s")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body.to_vec())
    }
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/admission")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Sends a fixture; returns the AdmissionReview's `response`.
async fn review(hook: &Webhook, name: &str) -> Value {
    let req = fixture(name);
    let (status, body) = hook.post(serde_json::to_vec(&req).unwrap()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let resp = review["response"].clone();
    assert_eq!(resp["uid"], req["request"]["uid"], "the uid is echoed");
    resp
}

/// The patch bytes of a response (kube-core sends them as a JSON byte array, which the
/// API server's decoder accepts like the base64 form).
fn patch_of(resp: &Value) -> Value {
    assert_eq!(resp["allowed"], true, "{resp}");
    assert_eq!(resp["patchType"], "JSONPatch");
    let bytes: Vec<u8> = serde_json::from_value(resp["patch"].clone()).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Applies the patch with json-patch and with `kubectl patch --local`; both must agree.
fn apply(name: &str, patch: &Value) -> Pod {
    let original = fixture(name)["request"]["object"].clone();
    let mut doc = original.clone();
    let ops: json_patch::Patch = serde_json::from_value(patch.clone()).unwrap();
    json_patch::patch(&mut doc, &ops).unwrap();

    // `kubectl` from PATH (tests/setup.sh installs it), or where KUBECTL says.
    let kubectl = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("pod.json");
    std::fs::write(&file, serde_json::to_vec(&original).unwrap()).unwrap();
    let out = Command::new(kubectl)
        .args(["patch", "--local", "-f"])
        .arg(&file)
        .args(["--type=json", "-p", &patch.to_string(), "-o", "json"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "kubectl is needed to check the patch applies as the API server would \
                 (run tests/setup.sh, or set KUBECTL): {e}"
            )
        });
    assert!(
        out.status.success(),
        "kubectl patch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_kubectl: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(by_kubectl["spec"], doc["spec"]);
    assert_eq!(
        by_kubectl["metadata"]["annotations"],
        doc["metadata"]["annotations"]
    );
    serde_json::from_value(doc).unwrap()
}

fn init_containers(pod: &Pod) -> &[Container] {
    pod.spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_deref()
        .unwrap()
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

#[tokio::test]
async fn deployment_pod_gets_init_step_native_sidecar_and_rewritten_probes() {
    let hook = webhook().await;
    let resp = review(&hook, "deployment-pod.json").await;
    let pod = apply("deployment-pod.json", &patch_of(&resp));
    let inits = init_containers(&pod);
    let names: Vec<_> = inits.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER]);

    let init = &inits[0];
    assert_eq!(
        init.image.as_deref(),
        Some("registry.example/sluice-proxy:test")
    );
    assert_eq!(
        init.args.as_ref().unwrap()[..3],
        ["init", "--proxy-uid", "1337"]
    );
    let sc = init.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(0));
    let caps = sc.capabilities.as_ref().unwrap().add.clone().unwrap();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(init.restart_policy, None, "the init step runs once");

    let proxy = &inits[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        proxy.args.as_ref().unwrap(),
        &["run", "--service", "orders"]
    );
    let sc = proxy.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(PROXY_UID));
    assert_eq!(env(proxy, "SLUICE_ADMIN"), Some("0.0.0.0:15000"));
    assert_eq!(env(proxy, "SLUICE_APP"), Some("127.0.0.1:8080"));
    assert_eq!(
        env(proxy, "SLUICE_CONTROL_PLANE"),
        Some("https://sluice-control-plane.sluice:15010")
    );
    let field = |name: &str| {
        let e = proxy.env.iter().flatten().find(|e| e.name == name).unwrap();
        let f = e.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        f.field_path.clone()
    };
    assert_eq!(field("SLUICE_NODE_ID"), "metadata.name");
    assert_eq!(field("SLUICE_NAMESPACE"), "metadata.namespace");
    // The fleet rate limits' Redis URL, from a Secret that may be missing.
    let redis = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "SLUICE_REDIS_URL")
        .and_then(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
        .unwrap();
    assert_eq!(
        (redis.name.as_str(), redis.key.as_str(), redis.optional),
        ("sluice-redis", "url", Some(true))
    );
    let ready = proxy
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/ready"));
    let live = proxy
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/live"));
    let res = proxy.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(res["cpu"].0, "100m");
    assert_eq!(res["memory"].0, "128Mi");

    // Identity: the projected token volume, mounted in the proxy.
    let spec = pod.spec.as_ref().unwrap();
    let vol = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "sluice-token")
        .unwrap();
    let sat = vol.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .as_ref()
        .unwrap();
    assert_eq!(sat.audience.as_deref(), Some("sluice"));
    assert_eq!(
        spec.volumes.as_ref().unwrap().len(),
        3,
        "the existing volume is kept"
    );
    let mount = |name: &str| {
        proxy
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} is mounted"))
            .clone()
    };
    assert_eq!(mount("sluice-token").read_only, Some(true));

    // The mesh root from the ConfigMap the control plane keeps in the namespace:
    // what verifies the https:// control plane.
    let root = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == TRUST_ROOT_VOLUME)
        .unwrap();
    let cm = root.config_map.as_ref().unwrap();
    assert_eq!(cm.name, "sluice-trust-root");
    assert_ne!(cm.optional, Some(true), "no proxy starts without the root");
    let m = mount(TRUST_ROOT_VOLUME);
    assert_eq!(m.mount_path, TRUST_ROOT_DIR);
    assert_eq!(m.read_only, Some(true));
    assert_eq!(
        env(proxy, "SLUICE_TRUST_ROOT"),
        Some(format!("{TRUST_ROOT_DIR}/root.pem").as_str())
    );

    // The app's probes go through the admin port; the originals ride along for the proxy.
    let app = &spec.containers[0];
    let live = app
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/app-health/orders/livez"));
    assert_eq!(
        live.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15000)
    );
    assert_eq!(
        app.liveness_probe.as_ref().unwrap().period_seconds,
        Some(10)
    );
    let ready = app
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/app-health/orders/readyz"));
    let originals: Value = serde_json::from_str(env(proxy, "SLUICE_APP_PROBES").unwrap()).unwrap();
    assert_eq!(
        originals["/app-health/orders/livez"]["port"], 8080,
        "named port resolved"
    );
    assert_eq!(originals["/app-health/orders/livez"]["path"], "/healthz");
    assert_eq!(originals["/app-health/orders/readyz"]["path"], "/ready");

    let ann = pod.metadata.annotations.as_ref().unwrap();
    assert!(ann["sluice.dev/status"].starts_with("injected"));
    hook.running.shutdown().await;
}

#[tokio::test]
async fn job_pod_keeps_its_init_containers_after_the_sidecar() {
    let hook = webhook().await;
    let resp = review(&hook, "job-pod.json").await;
    let pod = apply("job-pod.json", &patch_of(&resp));
    let names: Vec<_> = init_containers(&pod)
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let volumes: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        volumes,
        ["sluice-token", TRUST_ROOT_VOLUME],
        "a pod without volumes gets both"
    );
    let proxy = &init_containers(&pod)[1];
    assert_eq!(
        proxy.args.as_ref().unwrap(),
        &["run", "--service", "nightly-report"]
    );
    assert_eq!(
        env(proxy, "SLUICE_APP"),
        None,
        "no declared port, no app address"
    );
    let ann = pod.metadata.annotations.as_ref().unwrap();
    assert!(
        ann.contains_key("batch.kubernetes.io/job-tracking"),
        "existing annotations kept"
    );
    hook.running.shutdown().await;
}

#[tokio::test]
async fn skipped_ports_and_resources_from_annotations() {
    let hook = webhook().await;
    let resp = review(&hook, "skip-ports.json").await;
    let pod = apply("skip-ports.json", &patch_of(&resp));
    let inits = init_containers(&pod);
    let args = inits[0].args.clone().unwrap();
    let after = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
    assert_eq!(after("--skip-inbound-ports"), "9090,9091");
    assert_eq!(after("--skip-outbound-ports"), "5432");
    let res = inits[1].resources.as_ref().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "250m");
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "256Mi");

    let app = &pod.spec.as_ref().unwrap().containers[0];
    let startup = app
        .startup_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(startup.path.as_deref(), Some("/app-health/ledger/startupz"));
    assert!(
        startup.http_headers.is_none(),
        "headers are the proxy's to send now"
    );
    assert!(
        app.liveness_probe.as_ref().unwrap().tcp_socket.is_some(),
        "TCP probes untouched"
    );
    let originals: Value =
        serde_json::from_str(env(&inits[1], "SLUICE_APP_PROBES").unwrap()).unwrap();
    let o = &originals["/app-health/ledger/startupz"];
    assert_eq!(o["scheme"], "HTTPS");
    assert_eq!(o["httpHeaders"][0]["name"], "X-Probe");
    hook.running.shutdown().await;
}

#[tokio::test]
async fn injected_and_opted_out_pods_are_left_alone() {
    let hook = webhook().await;
    for name in ["injected-pod.json", "opted-out-pod.json"] {
        let resp = review(&hook, name).await;
        assert_eq!(resp["allowed"], true, "{name}: {resp}");
        assert!(resp.get("patch").is_none(), "{name}: {resp}");
    }
    hook.running.shutdown().await;
}

#[tokio::test]
async fn malformed_reviews_get_a_clear_answer() {
    let hook = webhook().await;
    // A review whose pod cannot be read: answered (the uid echoed), denied with the reason.
    let resp = review(&hook, "malformed-pod.json").await;
    assert_eq!(resp["allowed"], false);
    assert_eq!(resp["status"]["code"], 400);
    let msg = resp["status"]["message"].as_str().unwrap();
    assert!(msg.contains("unreadable pod"), "{msg}");

    // Not a review at all: no uid to answer with, so a plain 400 the API server reports.
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/admission/not-a-review.json"),
    )
    .unwrap();
    let (status, body) = hook.post(bytes).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("malformed AdmissionReview"));
    let (status, _) = hook
        .post(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#.to_vec())
        .await;
    assert_eq!(status, 400);
    // The server is still up.
    let resp = review(&hook, "opted-out-pod.json").await;
    assert_eq!(resp["allowed"], true);
    hook.running.shutdown().await;
}

#[test]
fn proxy_uid_matches_the_proxy_image() {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy/Dockerfile"))
            .unwrap();
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("proxy/Dockerfile has a USER line");
    let uid: i64 = user.split(':').next().unwrap().trim().parse().unwrap();
    assert_eq!(
        uid, PROXY_UID,
        "proxy/Dockerfile USER vs the injected runAsUser"
    );
}

/// The certificate the webhook presents on a new handshake (trusting only `roots`).
async fn served_certificate(
    addr: std::net::SocketAddr,
    roots: Arc<rustls::RootCertStore>,
) -> Result<Vec<u8>, std::io::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    Ok(conn.peer_certificates().unwrap()[0].to_vec())
}

/// Replaces `path` atomically, as a Secret volume or cert-manager's writer would.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_on_the_next_handshake_without_restart() {
    let hook = webhook().await;
    let dir = hook._dir.path();
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    let first = std::fs::read_to_string(&cert_path).unwrap();
    let first_der = CertificateDer::from_pem_slice(first.as_bytes())
        .unwrap()
        .to_vec();
    let next = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let mut roots = (*hook.roots).clone();
    roots.add(next.cert.der().clone()).unwrap();
    let roots = Arc::new(roots);
    let addr = hook.running.addr();
    assert_eq!(
        served_certificate(addr, roots.clone()).await.unwrap(),
        first_der
    );

    // A rotation caught half way (the new certificate, the old key) is not served: every
    // handshake meanwhile still succeeds with the first certificate.
    replace(&cert_path, &next.cert.pem());
    for _ in 0..5 {
        assert_eq!(
            served_certificate(addr, roots.clone()).await.unwrap(),
            first_der
        );
    }
    // The key arrives: the next handshakes present the new certificate, no restart.
    replace(&key_path, &next.signing_key.serialize_pem());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let served = served_certificate(addr, roots.clone())
            .await
            .expect("every handshake during the rotation succeeds");
        if served == next.cert.der().to_vec() {
            break;
        }
        assert_eq!(served, first_der);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Reviews are answered over the new certificate, with it trusted alone.
    let mut only_next = rustls::RootCertStore::empty();
    only_next.add(next.cert.der().clone()).unwrap();
    let hook = Webhook {
        roots: Arc::new(only_next),
        ..hook
    };
    let resp = review(&hook, "deployment-pod.json").await;
    assert_eq!(resp["allowed"], true);
}
