//! Why a request takes the route and backend it takes, decided offline from policy
//! files by the proxy's own code: [`RouteTable`] (host index, precedence order,
//! [`RouteMatcher::mismatch`](sluice_proxy::policy::RouteMatcher::mismatch)), the
//! compiled [`RouteParams`] and its [`SplitParams::choose`](sluice_filters::split::SplitParams::choose).
//! Nothing here decides by itself; it reports what those decide.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::Serialize;
use sluice_config::{PolicySet, StickyHash, precedence_rule, sticky_point};
use sluice_filters::breaker::BreakerParams;
use sluice_filters::retry::RetryParams;
use sluice_filters::split::SplitChoice;
use sluice_proxy::RouteTable;
use sluice_proxy::route::RouteParams;

use crate::error::CliError;

/// The request to explain.
#[derive(Clone, Debug)]
pub struct Probe {
    /// Host (a port is ignored, as the proxy ignores it).
    pub host: String,
    /// Method.
    pub method: Method,
    /// Path, without query.
    pub path: String,
    /// Request headers.
    pub headers: HeaderMap,
}

impl Probe {
    /// A probe from the command line's words; `headers` are `name:value`.
    pub fn parse(
        host: &str,
        method: &str,
        path: &str,
        headers: &[String],
    ) -> Result<Self, CliError> {
        // As given: methods are case-sensitive, and the proxy takes `post` as a
        // method of its own, not POST.
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| CliError::Usage(format!("{method:?} is not an HTTP method")))?;
        let path = path.split('?').next().unwrap_or("/");
        if !path.starts_with('/') {
            return Err(CliError::Usage(format!("path {path:?} must start with /")));
        }
        let mut map = HeaderMap::new();
        for h in headers {
            let Some((name, value)) = h.split_once(':') else {
                return Err(CliError::Usage(format!(
                    "header {h:?} is not name:value (e.g. -H x-user-id:alice)"
                )));
            };
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| CliError::Usage(format!("{name:?} is not a header name")))?;
            let value = HeaderValue::from_str(value.trim())
                .map_err(|_| CliError::Usage(format!("{value:?} is not a header value")))?;
            map.append(name, value);
        }
        Ok(Self {
            host: host.to_string(),
            method,
            // Routed as the proxy routes it: without dot-segments.
            path: sluice_proxy::normalize_path(path).unwrap_or_else(|| path.to_string()),
            headers: map,
        })
    }
}

/// The policies compiled as a proxy compiles them, ready to explain many requests.
#[derive(Debug)]
pub struct Explainer {
    table: RouteTable<Arc<RouteParams>>,
    /// `namespace/name` of each policy by name, for the report.
    names: Vec<(String, String)>,
    warnings: Vec<String>,
}

/// What a request gets, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// The request's host.
    pub host: String,
    /// Its method.
    pub method: String,
    /// Its path.
    pub path: String,
    /// `namespace/name` of the policy that claims the host.
    pub policy: Option<String>,
    /// The chosen route's key (`<policy>.<route>`); `None`: 404 `no-route`.
    pub route: Option<String>,
    /// Every route of the host in the order they are tried, with its verdict.
    pub routes: Vec<RouteVerdict>,
    /// Where the chosen route sends it.
    pub backend: Option<BackendVerdict>,
    /// The governance of the chosen route.
    pub governance: Option<Governance>,
    /// Policies a proxy would ignore (a host claimed twice).
    pub warnings: Vec<String>,
}

/// One route of the host and why it took the request or not.
#[derive(Clone, Debug, Serialize)]
pub struct RouteVerdict {
    /// Route key, `<policy>.<route>`.
    pub route: String,
    /// What it matches, in words.
    #[serde(rename = "match")]
    pub matches: String,
    /// `chosen`, `mismatch` or `precedence`.
    pub verdict: &'static str,
    /// The condition it failed, or the precedence rule it lost by.
    pub why: String,
}

/// The backend the split picks.
#[derive(Clone, Debug, Serialize)]
pub struct BackendVerdict {
    /// The backend, unless a random draw decides.
    pub backend: Option<String>,
    /// `primary`, `rule`, `sticky` or `random`.
    pub by: &'static str,
    /// The split rule that decides (its position in the route's `split`).
    pub rule: Option<usize>,
    /// How, in words.
    pub why: String,
}

/// The governance that applies on the chosen route (and backend).
#[derive(Clone, Debug, Serialize)]
pub struct Governance {
    /// The rate limit and this request's bucket key.
    pub rate_limit: Option<String>,
    /// Total and per-try timeouts.
    pub timeout: Option<String>,
    /// Retry rules.
    pub retry: Option<String>,
    /// The breaker of route × backend.
    pub breaker: Option<String>,
    /// The fallback.
    pub fallback: Option<String>,
}

impl Explainer {
    /// Compiles every route of `set` as the proxy does.
    pub fn new(set: &PolicySet) -> Result<Self, CliError> {
        let (table, warnings) = RouteTable::compile(set.policies(), |params| params)
            .map_err(|e| CliError::Usage(format!("the policies do not compile: {e}")))?;
        let names = set
            .policies()
            .iter()
            .map(|p| {
                (
                    p.metadata.name.clone(),
                    format!("{}/{}", p.metadata.namespace_or_default(), p.metadata.name),
                )
            })
            .collect();
        Ok(Self {
            table,
            names,
            warnings,
        })
    }

    /// Explains one request.
    pub fn explain(&self, probe: &Probe) -> Explanation {
        let (method, path, headers) = (&probe.method, probe.path.as_str(), &probe.headers);
        let routes = self.table.routes(&probe.host).unwrap_or_default();
        let chosen = self.table.select(&probe.host, method, path, headers);
        let policy = routes.first().map(|(_, p)| {
            self.names
                .iter()
                .find(|(n, _)| **n == *p.policy)
                .map_or_else(|| p.policy.to_string(), |(_, full)| full.clone())
        });
        let verdicts = routes
            .iter()
            .map(|(matcher, params)| {
                let mut v = RouteVerdict {
                    route: params.label.to_string(),
                    matches: params.route.matches.describe(),
                    verdict: "mismatch",
                    why: String::new(),
                };
                if let Some(why) = matcher.mismatch(method, path, headers) {
                    v.why = why.to_string();
                } else if chosen.is_some_and(|c| Arc::ptr_eq(c, params)) {
                    v.verdict = "chosen";
                    v.why = "first by precedence to take the request".into();
                } else if let Some(c) = chosen {
                    v.verdict = "precedence";
                    v.why = format!(
                        "matches too, but {} goes first: {}",
                        c.label,
                        precedence_rule(&c.route.matches, &params.route.matches).describe()
                    );
                }
                v
            })
            .collect();
        let backend = chosen.map(|c| backend_verdict(c, headers));
        let governance = chosen.map(|c| {
            let picked = backend.as_ref().and_then(|b| b.backend.clone());
            governance(c, method, headers, picked.as_deref())
        });
        Explanation {
            host: probe.host.clone(),
            method: method.to_string(),
            path: path.to_string(),
            policy,
            route: chosen.map(|c| c.label.to_string()),
            routes: verdicts,
            backend,
            governance,
            warnings: self
                .warnings
                .iter()
                .cloned()
                .chain(case_note(method))
                .collect(),
        }
    }
}

/// A note for a method not all upper case, which someone likely meant as the
/// upper-case one: the proxy, rightly, does not.
fn case_note(method: &Method) -> Option<String> {
    let m = method.as_str();
    let upper = m.to_ascii_uppercase();
    (upper != m).then(|| {
        format!(
            "methods are case-sensitive: {m:?} is not {upper}, so it matches no route with `method: {upper}`"
        )
    })
}

fn backend_verdict(params: &RouteParams, headers: &HeaderMap) -> BackendVerdict {
    let name = |i: usize| params.backends.get(i).map(|b| b.name.to_string());
    let weights_of = |rule: usize| {
        params.route.split[rule]
            .weights
            .iter()
            .flatten()
            .map(|(b, w)| format!("{b} {w}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match params.split.choose(headers) {
        SplitChoice::Primary { backend } => BackendVerdict {
            backend: name(backend),
            by: "primary",
            rule: None,
            why: if params.route.split.is_empty() {
                "the route has no split: its first backend".into()
            } else {
                "no split rule takes the request: the route's first backend".into()
            },
        },
        SplitChoice::Fixed { rule, backend } => BackendVerdict {
            backend: name(backend),
            by: "rule",
            rule: Some(rule),
            why: format!(
                "split rule {} ({}) names it",
                rule + 1,
                when_of(params, rule)
            ),
        },
        SplitChoice::Sticky {
            rule,
            backend,
            hash,
        } => {
            let header = params.route.split[rule]
                .sticky_by
                .as_ref()
                .map(|s| s.header.clone())
                .unwrap_or_default();
            let value = headers
                .get(&header)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            let how = match hash {
                StickyHash::Ordered => format!(
                    "point {} of 10000, walked over weights {} in file order",
                    sticky_point(value.as_bytes()),
                    weights_of(rule)
                ),
                StickyHash::Rendezvous => {
                    format!("rendezvous hash over weights {}", weights_of(rule))
                }
            };
            BackendVerdict {
                backend: name(backend),
                by: "sticky",
                rule: Some(rule),
                why: format!(
                    "split rule {} sticks {header}={value:?} to it: {how}",
                    rule + 1
                ),
            }
        }
        SplitChoice::Random { rule } => {
            let sticky = params.route.split[rule]
                .sticky_by
                .as_ref()
                .map(|s| format!(" (no {} header to stick by)", s.header))
                .unwrap_or_default();
            BackendVerdict {
                backend: None,
                by: "random",
                rule: Some(rule),
                why: format!(
                    "split rule {} draws at random by weights {}{sticky}",
                    rule + 1,
                    weights_of(rule)
                ),
            }
        }
    }
}

fn when_of(params: &RouteParams, rule: usize) -> String {
    let when: Vec<String> = params.route.split[rule]
        .when
        .iter()
        .flat_map(|w| &w.headers)
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    if when.is_empty() {
        "every request".into()
    } else {
        format!("when {}", when.join(", "))
    }
}

/// A policy enum's YAML name (`connect-failure`, `unavailable`).
fn yaml_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => other.map(|v| v.to_string()).unwrap_or_default(),
    }
}

/// The route's retry in words, for a request with `method`: what is retried, how
/// often and how spaced, within which budget, or why this request is not.
fn describe_retry(retry: &sluice_config::Retry, method: &Method) -> String {
    let p = RetryParams::from_policy(retry);
    if p.attempts == 0 {
        return "none (attempts: 0)".into();
    }
    let mut on: Vec<String> = retry.on.iter().map(yaml_name).collect();
    on.extend(retry.status_codes.iter().map(|s| format!("status {s}")));
    on.extend(
        retry
            .grpc_statuses
            .iter()
            .map(|c| format!("grpc {}", yaml_name(c))),
    );
    let on = if on.is_empty() {
        "nothing listed in `on`".to_string()
    } else {
        on.join(", ")
    };
    let mut backoff = format!(
        "backoff {:?} doubling to {:?}, jittered",
        p.backoff_base, p.backoff_max
    );
    if !p.backoff_min.is_zero() {
        backoff.push_str(&format!(", at least {:?}", p.backoff_min));
    }
    let rule = format!(
        "up to {} more {} on {on}; {backoff}; bodies up to {} bytes replayed; budget {}% of requests + {}/s over {:?}",
        p.attempts,
        if p.attempts == 1 { "try" } else { "tries" },
        p.max_replay_bytes,
        p.budget.ratio * 100.0,
        p.budget.min_per_second,
        p.budget.window,
    );
    if p.method_allowed(method) {
        rule
    } else {
        format!(
            "not for {method}: not idempotent, and the route has no `nonIdempotent: true` ({rule})"
        )
    }
}

/// The route's fallback in words: on which failures, and what answers instead.
fn describe_fallback(f: &sluice_config::Fallback) -> String {
    let on: Vec<String> = f.on.iter().map(yaml_name).collect();
    let with = match (&f.backend, &f.response) {
        (Some(b), _) => format!("backend {b}"),
        (None, Some(r)) => format!("a static {} answer", r.status),
        (None, None) => "nothing".into(),
    };
    format!("on {}: {with}, marked x-sluice-degraded", on.join(", "))
}

fn governance(
    params: &RouteParams,
    method: &Method,
    headers: &HeaderMap,
    backend: Option<&str>,
) -> Governance {
    let route = &params.route;
    let rate_limit = route.rate_limit.as_ref().map(|rl| {
        let key = match &rl.key {
            Some(k) if k.header.is_some() => {
                let h = k.header.as_deref().unwrap_or("");
                match headers.get(h) {
                    Some(v) => format!("bucket of {h}={:?}", String::from_utf8_lossy(v.as_bytes())),
                    None => format!("no {h} header: the bucket every such request shares"),
                }
            }
            Some(k) if k.path == Some(true) => "bucket of this path".into(),
            Some(k) if k.peer_identity == Some(true) => {
                "bucket of the caller's identity (mTLS)".into()
            }
            _ => "one bucket for the whole route".into(),
        };
        format!(
            "{}/s, burst {}, {}{}; {key}",
            rl.per_second,
            rl.burst.unwrap_or(rl.per_second),
            match rl.scope {
                sluice_config::RateLimitScope::Fleet => "fleet-wide",
                _ => "per calling proxy",
            },
            if rl.shadow {
                ", shadow (counted, never refused)"
            } else {
                ""
            },
        )
    });
    let per_try = route.retry.as_ref().and_then(|r| r.per_try_timeout);
    let timeout = match (route.timeout, per_try) {
        (None, None) => None,
        (t, p) => Some(format!(
            "total {}, per try {}",
            t.map_or("none".into(), |d| d.to_string()),
            p.map_or("none".into(), |d| d.to_string())
        )),
    };
    let retry = route.retry.as_ref().map(|r| describe_retry(r, method));
    let breaker = route.circuit_breaker.as_ref().map(|cb| {
        let p = BreakerParams::from_policy(cb);
        let trigger = match (p.consecutive_failures, &p.failure_rate) {
            (Some(n), None) => format!("opens after {n} failures in a row"),
            (None, Some(r)) => format!(
                "opens at {}% failures over {:?} (at least {} requests)",
                r.percent, r.window, r.min_requests
            ),
            (Some(n), Some(r)) => format!(
                "opens after {n} failures in a row or at {}% over {:?}",
                r.percent, r.window
            ),
            (None, None) => "never opens by itself".into(),
        };
        format!(
            "{} × {}: {trigger}, open {:?} (up to {:?}), {} half-open {}",
            params.label,
            backend.unwrap_or("the backend drawn"),
            p.open_for,
            p.max_open_for,
            p.half_open_requests,
            if p.half_open_requests == 1 {
                "probe"
            } else {
                "probes"
            }
        )
    });
    let fallback = route.fallback.as_ref().map(describe_fallback);
    Governance {
        rate_limit,
        timeout,
        retry,
        breaker,
        fallback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log-service, namespace: shop }
spec:
  host: log-service
  backends:
    log-v1: { addresses: ["127.0.0.1:9101"] }
    log-v2: { addresses: ["127.0.0.1:9102"] }
  routes:
    - name: ingest
      match: { path: { prefix: /logs }, method: POST }
      timeout: 2s
      rateLimit: { perSecond: 200, burst: 50, key: { header: x-tenant-id } }
      retry: { attempts: 2, on: [connect-failure], perTryTimeout: 500ms, nonIdempotent: true }
      circuitBreaker: { consecutiveFailures: 5, openFor: 10s, halfOpenRequests: 2 }
      split:
        - when: { headers: { x-canary: "true" } }
          backend: log-v2
        - weights: { log-v1: 90, log-v2: 10 }
          stickyBy: { header: x-user-id }
    - name: read
      match: { path: { prefix: /logs } }
      split: [{ backend: log-v1 }]
    - name: health
      match: { path: { exact: /healthz } }
      split: [{ backend: log-v1 }]
"#;

    fn explainer() -> Explainer {
        let set = PolicySet::from_files([("p.yaml", POLICY)]).unwrap();
        Explainer::new(&set).unwrap()
    }

    fn probe(method: &str, path: &str, headers: &[&str]) -> Probe {
        let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
        Probe::parse("log-service:8080", method, path, &headers).unwrap()
    }

    #[test]
    fn explains_the_route_the_losers_and_the_sticky_backend() {
        let e = explainer().explain(&probe("POST", "/logs", &["x-user-id:alice"]));
        assert_eq!(e.policy.as_deref(), Some("shop/log-service"));
        assert_eq!(e.route.as_deref(), Some("log-service.ingest"));
        let verdicts: Vec<(&str, &str)> = e
            .routes
            .iter()
            .map(|r| (r.route.as_str(), r.verdict))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("log-service.health", "mismatch"),
                ("log-service.ingest", "chosen"),
                ("log-service.read", "precedence"),
            ]
        );
        assert!(e.routes[0].why.contains("/healthz"));
        assert!(
            e.routes[2].why.contains("a method match goes before none"),
            "{}",
            e.routes[2].why
        );
        let b = e.backend.unwrap();
        assert_eq!(b.by, "sticky");
        // FNV-1a of "alice" mod 10000, walked over 90/10.
        let point = sticky_point(b"alice");
        let expected = if point < 9000 { "log-v1" } else { "log-v2" };
        assert_eq!(b.backend.as_deref(), Some(expected));
        assert!(
            b.why.contains(&format!("point {point} of 10000")),
            "{}",
            b.why
        );
        let g = e.governance.unwrap();
        assert!(g.rate_limit.unwrap().contains("no x-tenant-id header"));
        assert_eq!(g.timeout.as_deref(), Some("total 2s, per try 500ms"));
        assert!(g.breaker.unwrap().contains("after 5 failures in a row"));
        assert!(g.fallback.is_none());
    }

    /// Retry and fallback read as sentences: what is retried, how, within which
    /// budget, and whether this request's method is retried at all.
    #[test]
    fn retry_and_fallback_are_told_in_words_for_the_method_asked() {
        let policy = POLICY
            .replace(
                "retry: { attempts: 2, on: [connect-failure], perTryTimeout: 500ms, nonIdempotent: true }",
                "retry: { attempts: 1, on: [gateway-error], statusCodes: [409], grpcStatuses: [unavailable], perTryTimeout: 500ms, backoff: { min: 10ms }, budget: { ratio: 0.5, minPerSecond: 3 } }\n      fallback: { on: [breaker-open, timeout], response: { status: 503 } }",
            );
        let set = PolicySet::from_files([("p.yaml", policy.as_str())]).unwrap();
        let x = Explainer::new(&set).unwrap();
        let rule = "up to 1 more try on gateway-error, status 409, grpc unavailable; backoff 25ms doubling to 250ms, jittered, at least 10ms; bodies up to 65536 bytes replayed; budget 50% of requests + 3/s over 10s";
        let post = x.explain(&probe("POST", "/logs", &[])).governance.unwrap();
        assert_eq!(
            post.retry.unwrap(),
            format!(
                "not for POST: not idempotent, and the route has no `nonIdempotent: true` ({rule})"
            )
        );
        assert_eq!(
            post.fallback.as_deref(),
            Some("on breaker-open, timeout: a static 503 answer, marked x-sluice-degraded")
        );
        assert!(post.breaker.unwrap().ends_with("2 half-open probes"));
        // The same route for an idempotent method (the match takes POST only).
        let policy = policy.replace("method: POST }", "method: PUT }");
        let set = PolicySet::from_files([("p.yaml", policy.as_str())]).unwrap();
        let x = Explainer::new(&set).unwrap();
        let put = x.explain(&probe("PUT", "/logs", &[])).governance.unwrap();
        assert_eq!(put.retry.as_deref(), Some(rule));

        let opted_in = explainer()
            .explain(&probe("POST", "/logs", &[]))
            .governance
            .unwrap();
        assert!(
            opted_in
                .retry
                .unwrap()
                .starts_with("up to 2 more tries on connect-failure; backoff 25ms"),
        );
        let off = POLICY.replace("attempts: 2", "attempts: 0");
        let set = PolicySet::from_files([("p.yaml", off.as_str())]).unwrap();
        let g = Explainer::new(&set)
            .unwrap()
            .explain(&probe("POST", "/logs", &[]))
            .governance
            .unwrap();
        assert_eq!(g.retry.as_deref(), Some("none (attempts: 0)"));
    }

    #[test]
    fn a_path_is_explained_as_the_proxy_routes_it() {
        let e = explainer().explain(&probe("GET", "/logs/../healthz?x", &[]));
        assert_eq!(e.path, "/healthz");
        assert_eq!(e.route.as_deref(), Some("log-service.health"));
    }

    #[test]
    fn explains_header_rules_random_draws_and_no_route() {
        let x = explainer();
        let canary = x.explain(&probe(
            "POST",
            "/logs/a",
            &["x-canary:true", "x-tenant-id:acme"],
        ));
        let b = canary.backend.unwrap();
        assert_eq!((b.backend.as_deref(), b.by), (Some("log-v2"), "rule"));
        assert!(
            canary
                .governance
                .unwrap()
                .rate_limit
                .unwrap()
                .contains("x-tenant-id=\"acme\"")
        );

        let random = x.explain(&probe("POST", "/logs", &[]));
        let b = random.backend.unwrap();
        assert_eq!((b.backend, b.by), (None, "random"));

        let get = x.explain(&probe("GET", "/logs", &[]));
        assert_eq!(get.route.as_deref(), Some("log-service.read"));
        assert_eq!(get.routes[1].why, "wants method POST");
        let b = get.backend.unwrap();
        assert_eq!((b.backend.as_deref(), b.by), (Some("log-v1"), "rule"));

        let none = x.explain(&probe("GET", "/other", &[]));
        assert!(none.route.is_none() && none.backend.is_none());
        assert!(none.routes.iter().all(|r| r.verdict == "mismatch"));

        let unknown = x.explain(&Probe::parse("nobody", "GET", "/", &[]).unwrap());
        assert!(unknown.policy.is_none() && unknown.routes.is_empty());
    }

    /// A rule's verdict names its conditions; the rate limit names the bucket the
    /// request falls in, for each way a limit can be keyed.
    #[test]
    fn rule_conditions_and_every_rate_limit_key_are_told() {
        let x = explainer();
        let canary = x.explain(&probe("POST", "/logs", &["x-canary:true"]));
        assert_eq!(
            canary.backend.unwrap().why,
            "split rule 1 (when x-canary: true) names it"
        );
        let read = x.explain(&probe("GET", "/logs", &[]));
        assert_eq!(
            read.backend.unwrap().why,
            "split rule 1 (every request) names it"
        );
        let bucket = |key: &str| {
            let policy = POLICY.replace("key: { header: x-tenant-id }", key);
            let set = PolicySet::from_files([("p.yaml", policy.as_str())]).unwrap();
            let g = Explainer::new(&set)
                .unwrap()
                .explain(&probe("POST", "/logs", &[]))
                .governance
                .unwrap();
            let rl = g.rate_limit.unwrap();
            rl.split_once("; ").unwrap().1.to_string()
        };
        assert_eq!(bucket("key: { path: true }"), "bucket of this path");
        assert_eq!(
            bucket("key: { peerIdentity: true }"),
            "bucket of the caller's identity (mTLS)"
        );
        assert_eq!(bucket("scope: local"), "one bucket for the whole route");
    }

    #[test]
    fn refuses_bad_probe_words() {
        assert!(Probe::parse("h", "GET", "/", &["novalue".into()]).is_err());
        assert!(Probe::parse("h", "G ET", "/", &[]).is_err());
        assert!(Probe::parse("h", "GET", "logs", &[]).is_err());
        let p = Probe::parse("h", "POST", "/a?b=c", &["X-A: 1".into()]).unwrap();
        assert_eq!((p.method, p.path.as_str()), (Method::POST, "/a"));
        assert_eq!(p.headers["x-a"], "1");
    }

    /// `post` is another method than POST to the proxy, so explain says what the
    /// proxy does, and why.
    #[test]
    fn a_method_is_taken_as_given() {
        let x = explainer();
        let lower = x.explain(&probe("post", "/logs", &[]));
        assert_eq!(lower.method, "post");
        assert_eq!(lower.route.as_deref(), Some("log-service.read"));
        assert_eq!(lower.routes[1].why, "wants method POST");
        assert_eq!(
            lower.warnings,
            [
                "methods are case-sensitive: \"post\" is not POST, so it matches no route with `method: POST`"
            ]
        );
        let upper = x.explain(&probe("POST", "/logs", &[]));
        assert_eq!(upper.route.as_deref(), Some("log-service.ingest"));
        assert!(upper.warnings.is_empty(), "{:?}", upper.warnings);
    }
}
