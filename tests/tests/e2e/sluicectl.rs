//! `sluicectl` against real proxies, control planes and upstreams: every command, its
//! JSON and its exit codes, and `explain` checked request by request against what a
//! live proxy does.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use hyper::{Method, StatusCode};
use sluice_e2e::{
    HttpConn, NackingMesh, ProxyOptions, TestControlPlane, TestProxy, Upstream, WAIT, wait_until,
};
use sluicectl::explain::{Explainer, Probe};

fn bin() -> &'static Path {
    env!("CARGO_BIN_EXE_e2e-sluicectl").as_ref()
}

/// Runs `sluicectl ARGS` with no `SLUICECTL_*` from the environment leaking in.
fn sluicectl(args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("SLUICECTL_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).output().expect("run sluicectl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(o), stderr(o)))
}

/// A host whose routes exercise every precedence rule and every kind of split:
/// header rules, ordered sticky weights, rendezvous sticky weights, random weights.
fn shop_policy(v1: SocketAddr, v2: SocketAddr, v3: SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: shop, namespace: e2e }}
spec:
  host: shop
  backends:
    v1: {{ addresses: ["{v1}"] }}
    v2: {{ addresses: ["{v2}"] }}
    v3: {{ addresses: ["{v3}"] }}
  routes:
    - name: health
      match: {{ path: {{ exact: /healthz }} }}
      split: [{{ backend: v1 }}]
    - name: ingest-canary
      match: {{ path: {{ prefix: /logs }}, method: POST, headers: {{ x-canary: "true" }} }}
      split: [{{ backend: v3 }}]
    - name: ingest
      match: {{ path: {{ prefix: /logs }}, method: POST }}
      split:
        - when: {{ headers: {{ x-beta: "1" }} }}
          backend: v2
        - weights: {{ v1: 70, v2: 20, v3: 10 }}
          stickyBy: {{ header: x-user-id }}
    - name: read
      match: {{ path: {{ prefix: /logs }} }}
      split:
        - weights: {{ v1: 50, v2: 50 }}
          stickyBy: {{ header: x-user-id, hash: rendezvous }}
    - name: gold
      match: {{ path: {{ prefix: /api/v1 }}, headers: {{ x-tenant: gold }} }}
      split: [{{ backend: v2 }}]
    - name: api
      match: {{ path: {{ prefix: /api }} }}
      split:
        - weights: {{ v1: 34, v2: 33, v3: 33 }}
          stickyBy: {{ header: x-session }}
---
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: other, namespace: e2e }}
spec:
  host: other
  backends:
    o1: {{ addresses: ["{v1}"] }}
  routes:
    - name: all
"#
    )
}

/// A small deterministic generator (xorshift64*), so a failure replays.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick<'a>(&mut self, options: &[&'a str]) -> &'a str {
        options[(self.next() % options.len() as u64) as usize]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_a_live_proxy_on_route_and_sticky_backend() {
    const N: usize = 1000;
    let (v1, v2, v3) = (
        Upstream::http1("v1").await,
        Upstream::http1("v2").await,
        Upstream::http1("v3").await,
    );
    let policy = shop_policy(v1.addr(), v2.addr(), v3.addr());
    let proxy = TestProxy::start_with(
        &policy,
        ProxyOptions {
            recent_requests: 2 * N,
            ..Default::default()
        },
    )
    .await;
    let set = sluice_config::PolicySet::from_files([("shop.yaml", policy.as_str())]).unwrap();
    let explainer = Explainer::new(&set).unwrap();

    let mut g = Gen(0x5eed_1234_abcd_9876);
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let mut expected = Vec::with_capacity(N);
    for _ in 0..N {
        let host = g.pick(&[
            "shop",
            "shop",
            "shop",
            "shop",
            "SHOP:8080",
            "other",
            "nobody",
        ]);
        let method = g.pick(&["GET", "POST", "POST", "PUT", "DELETE"]);
        let path = g.pick(&[
            "/healthz",
            "/healthz/x",
            "/logs",
            "/logs/a/b",
            "/logsx",
            "/api",
            "/api/v1/items",
            "/api/v2",
            "/",
            "/apix",
        ]);
        let mut headers: Vec<(String, String)> = Vec::new();
        for (name, values) in [
            ("x-canary", &["true", "false"][..]),
            ("x-beta", &["1", "0"][..]),
            ("x-tenant", &["gold", "silver"][..]),
        ] {
            if g.next().is_multiple_of(3) {
                headers.push((name.into(), g.pick(values).into()));
            }
        }
        for name in ["x-user-id", "x-session"] {
            if !g.next().is_multiple_of(5) {
                headers.push((name.into(), format!("u-{}", g.next() % 100_000)));
            }
        }
        let words: Vec<String> = headers.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        let e = explainer.explain(&Probe::parse(host, method, path, &words).unwrap());
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let method_ = Method::from_bytes(method.as_bytes()).unwrap();
        let reply = conn.request(method_, host, path, &pairs).await.unwrap();
        expected.push((host, method, path, words, e, reply));
    }

    // The proxy's own record of where each request went, in the order they finished
    // (one connection, one request at a time: the order sent).
    let recent = proxy.admin_json(&format!("/recent?limit={N}")).await;
    let seen = recent["requests"].as_array().unwrap();
    assert_eq!(seen.len(), N, "the ring kept every request");

    let (mut sticky, mut fixed, mut random, mut no_route, mut lost) = (0, 0, 0, 0, 0);
    let mut routes = BTreeSet::new();
    for (i, ((host, method, path, words, e, reply), live)) in expected.iter().zip(seen).enumerate()
    {
        let what = format!("request {i}: {method} {host}{path} {words:?}");
        assert_eq!(live["path"], *path, "{what}: ring order");
        let live_route = live["route"].as_str();
        assert_eq!(e.route.as_deref(), live_route, "{what}: route");
        match &e.route {
            None => {
                no_route += 1;
                assert_eq!(reply.status, StatusCode::NOT_FOUND, "{what}");
                assert_eq!(reply.header("x-sluice-reason"), "no-route", "{what}");
            }
            Some(r) => {
                routes.insert(r.clone());
                assert_eq!(reply.status, StatusCode::OK, "{what}");
                let b = e
                    .backend
                    .as_ref()
                    .expect("a chosen route has a backend verdict");
                let upstream = reply.header("x-upstream");
                let backend = live["backend"].as_str().unwrap_or("");
                match (&b.backend, b.by) {
                    (Some(name), by) => {
                        assert_eq!(backend, name, "{what}: backend ({by}: {})", b.why);
                        if by == "sticky" {
                            sticky += 1;
                        } else {
                            fixed += 1;
                        }
                    }
                    (None, _) => {
                        random += 1;
                        assert!(!backend.is_empty(), "{what}: a backend answered");
                    }
                }
                // The ring's backend is the upstream that answered (`o1` is v1's address).
                let answered = if backend == "o1" { "v1" } else { backend };
                assert_eq!(upstream, answered, "{what}");
                lost += e
                    .routes
                    .iter()
                    .filter(|r| r.verdict == "precedence")
                    .count();
            }
        }
    }
    // Not a vacuous agreement: every kind of decision was made many times.
    assert!(sticky >= 200, "sticky decisions: {sticky}");
    assert!(
        fixed >= 50,
        "header-rule and single-backend decisions: {fixed}"
    );
    assert!(random >= 20, "random draws: {random}");
    assert!(no_route >= 50, "no-route: {no_route}");
    assert!(lost >= 40, "routes lost on precedence: {lost}");
    assert_eq!(
        routes.len(),
        7,
        "every route chosen at least once: {routes:?}"
    );
    proxy.shutdown().await;
}

const LOG_POLICY: &str = r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log, namespace: e2e }
spec:
  host: log
  backends:
    v1: { addresses: ["127.0.0.1:9"] }
  routes:
    - name: all
      timeout: 2s
"#;

/// A policy for `host` with one breaker-guarded route to `backend`.
fn breaker_policy(backend: SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: shop, namespace: e2e }}
spec:
  host: shop
  backends:
    v1: {{ addresses: ["{backend}"] }}
  routes:
    - name: api
      circuitBreaker: {{ consecutiveFailures: 50, openFor: 30s }}
"#
    )
}

#[test]
fn validate_gives_the_verdict_with_positions_and_exit_codes() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let out = sluicectl(&["validate", examples.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("valid: "), "{}", stdout(&out));

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, LOG_POLICY.replace("timeout: 2s", "timeout: soon")).unwrap();
    let out = sluicectl(&["validate", broken.to_str().unwrap(), "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let v = json(&out);
    assert_eq!(v["ok"], false);
    let e = &v["errors"][0];
    assert_eq!(e["file"], broken.to_str().unwrap());
    assert_eq!(
        (e["line"].as_u64(), e["field"].as_str()),
        (Some(10), Some("spec.routes[0].timeout"))
    );

    let out = sluicectl(&[
        "validate",
        dir.path().join("missing.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

#[test]
fn explain_from_the_command_line_names_route_losers_and_sticky_backend() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    std::fs::write(dir.path().join("shop.yaml"), shop_policy(addr, addr, addr)).unwrap();
    let f = dir.path().to_str().unwrap();
    let out = sluicectl(&[
        "explain",
        "-f",
        f,
        "shop",
        "POST",
        "/logs/x",
        "-H",
        "x-user-id:alice",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["policy"], "e2e/shop");
    assert_eq!(v["route"], "shop.ingest");
    assert_eq!(v["backend"]["by"], "sticky");
    let point = sluice_config::sticky_point(b"alice");
    let expected = if point < 7000 {
        "v1"
    } else if point < 9000 {
        "v2"
    } else {
        "v3"
    };
    assert_eq!(v["backend"]["backend"], expected);
    let lost: Vec<&str> = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["verdict"] == "precedence")
        .map(|r| r["route"].as_str().unwrap())
        .collect();
    assert_eq!(lost, ["shop.read"]);

    let out = sluicectl(&[
        "explain",
        "-f",
        f,
        "shop",
        "POST",
        "/logs/x",
        "-H",
        "x-user-id:alice",
    ]);
    let text = stdout(&out);
    assert!(text.contains("route     shop.ingest"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(" shop.ingest ") && l.ends_with("  chosen")),
        "{text}"
    );
    assert!(text.contains("lost on precedence: matches too, but shop.ingest goes first: a method match goes before none"), "{text}");
    assert!(text.contains(&format!("point {point} of 10000")), "{text}");

    let out = sluicectl(&["explain", "-f", f, "shop", "GET", "/", "-H", "broken"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is not name:value"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_acks_certificates_and_fails_on_a_nack() {
    let cp = TestControlPlane::start_with_ca(
        &[("log.yaml", LOG_POLICY)],
        &[("tok-order", "e2e", "order")],
        std::time::Duration::from_secs(3600),
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_subscribed(
        &cp.url(),
        "order-0",
        state.path(),
        ProxyOptions {
            mtls: Some(cp.mesh_tls("tok-order")),
            ..ProxyOptions::default()
        },
    )
    .await;
    let version = cp.version().unwrap();
    cp.wait_acked_everywhere(&version, 1).await;
    let cp_url = format!("http://{}", cp.admin_addr());
    let proxy_url = proxy.admin_addr().to_string();
    let out = sluicectl(&[
        "--control-plane",
        &cp_url,
        "--proxy",
        &proxy_url,
        "status",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let v = json(&out);
    assert_eq!(v["ok"], true);
    assert_eq!(v["version"], version.as_str());
    let p = &v["proxies"][0];
    assert_eq!(
        (p["node_id"].as_str(), p["state"].as_str()),
        (Some("order-0"), Some("in-sync"))
    );
    assert_eq!(p["acked_version"], version.as_str());
    assert_eq!(p["spiffe_id"], "spiffe://cluster.local/ns/e2e/sa/order");
    let not_after = p["cert_not_after"].as_str().expect("certificate expiry");
    assert!(not_after.ends_with('Z'), "{not_after}");

    let out = sluicectl(&["--control-plane", &cp_url, "--proxy", &proxy_url, "status"]);
    let text = stdout(&out);
    let row = text
        .lines()
        .find(|l| l.starts_with("order-0"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains("in-sync") && row.contains(&not_after[..10]) && !row.contains("EXPIRED"),
        "{row}"
    );
    assert!(row.contains("s ago"), "last seen: {row}");

    // A proxy asked directly that the control plane does not know (on its own file
    // policy, plaintext): listed as such, with its own version; not a failure.
    let lone = TestProxy::start(LOG_POLICY).await;
    let lone_url = lone.admin_addr().to_string();
    let args = [
        "--control-plane",
        &cp_url,
        "--proxy",
        &proxy_url,
        "--proxy",
        &lone_url,
        "status",
    ];
    let out = sluicectl(&[&args[..], &["-o", "json"]].concat());
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let v = json(&out);
    let p = &v["proxies"][1];
    assert_eq!(p["state"], "not-on-control-plane", "{v:#}");
    assert_eq!(
        (&p["mtls"], &p["cert_expired"]),
        (&false.into(), &false.into())
    );
    assert!(p["admin"].as_str().unwrap().ends_with(&lone_url), "{v:#}");
    // Its own version: the same policy text, so the same hash as the control plane's.
    let lone_version = p["acked_version"].as_str().expect("its own version");
    assert_eq!(lone_version, version.as_str());
    assert!(!p["node_id"].as_str().unwrap().is_empty(), "{v:#}");
    let out = sluicectl(&args);
    let text = stdout(&out);
    let row = text
        .lines()
        .find(|l| l.contains("not-on-control-plane"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains("no mTLS") && row.contains(&lone_version[..12]) && !row.contains(" ago"),
        "never seen by the control plane: {row}"
    );
    lone.shutdown().await;
    proxy.shutdown().await;

    // A snapshot the proxy cannot take: refused, and status says so with exit 1.
    let mesh = NackingMesh::start(
        env!("CARGO_BIN_EXE_e2e-control-plane").as_ref(),
        LOG_POLICY,
        "log-0",
    )
    .await;
    // The policy and state directories live as long as `mesh`.
    let NackingMesh {
        cp: child,
        proxy: refusing,
        future,
        ..
    } = mesh;
    let cp_url = format!("http://{}", child.admin_addr());
    let out = sluicectl(&["--control-plane", &cp_url, "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("log-0") && text.contains("NACK"), "{text}");
    assert!(
        text.contains(&format!("schema version {future} is not supported")),
        "{text}"
    );
    refusing.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_list_open_and_reset_a_live_proxys_breaker() {
    let upstream = Upstream::http1("v1").await;
    let proxy = TestProxy::start(&breaker_policy(upstream.addr())).await;
    let url = proxy.admin_addr().to_string();
    let list = || sluicectl(&["--proxy", &url, "breakers", "-o", "json"]);
    let state = |out: &Output| json(out)["proxies"][0]["breakers"][0]["state"].clone();
    assert_eq!(state(&list()), "closed");

    let out = sluicectl(&["--proxy", &url, "breakers", "open", "shop.api", "v1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("shop.api/v1: open done"),
        "{}",
        stdout(&out)
    );
    assert_eq!(state(&list()), "open");
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let reply = conn.get("shop", "/").await.unwrap();
    assert_eq!(reply.header("x-sluice-reason"), "breaker-open");
    let out = sluicectl(&["--proxy", &url, "breakers"]);
    let text = stdout(&out);
    assert!(
        text.contains("shop.api") && text.contains("open") && text.contains("held"),
        "{text}"
    );

    let out = sluicectl(&["--proxy", &url, "breakers", "reset", "shop.api", "v1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(state(&list()), "closed");
    assert_eq!(conn.get("shop", "/").await.unwrap().status, StatusCode::OK);

    let out = sluicectl(&["--proxy", &url, "breakers", "reset", "shop.api", "v9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("no such breaker"), "{}", stdout(&out));
    proxy.shutdown().await;
}

/// The same policy in two namespaces: the list tells the breakers apart, a bare route and
/// backend are refused as ambiguous, and `-n` picks one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_of_one_route_in_two_namespaces_are_told_apart() {
    let upstream = Upstream::http1("v1").await;
    let prod = breaker_policy(upstream.addr());
    let staging = prod
        .replace("namespace: e2e", "namespace: staging")
        .replace("host: shop", "host: shop.staging");
    let proxy = TestProxy::start(&format!("{prod}---\n{staging}")).await;
    let url = proxy.admin_addr().to_string();

    let out = sluicectl(&["--proxy", &url, "breakers", "open", "shop.api", "v1"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a usage error: {}",
        stdout(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("several namespaces (e2e, staging)") && err.contains("--namespace"),
        "{err}"
    );

    let out = sluicectl(&[
        "--proxy", &url, "breakers", "open", "shop.api", "v1", "-n", "staging",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = sluicectl(&["--proxy", &url, "breakers", "-o", "json"]);
    let states: Vec<(String, String)> = json(&out)["proxies"][0]["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["namespace"].to_string(), b["state"].to_string()))
        .collect();
    assert_eq!(
        states,
        [
            ("\"e2e\"".into(), "\"closed\"".into()),
            ("\"staging\"".into(), "\"open\"".into())
        ]
    );
    let text = stdout(&sluicectl(&["--proxy", &url, "breakers"]));
    assert!(
        text.contains("e2e/shop.api") && text.contains("staging/shop.api"),
        "{text}"
    );
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    assert_eq!(conn.get("shop", "/").await.unwrap().status, StatusCode::OK);
    let reply = conn.get("shop.staging", "/").await.unwrap();
    assert_eq!(reply.header("x-sluice-reason"), "breaker-open");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_refused_and_malformed_admins_are_one_line_and_exit_3() {
    let upstream = Upstream::http1("not-an-admin").await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "guess").unwrap();
    let proxy = TestProxy::start_with(
        &breaker_policy(upstream.addr()),
        ProxyOptions {
            admin: Some("0.0.0.0:0".parse().unwrap()),
            admin_token_file: Some(token.clone()),
            ..Default::default()
        },
    )
    .await;
    let url = format!("127.0.0.1:{}", proxy.admin_addr().port());
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let cases: [(&[&str], &str); 4] = [
        (
            &["--proxy", &closed, "breakers"],
            "cannot reach the proxy admin",
        ),
        (
            &["--proxy", &url, "breakers"],
            "(401): this admin port is bound beyond loopback: pass its admin token with --token-file",
        ),
        (
            &[
                "--proxy",
                &url,
                "--token-file",
                wrong.to_str().unwrap(),
                "breakers",
            ],
            "(401): the token from --token-file was not accepted",
        ),
        (
            &["--proxy", &upstream.addr().to_string(), "breakers"],
            "answered /breakers with something unexpected",
        ),
    ];
    for (args, says) in cases {
        let out = sluicectl(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(
            err.starts_with("sluicectl: ") && err.contains(says),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = sluicectl(&[
        "--proxy",
        &url,
        "--token-file",
        token.to_str().unwrap(),
        "breakers",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["proxies"][0]["breakers"][0]["route"], "shop.api");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_requests_errors_and_latency_per_route_and_backend() {
    let upstream = Upstream::http1("v1").await;
    let proxy = TestProxy::start(&breaker_policy(upstream.addr())).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for i in 0..20 {
        let path = if i % 4 == 0 { "/status/503" } else { "/" };
        conn.get("shop", path).await.unwrap();
    }
    let url = proxy.admin_addr().to_string();
    let out = sluicectl(&[
        "--proxy",
        &url,
        "top",
        "--once",
        "--interval",
        "100ms",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json(&out);
    let row = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "shop.api" && r["backend"] == "v1")
        .cloned()
        .unwrap_or_else(|| panic!("no shop.api × v1 row: {v}"));
    assert_eq!(row["requests_total"], 20.0);
    assert_eq!(row["errors_total"], 5.0);
    assert_eq!(row["direction"], "outbound");

    let out = sluicectl(&["--proxy", &url, "top", "--once", "--interval", "100ms"]);
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.contains("shop.api"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains(" 20 ") && line.trim_end().ends_with('5'),
        "{line}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_compares_files_with_what_the_control_plane_serves() {
    let cp = TestControlPlane::start(&[("log.yaml", LOG_POLICY)]).await;
    wait_until("the control plane serves a version", WAIT, || async {
        cp.version().is_some()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("log.yaml"), LOG_POLICY).unwrap();
    let cp_url = format!("http://{}", cp.admin_addr());
    let d = dir.path().to_str().unwrap();
    let out = sluicectl(&["--control-plane", &cp_url, "diff", d]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("same     e2e/log"),
        "{}",
        stdout(&out)
    );

    std::fs::write(
        dir.path().join("log.yaml"),
        LOG_POLICY.replace("timeout: 2s", "timeout: 5s"),
    )
    .unwrap();
    let out = sluicectl(&["--control-plane", &cp_url, "diff", d]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("changed  e2e/log"), "{text}");
    assert!(
        text.contains("-    timeout: 5s") && text.contains("+    timeout: 2s"),
        "{text}"
    );

    // Once the control plane takes the edit, they match again.
    cp.write_policy(
        "log.yaml",
        &LOG_POLICY.replace("timeout: 2s", "timeout: 5s"),
    );
    wait_until("the control plane serves the edit", WAIT, || async {
        sluicectl(&["--control-plane", &cp_url, "diff", d])
            .status
            .success()
    })
    .await;
    let out = sluicectl(&["--control-plane", &cp_url, "diff", d, "-o", "json"]);
    assert_eq!(json(&out)["identical"], true);

    // A policy only in the files is missing from what is served: a difference.
    let other = LOG_POLICY
        .replace("name: log,", "name: audit,")
        .replace("host: log", "host: audit");
    std::fs::write(dir.path().join("audit.yaml"), &other).unwrap();
    let out = sluicectl(&["--control-plane", &cp_url, "diff", d]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("missing  e2e/audit: in the files, not served by the control plane"),
        "{}",
        stdout(&out)
    );
    // A policy only served is extra: said, but a difference only with --all (the
    // files may be one team's share of the mesh).
    std::fs::remove_file(dir.path().join("audit.yaml")).unwrap();
    cp.write_policy("audit.yaml", &other);
    wait_until(
        "the control plane serves the second policy",
        WAIT,
        || async {
            stdout(&sluicectl(&["--control-plane", &cp_url, "diff", d])).contains("e2e/audit")
        },
    )
    .await;
    let out = sluicectl(&["--control-plane", &cp_url, "diff", d]);
    assert!(out.status.success(), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("same     e2e/log"), "{text}");
    assert!(
        text.contains(
            "extra    e2e/audit: served by the control plane, not in these files (ignored without --all)"
        ),
        "{text}"
    );
    let out = sluicectl(&["--control-plane", &cp_url, "diff", d, "--all"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out)
            .contains("extra    e2e/audit: served by the control plane, not in these files\n"),
        "{}",
        stdout(&out)
    );
    let out = sluicectl(&["--control-plane", &cp_url, "diff", d, "-o", "json"]);
    let v = json(&out);
    assert_eq!(v["identical"], true, "{v}");
    let states: Vec<(&str, &str)> = v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["policy"].as_str().unwrap(), p["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [("e2e/log", "same"), ("e2e/audit", "only-on-control-plane")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_filters_a_live_proxys_recent_requests_after_the_response() {
    let upstream = Upstream::http1("v1").await;
    let proxy = TestProxy::start_with(
        &breaker_policy(upstream.addr()),
        ProxyOptions {
            recent_requests: 100,
            ..Default::default()
        },
    )
    .await;
    let url = proxy.admin_addr().to_string();
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let secret = [("authorization", "Bearer abc"), ("cookie", "session=1")];
    for _ in 0..6 {
        conn.request(Method::GET, "shop", "/ok?token=q", &secret)
            .await
            .unwrap();
    }
    for _ in 0..3 {
        conn.get("shop", "/status/503").await.unwrap();
    }
    assert!(
        sluicectl(&["--proxy", &url, "breakers", "open", "shop.api", "v1"])
            .status
            .success()
    );
    for _ in 0..2 {
        let r = conn.get("shop", "/refused").await.unwrap();
        assert_eq!(r.header("x-sluice-reason"), "breaker-open");
    }
    conn.get("nobody", "/").await.unwrap();

    let tap = |args: &[&str]| {
        let mut all = vec!["--proxy", url.as_str(), "tap", "-o", "json"];
        all.extend_from_slice(args);
        let out = sluicectl(&all);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        json(&out)["proxies"][0]["requests"]
            .as_array()
            .unwrap()
            .clone()
    };
    assert_eq!(tap(&[]).len(), 12);
    let failed = tap(&["--status", "5xx"]);
    assert_eq!(failed.len(), 5, "{failed:?}");
    let refused = tap(&["--reason", "breaker-open"]);
    assert_eq!(refused.len(), 2);
    assert!(
        refused
            .iter()
            .all(|e| e["status"] == 503 && e["path"] == "/refused")
    );
    let no_route = tap(&["--reason", "no-route"]);
    assert_eq!((no_route.len(), no_route[0]["route"].is_null()), (1, true));
    assert_eq!(
        tap(&["--status", "503", "--route", "shop.api", "--backend", "v1"]).len(),
        5
    );
    assert_eq!(tap(&["--backend", "v2"]).len(), 0);
    assert_eq!(tap(&["--min-latency", "1h"]).len(), 0);
    assert_eq!(tap(&["--limit", "3"]).len(), 3);

    // Secrets: redacted in the ring itself, whatever the command asks.
    let ok = tap(&["--status", "200", "--show-secrets"]);
    assert_eq!(ok.len(), 6);
    let e = &ok[0];
    assert_eq!(e["path"], "/ok", "no query kept");
    assert_eq!(e["requestHeaders"]["authorization"][0], "[redacted]");
    assert_eq!(e["requestHeaders"]["cookie"][0], "[redacted]");
    assert_eq!(e["responseHeaders"]["x-upstream"][0], "v1");

    let out = sluicectl(&["--proxy", &url, "tap", "--reason", "breaker-open"]);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 3, "a title and two rows: {text}");
    assert!(
        text.lines().nth(1).unwrap().contains("breaker-open"),
        "{text}"
    );
    // Nothing matching says so; with --headers each row is followed by its headers,
    // and no table title or "no request matches" comes with them.
    let out = sluicectl(&["--proxy", &url, "tap", "--backend", "v2"]);
    assert_eq!(stdout(&out), "no request matches\n");
    let out = sluicectl(&[
        "--proxy",
        &url,
        "tap",
        "--reason",
        "breaker-open",
        "--headers",
    ]);
    let text = stdout(&out);
    assert!(
        !text.contains("no request matches") && !text.starts_with("TIME"),
        "{text}"
    );
    assert!(
        text.contains("    < x-sluice-reason: breaker-open\n"),
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| !l.starts_with(' ') && l.contains("breaker-open"))
            .count(),
        2,
        "two rows: {text}"
    );

    // A proxy without the ring says so, and tap exits 1; asked for JSON, the notice
    // is not printed (the document says `enabled: false`).
    let plain = TestProxy::start(&breaker_policy(upstream.addr())).await;
    let plain_url = plain.admin_addr().to_string();
    let out = sluicectl(&["--proxy", &plain_url, "tap"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("recent requests are off"),
        "{}",
        stdout(&out)
    );
    let out = sluicectl(&["--proxy", &plain_url, "--proxy", &url, "tap", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "one proxy has the ring");
    let v = json(&out);
    assert_eq!(v["proxies"][0]["enabled"], false, "{v:#}");
    assert_eq!(v["proxies"][1]["enabled"], true, "{v:#}");
    proxy.shutdown().await;
    plain.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_shows_secrets_only_when_the_proxy_kept_them_and_they_are_asked_for() {
    let upstream = Upstream::http1("v1").await;
    let proxy = sluice_e2e::ChildProxy::spawn(
        env!("CARGO_BIN_EXE_e2e-proxy").as_ref(),
        &breaker_policy(upstream.addr()),
        &["--recent-requests", "10", "--recent-requests-secrets"],
    )
    .await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    conn.request(Method::GET, "shop", "/", &[("authorization", "Bearer abc")])
        .await
        .unwrap();
    let url = proxy.admin_addr().to_string();
    let auth = |args: &[&str]| {
        let mut all = vec!["--proxy", url.as_str(), "tap", "-o", "json"];
        all.extend_from_slice(args);
        json(&sluicectl(&all))["proxies"][0]["requests"][0]["requestHeaders"]["authorization"][0]
            .clone()
    };
    assert_eq!(auth(&[]), "[redacted]");
    assert_eq!(auth(&["--show-secrets"]), "Bearer abc");
    let out = sluicectl(&["--proxy", &url, "tap", "--headers"]);
    assert!(
        stdout(&out).contains("> authorization: [redacted]"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_redacts_headers_that_read_like_credentials_and_the_ones_named_at_start() {
    let upstream = Upstream::http1("v1").await;
    let proxy = sluice_e2e::ChildProxy::spawn(
        env!("CARGO_BIN_EXE_e2e-proxy").as_ref(),
        &breaker_policy(upstream.addr()),
        &[
            "--recent-requests",
            "10",
            "--recent-requests-redact",
            "X-Tenant-Pin,x-card",
        ],
    )
    .await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let sent = [
        ("x-api-key", "k-123"),
        ("x-auth-token", "t-456"),
        ("x-tenant-pin", "4242"),
        ("x-card", "4111"),
        ("x-user-id", "alice"),
    ];
    let r = conn.request(Method::GET, "shop", "/", &sent).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let url = proxy.admin_addr().to_string();
    let out = sluicectl(&["--proxy", &url, "tap", "-o", "json", "--show-secrets"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let headers = json(&out)["proxies"][0]["requests"][0]["requestHeaders"].clone();
    for name in ["x-api-key", "x-auth-token", "x-tenant-pin", "x-card"] {
        assert_eq!(headers[name][0], "[redacted]", "{name}: {headers}");
    }
    assert_eq!(headers["x-user-id"][0], "alice");
    let text = stdout(&sluicectl(&["--proxy", &url, "tap", "--headers"]));
    assert!(!text.contains("k-123") && !text.contains("4242"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_status_pause_resume_promote_and_abort_drive_a_live_rollout() {
    use sluice_e2e::rollout::{RolloutMesh, history};
    // Held at its first step by a long interval, so only the commands move it.
    let block = |steps: &str| {
        format!(
            "            canary: v2
            steps: {steps}
            interval: 10m
            minRequests: 1
"
        )
    };
    let mesh = RolloutMesh::start(&block("[10, 50, 100]")).await;
    mesh.wait_canary_everywhere(10).await;
    let cp_url = format!("http://{}", mesh.cp.admin_addr());
    let cp = cp_url.as_str();
    let id = "e2e/log/ingest";

    let out = sluicectl(&["--control-plane", cp, "rollout", "status"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    for part in [id, "v2", "progressing", "1/3 (10%)", "v1 90, v2 10"] {
        assert!(text.contains(part), "{part:?} in\n{text}");
    }
    let out = sluicectl(&["--control-plane", cp, "rollout", "status", id, "-o", "json"]);
    let v = json(&out);
    assert_eq!(v["rollouts"][0]["canaryWeight"], 10, "{v:#}");

    let out = sluicectl(&["--control-plane", cp, "rollout", "pause", id, "-o", "json"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(json(&out)["now"]["phase"], "paused");
    assert_eq!(mesh.rollout().await["phase"], "paused");
    // A second pause is refused by the control plane: an answer of no, exit 1.
    let out = sluicectl(&["--control-plane", cp, "rollout", "pause", id]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("pause refused"), "{}", stdout(&out));

    let out = sluicectl(&["--control-plane", cp, "rollout", "resume", id]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(mesh.rollout().await["phase"], "progressing");
    // In words: what was done, then where the rollout stands now.
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("{id}: resume done: resumed")),
        "{text}"
    );
    assert!(text.contains(&format!("\n{id} (canary ")), "{text}");

    let out = sluicectl(&["--control-plane", cp, "rollout", "promote", id]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    mesh.wait_canary_everywhere(100).await;
    let r = mesh.rollout().await;
    assert_eq!(
        history(&r),
        ["started", "paused", "resumed", "promoted"],
        "{r:#}"
    );
    // Promoted is terminal until the block changes; an unknown rollout is a no too.
    let out = sluicectl(&["--control-plane", cp, "rollout", "abort", id]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let out = sluicectl(&["--control-plane", cp, "rollout", "abort", "e2e/log/nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    // A name that is not <namespace>/<policy>/<route> is a usage error.
    let out = sluicectl(&["--control-plane", cp, "rollout", "abort", "log/ingest"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // A new block starts a new rollout; abort sends the canary back to 0 everywhere.
    mesh.write_policy(&block("[20, 100]"), "");
    mesh.wait_rollout("the new block starts", |r| r["canaryWeight"] == 20)
        .await;
    let out = sluicectl(&["--control-plane", cp, "rollout", "abort", id]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    mesh.wait_canary_everywhere(0).await;
    let out = sluicectl(&["--control-plane", cp, "rollout", "status", "-o", "json"]);
    let v = json(&out);
    let r = &v["rollouts"][0];
    assert_eq!(r["phase"], "rolled-back", "{v:#}");
    assert_eq!(history(r), ["started", "rolled-back"], "{v:#}");
}
