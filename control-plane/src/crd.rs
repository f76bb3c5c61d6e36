//! The `RoutePolicy` CustomResourceDefinition, generated from the `sluice-config` types.
//!
//! The chart ships the result as `charts/sluice/crds/routepolicies.yaml`, written by
//! `cargo run -p sluice-control-plane --bin gen-crd`. A test regenerates it and fails
//! when the file and the types drift apart, so the schema the API server enforces is
//! always the one `sluice-config` parses.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube_core::CustomResourceExt;
use serde_json::Value;
use sluice_config::RoutePolicyResource;
use yaml_rust2::yaml::{Hash, Yaml};

/// Where the chart keeps the generated file, relative to the repository root.
pub const CHART_CRD_PATH: &str = "charts/sluice/crds/routepolicies.yaml";

/// The first lines of the generated file: how it is made, so nobody edits it by hand.
const HEADER: &str = "# Generated from the sluice-config types by\n\
# `cargo run -p sluice-control-plane --bin gen-crd`; do not edit by hand.\n";

/// The `RoutePolicy` CRD object as kube-rs derives it from `sluice-config`.
pub fn routepolicy_crd() -> CustomResourceDefinition {
    RoutePolicyResource::crd()
}

/// The CRD as the YAML document the chart ships (header comment included).
///
/// Kubernetes tooling (kubectl, Helm) reads YAML 1.1, where an unquoted `on` is the
/// boolean true: the `retry.on` property would arrive as a field named `"true"`.
/// serde_yaml writes YAML 1.2 and leaves such keys bare, so the file is written with
/// yaml-rust2's emitter, which quotes every string a YAML 1.1 reader would take for a
/// boolean, a null or a number.
pub fn routepolicy_crd_yaml() -> Result<String, serde_json::Error> {
    let value = serde_json::to_value(routepolicy_crd())?;
    let mut body = String::new();
    let mut emitter = yaml_rust2::YamlEmitter::new(&mut body);
    emitter.multiline_strings(true);
    emitter
        .dump(&to_yaml(value))
        .map_err(|e| <serde_json::Error as serde::ser::Error>::custom(format!("{e:?}")))?;
    // The emitter opens with a document marker and ends without a newline.
    let body = body.strip_prefix("---\n").unwrap_or(&body);
    Ok(format!("{HEADER}{body}\n"))
}

fn to_yaml(value: Value) -> Yaml {
    match value {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s),
        Value::Array(items) => Yaml::Array(items.into_iter().map(to_yaml).collect()),
        Value::Object(fields) => Yaml::Hash(
            fields
                .into_iter()
                .map(|(k, v)| (Yaml::String(k), to_yaml(v)))
                .collect::<Hash>(),
        ),
    }
}
