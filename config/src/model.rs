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

use crate::{Duration, ServicePort};

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

impl Metadata {
    /// The namespace, `default` when absent (as Kubernetes reads it).
    pub fn namespace_or_default(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
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
    /// Other names clients call the same host by (e.g. `log-service.prod` and
    /// `log-service.prod.svc.cluster.local`); each routes exactly like `host`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
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

impl RoutePolicySpec {
    /// Every name the policy answers: `host`, then its `aliases`.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.host.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

/// The control plane's verdict on a `RoutePolicy` object in Kubernetes (its `status`
/// subresource), written by the elected control-plane replica.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
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
    /// Each route's rollout as the elected replica drives it: every replica serves
    /// these weights, and a newly elected one resumes from here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<RolloutStatus>,
}

/// One route's rollout in a `RoutePolicy` status.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The route's `name`.
    pub route: String,
    /// Hash of the rollout block (which names the canary) this state belongs to: a
    /// changed block starts over, edits elsewhere keep it.
    pub block: String,
    /// The canary backend.
    pub canary: String,
    /// `progressing`, `paused`, `promoted` or `rolled-back`.
    pub phase: String,
    /// The step, a 0-based index into `steps`.
    pub step: u32,
    /// The weights proxies receive for the rule now.
    pub weights: IndexMap<String, u32>,
    /// The last window's decision: `pass`, `breach` or `inconclusive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// The last transition: `started`, `advanced`, `promoted`, `rolled-back`,
    /// `paused`, `resumed`, `inconclusive` or `restarted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<String>,
    /// When it happened, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_ms: Option<u64>,
    /// Why it happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The first transition and the last ones (at most [`ROLLOUT_STATUS_HISTORY`] in
    /// all), oldest first: what every replica shows as the history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RolloutTransition>,
    /// The last judged window with each check's value, threshold, bound and samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_window: Option<RolloutWindow>,
}

/// Most transitions a rollout's status carries.
pub const ROLLOUT_STATUS_HISTORY: usize = 10;

/// One check of a judged window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RolloutCheck {
    /// `errorRate`, `p99`, `errorRateIncrease`, `p99Ratio` or `grossErrorRate`.
    pub name: String,
    /// The measured value (a ratio, or seconds for `p99`; the canary's ratio to the
    /// others' for `p99Ratio`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The threshold from the block (seconds for `p99`).
    pub threshold: f64,
    /// The bound compared with the threshold: the Wilson lower bound of the failing
    /// ratio (for latencies, of the ratio of requests above the threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<f64>,
    /// Canary samples (and the others', for baseline checks).
    pub samples: u64,
    /// The others' samples, for baseline checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_samples: Option<u64>,
    /// `pass`, `breach` or `not-judged` (with why in `note`).
    pub verdict: String,
    /// Why a check was not judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A judged (or still open) window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RolloutWindow {
    /// The step it belongs to (0-based).
    pub step: usize,
    /// Canary requests and failures.
    pub canary_requests: u64,
    /// Canary failures.
    pub canary_failures: u64,
    /// Requests and failures of the other backends, same route, same window.
    pub baseline_requests: u64,
    /// Failures of the other backends.
    pub baseline_failures: u64,
    /// `pass`, `breach`, `inconclusive` or `open`.
    pub decision: String,
    /// Why.
    pub reason: String,
    /// Every check.
    pub checks: Vec<RolloutCheck>,
}

/// One entry of a rollout's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RolloutTransition {
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// `started`, `advanced`, `promoted`, `rolled-back`, `paused`, `resumed`,
    /// `inconclusive`, `restarted`.
    pub result: String,
    /// The step after it (0-based index into `steps`).
    pub step: usize,
    /// The canary's weight after it.
    pub canary_weight: u32,
    /// Why.
    pub reason: String,
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
    /// The Service port of a `service` backend, by name or number (only with `service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<ServicePort>,
    /// How long a new (or returning) endpoint takes to ramp up to its full share
    /// (default 10s; `0s` turns it off, the one duration allowed to be zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<Duration>,
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
    /// What answers once the primary backend has failed for one of the listed reasons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// HTTP upgrade tokens this route lets through besides `websocket` (e.g. `h2c`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upgrades: Vec<String>,
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

    /// One line for people (admin page, `sluicectl explain`): `path under /logs,
    /// method POST, x-canary: true`, or `any request`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = &self.path {
            if let Some(e) = &p.exact {
                parts.push(format!("path = {e}"));
            } else if let Some(pre) = &p.prefix {
                parts.push(format!("path under {pre}"));
            }
        }
        if let Some(method) = &self.method {
            parts.push(format!("method {method}"));
        }
        for (k, v) in &self.headers {
            parts.push(format!("{k}: {v}"));
        }
        if parts.is_empty() {
            "any request".into()
        } else {
            parts.join(", ")
        }
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
    /// Who shares the quota: each calling proxy (`local`, the default) or every
    /// caller of the route together (`fleet`; outbound route limits only).
    #[serde(default, skip_serializing_if = "RateLimitScope::is_local")]
    pub scope: RateLimitScope,
}

/// Who shares a rate limit's quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RateLimitScope {
    /// Each proxy enforces the limit on its own.
    #[default]
    Local,
    /// All callers of the route together, counted in Redis.
    Fleet,
}

impl RateLimitScope {
    /// True for the default, which is left out of the canonical form.
    pub fn is_local(&self) -> bool {
        *self == RateLimitScope::Local
    }
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
    /// No retry starts sooner than this after the previous try ended (a floor under
    /// the jittered delay; Gateway API's `retry.backoff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Duration>,
}

/// Retry budget: at most `ratio × requests + minPerSecond × seconds` retries over `window`.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries allowed per original request, 0.0..=1.0.
    pub ratio: f64,
    /// Retries always allowed per second, whatever the traffic (default 0).
    #[serde(
        default,
        skip_serializing_if = "crate::defaults::is_budget_floor_default"
    )]
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
    /// Drive the weight of one backend of `weights` in steps, judged by the control
    /// plane; proxies never see it, only the effective weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
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
    /// How a header value is mapped to a backend (default `ordered`).
    #[serde(default, skip_serializing_if = "StickyHash::is_ordered")]
    pub hash: StickyHash,
}

/// How a sticky split maps a header value to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum StickyHash {
    /// A point in `[0, 10000)` walked over the weights in file order.
    #[default]
    Ordered,
    /// Weighted rendezvous hashing: independent of the order backends are listed in.
    Rendezvous,
}

impl StickyHash {
    /// True for the default, which is left out of the canonical form.
    pub fn is_ordered(&self) -> bool {
        *self == StickyHash::Ordered
    }
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
    /// Overload protection: requests in flight to the app, a queue, priorities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

/// A progressive rollout of one backend of a weighted split (driven by the control plane).
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rollout {
    /// The backend whose weight is driven; one of the rule's `weights`.
    pub canary: String,
    /// Canary percentages, strictly increasing, ending at 100.
    pub steps: Vec<u32>,
    /// Time at each step (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Canary requests before a window is judged (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u32>,
    /// Absolute guards on the canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<RolloutSlo>,
    /// Guards relative to the other backends, same callers, same window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<RolloutBaseline>,
    /// What an inconclusive rollout does once `deadline` passes (default `hold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_inconclusive: Option<OnInconclusive>,
    /// How long a rollout may stay inconclusive before `onInconclusive` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Duration>,
}

/// Absolute guards of a rollout.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutSlo {
    /// Highest acceptable canary error ratio, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Highest acceptable canary p99 latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99: Option<Duration>,
}

/// Guards of a rollout relative to the other backends.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutBaseline {
    /// Largest acceptable increase of the canary's error ratio over the others', 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate_increase: Option<f64>,
    /// Largest acceptable ratio of the canary's p99 to the others' (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ratio: Option<f64>,
}

/// What an inconclusive rollout does at its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum OnInconclusive {
    /// Stay at the current step.
    Hold,
    /// Send the canary's weight back to 0.
    Rollback,
}

/// Degradation of a route: another backend or a static answer once the primary failed.
/// Exactly one of `backend` and `response`.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fallback {
    /// The failures that trigger the fallback.
    pub on: Vec<FallbackOn>,
    /// Send the request to this backend instead (not one the route's split uses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Answer with this static response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<FallbackResponse>,
}

/// A failure a fallback answers (never `rate-limited`: a caller's quota is not an outage).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum FallbackOn {
    /// The primary's circuit breaker is open.
    BreakerOpen,
    /// The primary has no healthy endpoint.
    NoHealthyEndpoint,
    /// Connecting to the primary failed or was reset.
    UpstreamUnavailable,
    /// The primary did not answer in time.
    Timeout,
}

/// A static fallback answer.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FallbackResponse {
    /// HTTP status, 200..=599.
    pub status: u16,
    /// Response headers.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub headers: IndexMap<String, String>,
    /// Response body, at most 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// For gRPC callers: the numeric `grpc-status` sent (0..=16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// For gRPC callers: the `grpc-message` sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_message: Option<String>,
}

/// Inbound overload protection. Exactly one of `adaptive` and `fixed`.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Concurrency {
    /// A limit found from the app's own latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveLimit>,
    /// A plain cap on requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed: Option<FixedLimit>,
    /// Where requests over the limit wait briefly instead of being refused at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<ConcurrencyQueue>,
    /// Priority levels read from a request header; the last level is shed first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// Bounds of an adaptive concurrency limit.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdaptiveLimit {
    /// The limit never goes below this (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_limit: Option<u32>,
    /// The limit never goes above this (default 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_limit: Option<u32>,
}

/// A fixed concurrency limit.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FixedLimit {
    /// Requests in flight at most.
    pub max: u32,
}

/// The bounded queue in front of a concurrency limit.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConcurrencyQueue {
    /// Requests waiting at most.
    pub max: u32,
    /// Longest wait before a request is refused `overloaded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// Request priorities, most important first.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Priority {
    /// The request header naming a request's level.
    pub header: String,
    /// Level names, most important first; must include `default`, which requests
    /// without the header or with an unknown value get.
    pub levels: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A match takes every request only with no path, method or header; it says what it
    /// takes in one line, every part it has, in a fixed order.
    #[test]
    fn a_match_says_what_it_takes() {
        let any = RouteMatch::default();
        assert!(any.is_empty());
        assert_eq!(any.describe(), "any request");
        let path = |exact: Option<&str>, prefix: Option<&str>| PathMatch {
            exact: exact.map(Into::into),
            prefix: prefix.map(Into::into),
        };
        let cases = [
            (
                RouteMatch {
                    path: Some(path(Some("/health"), None)),
                    ..RouteMatch::default()
                },
                "path = /health",
            ),
            (
                RouteMatch {
                    path: Some(path(None, Some("/logs"))),
                    ..RouteMatch::default()
                },
                "path under /logs",
            ),
            (
                RouteMatch {
                    method: Some("POST".into()),
                    ..RouteMatch::default()
                },
                "method POST",
            ),
            (
                RouteMatch {
                    headers: [("x-canary".to_string(), "true".to_string())]
                        .into_iter()
                        .collect(),
                    ..RouteMatch::default()
                },
                "x-canary: true",
            ),
            (
                RouteMatch {
                    path: Some(path(None, Some("/logs"))),
                    method: Some("POST".into()),
                    headers: [
                        ("x-canary".to_string(), "true".to_string()),
                        ("x-tenant".to_string(), "a".to_string()),
                    ]
                    .into_iter()
                    .collect(),
                },
                "path under /logs, method POST, x-canary: true, x-tenant: a",
            ),
        ];
        for (m, said) in cases {
            assert!(!m.is_empty(), "{said}");
            assert_eq!(m.describe(), said);
        }
    }
}
