//! The mutation itself: from a pod to the JSON Patch (RFC 6902) that joins it to the mesh.
//!
//! The patch is computed from the pod as the API server sent it, op by op, rather than by
//! diffing a re-serialised typed pod: a typed round trip would drop fields this build's
//! Kubernetes types do not know, and the diff would then remove them from the user's pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

/// The UID the proxy runs as; the same number as `USER` in `proxy/Dockerfile` (a test checks).
pub const PROXY_UID: i64 = 1337;
/// Name of the injected proxy container (a native sidecar).
pub const PROXY_CONTAINER: &str = "sluice-proxy";
/// Name of the injected iptables init container.
pub const INIT_CONTAINER: &str = "sluice-init";
/// Name of the projected service-account token volume.
pub const TOKEN_VOLUME: &str = "sluice-token";
/// Where the token volume is mounted in the proxy container.
pub const TOKEN_DIR: &str = "/var/run/secrets/sluice";
/// Name of the volume holding the mesh root (from the trust-root ConfigMap).
pub const TRUST_ROOT_VOLUME: &str = "sluice-trust-root";
/// Where the trust-root volume is mounted in the proxy container.
pub const TRUST_ROOT_DIR: &str = "/var/run/sluice/trust-root";
/// Name of the volume holding the proxy's admin token (from a Secret).
pub const ADMIN_TOKEN_VOLUME: &str = "sluice-admin-token";
/// Where the admin-token volume is mounted in the proxy container; the proxy reads
/// `token` in it (`--admin-token-file`).
pub const ADMIN_TOKEN_DIR: &str = "/var/run/sluice/admin-token";
/// Audience of the projected token the proxy presents to the control plane's CA.
pub const TOKEN_AUDIENCE: &str = "sluice";
/// The proxy's admin port (probes, `/app-health/...`).
pub const ADMIN_PORT: i32 = 15000;
/// The proxy's outbound (intercepted) port.
pub const OUTBOUND_PORT: i32 = 15001;
/// The proxy's inbound (intercepted) port.
pub const INBOUND_PORT: i32 = 15006;

/// Annotation or label: `enabled` asks for injection, `disabled` (or `false`) refuses it.
pub const ANNOTATION_INJECT: &str = "sluice.dev/inject";
/// Annotation set on an injected pod; its presence makes injection a no-op.
pub const ANNOTATION_STATUS: &str = "sluice.dev/status";
/// Annotation: CPU request of the proxy (a Kubernetes quantity).
pub const ANNOTATION_CPU: &str = "sluice.dev/proxy-cpu";
/// Annotation: memory request and limit of the proxy (a Kubernetes quantity).
pub const ANNOTATION_MEMORY: &str = "sluice.dev/proxy-memory";
/// Annotation: comma-separated inbound ports that are not redirected to the proxy.
pub const ANNOTATION_SKIP_INBOUND: &str = "sluice.dev/skip-inbound-ports";
/// Annotation: comma-separated outbound destination ports that are not redirected.
pub const ANNOTATION_SKIP_OUTBOUND: &str = "sluice.dev/skip-outbound-ports";
/// Annotation: the Secret (in the pod's namespace, key `token`) holding this pod's proxy
/// admin token, instead of the injector's `--inject-admin-token-secret`; `disabled` (or
/// `false`) mounts none, leaving the admin port's protected routes closed.
pub const ANNOTATION_ADMIN_TOKEN_SECRET: &str = "sluice.dev/proxy-admin-token-secret";
/// Environment variable of the proxy holding the application's original HTTP probes
/// (JSON: `{"/app-health/<container>/<kind>": {"port": N, "path": ..., "scheme": ...}}`).
pub const ENV_APP_PROBES: &str = "SLUICE_APP_PROBES";

/// What the injected containers look like; set from the control plane's flags.
#[derive(Clone, Debug)]
pub struct InjectConfig {
    /// The proxy image (also runs the `init` step).
    pub proxy_image: String,
    /// The control-plane URL the proxy connects to, if any.
    pub control_plane_url: Option<String>,
    /// The ConfigMap (in the pod's namespace) holding the mesh root the proxy
    /// verifies the control plane with; mounted as `SLUICE_TRUST_ROOT`.
    pub trust_root_configmap: Option<String>,
    /// CPU request when the pod has no `sluice.dev/proxy-cpu` annotation.
    pub default_cpu: String,
    /// Memory request and limit when the pod has no `sluice.dev/proxy-memory` annotation.
    pub default_memory: String,
    /// A Secret (in the pod's namespace, key `url`) holding the Redis URL of the fleet
    /// rate limits; given to the proxy as `SLUICE_REDIS_URL` when the Secret exists.
    pub redis_url_secret: Option<String>,
    /// A Secret (in the pod's namespace, key `token`) holding the proxies' admin token,
    /// mounted into each proxy (`--admin-token-file`) unless the pod's
    /// `sluice.dev/proxy-admin-token-secret` annotation says otherwise.
    pub admin_token_secret: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            proxy_image: format!(
                "ghcr.io/sluice-mesh/sluice-proxy:{}",
                env!("CARGO_PKG_VERSION")
            ),
            control_plane_url: None,
            trust_root_configmap: None,
            default_cpu: "100m".to_owned(),
            default_memory: "128Mi".to_owned(),
            redis_url_secret: None,
            admin_token_secret: None,
        }
    }
}

/// Why a pod was not injected, or the patch that injects it.
#[derive(Debug)]
pub enum Decision {
    /// Leave the pod as it is; the reason is logged.
    Skip(&'static str),
    /// Apply these JSON Patch operations; the warnings go back to the client.
    Patch {
        /// RFC 6902 operations.
        ops: Vec<Value>,
        /// Warnings for the user (e.g. a probe that could not be rewritten).
        warnings: Vec<String>,
    },
}

/// A pod the webhook refuses, with a message for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Decides whether and how to inject `pod`.
///
/// Every pod that reaches the webhook is injected unless it opts out: the
/// `MutatingWebhookConfiguration`'s selectors decide which pods are sent.
pub fn decide(pod: &Pod, cfg: &InjectConfig) -> Result<Decision, Refusal> {
    let meta = &pod.metadata;
    let annotations = meta.annotations.clone().unwrap_or_default();
    let labels = meta.labels.clone().unwrap_or_default();
    let opt = annotations
        .get(ANNOTATION_INJECT)
        .or_else(|| labels.get(ANNOTATION_INJECT));
    if opt.is_some_and(|v| v == "disabled" || v == "false") {
        return Ok(Decision::Skip("opted out"));
    }
    let Some(spec) = &pod.spec else {
        return Err(Refusal("the pod has no spec".to_owned()));
    };
    let already = annotations.contains_key(ANNOTATION_STATUS)
        || spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .any(|c| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER);
    if already {
        return Ok(Decision::Skip("already injected"));
    }
    if spec.host_network == Some(true) {
        // iptables rules in the host's namespace would redirect the whole node.
        return Ok(Decision::Skip("host network"));
    }

    let skip_in = ports_annotation(&annotations, ANNOTATION_SKIP_INBOUND)?;
    let skip_out = ports_annotation(&annotations, ANNOTATION_SKIP_OUTBOUND)?;
    let mut warnings = Vec::new();
    let cpu = quantity_annotation(
        &annotations,
        ANNOTATION_CPU,
        &cfg.default_cpu,
        &mut warnings,
    );
    let memory = quantity_annotation(
        &annotations,
        ANNOTATION_MEMORY,
        &cfg.default_memory,
        &mut warnings,
    );

    let admin_secret = admin_token_secret(&annotations, cfg)?;

    let mut ops = Vec::new();
    let (probe_ops, probes) = rewrite_probes(&spec.containers, &mut warnings);

    let service = labels
        .get("app.kubernetes.io/name")
        .or_else(|| labels.get("app"))
        .cloned();
    // A port the pod skips reaches the application directly, so it cannot be the one
    // the proxy hands inbound requests to: README advises skipping a non-HTTP first port.
    let app_port = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                && !u16::try_from(p.container_port).is_ok_and(|n| skip_in.contains(&n))
        })
        .map(|p| p.container_port);
    for c in &spec.containers {
        for p in c.ports.iter().flatten() {
            if [ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT].contains(&p.container_port) {
                warnings.push(format!(
                    "container {} listens on port {}, which the sidecar takes (admin {ADMIN_PORT}, outbound {OUTBOUND_PORT}, inbound {INBOUND_PORT}): one of them will fail to bind",
                    c.name, p.container_port
                ));
            }
        }
    }
    // The API server would refuse the patched pod for a duplicate volume name, with a
    // message that does not say why.
    if let Some(v) = spec.volumes.iter().flatten().find(|v| {
        v.name == TOKEN_VOLUME
            || v.name == TRUST_ROOT_VOLUME
            || (admin_secret.is_some() && v.name == ADMIN_TOKEN_VOLUME)
    }) {
        return Err(Refusal(format!(
            "the pod has a volume named {:?}, a name the sidecar's injection uses; rename it, or opt out with {ANNOTATION_INJECT}: disabled",
            v.name
        )));
    }

    let init = init_container(cfg, &skip_in, &skip_out);
    let proxy = proxy_container(
        cfg,
        service.as_deref(),
        app_port,
        &probes,
        (&cpu, &memory),
        admin_secret.is_some(),
    );
    // The iptables step first, then the proxy, then the application's own init
    // containers: their traffic is redirected too, so the proxy must already run.
    match &spec.init_containers {
        Some(existing) if !existing.is_empty() => {
            ops.push(add("/spec/initContainers/0", proxy));
            ops.push(add("/spec/initContainers/0", init));
        }
        _ => ops.push(add("/spec/initContainers", json!([init, proxy]))),
    }
    let mut volumes = vec![json!({
        "name": TOKEN_VOLUME,
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}
    })];
    if let Some(name) = &cfg.trust_root_configmap {
        // Not optional: a proxy without the root cannot reach the control plane, and
        // the kubelet waits for the ConfigMap rather than start a proxy that fails.
        volumes.push(json!({"name": TRUST_ROOT_VOLUME, "configMap": {"name": name}}));
    }
    if let Some(name) = &admin_secret {
        // Optional: a namespace without the Secret still runs its pods, with the admin
        // port's protected routes closed (the proxy logs why) until the Secret is
        // created; the kubelet then fills the volume, and updates it when the Secret
        // changes, and the proxy reads the token on each request. Only the `token` key
        // is projected, and the whole directory is mounted (a subPath never updates).
        volumes.push(json!({"name": ADMIN_TOKEN_VOLUME, "secret": {
            "secretName": name, "optional": true, "items": [{"key": "token", "path": "token"}]}}));
    }
    match &spec.volumes {
        Some(v) if !v.is_empty() => {
            ops.extend(volumes.into_iter().map(|v| add("/spec/volumes/-", v)));
        }
        _ => ops.push(add("/spec/volumes", Value::Array(volumes))),
    }
    ops.extend(probe_ops);
    let status = json!(format!("injected {}", env!("CARGO_PKG_VERSION")));
    if meta.annotations.is_some() {
        ops.push(add(
            &format!("/metadata/annotations/{}", escape(ANNOTATION_STATUS)),
            status,
        ));
    } else {
        ops.push(add(
            "/metadata/annotations",
            json!({ ANNOTATION_STATUS: status }),
        ));
    }
    Ok(Decision::Patch { ops, warnings })
}

fn add(path: &str, value: Value) -> Value {
    json!({"op": "add", "path": path, "value": value})
}

/// Escapes a JSON Pointer reference token (RFC 6901).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn init_container(cfg: &InjectConfig, skip_in: &[u16], skip_out: &[u16]) -> Value {
    let mut args = vec![
        "init".to_owned(),
        "--proxy-uid".to_owned(),
        PROXY_UID.to_string(),
        "--outbound-port".to_owned(),
        OUTBOUND_PORT.to_string(),
        "--inbound-port".to_owned(),
        INBOUND_PORT.to_string(),
        "--admin-port".to_owned(),
        ADMIN_PORT.to_string(),
    ];
    for (flag, ports) in [
        ("--skip-inbound-ports", skip_in),
        ("--skip-outbound-ports", skip_out),
    ] {
        if !ports.is_empty() {
            args.push(flag.to_owned());
            args.push(join(ports));
        }
    }
    json!({
        "name": INIT_CONTAINER,
        "image": cfg.proxy_image,
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        // iptables needs root with NET_ADMIN/NET_RAW in the pod's network namespace only.
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
        }
    })
}

fn proxy_container(
    cfg: &InjectConfig,
    service: Option<&str>,
    app_port: Option<i32>,
    probes: &BTreeMap<String, Value>,
    (cpu, memory): (&str, &str),
    admin_token: bool,
) -> Value {
    let mut args = vec!["run".to_owned()];
    if let Some(s) = service {
        args.push("--service".to_owned());
        args.push(s.to_owned());
    }
    if admin_token {
        args.push(format!("--admin-token-file={ADMIN_TOKEN_DIR}/token"));
    }
    let mut env = vec![json!({"name": "SLUICE_ADMIN", "value": format!("0.0.0.0:{ADMIN_PORT}")})];
    if let Some(url) = &cfg.control_plane_url {
        env.push(json!({"name": "SLUICE_CONTROL_PLANE", "value": url}));
    }
    if let Some(port) = app_port {
        env.push(json!({"name": "SLUICE_APP", "value": format!("127.0.0.1:{port}")}));
    }
    if let Some(secret) = &cfg.redis_url_secret {
        // Optional: a namespace without the Secret runs fleet limits on their fallback.
        env.push(json!({"name": "SLUICE_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": secret, "key": "url", "optional": true}}}));
    }
    for (name, path) in [
        // The proxy's --node-id and --namespace, as the control plane lists them.
        ("SLUICE_NODE_ID", "metadata.name"),
        ("SLUICE_NAMESPACE", "metadata.namespace"),
        ("SLUICE_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ] {
        env.push(json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}));
    }
    env.push(json!({"name": "SLUICE_IDENTITY_TOKEN_FILE", "value": format!("{TOKEN_DIR}/token")}));
    let mut mounts = vec![json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true})];
    if cfg.trust_root_configmap.is_some() {
        env.push(json!({"name": "SLUICE_TRUST_ROOT", "value": format!("{TRUST_ROOT_DIR}/{}", crate::k8s::trust_root::TRUST_ROOT_KEY)}));
        mounts.push(
            json!({"name": TRUST_ROOT_VOLUME, "mountPath": TRUST_ROOT_DIR, "readOnly": true}),
        );
    }
    if admin_token {
        mounts.push(
            json!({"name": ADMIN_TOKEN_VOLUME, "mountPath": ADMIN_TOKEN_DIR, "readOnly": true}),
        );
    }
    if !probes.is_empty() {
        env.push(json!({"name": ENV_APP_PROBES, "value": Value::Object(probes.clone().into_iter().collect()).to_string()}));
    }
    let probe = |path: &str, failures: i32| json!({"httpGet": {"path": path, "port": ADMIN_PORT}, "periodSeconds": 2, "failureThreshold": failures});
    json!({
        "name": PROXY_CONTAINER,
        "image": cfg.proxy_image,
        "args": args,
        // A native sidecar: started before the app containers, stopped after them,
        // and it does not keep a Job's pod from completing.
        "restartPolicy": "Always",
        "env": env,
        "ports": [{"name": "sluice-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        // The kubelet starts the next container once the startup probe passes, so the
        // application never starts before the proxy listens.
        "startupProbe": probe("/live", 30),
        "livenessProbe": probe("/live", 3),
        "readinessProbe": probe("/ready", 3),
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}
        },
        "volumeMounts": mounts
    })
}

/// Rewrites every `httpGet` probe of the app containers to
/// `/app-health/<container>/<kind>` on the admin port; returns the replace ops and the
/// original targets by new path (for the proxy to forward to).
fn rewrite_probes(
    containers: &[Container],
    warnings: &mut Vec<String>,
) -> (Vec<Value>, BTreeMap<String, Value>) {
    let mut ops = Vec::new();
    let mut originals = BTreeMap::new();
    for (i, c) in containers.iter().enumerate() {
        let kinds: [(&str, &str, &Option<Probe>); 3] = [
            ("livenessProbe", "livez", &c.liveness_probe),
            ("readinessProbe", "readyz", &c.readiness_probe),
            ("startupProbe", "startupz", &c.startup_probe),
        ];
        for (field, kind, probe) in kinds {
            let Some(get) = probe.as_ref().and_then(|p| p.http_get.as_ref()) else {
                continue;
            };
            let port = match &get.port {
                IntOrString::Int(p) => Some(*p),
                IntOrString::String(name) => c
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .map(|p| p.container_port),
            };
            let Some(port) = port else {
                warnings.push(format!(
                    "sluice: {field} of container {} names port {:?}, which the container does not declare; probe left as is",
                    c.name, get.port
                ));
                continue;
            };
            let new_path = format!("/app-health/{}/{kind}", c.name);
            let mut original = json!({
                "port": port,
                "path": get.path.clone().unwrap_or_else(|| "/".to_owned()),
                "scheme": get.scheme.clone().unwrap_or_else(|| "HTTP".to_owned()),
            });
            if let Some(h) = &get.host {
                original["host"] = json!(h);
            }
            if let Some(h) = &get.http_headers {
                original["httpHeaders"] = json!(h);
            }
            originals.insert(new_path.clone(), original);
            ops.push(json!({
                "op": "replace",
                "path": format!("/spec/containers/{i}/{field}/httpGet"),
                "value": {"path": new_path, "port": ADMIN_PORT, "scheme": "HTTP"},
            }));
        }
    }
    (ops, originals)
}

/// The Secret whose `token` the proxy's admin port takes: the pod's annotation, else the
/// injector's setting.
fn admin_token_secret(
    annotations: &BTreeMap<String, String>,
    cfg: &InjectConfig,
) -> Result<Option<String>, Refusal> {
    let Some(v) = annotations.get(ANNOTATION_ADMIN_TOKEN_SECRET) else {
        return Ok(cfg.admin_token_secret.clone());
    };
    let v = v.trim();
    if v == "disabled" || v == "false" {
        return Ok(None);
    }
    check_secret_name(v).map_err(|why| {
        Refusal(format!(
            "annotation {ANNOTATION_ADMIN_TOKEN_SECRET}: {v:?} is not a Secret name ({why}); name a Secret of the pod's namespace, or write \"disabled\""
        ))
    })?;
    Ok(Some(v.to_owned()))
}

/// Checks a Secret name (an RFC 1123 subdomain, as the API server does), so a typo is
/// said by us rather than as a pod the API server refuses for its volume.
pub fn check_secret_name(name: &str) -> Result<(), &'static str> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if name.is_empty() || name.len() > 253 {
        return Err("1 to 253 characters");
    }
    if !name.chars().all(|c| alnum(c) || c == '-' || c == '.') {
        return Err("lower-case letters, digits, '-' and '.' only");
    }
    if !name.starts_with(alnum) || !name.ends_with(alnum) {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

fn ports_annotation(
    annotations: &BTreeMap<String, String>,
    key: &str,
) -> Result<Vec<u16>, Refusal> {
    let Some(v) = annotations.get(key) else {
        return Ok(Vec::new());
    };
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(Refusal(format!(
                "annotation {key}: {s:?} is not a port number (expected e.g. \"5432,8081\")"
            ))),
        })
        .collect()
}

fn quantity_annotation(
    annotations: &BTreeMap<String, String>,
    key: &str,
    default: &str,
    warnings: &mut Vec<String>,
) -> String {
    match annotations.get(key) {
        Some(v) if is_quantity(v) => v.clone(),
        Some(v) => {
            warnings.push(format!(
                "sluice: annotation {key}: {v:?} is not a Kubernetes quantity; using {default}"
            ));
            default.to_owned()
        }
        None => default.to_owned(),
    }
}

/// A simplified check of the Kubernetes quantity syntax (`100m`, `0.5`, `128Mi`, `1e3`),
/// so a typo is reported by us rather than as a pod the API server refuses.
fn is_quantity(s: &str) -> bool {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = !number.is_empty()
        && number.chars().filter(|c| *c == '.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    number_ok && suffix_ok
}

fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in ["100m", "0.5", "128Mi", "1", "2Gi", "1e3", "1.5"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "abc", "100mb", "1..2", "Mi", "-1", "1e"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn port_annotations() {
        let mut a = BTreeMap::new();
        a.insert(ANNOTATION_SKIP_INBOUND.to_owned(), "5432, 8081".to_owned());
        assert_eq!(
            ports_annotation(&a, ANNOTATION_SKIP_INBOUND).unwrap(),
            [5432, 8081]
        );
        a.insert(ANNOTATION_SKIP_INBOUND.to_owned(), "5432,http".to_owned());
        let e = ports_annotation(&a, ANNOTATION_SKIP_INBOUND).unwrap_err();
        assert!(e.0.contains("\"http\""), "{e}");
    }

    fn pod(spec: Value, annotations: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "api-0", "namespace": "shop", "annotations": annotations},
            "spec": spec,
        }))
        .unwrap()
    }

    fn proxy_env(ops: &[Value], name: &str) -> Option<String> {
        let proxy = ops
            .iter()
            .flat_map(|op| match &op["value"] {
                Value::Array(items) => items.clone(),
                v => vec![v.clone()],
            })
            .find(|c| c["name"] == PROXY_CONTAINER)?;
        proxy["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str().map(str::to_owned))
    }

    /// A first port the pod skips (README's advice for a non-HTTP one) is not the one
    /// the proxy hands inbound requests to: the first port not skipped is.
    #[test]
    fn the_application_port_is_the_first_one_not_skipped() {
        let spec = json!({"containers": [{"name": "app", "image": "api:1", "ports": [
            {"name": "raw", "containerPort": 5000}, {"name": "http", "containerPort": 8080}]}]});
        let skipping = pod(spec.clone(), json!({ANNOTATION_SKIP_INBOUND: "5000"}));
        let Decision::Patch { ops, .. } = decide(&skipping, &InjectConfig::default()).unwrap()
        else {
            panic!("not injected");
        };
        assert_eq!(
            proxy_env(&ops, "SLUICE_APP").as_deref(),
            Some("127.0.0.1:8080")
        );
        let Decision::Patch { ops, .. } =
            decide(&pod(spec, json!({})), &InjectConfig::default()).unwrap()
        else {
            panic!("not injected");
        };
        assert_eq!(
            proxy_env(&ops, "SLUICE_APP").as_deref(),
            Some("127.0.0.1:5000")
        );
    }

    /// A port the sidecar takes is warned about; a volume named as the sidecar's is
    /// refused, with why, rather than left for the API server to refuse without.
    #[test]
    fn clashes_with_the_sidecar_are_said() {
        let spec = json!({"containers": [{"name": "app", "image": "api:1", "ports": [
            {"containerPort": 15001}]}]});
        let Decision::Patch { warnings, .. } =
            decide(&pod(spec, json!({})), &InjectConfig::default()).unwrap()
        else {
            panic!("not injected");
        };
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("port 15001") && w.contains("app")),
            "{warnings:?}"
        );
        let spec = json!({"containers": [{"name": "app", "image": "api:1"}],
            "volumes": [{"name": TOKEN_VOLUME, "emptyDir": {}}]});
        let refusal = decide(&pod(spec, json!({})), &InjectConfig::default()).unwrap_err();
        assert!(refusal.0.contains("sluice-token"), "{refusal}");
    }

    /// The pod as the API server stores it after applying the patch `decide` gives.
    fn patched(pod_json: Value, cfg: &InjectConfig) -> Pod {
        let Decision::Patch { ops, .. } =
            decide(&serde_json::from_value(pod_json.clone()).unwrap(), cfg).unwrap()
        else {
            panic!("not injected");
        };
        let mut doc = pod_json;
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        serde_json::from_value(doc).unwrap()
    }

    fn admin_pod(annotations: Value, volumes: Option<Value>) -> Value {
        let mut spec = json!({"containers": [{"name": "app", "image": "api:1"}]});
        if let Some(v) = volumes {
            spec["volumes"] = v;
        }
        json!({"metadata": {"name": "api-0", "namespace": "shop", "annotations": annotations},
               "spec": spec})
    }

    /// The proxy container of an injected pod.
    fn injected_proxy(pod: &Pod) -> &Container {
        pod.spec
            .as_ref()
            .unwrap()
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == PROXY_CONTAINER)
            .unwrap()
    }

    /// What the patched pod gives the proxy for its admin token: the Secret its volume
    /// projects (and whether optional), the proxy's `--admin-token-file` argument and
    /// whether the volume is mounted read-only where that argument points.
    fn admin_token_of(pod: &Pod) -> Option<(String, Option<bool>, String, bool)> {
        let spec = pod.spec.as_ref().unwrap();
        let vol = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == ADMIN_TOKEN_VOLUME);
        let proxy = injected_proxy(pod);
        let arg = proxy
            .args
            .iter()
            .flatten()
            .find_map(|a| a.strip_prefix("--admin-token-file="));
        let mount = proxy
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == ADMIN_TOKEN_VOLUME);
        match (vol, arg, mount) {
            (None, None, None) => None,
            (Some(v), Some(arg), Some(m)) => {
                let secret = v.secret.as_ref().expect("a secret volume");
                let items = secret.items.as_deref().unwrap();
                assert_eq!(items.len(), 1, "only the token is projected");
                assert_eq!(
                    (items[0].key.as_str(), items[0].path.as_str()),
                    ("token", "token")
                );
                assert!(m.sub_path.is_none(), "a subPath mount is never updated");
                let under_mount = arg == format!("{}/token", m.mount_path);
                Some((
                    secret.secret_name.clone().unwrap(),
                    secret.optional,
                    arg.to_owned(),
                    under_mount && m.read_only == Some(true),
                ))
            }
            other => panic!("volume, argument and mount go together: {other:?}"),
        }
    }

    /// The injector's Secret becomes an optional, read-only volume the proxy reads its
    /// admin token from; a pod's annotation names another or turns it off; without
    /// either, nothing is added (the admin port's protected routes stay closed).
    #[test]
    fn the_admin_token_secret_is_mounted_for_the_proxy() {
        let cfg = InjectConfig {
            admin_token_secret: Some("sluice-proxy-admin".to_owned()),
            ..InjectConfig::default()
        };
        let expected = |name: &str| {
            Some((
                name.to_owned(),
                Some(true),
                "/var/run/sluice/admin-token/token".to_owned(),
                true,
            ))
        };
        let pod = patched(admin_pod(json!({}), None), &cfg);
        assert_eq!(admin_token_of(&pod), expected("sluice-proxy-admin"));
        // Beside volumes of the pod's own, appended, not replacing them.
        let pod = patched(
            admin_pod(json!({}), Some(json!([{"name": "data", "emptyDir": {}}]))),
            &cfg,
        );
        assert_eq!(admin_token_of(&pod), expected("sluice-proxy-admin"));
        let names: Vec<_> = pod
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(names, ["data", TOKEN_VOLUME, ADMIN_TOKEN_VOLUME]);

        let own = json!({ANNOTATION_ADMIN_TOKEN_SECRET: "api-admin"});
        let pod = patched(admin_pod(own.clone(), None), &cfg);
        assert_eq!(admin_token_of(&pod), expected("api-admin"));
        // The annotation alone is enough, with no injector default.
        let pod = patched(admin_pod(own, None), &InjectConfig::default());
        assert_eq!(admin_token_of(&pod), expected("api-admin"));

        for off in ["disabled", "false"] {
            let pod = patched(
                admin_pod(json!({ANNOTATION_ADMIN_TOKEN_SECRET: off}), None),
                &cfg,
            );
            assert_eq!(admin_token_of(&pod), None, "{off}");
        }
        let pod = patched(admin_pod(json!({}), None), &InjectConfig::default());
        assert_eq!(admin_token_of(&pod), None);
    }

    /// A pod that already has a volume of the name the admin token's uses is refused
    /// with why (only when that volume would be added), and so is a Secret name the API
    /// server would refuse.
    #[test]
    fn admin_token_clashes_and_bad_names_are_refused() {
        let cfg = InjectConfig {
            admin_token_secret: Some("sluice-proxy-admin".to_owned()),
            ..InjectConfig::default()
        };
        let clash = admin_pod(
            json!({}),
            Some(json!([{"name": ADMIN_TOKEN_VOLUME, "emptyDir": {}}])),
        );
        let refusal = decide(&serde_json::from_value(clash.clone()).unwrap(), &cfg).unwrap_err();
        assert!(
            refusal.0.contains("\"sluice-admin-token\"") && refusal.0.contains("rename it"),
            "{refusal}"
        );
        // Without the admin token the name is the pod's to use.
        let pod = patched(clash, &InjectConfig::default());
        let spec = pod.spec.as_ref().unwrap();
        let proxy = injected_proxy(&pod);
        assert!(
            !proxy
                .args
                .iter()
                .flatten()
                .any(|a| a.starts_with("--admin-token-file"))
        );
        assert_eq!(
            spec.volumes.as_ref().unwrap()[0].empty_dir,
            Some(Default::default())
        );

        for bad in ["Admin_Token", "-admin", "admin-", ""] {
            let pod = admin_pod(json!({ANNOTATION_ADMIN_TOKEN_SECRET: bad}), None);
            let refusal = decide(&serde_json::from_value(pod).unwrap(), &cfg).unwrap_err();
            assert!(
                refusal.0.contains(ANNOTATION_ADMIN_TOKEN_SECRET)
                    && refusal.0.contains("not a Secret name"),
                "{bad:?}: {refusal}"
            );
        }
        assert!(check_secret_name("sluice-proxy-admin.v2").is_ok());
        assert!(check_secret_name(&"a".repeat(254)).is_err());
    }

    #[test]
    fn pointer_tokens_are_escaped() {
        assert_eq!(escape("sluice.dev/status"), "sluice.dev~1status");
    }
}
