//! The `RoutePolicy` CustomResourceDefinition, generated from the `sluice-config` types.
//!
//! The chart ships the result as `charts/sluice/crds/routepolicies.yaml`, written by
//! `cargo run -p sluice-control-plane --bin gen-crd`. A test regenerates it and fails
//! when the file and the types drift apart, so the schema the API server enforces is
//! always the one `sluice-config` parses.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube_core::CustomResourceExt;
use sluice_config::RoutePolicyResource;

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
pub fn routepolicy_crd_yaml() -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(&routepolicy_crd())?;
    Ok(format!("{HEADER}{body}"))
}
