//! The route table: policies indexed by host, each host's routes in precedence order.
//!
//! Lookup is one hash probe on the host, then a walk over that host's routes only, so
//! the cost of a request does not grow with the number of hosts in the mesh.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use sluice_config::{PathMatch, RouteMatch, RoutePolicy, precedence_order};

use crate::ProxyError;
use crate::route::{RouteParams, compile_backends};

/// A route's match, compiled once per policy swap.
#[derive(Clone, Debug)]
pub struct RouteMatcher {
    path: Option<PathMatch>,
    method: Option<Method>,
    headers: HeaderConds,
}

impl RouteMatcher {
    /// Compiles a policy match; fails on a method or header that HTTP cannot carry.
    pub fn new(m: &RouteMatch) -> Result<Self, ProxyError> {
        let method = m
            .method
            .as_deref()
            .map(|s| {
                Method::from_bytes(s.as_bytes())
                    .map_err(|_| ProxyError::Compile(format!("invalid method {s:?}")))
            })
            .transpose()?;
        Ok(Self {
            path: m.path.clone(),
            method,
            headers: compile_headers(&m.headers)?,
        })
    }

    /// Whether a request with this method, path (query excluded) and headers matches.
    pub fn matches(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        self.mismatch(method, path, headers).is_none()
    }

    /// The first condition, in the order they are checked (method, path, headers), that
    /// keeps this route from taking the request; `None` when it takes it. What
    /// [`Self::matches`] decides by, and what `sluicectl explain` reports.
    pub fn mismatch(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<Mismatch<'_>> {
        if let Some(m) = &self.method
            && m != method
        {
            return Some(Mismatch::Method(m));
        }
        if let Some(p) = &self.path
            && !p.matches(path)
        {
            return Some(Mismatch::Path(p));
        }
        // Every condition must hold; a repeated request header matches if any of its
        // values does.
        self.headers
            .iter()
            .find(|(name, value)| !headers.get_all(name).iter().any(|v| v == value))
            .map(|(name, value)| Mismatch::Header(name, value))
    }
}

/// Why a route does not take a request: the condition it wants that the request fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch<'a> {
    /// The route takes only this method.
    Method(&'a Method),
    /// The path is not the route's exact path, nor under its prefix.
    Path(&'a PathMatch),
    /// The route wants this header with this value, and the request has no such value.
    Header(&'a HeaderName, &'a HeaderValue),
}

impl std::fmt::Display for Mismatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Method(m) => write!(f, "wants method {m}"),
            Mismatch::Path(PathMatch { exact: Some(e), .. }) => write!(f, "wants path exactly {e}"),
            Mismatch::Path(PathMatch {
                prefix: Some(p), ..
            }) => write!(f, "wants a path under {p}"),
            Mismatch::Path(_) => f.write_str("wants another path"),
            Mismatch::Header(name, value) => write!(
                f,
                "wants header {name}: {}",
                String::from_utf8_lossy(value.as_bytes())
            ),
        }
    }
}

/// Header conditions: each name must carry exactly its value.
pub(crate) type HeaderConds = Box<[(HeaderName, HeaderValue)]>;

/// Compiles header conditions (names lowercased by `HeaderName`, values exact).
pub(crate) fn compile_headers<'a>(
    headers: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<HeaderConds, ProxyError> {
    headers
        .into_iter()
        .map(|(k, v)| {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| ProxyError::Compile(format!("invalid header name {k:?}")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| ProxyError::Compile(format!("invalid header value {v:?}")))?;
            Ok((name, value))
        })
        .collect()
}

/// Policies indexed by host; `T` is what a matched route yields (its compiled stack in
/// the proxy, anything in benchmarks).
#[derive(Debug)]
pub struct RouteTable<T> {
    hosts: HostMap<T>,
}

/// Each host's routes. Looked up once per request; foldhash, not SipHash: the keys come
/// from the policy, so a client's Host can only be looked up, never collide its way in.
type HostMap<T> = HashMap<Box<str>, Arc<[(RouteMatcher, T)]>, foldhash::fast::RandomState>;

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self {
            hosts: HashMap::default(),
        }
    }
}

impl<T> RouteTable<T> {
    /// Compiles every route of `policies` as the proxy does (each policy's backends once,
    /// then each route's [`RouteParams`]) and builds the table from what `make` turns
    /// them into; also returns the table's warnings. `sluicectl explain` uses it too, so
    /// its answer is the proxy's.
    pub fn compile(
        policies: &[RoutePolicy],
        mut make: impl FnMut(Arc<RouteParams>) -> T,
    ) -> Result<(Self, Vec<String>), ProxyError> {
        let mut backends_of: Option<(Option<String>, String, _)> = None;
        Self::build(policies, |policy, index| {
            // Routes of one policy come in a row: compile its backends once for all of them.
            // A policy is its namespace and name: one name may repeat across namespaces,
            // and a set sorted by namespace puts two such policies side by side.
            let meta = &policy.metadata;
            let backends = match &backends_of {
                Some((ns, name, b)) if *ns == meta.namespace && *name == meta.name => Arc::clone(b),
                _ => {
                    let b = compile_backends(policy)?;
                    backends_of = Some((meta.namespace.clone(), meta.name.clone(), Arc::clone(&b)));
                    b
                }
            };
            let params = RouteParams::new(policy, index, backends).map_err(|e| {
                ProxyError::Compile(format!(
                    "policy {} route {}: {e}",
                    policy.metadata.name, policy.spec.routes[index].name
                ))
            })?;
            Ok(make(Arc::new(params)))
        })
    }

    /// Builds the table, calling `build` for every route of every policy. When two
    /// policies claim one host, the first (in canonical order) wins and the other is
    /// reported in the returned warnings.
    pub fn build(
        policies: &[RoutePolicy],
        mut build: impl FnMut(&RoutePolicy, usize) -> Result<T, ProxyError>,
    ) -> Result<(Self, Vec<String>), ProxyError> {
        let mut hosts = HashMap::with_capacity_and_hasher(policies.len(), Default::default());
        let mut warnings = Vec::new();
        for policy in policies {
            let names: Vec<Box<str>> = policy
                .spec
                .hosts()
                .map(|h| h.to_ascii_lowercase().into_boxed_str())
                .collect();
            if let Some(taken) = names.iter().find(|h| hosts.contains_key(*h)) {
                warnings.push(format!(
                    "policy {} ignored: host {taken:?} already belongs to another policy",
                    policy.metadata.name,
                ));
                continue;
            }
            let routes = precedence_order(&policy.spec.routes)
                .into_iter()
                .map(|i| {
                    let matcher =
                        RouteMatcher::new(&policy.spec.routes[i].matches).map_err(|e| {
                            ProxyError::Compile(format!(
                                "policy {} route {}: {e}",
                                policy.metadata.name, policy.spec.routes[i].name
                            ))
                        })?;
                    Ok((matcher, build(policy, i)?))
                })
                .collect::<Result<Arc<[_]>, ProxyError>>()?;
            // Every alias answers like `host`: each name gets the same compiled routes
            // (one shared list).
            let mut names = names.into_iter();
            if let Some(last) = names.next_back() {
                for name in names {
                    hosts.insert(name, routes.clone());
                }
                hosts.insert(last, routes);
            }
        }
        Ok((Self { hosts }, warnings))
    }

    /// The first route, by precedence, of `host`'s policy that takes the request.
    /// `host` may carry a port, which is ignored, and any letter case.
    pub fn select(
        &self,
        host: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&T> {
        let host = normalize_host(host);
        let routes = self.hosts.get(host.as_ref())?;
        routes
            .iter()
            .find(|(m, _)| m.matches(method, path, headers))
            .map(|(_, t)| t)
    }

    /// Every route of `host`'s policy with its matcher, in the order [`Self::select`]
    /// tries them (port and letter case of `host` ignored); `None` when no policy claims it.
    pub fn routes(&self, host: &str) -> Option<&[(RouteMatcher, T)]> {
        self.hosts.get(normalize_host(host).as_ref()).map(|r| &**r)
    }

    /// Whether a policy claims `host` (port and letter case ignored, as in [`Self::select`]).
    pub fn has_host(&self, host: &str) -> bool {
        self.hosts.contains_key(normalize_host(host).as_ref())
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether no host has a policy.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

/// Strips a port and lowercases, allocating only for a host with capital letters.
fn normalize_host(host: &str) -> Cow<'_, str> {
    let host = strip_port(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: the port, if any, follows the closing bracket.
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    // What `rsplit_once(':')` and a check of the digits after it give, in one scan from
    // the end: its searcher costs more per request than the few bytes of a port.
    let bytes = host.as_bytes();
    let digits = bytes
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    match bytes.len().checked_sub(digits + 1) {
        Some(colon) if bytes[colon] == b':' => &host[..colon],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: orders }
spec:
  host: orders
  backends:
    v1: { addresses: ["127.0.0.1:1"] }
  routes:
    - name: catch-all
    - name: api
      match: { path: { prefix: /api } }
    - name: api-post
      match: { path: { prefix: /api }, method: POST }
    - name: api-canary
      match: { path: { prefix: /api }, headers: { x-canary: "true" } }
    - name: health
      match: { path: { exact: /api/health } }
---
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: logs }
spec:
  host: logs
  backends:
    v1: { addresses: ["127.0.0.1:1"] }
  routes:
    - name: only-ingest
      match: { path: { prefix: /logs } }
"#;

    fn table() -> RouteTable<String> {
        let policies = sluice_config::parse_policies("t.yaml", POLICY).unwrap();
        let (t, warnings) =
            RouteTable::build(&policies, |p, i| Ok(p.spec.routes[i].name.clone())).unwrap();
        assert!(warnings.is_empty());
        t
    }

    fn pick<'a>(
        t: &'a RouteTable<String>,
        host: &str,
        method: Method,
        path: &str,
        headers: &[(&'static str, &'static str)],
    ) -> Option<&'a str> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(*k, HeaderValue::from_static(v));
        }
        t.select(host, &method, path, &h).map(String::as_str)
    }

    #[test]
    fn routes_by_precedence() {
        let t = table();
        assert_eq!(
            pick(&t, "orders", Method::GET, "/api/health", &[]),
            Some("health")
        );
        assert_eq!(
            pick(&t, "orders", Method::POST, "/api/x", &[]),
            Some("api-post")
        );
        assert_eq!(pick(&t, "orders", Method::GET, "/api/x", &[]), Some("api"));
        assert_eq!(
            pick(&t, "orders", Method::GET, "/api/x", &[("x-canary", "true")]),
            Some("api-canary")
        );
        assert_eq!(
            pick(
                &t,
                "orders",
                Method::GET,
                "/api/x",
                &[("x-canary", "no"), ("x-canary", "true")]
            ),
            Some("api-canary")
        );
        assert_eq!(
            pick(&t, "orders", Method::GET, "/apix", &[]),
            Some("catch-all")
        );
        assert_eq!(pick(&t, "orders", Method::GET, "/", &[]), Some("catch-all"));
    }

    #[test]
    fn looks_up_host_without_port_and_case() {
        let t = table();
        assert_eq!(t.len(), 2);
        assert_eq!(
            pick(&t, "ORDERS:8080", Method::GET, "/", &[]),
            Some("catch-all")
        );
        assert_eq!(
            pick(&t, "logs:80", Method::GET, "/logs/a", &[]),
            Some("only-ingest")
        );
        assert_eq!(pick(&t, "logs", Method::GET, "/other", &[]), None);
        assert_eq!(pick(&t, "unknown", Method::GET, "/", &[]), None);
        assert_eq!(pick(&t, "orders.example", Method::GET, "/", &[]), None);
    }

    #[test]
    fn names_the_first_failing_condition() {
        let t = table();
        let routes = t.routes("ORDERS:80").unwrap();
        let names: Vec<&str> = routes.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            ["health", "api-post", "api-canary", "api", "catch-all"]
        );
        let mut h = HeaderMap::new();
        h.append("x-canary", HeaderValue::from_static("no"));
        let why: Vec<Option<String>> = routes
            .iter()
            .map(|(m, _)| {
                m.mismatch(&Method::GET, "/api/x", &h)
                    .map(|w| w.to_string())
            })
            .collect();
        assert_eq!(
            why,
            [
                Some("wants path exactly /api/health".to_string()),
                Some("wants method POST".to_string()),
                Some("wants header x-canary: true".to_string()),
                None,
                None,
            ]
        );
        assert!(t.routes("unknown").is_none());
    }

    #[test]
    fn strips_ports() {
        assert_eq!(strip_port("a:80"), "a");
        assert_eq!(strip_port("a"), "a");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("a:"), "a");
        assert_eq!(strip_port("a:8x"), "a:8x");
        assert_eq!(strip_port("a:1b:22"), "a:1b");
        assert_eq!(strip_port("8080"), "8080");
        assert_eq!(strip_port(""), "");
    }

    #[test]
    fn first_policy_keeps_a_contested_host() {
        // One file cannot claim a host twice, but sets merged from several sources can.
        let mut policies = sluice_config::parse_policies("t.yaml", POLICY).unwrap();
        let orders = POLICY.split("---").next().unwrap();
        policies.extend(
            sluice_config::parse_policies("u.yaml", &orders.replace("name: orders", "name: zz"))
                .unwrap(),
        );
        let (t, warnings) =
            RouteTable::build(&policies, |p, _| Ok(p.metadata.name.clone())).unwrap();
        assert_eq!(warnings.len(), 1);
        assert_eq!(pick(&t, "orders", Method::GET, "/", &[]), Some("orders"));
    }

    #[test]
    fn each_route_gets_its_own_policys_backends() {
        // Policies of one name in two namespaces come in a row in a set (it is sorted by
        // namespace, then name): each keeps its own backends.
        let text = r#"
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: orders, namespace: shop }
spec:
  host: orders.shop
  backends:
    v1: { addresses: ["127.0.0.1:1"] }
  routes:
    - name: all
---
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: orders, namespace: staging }
spec:
  host: orders.staging
  backends:
    blue: { addresses: ["127.0.0.1:2"] }
    green: { addresses: ["127.0.0.1:3"] }
  routes:
    - name: all
      split: [{ weights: { blue: 100, green: 0 } }]
    - name: api
      match: { path: { prefix: /api } }
      split: [{ weights: { blue: 0, green: 100 } }]
"#;
        let set = sluice_config::PolicySet::from_files([("t.yaml", text)]).unwrap();
        let (t, warnings) = RouteTable::compile(set.policies(), |params| params).unwrap();
        // One name in two namespaces is two policies: nothing to warn about.
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!((t.len(), t.is_empty()), (2, false));
        assert!(t.has_host("Orders.Staging:80") && !t.has_host("orders"));
        let backends = |host: &str, path: &str| {
            let params = t
                .select(host, &Method::GET, path, &HeaderMap::new())
                .unwrap();
            let names: Vec<String> = params.backends.iter().map(|b| b.name.to_string()).collect();
            let endpoints: Vec<String> = params
                .backends
                .iter()
                .map(|b| b.endpoints[0].to_string())
                .collect();
            (params.key.to_string(), names, endpoints)
        };
        assert_eq!(
            backends("orders.shop", "/"),
            (
                "shop/orders.all".into(),
                vec!["v1".into()],
                vec!["127.0.0.1:1".into()]
            )
        );
        assert_eq!(backends("orders.staging", "/").0, "staging/orders.all");
        for path in ["/", "/api/x"] {
            let (_, names, endpoints) = backends("orders.staging", path);
            assert_eq!(names, ["blue", "green"], "{path}");
            assert_eq!(endpoints, ["127.0.0.1:2", "127.0.0.1:3"], "{path}");
        }
        assert!(RouteTable::<()>::default().is_empty());
    }

    #[test]
    fn every_alias_answers_like_the_host() {
        let text = POLICY.replace(
            "  host: orders\n",
            "  host: orders\n  aliases: [orders.shop, orders.shop.svc.cluster.local]\n",
        );
        let policies = sluice_config::parse_policies("t.yaml", &text).unwrap();
        let (t, warnings) =
            RouteTable::build(&policies, |p, i| Ok(p.spec.routes[i].name.clone())).unwrap();
        assert!(warnings.is_empty());
        for host in [
            "orders",
            "orders.shop",
            "Orders.Shop.svc.cluster.local:8080",
        ] {
            assert_eq!(
                pick(&t, host, Method::POST, "/api/x", &[]),
                Some("api-post"),
                "{host}"
            );
            assert!(t.has_host(host), "{host}");
        }
        assert_eq!(pick(&t, "orders.other", Method::GET, "/", &[]), None);
        // A later policy naming a taken alias as its own host is left out whole.
        let mut more = policies.clone();
        more.extend(
            sluice_config::parse_policies(
                "u.yaml",
                &POLICY
                    .split("---")
                    .nth(1)
                    .unwrap()
                    .replace("host: logs", "host: orders.shop"),
            )
            .unwrap(),
        );
        let (t, warnings) = RouteTable::build(&more, |p, _| Ok(p.metadata.name.clone())).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(
            pick(&t, "orders.shop", Method::GET, "/", &[]),
            Some("orders")
        );
    }
}
