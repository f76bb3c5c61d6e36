//! The `RoutePolicy` model: serde types exactly as users write them in YAML.
//!
//! The types are CRD-friendly on purpose: plain structs with optional fields and
//! unit-only enums (serialised as strings), never untagged enums, so the same types
//! can later derive a Kubernetes schema. "Exactly one of these fields" rules are
//! enforced by the validator, not by the type shape.
//!
//! Maps whose order carries meaning (`backends`, `weights`, header matches) are
//! `IndexMap`s so that the order written in the file survives parsing and the
//! canonical form.
//!
//! With the `crd` feature, the types also derive `schemars::JsonSchema` and
//! [`RoutePolicySpec`] derives kube-rs' `CustomResource`, generating the Kubernetes
//! object type `RoutePolicyResource` (group `sluice.dev`, version `v1alpha1`, kind
//! `RoutePolicy`; the name differs from the file type [`RoutePolicy`] to avoid a clash).

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::Duration;

/// The only `apiVersion` this build understands.
pub const API_VERSION: &str = "sluice.dev/v1alpha1";
/// The only `kind` this build understands.
pub const KIND: &str = "RoutePolicy";

/// One policy document: the traffic rules for one host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RoutePolicy {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be [`KIND`].
    pub kind: String,
    /// Name and namespace of the policy.
    pub metadata: Metadata,
    /// The rules themselves.
    pub spec: RoutePolicySpec,
}

/// Object metadata, the subset of Kubernetes' that a policy file may carry.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// Policy name, unique within its namespace.
    pub name: String,
    /// Namespace; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Free-form labels, carried but not interpreted.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub labels: IndexMap<String, String>,
    /// Free-form annotations, carried but not interpreted.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub annotations: IndexMap<String, String>,
}

/// The body of a policy: one host, its backends, its routes and its inbound rules.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(
    feature = "crd",
    derive(kube::CustomResource, schemars::JsonSchema),
    kube(
        group = "sluice.dev",
        version = "v1alpha1",
        kind = "RoutePolicy",
        root = "RoutePolicyResource",
        namespaced,
        shortname = "rp",
        doc = "Traffic rules for one host: its backends, its routes with their governance, and the rules its inbound sidecar applies.",
        status = "RoutePolicyStatus",
        printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.host"}"#,
        printcolumn = r#"{"name":"Accepted","type":"boolean","jsonPath":".status.accepted"}"#,
        printcolumn = r#"{"name":"Hash","type":"string","jsonPath":".status.hash"}"#
    )
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RoutePolicySpec {
    /// The authority clients call (`Host` / `:authority`, without port).
    pub host: String,
    /// Named backends, in file order.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub backends: IndexMap<String, Backend>,
    /// Routes, tried by precedence (see the route-selection rules).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Rules the serving pod's inbound sidecar applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Inbound>,
}

/// The control plane's verdict on a `RoutePolicy` object in Kubernetes (its `status`
/// subresource), written by the elected control-plane replica.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RoutePolicyStatus {
    /// The `metadata.generation` this verdict is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Whether that generation validated and is in force.
    #[serde(default)]
    pub accepted: bool,
    /// Content hash of the version of this policy in force: the observed generation
    /// when accepted, else the last accepted one (absent if none ever was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Why the observed generation is refused: the validator's messages, each with
    /// its field path (`spec.routes[0].retry.attempts: ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A set of endpoints that a split can send traffic to.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backend {
    /// `host:port` endpoints (IP or DNS name). Exactly one of `addresses` and `service`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// A Kubernetes Service (`name.namespace`) whose endpoints the control plane discovers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The SPIFFE identity the backend's certificate must carry (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// One route: a match and the governance applied to what it matches.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    /// Unique within the policy; used in metrics and the admin API.
    pub name: String,
    /// What requests this route takes. An empty match takes everything.
    #[serde(
        rename = "match",
        default,
        skip_serializing_if = "RouteMatch::is_empty"
    )]
    pub matches: RouteMatch,
    /// Total time allowed for the request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// This caller's quota on the route, enforced in the caller's outbound sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Retry rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Circuit breaker, one per route × backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// How to pick a backend: rules tried in order. When absent, the policy must have
    /// exactly one backend, which takes all traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitRule>,
    /// Whether requests on this route are written to the access log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
}

/// What a route matches. All given parts must match.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    /// Path match; absent matches every path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// HTTP method (upper case, e.g. `POST`); absent matches every method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Request headers that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub headers: IndexMap<String, String>,
}

impl RouteMatch {
    /// True when the match takes every request.
    pub fn is_empty(&self) -> bool {
        self.path.is_none() && self.method.is_none() && self.headers.is_empty()
    }
}

/// A path match: exactly one of `exact` and `prefix`.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatch {
    /// The path must equal this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The path must start with this, on a segment boundary (`/logs` takes `/logs/a`, not `/logsx`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// A token-bucket rate limit.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained requests per second (per key).
    pub per_second: u32,
    /// Extra requests allowed at once above the sustained rate; defaults to `perSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// What each bucket is keyed by; absent means one bucket for all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateLimitKey>,
    /// Count what would be limited without refusing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// What a rate limit's buckets are keyed by: exactly one field.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitKey {
    /// One bucket per value of this request header (requests without it share one bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// One bucket per request path (`path: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<bool>,
    /// One bucket per authenticated peer identity (`peerIdentity: true`; needs mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<bool>,
}

/// Retry rules. `attempts` is the number of retries after the first try.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retry {
    /// Retries after the first try (2 → at most 3 tries).
    pub attempts: u32,
    /// Failure classes that are retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<RetryOn>,
    /// Response status codes that are retried besides the classes in `on`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
    /// gRPC statuses that are retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_statuses: Vec<GrpcCode>,
    /// Time allowed for each try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Delay between tries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Retry non-idempotent methods (POST, PATCH) too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub non_idempotent: bool,
    /// Request bodies up to this many bytes are kept for replay (default 65536); larger
    /// requests go once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replay_bytes: Option<u64>,
    /// Caps retries to a share of traffic, so retries cannot storm a sick service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

/// A failure class that may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection to the upstream could not be made.
    ConnectFailure,
    /// The upstream refused an HTTP/2 stream (REFUSED_STREAM): never processed.
    RefusedStream,
    /// The connection was reset before a response arrived.
    Reset,
    /// 502, 503 or 504.
    GatewayError,
    /// Any 5xx.
    #[serde(rename = "5xx")]
    ServerError,
    /// The per-try timeout elapsed.
    Timeout,
}

/// Exponential backoff with full jitter between tries.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backoff {
    /// First delay (default 25ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Duration>,
    /// Largest delay (default 250ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Duration>,
}

/// Retry budget: at most `ratio × requests + minPerSecond × seconds` retries over `window`.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries allowed per original request, 0.0..=1.0.
    pub ratio: f64,
    /// Retries always allowed per second, whatever the traffic.
    #[serde(default)]
    pub min_per_second: u32,
    /// Window over which requests and retries are counted (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
}

/// Circuit breaker for each route × backend.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Open after this many failures in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Open when the failure rate over a sliding window crosses a threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<FailureRate>,
    /// How long the breaker stays open the first time (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<Duration>,
    /// Cap on the open time, which doubles on each failed probe (default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_open_for: Option<Duration>,
    /// Probes let through when half-open; all must succeed to close (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open_requests: Option<u32>,
    /// What counts as a failure (default connect-failure, timeout, 5xx).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failure_on: Vec<FailureClass>,
    /// gRPC statuses that count as failures (default unavailable, internal, unknown,
    /// deadline-exceeded, data-loss).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_statuses: Vec<GrpcCode>,
}

/// Failure-rate trigger of a circuit breaker.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailureRate {
    /// Open when at least this percentage (1..=100) of requests in the window failed.
    pub percent: u32,
    /// Sliding window length.
    pub window: Duration,
    /// Fewer requests than this in the window never open the breaker.
    pub min_requests: u32,
}

/// What a circuit breaker counts as a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum FailureClass {
    /// The connection could not be made or was reset.
    ConnectFailure,
    /// The try timed out.
    Timeout,
    /// 502, 503 or 504.
    GatewayError,
    /// Any 5xx.
    #[serde(rename = "5xx")]
    ServerError,
}

/// gRPC status codes, as named by the gRPC spec in kebab case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)] // the names are the gRPC spec's
pub enum GrpcCode {
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl GrpcCode {
    /// The numeric code carried in `grpc-status`.
    pub fn code(self) -> u32 {
        match self {
            GrpcCode::Cancelled => 1,
            GrpcCode::Unknown => 2,
            GrpcCode::InvalidArgument => 3,
            GrpcCode::DeadlineExceeded => 4,
            GrpcCode::NotFound => 5,
            GrpcCode::AlreadyExists => 6,
            GrpcCode::PermissionDenied => 7,
            GrpcCode::ResourceExhausted => 8,
            GrpcCode::FailedPrecondition => 9,
            GrpcCode::Aborted => 10,
            GrpcCode::OutOfRange => 11,
            GrpcCode::Unimplemented => 12,
            GrpcCode::Internal => 13,
            GrpcCode::Unavailable => 14,
            GrpcCode::DataLoss => 15,
            GrpcCode::Unauthenticated => 16,
        }
    }
}

/// One rule of a split. Rules are tried in order; the first whose `when` matches
/// (or that has no `when`) decides. Exactly one of `backend` and `weights`.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SplitRule {
    /// Condition on the request; absent matches every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<SplitWhen>,
    /// Send matching requests to this backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Share matching requests by percentage (summing to 100), in file order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<IndexMap<String, u32>>,
    /// Keep a user on one side of a weighted split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_by: Option<StickyBy>,
}

/// Condition of a split rule.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SplitWhen {
    /// Request headers that must be present with exactly these values.
    #[serde(default)]
    pub headers: IndexMap<String, String>,
}

/// What makes a weighted split sticky.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StickyBy {
    /// Requests with the same value of this header go to the same side.
    pub header: String,
}

/// Rules the serving pod's inbound sidecar applies to requests for this host.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Inbound {
    /// SPIFFE identities allowed to call; absent allows any authenticated peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// What each serving pod accepts at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Whether requests to this host's pods are written to the inbound sidecar's access log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
}
