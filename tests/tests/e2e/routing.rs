//! Routing by host, path, method and header, with Gateway API precedence.

use std::collections::HashMap;

use hyper::{Method, StatusCode};
use sluice_e2e::{HttpConn, TestProxy, Upstream};

/// Upstreams named after the route that should reach them.
const NAMES: [&str; 8] = [
    "api",
    "users",
    "users-post",
    "users-gold",
    "login",
    "fallback",
    "beta",
    "canary",
];

/// One host with routes written in the file in an order that disagrees with their
/// precedence, so only precedence can pick the expected one.
fn policy(up: &HashMap<&str, Upstream>, dead: std::net::SocketAddr) -> String {
    let b = |n: &str| up[n].addr();
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: alpha, namespace: e2e }}
spec:
  host: alpha
  backends:
    api: {{ addresses: ["{api}"] }}
    users: {{ addresses: ["{users}"] }}
    users-post: {{ addresses: ["{users_post}"] }}
    users-gold: {{ addresses: ["{users_gold}"] }}
    login: {{ addresses: ["{login}"] }}
    fallback: {{ addresses: ["{fallback}"] }}
  routes:
    - name: fallback
      match: {{ path: {{ prefix: / }} }}
      split: [ {{ backend: fallback }} ]
    - name: api
      match: {{ path: {{ prefix: /api }} }}
      split: [ {{ backend: api }} ]
    - name: users
      match: {{ path: {{ prefix: /api/users }} }}
      split: [ {{ backend: users }} ]
    - name: users-post
      match: {{ path: {{ prefix: /api/users }}, method: POST }}
      split: [ {{ backend: users-post }} ]
    - name: users-gold
      match: {{ path: {{ prefix: /api/users }}, method: POST, headers: {{ x-tier: gold }} }}
      split: [ {{ backend: users-gold }} ]
    - name: login
      match: {{ path: {{ exact: /api/login }} }}
      split: [ {{ backend: login }} ]
---
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: beta, namespace: e2e }}
spec:
  host: beta
  backends:
    beta: {{ addresses: ["{beta}"] }}
  routes:
    - name: all
---
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: canary, namespace: e2e }}
spec:
  host: canary
  backends:
    stable: {{ addresses: ["{fallback}"] }}
    canary: {{ addresses: ["{canary}"] }}
  routes:
    - name: all
      split:
        - when: {{ headers: {{ x-canary: "true" }} }}
          backend: canary
        - backend: stable
---
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: dead, namespace: e2e }}
spec:
  host: dead
  backends:
    gone: {{ addresses: ["{dead}"] }}
  routes:
    - name: all
"#,
        api = b("api"),
        users = b("users"),
        users_post = b("users-post"),
        users_gold = b("users-gold"),
        login = b("login"),
        fallback = b("fallback"),
        beta = b("beta"),
        canary = b("canary"),
    )
}

/// method, host, path, extra headers, the upstream that must answer
type Case<'a> = (Method, &'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

async fn check_routes(conn: &mut HttpConn) {
    let cases: &[Case<'_>] = &[
        // exact beats every prefix, though written last
        (Method::GET, "alpha", "/api/login", &[], "login"),
        // the longer prefix beats the shorter one
        (Method::GET, "alpha", "/api/users", &[], "users"),
        (Method::GET, "alpha", "/api/users/42", &[], "users"),
        (Method::GET, "alpha", "/api/orders", &[], "api"),
        // prefixes match whole segments: /apix is not under /api
        (Method::GET, "alpha", "/apix", &[], "fallback"),
        (Method::GET, "alpha", "/api/login/again", &[], "api"),
        // same path: a method match beats none, more header matches beat fewer
        (Method::POST, "alpha", "/api/users", &[], "users-post"),
        (
            Method::POST,
            "alpha",
            "/api/users",
            &[("x-tier", "gold")],
            "users-gold",
        ),
        (
            Method::POST,
            "alpha",
            "/api/users",
            &[("x-tier", "silver")],
            "users-post",
        ),
        (
            Method::GET,
            "alpha",
            "/api/users",
            &[("x-tier", "gold")],
            "users",
        ),
        // host decides the policy
        (Method::GET, "beta", "/api/login", &[], "beta"),
        // a header split rule before the default backend
        (
            Method::GET,
            "canary",
            "/",
            &[("x-canary", "true")],
            "canary",
        ),
        (
            Method::GET,
            "canary",
            "/",
            &[("x-canary", "false")],
            "fallback",
        ),
        (Method::GET, "canary", "/", &[], "fallback"),
        // a repeated header matches on any of its values, for a route and a split alike
        (
            Method::POST,
            "alpha",
            "/api/users",
            &[("x-tier", "silver"), ("x-tier", "gold")],
            "users-gold",
        ),
        (
            Method::GET,
            "canary",
            "/",
            &[("x-canary", "false"), ("x-canary", "true")],
            "canary",
        ),
    ];
    for (method, host, path, headers, want) in cases {
        let reply = conn
            .request(method.clone(), host, path, headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {host}{path}: {e}"));
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{method} {host}{path} {headers:?}: {reply:?}"
        );
        assert_eq!(
            reply.header("x-upstream"),
            *want,
            "{method} {host}{path} {headers:?} went to the wrong upstream"
        );
        assert_eq!(reply.header("x-seen-path"), *path, "path passed unchanged");
        assert_eq!(reply.header("x-seen-method"), method.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_path_method_and_header_with_precedence() {
    let mut up = HashMap::new();
    for n in NAMES {
        up.insert(n, Upstream::auto(n).await);
    }
    let dead = sluice_e2e::closed_port().await;
    let proxy = TestProxy::start(&policy(&up, dead)).await;

    let mut h1 = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    check_routes(&mut h1).await;
    let mut h2 = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    check_routes(&mut h2).await;

    // The Host header's port is not part of the host.
    let reply = h1.get("beta:8080", "/x").await.unwrap();
    assert_eq!(reply.header("x-upstream"), "beta", "{reply:?}");

    // HTTP/1 in stays HTTP/1 upstream, h2 in goes out as h2.
    let reply = h1.get("beta", "/v").await.unwrap();
    assert_eq!(reply.header("x-seen-version"), "HTTP/1.1");
    let reply = h2.get("beta", "/v").await.unwrap();
    assert_eq!(reply.header("x-seen-version"), "HTTP/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_is_404_no_route_and_refused_upstream_is_502() {
    let mut up = HashMap::new();
    for n in NAMES {
        up.insert(n, Upstream::auto(n).await);
    }
    let dead = sluice_e2e::closed_port().await;
    let proxy = TestProxy::start(&policy(&up, dead)).await;

    for (first, mut conn) in [
        (true, HttpConn::h1(proxy.outbound_addr()).await.unwrap()),
        (false, HttpConn::h2(proxy.outbound_addr()).await.unwrap()),
    ] {
        let reply = conn.get("nowhere.example", "/").await.unwrap();
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{reply:?}");
        assert_eq!(reply.header("x-sluice-reason"), "no-route");

        // The first call to a refusing endpoint is 502; once the balancer has ejected
        // that endpoint, calls may instead fail fast as 503 no-healthy-endpoint.
        let reply = conn.get("dead", "/").await.unwrap();
        let got = (reply.status, reply.header("x-sluice-reason"));
        let refused = (StatusCode::BAD_GATEWAY, "upstream-unavailable");
        let ejected = (StatusCode::SERVICE_UNAVAILABLE, "no-healthy-endpoint");
        assert!(got == refused || (!first && got == ejected), "{reply:?}");

        // the connection still works after synthetic answers
        let reply = conn.get("beta", "/").await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
    }

    // The admin API reports the traffic.
    let (status, metrics) = proxy.admin_get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains("sluice_requests_total"),
        "metrics lack sluice_requests_total:\n{metrics}"
    );
    assert_eq!(proxy.admin_get("/live").await.0, StatusCode::OK);
    assert_eq!(proxy.admin_get("/ready").await.0, StatusCode::OK);
}

/// A path with dot-segments is routed as the path it resolves to, and goes upstream
/// that way, over both protocols: `/open/../guarded` is governed by the `/guarded`
/// route (here a 1-per-second limit), not by the `/open` route its text starts with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_resolved_before_routing() {
    let open = Upstream::auto("open").await;
    let guarded = Upstream::auto("guarded").await;
    let policy = format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: dots, namespace: e2e }}
spec:
  host: dots
  backends:
    open: {{ addresses: ["{}"] }}
    guarded: {{ addresses: ["{}"] }}
  routes:
    - name: open
      match: {{ path: {{ prefix: /open }} }}
      split: [{{ backend: open }}]
    - name: guarded
      match: {{ path: {{ prefix: /guarded }} }}
      rateLimit: {{ perSecond: 1, burst: 1 }}
      split: [{{ backend: guarded }}]
"#,
        open.addr(),
        guarded.addr()
    );
    let proxy = TestProxy::start(&policy).await;
    let mut h1 = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let mut h2 = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    let r = h1.get("dots", "/open/../guarded/x?q=1").await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.header("x-upstream"), "guarded");
    assert_eq!(r.header("x-seen-target"), "/guarded/x?q=1");
    // The bucket is spent: every other spelling lands on the same limit.
    for (conn, path) in [
        (&mut h1, "/open/%2e%2e/guarded"),
        (&mut h2, "/open/.%2E/guarded/./y"),
    ] {
        let r = conn.get("dots", path).await.unwrap();
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{path}: {r:?}");
        assert_eq!(r.header("x-sluice-reason"), "rate-limited");
    }
    let r = h2.get("dots", "/open/a/../b").await.unwrap();
    assert_eq!(r.header("x-upstream"), "open");
    assert_eq!(r.header("x-seen-path"), "/open/b");
    assert_eq!(guarded.requests(), 1);
}

/// Policies of one name in two namespaces (side by side once the set is sorted) each
/// send their host's requests to their own backends, even when the backends' names agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_of_one_name_in_two_namespaces_keep_their_own_backends() {
    let shop = Upstream::auto("shop").await;
    let staging = Upstream::auto("staging").await;
    // Both name their one backend `only`.
    let doc = |ns: &str, up: &Upstream| {
        sluice_e2e::single_backend_policy("orders", &format!("orders.{ns}"), up.addr())
            .replace("namespace: e2e", &format!("namespace: {ns}"))
    };
    let policy = format!("{}---\n{}", doc("shop", &shop), doc("staging", &staging));
    let proxy = TestProxy::start(&policy).await;
    let mut h1 = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let mut h2 = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    for conn in [&mut h1, &mut h2] {
        for ns in ["shop", "staging"] {
            let r = conn.get(&format!("orders.{ns}"), "/").await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{ns}: {r:?}");
            assert_eq!(r.header("x-upstream"), ns, "{r:?}");
        }
    }
    assert_eq!((shop.requests(), staging.requests()), (2, 2));
}

/// Requests one after another reuse one upstream connection, over HTTP/1.1 and HTTP/2:
/// a connection goes back to its pool when its response has been read.
// One thread: upstream connections are pooled per thread, as each worker's are.
#[tokio::test(flavor = "current_thread")]
async fn upstream_connections_are_reused_one_request_after_another() {
    for protocol in [sluice_e2e::Protocol::Http1, sluice_e2e::Protocol::Http2] {
        let up = Upstream::start("pooled", protocol).await;
        let policy = sluice_e2e::single_backend_policy("pooled", "pooled", up.addr());
        let proxy = TestProxy::start(&policy).await;
        let mut conn = match protocol {
            sluice_e2e::Protocol::Http2 => HttpConn::h2(proxy.outbound_addr()).await,
            _ => HttpConn::h1(proxy.outbound_addr()).await,
        }
        .unwrap();
        for i in 0..5 {
            let r = conn.get("pooled", "/").await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{protocol:?} {i}: {r:?}");
        }
        assert_eq!(up.requests(), 5, "{protocol:?}");
        assert_eq!(up.connections(), 1, "{protocol:?}");
    }
}
