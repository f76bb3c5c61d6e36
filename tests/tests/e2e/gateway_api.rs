//! Gateway API HTTPRoutes as policy input, end to end: the mesh conformance
//! fixtures in the Kubernetes API double, translated by a real control plane,
//! enforced by a real proxy in front of real upstreams, checked as the upstream
//! conformance tests check them (which backend answers which request; weights
//! within their tolerance over 500 requests); every other fixture refused in its
//! status with the condition its missing feature calls for, and every status
//! written valid against the HTTPRoute CRD's schema.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::{Value, json};
use sluice_e2e::gateway::{
    GatewayMesh, MESH_NAMESPACE, conformance_fixture, conformance_fixture_path, parent_condition,
    validate_httproutes, yaml_documents,
};
use sluice_e2e::{HttpConn, TestProxy, WAIT, wait_until};

/// The upstream (`echo-v1`, `echo-v2-http`, ...) that answers `path` with `headers`.
async fn backend(proxy: &TestProxy, path: &str, headers: &[(&str, &str)]) -> String {
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let r = conn
        .request(hyper::Method::GET, "echo", path, headers)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.header("x-upstream").to_string()
}

fn fixture_objects(names: &[&str]) -> Vec<Value> {
    names
        .iter()
        .flat_map(|n| yaml_documents(&conformance_fixture(n)))
        .collect()
}

/// Every HTTPRoute in the double validates against the CRD's schema.
fn assert_statuses_valid(mesh: &GatewayMesh) {
    let routes = mesh.api.list("httproutes");
    assert!(
        routes.iter().all(|r| r["status"]["parents"].is_array()),
        "every route has a status"
    );
    if let Err(e) = validate_httproutes(&routes) {
        panic!("statuses that do not validate against the HTTPRoute CRD:\n{e}");
    }
}

async fn assert_accepted(mesh: &GatewayMesh, route: &str) {
    let parent = mesh.sluice_parent(route).await;
    assert_eq!(
        parent_condition(&parent, "Accepted")["status"],
        "True",
        "{parent}"
    );
    assert_eq!(
        parent_condition(&parent, "ResolvedRefs")["status"],
        "True",
        "{parent}"
    );
    assert_eq!(
        parent_condition(&parent, "Accepted")["observedGeneration"],
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_weight_keeps_70_30_within_the_conformance_tolerance() {
    let mesh = GatewayMesh::start(&fixture_objects(&["httproute-weight"])).await;
    assert_accepted(&mesh, "mesh-weighted-backends").await;
    // The upstream test: 500 requests (with random headers), each backend within
    // 5 points of its weight; up to 10 rounds, one passing is enough.
    const TOTAL: usize = 500;
    const TOLERANCE: f64 = 0.05;
    let mut rounds = Vec::new();
    let mut passed = false;
    for round in 0..10 {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..TOTAL {
            let jitter = (i * 7919 + round * 104_729).to_string();
            *seen
                .entry(backend(&mesh.proxy, "/", &[("x-jitter", &jitter)]).await)
                .or_default() += 1;
        }
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            ["echo-v1", "echo-v2"],
            "only the 8080 ports of echo-v1 and echo-v2 answer"
        );
        let share = |b: &str| seen[b] as f64 / TOTAL as f64;
        passed = (share("echo-v1") - 0.7).abs() <= TOLERANCE
            && (share("echo-v2") - 0.3).abs() <= TOLERANCE;
        rounds.push(seen);
        if passed {
            break;
        }
    }
    assert!(passed, "no round within the tolerance: {rounds:?}");
    assert_statuses_valid(&mesh);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_split_sends_each_exact_path_to_its_backend_port() {
    let mesh = GatewayMesh::start(&fixture_objects(&["mesh-split"])).await;
    assert_accepted(&mesh, "mesh-split").await;
    // backendRefs name port 80: the Services' `http` port.
    assert_eq!(backend(&mesh.proxy, "/v1", &[]).await, "echo-v1-http");
    assert_eq!(backend(&mesh.proxy, "/v2", &[]).await, "echo-v2-http");
    assert_statuses_valid(&mesh);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_matching_chooses_as_the_conformance_test_expects() {
    let mesh = GatewayMesh::start(&fixture_objects(&["httproute-matching"])).await;
    assert_accepted(&mesh, "mesh-matching").await;
    for (path, headers, want) in [
        ("/", &[][..], "echo-v1"),
        ("/example", &[], "echo-v1"),
        ("/", &[("version", "one")], "echo-v1"),
        ("/v2", &[], "echo-v2"),
        ("/v2/example", &[], "echo-v2"),
        ("/", &[("Version", "two")], "echo-v2"),
        ("/v2/", &[], "echo-v2"),
        ("/v2example", &[], "echo-v1"),
        ("/foo/v2/example", &[], "echo-v1"),
    ] {
        assert_eq!(
            backend(&mesh.proxy, path, headers).await,
            want,
            "{path} {headers:?}"
        );
    }
    assert_statuses_valid(&mesh);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_rules_and_the_simple_route_reach_their_backends() {
    let mesh = GatewayMesh::start(&fixture_objects(&[
        "httproute-named-rule",
        "httproute-simple-same-namespace",
    ]))
    .await;
    assert_accepted(&mesh, "mesh-http-named-rules").await;
    assert_accepted(&mesh, "gateway-conformance-mesh-test").await;
    assert_eq!(backend(&mesh.proxy, "/named", &[]).await, "echo-v1");
    assert_eq!(backend(&mesh.proxy, "/unnamed", &[]).await, "echo-v2");
    // The simple route (created later) takes what the named rules do not.
    assert_eq!(backend(&mesh.proxy, "/", &[]).await, "echo-v1");
    // The route names carry the rule's name, in the proxy's metrics too.
    let metrics = sluice_e2e::scrape(mesh.proxy.admin_addr()).await;
    assert!(
        metrics.contains("route=\"httproute-echo.mesh-http-named-rules-named-rule-0\""),
        "{metrics}"
    );
    assert_statuses_valid(&mesh);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_policy_per_service_answers_every_name_of_it() {
    let mesh = GatewayMesh::start(&fixture_objects(&["httproute-simple-same-namespace"])).await;
    assert_accepted(&mesh, "gateway-conformance-mesh-test").await;
    // Each name a mesh client calls the Service by reaches the route's backend.
    let fqdn = format!("echo.{MESH_NAMESPACE}.svc.cluster.local");
    let short = format!("echo.{MESH_NAMESPACE}");
    for host in ["echo", short.as_str(), fqdn.as_str()] {
        let mut conn = HttpConn::h1(mesh.proxy.outbound_addr()).await.unwrap();
        let r = conn.get(host, "/").await.unwrap();
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        assert_eq!(r.header("x-upstream"), "echo-v1", "{host}");
    }
    // A name of no Service is still no route.
    let mut conn = HttpConn::h1(mesh.proxy.outbound_addr()).await.unwrap();
    let r = conn.get("echo.elsewhere", "/").await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    // One generated policy, in the control plane's /policies and the proxy's /config.
    let mut admin = HttpConn::h1(mesh.cp.admin_addr()).await.unwrap();
    let policies: Value =
        serde_json::from_str(&admin.get("cp", "/policies").await.unwrap().text()).unwrap();
    let listed: Vec<&Value> = policies["policies"].as_array().unwrap().iter().collect();
    assert_eq!(listed.len(), 1, "{policies}");
    assert_eq!(listed[0]["name"], "httproute-echo", "{policies}");
    assert_eq!(listed[0]["namespace"], MESH_NAMESPACE, "{policies}");
    assert_eq!(listed[0]["host"], fqdn.as_str(), "{policies}");
    assert_eq!(listed[0]["aliases"], json!(["echo", short]), "{policies}");
    let config = mesh.proxy.admin_json("/config").await;
    let served = sluice_config::PolicySet::from_canonical(
        "served",
        config["policies"].as_str().unwrap().as_bytes(),
    )
    .unwrap();
    assert_eq!(served.policies().len(), 1);
    assert_eq!(
        served.policies()[0].spec.hosts().collect::<Vec<_>>(),
        [fqdn.as_str(), "echo", short.as_str()]
    );
    assert_statuses_valid(&mesh);
    mesh.shutdown().await;
}

/// `(route, condition, reason, start of the message)` expected of a refused fixture.
type Refusal = (&'static str, &'static str, &'static str, &'static str);

async fn assert_refused(mesh: &GatewayMesh, refusals: &[Refusal]) {
    for (route, cond, reason, message) in refusals {
        let parent = mesh.sluice_parent(route).await;
        let c = parent_condition(&parent, cond);
        assert_eq!(c["status"], "False", "{route}: {parent}");
        assert_eq!(c["reason"], *reason, "{route}: {parent}");
        assert!(
            c["message"].as_str().unwrap_or_default().contains(message),
            "{route}: {parent}"
        );
        assert_eq!(c["observedGeneration"], 1, "{route}");
        if *cond == "Accepted" {
            continue;
        }
        assert_eq!(parent_condition(&parent, "Accepted")["status"], "False");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_other_fixture_is_refused_with_the_condition_it_calls_for() {
    let filter = |route| {
        (
            route,
            "Accepted",
            "UnsupportedValue",
            "spec.rules[0].filters[0]: filter",
        )
    };
    // All at once (names are unique across these), with a working route beside them:
    // the refused ones never block it.
    let mesh = GatewayMesh::start(&fixture_objects(&[
        "httproute-simple-same-namespace",
        "httproute-303-redirect",
        "httproute-307-redirect",
        "httproute-308-redirect",
        "httproute-redirect-host-and-status",
        "httproute-redirect-path",
        "httproute-redirect-port",
        "httproute-redirect-scheme",
        "httproute-request-header-modifier",
        "httproute-rewrite-path",
        "httproute-query-param-matching",
        "mesh-consumer-route",
        "mesh-frontend",
    ]))
    .await;
    assert_refused(
        &mesh,
        &[
            filter("mesh-303-redirect"),
            filter("mesh-307-redirect"),
            filter("mesh-308-redirect"),
            filter("mesh-redirect-host-and-status"),
            filter("mesh-redirect-path"),
            filter("mesh-redirect-port"),
            filter("mesh-redirect-scheme"),
            filter("mesh-request-header-modifier"),
            filter("mesh-rewrite-path"),
            (
                "mesh-query-param-matching",
                "Accepted",
                "UnsupportedValue",
                "spec.rules[0].matches[0].queryParams: query parameter matches are not supported",
            ),
            filter("mesh-split-v1"),
        ],
    )
    .await;
    // The consumer route, in its own namespace: refused as a consumer route, and its
    // backend in another namespace without a ReferenceGrant does not resolve.
    let api = mesh.api.clone();
    let consumer_status = move || {
        api.get(
            "httproutes",
            "gateway-conformance-mesh-consumer",
            "mesh-echo-add-header",
        )
        .map(|o| o["status"]["parents"].clone())
        .unwrap_or(Value::Null)
    };
    wait_until("the consumer route has a status", WAIT, || {
        let done = consumer_status().as_array().is_some_and(|p| !p.is_empty());
        async move { done }
    })
    .await;
    let consumer = json!({ "status": { "parents": consumer_status() } });
    let parent = &consumer["status"]["parents"][0];
    let accepted = parent_condition(parent, "Accepted");
    assert_eq!(accepted["status"], "False");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .contains("spec.parentRefs[0].namespace: a consumer route"),
        "{parent}"
    );
    let refs = parent_condition(parent, "ResolvedRefs");
    assert_eq!(refs["status"], "False");
    assert_eq!(refs["reason"], "RefNotPermitted");
    assert!(
        refs["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.rules[0].backendRefs[0].namespace"),
        "{parent}"
    );

    // The working route is served all along.
    assert_accepted(&mesh, "gateway-conformance-mesh-test").await;
    assert_eq!(backend(&mesh.proxy, "/set", &[]).await, "echo-v1");
    assert_statuses_valid(&mesh);
    mesh.shutdown().await;

    // The fixtures whose names repeat the ones above.
    let mesh = GatewayMesh::start(&fixture_objects(&[
        "httproute-simple-same-namespace",
        "httproute-request-header-modifier-backend",
        "mesh-ports",
    ]))
    .await;
    assert_refused(
        &mesh,
        &[
            (
                "mesh-request-header-modifier",
                "Accepted",
                "UnsupportedValue",
                "spec.rules[0].backendRefs[0].filters: filter RequestHeaderModifier",
            ),
            filter("mesh-split-v1"),
            filter("mesh-split-v2"),
        ],
    )
    .await;
    assert_statuses_valid(&mesh);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_a_route_policy_defines_is_refused_to_httproutes_with_both_names() {
    let route_policy = json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RoutePolicy",
        "metadata": { "name": "echo", "namespace": MESH_NAMESPACE },
        "spec": { "host": "echo.gateway-conformance-mesh",
                  "backends": { "b": { "service": "echo-v2.gateway-conformance-mesh", "port": 80 } },
                  "routes": [{ "name": "all" }] } });
    let mut objects = fixture_objects(&["httproute-simple-same-namespace"]);
    objects.push(route_policy);
    let mesh = GatewayMesh::start(&objects).await;
    let parent = mesh.sluice_parent("gateway-conformance-mesh-test").await;
    let accepted = parent_condition(&parent, "Accepted");
    assert_eq!(accepted["status"], "False", "{parent}");
    let message = accepted["message"].as_str().unwrap();
    assert!(
        message.contains("RoutePolicy gateway-conformance-mesh/echo")
            && message
                .contains("HTTPRoutes gateway-conformance-mesh/gateway-conformance-mesh-test"),
        "{message}"
    );
    // /policies says the same, and only the RoutePolicy governs the host.
    let mut admin = HttpConn::h1(mesh.cp.admin_addr()).await.unwrap();
    let policies: Value =
        serde_json::from_str(&admin.get("cp", "/policies").await.unwrap().text()).unwrap();
    let text = policies.to_string();
    assert!(
        text.contains("httproute/gateway-conformance-mesh/gateway-conformance-mesh-test")
            && text.contains("is defined both by RoutePolicy gateway-conformance-mesh/echo"),
        "{text}"
    );
    let outbound = mesh.proxy.outbound_addr();
    wait_until("the RoutePolicy's backend answers", WAIT, || async move {
        let mut conn = HttpConn::h1(outbound).await.unwrap();
        conn.get("echo.gateway-conformance-mesh", "/")
            .await
            .is_ok_and(|r| r.header("x-upstream") == "echo-v2-http")
    })
    .await;
    assert_statuses_valid(&mesh);
    mesh.shutdown().await;
}

#[test]
fn convert_translates_offline_and_refuses_with_file_and_field() {
    let bin = env!("CARGO_BIN_EXE_e2e-control-plane");
    let weight = conformance_fixture_path("httproute-weight");
    let out = Command::new(bin)
        .arg("convert")
        .arg(&weight)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let set = sluice_config::PolicySet::from_canonical("converted", &out.stdout).unwrap();
    assert_eq!(set.policies().len(), 1, "one policy per Service");
    let p = &set.policies()[0];
    assert_eq!(p.metadata.name, "httproute-echo");
    assert_eq!(
        p.spec.hosts().collect::<Vec<_>>(),
        [
            "echo.gateway-conformance-mesh.svc.cluster.local",
            "echo",
            "echo.gateway-conformance-mesh"
        ]
    );
    let w = p.spec.routes[0].split[0].weights.as_ref().unwrap();
    assert_eq!(w.values().copied().collect::<Vec<_>>(), [70, 30]);

    // `-` reads standard input, and translates it the same.
    let mut child = Command::new(bin)
        .args(["convert", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        &std::fs::read(&weight).unwrap(),
    )
    .unwrap();
    let piped = child.wait_with_output().unwrap();
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&piped.stdout),
        String::from_utf8_lossy(&out.stdout)
    );

    let redirect = conformance_fixture_path("httproute-303-redirect");
    let out = Command::new(bin)
        .arg("convert")
        .arg(&redirect)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "{}: HTTPRoute gateway-conformance-mesh/mesh-303-redirect",
            redirect.display()
        )) && stderr.contains("spec.rules[0].filters[0]: filter RequestRedirect is not supported"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn the_schema_check_refuses_what_the_crd_refuses() {
    // The check the tests above rely on does check: an entry without conditions and
    // with a controllerName that is no domain/path is refused, with both reasons.
    let bad = json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                      "metadata": { "name": "x", "namespace": MESH_NAMESPACE }, "spec": {},
                      "status": { "parents": [{ "parentRef": { "name": "a" },
                                                "controllerName": "not a controller", "conditions": [] }] } });
    let err = validate_httproutes(&[bad]).unwrap_err();
    assert!(err.contains("status/parents/0/controllerName"), "{err}");
    assert!(err.contains("status/parents/0/conditions"), "{err}");
}
