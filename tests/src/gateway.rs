//! Gateway API input end to end: the mesh conformance suite's cluster in the
//! Kubernetes API double, a control plane reading HTTPRoutes from it, a real proxy
//! subscribed to that control plane, and real upstreams behind the Services.
//!
//! The conformance suite's Services (`echo`, `echo-v1`, `echo-v2` in
//! `gateway-conformance-mesh`) each have ports 80 (`http`) and 8080 (`http-alt`).
//! Here each backend Service's two ports are two upstreams on 127.0.0.1, named
//! `echo-v1` (port 8080) and `echo-v1-http` (port 80), so a response's
//! `x-upstream` shows which Service *and* which port a request reached.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sluice_control_plane::k8s::double::{ApiServer, http_route_schema};
use sluice_control_plane::k8s::{KubeConfig, LeaseConfig};
use sluice_control_plane::{ControlPlaneConfig, RunningControlPlane};

use crate::{ProxyOptions, TestProxy, Upstream, WAIT, wait_until};

/// The conformance suite's namespace.
pub const MESH_NAMESPACE: &str = "gateway-conformance-mesh";

/// The text of a mesh conformance fixture (`httproute-weight`, ...).
pub fn conformance_fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../control-plane/testdata/gateway-api/conformance-mesh")
        .join(format!("{name}.yaml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The path of a mesh conformance fixture.
pub fn conformance_fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../control-plane/testdata/gateway-api/conformance-mesh")
        .join(format!("{name}.yaml"))
}

/// The documents of a YAML stream, as JSON.
pub fn yaml_documents(text: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

fn service(name: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": MESH_NAMESPACE },
            "spec": { "ports": [{ "name": "http", "port": 80 }, { "name": "http-alt", "port": 8080 }] } })
}

fn endpoint_slice(service: &str, http: &Upstream, http_alt: &Upstream) -> Value {
    json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": { "name": format!("{service}-slice"), "namespace": MESH_NAMESPACE,
                          "labels": { "kubernetes.io/service-name": service } },
            "ports": [{ "name": "http", "port": http.addr().port(), "protocol": "TCP" },
                      { "name": "http-alt", "port": http_alt.addr().port(), "protocol": "TCP" }],
            "endpoints": [{ "addresses": ["127.0.0.1"] }] })
}

/// The conformance cluster with HTTPRoutes, a control plane and a proxy.
pub struct GatewayMesh {
    /// The API double (HTTPRoutes' statuses are read back from it).
    pub api: ApiServer,
    /// The control plane, reading RoutePolicies and HTTPRoutes from `api`.
    pub cp: RunningControlPlane,
    /// A proxy subscribed to `cp` (the mesh client).
    pub proxy: TestProxy,
    _upstreams: Vec<Upstream>,
    _state: tempfile::TempDir,
}

impl GatewayMesh {
    /// Starts everything with `objects` (HTTPRoutes, maybe RoutePolicies) in the API,
    /// and waits until the proxy enforces a policy.
    pub async fn start(objects: &[Value]) -> Self {
        let api = ApiServer::new();
        api.install_gateway_api();
        let mut upstreams = Vec::new();
        for s in ["echo", "echo-v1", "echo-v2"] {
            api.put(service(s));
        }
        for s in ["echo-v1", "echo-v2"] {
            let http = Upstream::auto(&format!("{s}-http")).await;
            let alt = Upstream::auto(s).await;
            api.put(endpoint_slice(s, &http, &alt));
            upstreams.push(http);
            upstreams.push(alt);
        }
        for o in objects {
            api.put(o.clone());
        }
        let cp = sluice_control_plane::start(ControlPlaneConfig {
            kubernetes: Some(KubeConfig {
                client: api.client(),
                policies: true,
                lease: LeaseConfig::new("sluice-system", "sluice-control-plane", "cp-0"),
                trust_domain: "cluster.local".into(),
                pod_ip: None,
            }),
            ..ControlPlaneConfig::default()
        })
        .await
        .expect("start the control plane");
        wait_until("the control plane publishes", WAIT, || async {
            cp.policy_version().is_some()
        })
        .await;
        let state = tempfile::tempdir().expect("temporary directory");
        let proxy = TestProxy::start_subscribed(
            &format!("http://{}", cp.grpc_addr()),
            "mesh-client-0",
            state.path(),
            ProxyOptions::default(),
        )
        .await;
        Self {
            api,
            cp,
            proxy,
            _upstreams: upstreams,
            _state: state,
        }
    }

    /// Sluice's `status.parents` entry of HTTPRoute `name`, once one is written.
    pub async fn sluice_parent(&self, name: &str) -> Value {
        let mut found = Value::Null;
        wait_until(
            &format!("HTTPRoute {name} has Sluice's status"),
            WAIT,
            || {
                let obj = self.api.get("httproutes", MESH_NAMESPACE, name);
                let entry = obj.and_then(|o| {
                    o["status"]["parents"]
                        .as_array()?
                        .iter()
                        .find(|p| p["controllerName"] == "sluice.dev/mesh")
                        .cloned()
                });
                let done = entry.is_some();
                if let Some(e) = entry {
                    found = e;
                }
                async move { done }
            },
        )
        .await;
        found
    }

    /// Stops the proxy and the control plane.
    pub async fn shutdown(self) {
        self.proxy.shutdown().await;
        self.cp.shutdown().await;
    }
}

/// The condition `ty` of a `status.parents` entry.
pub fn parent_condition<'a>(parent: &'a Value, ty: &str) -> &'a Value {
    parent["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == ty))
        .unwrap_or(&Value::Null)
}

/// The Python of the test venv (`tests/setup.sh`), which has `jsonschema`.
fn test_python() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_TEST_PYTHON") {
        return p.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("sluice-ci/test-venv/bin/python")
}

/// Validates `objects` (whole HTTPRoutes, status included) against the HTTPRoute
/// CRD's `v1` schema with Python's `jsonschema`; every error found, if any.
pub fn validate_httproutes(objects: &[Value]) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let schema = dir.path().join("schema.json");
    let data = dir.path().join("objects.json");
    std::fs::write(&schema, http_route_schema().to_string()).map_err(|e| e.to_string())?;
    std::fs::write(&data, Value::from(objects.to_vec()).to_string()).map_err(|e| e.to_string())?;
    let script = r#"
import json, sys, jsonschema
schema = json.load(open(sys.argv[1]))
errors = []
for obj in json.load(open(sys.argv[2])):
    v = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
    for e in v.iter_errors(obj):
        errors.append("%s: %s: %s" % (obj["metadata"]["name"], "/".join(map(str, e.absolute_path)), e.message))
print("\n".join(errors))
sys.exit(1 if errors else 0)
"#;
    let out = std::process::Command::new(test_python())
        .arg("-c")
        .arg(script)
        .arg(&schema)
        .arg(&data)
        .output()
        .map_err(|e| format!("{}: {e} (run tests/setup.sh)", test_python().display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
