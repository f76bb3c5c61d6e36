//! HTTPRoutes (with Services and ReferenceGrants) built from arbitrary choices among
//! valid and invalid field values, through the control plane's translation: never a
//! panic; the generated policies validate together as one set (the Kubernetes source
//! serves them beside each other); the result does not depend on the order the API
//! lists the objects in; every route a generated policy names is in force at that
//! Service; and the offline `convert` of the same objects as YAML, when it accepts,
//! writes a file that loads.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use sluice_config::{PolicySet, parse_policies};
use sluice_control_plane::gateway::{
    Cluster, ReferenceGrant, RouteObject, ServiceInfo, ServicePortInfo, convert_files, translate,
};

const NAMESPACES: &[&str] = &["default", "prod", "staging", "Bad_NS"];
const NAMES: &[&str] = &[
    "log",
    "order",
    "web",
    "a",
    "log-v2",
    "Bad_Name",
    "a.b",
    "",
    "x123456789012345678901234567890123456789012345678901234567890123",
];
const PORTS: &[i64] = &[80, 8080, 9000, 0, -1, 65535, 65536];
const DURATIONS: &[&str] = &[
    "1s", "0s", "100ms", "10m", "1h", "2h", "500us", "1.5s", "bogus", "", "3601s",
];
const PATHS: &[&str] = &[
    "/",
    "/a",
    "/a/",
    "/logs",
    "/logs/today",
    "",
    "a",
    "/a//b",
    "/%2F",
    "/é",
    "/a?b",
    "/a#x",
    "/a b",
    "/*",
];
const PATH_TYPES: &[Option<&str>] = &[
    None,
    Some("Exact"),
    Some("PathPrefix"),
    Some("RegularExpression"),
    Some("Bogus"),
];
const HEADER_NAMES: &[&str] = &["x-canary", "X-Canary", "x-user", "bad name", "", ":path"];
const HEADER_VALUES: &[&str] = &["1", "true", "a b", "", "é", "\u{7f}"];
const HEADER_TYPES: &[Option<&str>] = &[
    None,
    Some("Exact"),
    Some("RegularExpression"),
    Some("Bogus"),
];
const METHODS: &[&str] = &["GET", "POST", "get", "BOGUS", ""];
const CODES: &[i64] = &[500, 502, 503, 504, 404, 200, 599, 99, 1000];
const WEIGHTS: &[i64] = &[0, 1, 2, 3, 7, 50, 100, 1_000_000, -1];
const ATTEMPTS: &[i64] = &[0, 1, 2, 10, 11, -1];

fn pick<T: Copy>(table: &[T], i: u8) -> T {
    table[usize::from(i) % table.len()]
}

#[derive(Arbitrary, Debug)]
struct Parent {
    /// 0: Service (core group), 1: Gateway, 2: Service with group absent.
    kind: u8,
    namespace: Option<u8>,
    name: u8,
    port: Option<u8>,
    section_name: bool,
}

#[derive(Arbitrary, Debug)]
struct PathSpec {
    kind: u8,
    value: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct MatchSpec {
    path: Option<PathSpec>,
    headers: Vec<(u8, u8, u8)>,
    method: Option<u8>,
    query: bool,
}

#[derive(Arbitrary, Debug)]
struct BackendSpec {
    /// 0: Service, 1: another kind.
    kind: u8,
    name: u8,
    namespace: Option<u8>,
    port: Option<u8>,
    weight: Option<u8>,
    filters: bool,
}

#[derive(Arbitrary, Debug)]
struct RuleSpec {
    name: Option<u8>,
    matches: Option<Vec<MatchSpec>>,
    backends: Vec<BackendSpec>,
    timeouts: Option<(Option<u8>, Option<u8>)>,
    retry: Option<(Option<u8>, Option<u8>, Vec<u8>)>,
    filters: bool,
}

#[derive(Arbitrary, Debug)]
struct RouteSpec {
    namespace: u8,
    name: u8,
    created: u8,
    generation: Option<u8>,
    parents: Vec<Parent>,
    hostnames: bool,
    rules: Vec<RuleSpec>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    routes: Vec<RouteSpec>,
    /// `None`: offline, references taken as written.
    services: Option<Vec<(u8, u8, Vec<u8>)>>,
    grants: Vec<(u8, u8, Option<u8>)>,
    /// Which listing order to compare against.
    order: u64,
}

fn parent(p: &Parent) -> Value {
    let mut m = Map::new();
    match p.kind % 3 {
        0 => {
            m.insert("group".into(), json!(""));
            m.insert("kind".into(), json!("Service"));
        }
        1 => {}
        _ => {
            m.insert("kind".into(), json!("Service"));
        }
    }
    m.insert("name".into(), json!(pick(NAMES, p.name)));
    if let Some(ns) = p.namespace {
        m.insert("namespace".into(), json!(pick(NAMESPACES, ns)));
    }
    if let Some(port) = p.port {
        m.insert("port".into(), json!(pick(PORTS, port)));
    }
    if p.section_name {
        m.insert("sectionName".into(), json!("http"));
    }
    Value::Object(m)
}

fn matched(m: &MatchSpec) -> Value {
    let mut out = Map::new();
    if let Some(path) = &m.path {
        let mut p = Map::new();
        if let Some(t) = pick(PATH_TYPES, path.kind) {
            p.insert("type".into(), json!(t));
        }
        if let Some(v) = path.value {
            p.insert("value".into(), json!(pick(PATHS, v)));
        }
        out.insert("path".into(), Value::Object(p));
    }
    if !m.headers.is_empty() {
        let headers: Vec<Value> = m
            .headers
            .iter()
            .take(3)
            .map(|&(t, n, v)| {
                let mut h = Map::new();
                if let Some(t) = pick(HEADER_TYPES, t) {
                    h.insert("type".into(), json!(t));
                }
                h.insert("name".into(), json!(pick(HEADER_NAMES, n)));
                h.insert("value".into(), json!(pick(HEADER_VALUES, v)));
                Value::Object(h)
            })
            .collect();
        out.insert("headers".into(), Value::Array(headers));
    }
    if let Some(method) = m.method {
        out.insert("method".into(), json!(pick(METHODS, method)));
    }
    if m.query {
        out.insert(
            "queryParams".into(),
            json!([{"name": "debug", "value": "1"}]),
        );
    }
    Value::Object(out)
}

fn backend(b: &BackendSpec) -> Value {
    let mut m = Map::new();
    if b.kind % 4 == 1 {
        m.insert("kind".into(), json!("ServiceImport"));
        m.insert("group".into(), json!("multicluster.x-k8s.io"));
    }
    m.insert("name".into(), json!(pick(NAMES, b.name)));
    if let Some(ns) = b.namespace {
        m.insert("namespace".into(), json!(pick(NAMESPACES, ns)));
    }
    if let Some(port) = b.port {
        m.insert("port".into(), json!(pick(PORTS, port)));
    }
    if let Some(w) = b.weight {
        m.insert("weight".into(), json!(pick(WEIGHTS, w)));
    }
    if b.filters {
        m.insert(
            "filters".into(),
            json!([{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x", "value": "1"}]}}]),
        );
    }
    Value::Object(m)
}

fn rule(r: &RuleSpec) -> Value {
    let mut m = Map::new();
    if let Some(n) = r.name {
        m.insert("name".into(), json!(pick(NAMES, n)));
    }
    if let Some(matches) = &r.matches {
        m.insert(
            "matches".into(),
            Value::Array(matches.iter().take(4).map(matched).collect()),
        );
    }
    if !r.backends.is_empty() {
        m.insert(
            "backendRefs".into(),
            Value::Array(r.backends.iter().take(4).map(backend).collect()),
        );
    }
    if let Some((request, backend_request)) = r.timeouts {
        let mut t = Map::new();
        if let Some(d) = request {
            t.insert("request".into(), json!(pick(DURATIONS, d)));
        }
        if let Some(d) = backend_request {
            t.insert("backendRequest".into(), json!(pick(DURATIONS, d)));
        }
        m.insert("timeouts".into(), Value::Object(t));
    }
    if let Some((attempts, backoff, codes)) = &r.retry {
        let mut t = Map::new();
        if let Some(a) = attempts {
            t.insert("attempts".into(), json!(pick(ATTEMPTS, *a)));
        }
        if let Some(d) = backoff {
            t.insert("backoff".into(), json!(pick(DURATIONS, *d)));
        }
        if !codes.is_empty() {
            let codes: Vec<i64> = codes.iter().take(4).map(|&c| pick(CODES, c)).collect();
            t.insert("codes".into(), json!(codes));
        }
        m.insert("retry".into(), Value::Object(t));
    }
    if r.filters {
        m.insert(
            "filters".into(),
            json!([{"type": "URLRewrite", "urlRewrite": {"hostname": "x"}}]),
        );
    }
    Value::Object(m)
}

fn spec(r: &RouteSpec) -> Value {
    let mut m = Map::new();
    m.insert(
        "parentRefs".into(),
        Value::Array(r.parents.iter().take(3).map(parent).collect()),
    );
    if r.hostnames {
        m.insert("hostnames".into(), json!(["log.example.com"]));
    }
    m.insert(
        "rules".into(),
        Value::Array(r.rules.iter().take(4).map(rule).collect()),
    );
    Value::Object(m)
}

fn grant(&(ns, from, to): &(u8, u8, Option<u8>)) -> Value {
    let to = match to {
        Some(n) => json!({"group": "", "kind": "Service", "name": pick(NAMES, n)}),
        None => json!({"group": "", "kind": "Service"}),
    };
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"namespace": pick(NAMESPACES, ns), "name": "grant"},
        "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": pick(NAMESPACES, from)}],
            "to": [to],
        },
    })
}

fuzz_target!(|input: Input| {
    // The API never lists two objects of one name: the first of each key stands.
    let mut seen = BTreeSet::new();
    let routes: Vec<RouteObject> = input
        .routes
        .iter()
        .take(6)
        .filter_map(|r| {
            let namespace = pick(NAMESPACES, r.namespace).to_string();
            let name = pick(NAMES, r.name).to_string();
            if name.is_empty() || !seen.insert((namespace.clone(), name.clone())) {
                return None;
            }
            Some(RouteObject {
                namespace,
                name,
                generation: r.generation.map(i64::from),
                created: format!("2026-12-07T00:00:{:02}Z", r.created % 4),
                spec: spec(r),
            })
        })
        .collect();
    let services: Option<BTreeMap<(String, String), ServiceInfo>> =
        input.services.as_ref().map(|list| {
            list.iter()
                .take(6)
                .map(|(ns, name, ports)| {
                    let info = ServiceInfo {
                        ports: ports
                            .iter()
                            .take(3)
                            .filter_map(|&p| {
                                Some(ServicePortInfo {
                                    name: format!("p{p}"),
                                    port: i32::try_from(pick(PORTS, p)).ok()?,
                                })
                            })
                            .collect(),
                    };
                    (
                        (
                            pick(NAMESPACES, *ns).to_string(),
                            pick(NAMES, *name).to_string(),
                        ),
                        info,
                    )
                })
                .collect()
        });
    let grant_objects: Vec<Value> = input.grants.iter().take(3).map(grant).collect();
    let grants: Vec<ReferenceGrant> = grant_objects
        .iter()
        .filter_map(ReferenceGrant::from_object)
        .collect();
    let cluster = Cluster {
        services: services.as_ref(),
        grants: &grants,
    };

    let translation = translate(&routes, cluster);

    // What the Kubernetes source would serve side by side is one valid set (of
    // proportional weights: they keep Gateway API's, of any total).
    let policies: Vec<_> = translation.policies().cloned().collect();
    if let Err(e) = PolicySet::from_effective(policies.clone()) {
        panic!("generated policies do not validate together: {e}\n{policies:#?}");
    }
    // A generated policy is made only of routes in force at its Service.
    for sp in &translation.services {
        for key in &sp.routes {
            let verdict = translation
                .verdicts
                .get(key)
                .expect("a contributing route has a verdict");
            assert!(
                verdict
                    .parents
                    .iter()
                    .any(|p| p.service == sp.service && p.problems.is_empty()),
                "{key:?} contributes to {:?} without being in force there: {verdict:#?}",
                sp.service
            );
        }
    }
    // The API's listing order changes nothing.
    if routes.len() > 1 {
        let mut shuffled = routes.clone();
        let n = shuffled.len();
        shuffled.rotate_left((input.order % n as u64) as usize);
        if input.order & (1 << 32) != 0 {
            shuffled.reverse();
        }
        assert_eq!(
            translate(&shuffled, cluster),
            translation,
            "the listing order changed the translation"
        );
    }

    // The same objects as YAML files, through the offline command.
    let mut docs: Vec<Value> = routes
        .iter()
        .map(|r| {
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"namespace": r.namespace, "name": r.name},
                "spec": r.spec,
            })
        })
        .collect();
    if let Some(services) = &services {
        for ((ns, name), info) in services {
            let ports: Vec<Value> = info
                .ports
                .iter()
                .map(|p| json!({"name": p.name, "port": p.port}))
                .collect();
            docs.push(json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"namespace": ns, "name": name},
                "spec": {"ports": ports},
            }));
        }
    }
    docs.extend(grant_objects);
    let text = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).expect("JSON values serialize as YAML"))
        .collect::<Vec<_>>()
        .join("---\n");
    match convert_files([("routes.yaml", text.as_str())]) {
        Ok(converted) => {
            if let Err(e) = parse_policies("converted.yaml", &converted.yaml) {
                panic!(
                    "convert wrote a file that does not load: {e}\n{}",
                    converted.yaml
                );
            }
        }
        Err(e) => assert!(!e.to_string().is_empty(), "a refusal says why"),
    }
});
