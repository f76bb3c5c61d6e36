//! The parts of Gateway API's `HTTPRoute` (v1, with the experimental `retry`) that
//! the translation reads, as serde types.
//!
//! Written here rather than taken from the `gateway-api` crate, whose releases are
//! built on an older kube and k8s-openapi than this workspace's. Every field of
//! the v1.6.1 schema is named (unknown ones are refused with their path, never
//! dropped); fields Sluice does not implement are kept as raw JSON so that the
//! translation can refuse them by name.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Group of the Gateway API kinds.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// `spec` of an HTTPRoute.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// Where the route attaches: for the mesh, Services.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Host names the route answers (a Gateway concept; refused for Service parents).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The rules, each with matches and backends.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Attach to default Gateways (experimental; no meaning for the mesh).
    #[serde(default)]
    pub use_default_gateways: Option<String>,
}

/// A parent reference, as written (and as echoed in `status.parents[].parentRef`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    /// API group; absent means Gateway API's own group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind; absent means `Gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Namespace; absent means the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the parent.
    pub name: String,
    /// A section of the parent (a Gateway listener).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// For a Service parent: the Service port the route applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

impl ParentRef {
    /// Whether this names a Service (a mesh parent, which Sluice serves).
    pub fn is_service(&self) -> bool {
        self.group.as_deref() == Some("") && self.kind.as_deref().unwrap_or("Gateway") == "Service"
    }
}

/// One rule of a route.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Optional name; generated route names use it instead of the rule's index.
    #[serde(default)]
    pub name: Option<String>,
    /// Any one matching selects the rule; absent means one match of every path.
    #[serde(default)]
    pub matches: Option<Vec<Match>>,
    /// Request and response filters (not implemented by Sluice).
    #[serde(default)]
    pub filters: Vec<Value>,
    /// Where matching requests go, with weights.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Request and per-try timeouts.
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// Retries (GEP-1731, experimental).
    #[serde(default)]
    pub retry: Option<Retry>,
    /// Session persistence (not implemented by Sluice).
    #[serde(default)]
    pub session_persistence: Option<Value>,
}

/// One match of a rule: every part given must hold.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    /// Path match; absent means the prefix `/`.
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Header matches.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    /// Query parameter matches (not implemented by Sluice).
    #[serde(default)]
    pub query_params: Vec<Value>,
    /// HTTP method.
    #[serde(default)]
    pub method: Option<String>,
}

/// A path match.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The path; absent means `/`.
    #[serde(default)]
    pub value: Option<String>,
}

/// A header match.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Header name (case-insensitive).
    pub name: String,
    /// The value it must have.
    pub value: String,
}

/// A backend reference.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// API group; absent or empty means the core group.
    #[serde(default)]
    pub group: Option<String>,
    /// Kind; absent means `Service`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Name of the Service.
    pub name: String,
    /// Namespace; absent means the route's.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Service port.
    #[serde(default)]
    pub port: Option<i32>,
    /// Proportional weight (default 1).
    #[serde(default)]
    pub weight: Option<i32>,
    /// Per-backend filters (not implemented by Sluice).
    #[serde(default)]
    pub filters: Vec<Value>,
}

/// Timeouts of a rule.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// The whole request, retries included.
    #[serde(default)]
    pub request: Option<String>,
    /// Each try to a backend.
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// Retries of a rule (GEP-1731).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Retries after the first try.
    #[serde(default)]
    pub attempts: Option<i64>,
    /// The least time between tries.
    #[serde(default)]
    pub backoff: Option<String>,
    /// Response codes that are retried.
    #[serde(default)]
    pub codes: Vec<i64>,
}

/// One HTTPRoute object as the translation takes it.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct RouteObject {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `metadata.generation` (what `observedGeneration` reports).
    pub generation: Option<i64>,
    /// `metadata.creationTimestamp` (RFC 3339, which sorts by time); empty if unknown.
    pub created: String,
    /// `spec`, as JSON, decoded by the translation so that one malformed object
    /// is refused on its own.
    pub spec: Value,
}

impl RouteObject {
    /// `namespace/name`.
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// The port's name (may be empty for a one-port Service).
    pub name: String,
    /// The port's number.
    pub port: i32,
}

/// What the translation needs to know about a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Its ports.
    pub ports: Vec<ServicePortInfo>,
}

/// A ReferenceGrant, reduced to what lets an HTTPRoute name a Service of another
/// namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReferenceGrant {
    /// The grant's namespace: where the referenced Services are.
    pub namespace: String,
    /// Namespaces whose HTTPRoutes may refer (from entries of group Gateway API,
    /// kind `HTTPRoute`).
    pub from_namespaces: Vec<String>,
    /// Services that may be referred to: `None` for every Service of the namespace.
    pub to_services: Vec<Option<String>>,
}

impl ReferenceGrant {
    /// Reads a ReferenceGrant object (JSON, any served version); `None` if it is
    /// not one or grants nothing to HTTPRoutes.
    pub fn from_object(obj: &Value) -> Option<Self> {
        let namespace = obj["metadata"]["namespace"].as_str()?.to_string();
        let from_namespaces = obj["spec"]["from"]
            .as_array()?
            .iter()
            .filter(|f| f["group"] == GROUP && f["kind"] == "HTTPRoute")
            .filter_map(|f| f["namespace"].as_str().map(str::to_string))
            .collect::<Vec<_>>();
        let to_services = obj["spec"]["to"]
            .as_array()?
            .iter()
            .filter(|t| t["group"] == "" && t["kind"] == "Service")
            .map(|t| t["name"].as_str().map(str::to_string))
            .collect::<Vec<_>>();
        (!from_namespaces.is_empty() && !to_services.is_empty()).then_some(Self {
            namespace,
            from_namespaces,
            to_services,
        })
    }

    /// Whether this lets an HTTPRoute of `from` refer to Service `service` here.
    pub fn permits(&self, from: &str, service: &str) -> bool {
        self.from_namespaces.iter().any(|n| n == from)
            && self
                .to_services
                .iter()
                .any(|s| s.as_deref().is_none_or(|s| s == service))
    }
}
