//! HTTPRoutes bound to Services → one generated RoutePolicy per Service.
//!
//! Pure: the HTTPRoutes, the Services and the ReferenceGrants go in; the policies
//! and one verdict per HTTPRoute and Service parent come out. The control plane's
//! Kubernetes source and the offline `convert` command both call [`translate`].
//!
//! Precedence across objects follows Gateway API: the proxy tries a host's routes
//! by match specificity and keeps the order routes are listed in for ties, so the
//! routes are listed by the HTTPRoute's creation time, then namespace and name,
//! then rule and match index. A route that another one tried before it covers is
//! left out (Gateway API's precedence already decided for it), never refused.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::str::FromStr as _;

use indexmap::IndexMap;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use sluice_config::{
    API_VERSION, Backend, Backoff, Duration, KIND, Metadata, PolicySet, RetryOn, Route, RouteMatch,
    RoutePolicy, RoutePolicySpec, ServicePort, SplitRule, is_dns_label, shadowed_routes,
};

use super::model::{
    BackendRef, HttpRouteSpec, Match, ParentRef, ReferenceGrant, RouteObject, Rule, ServiceInfo,
};

/// `namespace`, `name`.
pub type Key = (String, String);

/// Annotation on a generated policy listing the HTTPRoutes it was made from.
pub const SOURCE_ANNOTATION: &str = "sluice.dev/httproutes";

/// The longest duration a policy takes (the validator's bound).
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(3600);
/// The most retries a policy takes (the validator's bound).
const MAX_ATTEMPTS: i64 = 10;
/// Retries when a rule's `retry` names no `attempts` (implementation-specific).
const DEFAULT_ATTEMPTS: u32 = 1;
/// The largest delay between retries unless `backoff` asks for more (the model's default).
const DEFAULT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_millis(250);

/// Which `status.parents[].conditions[]` entry a problem sets to `False`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// `Accepted`: the route (at this parent) is not in force.
    Accepted,
    /// `ResolvedRefs`: a backend reference cannot be used.
    ResolvedRefs,
}

/// Why an HTTPRoute (at one parent) is not in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The condition it sets to `False`.
    pub condition: Condition,
    /// The condition's reason (Gateway API's names).
    pub reason: &'static str,
    /// The field path in the HTTPRoute (`spec.rules[0].filters[0]`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl Problem {
    fn unsupported(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            condition: Condition::Accepted,
            reason: "UnsupportedValue",
            path: path.into(),
            message: message.into(),
        }
    }

    fn no_parent(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            condition: Condition::Accepted,
            reason: "NoMatchingParent",
            path: path.into(),
            message: message.into(),
        }
    }

    fn unresolved(reason: &'static str, path: String, message: impl Into<String>) -> Self {
        Self {
            condition: Condition::ResolvedRefs,
            reason,
            path,
            message: message.into(),
        }
    }

    /// A refusal of the whole host: it is also defined by a RoutePolicy.
    pub fn host_conflict(parent: usize, message: impl Into<String>) -> Self {
        Self::unsupported(format!("spec.parentRefs[{parent}]"), message)
    }
}

/// The verdict on one Service parent of an HTTPRoute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentVerdict {
    /// Index in `spec.parentRefs`.
    pub index: usize,
    /// The parentRef as written.
    pub parent_ref: ParentRef,
    /// The Service it names.
    pub service: Key,
    /// Empty when the route is in force at this parent.
    pub problems: Vec<Problem>,
}

/// The verdict on one HTTPRoute: one entry per Service parent (Sluice's parents).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteVerdict {
    /// The generation judged.
    pub generation: Option<i64>,
    /// One per Service parentRef, in `spec.parentRefs` order.
    pub parents: Vec<ParentVerdict>,
    /// When the judged generation is refused: the last accepted generation, which
    /// stays in force (the Kubernetes source keeps it, as for RoutePolicies).
    pub kept_generation: Option<i64>,
}

/// The policy generated for one Service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePolicies {
    /// The Service.
    pub service: Key,
    /// `httproute-<svc>`, answering each name a mesh client calls the Service by:
    /// `<svc>.<ns>.svc.cluster.local` as its host, `<svc>` (when this namespace has
    /// the bare name) and `<svc>.<ns>` as its aliases.
    pub policy: RoutePolicy,
    /// The HTTPRoutes it was made from, in precedence order.
    pub routes: Vec<Key>,
}

/// What the Kubernetes API says beside the HTTPRoutes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cluster<'a> {
    /// Every Service, when known; `None` (offline) takes references as written.
    pub services: Option<&'a BTreeMap<Key, ServiceInfo>>,
    /// Every ReferenceGrant.
    pub grants: &'a [ReferenceGrant],
}

/// Everything translated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translation {
    /// Per Service with at least one HTTPRoute in force, by namespace and name.
    pub services: Vec<ServicePolicies>,
    /// Per HTTPRoute with at least one Service parent.
    pub verdicts: BTreeMap<Key, RouteVerdict>,
}

impl Translation {
    /// Every generated policy.
    pub fn policies(&self) -> impl Iterator<Item = &RoutePolicy> {
        self.services.iter().map(|s| &s.policy)
    }

    /// Drops the policies of `service` and records `message` on every HTTPRoute
    /// parent entry that named it.
    pub fn refuse_service(&mut self, service: &Key, message: &str) {
        self.services.retain(|s| &s.service != service);
        for v in self.verdicts.values_mut() {
            let mut hit = false;
            for p in v.parents.iter_mut().filter(|p| &p.service == service) {
                p.problems
                    .push(Problem::host_conflict(p.index, message.to_string()));
                hit = true;
            }
            if hit {
                // Nothing of it is in force there now, not even an older generation.
                v.kept_generation = None;
            }
        }
    }
}

/// The name of the generated policy of Service `svc`.
pub fn policy_name(svc: &str) -> String {
    format!("httproute-{svc}")
}

/// Translates every HTTPRoute that names a Service as a parent.
pub fn translate(routes: &[RouteObject], cluster: Cluster<'_>) -> Translation {
    let mut order: Vec<&RouteObject> = routes.iter().collect();
    order.sort_by(|a, b| {
        (&a.created, &a.namespace, &a.name).cmp(&(&b.created, &b.namespace, &b.name))
    });

    let mut out = Translation::default();
    // Per Service: the HTTPRoutes in force there, in precedence order.
    let mut by_service: BTreeMap<Key, Vec<Contribution>> = BTreeMap::new();
    // The port each Service is routed on, set by its first HTTPRoute.
    let mut service_port: HashMap<Key, (Option<i32>, Key)> = HashMap::new();

    for obj in order {
        let Some((parents, decoded)) = decode(obj) else {
            continue;
        };
        let mut verdict = RouteVerdict {
            generation: obj.generation,
            parents: Vec::new(),
            kept_generation: None,
        };
        let (rules, mut route_problems) = match decoded {
            Ok(spec) => rules(obj, &spec, cluster),
            Err(problem) => (Vec::new(), vec![problem]),
        };
        // A route the validator refuses on its own is refused alone, so that it
        // does not take the other routes of its Service down with it.
        if route_problems.is_empty()
            && let Some((_, first)) = parents.first()
        {
            let ns = first.namespace.as_deref().unwrap_or(&obj.namespace);
            let service = (ns.to_string(), first.name.clone());
            if let Err(e) = build_service(
                &service,
                &[Contribution {
                    route: obj.key(),
                    rules: rules.clone(),
                }],
                true,
            ) {
                route_problems.push(Problem::unsupported("spec", e));
            }
        }
        for (index, parent_ref) in parents {
            let ns = parent_ref
                .namespace
                .clone()
                .unwrap_or_else(|| obj.namespace.clone());
            let service = (ns, parent_ref.name.clone());
            let mut problems = route_problems.clone();
            problems.extend(parent_problems(obj, index, &parent_ref, cluster));
            let port = effective_port(&parent_ref, &service, cluster);
            if problems.is_empty() {
                match service_port.get(&service) {
                    Some((first, owner)) if *first != port => {
                        problems.push(Problem::unsupported(
                            format!("spec.parentRefs[{index}].port"),
                            format!(
                                "Service {}/{} is already routed on {} by HTTPRoute {}/{}; Sluice routes a host on one port",
                                service.0,
                                service.1,
                                port_text(*first),
                                owner.0,
                                owner.1
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        service_port.insert(service.clone(), (port, obj.key()));
                    }
                }
            }
            if problems.is_empty() {
                by_service
                    .entry(service.clone())
                    .or_default()
                    .push(Contribution {
                        route: obj.key(),
                        rules: rules.clone(),
                    });
            }
            verdict.parents.push(ParentVerdict {
                index,
                parent_ref,
                service,
                problems,
            });
        }
        out.verdicts.insert(obj.key(), verdict);
    }

    // A bare Service name is one host for the whole mesh: the first namespace
    // (in name order) to route a Service of that name gets it.
    let mut bare_taken: HashSet<String> = HashSet::new();
    for (service, contributions) in by_service {
        let bare = bare_taken.insert(service.1.clone());
        match build_service(&service, &contributions, bare) {
            Ok(sp) => out.services.push(sp),
            Err(message) => out.refuse_service(&service, &message),
        }
    }
    out
}

/// The Service parentRefs (with their index) and the decoded spec, or `None`
/// when the object names no Service parent (it is not Sluice's).
#[allow(clippy::type_complexity)]
fn decode(obj: &RouteObject) -> Option<(Vec<(usize, ParentRef)>, Result<HttpRouteSpec, Problem>)> {
    let decoded: Result<HttpRouteSpec, _> = serde_path_to_error::deserialize(&obj.spec);
    let parents: Vec<(usize, ParentRef)> = match &decoded {
        Ok(spec) => spec.parent_refs.iter().cloned().enumerate().collect(),
        // A malformed spec: its parents are still read one by one, so that its
        // status can say why.
        Err(_) => obj.spec["parentRefs"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, p)| Some((i, serde_json::from_value(p.clone()).ok()?)))
            .collect(),
    };
    let parents: Vec<(usize, ParentRef)> = parents
        .into_iter()
        .filter(|(_, p)| p.is_service())
        .collect();
    if parents.is_empty() {
        return None;
    }
    let decoded = decoded.map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." || inner.is_empty() {
            "spec".to_string()
        } else {
            format!("spec.{inner}")
        };
        Problem::unsupported(path, e.into_inner().to_string())
    });
    Some((parents, decoded))
}

/// A Service port as the route is scoped to: `None` for every port.
fn effective_port(parent: &ParentRef, service: &Key, cluster: Cluster<'_>) -> Option<i32> {
    parent.port.or_else(|| {
        let info = cluster.services?.get(service)?;
        match info.ports.as_slice() {
            [only] => Some(only.port),
            _ => None,
        }
    })
}

fn port_text(port: Option<i32>) -> String {
    match port {
        Some(p) => format!("port {p}"),
        None => "every port (no parentRef port)".to_string(),
    }
}

/// Problems of one Service parent.
fn parent_problems(
    obj: &RouteObject,
    index: usize,
    parent: &ParentRef,
    cluster: Cluster<'_>,
) -> Vec<Problem> {
    let path = format!("spec.parentRefs[{index}]");
    let mut out = Vec::new();
    if let Some(ns) = &parent.namespace
        && ns != &obj.namespace
    {
        out.push(Problem::unsupported(
            format!("{path}.namespace"),
            format!(
                "a consumer route (an HTTPRoute in {} for a Service in {ns}) is not supported: Sluice applies one policy per Service for every caller; write the route in {ns}",
                obj.namespace
            ),
        ));
        return out;
    }
    if parent.section_name.is_some() {
        out.push(Problem::unsupported(
            format!("{path}.sectionName"),
            "a Service parent is scoped by port, not sectionName",
        ));
    }
    let Some(services) = cluster.services else {
        return out;
    };
    let ns = parent.namespace.as_deref().unwrap_or(&obj.namespace);
    match services.get(&(ns.to_string(), parent.name.clone())) {
        None => out.push(Problem::no_parent(
            format!("{path}.name"),
            format!("Service {ns}/{} not found", parent.name),
        )),
        Some(info) => {
            if let Some(port) = parent.port
                && !info.ports.iter().any(|p| p.port == port)
            {
                out.push(Problem::no_parent(
                    format!("{path}.port"),
                    format!(
                        "Service {ns}/{} has no port {port} (it has {})",
                        parent.name,
                        ports_text(info)
                    ),
                ));
            }
        }
    }
    out
}

fn ports_text(info: &ServiceInfo) -> String {
    if info.ports.is_empty() {
        return "none".to_string();
    }
    info.ports
        .iter()
        .map(|p| p.port.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A backend of a generated policy: a Service port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BackendKey {
    namespace: String,
    name: String,
    port: i32,
}

/// One match of one rule, translated.
#[derive(Clone, Debug)]
struct MatchOut {
    index: usize,
    matches: RouteMatch,
}

/// What one HTTPRoute brings to a Service's policy.
#[derive(Clone, Debug)]
struct Contribution {
    route: Key,
    rules: Vec<RuleOut>,
}

/// One rule, translated.
#[derive(Clone, Debug)]
struct RuleOut {
    label: String,
    matches: Vec<MatchOut>,
    backends: Vec<(BackendKey, u32)>,
    timeout: Option<Duration>,
    retry: Option<sluice_config::Retry>,
}

/// The rules of a route, or what keeps it out of force everywhere.
fn rules(
    obj: &RouteObject,
    spec: &HttpRouteSpec,
    cluster: Cluster<'_>,
) -> (Vec<RuleOut>, Vec<Problem>) {
    let mut problems = Vec::new();
    if !spec.hostnames.is_empty() {
        problems.push(Problem::unsupported(
            "spec.hostnames",
            "hostnames are not supported for Service parents: the Service's own names are the hosts",
        ));
    }
    if spec.use_default_gateways.is_some() {
        problems.push(Problem::unsupported(
            "spec.useDefaultGateways",
            "default Gateways have no meaning in the mesh",
        ));
    }
    if spec.rules.is_empty() {
        problems.push(Problem::unsupported(
            "spec.rules",
            "expected at least one rule",
        ));
    }
    let mut out = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        if let Some(r) = rule_out(obj, &path, i, rule, cluster, &mut problems) {
            out.push(r);
        }
    }
    (out, problems)
}

fn rule_out(
    obj: &RouteObject,
    path: &str,
    index: usize,
    rule: &Rule,
    cluster: Cluster<'_>,
    problems: &mut Vec<Problem>,
) -> Option<RuleOut> {
    let before = problems.len();
    for (f, filter) in rule.filters.iter().enumerate() {
        problems.push(Problem::unsupported(
            format!("{path}.filters[{f}]"),
            format!("filter {} is not supported", filter_type(filter)),
        ));
    }
    if rule.session_persistence.is_some() {
        problems.push(Problem::unsupported(
            format!("{path}.sessionPersistence"),
            "session persistence is not supported (a RoutePolicy's stickyBy keeps users on one side of a split)",
        ));
    }
    let default_match = [Match::default()];
    let matches: &[Match] = match &rule.matches {
        Some(m) if !m.is_empty() => m,
        _ => &default_match,
    };
    let mut matches_out = Vec::new();
    for (m, gm) in matches.iter().enumerate() {
        if let Some(matches) = match_out(&format!("{path}.matches[{m}]"), gm, problems) {
            matches_out.push(MatchOut { index: m, matches });
        }
    }
    // A rule of filters only (a redirect) has no backends: its filter says why.
    if rule.backend_refs.is_empty() && rule.filters.is_empty() {
        problems.push(Problem::unsupported(
            format!("{path}.backendRefs"),
            "a rule without backends (Gateway API answers 500) is not supported",
        ));
    }
    let mut backends = Vec::new();
    for (b, br) in rule.backend_refs.iter().enumerate() {
        if let Some(k) = backend_out(
            obj,
            &format!("{path}.backendRefs[{b}]"),
            br,
            cluster,
            problems,
        ) {
            backends.push(k);
        }
    }
    if !backends.is_empty() && backends.iter().all(|(_, w)| *w == 0) {
        problems.push(Problem::unsupported(
            format!("{path}.backendRefs"),
            "every weight is 0 (Gateway API answers 500); give one backend a weight",
        ));
    }
    let timeout = match rule.timeouts.as_ref().and_then(|t| t.request.as_deref()) {
        Some(s) => duration(&format!("{path}.timeouts.request"), s, problems),
        None => None,
    };
    let per_try = match rule
        .timeouts
        .as_ref()
        .and_then(|t| t.backend_request.as_deref())
    {
        Some(s) => duration(&format!("{path}.timeouts.backendRequest"), s, problems),
        None => None,
    };
    if let (Some(t), Some(p)) = (timeout, per_try)
        && p > t
    {
        problems.push(Problem::unsupported(
            format!("{path}.timeouts.backendRequest"),
            format!("{p} is longer than timeouts.request {t}"),
        ));
    }
    let mut retry = match &rule.retry {
        Some(r) => retry_out(&format!("{path}.retry"), r, problems),
        None => None,
    };
    if let Some(per_try) = per_try {
        retry
            .get_or_insert_with(|| sluice_config::Retry {
                attempts: 0,
                ..Default::default()
            })
            .per_try_timeout = Some(per_try);
    }
    if problems.len() != before {
        return None;
    }
    Some(RuleOut {
        label: rule.name.clone().unwrap_or_else(|| index.to_string()),
        matches: matches_out,
        backends,
        timeout,
        retry,
    })
}

fn filter_type(filter: &Value) -> String {
    match filter["type"].as_str() {
        Some(t) => t.to_string(),
        None => "without a type".to_string(),
    }
}

/// Why the HTTPRoute CRD's validation rules refuse `value` as an `Exact` or
/// `PathPrefix` path (httproutes.gateway.networking.k8s.io, `path`'s
/// `x-kubernetes-validations`), if they do. An object that skipped the API server's
/// validation (`convert` on a file, an older CRD) is held to them here: the proxy
/// resolves dot-segments before routing, so such a path could never match as written.
fn forbidden_path(value: &str) -> Option<String> {
    let rule = "the Gateway API forbids it in Exact and PathPrefix matches";
    let resolved = || match sluice_config::resolve_dot_segments(value) {
        Some(r) => {
            format!("; requests are routed with their dot-segments resolved, so write {r:?}")
        }
        None => String::new(),
    };
    if !value.starts_with('/') {
        return Some(format!(
            "path {value:?} must start with \"/\" ({rule} otherwise)"
        ));
    }
    for (bad, what) in [
        ("//", "an empty segment"),
        ("/./", "a dot-segment"),
        ("/../", "a dot-segment"),
        ("%2f", "an encoded slash"),
        ("%2F", "an encoded slash"),
        ("#", "a fragment"),
    ] {
        if value.contains(bad) {
            return Some(format!(
                "path {value:?} must not contain {bad:?}, {what} ({rule}){}",
                resolved()
            ));
        }
    }
    for bad in ["/..", "/."] {
        if value.ends_with(bad) {
            return Some(format!(
                "path {value:?} must not end with {bad:?}, a dot-segment ({rule}){}",
                resolved()
            ));
        }
    }
    if !value.is_ascii() {
        return Some(format!(
            "path {value:?} must be ASCII, other characters percent-encoded ({rule} otherwise; requests carry them encoded)"
        ));
    }
    None
}

fn match_out(path: &str, m: &Match, problems: &mut Vec<Problem>) -> Option<RouteMatch> {
    let before = problems.len();
    let mut out = RouteMatch::default();
    let (kind, value) = match &m.path {
        Some(p) => (
            p.kind.as_deref().unwrap_or("PathPrefix"),
            p.value.as_deref().unwrap_or("/"),
        ),
        None => ("PathPrefix", "/"),
    };
    let forbidden = matches!(kind, "Exact" | "PathPrefix")
        .then(|| forbidden_path(value))
        .flatten();
    if let Some(why) = forbidden {
        problems.push(Problem::unsupported(format!("{path}.path.value"), why));
    }
    match kind {
        _ if problems.len() > before => {}
        "Exact" => {
            out.path = Some(sluice_config::PathMatch {
                exact: Some(value.to_string()),
                prefix: None,
            })
        }
        "PathPrefix" => {
            // Gateway API ignores a trailing slash of a prefix ("/v2/" takes "/v2").
            let prefix = match value.trim_end_matches('/') {
                "" => "/",
                p => p,
            };
            out.path = Some(sluice_config::PathMatch {
                exact: None,
                prefix: Some(prefix.to_string()),
            });
        }
        "RegularExpression" => problems.push(Problem::unsupported(
            format!("{path}.path.type"),
            "RegularExpression path matches are not supported (use Exact or PathPrefix)",
        )),
        other => problems.push(Problem::unsupported(
            format!("{path}.path.type"),
            format!("unknown path match type {other:?}"),
        )),
    }
    for (h, hm) in m.headers.iter().enumerate() {
        let hp = format!("{path}.headers[{h}]");
        // What a RoutePolicy refuses as a condition that can never match, refused here
        // for this rule alone, rather than the whole Service's policy failing validation.
        if hm.name.eq_ignore_ascii_case("host") {
            problems.push(Problem::unsupported(
                format!("{hp}.name"),
                "a Host header match is not supported: spec.hostnames names the hosts a route takes",
            ));
            continue;
        }
        if hm.value.trim_matches([' ', '\t']) != hm.value {
            problems.push(Problem::unsupported(
                format!("{hp}.value"),
                "a header value with leading or trailing whitespace never matches: HTTP strips it from values received",
            ));
            continue;
        }
        match hm.kind.as_deref().unwrap_or("Exact") {
            "Exact" => {
                // Header names are case-insensitive; the first match of a name counts.
                out.headers
                    .entry(hm.name.to_ascii_lowercase())
                    .or_insert_with(|| hm.value.clone());
            }
            "RegularExpression" => problems.push(Problem::unsupported(
                format!("{hp}.type"),
                "RegularExpression header matches are not supported (use Exact)",
            )),
            other => problems.push(Problem::unsupported(
                format!("{hp}.type"),
                format!("unknown header match type {other:?}"),
            )),
        }
    }
    if !m.query_params.is_empty() {
        problems.push(Problem::unsupported(
            format!("{path}.queryParams"),
            "query parameter matches are not supported",
        ));
    }
    if m.method.as_deref() == Some("CONNECT") {
        problems.push(Problem::unsupported(
            format!("{path}.method"),
            "a CONNECT match is not supported: the mesh answers CONNECT to a governed host with 405",
        ));
    }
    out.method = m.method.clone();
    (problems.len() == before).then_some(out)
}

fn backend_out(
    obj: &RouteObject,
    path: &str,
    b: &BackendRef,
    cluster: Cluster<'_>,
    problems: &mut Vec<Problem>,
) -> Option<(BackendKey, u32)> {
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    if !b.filters.is_empty() {
        problems.push(Problem::unsupported(
            format!("{path}.filters"),
            format!("filter {} is not supported", filter_type(&b.filters[0])),
        ));
    }
    if !group.is_empty() || kind != "Service" {
        problems.push(Problem::unresolved(
            "InvalidKind",
            format!("{path}.kind"),
            format!("only Services can be backends, not {kind} of group {group:?}"),
        ));
        return None;
    }
    let namespace = b.namespace.clone().unwrap_or_else(|| obj.namespace.clone());
    if namespace != obj.namespace
        && !cluster
            .grants
            .iter()
            .any(|g| g.namespace == namespace && g.permits(&obj.namespace, &b.name))
    {
        problems.push(Problem::unresolved(
            "RefNotPermitted",
            format!("{path}.namespace"),
            format!(
                "Service {namespace}/{} is in another namespace and no ReferenceGrant in {namespace} lets HTTPRoutes of {} refer to it",
                b.name, obj.namespace
            ),
        ));
        return None;
    }
    let Some(port) = b.port else {
        problems.push(Problem::unsupported(
            format!("{path}.port"),
            "a Service backend needs its port",
        ));
        return None;
    };
    if let Some(services) = cluster.services {
        match services.get(&(namespace.clone(), b.name.clone())) {
            None => {
                problems.push(Problem::unresolved(
                    "BackendNotFound",
                    format!("{path}.name"),
                    format!("Service {namespace}/{} not found", b.name),
                ));
                return None;
            }
            Some(info) if !info.ports.iter().any(|p| p.port == port) => {
                problems.push(Problem::unresolved(
                    "BackendNotFound",
                    format!("{path}.port"),
                    format!(
                        "Service {namespace}/{} has no port {port} (it has {})",
                        b.name,
                        ports_text(info)
                    ),
                ));
                return None;
            }
            Some(_) => {}
        }
    }
    let weight = b.weight.unwrap_or(1);
    let Ok(weight) = u32::try_from(weight) else {
        problems.push(Problem::unsupported(
            format!("{path}.weight"),
            format!("expected a weight of 0 or more, got {weight}"),
        ));
        return None;
    };
    Some((
        BackendKey {
            namespace,
            name: b.name.clone(),
            port,
        },
        weight,
    ))
}

/// A Gateway API duration as a policy duration; `0s` (no timeout) is `None`.
fn duration(path: &str, text: &str, problems: &mut Vec<Problem>) -> Option<Duration> {
    match Duration::from_str(text) {
        Ok(d) if d.get().is_zero() => None,
        Ok(d) if d.get() > MAX_DURATION => {
            problems.push(Problem::unsupported(
                path,
                format!("{text} is longer than the 1h Sluice allows (0s turns the timeout off)"),
            ));
            None
        }
        Ok(d) if d.get() < std::time::Duration::from_millis(1) => None,
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(Problem::unsupported(path, e.to_string()));
            None
        }
    }
}

fn retry_out(
    path: &str,
    r: &super::model::Retry,
    problems: &mut Vec<Problem>,
) -> Option<sluice_config::Retry> {
    let before = problems.len();
    let attempts = match r.attempts {
        None => DEFAULT_ATTEMPTS,
        Some(n) if (0..=MAX_ATTEMPTS).contains(&n) => n as u32,
        Some(n) => {
            problems.push(Problem::unsupported(
                format!("{path}.attempts"),
                format!("expected at most {MAX_ATTEMPTS} retries, got {n}"),
            ));
            0
        }
    };
    let mut status_codes = Vec::new();
    for (i, code) in r.codes.iter().enumerate() {
        match u16::try_from(*code) {
            Ok(c) if (400..=599).contains(&c) => {
                if !status_codes.contains(&c) {
                    status_codes.push(c);
                }
            }
            _ => problems.push(Problem::unsupported(
                format!("{path}.codes[{i}]"),
                format!("expected a status code 400..=599, got {code}"),
            )),
        }
    }
    let backoff = match r.backoff.as_deref() {
        Some(text) => duration(&format!("{path}.backoff"), text, problems).map(|min| Backoff {
            min: Some(min),
            // The floor may not exceed the largest delay.
            max: (min.get() > DEFAULT_BACKOFF_MAX).then_some(min),
            ..Default::default()
        }),
        None => None,
    };
    (problems.len() == before).then(|| sluice_config::Retry {
        attempts,
        // A connection that was never made is always safe to try again.
        on: vec![RetryOn::ConnectFailure],
        status_codes,
        backoff,
        ..Default::default()
    })
}

// === building the policies ===

fn hash8(seed: &str) -> String {
    hex::encode(&Sha256::digest(seed.as_bytes())[..4])
}

/// `s` as a DNS label: itself when it is one, else shortened (or cleaned up) with
/// a hash of the whole suffixed, so distinct inputs stay distinct.
fn label(s: &str) -> String {
    if is_dns_label(s) {
        return s.to_string();
    }
    with_hash(s, s)
}

fn with_hash(base: &str, seed: &str) -> String {
    let clean: String = base
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(54)
        .collect();
    let clean = clean.trim_matches('-');
    if clean.is_empty() {
        hash8(seed)
    } else {
        format!("{clean}-{}", hash8(seed))
    }
}

fn backend_name(service_ns: &str, k: &BackendKey) -> String {
    if k.namespace == service_ns {
        label(&format!("{}-{}", k.name, k.port))
    } else {
        label(&format!("{}-{}-{}", k.name, k.namespace, k.port))
    }
}

/// The routes one HTTPRoute contributes, named, with the backends they use.
fn routes_of(
    service: &Key,
    route: &Key,
    rules: &[RuleOut],
    backends: &mut IndexMap<String, Backend>,
    names: &mut HashSet<String>,
) -> Vec<Route> {
    let mut out = Vec::new();
    for rule in rules {
        let mut weights = IndexMap::new();
        for (k, w) in &rule.backends {
            let name = backend_name(&service.0, k);
            backends.entry(name.clone()).or_insert_with(|| Backend {
                service: Some(format!("{}.{}", k.name, k.namespace)),
                port: Some(ServicePort::Number(k.port as u32)),
                ..Default::default()
            });
            *weights.entry(name).or_insert(0) += *w;
        }
        let split = if weights.len() == 1 {
            vec![SplitRule {
                backend: weights.keys().next().cloned(),
                ..Default::default()
            }]
        } else {
            vec![SplitRule {
                weights: Some(weights),
                ..Default::default()
            }]
        };
        for m in &rule.matches {
            let full = format!("{}-{}-{}", route.1, rule.label, m.index);
            let mut name = label(&full);
            if !names.insert(name.clone()) {
                name = with_hash(
                    &full,
                    &format!("{}/{}/{}/{}", route.0, route.1, rule.label, m.index),
                );
                names.insert(name.clone());
            }
            out.push(Route {
                name,
                matches: m.matches.clone(),
                timeout: rule.timeout,
                retry: rule.retry.clone(),
                split: split.clone(),
                ..Default::default()
            });
        }
    }
    out
}

/// Drops the routes tried after another route that takes all their requests.
fn without_shadowed(routes: Vec<Route>) -> Vec<Route> {
    let shadowed: BTreeSet<usize> = shadowed_routes(&routes)
        .into_iter()
        .map(|(i, _)| i)
        .collect();
    routes
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !shadowed.contains(i))
        .map(|(_, r)| r)
        .collect()
}

fn policy(
    service: &Key,
    name: String,
    (host, aliases): (String, Vec<String>),
    sources: &str,
    backends: IndexMap<String, Backend>,
    routes: Vec<Route>,
) -> RoutePolicy {
    RoutePolicy {
        api_version: API_VERSION.to_string(),
        kind: KIND.to_string(),
        metadata: Metadata {
            name,
            namespace: Some(service.0.clone()),
            annotations: [(SOURCE_ANNOTATION.to_string(), sources.to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        },
        spec: RoutePolicySpec {
            host,
            aliases,
            backends,
            routes,
            inbound: None,
        },
    }
}

/// The policies of one Service from the HTTPRoutes in force there; an error
/// when the merged policy does not validate (every route in it is refused).
fn build_service(
    service: &Key,
    contributions: &[Contribution],
    bare: bool,
) -> Result<ServicePolicies, String> {
    let mut backends = IndexMap::new();
    let mut names = HashSet::new();
    let mut routes = Vec::new();
    for c in contributions {
        routes.extend(routes_of(
            service,
            &c.route,
            &c.rules,
            &mut backends,
            &mut names,
        ));
    }
    let routes = without_shadowed(routes);
    let sources: Vec<String> = contributions
        .iter()
        .map(|c| format!("{}/{}", c.route.0, c.route.1))
        .collect();
    let sources_text = sources.join(",");
    let (ns, svc) = (&service.0, &service.1);
    let mut aliases = Vec::new();
    if bare {
        aliases.push(svc.clone());
    }
    aliases.push(format!("{svc}.{ns}"));
    let policy = policy(
        service,
        policy_name(svc),
        (format!("{svc}.{ns}.svc.cluster.local"), aliases),
        &sources_text,
        backends,
        routes,
    );
    if let Err(e) = PolicySet::from_effective(vec![policy.clone()]) {
        return Err(format!(
            "the policy generated for Service {ns}/{svc} from {} is refused: {e}",
            sources.join(", ")
        ));
    }
    Ok(ServicePolicies {
        service: service.clone(),
        policy,
        routes: contributions.iter().map(|c| c.route.clone()).collect(),
    })
}
