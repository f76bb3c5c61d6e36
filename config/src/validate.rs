//! Semantic checks on one deserialised policy: everything serde's type shape
//! cannot say (ranges, exactly-one-of rules, references between fields, names,
//! unreachable routes). Each problem is a [`Finding`] on a field path; the parser
//! turns paths into file positions.

mod second_wave;

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::hash::Hash;

use indexmap::IndexMap;

use crate::spans::{child_index, child_key};
use crate::{
    API_VERSION, Backend, CircuitBreaker, Duration, Inbound, KIND, PathMatch, RateLimit, Retry,
    Route, RouteMatch, RoutePolicy, SplitRule, precedence_order, prefix_matches,
};

/// One problem, before it is given a file position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Finding {
    /// Field path, e.g. `spec.routes[0].retry.attempts`.
    pub(crate) path: String,
    /// Point at the mapping key rather than its value (names that are keys).
    pub(crate) at_key: bool,
    pub(crate) message: String,
}

/// An inclusive integer range a field must fall in.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IntRange {
    pub(crate) min: u64,
    pub(crate) max: u64,
}

impl IntRange {
    pub(crate) fn expected(self) -> String {
        format!("an integer {}..={}", self.min, self.max)
    }

    fn contains(self, v: u64) -> bool {
        (self.min..=self.max).contains(&v)
    }
}

pub(crate) const ATTEMPTS: IntRange = IntRange { min: 0, max: 10 };
pub(crate) const PER_SECOND: IntRange = IntRange {
    min: 1,
    max: 1_000_000,
};
pub(crate) const BURST: IntRange = IntRange {
    min: 1,
    max: 1_000_000,
};
pub(crate) const MIN_PER_SECOND: IntRange = IntRange {
    min: 0,
    max: 1_000_000,
};
pub(crate) const WEIGHT: IntRange = IntRange { min: 0, max: 100 };
/// A weight in a snapshot: Gateway API allows up to a million.
const SNAPSHOT_WEIGHT: IntRange = IntRange {
    min: 0,
    max: 1_000_000,
};
pub(crate) const PERCENT: IntRange = IntRange { min: 1, max: 100 };
pub(crate) const CONSECUTIVE_FAILURES: IntRange = IntRange {
    min: 1,
    max: 10_000,
};
pub(crate) const HALF_OPEN_REQUESTS: IntRange = IntRange { min: 1, max: 1_000 };
pub(crate) const MIN_REQUESTS: IntRange = IntRange {
    min: 1,
    max: 1_000_000,
};
pub(crate) const STATUS_CODE: IntRange = IntRange { min: 400, max: 599 };
pub(crate) const MAX_REPLAY_BYTES: IntRange = IntRange {
    min: 0,
    max: 16 * 1024 * 1024,
};
pub(crate) const RATIO_EXPECTED: &str = "a number 0..=1";
pub(crate) const DURATION_EXPECTED: &str = "a duration 1ms..=1h";

const DURATION_MIN: std::time::Duration = std::time::Duration::from_millis(1);
const DURATION_MAX: std::time::Duration = std::time::Duration::from_secs(3600);
/// Defaults that limit what a user may set beside them (documented on the model).
const DEFAULT_BACKOFF_MAX: std::time::Duration = crate::defaults::BACKOFF_MAX;
const DEFAULT_MAX_OPEN_FOR: std::time::Duration = crate::defaults::MAX_OPEN_FOR;

/// Where a policy comes from, which decides one rule: weights written by people sum
/// to 100 (a typo check); weights in a snapshot (effective weights, Gateway API
/// proportions) may have any total above zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Input {
    /// A file or a Kubernetes object written by a person.
    Source,
    /// A snapshot's canonical policies, as the control plane sends them.
    Snapshot,
}

/// Checks one policy from `input`; returns every problem found.
pub(crate) fn validate_as(policy: &RoutePolicy, input: Input) -> Vec<Finding> {
    let mut v = Checker {
        out: Vec::new(),
        input,
        fallback_only: HashSet::new(),
    };
    v.policy(policy);
    v.out
}

struct Checker {
    out: Vec<Finding>,
    input: Input,
    /// Backends named only as a route's fallback (they need no split).
    fallback_only: HashSet<String>,
}

impl Checker {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out.push(Finding {
            path: path.into(),
            at_key: false,
            message: message.into(),
        });
    }

    fn err_key(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out.push(Finding {
            path: path.into(),
            at_key: true,
            message: message.into(),
        });
    }

    fn int(&mut self, path: &str, value: impl Into<u64>, range: IntRange) {
        let value = value.into();
        if !range.contains(value) {
            self.err(path, format!("expected {}, got {value}", range.expected()));
        }
    }

    /// Checks the range; true when it holds.
    fn duration(&mut self, path: &str, d: Duration) -> bool {
        let ok = (DURATION_MIN..=DURATION_MAX).contains(&d.get());
        if !ok {
            self.err(path, format!("expected {DURATION_EXPECTED}, got {d}"));
        }
        ok
    }

    /// Checks the range of a given duration; true when absent or in range.
    fn opt_duration(&mut self, path: &str, d: Option<Duration>) -> bool {
        d.is_none_or(|d| self.duration(path, d))
    }

    /// Reports every repeated element of a list after its first occurrence.
    fn no_duplicates<T: Eq + Hash + Display>(
        &mut self,
        path: &str,
        items: impl Iterator<Item = T>,
    ) {
        let mut seen = HashMap::new();
        for (i, item) in items.enumerate() {
            if let Some(first) = seen.get(&item) {
                let msg = format!("duplicate {item} (also at [{first}])");
                self.err(child_index(path, i), msg);
            } else {
                seen.insert(item, i);
            }
        }
    }

    fn exactly_one(&mut self, path: &str, names: &[&str], present: &[bool]) -> bool {
        let given: Vec<&str> = names
            .iter()
            .zip(present)
            .filter(|(_, p)| **p)
            .map(|(n, _)| *n)
            .collect();
        if given.len() == 1 {
            return true;
        }
        let got = match given.len() {
            0 => "none".to_string(),
            _ => join_and(&given),
        };
        self.err(
            path,
            format!("expected exactly one of {}, got {got}", join_and(names)),
        );
        false
    }

    fn header_name(&mut self, path: &str, at_key: bool, name: &str) {
        if !is_header_name(name) {
            let msg = format!(
                "expected a lower-case header name such as \"x-user-id\", got {}",
                quote_value(name)
            );
            if at_key {
                self.err_key(path, msg);
            } else {
                self.err(path, msg);
            }
        }
    }

    fn header_map(&mut self, path: &str, headers: &IndexMap<String, String>) {
        for (name, value) in headers {
            let p = child_key(path, name);
            self.header_name(&p, true, name);
            self.header_value(&p, value);
        }
    }

    /// A value a received header must equal: HTTP strips spaces and tabs around a
    /// field value, so one written with them could never match.
    fn header_condition_value(&mut self, path: &str, value: &str) {
        if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
            self.err(
                path,
                format!(
                    "expected a header value without leading or trailing spaces or tabs (HTTP strips them from the values a request carries, so this could never match), got {}",
                    quote_value(value)
                ),
            );
        }
    }

    fn header_value(&mut self, path: &str, value: &str) {
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            self.err(
                path,
                format!(
                    "expected a header value without control characters, got {}",
                    quote_value(value)
                ),
            );
        }
    }

    /// Headers a request must carry to match (route `match`, split `when`): a header
    /// map whose conditions some request can meet.
    fn header_conditions(&mut self, path: &str, headers: &IndexMap<String, String>) {
        for (name, value) in headers {
            let p = child_key(path, name);
            if name == "host" || name == ":authority" {
                // HTTP/1 carries the authority in Host as written (port and all),
                // HTTP/2 in :authority with no host header: a condition on either
                // would route the same request differently by protocol.
                self.err_key(
                    &p,
                    format!(
                        "{name:?} is the authority, which chooses the policy, not a route: HTTP/1 carries it in Host as the client wrote it and HTTP/2 in :authority without a host header, so this condition would route by protocol; to answer another name, list it in spec.aliases (or give it a policy of its own with spec.host)"
                    ),
                );
            } else {
                self.header_name(&p, true, name);
            }
            self.header_value(&p, value);
            self.header_condition_value(&p, value);
        }
    }

    fn spiffe(&mut self, path: &str, id: &str) {
        if !is_spiffe_id(id) {
            self.err(
                path,
                format!(
                    "expected a SPIFFE ID such as \"spiffe://cluster.local/ns/shop/sa/order\", got {}",
                    quote_value(id)
                ),
            );
        }
    }

    // === the policy ===

    fn policy(&mut self, p: &RoutePolicy) {
        if p.api_version != API_VERSION {
            self.err(
                "apiVersion",
                format!(
                    "expected {API_VERSION:?}, got {}",
                    quote_value(&p.api_version)
                ),
            );
        }
        if p.kind != KIND {
            self.err(
                "kind",
                format!("expected {KIND:?}, got {}", quote_value(&p.kind)),
            );
        }
        let m = &p.metadata;
        if !is_dns_subdomain(&m.name) {
            self.err(
                "metadata.name",
                format!(
                    "expected a lower-case name of letters, digits, '-' and '.' (at most 253), got {}",
                    quote_value(&m.name)
                ),
            );
        }
        if let Some(ns) = &m.namespace
            && !is_dns_label(ns)
        {
            self.err(
                "metadata.namespace",
                format!(
                    "expected a lower-case name of letters, digits and '-' (at most 63), got {}",
                    quote_value(ns)
                ),
            );
        }
        let spec = &p.spec;
        if spec.host.is_empty() {
            self.err("spec.host", "must not be empty");
        } else if is_ipv6(&spec.host) {
            self.err("spec.host", ipv6_host_message(&spec.host));
        } else if !is_host(&spec.host) {
            self.err(
                "spec.host",
                format!(
                    "expected a lower-case host name without scheme or port (e.g. \"log-service\"), got {}",
                    quote_value(&spec.host)
                ),
            );
        }
        let mut seen = std::collections::HashSet::from([spec.host.as_str()]);
        for (i, alias) in spec.aliases.iter().enumerate() {
            let path = format!("spec.aliases[{i}]");
            if is_ipv6(alias) {
                self.err(path, ipv6_host_message(alias));
            } else if !is_host(alias) {
                self.err(
                    path,
                    format!(
                        "expected a lower-case host name without scheme or port (e.g. \"log-service.prod\"), got {}",
                        quote_value(alias)
                    ),
                );
            } else if !seen.insert(alias) {
                self.err(
                    path,
                    format!("{} is already a name of this policy", quote_value(alias)),
                );
            }
        }
        if spec.routes.is_empty() && spec.inbound.is_none() {
            self.err("spec", "expected at least one route or an inbound section");
        }
        if !spec.routes.is_empty() && spec.backends.is_empty() {
            self.err(
                "spec.backends",
                "expected at least one backend for the routes to send traffic to",
            );
        }
        self.fallback_only = self
            .fallback_only(p)
            .into_iter()
            .map(str::to_string)
            .collect();
        for (name, backend) in &spec.backends {
            let path = child_key("spec.backends", name);
            self.backend(&path, name, backend);
            self.backend_v2(&path, backend);
        }
        self.routes(&spec.routes, &spec.backends);
        if let Some(inbound) = &spec.inbound {
            self.inbound("spec.inbound", inbound);
        }
    }

    fn backend(&mut self, path: &str, name: &str, b: &Backend) {
        if !is_dns_label(name) {
            self.err_key(
                path,
                format!(
                    "expected a backend name of lower-case letters, digits and '-' (at most 63), got {}",
                    quote_value(name)
                ),
            );
        }
        self.exactly_one(
            path,
            &["addresses", "service"],
            &[!b.addresses.is_empty(), b.service.is_some()],
        );
        let addrs = child_key(path, "addresses");
        for (i, a) in b.addresses.iter().enumerate() {
            if !is_host_port(a) {
                self.err(
                    child_index(&addrs, i),
                    format!(
                        "expected host:port (an IP address or DNS name and a port 1..=65535), got {}",
                        quote_value(a)
                    ),
                );
            }
        }
        self.no_duplicates(&addrs, b.addresses.iter().map(|a| quote_value(a)));
        if let Some(svc) = &b.service
            && !is_service(svc)
        {
            self.err(
                child_key(path, "service"),
                format!(
                    "expected a Service as name.namespace (e.g. \"log-v1.shop\"), got {}",
                    quote_value(svc)
                ),
            );
        }
        if let Some(id) = &b.identity {
            self.spiffe(&child_key(path, "identity"), id);
        }
    }

    fn routes(&mut self, routes: &[Route], backends: &IndexMap<String, Backend>) {
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            let path = child_index("spec.routes", i);
            let name_path = child_key(&path, "name");
            if r.name.is_empty() {
                self.err(&name_path, "must not be empty");
            } else if !is_dns_label(&r.name) {
                self.err(
                    &name_path,
                    format!(
                        "expected a route name of lower-case letters, digits and '-' (at most 63), got {}",
                        quote_value(&r.name)
                    ),
                );
            } else if let Some(first) = names.get(r.name.as_str()) {
                self.err(
                    &name_path,
                    format!(
                        "duplicate route name {} (also spec.routes[{first}])",
                        quote_value(&r.name)
                    ),
                );
            } else {
                names.insert(&r.name, i);
            }
            self.route(&path, r, backends);
        }
        self.unreachable_routes(routes);
    }

    fn route(&mut self, path: &str, r: &Route, backends: &IndexMap<String, Backend>) {
        self.route_match(&child_key(path, "match"), &r.matches);
        self.opt_duration(&child_key(path, "timeout"), r.timeout);
        if let Some(rl) = &r.rate_limit {
            let rp = child_key(path, "rateLimit");
            self.rate_limit(&rp, rl);
            self.rate_limit_scope(&rp, rl, false);
        }
        if let Some(retry) = &r.retry {
            self.retry(&child_key(path, "retry"), retry, r.timeout);
        }
        if let Some(cb) = &r.circuit_breaker {
            self.circuit_breaker(&child_key(path, "circuitBreaker"), cb);
        }
        let primaries = backends.len() - self.fallback_only.len();
        if r.split.is_empty() {
            if primaries > 1 {
                self.err(
                    path,
                    format!(
                        "the policy has {primaries} backends, so the route needs a split to choose between them",
                    ),
                );
            }
        } else {
            self.split(&child_key(path, "split"), &r.split, backends);
        }
        self.route_v2(path, r, backends);
    }

    fn route_match(&mut self, path: &str, m: &RouteMatch) {
        if let Some(pm) = &m.path {
            let pp = child_key(path, "path");
            if self.exactly_one(
                &pp,
                &["exact", "prefix"],
                &[pm.exact.is_some(), pm.prefix.is_some()],
            ) {
                let (field, value) = match (&pm.exact, &pm.prefix) {
                    (Some(e), _) => ("exact", e),
                    (_, Some(p)) => ("prefix", p),
                    _ => unreachable!("exactly one is set"),
                };
                if !is_http_path(value) {
                    self.err(
                        child_key(&pp, field),
                        format!(
                            "expected a path starting with \"/\" without query, fragment or spaces, got {}",
                            quote_value(value)
                        ),
                    );
                } else if !value.is_ascii() {
                    self.err(
                        child_key(&pp, field),
                        format!(
                            "{} has characters that are not ASCII, which a request target cannot carry: clients send them percent-encoded and the proxy matches the path as sent, without decoding, so this route could never match; write {}",
                            quote_value(value),
                            quote_value(&percent_encode_non_ascii(value))
                        ),
                    );
                } else if let Some(resolved) = crate::resolve_dot_segments(value) {
                    let segment = crate::first_dot_segment(value).unwrap_or_default();
                    self.err(
                        child_key(&pp, field),
                        format!(
                            "{} has the dot-segment {segment:?}, but the proxy resolves dot-segments in request paths before routing (RFC 3986 §5.2.4, %2e counted as a dot), so this route could never match; write {}, the path such requests are routed as",
                            quote_value(value),
                            quote_value(&resolved)
                        ),
                    );
                }
            }
        }
        if let Some(method) = &m.method {
            if !is_method(method) {
                self.err(
                    child_key(path, "method"),
                    format!(
                        "expected an upper-case HTTP method such as \"GET\" or \"POST\", got {}",
                        quote_value(method)
                    ),
                );
            } else if method == "CONNECT" {
                self.err(
                    child_key(path, "method"),
                    "the proxy answers CONNECT to a governed host with 405 method-not-allowed before any route is tried, so this route could never match",
                );
            }
        }
        self.header_conditions(&child_key(path, "headers"), &m.headers);
    }

    fn rate_limit(&mut self, path: &str, rl: &RateLimit) {
        self.int(&child_key(path, "perSecond"), rl.per_second, PER_SECOND);
        if let Some(b) = rl.burst {
            self.int(&child_key(path, "burst"), b, BURST);
        }
        if let Some(key) = &rl.key {
            let kp = child_key(path, "key");
            self.exactly_one(
                &kp,
                &["header", "path", "peerIdentity"],
                &[
                    key.header.is_some(),
                    key.path.is_some(),
                    key.peer_identity.is_some(),
                ],
            );
            if let Some(h) = &key.header {
                self.header_name(&child_key(&kp, "header"), false, h);
            }
            for (field, flag) in [("path", key.path), ("peerIdentity", key.peer_identity)] {
                if flag == Some(false) {
                    self.err(
                        child_key(&kp, field),
                        "expected true (leave the field out instead of false), got false",
                    );
                }
            }
        }
    }

    fn retry(&mut self, path: &str, r: &Retry, route_timeout: Option<Duration>) {
        self.int(&child_key(path, "attempts"), r.attempts, ATTEMPTS);
        self.no_duplicates(&child_key(path, "on"), r.on.iter().map(quoted));
        let codes = child_key(path, "statusCodes");
        for (i, code) in r.status_codes.iter().enumerate() {
            self.int(&child_index(&codes, i), *code, STATUS_CODE);
        }
        self.no_duplicates(&codes, r.status_codes.iter());
        self.no_duplicates(
            &child_key(path, "grpcStatuses"),
            r.grpc_statuses.iter().map(quoted),
        );
        let ptt = child_key(path, "perTryTimeout");
        if let (true, Some(per_try), Some(total)) = (
            self.opt_duration(&ptt, r.per_try_timeout),
            r.per_try_timeout,
            route_timeout,
        ) && per_try > total
        {
            self.err(
                &ptt,
                format!("{per_try} is longer than the route's timeout {total}"),
            );
        }
        if let Some(b) = &r.backoff {
            let bp = child_key(path, "backoff");
            let base_ok = self.opt_duration(&child_key(&bp, "base"), b.base);
            let max_ok = self.opt_duration(&child_key(&bp, "max"), b.max);
            if let (true, true, Some(base)) = (base_ok, max_ok, b.base) {
                let (max, what) = match b.max {
                    Some(m) => (m.get(), format!("backoff.max {m}")),
                    None => (
                        DEFAULT_BACKOFF_MAX,
                        format!("the default backoff.max {}", Duration(DEFAULT_BACKOFF_MAX)),
                    ),
                };
                if base.get() > max {
                    self.err(
                        child_key(&bp, "base"),
                        format!("{base} is longer than {what}"),
                    );
                }
            }
            self.backoff_min(&bp, b);
        }
        if let Some(bytes) = r.max_replay_bytes {
            self.int(&child_key(path, "maxReplayBytes"), bytes, MAX_REPLAY_BYTES);
        }
        if let Some(budget) = &r.budget {
            let bp = child_key(path, "budget");
            if !(0.0..=1.0).contains(&budget.ratio) {
                self.err(
                    child_key(&bp, "ratio"),
                    format!("expected {RATIO_EXPECTED}, got {}", budget.ratio),
                );
            }
            self.int(
                &child_key(&bp, "minPerSecond"),
                budget.min_per_second,
                MIN_PER_SECOND,
            );
            self.opt_duration(&child_key(&bp, "window"), budget.window);
        }
    }

    fn circuit_breaker(&mut self, path: &str, cb: &CircuitBreaker) {
        if cb.consecutive_failures.is_none() && cb.failure_rate.is_none() {
            self.err(
                path,
                "expected at least one of consecutiveFailures and failureRate, got neither",
            );
        }
        if let Some(n) = cb.consecutive_failures {
            self.int(
                &child_key(path, "consecutiveFailures"),
                n,
                CONSECUTIVE_FAILURES,
            );
        }
        if let Some(fr) = &cb.failure_rate {
            let fp = child_key(path, "failureRate");
            self.int(&child_key(&fp, "percent"), fr.percent, PERCENT);
            let _ = self.duration(&child_key(&fp, "window"), fr.window);
            self.int(
                &child_key(&fp, "minRequests"),
                fr.min_requests,
                MIN_REQUESTS,
            );
        }
        let open_for = child_key(path, "openFor");
        let open_ok = self.opt_duration(&open_for, cb.open_for);
        let max_ok = self.opt_duration(&child_key(path, "maxOpenFor"), cb.max_open_for);
        if let (true, true, Some(open)) = (open_ok, max_ok, cb.open_for) {
            let (max, what) = match cb.max_open_for {
                Some(m) => (m.get(), format!("maxOpenFor {m}")),
                None => (
                    DEFAULT_MAX_OPEN_FOR,
                    format!("the default maxOpenFor {}", Duration(DEFAULT_MAX_OPEN_FOR)),
                ),
            };
            if open.get() > max {
                self.err(&open_for, format!("{open} is longer than {what}"));
            }
        }
        if let Some(n) = cb.half_open_requests {
            self.int(&child_key(path, "halfOpenRequests"), n, HALF_OPEN_REQUESTS);
        }
        self.no_duplicates(
            &child_key(path, "failureOn"),
            cb.failure_on.iter().map(quoted),
        );
        self.no_duplicates(
            &child_key(path, "grpcStatuses"),
            cb.grpc_statuses.iter().map(quoted),
        );
    }

    fn split(&mut self, path: &str, rules: &[SplitRule], backends: &IndexMap<String, Backend>) {
        let known = || {
            backends
                .keys()
                .map(|k| cut_value(k))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut catch_all: Option<usize> = None;
        for (k, rule) in rules.iter().enumerate() {
            let rp = child_index(path, k);
            if let Some(first) = catch_all {
                self.err(
                    &rp,
                    format!(
                        "this rule is never used: rule [{first}] before it has no when and takes every request"
                    ),
                );
            }
            match &rule.when {
                None => {
                    catch_all.get_or_insert(k);
                }
                Some(when) => {
                    let wp = child_key(&rp, "when");
                    if when.headers.is_empty() {
                        self.err(
                            &wp,
                            "expected at least one header (leave when out to match every request)",
                        );
                        catch_all.get_or_insert(k);
                    }
                    self.header_conditions(&child_key(&wp, "headers"), &when.headers);
                }
            }
            self.exactly_one(
                &rp,
                &["backend", "weights"],
                &[rule.backend.is_some(), rule.weights.is_some()],
            );
            if let Some(b) = &rule.backend
                && !backends.contains_key(b)
            {
                self.err(
                    child_key(&rp, "backend"),
                    format!("unknown backend {}; defined: {}", quote_value(b), known()),
                );
            }
            if let Some(weights) = &rule.weights {
                let wp = child_key(&rp, "weights");
                if weights.is_empty() {
                    self.err(&wp, "expected at least one backend with a weight");
                }
                let mut sum: u64 = 0;
                for (name, w) in weights {
                    let p = child_key(&wp, name);
                    if !backends.contains_key(name) {
                        self.err_key(
                            &p,
                            format!(
                                "unknown backend {}; defined: {}",
                                quote_value(name),
                                known()
                            ),
                        );
                    }
                    let range = match self.input {
                        Input::Source => WEIGHT,
                        Input::Snapshot => SNAPSHOT_WEIGHT,
                    };
                    self.int(&p, *w, range);
                    sum += u64::from(*w);
                }
                match self.input {
                    Input::Source if !weights.is_empty() && sum != 100 => {
                        self.err(&wp, format!("weights sum to {sum}, expected 100"));
                    }
                    Input::Snapshot if !weights.is_empty() && sum == 0 => {
                        self.err(&wp, "weights sum to 0, expected a total above 0");
                    }
                    _ => {}
                }
            }
            if let Some(sticky) = &rule.sticky_by {
                let sp = child_key(&rp, "stickyBy");
                if rule.weights.is_none() {
                    self.err(
                        &sp,
                        "only a rule with weights can be sticky; this rule has none",
                    );
                }
                self.header_name(&child_key(&sp, "header"), false, &sticky.header);
            }
            self.split_rule_v2(&rp, rule);
        }
        if catch_all.is_none() {
            self.err(
                path,
                "every rule has a when, so a request matching none has no backend; end with a rule without when",
            );
        }
    }

    fn unreachable_routes(&mut self, routes: &[Route]) {
        for (later, earlier) in shadowed_routes(routes) {
            self.err(
                child_index("spec.routes", later),
                format!(
                    "route {} is never used: route {} (spec.routes[{earlier}]) is tried before it and matches every request it matches",
                    quote_value(&routes[later].name),
                    quote_value(&routes[earlier].name)
                ),
            );
        }
    }

    fn inbound(&mut self, path: &str, inbound: &Inbound) {
        if let Some(allow) = &inbound.allow {
            let ap = child_key(path, "allow");
            if allow.is_empty() {
                self.err(
                    &ap,
                    "an empty list allows nobody; leave allow out to allow every authenticated peer",
                );
            }
            for (i, id) in allow.iter().enumerate() {
                self.spiffe(&child_index(&ap, i), id);
            }
            self.no_duplicates(&ap, allow.iter().map(|a| quote_value(a)));
        }
        if let Some(rl) = &inbound.rate_limit {
            let rp = child_key(path, "rateLimit");
            self.rate_limit(&rp, rl);
            self.rate_limit_scope(&rp, rl, true);
        }
        if let Some(c) = &inbound.concurrency {
            self.concurrency(&child_key(path, "concurrency"), c);
        }
    }
}

/// Routes of one host that are never chosen, each with the route (by index) tried
/// before it that takes every request it would: the validator refuses these in a
/// policy file; a translator (Gateway API) drops them, since there precedence
/// across objects decides and the earlier route simply wins.
pub fn shadowed_routes(routes: &[Route]) -> Vec<(usize, usize)> {
    crate::shadow::never_used(
        routes,
        &precedence_order(routes),
        |r| valid_path(&routes[r].matches).is_some(),
        |a, b| route_covers(&routes[a], &routes[b]),
    )
    .0
}

/// A path match usable for the reachability check: `Some(None)` for "any path",
/// `None` when the match is malformed (already reported; skipped to avoid noise).
fn valid_path(m: &RouteMatch) -> Option<Option<&PathMatch>> {
    match &m.path {
        None => Some(None),
        Some(p) if p.exact.is_some() != p.prefix.is_some() => Some(Some(p)),
        Some(_) => None,
    }
}

/// Whether route `a` takes every request route `b` takes (both of well-formed matches).
pub(crate) fn route_covers(a: &Route, b: &Route) -> bool {
    match (valid_path(&a.matches), valid_path(&b.matches)) {
        (Some(pa), Some(pb)) => covers(&a.matches, pa, &b.matches, pb),
        _ => false,
    }
}

/// Whether every request `b` matches is also matched by `a`.
fn covers(
    a: &RouteMatch,
    a_path: Option<&PathMatch>,
    b: &RouteMatch,
    b_path: Option<&PathMatch>,
) -> bool {
    let path_covers = match (a_path, b_path) {
        (None, _) => true,
        (Some(pa), pb) => match (&pa.exact, &pa.prefix, pb) {
            (Some(e), _, Some(pb)) => pb.exact.as_ref() == Some(e),
            (Some(_), _, None) => false,
            // Request paths always start with "/", so a prefix of "/" takes them all.
            (None, Some(p), _) if p == "/" => true,
            (None, Some(p), Some(pb)) => match (&pb.exact, &pb.prefix) {
                (Some(e), _) => prefix_matches(p, e),
                (None, Some(q)) => prefix_matches(p, q),
                (None, None) => false,
            },
            _ => false,
        },
    };
    // Cheapest test first: this runs for every pair of routes of a host.
    path_covers
        && (a.method.is_none() || a.method == b.method)
        && a.headers.iter().all(|(k, v)| b.headers.get(k) == Some(v))
}

fn quoted(v: &impl serde::Serialize) -> String {
    // Unit enums serialise to their YAML spelling, which is what the user wrote.
    match serde_yaml::to_value(v) {
        Ok(serde_yaml::Value::String(s)) => format!("{s:?}"),
        _ => String::from("value"),
    }
}

/// Characters of a user value a message shows: enough to recognise it, while a huge
/// value (or many aliases of one) cannot make a huge message.
const QUOTE_MAX_CHARS: usize = 80;

/// A user value as a message quotes it: in double quotes with escapes, cut after
/// [`QUOTE_MAX_CHARS`] characters, saying how many bytes were left out.
pub(crate) fn quote_value(s: &str) -> String {
    match s.char_indices().nth(QUOTE_MAX_CHARS) {
        None => format!("{s:?}"),
        Some((end, _)) => {
            let shown = format!("{:?}", &s[..end]);
            let open = &shown[..shown.len() - 1];
            format!("{open}…\" ({} more bytes)", s.len() - end)
        }
    }
}

/// [`quote_value`] without the quotes, for names listed bare.
pub(crate) fn cut_value(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(QUOTE_MAX_CHARS) {
        None => s.into(),
        Some((end, _)) => format!("{}… ({} more bytes)", &s[..end], s.len() - end).into(),
    }
}

fn join_and(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

// === name syntax ===

/// A Kubernetes-style name part (route and backend names): lower-case letters,
/// digits and `-`, at most 63, not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A lower-case DNS name or an IPv4 address, without port. An IPv6 literal is not
/// one: a request names it only in brackets (`Host: [::1]`), which the proxy's host
/// table keeps, so a policy for the bare literal could never be chosen.
fn is_host(s: &str) -> bool {
    is_dns_subdomain(s) || s.parse::<std::net::Ipv4Addr>().is_ok()
}

/// An IPv6 literal in any case, bare or in brackets, as someone might write a host.
fn is_ipv6(s: &str) -> bool {
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<std::net::Ipv6Addr>().is_ok()
}

fn ipv6_host_message(host: &str) -> String {
    format!(
        "{} is an IPv6 address, which no request can reach: a request names it in brackets (Host: [::1]), which the proxy keeps when it looks the host up, and a bare one is a malformed Host; name the service by a DNS name (e.g. \"log-service\") or an IPv4 address",
        quote_value(host)
    )
}

/// `host:port` with an IP (IPv6 in brackets) or a DNS name (any case) and a port 1..=65535.
fn is_host_port(s: &str) -> bool {
    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        return addr.port() != 0;
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    port_ok
        && is_dns_subdomain(&host.to_ascii_lowercase())
        && host.parse::<std::net::IpAddr>().is_err()
}

/// `name.namespace`, optionally fully qualified (`name.namespace.svc.cluster.local`).
fn is_service(s: &str) -> bool {
    is_dns_subdomain(s) && s.split('.').count() >= 2
}

fn is_spiffe_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let Some((trust_domain, path)) = rest.split_once('/') else {
        return false;
    };
    let td_ok = !trust_domain.is_empty()
        && trust_domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    let path_ok = path.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    });
    td_ok && path_ok
}

/// `path` with every byte of a non-ASCII character as `%XX` (upper-case hex, as
/// RFC 3986 §2.1 recommends), the form requests carry it in.
fn percent_encode_non_ascii(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// RFC 9110 token character.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| is_tchar(b) && !b.is_ascii_uppercase())
}

fn is_method(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| is_tchar(b) && !b.is_ascii_lowercase())
}

fn is_http_path(s: &str) -> bool {
    s.starts_with('/')
        && !s
            .bytes()
            .any(|b| b == b'?' || b == b'#' || b.is_ascii_whitespace() || b.is_ascii_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_syntax() {
        assert!(is_host_port("127.0.0.1:9101"));
        assert!(is_host_port("[::1]:80"));
        assert!(is_host_port("log-v1.shop.svc:8080"));
        assert!(!is_host_port("127.0.0.1"));
        assert!(!is_host_port("127.0.0.1:0"));
        assert!(!is_host_port("log:99999"));
        assert!(!is_host_port("::1:80"));
        assert!(!is_host_port("http://log:80"));
        assert!(is_spiffe_id("spiffe://cluster.local/ns/shop/sa/order"));
        assert!(!is_spiffe_id("spiffe://cluster.local"));
        assert!(!is_spiffe_id("spiffe://Cluster/ns"));
        assert!(!is_spiffe_id("spiffe://cluster.local/ns//sa"));
        assert!(!is_spiffe_id("https://cluster.local/ns/shop"));
        assert!(is_header_name("x-user-id"));
        assert!(!is_header_name("X-User-Id"));
        assert!(!is_header_name(":authority"));
        assert!(!is_header_name("x user"));
        assert!(is_method("POST"));
        assert!(!is_method("post"));
        assert!(!is_method("GE T"));
        assert!(is_host("log-service"));
        assert!(is_host("10.0.0.1"));
        for v6 in [
            "::1",
            "2001:DB8::1",
            "2001:db8::1",
            "[::1]",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_host(v6), "{v6:?}");
            assert!(is_ipv6(v6), "{v6:?}");
        }
        assert!(!is_ipv6("10.0.0.1"));
        assert!(!is_ipv6("log-service"));
        assert!(!is_host("log-service:80"));
        assert!(!is_host("Log-Service"));
        assert!(is_service("log-v1.shop"));
        assert!(!is_service("log-v1"));
        assert!(is_http_path("/api/v1/orders"));
        for bad in ["api", "/a?b", "/a#b", "/a b", "/a\u{1}b"] {
            assert!(!is_http_path(bad), "{bad:?}");
        }
    }

    fn route(
        path: Option<PathMatch>,
        method: Option<&str>,
        headers: &[(&str, &str)],
    ) -> RouteMatch {
        RouteMatch {
            path,
            method: method.map(Into::into),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn prefix(p: &str) -> Option<PathMatch> {
        Some(PathMatch {
            exact: None,
            prefix: Some(p.into()),
        })
    }

    fn exact(p: &str) -> Option<PathMatch> {
        Some(PathMatch {
            exact: Some(p.into()),
            prefix: None,
        })
    }

    #[test]
    fn non_ascii_is_percent_encoded() {
        assert_eq!(percent_encode_non_ascii("/café/x"), "/caf%C3%A9/x");
        assert_eq!(percent_encode_non_ascii("/a"), "/a");
    }

    #[test]
    fn quoted_values_are_cut_short() {
        assert_eq!(quote_value("log\t1"), "\"log\\t1\"");
        let exactly = "a".repeat(QUOTE_MAX_CHARS);
        assert_eq!(quote_value(&exactly), format!("\"{exactly}\""));
        assert_eq!(cut_value(&exactly), exactly);
        // Characters are counted, bytes left out are reported.
        let long = format!("{}{}", "é".repeat(QUOTE_MAX_CHARS), "b".repeat(500_000));
        let shown = "é".repeat(QUOTE_MAX_CHARS);
        assert_eq!(
            quote_value(&long),
            format!("\"{shown}…\" (500000 more bytes)")
        );
        assert_eq!(cut_value(&long), format!("{shown}… (500000 more bytes)"));
    }

    #[test]
    fn coverage() {
        let check = |a: &RouteMatch, b: &RouteMatch| {
            covers(a, valid_path(a).unwrap(), b, valid_path(b).unwrap())
        };
        let any = route(None, None, &[]);
        let logs = route(prefix("/logs"), None, &[]);
        let logs_post = route(prefix("/logs/a"), Some("POST"), &[("x", "1")]);
        let logsx = route(exact("/logsx"), None, &[]);
        let root = route(prefix("/"), None, &[]);
        assert!(check(&any, &logs));
        assert!(check(&root, &any));
        assert!(check(&logs, &logs_post));
        assert!(!check(&logs_post, &logs));
        assert!(!check(&logs, &logsx));
        assert!(!check(&logs, &any));
        assert!(check(&route(None, Some("POST"), &[]), &logs_post));
        assert!(!check(&route(None, Some("GET"), &[]), &logs_post));
        assert!(!check(&route(None, None, &[("x", "2")]), &logs_post));
        assert!(check(&route(exact("/logsx"), None, &[]), &logsx));
    }
}
