//! What the double accepts as an object: built-in kinds must decode as their
//! k8s-openapi types with no field those types lack, and `RoutePolicy` objects
//! must match the CRD's `openAPIV3Schema` (the one the chart ships).

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How objects of one resource are checked.
#[derive(Clone, Copy, Debug)]
pub(super) enum Check {
    /// Against a k8s-openapi type, by decoding and re-encoding.
    Typed(fn(&Value) -> Result<(), String>),
    /// Against the RoutePolicy CRD's schema.
    RoutePolicy,
    /// Against Gateway API's HTTPRoute CRD (v1.6.1, experimental channel, `v1`).
    HttpRoute,
    /// A ReferenceGrant: `spec.from` and `spec.to` lists (no CRD is kept for it).
    ReferenceGrant,
}

/// One resource the double serves.
#[derive(Clone, Copy, Debug)]
pub(super) struct ResourceKind {
    pub(super) group: &'static str,
    pub(super) version: &'static str,
    pub(super) plural: &'static str,
    pub(super) kind: &'static str,
    pub(super) namespaced: bool,
    /// Writes to `/status` change only `status`; writes to the object never do.
    pub(super) status_subresource: bool,
    pub(super) check: Check,
}

impl ResourceKind {
    /// `apiVersion` of this resource's objects.
    pub(super) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Refuses `obj` with the first field it gets wrong.
    pub(super) fn validate(&self, obj: &Value) -> Result<(), String> {
        if obj["apiVersion"] != self.api_version().as_str() || obj["kind"] != self.kind {
            return Err(format!(
                "expected apiVersion {} kind {}, got {} {}",
                self.api_version(),
                self.kind,
                obj["apiVersion"],
                obj["kind"]
            ));
        }
        match self.check {
            Check::Typed(f) => f(obj),
            Check::RoutePolicy => route_policy(obj),
            Check::HttpRoute => http_route(obj),
            Check::ReferenceGrant => reference_grant(obj),
        }
    }
}

macro_rules! kind {
    ($group:expr, $version:expr, $plural:expr, $ty:ty, $namespaced:expr, $status:expr) => {
        ResourceKind {
            group: $group,
            version: $version,
            plural: $plural,
            kind: stringify!($ty),
            namespaced: $namespaced,
            status_subresource: $status,
            check: Check::Typed(typed::<$ty>),
        }
    };
}

/// Every resource the control plane touches (its RBAC table in `k8s`).
pub(super) const KINDS: &[ResourceKind] = &[
    ResourceKind {
        group: "sluice.dev",
        version: "v1alpha1",
        plural: "routepolicies",
        kind: "RoutePolicy",
        namespaced: true,
        status_subresource: true,
        check: Check::RoutePolicy,
    },
    kind!(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        EndpointSlice,
        true,
        false
    ),
    kind!("", "v1", "pods", Pod, true, true),
    kind!("", "v1", "services", Service, true, true),
    ResourceKind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        plural: "httproutes",
        kind: "HTTPRoute",
        namespaced: true,
        status_subresource: true,
        check: Check::HttpRoute,
    },
    ResourceKind {
        group: "gateway.networking.k8s.io",
        version: "v1beta1",
        plural: "referencegrants",
        kind: "ReferenceGrant",
        namespaced: true,
        status_subresource: false,
        check: Check::ReferenceGrant,
    },
    kind!("", "v1", "secrets", Secret, true, false),
    kind!("", "v1", "configmaps", ConfigMap, true, false),
    kind!("", "v1", "namespaces", Namespace, false, true),
    kind!("coordination.k8s.io", "v1", "leases", Lease, true, false),
    kind!(
        "authentication.k8s.io",
        "v1",
        "tokenreviews",
        TokenReview,
        false,
        false
    ),
    kind!(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        MutatingWebhookConfiguration,
        false,
        false
    ),
    kind!(
        "admissionregistration.k8s.io",
        "v1",
        "validatingwebhookconfigurations",
        ValidatingWebhookConfiguration,
        false,
        false
    ),
];

/// Decodes `obj` as `K` and refuses any field `K` does not have (serde would
/// drop it silently: a misspelt field is the mistake this catches).
fn typed<K: DeserializeOwned + Serialize>(obj: &Value) -> Result<(), String> {
    let decoded: K = serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
    let again = serde_json::to_value(decoded).map_err(|e| e.to_string())?;
    unknown_fields(obj, &again, "")
}

fn unknown_fields(sent: &Value, known: &Value, path: &str) -> Result<(), String> {
    match (sent, known) {
        (Value::Object(sent), Value::Object(known)) => {
            for (k, v) in sent {
                let p = format!("{path}.{k}");
                match known.get(k) {
                    Some(kv) => unknown_fields(v, kv, &p)?,
                    None if v.is_null() => {}
                    // An empty map or list may be left out when encoded again.
                    None if v.as_object().is_some_and(|o| o.is_empty())
                        || v.as_array().is_some_and(|a| a.is_empty()) => {}
                    None => return Err(format!("{p}: unknown field")),
                }
            }
            Ok(())
        }
        (Value::Array(sent), Value::Array(known)) => {
            for (i, (s, k)) in sent.iter().zip(known).enumerate() {
                unknown_fields(s, k, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The CRD's schema for `spec` and `status`; `metadata` is the API server's own.
fn route_policy(obj: &Value) -> Result<(), String> {
    let crd = serde_json::to_value(crate::crd::routepolicy_crd()).map_err(|e| e.to_string())?;
    against_schema(
        obj,
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
    )
}

/// Gateway API's HTTPRoute CRD (the experimental channel's, a superset of the
/// standard one), kept as test data beside the crate.
const HTTPROUTE_CRD: &str =
    include_str!("../../../testdata/gateway-api/crd/httproutes-experimental.yaml");

/// The `v1` `openAPIV3Schema` of Gateway API's HTTPRoute CRD (v1.6.1, experimental
/// channel), parsed once.
pub fn http_route_schema() -> &'static Value {
    static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd: Value = serde_yaml::from_str(HTTPROUTE_CRD).expect("the HTTPRoute CRD parses");
        crd["spec"]["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == "v1"))
            .map(|v| v["schema"]["openAPIV3Schema"].clone())
            .expect("the HTTPRoute CRD serves v1")
    })
}

fn http_route(obj: &Value) -> Result<(), String> {
    against_schema(obj, http_route_schema())
}

fn reference_grant(obj: &Value) -> Result<(), String> {
    for list in ["from", "to"] {
        if !obj["spec"][list].is_array() {
            return Err(format!("spec.{list}: Required value"));
        }
    }
    Ok(())
}

/// `obj`'s fields beside `apiVersion`, `kind` and `metadata` against a CRD schema.
fn against_schema(obj: &Value, schema: &Value) -> Result<(), String> {
    let mut errors = Vec::new();
    if let Some(fields) = obj.as_object() {
        for (k, v) in fields {
            match k.as_str() {
                "apiVersion" | "kind" | "metadata" => {}
                _ => match schema["properties"].get(k) {
                    Some(s) => check(v, s, k, false, &mut errors),
                    None => errors.push(format!("{k}: unknown field")),
                },
            }
        }
    }
    for r in schema["required"].as_array().into_iter().flatten() {
        if obj.get(r.as_str().unwrap_or_default()).is_none() {
            errors.push(format!(
                "{}: Required value",
                r.as_str().unwrap_or_default()
            ));
        }
    }
    match errors.first() {
        None => Ok(()),
        Some(_) => Err(errors.join("; ")),
    }
}

/// `value` against one schema node. `value_only`: inside `allOf`/`anyOf`/`oneOf`,
/// where a node restricts values without declaring every field.
fn check(value: &Value, schema: &Value, path: &str, value_only: bool, out: &mut Vec<String>) {
    if value.is_null() {
        // The API server prunes nulls of fields that are not nullable.
        return;
    }
    let int_or_string = schema["x-kubernetes-int-or-string"] == true;
    if int_or_string {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            out.push(format!("{path}: must be an integer or a string"));
        }
    } else if let Some(ty) = schema["type"].as_str() {
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !ok {
            out.push(format!("{path}: Invalid value: must be of type {ty}"));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        out.push(format!("{path}: Unsupported value: {value}"));
    }
    if let Some(s) = value.as_str() {
        let chars = s.chars().count() as u64;
        if schema["maxLength"].as_u64().is_some_and(|m| chars > m) {
            out.push(format!(
                "{path}: Too long: may not be more than {} bytes",
                schema["maxLength"]
            ));
        }
        if schema["minLength"].as_u64().is_some_and(|m| chars < m) {
            out.push(format!(
                "{path}: Invalid value: must be at least {} long",
                schema["minLength"]
            ));
        }
        if schema["format"] == "date-time" && !is_date_time(s) {
            out.push(format!(
                "{path}: Invalid value: {s:?} is not an RFC 3339 date-time"
            ));
        }
    }
    if let Some(items) = value.as_array() {
        let n = items.len() as u64;
        if schema["maxItems"].as_u64().is_some_and(|m| n > m) {
            out.push(format!(
                "{path}: Too many: {n}: must have at most {} items",
                schema["maxItems"]
            ));
        }
        if schema["minItems"].as_u64().is_some_and(|m| n < m) {
            out.push(format!(
                "{path}: Invalid value: must have at least {} items",
                schema["minItems"]
            ));
        }
    }
    if let (Some(pattern), Some(s)) = (schema["pattern"].as_str(), value.as_str()) {
        match regex::Regex::new(pattern) {
            Ok(re) if re.is_match(s) => {}
            Ok(_) => out.push(format!(
                "{path}: Invalid value: {s:?} should match {pattern:?}"
            )),
            Err(e) => out.push(format!(
                "{path}: the schema's pattern does not compile: {e}"
            )),
        }
    }
    if let Some(n) = value.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| n < m) {
            out.push(format!("{path}: must be >= {}", schema["minimum"]));
        }
        if schema["maximum"].as_f64().is_some_and(|m| n > m) {
            out.push(format!("{path}: must be <= {}", schema["maximum"]));
        }
    }
    if let Some(fields) = value.as_object() {
        let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
        for (k, v) in fields {
            let p = format!("{path}.{k}");
            if let Some(s) = schema["properties"].get(k) {
                check(v, s, &p, value_only, out);
            } else if let Some(s) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                check(v, s, &p, value_only, out);
            } else if !(value_only || preserve || schema["additionalProperties"] == true) {
                out.push(format!("{p}: unknown field"));
            }
        }
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap_or_default();
            if fields.get(r).is_none_or(Value::is_null) {
                out.push(format!("{path}.{r}: Required value"));
            }
        }
    }
    if let (Some(items), Some(s)) = (value.as_array(), schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            check(v, s, &format!("{path}[{i}]"), value_only, out);
        }
    }
    let passes = |s: &Value| {
        let mut errs = Vec::new();
        check(value, s, path, true, &mut errs);
        errs.is_empty()
    };
    for s in schema["allOf"].as_array().into_iter().flatten() {
        check(value, s, path, true, out);
    }
    if let Some(any) = schema["anyOf"].as_array()
        && !any.iter().any(passes)
    {
        out.push(format!("{path}: matches none of anyOf"));
    }
    if let Some(one) = schema["oneOf"].as_array()
        && one.iter().filter(|s| passes(s)).count() != 1
    {
        out.push(format!("{path}: must match exactly one of oneOf"));
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, as Kubernetes writes times.
fn is_date_time(s: &str) -> bool {
    s.parse::<k8s_openapi::jiff::Timestamp>().is_ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn find(plural: &str) -> ResourceKind {
        *KINDS.iter().find(|k| k.plural == plural).unwrap()
    }

    #[test]
    fn typed_objects_refuse_fields_their_type_lacks() {
        let lease = find("leases");
        let ok = json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                         "metadata": { "name": "l" }, "spec": { "holderIdentity": "a" } });
        lease.validate(&ok).unwrap();
        let typo = json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                           "metadata": { "name": "l" }, "spec": { "holder": "a" } });
        assert_eq!(
            lease.validate(&typo).unwrap_err(),
            ".spec.holder: unknown field"
        );
        let wrong_type = json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                 "metadata": { "name": "l" }, "spec": { "leaseDurationSeconds": "15" } });
        assert!(lease.validate(&wrong_type).is_err());
        let kind = json!({ "apiVersion": "v1", "kind": "Lease", "metadata": { "name": "l" } });
        assert!(
            lease
                .validate(&kind)
                .unwrap_err()
                .contains("expected apiVersion")
        );
    }

    #[test]
    fn route_policies_are_checked_against_the_crd_schema() {
        let rp = find("routepolicies");
        let obj = |spec: Value| {
            json!({ "apiVersion": "sluice.dev/v1alpha1", "kind": "RoutePolicy",
                    "metadata": { "name": "p", "namespace": "shop" }, "spec": spec })
        };
        let good = json!({ "host": "h", "backends": { "b": { "addresses": ["10.0.0.1:80"] } },
                           "routes": [{ "name": "r", "timeout": "2s" }] });
        rp.validate(&obj(good)).unwrap();
        let bad_duration = json!({ "host": "h", "backends": { "b": { "addresses": ["10.0.0.1:80"] } },
                                   "routes": [{ "name": "r", "timeout": "2x" }] });
        let err = rp.validate(&obj(bad_duration)).unwrap_err();
        assert!(
            err.starts_with("spec.routes[0].timeout: Invalid value"),
            "{err}"
        );
        let unknown = json!({ "host": "h", "backends": {}, "routes": [], "hots": "x" });
        assert!(
            rp.validate(&obj(unknown))
                .unwrap_err()
                .contains("spec.hots: unknown field")
        );
        let status = json!({ "apiVersion": "sluice.dev/v1alpha1", "kind": "RoutePolicy",
                             "metadata": { "name": "p" },
                             "spec": { "host": "h", "backends": {}, "routes": [] },
                             "status": { "accepted": "yes" } });
        assert!(
            rp.validate(&status)
                .unwrap_err()
                .contains("status.accepted")
        );
    }
}
