//! `sluicectl` against real proxies, control planes and upstreams: every command, its
//! JSON and its exit codes, and `explain` checked request by request against what a
//! live proxy does.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use hyper::{Method, StatusCode};
use sluice_e2e::{HttpConn, ProxyOptions, TestProxy, Upstream};
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
            if g.next() % 3 == 0 {
                headers.push((name.into(), g.pick(values).into()));
            }
        }
        for name in ["x-user-id", "x-session"] {
            if g.next() % 5 != 0 {
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
