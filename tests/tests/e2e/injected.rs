//! An injected pod's proxy, started the way the kubelet would start it: the
//! webhook's patch gives it the control plane's `https://` URL, the projected
//! token and the trust-root ConfigMap the control plane publishes (here into the
//! stateful API double, since no API server runs here). With exactly that
//! environment and those files, the real proxy binary must verify the control
//! plane's TLS gRPC port, get its certificate and receive the mesh's policies.
//!
//! With the injector's admin-token Secret, the same proxy's admin port (bound beyond
//! loopback, as in a pod) opens its protected routes to an operator once the Secret
//! exists, and follows it when rotated: the volume is written the way the kubelet
//! writes a Secret volume (a `..data` symlink swapped to a new directory).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use sluice_control_plane::ca::{Ca, TokenFile};
use sluice_control_plane::inject::{
    ADMIN_TOKEN_VOLUME, Decision, InjectConfig, PROXY_CONTAINER, decide,
};
use sluice_control_plane::k8s::PublishTrustRoot;
use sluice_control_plane::k8s::double::ApiServer;
use sluice_control_plane::{ControlPlaneConfig, IdentityConfig, RunningControlPlane};
use sluice_e2e::{HttpConn, WAIT, wait_until};

const CONFIGMAP: &str = "sluice-trust-root";
const TOKEN: &str = "projected-token-of-orders";
const POLICY: &str = r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log, namespace: shop }
spec:
  host: log
  backends:
    v1: { addresses: ["127.0.0.1:9"] }
  routes:
    - name: all
"#;

/// A control plane with its CA whose root it publishes into the API double,
/// which holds one namespace, `shop`; returns it and the double.
async fn control_plane(dir: &Path) -> (RunningControlPlane, ApiServer) {
    let api = ApiServer::new();
    let shop = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"},
                      "status": {"phase": "Active"}});
    api.put(shop.clone());
    api.put_status(shop);
    let client = api.client();
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("log.yaml"), POLICY).unwrap();
    let ca = Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let tokens_path = dir.join("tokens");
    let tokens = TokenFile::parse(
        &tokens_path,
        &format!(r#"{{"token":"{TOKEN}","namespace":"shop","serviceAccount":"orders"}}"#),
    )
    .unwrap();
    let cp = sluice_control_plane::start(ControlPlaneConfig {
        policy_dir: policies,
        identity: Some(IdentityConfig::new(Arc::new(ca), Arc::new(tokens))),
        publish_trust_root: Some(PublishTrustRoot {
            client,
            configmap: CONFIGMAP.to_string(),
        }),
        ..ControlPlaneConfig::default()
    })
    .await
    .unwrap();
    (cp, api)
}

/// The order service's pod as its Deployment creates it.
fn pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "orders-7d9f8b6c5-x2kq4", "namespace": "shop",
                     "labels": {"app.kubernetes.io/name": "orders"}},
        "spec": {
            "serviceAccountName": "orders",
            "containers": [{"name": "orders", "image": "shop/orders:1",
                            "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]
        }
    })
}

/// Does what the kubelet does with the injected proxy container: materialises its
/// volumes under `root` (the ConfigMap from `configmap`, the projected token),
/// resolves `fieldRef`s, and points every mounted path into `root`.
fn kubelet_env(
    pod: &Pod,
    proxy: &Container,
    configmap: &Value,
    root: &Path,
) -> Vec<(String, String)> {
    let spec = pod.spec.as_ref().unwrap();
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in proxy.volume_mounts.iter().flatten() {
        let vol = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .unwrap_or_else(|| panic!("mount {} names no volume", m.name));
        let dir = root.join(&m.name);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(cm) = &vol.config_map {
            assert_eq!(
                cm.name, configmap["metadata"]["name"],
                "the mounted ConfigMap is the published one"
            );
            for (key, value) in configmap["data"].as_object().unwrap() {
                std::fs::write(dir.join(key), value.as_str().unwrap()).unwrap();
            }
        } else if let Some(secret) = &vol.secret {
            // The Secret does not exist yet: an optional volume starts empty, and
            // the test fills it later with `kubelet_write_secret`.
            assert_eq!(secret.optional, Some(true), "{vol:?}");
        } else if let Some(p) = &vol.projected {
            let sat = p.sources.as_ref().unwrap()[0]
                .service_account_token
                .as_ref()
                .unwrap();
            std::fs::write(dir.join(sat.path.as_str()), TOKEN).unwrap();
        } else {
            panic!("unexpected volume {vol:?}");
        }
        mounts.push((m.mount_path.clone(), dir));
    }
    let field = |path: &str| match path {
        "metadata.name" => pod.metadata.name.clone().unwrap(),
        "metadata.namespace" => pod.metadata.namespace.clone().unwrap(),
        "spec.serviceAccountName" => spec.service_account_name.clone().unwrap(),
        other => panic!("unexpected fieldRef {other}"),
    };
    proxy
        .env
        .iter()
        .flatten()
        .map(|e| {
            let mut value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => field(&from.field_ref.as_ref().unwrap().field_path),
                (None, None) => String::new(),
            };
            for (mount, dir) in &mounts {
                if let Some(rest) = value.strip_prefix(mount.as_str()) {
                    value = format!("{}{rest}", dir.display());
                }
            }
            (e.name.clone(), value)
        })
        .collect()
}

/// Rewrites the proxy's arguments as `kubelet_env` rewrites its environment: a path
/// under a mount points into `root`.
fn kubelet_args(proxy: &Container, root: &Path) -> Vec<String> {
    let mut args = proxy.args.clone().unwrap_or_default();
    for m in proxy.volume_mounts.iter().flatten() {
        let dir = root.join(&m.name);
        for a in &mut args {
            *a = a.replace(&m.mount_path, &dir.display().to_string());
        }
    }
    args
}

/// Writes a Secret volume's `files` as the kubelet's atomic writer does: a new
/// timestamped directory, a `..data` symlink renamed onto it, and each file name a
/// symlink through `..data`; the previous directory is then removed.
fn kubelet_write_secret(dir: &Path, files: &[(&str, &str)], generation: u32) {
    let fresh = format!("..2026_11_22_10_00_{generation:02}.{generation}");
    std::fs::create_dir(dir.join(&fresh)).unwrap();
    for (name, content) in files {
        std::fs::write(dir.join(&fresh).join(name), content).unwrap();
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&fresh, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), link).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// The proxy process: killed when the test ends, its log printed if the test failed.
struct Killed(Child, PathBuf);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            eprintln!("injected proxy log:\n{log}");
        }
    }
}

async fn admin_get(admin: std::net::SocketAddr, path: &str) -> Option<(StatusCode, String)> {
    let mut conn = HttpConn::h1(admin).await.ok()?;
    let reply = conn.get(&admin.to_string(), path).await.ok()?;
    Some((reply.status, reply.text()))
}

/// The pod `cfg` injects, and its proxy container.
fn inject(cfg: &InjectConfig) -> (Pod, Container) {
    let original: Pod = serde_json::from_value(pod()).unwrap();
    let Decision::Patch { ops, .. } = decide(&original, cfg).unwrap() else {
        panic!("the pod is injected");
    };
    let mut patched = pod();
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
    json_patch::patch(&mut patched, &patch).unwrap();
    let patched: Pod = serde_json::from_value(patched).unwrap();
    let proxy = patched
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == PROXY_CONTAINER)
        .unwrap()
        .clone();
    (patched, proxy)
}

/// The trust-root ConfigMap, once the control plane has published it into `shop`.
async fn published_root(api: &ApiServer) -> Value {
    wait_until("the root is published", WAIT, || {
        let found = api.get("configmaps", "shop", CONFIGMAP).is_some();
        async move { found }
    })
    .await;
    api.get("configmaps", "shop", CONFIGMAP).unwrap()
}

/// Starts the proxy binary with exactly `args` and `env` (none of the test's own
/// `SLUICE_*`), its admin bound at `admin_bind` and the other listeners on loopback;
/// returns it once ready, with its admin address and log file.
async fn start_as_kubelet(
    dir: &Path,
    args: Vec<String>,
    env: Vec<(String, String)>,
    admin_bind: &str,
) -> (Killed, std::net::SocketAddr, PathBuf) {
    let addr_file = dir.join("addrs.json");
    let log_path = dir.join("proxy.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-proxy"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SLUICE_") {
            cmd.env_remove(&key);
        }
    }
    cmd.args(args)
        .envs(env)
        .env("SLUICE_ADMIN", admin_bind)
        .env("SLUICE_OUTBOUND", "127.0.0.1:0")
        .env("SLUICE_INBOUND", "127.0.0.1:0")
        .env("SLUICE_ADDR_FILE", &addr_file)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log));
    let child = Killed(cmd.spawn().unwrap(), log_path.clone());
    let mut admin = None;
    wait_until("the proxy writes its addresses", WAIT, || {
        // The file gives a connectable address (loopback for `0.0.0.0`).
        let found = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["admin"].as_str()?.parse().ok());
        admin = found;
        async move { found.is_some() }
    })
    .await;
    let admin = admin.unwrap();
    wait_until("the injected proxy is ready", WAIT, || async move {
        matches!(admin_status(admin, "/ready", None).await, Some((200, _)))
    })
    .await;
    (child, admin, log_path)
}

#[tokio::test]
async fn an_injected_proxy_verifies_the_control_plane_with_the_published_root() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, api) = control_plane(dir.path()).await;

    // What the control plane published into the pod's namespace.
    let configmap = published_root(&api).await;
    assert_eq!(
        configmap["data"]["root.pem"].as_str(),
        cp.trust_root_pem(),
        "the ConfigMap holds the mesh root"
    );

    // What the webhook makes of the pod.
    let cfg = InjectConfig {
        control_plane_url: Some(cp.grpc_url()),
        trust_root_configmap: Some(CONFIGMAP.to_string()),
        ..InjectConfig::default()
    };
    assert!(cp.grpc_url().starts_with("https://"));
    let (patched, proxy) = inject(&cfg);

    // Started as the kubelet would, on loopback ports instead of the pod's.
    let root = dir.path().join("pod");
    let env = kubelet_env(&patched, &proxy, &configmap, &root);
    let names: Vec<_> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert!(names.contains(&"SLUICE_TRUST_ROOT"), "{names:?}");
    let (_child, admin, _log) =
        start_as_kubelet(dir.path(), proxy.args.clone().unwrap(), env, "127.0.0.1:0").await;

    // It certified over the verified TLS port, as its service account...
    let (_, identity) = admin_get(admin, "/identity").await.unwrap();
    let identity: Value = serde_json::from_str(&identity).unwrap();
    assert_eq!(
        identity["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/orders",
        "{identity}"
    );
    // ...and follows the control plane's policies.
    let (_, config) = admin_get(admin, "/config").await.unwrap();
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["version"].as_str(),
        cp.policy_version().as_deref(),
        "{config}"
    );
    cp.shutdown().await;
}

/// The status of a GET on the admin port, with `token` as a bearer when given.
async fn admin_status(
    admin: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, String)> {
    let mut conn = HttpConn::h1(admin).await.ok()?;
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    let reply = conn
        .request(hyper::Method::GET, "admin", path, &headers)
        .await
        .ok()?;
    Some((reply.status.as_u16(), reply.text()))
}

/// The walk-through's step 5 on an injected pod: the admin port is bound beyond
/// loopback, the injector mounts the admin-token Secret (optional, not created yet), so
/// `/breakers` is closed (403, saying why) while `/ready` answers; once the Secret is
/// created the token opens it without a restart, for curl and `sluicectl`; rotated,
/// the new token opens it and the old one no longer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_proxys_admin_port_opens_with_the_secret_and_follows_its_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, api) = control_plane(dir.path()).await;
    let configmap = published_root(&api).await;

    let cfg = InjectConfig {
        control_plane_url: Some(cp.grpc_url()),
        trust_root_configmap: Some(CONFIGMAP.to_string()),
        admin_token_secret: Some("sluice-proxy-admin".to_string()),
        ..InjectConfig::default()
    };
    let (patched, proxy) = inject(&cfg);

    let root = dir.path().join("pod");
    let env = kubelet_env(&patched, &proxy, &configmap, &root);
    assert!(
        env.contains(&("SLUICE_ADMIN".to_string(), "0.0.0.0:15000".to_string())),
        "the pod's admin port is bound beyond loopback: {env:?}"
    );
    let args = kubelet_args(&proxy, &root);
    let secret_dir = root.join(ADMIN_TOKEN_VOLUME);
    assert!(
        args.contains(&format!(
            "--admin-token-file={}/token",
            secret_dir.display()
        )),
        "{args:?}"
    );
    // Bound to 0.0.0.0 as in the pod, reached over loopback as `kubectl port-forward`
    // reaches it: that earns nothing.
    let (_child, admin, log_path) = start_as_kubelet(dir.path(), args, env, "0.0.0.0:0").await;

    // No Secret yet: the proxy runs, its protected routes are closed and say why.
    let (status, body) = admin_status(admin, "/breakers", Some("first-t0ken"))
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin token file"), "{body}");
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(logged.contains("admin token file unusable"), "{logged}");

    // `kubectl create secret generic sluice-proxy-admin --from-literal=token=…`.
    kubelet_write_secret(&secret_dir, &[("token", "first-t0ken\n")], 1);
    wait_until(
        "the created Secret's token opens /breakers",
        WAIT,
        || async move {
            matches!(
                admin_status(admin, "/breakers", Some("first-t0ken")).await,
                Some((200, _))
            )
        },
    )
    .await;
    assert_eq!(admin_status(admin, "/breakers", None).await.unwrap().0, 401);
    assert_eq!(
        admin_status(admin, "/config", Some("wrong"))
            .await
            .unwrap()
            .0,
        401
    );

    // sluicectl with the token file an operator saved from the Secret.
    let token_file = dir.path().join("proxy-admin.token");
    std::fs::write(&token_file, "first-t0ken\n").unwrap();
    let url = format!("http://{admin}");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_e2e-sluicectl"))
            .env_remove("SLUICECTL_PROXY")
            .env_remove("SLUICECTL_CONTROL_PLANE")
            .args(["--proxy", &url, "--token-file"])
            .arg(&token_file)
            .arg("breakers")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "sluicectl breakers: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Rotated: the kubelet swaps the files; no restart.
    kubelet_write_secret(&secret_dir, &[("token", "second-t0ken\n")], 2);
    wait_until("the rotated token opens /breakers", WAIT, || async move {
        matches!(
            admin_status(admin, "/breakers", Some("second-t0ken")).await,
            Some((200, _))
        )
    })
    .await;
    let (status, body) = admin_status(admin, "/breakers", Some("first-t0ken"))
        .await
        .unwrap();
    assert_eq!(status, 401, "the old token no longer opens: {body}");
    cp.shutdown().await;
}
