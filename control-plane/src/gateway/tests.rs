//! The translation on the mesh conformance fixtures and on what they leave out.

use std::collections::BTreeMap;

use serde::Deserialize as _;
use serde_json::{Value, json};
use sluice_config::{Duration, RoutePolicy, ServicePort};

use super::model::{ParentRef, ReferenceGrant, RouteObject, ServiceInfo, ServicePortInfo};
use super::translate::{Cluster, Condition, Key, SOURCE_ANNOTATION, Translation, translate};
use super::{CONTROLLER_NAME, convert_files, merged_parents};

const NS: &str = "gateway-conformance-mesh";

/// Every fixture, by file name.
fn fixture(name: &str) -> &'static str {
    match name {
        "httproute-weight" => {
            include_str!("../../testdata/gateway-api/conformance-mesh/httproute-weight.yaml")
        }
        "mesh-split" => include_str!("../../testdata/gateway-api/conformance-mesh/mesh-split.yaml"),
        "httproute-matching" => {
            include_str!("../../testdata/gateway-api/conformance-mesh/httproute-matching.yaml")
        }
        "httproute-named-rule" => {
            include_str!("../../testdata/gateway-api/conformance-mesh/httproute-named-rule.yaml")
        }
        "httproute-simple-same-namespace" => include_str!(
            "../../testdata/gateway-api/conformance-mesh/httproute-simple-same-namespace.yaml"
        ),
        "httproute-303-redirect" => {
            include_str!("../../testdata/gateway-api/conformance-mesh/httproute-303-redirect.yaml")
        }
        "httproute-307-redirect" => {
            include_str!("../../testdata/gateway-api/conformance-mesh/httproute-307-redirect.yaml")
        }
        "httproute-308-redirect" => {
            include_str!("../../testdata/gateway-api/conformance-mesh/httproute-308-redirect.yaml")
        }
        "httproute-query-param-matching" => include_str!(
            "../../testdata/gateway-api/conformance-mesh/httproute-query-param-matching.yaml"
        ),
        "httproute-redirect-host-and-status" => include_str!(
            "../../testdata/gateway-api/conformance-mesh/httproute-redirect-host-and-status.yaml"
        ),
        "httproute-redirect-path" => {
            include_str!("../../testdata/gateway-api/conformance-mesh/httproute-redirect-path.yaml")
        }
        "httproute-redirect-port" => {
            include_str!("../../testdata/gateway-api/conformance-mesh/httproute-redirect-port.yaml")
        }
        "httproute-redirect-scheme" => include_str!(
            "../../testdata/gateway-api/conformance-mesh/httproute-redirect-scheme.yaml"
        ),
        "httproute-request-header-modifier" => include_str!(
            "../../testdata/gateway-api/conformance-mesh/httproute-request-header-modifier.yaml"
        ),
        "httproute-request-header-modifier-backend" => include_str!(
            "../../testdata/gateway-api/conformance-mesh/httproute-request-header-modifier-backend.yaml"
        ),
        "httproute-rewrite-path" => {
            include_str!("../../testdata/gateway-api/conformance-mesh/httproute-rewrite-path.yaml")
        }
        "mesh-consumer-route" => {
            include_str!("../../testdata/gateway-api/conformance-mesh/mesh-consumer-route.yaml")
        }
        "mesh-frontend" => {
            include_str!("../../testdata/gateway-api/conformance-mesh/mesh-frontend.yaml")
        }
        "mesh-ports" => include_str!("../../testdata/gateway-api/conformance-mesh/mesh-ports.yaml"),
        other => panic!("no fixture {other}"),
    }
}

/// The HTTPRoutes of a YAML stream, created in the order written.
fn objects(text: &str) -> Vec<RouteObject> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| v["kind"] == "HTTPRoute")
        .enumerate()
        .map(|(i, v)| RouteObject {
            namespace: v["metadata"]["namespace"].as_str().unwrap().to_string(),
            name: v["metadata"]["name"].as_str().unwrap().to_string(),
            generation: Some(1),
            created: format!("2026-01-01T00:00:{i:02}Z"),
            spec: v["spec"].clone(),
        })
        .collect()
}

/// The conformance suite's Services: echo, echo-v1, echo-v2, each on 80 and 8080.
fn conformance_services() -> BTreeMap<Key, ServiceInfo> {
    ["echo", "echo-v1", "echo-v2"]
        .into_iter()
        .map(|n| {
            (
                (NS.to_string(), n.to_string()),
                ServiceInfo {
                    ports: vec![
                        ServicePortInfo {
                            name: "http".into(),
                            port: 80,
                        },
                        ServicePortInfo {
                            name: "http-alt".into(),
                            port: 8080,
                        },
                    ],
                },
            )
        })
        .collect()
}

fn run(routes: &[RouteObject]) -> Translation {
    let services = conformance_services();
    translate(
        routes,
        Cluster {
            services: Some(&services),
            grants: &[],
        },
    )
}

/// The policy named `name` (in the conformance namespace).
fn policy<'a>(t: &'a Translation, name: &str) -> &'a RoutePolicy {
    t.policies()
        .find(|p| p.metadata.name == name)
        .unwrap_or_else(|| {
            panic!(
                "no policy {name}: {:#?}",
                t.policies().map(|p| &p.metadata.name).collect::<Vec<_>>()
            )
        })
}

fn all_accepted(t: &Translation) {
    for (k, v) in &t.verdicts {
        for p in &v.parents {
            assert!(p.problems.is_empty(), "{k:?}: {:?}", p.problems);
        }
    }
}

fn route_names(p: &RoutePolicy) -> Vec<&str> {
    p.spec.routes.iter().map(|r| r.name.as_str()).collect()
}

#[test]
fn weights_keep_their_proportions_and_backends_their_ports() {
    let t = run(&objects(fixture("httproute-weight")));
    all_accepted(&t);
    let p = policy(&t, "httproute-echo");
    assert_eq!(p.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(
        p.spec.hosts().collect::<Vec<_>>(),
        [
            "echo.gateway-conformance-mesh.svc.cluster.local",
            "echo",
            "echo.gateway-conformance-mesh"
        ]
    );
    assert_eq!(route_names(p), ["mesh-weighted-backends-0-0"]);
    let weights = p.spec.routes[0].split[0].weights.as_ref().unwrap();
    assert_eq!(
        weights
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect::<Vec<_>>(),
        [("echo-v1-8080", 70), ("echo-v2-8080", 30)]
    );
    let b = &p.spec.backends["echo-v1-8080"];
    assert_eq!(
        b.service.as_deref(),
        Some("echo-v1.gateway-conformance-mesh")
    );
    assert_eq!(b.port, Some(ServicePort::Number(8080)));
    // One policy for the Service, whatever name a client calls it by.
    assert_eq!(t.policies().count(), 1);
}

#[test]
fn a_bare_service_name_two_namespaces_share_goes_to_the_first() {
    let simple = fixture("httproute-simple-same-namespace");
    let mut routes = objects(simple);
    routes.extend(objects(&simple.replace(NS, "aaa")));
    let t = translate(
        &routes,
        Cluster {
            services: None,
            grants: &[],
        },
    );
    all_accepted(&t);
    let names = |ns: &str| {
        let p = t
            .policies()
            .find(|p| p.metadata.namespace.as_deref() == Some(ns))
            .unwrap();
        assert_eq!(p.metadata.name, "httproute-echo");
        p.spec.hosts().map(str::to_string).collect::<Vec<_>>()
    };
    assert_eq!(
        names("aaa"),
        ["echo.aaa.svc.cluster.local", "echo", "echo.aaa"]
    );
    assert_eq!(
        names(NS),
        [format!("echo.{NS}.svc.cluster.local"), format!("echo.{NS}")]
    );
    // Together they validate: no name is claimed twice.
    sluice_config::PolicySet::from_effective(t.policies().cloned().collect()).unwrap();
}

#[test]
fn weights_of_any_total_stay_exact() {
    let routes = objects(
        &fixture("httproute-weight")
            .replace("weight: 70", "weight: 3")
            .replace("weight: 30", "weight: 1"),
    );
    let t = run(&routes);
    let w = policy(&t, "httproute-echo").spec.routes[0].split[0]
        .weights
        .clone()
        .unwrap();
    assert_eq!(w.values().copied().collect::<Vec<_>>(), [3, 1]);
}

/// `convert` writes a policy file, whose weights are percentages: weights of any
/// other total are written as percentages summing to 100, exactly where the ratio
/// allows, and with a warning where rounding changed it; what it writes loads as
/// a file.
#[test]
fn convert_writes_weights_as_percentages_a_file_takes() {
    let weights = |w: [u32; 3]| {
        fixture("httproute-weight")
            .replace("weight: 70", &format!("weight: {}", w[0]))
            .replace(
                "weight: 30",
                &format!(
                    "weight: {}\n    - name: echo-v3\n      port: 8080\n      weight: {}",
                    w[1], w[2]
                ),
            )
    };
    let converted = |w: [u32; 3]| {
        let text = weights(w);
        let out = convert_files([("w.yaml", text.as_str())]).unwrap();
        let set = sluice_config::parse_policies("out.yaml", &out.yaml).unwrap_or_else(|e| {
            panic!(
                "{w:?}: the output does not load as a file: {e}\n{}",
                out.yaml
            )
        });
        let split = set[0].spec.routes[0].split[0].weights.clone().unwrap();
        (split.values().copied().collect::<Vec<_>>(), out.warnings)
    };
    assert_eq!(converted([3, 0, 7]), (vec![30, 0, 70], vec![]));
    assert_eq!(converted([70, 20, 10]), (vec![70, 20, 10], vec![]));
    let (percent, warnings) = converted([1, 1, 1]);
    assert_eq!(percent, [34, 33, 33]);
    assert_eq!(
        warnings,
        [
            "policy gateway-conformance-mesh/httproute-echo, route mesh-weighted-backends-0-0: backendRef weights echo-v1-8080 1, echo-v2-8080 1, echo-v3-8080 1 are written as the percentages echo-v1-8080 34, echo-v2-8080 33, echo-v3-8080 33, which round their ratio (the control plane serving the HTTPRoute keeps it exactly)"
        ]
    );
    // The control plane itself keeps the exact weights.
    let t = translate(
        &objects(&weights([1, 1, 1])),
        Cluster {
            services: None,
            grants: &[],
        },
    );
    let served = policy(&t, "httproute-echo").spec.routes[0].split[0]
        .weights
        .clone()
        .unwrap();
    assert_eq!(served.values().copied().collect::<Vec<_>>(), [1, 1, 1]);
}

#[test]
fn matching_fixture_becomes_one_route_per_match() {
    let t = run(&objects(fixture("httproute-matching")));
    all_accepted(&t);
    let p = policy(&t, "httproute-echo");
    assert_eq!(
        route_names(p),
        [
            "mesh-matching-0-0",
            "mesh-matching-0-1",
            "mesh-matching-1-0",
            "mesh-matching-1-1"
        ]
    );
    let m = &p.spec.routes[1].matches;
    assert_eq!(m.path.as_ref().unwrap().prefix.as_deref(), Some("/"));
    assert_eq!(m.headers.get("version").map(String::as_str), Some("one"));
    assert_eq!(
        p.spec.routes[2].split[0].backend.as_deref(),
        Some("echo-v2-8080")
    );
}

#[test]
fn named_rules_name_their_routes() {
    let t = run(&objects(fixture("httproute-named-rule")));
    all_accepted(&t);
    assert_eq!(
        route_names(policy(&t, "httproute-echo")),
        [
            "mesh-http-named-rules-named-rule-0",
            "mesh-http-named-rules-1-0"
        ]
    );
}

#[test]
fn split_and_simple_fixtures_translate() {
    let t = run(&objects(fixture("mesh-split")));
    all_accepted(&t);
    let p = policy(&t, "httproute-echo");
    assert_eq!(
        p.spec.routes[0]
            .matches
            .path
            .as_ref()
            .unwrap()
            .exact
            .as_deref(),
        Some("/v1")
    );
    assert_eq!(
        p.spec.routes[1].split[0].backend.as_deref(),
        Some("echo-v2-80")
    );
    let t = run(&objects(fixture("httproute-simple-same-namespace")));
    all_accepted(&t);
    let p = policy(&t, "httproute-echo");
    assert_eq!(route_names(p), ["gateway-conformance-mesh-test-0-0"]);
    assert_eq!(
        p.spec.routes[0].split[0].backend.as_deref(),
        Some("echo-v1-8080")
    );
}

/// `(condition, reason, path)` of every problem of the first parent of `route`.
fn problems(t: &Translation, route: &str) -> Vec<(Condition, &'static str, String)> {
    let (_, v) = t.verdicts.iter().find(|(k, _)| k.1 == route).unwrap();
    v.parents[0]
        .problems
        .iter()
        .map(|p| (p.condition, p.reason, p.path.clone()))
        .collect()
}

#[test]
fn every_other_fixture_is_refused_with_its_missing_feature() {
    use Condition::*;
    let filters = |route: &str, _rules: usize| {
        let t = run(&objects(fixture(route)));
        assert_eq!(t.services, vec![], "{route}");
        t
    };
    for (fixture_name, route, rules) in [
        ("httproute-303-redirect", "mesh-303-redirect", 1),
        ("httproute-307-redirect", "mesh-307-redirect", 1),
        ("httproute-308-redirect", "mesh-308-redirect", 1),
        (
            "httproute-redirect-host-and-status",
            "mesh-redirect-host-and-status",
            2,
        ),
        ("httproute-redirect-path", "mesh-redirect-path", 6),
        ("httproute-redirect-port", "mesh-redirect-port", 4),
        ("httproute-redirect-scheme", "mesh-redirect-scheme", 4),
        (
            "httproute-request-header-modifier",
            "mesh-request-header-modifier",
            5,
        ),
        ("httproute-rewrite-path", "mesh-rewrite-path", 5),
    ] {
        let t = filters(fixture_name, rules);
        let got = problems(&t, route);
        let mut want: Vec<_> = (0..rules)
            .map(|i| {
                (
                    Accepted,
                    "UnsupportedValue",
                    format!("spec.rules[{i}].filters[0]"),
                )
            })
            .collect();
        if fixture_name == "httproute-rewrite-path" {
            want.insert(
                4,
                (
                    Accepted,
                    "UnsupportedValue",
                    "spec.rules[3].filters[1]".into(),
                ),
            );
            want.push((
                Accepted,
                "UnsupportedValue",
                "spec.rules[4].filters[1]".into(),
            ));
        }
        assert_eq!(got, want, "{fixture_name}");
    }

    let t = filters("httproute-request-header-modifier-backend", 5);
    let got = problems(&t, "mesh-request-header-modifier");
    assert_eq!(got.len(), 5);
    assert_eq!(
        got[0],
        (
            Accepted,
            "UnsupportedValue",
            "spec.rules[0].backendRefs[0].filters".into()
        )
    );

    let t = filters("httproute-query-param-matching", 7);
    let got = problems(&t, "mesh-query-param-matching");
    assert!(
        got.iter().all(|(c, r, p)| *c == Accepted
            && *r == "UnsupportedValue"
            && p.ends_with(".queryParams")),
        "{got:?}"
    );
    assert_eq!(got[0].2, "spec.rules[0].matches[0].queryParams");
    assert_eq!(got.len(), 7);

    // A consumer route, which also names a Service of another namespace without
    // a ReferenceGrant.
    let t = filters("mesh-consumer-route", 1);
    let got = problems(&t, "mesh-echo-add-header");
    assert!(
        got.contains(&(
            Accepted,
            "UnsupportedValue",
            "spec.rules[0].filters[0]".into()
        )),
        "{got:?}"
    );
    assert!(
        got.contains(&(
            ResolvedRefs,
            "RefNotPermitted",
            "spec.rules[0].backendRefs[0].namespace".into()
        )),
        "{got:?}"
    );
    assert!(
        got.contains(&(
            Accepted,
            "UnsupportedValue",
            "spec.parentRefs[0].namespace".into()
        )),
        "{got:?}"
    );

    for (fixture_name, route) in [
        ("mesh-frontend", "mesh-split-v1"),
        ("mesh-ports", "mesh-split-v1"),
        ("mesh-ports", "mesh-split-v2"),
    ] {
        let t = filters(fixture_name, 1);
        assert_eq!(
            problems(&t, route),
            [(
                Accepted,
                "UnsupportedValue",
                "spec.rules[0].filters[0]".to_string()
            )],
            "{fixture_name}"
        );
    }
}

#[test]
fn regular_expressions_are_refused_by_path() {
    let text =
        fixture("httproute-matching").replacen("type: PathPrefix", "type: RegularExpression", 1);
    let t = run(&objects(&text));
    assert_eq!(
        problems(&t, "mesh-matching"),
        [(
            Condition::Accepted,
            "UnsupportedValue",
            "spec.rules[0].matches[0].path.type".to_string()
        )]
    );
}

fn route(name: &str, created: &str, spec: Value) -> RouteObject {
    RouteObject {
        namespace: NS.into(),
        name: name.into(),
        generation: Some(3),
        created: created.into(),
        spec,
    }
}

fn parent() -> Value {
    json!([{ "group": "", "kind": "Service", "name": "echo", "port": 80 }])
}

#[test]
fn precedence_across_objects_and_shadowed_routes_are_dropped_not_refused() {
    // Same match in two routes: the older one wins, whatever their names.
    let same = |backend: &str| {
        json!({ "parentRefs": parent(), "rules": [
            { "matches": [{ "path": { "type": "PathPrefix", "value": "/a" } }],
              "backendRefs": [{ "name": backend, "port": 8080 }] }] })
    };
    let t = run(&[
        route("zz-old", "2026-01-01T00:00:00Z", same("echo-v1")),
        route("aa-new", "2026-01-02T00:00:00Z", same("echo-v2")),
    ]);
    all_accepted(&t);
    let p = policy(&t, "httproute-echo");
    assert_eq!(route_names(p), ["zz-old-0-0"]);
    assert_eq!(
        p.spec.backends.keys().collect::<Vec<_>>(),
        ["echo-v1-8080", "echo-v2-8080"]
    );
    // Same creation time: namespace and name decide.
    let t = run(&[
        route("b", "2026-01-01T00:00:00Z", same("echo-v1")),
        route("a", "2026-01-01T00:00:00Z", same("echo-v2")),
    ]);
    assert_eq!(route_names(policy(&t, "httproute-echo")), ["a-0-0"]);
    // A more specific match of a newer route still comes first (the proxy orders
    // by specificity; ties keep this order).
    let exact = json!({ "parentRefs": parent(), "rules": [
        { "matches": [{ "path": { "type": "Exact", "value": "/a" } }],
          "backendRefs": [{ "name": "echo-v2", "port": 8080 }] }] });
    let t = run(&[
        route("old", "2026-01-01T00:00:00Z", same("echo-v1")),
        route("new", "2026-01-02T00:00:00Z", exact),
    ]);
    all_accepted(&t);
    let p = policy(&t, "httproute-echo");
    assert_eq!(route_names(p), ["old-0-0", "new-0-0"]);
    let order = sluice_config::precedence_order(&p.spec.routes);
    assert_eq!(p.spec.routes[order[0]].name, "new-0-0");
}

#[test]
fn timeouts_and_retries_translate() {
    let spec = json!({ "parentRefs": parent(), "rules": [
        { "matches": [{ "path": { "value": "/slow" } }],
          "timeouts": { "request": "10s", "backendRequest": "2s" },
          "retry": { "attempts": 3, "backoff": "500ms", "codes": [503, 502] },
          "backendRefs": [{ "name": "echo-v1", "port": 8080 }] },
        { "timeouts": { "request": "0s" },
          "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }] });
    let t = run(&[route("r", "2026-01-01T00:00:00Z", spec)]);
    all_accepted(&t);
    let p = policy(&t, "httproute-echo");
    let slow = &p.spec.routes[0];
    assert_eq!(slow.timeout, Some(Duration::from_secs(10)));
    let retry = slow.retry.as_ref().unwrap();
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.status_codes, [503, 502]);
    assert_eq!(retry.per_try_timeout, Some(Duration::from_secs(2)));
    let backoff = retry.backoff.as_ref().unwrap();
    assert_eq!(backoff.min, Some(Duration::from_millis(500)));
    assert_eq!(backoff.max, Some(Duration::from_millis(500)));
    assert_eq!(p.spec.routes[1].timeout, None);
    assert_eq!(p.spec.routes[1].retry, None);

    let too_long = json!({ "parentRefs": parent(), "rules": [
        { "timeouts": { "request": "2h" }, "retry": { "attempts": 11 },
          "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }] });
    let t = run(&[route("r", "2026-01-01T00:00:00Z", too_long)]);
    let paths: Vec<String> = problems(&t, "r").into_iter().map(|p| p.2).collect();
    assert_eq!(
        paths,
        [
            "spec.rules[0].timeouts.request",
            "spec.rules[0].retry.attempts"
        ]
    );
}

#[test]
fn ports_that_cannot_be_honoured_are_refused() {
    let spec = |parent_port: i64, backend_port: i64| {
        json!({ "parentRefs": [{ "group": "", "kind": "Service", "name": "echo", "port": parent_port }],
                "rules": [{ "backendRefs": [{ "name": "echo-v1", "port": backend_port }] }] })
    };
    let message = |t: &Translation, route: &str| {
        let (_, v) = t.verdicts.iter().find(|(k, _)| k.1 == route).unwrap();
        v.parents[0].problems[0].message.clone()
    };
    let t = run(&[route("r", "2026-01-01T00:00:00Z", spec(81, 8080))]);
    assert_eq!(
        problems(&t, "r"),
        [(
            Condition::Accepted,
            "NoMatchingParent",
            "spec.parentRefs[0].port".to_string()
        )]
    );
    assert_eq!(
        message(&t, "r"),
        format!("Service {NS}/echo has no port 81 (it has 80, 8080)")
    );
    let t = run(&[route("r", "2026-01-01T00:00:00Z", spec(80, 9999))]);
    assert_eq!(
        problems(&t, "r"),
        [(
            Condition::ResolvedRefs,
            "BackendNotFound",
            "spec.rules[0].backendRefs[0].port".to_string()
        )]
    );
    assert_eq!(
        message(&t, "r"),
        format!("Service {NS}/echo-v1 has no port 9999 (it has 80, 8080)")
    );
    // Two ports for one host: the older route keeps it.
    let t = run(&[
        route("a", "2026-01-01T00:00:00Z", spec(80, 8080)),
        route("b", "2026-01-02T00:00:00Z", spec(8080, 8080)),
    ]);
    assert_eq!(problems(&t, "a"), []);
    let (_, v) = t.verdicts.iter().find(|(k, _)| k.1 == "b").unwrap();
    assert_eq!(v.parents[0].problems[0].path, "spec.parentRefs[0].port");
    assert_eq!(
        v.parents[0].problems[0].message,
        format!(
            "Service {NS}/echo is already routed on port 80 by HTTPRoute {NS}/a; Sluice routes a host on one port"
        )
    );
}

/// A parentRef without a port on a Service with one port is scoped to that port, so
/// a route naming the port and one that does not share the host; on a Service with
/// several ports, no port means every port, which a route on one port then clashes with.
#[test]
fn no_parent_port_on_a_one_port_service_is_its_port() {
    let mut services = conformance_services();
    services.insert(
        (NS.into(), "single".into()),
        ServiceInfo {
            ports: vec![ServicePortInfo {
                name: String::new(),
                port: 80,
            }],
        },
    );
    let spec = |svc: &str, port: Option<i64>, path: &str| {
        let mut parent = json!({ "group": "", "kind": "Service", "name": svc });
        if let Some(p) = port {
            parent["port"] = json!(p);
        }
        json!({ "parentRefs": [parent], "rules": [
            { "matches": [{ "path": { "value": path } }],
              "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }] })
    };
    let run_on = |routes: &[RouteObject]| {
        translate(
            routes,
            Cluster {
                services: Some(&services),
                grants: &[],
            },
        )
    };
    let t = run_on(&[
        route("a", "2026-01-01T00:00:00Z", spec("single", None, "/a")),
        route("b", "2026-01-02T00:00:00Z", spec("single", Some(80), "/b")),
    ]);
    all_accepted(&t);
    assert_eq!(route_names(policy(&t, "httproute-single")).len(), 2);
    let t = run_on(&[
        route("a", "2026-01-01T00:00:00Z", spec("echo", None, "/a")),
        route("b", "2026-01-02T00:00:00Z", spec("echo", Some(80), "/b")),
    ]);
    let (_, v) = t.verdicts.iter().find(|(k, _)| k.1 == "b").unwrap();
    assert!(
        v.parents[0].problems[0]
            .message
            .contains("already routed on every port (no parentRef port)"),
        "{:?}",
        v.parents[0].problems
    );
}

/// Only core Services are backends: another kind, or a Service of another group, is
/// refused with InvalidKind.
#[test]
fn backends_other_than_core_services_are_refused() {
    for (group, kind) in [(None, Some("ConfigMap")), (Some("example.com"), None)] {
        let mut backend = json!({ "name": "echo-v1", "port": 8080 });
        if let Some(g) = group {
            backend["group"] = json!(g);
        }
        if let Some(k) = kind {
            backend["kind"] = json!(k);
        }
        let spec = json!({ "parentRefs": parent(), "rules": [{ "backendRefs": [backend] }] });
        let t = run(&[route("r", "2026-01-01T00:00:00Z", spec)]);
        assert_eq!(
            problems(&t, "r"),
            [(
                Condition::ResolvedRefs,
                "InvalidKind",
                "spec.rules[0].backendRefs[0].kind".to_string()
            )],
            "{group:?} {kind:?}"
        );
    }
}

#[test]
fn cross_namespace_backends_need_a_reference_grant() {
    let mut services = conformance_services();
    services.insert(
        ("other".into(), "store".into()),
        ServiceInfo {
            ports: vec![ServicePortInfo {
                name: String::new(),
                port: 80,
            }],
        },
    );
    let spec = json!({ "parentRefs": parent(), "rules": [{ "backendRefs": [{ "name": "store", "namespace": "other", "port": 80 }] }] });
    let routes = [route("r", "2026-01-01T00:00:00Z", spec)];
    let t = translate(
        &routes,
        Cluster {
            services: Some(&services),
            grants: &[],
        },
    );
    assert_eq!(problems(&t, "r")[0].1, "RefNotPermitted");
    let grant = ReferenceGrant::from_object(&json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": { "name": "g", "namespace": "other" },
        "spec": { "from": [{ "group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": NS }],
                  "to": [{ "group": "", "kind": "Service" }] } }))
    .unwrap();
    let t = translate(
        &routes,
        Cluster {
            services: Some(&services),
            grants: &[grant],
        },
    );
    all_accepted(&t);
    let p = policy(&t, "httproute-echo");
    assert_eq!(
        p.spec.backends["store-other-80"].service.as_deref(),
        Some("store.other")
    );
    // A grant must both live in the Service's namespace and name it (or every Service).
    let grant_in = |ns: &str, service: Option<&str>| {
        let mut to = json!({ "group": "", "kind": "Service" });
        if let Some(s) = service {
            to["name"] = json!(s);
        }
        ReferenceGrant::from_object(&json!({
            "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
            "metadata": { "name": "g", "namespace": ns },
            "spec": { "from": [{ "group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": NS }],
                      "to": [to] } }))
        .unwrap()
    };
    for grant in [grant_in("elsewhere", None), grant_in("other", Some("cart"))] {
        let t = translate(
            &routes,
            Cluster {
                services: Some(&services),
                grants: &[grant],
            },
        );
        assert_eq!(problems(&t, "r")[0].1, "RefNotPermitted");
    }
}

#[test]
fn a_malformed_route_is_refused_alone_with_its_path() {
    let bad = json!({ "parentRefs": parent(), "rules": [{ "backendRefs": [{ "name": "echo-v1", "port": 8080, "wieght": 2 }] }] });
    let good = json!({ "parentRefs": parent(), "rules": [{ "matches": [{ "path": { "value": "/ok" } }], "backendRefs": [{ "name": "echo-v2", "port": 8080 }] }] });
    let t = run(&[
        route("bad", "2026-01-01T00:00:00Z", bad),
        route("good", "2026-01-02T00:00:00Z", good),
    ]);
    let got = problems(&t, "bad");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2, "spec.rules[0].backendRefs[0].wieght");
    assert_eq!(route_names(policy(&t, "httproute-echo")), ["good-0-0"]);
}

#[test]
fn long_names_are_shortened_with_a_hash() {
    let name = "a-very-long-httproute-name-that-goes-on-and-on-and-on-for-ever";
    let spec = json!({ "parentRefs": parent(), "rules": [{ "name": "and-a-long-rule-name", "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }] });
    let t = run(&[route(name, "2026-01-01T00:00:00Z", spec)]);
    let r = &policy(&t, "httproute-echo").spec.routes[0].name;
    assert!(
        r.len() <= 63 && r.starts_with("a-very-long-httproute-name"),
        "{r}"
    );
}

#[test]
fn status_keeps_other_controllers_entries_and_unchanged_times() {
    let t = run(&objects(fixture("httproute-weight")));
    let verdict = &t.verdicts[&(NS.to_string(), "mesh-weighted-backends".to_string())];
    let foreign = json!({ "parentRef": { "name": "gw" }, "controllerName": "example.net/gateway",
                          "conditions": [{ "type": "Accepted", "status": "True", "reason": "Accepted",
                                          "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z" }] });
    let first = merged_parents(
        &json!([foreign]),
        verdict,
        |_| Some(format!("{NS}/httproute-echo")),
        "2026-01-01T00:00:00Z",
    );
    let list = first.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0], foreign);
    assert_eq!(list[1]["controllerName"], CONTROLLER_NAME);
    assert_eq!(
        list[1]["parentRef"],
        json!({ "group": "", "kind": "Service", "name": "echo", "port": 80 })
    );
    let accepted = &list[1]["conditions"][0];
    assert_eq!(accepted["status"], "True");
    assert_eq!(accepted["observedGeneration"], 1);
    let again = merged_parents(
        &first,
        verdict,
        |_| Some(format!("{NS}/httproute-echo")),
        "2026-02-02T00:00:00Z",
    );
    assert_eq!(again, first, "an unchanged verdict changes nothing");
}

#[test]
fn convert_names_file_and_field() {
    let err = convert_files([("redirect.yaml", fixture("httproute-303-redirect"))]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "redirect.yaml: HTTPRoute gateway-conformance-mesh/mesh-303-redirect (parent Service gateway-conformance-mesh/echo): spec.rules[0].filters[0]: filter RequestRedirect is not supported"
    );
    let out = convert_files([("weight.yaml", fixture("httproute-weight"))]).unwrap();
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    let set = sluice_config::PolicySet::from_canonical("converted", out.yaml.as_bytes()).unwrap();
    assert_eq!(set.policies().len(), 1);
    assert_eq!(set.policies()[0].spec.aliases.len(), 2);
    let grpc = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: { name: g }\n";
    assert!(
        convert_files([("g.yaml", grpc)])
            .unwrap_err()
            .to_string()
            .starts_with("g.yaml (document 1): GRPCRoute")
    );
}

/// An alias to an anchor of another document cuts that document's loading short; what
/// is left of it was once read as the next document, and serde_yaml panicked on it.
#[test]
fn convert_stops_at_a_document_that_does_not_load() {
    let route = |name: &str, rest: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: {name} }}\nspec:\n  parentRefs: [{{ group: \"\", kind: Service, name: echo }}]\n{rest}"
        )
    };
    let text = format!(
        "{}---\n{}---\n{}",
        route(
            "a",
            "  rules: &r [{ backendRefs: [{ name: echo, port: 80 }] }]\n"
        ),
        route("b", "  hostnames: []\n  rules: *r\n"),
        route(
            "c",
            "  rules: [{ backendRefs: [{ name: echo, port: 80 }] }]\n"
        ),
    );
    let err = convert_files([("r.yaml", text.as_str())])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("r.yaml (document 2): unknown anchor at line 14 column 10"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "nothing read past it: {err}");
}

#[test]
fn entries_others_added_after_ours_do_not_move_them() {
    let t = run(&objects(fixture("httproute-weight")));
    let verdict = &t.verdicts[&(NS.to_string(), "mesh-weighted-backends".to_string())];
    let policy = |_| Some(format!("{NS}/httproute-echo"));
    let ours = merged_parents(&Value::Null, verdict, policy, "2026-01-01T00:00:00Z");
    let mut list = ours.as_array().unwrap().clone();
    list.push(json!({ "parentRef": { "name": "gw" }, "controllerName": "example.net/gateway", "conditions": [] }));
    let current = Value::Array(list);
    assert_eq!(
        merged_parents(&current, verdict, policy, "2026-03-03T00:00:00Z"),
        current
    );
    // A route that no longer names a Service loses Sluice's entry, not the others'.
    let gone = merged_parents(
        &current,
        &Default::default(),
        policy,
        "2026-03-03T00:00:00Z",
    );
    assert_eq!(gone.as_array().unwrap().len(), 1);
    assert_eq!(gone[0]["controllerName"], "example.net/gateway");
}

#[test]
fn a_reference_grant_permits_only_what_it_names() {
    let grant = |from: Value, to: Value| {
        ReferenceGrant::from_object(&json!({
            "metadata": { "name": "g", "namespace": "other" },
            "spec": { "from": from, "to": to } }))
    };
    let from_routes =
        json!([{ "group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": NS }]);
    let store = json!([{ "group": "", "kind": "Service", "name": "store" }]);
    let g = grant(from_routes.clone(), store.clone()).expect("a grant");
    assert_eq!(g.namespace, "other");
    assert!(g.permits(NS, "store"));
    assert!(!g.permits(NS, "cart"));
    assert!(!g.permits("elsewhere", "store"));
    let any = grant(
        from_routes.clone(),
        json!([{ "group": "", "kind": "Service" }]),
    )
    .expect("a grant");
    assert!(any.permits(NS, "cart"));
    assert!(!any.permits("elsewhere", "cart"));

    // Entries for other kinds or groups grant nothing to HTTPRoutes or Services.
    let not_routes = json!([
        { "group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": NS },
        { "group": "example.net", "kind": "HTTPRoute", "namespace": NS },
    ]);
    assert_eq!(grant(not_routes, store.clone()), None);
    let not_services = json!([
        { "group": "", "kind": "Secret", "name": "store" },
        { "group": "apps", "kind": "Service", "name": "store" },
    ]);
    assert_eq!(grant(from_routes.clone(), not_services), None);
    assert_eq!(grant(json!([]), store.clone()), None);
    assert_eq!(grant(from_routes.clone(), json!([])), None);
    assert_eq!(grant(from_routes, Value::Null), None);
    let mixed = grant(
        json!([
            { "group": "gateway.networking.k8s.io", "kind": "GRPCRoute", "namespace": "grpc" },
            { "group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": NS },
        ]),
        json!([
            { "group": "", "kind": "Secret", "name": "cart" },
            { "group": "", "kind": "Service", "name": "store" },
        ]),
    )
    .expect("a grant");
    assert_eq!(mixed.from_namespaces, [NS]);
    assert_eq!(mixed.to_services, [Some("store".to_string())]);
    assert!(!mixed.permits("grpc", "store"));
    assert!(!mixed.permits(NS, "cart"));
}

#[test]
fn only_a_core_service_parent_is_a_mesh_parent() {
    let parent = |group: Option<&str>, kind: Option<&str>| ParentRef {
        group: group.map(str::to_string),
        kind: kind.map(str::to_string),
        name: "echo".into(),
        ..ParentRef::default()
    };
    assert!(parent(Some(""), Some("Service")).is_service());
    // No group is Gateway API's own; no kind is a Gateway.
    assert!(!parent(None, Some("Service")).is_service());
    assert!(!parent(Some(""), None).is_service());
    assert!(!parent(Some("example.net"), Some("Service")).is_service());
    assert!(!parent(Some(""), Some("Gateway")).is_service());
}

#[test]
fn convert_checks_ports_against_the_services_given_and_reads_gateway_api_kinds_only() {
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: r, namespace: shop }\nspec:\n  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 80 }]\n  rules: [{ backendRefs: [{ name: echo-v1, port: 8080 }] }]\n";
    let service = |name: &str, port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: shop }}\nspec: {{ ports: [{{ port: {port} }}] }}\n"
        )
    };
    let files = |backend_port: u16| {
        format!(
            "{route}---\n{}---\n{}",
            service("echo", 80),
            service("echo-v1", backend_port)
        )
    };
    let served = files(8080);
    convert_files([("r.yaml", served.as_str())]).expect("converts");
    let elsewhere = files(9090);
    let err = convert_files([("r.yaml", elsewhere.as_str())])
        .expect_err("the backend's port is not served");
    assert!(err.to_string().contains("echo-v1"), "{err}");

    let foreign_route = route.replace("gateway.networking.k8s.io/v1", "example.net/v1");
    let err = convert_files([("r.yaml", foreign_route.as_str())]).expect_err("not Gateway API's");
    assert!(
        err.to_string().contains("HTTPRoute example.net/v1"),
        "{err}"
    );
    let grant = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: { name: g, namespace: other }\nspec:\n  from: [{ group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop }]\n  to: [{ group: \"\", kind: Service }]\n";
    let with_grant = format!("{}---\n{grant}", files(8080));
    convert_files([("r.yaml", with_grant.as_str())]).expect("a grant is read");
    let foreign_grant = grant.replace("gateway.networking.k8s.io/v1beta1", "example.net/v1");
    let err = convert_files([("g.yaml", foreign_grant.as_str())]).expect_err("not Gateway API's");
    assert!(
        err.to_string().contains("ReferenceGrant example.net/v1"),
        "{err}"
    );
}

/// A rule with `matches: []` matches everything, as one without `matches` does.
#[test]
fn an_empty_match_list_is_the_default_match() {
    let rule = |matches: Option<Value>| {
        let mut r = json!({ "backendRefs": [{ "name": "echo-v1", "port": 8080 }] });
        if let Some(m) = matches {
            r["matches"] = m;
        }
        json!({ "parentRefs": parent(), "rules": [r] })
    };
    let without = run(&[route("r", "2026-01-01T00:00:00Z", rule(None))]);
    let empty = run(&[route("r", "2026-01-01T00:00:00Z", rule(Some(json!([]))))]);
    all_accepted(&empty);
    let (a, b) = (
        policy(&without, "httproute-echo"),
        policy(&empty, "httproute-echo"),
    );
    assert_eq!(a.spec.routes.len(), 1);
    assert_eq!(a.spec.routes, b.spec.routes);
}

/// `backendRequest` may equal `request` but not exceed it.
#[test]
fn a_backend_request_timeout_up_to_the_request_timeout_is_taken() {
    let spec = |request: &str, backend: &str| {
        json!({ "parentRefs": parent(), "rules": [
            { "timeouts": { "request": request, "backendRequest": backend },
              "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }] })
    };
    let t = run(&[route("r", "2026-01-01T00:00:00Z", spec("2s", "2s"))]);
    all_accepted(&t);
    let retry = policy(&t, "httproute-echo").spec.routes[0]
        .retry
        .clone()
        .unwrap();
    assert_eq!(retry.per_try_timeout, Some(Duration::from_secs(2)));
    assert_eq!(retry.attempts, 0, "a per-try timeout alone retries nothing");
    let t = run(&[route("r", "2026-01-01T00:00:00Z", spec("2s", "3s"))]);
    let found = problems(&t, "r");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].2, "spec.rules[0].timeouts.backendRequest");
}

/// Durations: 1ms is the shortest kept, 1h the longest; 0s turns a timeout off.
#[test]
fn durations_keep_their_bounds() {
    let spec = |request: &str| {
        json!({ "parentRefs": parent(), "rules": [
            { "timeouts": { "request": request },
              "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }] })
    };
    for (text, want) in [
        ("1ms", Some(Duration::from_millis(1))),
        ("1h", Some(Duration::from_secs(3600))),
        ("0s", None),
    ] {
        let t = run(&[route("r", "2026-01-01T00:00:00Z", spec(text))]);
        all_accepted(&t);
        assert_eq!(
            policy(&t, "httproute-echo").spec.routes[0].timeout,
            want,
            "{text}"
        );
    }
    let t = run(&[route("r", "2026-01-01T00:00:00Z", spec("3601s"))]);
    assert_eq!(problems(&t, "r")[0].2, "spec.rules[0].timeouts.request");
}

/// A retry always covers connections never made; only 4xx and 5xx codes are taken.
#[test]
fn retries_cover_connect_failures_and_only_error_codes() {
    let spec = |codes: Value| {
        json!({ "parentRefs": parent(), "rules": [
            { "retry": { "attempts": 2, "codes": codes },
              "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }] })
    };
    let t = run(&[route(
        "r",
        "2026-01-01T00:00:00Z",
        spec(json!([400, 599, 599])),
    )]);
    all_accepted(&t);
    let retry = policy(&t, "httproute-echo").spec.routes[0]
        .retry
        .clone()
        .unwrap();
    assert_eq!(retry.on, [sluice_config::RetryOn::ConnectFailure]);
    assert_eq!(retry.status_codes, [400, 599], "each code once");
    for (codes, at) in [(json!([399, 503]), 0), (json!([503, 600]), 1)] {
        let t = run(&[route("r", "2026-01-01T00:00:00Z", spec(codes.clone()))]);
        let found = problems(&t, "r");
        assert_eq!(found.len(), 1, "{codes}: {found:?}");
        assert_eq!(
            found[0].2,
            format!("spec.rules[0].retry.codes[{at}]"),
            "{codes}"
        );
    }
}

/// Names too long for a DNS label are shortened with a hash of the whole, so two
/// that share their first 54 characters stay apart; the generated policy names the
/// HTTPRoutes it comes from.
#[test]
fn shortened_names_stay_distinct_and_policies_name_their_sources() {
    let long = "a-very-long-httproute-name-that-goes-on-and-on-and-on-for-ever";
    let spec = |rule: &str| {
        json!({ "parentRefs": parent(), "rules": [
            { "name": rule, "matches": [{ "path": { "value": format!("/{rule}") } }],
              "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }] })
    };
    let t = run(&[
        route(&format!("{long}-one"), "2026-01-01T00:00:00Z", spec("x")),
        route(&format!("{long}-two"), "2026-01-01T00:00:00Z", spec("y")),
    ]);
    all_accepted(&t);
    let p = policy(&t, "httproute-echo");
    let names = route_names(p);
    assert_eq!(names.len(), 2);
    assert_ne!(names[0], names[1]);
    for n in &names {
        assert!(
            n.len() <= 63 && n.starts_with("a-very-long-httproute"),
            "{n}"
        );
        let hash = n.rsplit('-').next().unwrap_or_default();
        assert!(
            hash.len() == 8 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{n}"
        );
    }
    let sources = &p.metadata.annotations[SOURCE_ANNOTATION];
    assert!(
        sources.contains(&format!("{NS}/{long}-one"))
            && sources.contains(&format!("{NS}/{long}-two")),
        "{sources}"
    );
}

/// Refusing a Service drops its policy and marks every parent entry that named it,
/// and only those, with nothing kept in force there.
#[test]
fn refusing_a_service_drops_its_policy_and_marks_its_parents() {
    let spec = |svc: &str| {
        json!({ "parentRefs": [{ "group": "", "kind": "Service", "name": svc, "port": 80 }],
                "rules": [{ "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }] })
    };
    let mut t = run(&[
        route("to-echo", "2026-01-01T00:00:00Z", spec("echo")),
        route("to-v2", "2026-01-01T00:00:00Z", spec("echo-v2")),
    ]);
    all_accepted(&t);
    for v in t.verdicts.values_mut() {
        v.kept_generation = Some(2);
    }
    t.refuse_service(&(NS.to_string(), "echo".to_string()), "taken");
    let names: Vec<&str> = t.policies().map(|p| p.metadata.name.as_str()).collect();
    assert_eq!(names, ["httproute-echo-v2"]);
    let refused = &t.verdicts.iter().find(|(k, _)| k.1 == "to-echo").unwrap().1;
    assert_eq!(refused.kept_generation, None);
    assert_eq!(
        problems(&t, "to-echo"),
        [(
            Condition::Accepted,
            "UnsupportedValue",
            "spec.parentRefs[0]".to_string()
        )]
    );
    assert_eq!(refused.parents[0].problems[0].message, "taken");
    let other = &t.verdicts.iter().find(|(k, _)| k.1 == "to-v2").unwrap().1;
    assert_eq!(other.kept_generation, Some(2));
    assert!(problems(&t, "to-v2").is_empty());
}

/// Paths the HTTPRoute CRD's validation rules forbid in Exact and PathPrefix matches
/// (an empty segment, dot-segments, an encoded slash) are refused by field path,
/// saying which rule and, for a dot-segment, what to write; dots elsewhere in a
/// segment are fine, and an encoded dot-segment the rules let through is refused by
/// the policy validator, which says why.
#[test]
fn paths_the_crd_forbids_are_refused_with_the_rule_they_break() {
    let spec = |matches: Value| {
        json!({ "parentRefs": parent(), "rules": [
            { "matches": matches, "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }] })
    };
    let t = run(&[
        route(
            "paths",
            "2026-01-01T00:00:00Z",
            spec(json!([
                { "path": { "type": "Exact", "value": "/a//b" } },
                { "path": { "type": "PathPrefix", "value": "/a/../b" } },
                { "path": { "type": "Exact", "value": "/a%2Fb" } },
                { "path": { "type": "PathPrefix", "value": "/a/." } },
                { "path": { "type": "PathPrefix", "value": "/.well-known/a..b" } }
            ])),
        ),
        route(
            "encoded",
            "2026-01-02T00:00:00Z",
            spec(json!([{ "path": { "type": "Exact", "value": "/a/%2e%2E/b" } }])),
        ),
        route(
            "fine",
            "2026-01-03T00:00:00Z",
            spec(json!([{ "path": { "type": "PathPrefix", "value": "/.well-known/a..b" } }])),
        ),
    ]);
    let messages = |route: &str| -> Vec<(String, String)> {
        let (_, v) = t.verdicts.iter().find(|(k, _)| k.1 == route).unwrap();
        v.parents[0]
            .problems
            .iter()
            .map(|p| {
                assert_eq!(
                    (p.condition, p.reason),
                    (Condition::Accepted, "UnsupportedValue")
                );
                (p.path.clone(), p.message.clone())
            })
            .collect()
    };
    let rule = "the Gateway API forbids it in Exact and PathPrefix matches";
    let at =
        |m: usize, message: String| (format!("spec.rules[0].matches[{m}].path.value"), message);
    assert_eq!(
        messages("paths"),
        [
            at(
                0,
                format!("path \"/a//b\" must not contain \"//\", an empty segment ({rule})")
            ),
            at(
                1,
                format!(
                    "path \"/a/../b\" must not contain \"/../\", a dot-segment ({rule}); requests are routed with their dot-segments resolved, so write \"/b\""
                )
            ),
            at(
                2,
                format!("path \"/a%2Fb\" must not contain \"%2F\", an encoded slash ({rule})")
            ),
            at(
                3,
                format!(
                    "path \"/a/.\" must not end with \"/.\", a dot-segment ({rule}); requests are routed with their dot-segments resolved, so write \"/a/\""
                )
            ),
        ]
    );
    let encoded = messages("encoded");
    assert_eq!(encoded.len(), 1);
    assert_eq!(encoded[0].0, "spec");
    assert!(
        encoded[0]
            .1
            .contains("\"/a/%2e%2E/b\" has the dot-segment \"%2e%2E\"")
            && encoded[0].1.contains("write \"/b\""),
        "{encoded:?}"
    );
    assert!(messages("fine").is_empty());
    assert_eq!(route_names(policy(&t, "httproute-echo")), ["fine-0-0"]);
}

/// Matches a RoutePolicy refuses as never matching (a Host header, a value with spaces
/// around it, CONNECT, a non-ASCII path) are refused for their rule alone, each at its
/// field, so the rest of the Service's routes still go in.
#[test]
fn matches_that_could_never_match_are_refused_for_their_rule_alone() {
    let spec = |matches: Value| {
        json!({ "parentRefs": parent(), "rules": [
            { "matches": matches, "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }] })
    };
    let t = run(&[
        route(
            "never",
            "2026-01-01T00:00:00Z",
            spec(json!([
                { "headers": [{ "name": "Host", "value": "echo" }] },
                { "headers": [{ "name": "x-a", "value": " v " }] },
                { "method": "CONNECT" },
                { "path": { "type": "Exact", "value": "/caf\u{e9}" } }
            ])),
        ),
        route(
            "fine",
            "2026-01-02T00:00:00Z",
            spec(json!([{ "path": { "type": "PathPrefix", "value": "/ok" } }])),
        ),
    ]);
    let (_, v) = t.verdicts.iter().find(|(k, _)| k.1 == "never").unwrap();
    let paths: Vec<&str> = v.parents[0]
        .problems
        .iter()
        .map(|p| p.path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "spec.rules[0].matches[0].headers[0].name",
            "spec.rules[0].matches[1].headers[0].value",
            "spec.rules[0].matches[2].method",
            "spec.rules[0].matches[3].path.value",
        ]
    );
    assert_eq!(route_names(policy(&t, "httproute-echo")), ["fine-0-0"]);
}
