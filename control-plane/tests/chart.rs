//! The Helm chart as the cluster would receive it: `charts/check.py --render-only`
//! renders `charts/sluice` with the real Helm engine (PyPI `helm-python-sdk`), and
//! every object is read back here as its `k8s_openapi` type.
//!
//! - Each object must survive a round trip through its typed form unchanged, so a
//!   misspelt or misplaced field (which serde would otherwise skip) fails.
//! - The control plane's arguments and `SLUICE_*` variables are parsed by its own
//!   clap definition, so the chart cannot pass a flag the binary does not have.
//! - The webhook serving certificate and the CA bundle in the webhook configurations
//!   must agree: the real webhook server is started with the rendered certificate and
//!   a TLS client trusting only the rendered `caBundle` reaches it under the Service's
//!   DNS name, as the API server does.
//! - RBAC grants exactly the API calls the control plane makes for the features on.
//!
//! The Python interpreter is `$SLUICE_PYTHON`, else the venv `tests/setup.sh` installs
//! (`~/.cache/sluice-ci/venv`), else `python3`; it needs `helm-python-sdk` and PyYAML.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use clap::{CommandFactory, Parser};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_control_plane::Args;
use sluice_control_plane::inject::{WebhookTls, start_webhook};

const NAMESPACE: &str = "sluice-system";
const FULLNAME: &str = "sluice-control-plane";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_PYTHON") {
        return p.into();
    }
    // Where tests/setup.sh puts it.
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
    if let Some(cache) = cache {
        let venv = cache.join("sluice-ci/venv/bin/python");
        if venv.exists() {
            return venv;
        }
    }
    "python3".into()
}

/// The rendered values sets (`default`, `ha`, `dir-certmanager`), each as a list of
/// objects; rendered once per test binary.
fn rendered(set: &str) -> Vec<Value> {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(python())
            .arg(repo().join("charts/check.py"))
            .arg("--render-only")
            .arg("--out")
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", python().display()));
        assert!(
            out.status.success(),
            "charts/check.py --render-only failed (it needs helm-python-sdk and PyYAML; \
             tests/setup.sh installs them into ~/.cache/sluice-ci/venv):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    });
    let text = std::fs::read_to_string(dir.path().join(format!("{set}.yaml"))).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Reads `obj` as `T` and checks that nothing was lost on the way: serde skips fields
/// it does not know, so a typo would otherwise pass unseen.
fn typed<T: DeserializeOwned + Serialize>(obj: &Value) -> T {
    let what = format!("{} {}", obj["kind"], obj["metadata"]["name"]);
    let t: T = serde_json::from_value(obj.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&t).unwrap();
    let mut lost = Vec::new();
    diff(
        &without_nulls(obj),
        &without_nulls(&back),
        &mut String::new(),
        &mut lost,
    );
    assert!(
        lost.is_empty(),
        "{what}: fields not in the {} type: {lost:#?}",
        std::any::type_name::<T>()
    );
    t
}

fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

fn diff(a: &Value, b: &Value, path: &mut String, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                match y.get(k) {
                    Some(vb) => diff(va, vb, path, out),
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                diff(va, vb, path, out);
                path.truncate(len);
            }
        }
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Every object of a set, as its typed form; cert-manager's kinds and PrometheusRules
/// (no k8s-openapi type) are only named or counted.
#[derive(Default)]
struct Objects {
    crds: Vec<CustomResourceDefinition>,
    deployment: Option<Deployment>,
    service: Option<Service>,
    service_account: Option<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    secrets: Vec<Secret>,
    config_maps: Vec<ConfigMap>,
    mutating: Vec<MutatingWebhookConfiguration>,
    validating: Vec<ValidatingWebhookConfiguration>,
    pdbs: Vec<PodDisruptionBudget>,
    cert_manager: Vec<String>,
    prometheus_rules: usize,
}

fn objects(set: &str) -> Objects {
    let mut o = Objects::default();
    for obj in rendered(set) {
        let api = obj["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
        match (api.as_str(), kind.as_str()) {
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => o.crds.push(typed(&obj)),
            ("apps/v1", "Deployment") => {
                assert!(
                    o.deployment.replace(typed(&obj)).is_none(),
                    "two Deployments"
                )
            }
            ("v1", "Service") => assert!(o.service.replace(typed(&obj)).is_none()),
            ("v1", "ServiceAccount") => assert!(o.service_account.replace(typed(&obj)).is_none()),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => o.cluster_roles.push(typed(&obj)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                o.cluster_role_bindings.push(typed(&obj))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => o.roles.push(typed(&obj)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => o.role_bindings.push(typed(&obj)),
            ("v1", "Secret") => o.secrets.push(typed(&obj)),
            ("v1", "ConfigMap") => o.config_maps.push(typed(&obj)),
            ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
                o.mutating.push(typed(&obj))
            }
            ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration") => {
                o.validating.push(typed(&obj))
            }
            ("policy/v1", "PodDisruptionBudget") => o.pdbs.push(typed(&obj)),
            ("cert-manager.io/v1", _) => o
                .cert_manager
                .push(format!("{kind}/{}", obj["metadata"]["name"])),
            ("monitoring.coreos.com/v1", "PrometheusRule") => o.prometheus_rules += 1,
            _ => panic!("{set}: unexpected object {api} {kind}"),
        }
    }
    o
}

#[test]
fn every_rendered_object_reads_back_as_its_kubernetes_type() {
    for set in ["default", "ha", "dir-certmanager"] {
        let o = objects(set);
        assert_eq!(o.crds.len(), 1, "{set}: the RoutePolicy CRD");
        assert!(
            o.deployment.is_some() && o.service.is_some() && o.service_account.is_some(),
            "{set}"
        );
        for roles in [o.roles.len(), o.role_bindings.len()] {
            assert_eq!(roles, 1, "{set}");
        }
    }
    let cm = objects("dir-certmanager");
    assert_eq!(cm.cert_manager.len(), 4, "{:?}", cm.cert_manager);
    assert!(
        cm.secrets.is_empty(),
        "cert-manager makes the webhook Secret, and the admin token's is the operator's own"
    );
}

fn container_args(d: &Deployment) -> (Vec<String>, Vec<String>) {
    let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let [c] = spec.containers.as_slice() else {
        panic!("one container")
    };
    let env = c.env.iter().flatten().map(|e| e.name.clone()).collect();
    (c.args.clone().unwrap_or_default(), env)
}

/// The mount paths of the control plane's container.
fn container_mounts(d: &Deployment) -> Vec<PathBuf> {
    let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    spec.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| PathBuf::from(&m.mount_path))
        .collect()
}

fn parse_args(d: &Deployment) -> Args {
    let (args, env) = container_args(d);
    let cmd = Args::command();
    let known: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    for name in env {
        assert!(
            known.contains(&name),
            "the chart sets {name}, which no flag reads; flags read {known:?}"
        );
    }
    let parsed = Args::try_parse_from(
        std::iter::once("sluice-control-plane".to_owned()).chain(args.clone()),
    )
    .unwrap_or_else(|e| panic!("the control plane refuses the chart's arguments {args:?}:\n{e}"));
    if let Err(e) = parsed.check() {
        panic!("the control plane refuses the chart's arguments {args:?}: {e}");
    }
    parsed
}

#[test]
fn the_control_plane_accepts_the_charts_flags_and_probes_its_admin_port() {
    for set in ["default", "ha", "dir-certmanager"] {
        let d = objects(set).deployment.unwrap();
        let args = parse_args(&d);
        assert_eq!(args.admin.port(), 15014, "{set}");
        assert_eq!(args.grpc.port(), 15010, "{set}");
        let host = format!("{FULLNAME}.{NAMESPACE}.svc");
        assert!(
            args.ca.server_names.contains(&host),
            "{set}: the gRPC certificate names {host}"
        );
        let cfg = args.webhook.to_config(None).expect("the webhooks are on");
        assert_eq!(cfg.addr.port(), 15017);
        assert!(
            matches!(cfg.tls, WebhookTls::Files { .. }),
            "{set}: the webhook serves the chart's certificate"
        );
        let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let c = &spec.containers[0];
        for (probe, path) in [(&c.liveness_probe, "/live"), (&c.readiness_probe, "/ready")] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.path.as_deref(), Some(path));
            let port = match &get.port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => {
                    c.ports
                        .iter()
                        .flatten()
                        .find(|p| p.name.as_deref() == Some(name))
                        .unwrap()
                        .container_port
                }
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
            };
            assert_eq!(port, 15014, "{set}: {path} on the admin port");
        }
        let labels = spec_labels(&d);
        assert_eq!(
            labels.get("sluice.dev/inject").map(String::as_str),
            Some("disabled"),
            "never inject the control plane"
        );
    }
    let svc = objects("default").service.unwrap();
    let ports: Vec<_> = svc
        .spec
        .unwrap()
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.port))
        .collect();
    assert_eq!(
        ports,
        [
            ("grpc".into(), 15010),
            ("admin".into(), 15014),
            ("webhook".into(), 15017)
        ]
    );
}

fn spec_labels(d: &Deployment) -> std::collections::BTreeMap<String, String> {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap_or_default()
}

#[test]
fn ha_values_run_three_spread_replicas_behind_a_disruption_budget() {
    let o = objects("ha");
    let d = o.deployment.unwrap();
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    let anti = spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .affinity
        .as_ref()
        .unwrap()
        .pod_anti_affinity
        .as_ref()
        .unwrap();
    let required = anti
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap();
    assert_eq!(required[0].topology_key, "kubernetes.io/hostname");
    assert_eq!(
        required[0]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap(),
        spec.selector.match_labels.as_ref().unwrap(),
        "the rule keeps the control plane's own pods apart"
    );
    let [pdb] = o.pdbs.as_slice() else {
        panic!("one PodDisruptionBudget")
    };
    let pdb = pdb.spec.as_ref().unwrap();
    assert_eq!(
        pdb.min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2))
    );
    assert_eq!(
        pdb.selector.as_ref().unwrap().match_labels,
        spec.selector.match_labels
    );
    let args = parse_args(&d);
    assert_eq!(
        format!("{:?}", args.source),
        "Kubernetes",
        "leader election needs the Kubernetes source"
    );
    assert!(
        objects("default").pdbs.is_empty(),
        "one replica has no budget to keep"
    );
}

/// One RBAC rule flattened: (group, resource, verbs, resource names).
type Grant = (String, String, Vec<String>, Vec<String>);

fn grants(rules: &[PolicyRule]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                let mut verbs = r.verbs.clone();
                verbs.sort();
                out.insert((
                    g.clone(),
                    res.clone(),
                    verbs,
                    r.resource_names.clone().unwrap_or_default(),
                ));
            }
        }
    }
    out
}

fn grant(group: &str, resource: &str, verbs: &[&str], names: &[&str]) -> Grant {
    let mut verbs: Vec<String> = verbs.iter().map(|v| v.to_string()).collect();
    verbs.sort();
    (
        group.into(),
        resource.into(),
        verbs,
        names.iter().map(|n| n.to_string()).collect(),
    )
}

#[test]
fn rbac_grants_exactly_what_the_control_plane_calls() {
    // control-plane/README.md, "In a cluster": the calls the code makes.
    let o = objects("default");
    let [cluster] = o.cluster_roles.as_slice() else {
        panic!("one ClusterRole")
    };
    let root = parse_args(o.deployment.as_ref().unwrap())
        .kubernetes
        .trust_root_configmap
        .expect("--trust-root-configmap with the injector on");
    // The configurations whose caBundle the control plane keeps are the rendered ones.
    let (mutating, validating) = (
        o.mutating[0].metadata.name.clone().unwrap(),
        o.validating[0].metadata.name.clone().unwrap(),
    );
    let cp = parse_args(o.deployment.as_ref().unwrap());
    assert_eq!(
        cp.kubernetes.mutating_webhook_config.as_ref(),
        Some(&mutating)
    );
    assert_eq!(
        cp.kubernetes.validating_webhook_config.as_ref(),
        Some(&validating)
    );
    let mounted = container_mounts(o.deployment.as_ref().unwrap());
    let ca = cp.kubernetes.webhook_ca.clone().expect("--webhook-ca");
    assert!(
        mounted.iter().any(|m| ca.starts_with(m)),
        "--webhook-ca {} is not in a mounted volume ({mounted:?})",
        ca.display()
    );
    assert_eq!(
        grants(cluster.rules.as_deref().unwrap_or_default()),
        BTreeSet::from([
            grant("sluice.dev", "routepolicies", &["list", "watch"], &[]),
            grant("sluice.dev", "routepolicies/status", &["patch"], &[]),
            grant(
                "gateway.networking.k8s.io",
                "httproutes",
                &["list", "watch"],
                &[]
            ),
            grant(
                "gateway.networking.k8s.io",
                "referencegrants",
                &["list", "watch"],
                &[]
            ),
            grant(
                "gateway.networking.k8s.io",
                "httproutes/status",
                &["patch"],
                &[]
            ),
            grant(
                "discovery.k8s.io",
                "endpointslices",
                &["list", "watch"],
                &[]
            ),
            grant("", "pods", &["get"], &[]),
            grant("", "services", &["list", "watch"], &[]),
            grant("authentication.k8s.io", "tokenreviews", &["create"], &[]),
            grant("", "namespaces", &["list", "watch"], &[]),
            grant("", "configmaps", &["list", "patch", "watch"], &[&root]),
            grant("", "configmaps", &["create"], &[]),
            grant(
                "admissionregistration.k8s.io",
                "mutatingwebhookconfigurations",
                &["get", "patch"],
                &[&mutating]
            ),
            grant(
                "admissionregistration.k8s.io",
                "validatingwebhookconfigurations",
                &["get", "patch"],
                &[&validating]
            ),
        ])
    );
    let [role] = o.roles.as_slice() else {
        panic!("one Role")
    };
    assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
    let args = parse_args(o.deployment.as_ref().unwrap());
    let lease = args.kubernetes.lease_name.clone();
    let secret = args.kubernetes.ca_secret.clone().expect("--ca-secret");
    assert_eq!(
        grants(role.rules.as_deref().unwrap_or_default()),
        BTreeSet::from([
            grant("", "secrets", &["get"], &[&secret]),
            grant("", "secrets", &["create"], &[]),
            grant(
                "coordination.k8s.io",
                "leases",
                &["get", "update"],
                &[&lease]
            ),
            grant("coordination.k8s.io", "leases", &["create"], &[]),
        ])
    );
    let sa = o.service_account.unwrap().metadata.name.unwrap();
    let subjects = |s: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        s.iter()
            .flatten()
            .map(|s| (s.kind.clone(), s.name.clone(), s.namespace.clone()))
            .collect::<Vec<_>>()
    };
    let want = vec![(
        "ServiceAccount".to_owned(),
        sa.clone(),
        Some(NAMESPACE.to_owned()),
    )];
    assert_eq!(subjects(&o.cluster_role_bindings[0].subjects), want);
    assert_eq!(subjects(&o.role_bindings[0].subjects), want);
    assert_eq!(
        o.deployment
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .service_account_name,
        Some(sa)
    );

    // Policies from a ConfigMap: no RoutePolicy, Lease or TokenReview rights; with
    // cert-manager's CA injector, no webhook configuration rights.
    let o = objects("dir-certmanager");
    let [cluster] = o.cluster_roles.as_slice() else {
        panic!("one ClusterRole")
    };
    assert_eq!(
        grants(cluster.rules.as_deref().unwrap_or_default()),
        BTreeSet::from([
            grant(
                "discovery.k8s.io",
                "endpointslices",
                &["list", "watch"],
                &[]
            ),
            grant("", "pods", &["get"], &[]),
            grant("", "services", &["list", "watch"], &[]),
            grant("", "namespaces", &["list", "watch"], &[]),
            grant("", "configmaps", &["list", "patch", "watch"], &[&root]),
            grant("", "configmaps", &["create"], &[]),
        ])
    );
    let granted = grants(o.roles[0].rules.as_deref().unwrap_or_default());
    assert!(granted.iter().all(|g| g.1 == "secrets"), "{granted:?}");
}

#[test]
fn webhooks_select_pods_and_policies_as_the_readme_says() {
    let o = objects("default");
    let [m] = o.mutating.as_slice() else {
        panic!("one MutatingWebhookConfiguration")
    };
    let hooks = m.webhooks.as_deref().unwrap();
    assert_eq!(
        hooks.len(),
        2,
        "one entry by namespace label, one by pod label"
    );
    for h in hooks {
        let svc = h.client_config.service.as_ref().unwrap();
        assert_eq!(
            (svc.name.as_str(), svc.namespace.as_str()),
            (FULLNAME, NAMESPACE)
        );
        assert_eq!(
            (svc.port, svc.path.as_deref()),
            (Some(15017), Some("/inject"))
        );
        assert_eq!(h.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(h.side_effects, "None");
        let rule = &h.rules.as_ref().unwrap()[0];
        assert_eq!(rule.operations.as_deref(), Some(&["CREATE".to_owned()][..]));
        assert_eq!(rule.resources.as_deref(), Some(&["pods".to_owned()][..]));
        let ns = h.namespace_selector.as_ref().unwrap();
        let excluded = ns
            .match_expressions
            .iter()
            .flatten()
            .find(|e| e.key == "kubernetes.io/metadata.name" && e.operator == "NotIn")
            .expect("kube-system excluded");
        assert!(
            excluded
                .values
                .as_ref()
                .unwrap()
                .contains(&"kube-system".to_owned())
        );
    }
    let by_ns = hooks[0]
        .namespace_selector
        .as_ref()
        .unwrap()
        .match_labels
        .as_ref()
        .unwrap();
    assert_eq!(
        by_ns.get("sluice.dev/inject").map(String::as_str),
        Some("enabled")
    );
    let by_pod = hooks[1]
        .object_selector
        .as_ref()
        .unwrap()
        .match_labels
        .as_ref()
        .unwrap();
    assert_eq!(
        by_pod.get("sluice.dev/inject").map(String::as_str),
        Some("enabled")
    );
    let [v] = o.validating.as_slice() else {
        panic!("one ValidatingWebhookConfiguration")
    };
    let [h] = v.webhooks.as_deref().unwrap() else {
        panic!("one entry")
    };
    let svc = h.client_config.service.as_ref().unwrap();
    assert_eq!(
        (svc.port, svc.path.as_deref()),
        (Some(15017), Some("/validate"))
    );
    let rule = &h.rules.as_ref().unwrap()[0];
    assert_eq!(
        rule.api_groups.as_deref(),
        Some(&["sluice.dev".to_owned()][..])
    );
    assert_eq!(
        rule.resources.as_deref(),
        Some(&["routepolicies".to_owned()][..])
    );
    let crd = &o.crds[0];
    assert_eq!(crd.spec.group, "sluice.dev");
    assert_eq!(crd.spec.names.plural, "routepolicies");
}

/// Whether `selector` selects an object with `labels`, as the API server decides:
/// matchLabels and every matchExpression ANDed; `NotIn` and `DoesNotExist` also match
/// an absent label.
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => !value.is_some_and(|v| values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("operator {other}"),
        }
    });
    by_labels && by_expressions
}

/// Every combination of the given label keys, each absent or set to one of its values.
fn label_sets(keys: &[(&str, &[&str])]) -> Vec<BTreeMap<String, String>> {
    let mut sets = vec![BTreeMap::new()];
    for (key, values) in keys {
        sets = sets
            .into_iter()
            .flat_map(|set| {
                let mut out = vec![set.clone()];
                for v in *values {
                    let mut with = set.clone();
                    with.insert((*key).to_owned(), (*v).to_owned());
                    out.push(with);
                }
                out
            })
            .collect();
    }
    sets
}

/// The injector's webhook entries are complementary for any `namespaceSelector`:
/// a pod not opted out in a namespace the selector takes is sent once (by the
/// namespace entry), a labelled pod anywhere else is sent once (by a pod entry), and
/// nothing is sent twice. With two labels a namespace carrying only one of them used to
/// be taken by no entry: its labelled pods were never injected.
#[test]
fn every_pod_is_sent_by_at_most_one_injector_entry_and_labelled_pods_by_one() {
    // Per values set: the namespace labels that matter, and which namespaces the
    // values select (what the README promises, written out independently).
    type Wanted = fn(&BTreeMap<String, String>) -> bool;
    type Keys = Vec<(&'static str, &'static [&'static str])>;
    let is =
        |l: &BTreeMap<String, String>, k: &str, v: &str| l.get(k).map(String::as_str) == Some(v);
    let cases: [(&str, Keys, Wanted); 3] = [
        (
            "default",
            vec![("sluice.dev/inject", &["enabled", "disabled"])],
            |l| l.get("sluice.dev/inject").map(String::as_str) == Some("enabled"),
        ),
        (
            "two-labels",
            vec![
                ("sluice.dev/inject", &["enabled", "disabled"]),
                ("team", &["shop", "books"]),
            ],
            |l| {
                l.get("sluice.dev/inject").map(String::as_str) == Some("enabled")
                    && l.get("team").map(String::as_str) == Some("shop")
            },
        ),
        (
            "dir-certmanager",
            vec![
                ("sluice.dev/inject", &["enabled"]),
                ("tier", &["batch", "web"]),
            ],
            |l| {
                l.get("sluice.dev/inject").map(String::as_str) == Some("enabled")
                    && l.get("tier").map(String::as_str) != Some("batch")
            },
        ),
    ];
    for (set, keys, wanted) in cases {
        let o = objects(set);
        let [m] = o.mutating.as_slice() else {
            panic!("{set}: one MutatingWebhookConfiguration")
        };
        let hooks = m.webhooks.as_deref().unwrap();
        let mut names: Vec<_> = hooks.iter().map(|h| h.name.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), hooks.len(), "{set}: unique entry names");
        let pods = label_sets(&[("sluice.dev/inject", &["enabled", "disabled"])]);
        for ns_labels in label_sets(&keys) {
            for ns_name in ["shop", "kube-system", NAMESPACE] {
                let mut ns = ns_labels.clone();
                ns.insert("kubernetes.io/metadata.name".into(), ns_name.into());
                let excluded = ns_name != "shop";
                for pod in &pods {
                    let sent: Vec<&str> = hooks
                        .iter()
                        .filter(|h| {
                            selects(h.namespace_selector.as_ref().unwrap(), &ns)
                                && selects(h.object_selector.as_ref().unwrap(), pod)
                        })
                        .map(|h| h.name.as_str())
                        .collect();
                    let expected = if excluded || is(pod, "sluice.dev/inject", "disabled") {
                        0
                    } else if wanted(&ns_labels) {
                        1
                    } else {
                        usize::from(is(pod, "sluice.dev/inject", "enabled"))
                    };
                    assert_eq!(
                        sent.len(),
                        expected,
                        "{set}: a pod labelled {pod:?} in namespace {ns:?} is sent by {sent:?}"
                    );
                    if expected == 1 && wanted(&ns_labels) {
                        assert_eq!(sent, ["namespace.inject.sluice.dev"], "{set}");
                    }
                }
            }
        }
    }
}

/// `injector.proxyAdminTokenSecret` reaches the injector as `--inject-admin-token-secret`
/// (parsed by the control plane's own flags); unset, no admin token is injected.
#[test]
fn the_proxy_admin_token_secret_value_reaches_the_injector() {
    for (set, wanted) in [
        ("default", None),
        ("dir-certmanager", Some("sluice-proxy-admin")),
    ] {
        let args = parse_args(&objects(set).deployment.unwrap());
        let cfg = args.webhook.to_config(None).expect("the webhooks are on");
        assert_eq!(cfg.inject.admin_token_secret.as_deref(), wanted, "{set}");
    }
}

#[tokio::test]
async fn the_webhook_certificate_is_trusted_through_the_rendered_ca_bundle() {
    let o = objects("default");
    let secret = secret_named(&o, &format!("{FULLNAME}-webhook-tls"));
    let data = secret.data.as_ref().unwrap();
    let ca = &data["ca.crt"].0;
    for bundle in o
        .mutating
        .iter()
        .flat_map(|m| m.webhooks.iter().flatten().map(|w| &w.client_config))
        .chain(
            o.validating
                .iter()
                .flat_map(|v| v.webhooks.iter().flatten().map(|w| &w.client_config)),
        )
    {
        assert_eq!(
            &bundle.ca_bundle.as_ref().expect("caBundle").0,
            ca,
            "every caBundle is the Secret's CA"
        );
    }

    // The real webhook server, configured from the chart's arguments, serving the
    // rendered certificate; the client trusts only the rendered CA bundle and names the
    // Service as the API server does.
    let dir = tempfile::tempdir().unwrap();
    let d = o.deployment.clone().unwrap();
    let mut cfg = parse_args(&d).webhook.to_config(None).unwrap();
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &data["tls.crt"].0).unwrap();
    std::fs::write(&key, &data["tls.key"].0).unwrap();
    cfg.tls = WebhookTls::Files { cert, key };
    let hook = start_webhook(cfg).await.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pemfile_certs(ca) {
        roots.add(der).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(Arc::new(roots))
        .with_no_client_auth();
    let host = format!("{FULLNAME}.{NAMESPACE}.svc");
    let tcp = tokio::net::TcpStream::connect(hook.addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from(host.clone()).unwrap(), tcp)
        .await
        .expect("the rendered CA bundle verifies the rendered serving certificate");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let review =
        std::fs::read(repo().join("control-plane/tests/fixtures/admission/deployment-pod.json"))
            .unwrap();
    let req = hyper::Request::post("/inject?timeout=10s")
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(review)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let patch: Vec<u8> = serde_json::from_value(body["response"]["patch"].clone()).unwrap();
    let patch = String::from_utf8(patch).unwrap();
    assert!(
        patch.contains("ghcr.io/sluice-mesh/sluice-proxy:0.1.0"),
        "the chart's proxy image is injected: {patch}"
    );
    assert!(
        patch.contains(&format!("https://{FULLNAME}.{NAMESPACE}.svc:15010")),
        "{patch}"
    );
    hook.shutdown().await;
}

/// The rendered Secret called `name`.
fn secret_named<'a>(o: &'a Objects, name: &str) -> &'a Secret {
    o.secrets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| {
            let names: Vec<_> = o.secrets.iter().map(|s| &s.metadata.name).collect();
            panic!("no Secret {name} among {names:?}")
        })
}

/// The file `--admin-token-file` names, as the kubelet would lay out the volume mounted
/// over it: (the Secret it comes from, the key it holds).
fn admin_token_source(d: &Deployment) -> (String, String) {
    let args = parse_args(d);
    let file = args
        .admin_token_file
        .clone()
        .expect("--admin-token-file: the replicas' relays need the token");
    let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let mount = spec.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| file.starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("{} is not in a mounted volume", file.display()));
    assert_eq!(
        mount.read_only,
        Some(true),
        "the token is mounted read-only"
    );
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mount's volume");
    let secret = volume
        .secret
        .as_ref()
        .unwrap_or_else(|| panic!("volume {} is not a Secret", volume.name));
    let rel = file.strip_prefix(&mount.mount_path).unwrap();
    let item = secret
        .items
        .iter()
        .flatten()
        .find(|i| Path::new(&i.path) == rel)
        .unwrap_or_else(|| panic!("no item of the Secret lands at {}", file.display()));
    (secret.secret_name.clone().unwrap(), item.key.clone())
}

/// Every replica reads the same admin token from one Secret, so the followers' relays
/// to the lease holder (reports, acks, commands) pass its admin port's token rule,
/// which it is bound beyond loopback to need. The chart makes the Secret (a random
/// 48-character token) unless the values name one of the operator's own.
#[test]
fn every_replica_reads_the_admin_token_from_one_secret() {
    for set in ["default", "ha"] {
        let o = objects(set);
        let d = o.deployment.as_ref().unwrap();
        let (name, key) = admin_token_source(d);
        assert_eq!(name, format!("{FULLNAME}-admin-token"), "{set}");
        let secret = secret_named(&o, &name);
        let token = &secret.data.as_ref().unwrap()[&key].0;
        assert_eq!(token.len(), 48, "{set}");
        assert!(token.iter().all(u8::is_ascii_alphanumeric), "{set}");

        // The file as the kubelet writes it, read by the control plane's own code: the
        // admin port the chart binds beyond loopback takes that token and nothing else.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, token).unwrap();
        let args = parse_args(d);
        assert!(!args.admin.ip().is_loopback(), "{set}");
        let gate = sluice_api::AdminGate::new(
            args.admin,
            Some(sluice_api::AdminGate::read_token(&file).unwrap()),
        );
        let bearer = [b"Bearer ".as_slice(), token].concat();
        assert_eq!(gate.check(Some(&bearer)), Ok(()), "{set}");
        assert!(gate.check(None).is_err(), "{set}");
    }
    // An operator's own Secret: mounted, and the chart makes none.
    let o = objects("dir-certmanager");
    assert_eq!(
        admin_token_source(o.deployment.as_ref().unwrap()),
        ("sluice-admin".to_owned(), "token".to_owned())
    );
    assert!(
        !o.secrets
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(&format!("{FULLNAME}-admin-token"))),
        "no token Secret of the chart's beside the operator's"
    );
}

/// The DER certificates of a PEM bundle.
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .map(|c| c.unwrap())
        .collect()
}

#[test]
fn default_policies_ship_in_a_config_map_and_dashboards_when_present() {
    let o = objects("default");
    let policies = o
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(&format!("{FULLNAME}-policies")))
        .expect("the default-policies ConfigMap");
    let data = policies.data.as_ref().unwrap();
    let examples: BTreeSet<String> = std::fs::read_dir(repo().join("examples/policies"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(data.keys().cloned().collect::<BTreeSet<_>>(), examples);
    for (name, text) in data {
        sluice_config::parse_policies(name, text)
            .unwrap_or_else(|e| panic!("the chart's default policy {name} is refused: {e:?}"));
    }
    let dashboards = dashboard_files("json");
    let shipped = o
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(&format!("{FULLNAME}-dashboards")));
    match shipped {
        Some(cm) => {
            assert_eq!(cm.data.as_ref().unwrap().len(), dashboards);
            let labels = cm.metadata.labels.as_ref().unwrap();
            assert_eq!(
                labels.get("grafana_dashboard").map(String::as_str),
                Some("1")
            );
            for (name, json) in cm.data.as_ref().unwrap() {
                serde_json::from_str::<Value>(json).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        None => assert_eq!(dashboards, 0, "dashboards exist but are not shipped"),
    }
    let rules = o
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(&format!("{FULLNAME}-alert-rules")));
    match rules {
        Some(cm) => {
            let data = cm.data.as_ref().unwrap();
            assert_eq!(data.len(), dashboard_files("yaml"));
            for (name, text) in data {
                let file: Value = serde_yaml::from_str(text).unwrap();
                let groups = file["groups"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{name}: no groups"));
                assert!(
                    groups
                        .iter()
                        .all(|g| g["rules"].as_array().is_some_and(|r| !r.is_empty())),
                    "{name}"
                );
            }
        }
        None => assert_eq!(
            dashboard_files("yaml"),
            0,
            "alert rules exist but are not shipped"
        ),
    }
}

/// How many files with this extension `charts/sluice/dashboards/` holds (none while it is absent).
fn dashboard_files(ext: &str) -> usize {
    std::fs::read_dir(repo().join("charts/sluice/dashboards"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == ext)
            })
            .count()
        })
        .unwrap_or(0)
}
