//! The sidecar injector's decision on pods built from arbitrary choices (annotations,
//! labels, containers with named and numbered ports, HTTP/TCP/exec probes, init
//! containers, volumes): never a panic; a patch applies to the pod as the API server
//! sent it and gives a pod that decodes, that the injector then leaves alone, whose
//! application containers are unchanged but for their HTTP probes, whose volume names
//! are unique and cover the proxy's mounts, and whose proxy knows every probe it took.

#![no_main]

use std::collections::BTreeSet;

use arbitrary::Arbitrary;
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use sluice_control_plane::inject::{
    ADMIN_PORT, ANNOTATION_STATUS, Decision, ENV_APP_PROBES, INIT_CONTAINER, InjectConfig,
    PROXY_CONTAINER, decide,
};

const KEYS: &[&str] = &[
    "sluice.dev/inject",
    "sluice.dev/skip-inbound-ports",
    "sluice.dev/skip-outbound-ports",
    "sluice.dev/proxy-cpu",
    "sluice.dev/proxy-memory",
    "sluice.dev/proxy-admin-token-secret",
    "sluice.dev/status",
    "app",
    "app.kubernetes.io/name",
    "a~b/c",
];
const VALUES: &[&str] = &[
    "enabled",
    "disabled",
    "false",
    "true",
    "",
    "80",
    "80,443",
    " 8080 , 9000 ",
    "abc",
    "70000",
    "0",
    "100m",
    "128Mi",
    "1e3",
    "1.5.0",
    "admin",
    "Bad_Name",
    "log",
];
const NAMES: &[&str] = &[
    "app",
    "web",
    "log",
    "sidecar",
    "sluice-proxy",
    "sluice-init",
];
const INIT_NAMES: &[&str] = &["migrate", "wait", "sluice-init"];
const PORT_NAMES: &[&str] = &["http", "admin", "metrics", "grpc"];
const PORTS: &[i64] = &[8080, 80, 9000, 15000, 15001, 15006, 5432];
const PROTOCOLS: &[Option<&str>] = &[None, Some("TCP"), Some("UDP")];
const PATHS: &[Option<&str>] = &[None, Some("/healthz"), Some("/"), Some("/a b?x=1")];
const VOLUMES: &[&str] = &[
    "data",
    "sluice-token",
    "sluice-trust-root",
    "sluice-admin-token",
    "config",
];

fn pick<T: Copy>(table: &[T], i: u8) -> T {
    table[usize::from(i) % table.len()]
}

#[derive(Arbitrary, Debug)]
enum ProbeSpec {
    Http {
        named: bool,
        port: u8,
        path: u8,
        scheme: Option<bool>,
        host: bool,
        headers: bool,
    },
    Tcp(u8),
    Exec,
}

#[derive(Arbitrary, Debug)]
struct ContainerSpec {
    ports: Option<Vec<(Option<u8>, u8, u8)>>,
    liveness: Option<ProbeSpec>,
    readiness: Option<ProbeSpec>,
    startup: Option<ProbeSpec>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    annotations: Option<Vec<(u8, u8)>>,
    labels: Option<Vec<(u8, u8)>>,
    containers: Vec<ContainerSpec>,
    init_containers: Option<Vec<u8>>,
    volumes: Option<Vec<u8>>,
    host_network: Option<bool>,
    trust_root: bool,
    admin_secret: bool,
    redis: bool,
    control_plane: bool,
}

fn map(pairs: &[(u8, u8)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .take(6)
            .map(|&(k, v)| (pick(KEYS, k).to_string(), json!(pick(VALUES, v))))
            .collect(),
    )
}

fn probe(p: &ProbeSpec) -> Value {
    match p {
        ProbeSpec::Http {
            named,
            port,
            path,
            scheme,
            host,
            headers,
        } => {
            let mut get = Map::new();
            get.insert(
                "port".into(),
                if *named {
                    json!(pick(PORT_NAMES, *port))
                } else {
                    json!(pick(PORTS, *port))
                },
            );
            if let Some(p) = pick(PATHS, *path) {
                get.insert("path".into(), json!(p));
            }
            if let Some(https) = scheme {
                get.insert(
                    "scheme".into(),
                    json!(if *https { "HTTPS" } else { "HTTP" }),
                );
            }
            if *host {
                get.insert("host".into(), json!("10.0.0.1"));
            }
            if *headers {
                get.insert(
                    "httpHeaders".into(),
                    json!([{"name": "x-probe", "value": "1"}]),
                );
            }
            json!({"httpGet": get, "periodSeconds": 5})
        }
        ProbeSpec::Tcp(port) => json!({"tcpSocket": {"port": pick(PORTS, *port)}}),
        ProbeSpec::Exec => json!({"exec": {"command": ["true"]}}),
    }
}

/// A container without its HTTP probes' targets: what injection must leave as it was.
fn without_http_gets(c: &Value) -> Value {
    let mut c = c.clone();
    for field in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(field).and_then(Value::as_object_mut) {
            p.remove("httpGet");
        }
    }
    c
}

fuzz_target!(|input: Input| {
    // The API server refuses a pod with two containers of one name before admission.
    let mut names = BTreeSet::new();
    let mut containers = Vec::new();
    for (i, c) in input.containers.iter().take(3).enumerate() {
        let name = pick(NAMES, i as u8);
        names.insert(name);
        let mut m = Map::new();
        m.insert("name".into(), json!(name));
        m.insert("image".into(), json!("app:1"));
        if let Some(ports) = &c.ports {
            let ports: Vec<Value> = ports
                .iter()
                .take(3)
                .map(|&(n, p, proto)| {
                    let mut port = Map::new();
                    if let Some(n) = n {
                        port.insert("name".into(), json!(pick(PORT_NAMES, n)));
                    }
                    port.insert("containerPort".into(), json!(pick(PORTS, p)));
                    if let Some(proto) = pick(PROTOCOLS, proto) {
                        port.insert("protocol".into(), json!(proto));
                    }
                    Value::Object(port)
                })
                .collect();
            m.insert("ports".into(), Value::Array(ports));
        }
        for (field, p) in [
            ("livenessProbe", &c.liveness),
            ("readinessProbe", &c.readiness),
            ("startupProbe", &c.startup),
        ] {
            if let Some(p) = p {
                m.insert(field.into(), probe(p));
            }
        }
        containers.push(Value::Object(m));
    }
    let mut spec = Map::new();
    spec.insert("containers".into(), Value::Array(containers.clone()));
    let mut init_names = Vec::new();
    if let Some(inits) = &input.init_containers {
        let inits: Vec<Value> = inits
            .iter()
            .take(2)
            .filter_map(|&n| {
                let name = pick(INIT_NAMES, n);
                names.insert(name).then_some(())?;
                init_names.push(name.to_string());
                Some(json!({"name": name, "image": "init:1"}))
            })
            .collect();
        spec.insert("initContainers".into(), Value::Array(inits));
    }
    if let Some(volumes) = &input.volumes {
        let mut seen = BTreeSet::new();
        let volumes: Vec<Value> = volumes
            .iter()
            .take(3)
            .map(|&v| pick(VOLUMES, v))
            .filter(|v| seen.insert(*v))
            .map(|v| json!({"name": v, "emptyDir": {}}))
            .collect();
        spec.insert("volumes".into(), Value::Array(volumes));
    }
    if let Some(h) = input.host_network {
        spec.insert("hostNetwork".into(), json!(h));
    }
    let mut metadata = Map::new();
    metadata.insert("name".into(), json!("pod-1"));
    metadata.insert("namespace".into(), json!("default"));
    if let Some(a) = &input.annotations {
        metadata.insert("annotations".into(), map(a));
    }
    if let Some(l) = &input.labels {
        metadata.insert("labels".into(), map(l));
    }
    let raw = json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec});
    let pod: Pod = serde_json::from_value(raw.clone()).expect("a well-formed pod decodes");
    let cfg = InjectConfig {
        control_plane_url: input
            .control_plane
            .then(|| "https://sluice-control-plane.sluice-system.svc:15010".to_string()),
        trust_root_configmap: input.trust_root.then(|| "sluice-trust-root".to_string()),
        redis_url_secret: input.redis.then(|| "sluice-redis".to_string()),
        admin_token_secret: input.admin_secret.then(|| "sluice-admin-token".to_string()),
        ..InjectConfig::default()
    };

    let Ok(Decision::Patch { ops, .. }) = decide(&pod, &cfg) else {
        return;
    };
    let patch: json_patch::Patch =
        serde_json::from_value(Value::Array(ops.clone())).expect("the ops are JSON Patch");
    let mut patched = raw.clone();
    if let Err(e) = json_patch::patch(&mut patched, &patch) {
        panic!("the patch does not apply: {e}\n{ops:#?}\n{raw:#}");
    }
    let after: Pod = serde_json::from_value(patched.clone()).expect("the patched pod decodes");
    assert!(
        matches!(decide(&after, &cfg), Ok(Decision::Skip(_))),
        "an injected pod is injected again"
    );
    let spec = &patched["spec"];
    let inits: Vec<&str> = spec["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let mut expected = vec![INIT_CONTAINER, PROXY_CONTAINER];
    expected.extend(init_names.iter().map(String::as_str));
    assert_eq!(
        inits, expected,
        "iptables, then the proxy, then the pod's own"
    );
    let after_containers = spec["containers"].as_array().expect("containers");
    assert_eq!(after_containers.len(), containers.len());
    for (before, after) in containers.iter().zip(after_containers) {
        assert_eq!(without_http_gets(before), without_http_gets(after));
    }
    let volumes: Vec<&str> = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let unique: BTreeSet<&str> = volumes.iter().copied().collect();
    assert_eq!(
        unique.len(),
        volumes.len(),
        "volume names are unique: {volumes:?}"
    );
    let proxy = &spec["initContainers"][1];
    for m in proxy["volumeMounts"].as_array().expect("mounts") {
        let name = m["name"].as_str().unwrap();
        assert!(
            unique.contains(name),
            "the proxy mounts {name}, not a volume"
        );
    }
    // Every HTTP probe now asks the proxy, which knows where the original went.
    let env = proxy["env"].as_array().expect("env");
    let probes: Value = env
        .iter()
        .find(|e| e["name"] == ENV_APP_PROBES)
        .map(|e| serde_json::from_str(e["value"].as_str().unwrap()).expect("probe table is JSON"))
        .unwrap_or(json!({}));
    for c in after_containers {
        for field in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let get = &c[field]["httpGet"];
            if get.is_null() || get["port"] != json!(ADMIN_PORT) {
                continue;
            }
            let path = get["path"].as_str().expect("path");
            let original = &probes[path];
            assert!(
                original["port"].as_i64().is_some_and(|p| p > 0),
                "{path} is forwarded to a numbered port: {probes:#}"
            );
        }
    }
    assert!(
        patched["metadata"]["annotations"][ANNOTATION_STATUS].is_string(),
        "the pod is marked injected"
    );
    if let Some(before) = raw["metadata"]["annotations"].as_object() {
        for (k, v) in before {
            assert_eq!(
                &patched["metadata"]["annotations"][k], v,
                "annotation {k} kept"
            );
        }
    }
});
