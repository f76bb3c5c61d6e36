//! The one authority rule for HTTP/1 `Host` and HTTP/2 `:authority`, and the targets a
//! governed host refuses, over real connections: several `Host` lines, none, an
//! absolute-form target against a different `Host`, `Connection: host`, `CONNECT`, `*`,
//! and HTTP/2 with both, either or neither of `:authority` and `Host`. Requests are
//! written by hyper's client connections exactly as given (no `Host` added, none merged).

use bytes::Bytes;
use http::{Method, Request, Version};
use sluice_e2e::{HttpConn, ProxyOptions, Reply, TestProxy, Upstream, full_body};

/// `orders` and `evil`, each to its own upstream, so a reply says which host routed it.
fn policy(orders: &Upstream, evil: &Upstream) -> String {
    let one = |name: &str, up: &Upstream| sluice_e2e::single_backend_policy(name, name, up.addr());
    format!("{}---\n{}", one("orders", orders), one("evil", evil))
}

async fn call(conn: &mut HttpConn, req: http::request::Builder) -> Reply {
    conn.call(req.body(full_body(Bytes::new())).unwrap())
        .await
        .expect("an answer")
}

fn get(target: &str) -> http::request::Builder {
    Request::builder().uri(target)
}

/// Status, `x-sluice-reason` (or `x-upstream` when an upstream answered) and the host the
/// upstream saw.
fn verdict(r: &Reply) -> (u16, String, String) {
    let by = if r.headers.contains_key("x-sluice-reason") {
        r.header("x-sluice-reason")
    } else {
        r.header("x-upstream")
    };
    (
        r.status.as_u16(),
        by.to_owned(),
        r.header("x-seen-host").to_owned(),
    )
}

fn expect(r: &Reply, status: u16, by: &str, seen_host: &str, case: &str) {
    let (s, b, h) = verdict(r);
    assert_eq!(
        (s, b.as_str(), h.as_str()),
        (status, by, seen_host),
        "{case}: {}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_host_rules() {
    let orders = Upstream::http1("orders").await;
    let evil = Upstream::http1("evil").await;
    let proxy = TestProxy::start(&policy(&orders, &evil)).await;
    let addr = proxy.outbound_addr();
    let mut conn = HttpConn::h1(addr).await.unwrap();

    let r = call(&mut conn, get("/x").header("host", "orders")).await;
    expect(&r, 200, "orders", "orders", "one Host");
    assert_eq!(r.header("x-seen-target"), "/x", "origin form stays");

    // Several Host lines: refused, whichever is first, even when they agree.
    for hosts in [["orders", "evil"], ["evil", "orders"], ["orders", "orders"]] {
        let mut conn = HttpConn::h1(addr).await.unwrap();
        let r = call(
            &mut conn,
            get("/x").header("host", hosts[0]).header("host", hosts[1]),
        )
        .await;
        expect(&r, 400, "bad-request", "", &format!("Host {hosts:?}"));
        assert_eq!(r.text(), "several Host headers\n");
    }

    // No Host: 400 bad-request (HTTP/1.1 and HTTP/1.0 alike).
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = call(&mut conn, get("/x")).await;
    expect(&r, 400, "bad-request", "", "no Host");
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = call(&mut conn, get("/x").version(Version::HTTP_10)).await;
    expect(&r, 400, "bad-request", "", "HTTP/1.0 without Host");

    // Absolute-form: the target's authority routes and replaces a different Host, so
    // the upstream never sees the other one.
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = call(&mut conn, get("http://orders/x").header("host", "evil")).await;
    expect(
        &r,
        200,
        "orders",
        "orders",
        "absolute-form against Host: evil",
    );
    // The upstream is an origin server: it gets the origin form (RFC 9112 §3.2.1).
    assert_eq!(
        r.header("x-seen-target"),
        "/x",
        "absolute-form goes on as origin form"
    );
    let r = call(&mut conn, get("http://evil:80/x").header("host", "orders")).await;
    expect(
        &r,
        200,
        "evil",
        "evil:80",
        "absolute-form against Host: orders",
    );
    // Authority form is CONNECT's alone: a GET written with one is refused, not read as
    // a request for host `orders` (it used to reach it, path `/`).
    for target in ["orders", "orders:80"] {
        let mut conn = HttpConn::h1(addr).await.unwrap();
        let r = call(&mut conn, get(target).header("host", "evil")).await;
        expect(&r, 400, "bad-request", "", &format!("GET {target}"));
        assert_eq!(r.text(), "an authority-form target is for CONNECT only\n");
    }
    // HTTP/1.0 may leave Host out; the target's authority is then written in.
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = call(
        &mut conn,
        get("http://orders/x?q=1").version(Version::HTTP_10),
    )
    .await;
    expect(&r, 200, "orders", "orders", "HTTP/1.0 absolute-form");
    assert_eq!(
        r.header("x-seen-target"),
        "/x?q=1",
        "HTTP/1.0 absolute-form"
    );
    // HTTP/1.1 may not (RFC 9112 §3.2).
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = call(&mut conn, get("http://orders/x")).await;
    expect(
        &r,
        400,
        "bad-request",
        "",
        "HTTP/1.1 absolute-form without Host",
    );

    // A Host (or target) that is not host[:port].
    for bad in ["user@orders", "orders:http"] {
        let mut conn = HttpConn::h1(addr).await.unwrap();
        let r = call(&mut conn, get("/x").header("host", bad)).await;
        expect(&r, 400, "bad-request", "", bad);
    }
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = call(
        &mut conn,
        get("http://user@orders/x").header("host", "orders"),
    )
    .await;
    expect(&r, 400, "bad-request", "", "userinfo in the target");

    // Connection cannot name Host away (the upstream client would otherwise write the
    // endpoint's address in its place).
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = call(
        &mut conn,
        get("/x")
            .header("host", "orders")
            .header("connection", "host, x-private")
            .header("x-private", "1"),
    )
    .await;
    expect(&r, 200, "orders", "orders", "Connection: host");

    // CONNECT to a governed host: 405 with Allow; to an unknown one, 404 as any.
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let connect = Request::builder()
        .method(Method::CONNECT)
        .uri("orders:443")
        .header("host", "orders:443");
    let r = call(&mut conn, connect).await;
    expect(&r, 405, "method-not-allowed", "", "CONNECT orders");
    assert!(!r.header("allow").contains("CONNECT"), "{:?}", r.headers);
    assert!(r.header("allow").contains("GET"), "{:?}", r.headers);
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let connect = Request::builder()
        .method(Method::CONNECT)
        .uri("elsewhere:443")
        .header("host", "elsewhere:443");
    let r = call(&mut conn, connect).await;
    expect(&r, 404, "no-route", "", "CONNECT elsewhere");

    // `*`: OPTIONS * to a governed host is 400; any other method with * is 400 anywhere.
    let options = |host: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("*")
            .header("host", host)
    };
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = call(&mut conn, options("orders")).await;
    expect(&r, 400, "bad-request", "", "OPTIONS * orders");
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = call(&mut conn, options("elsewhere")).await;
    expect(&r, 404, "no-route", "", "OPTIONS * elsewhere");
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = call(&mut conn, get("*").header("host", "elsewhere")).await;
    expect(&r, 400, "bad-request", "", "GET *");

    // None of the refused requests reached an upstream.
    assert_eq!(
        orders.requests(),
        4,
        "orders saw only the accepted requests"
    );
    assert_eq!(
        evil.requests(),
        1,
        "evil saw only its absolute-form request"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_follows_the_same_rule() {
    let orders = Upstream::h2("orders").await;
    let evil = Upstream::h2("evil").await;
    let proxy = TestProxy::start(&policy(&orders, &evil)).await;
    let addr = proxy.outbound_addr();
    // The upstream sees the routed authority as :authority, and no Host beside it.
    let mut conn = HttpConn::h2(addr).await.unwrap();

    let r = call(&mut conn, get("http://orders/x")).await;
    expect(&r, 200, "orders", "orders", ":authority only");

    // :authority wins over a different Host, which is dropped.
    let r = call(&mut conn, get("http://orders/x").header("host", "evil")).await;
    expect(&r, 200, "orders", "orders", ":authority against Host: evil");
    let r = call(&mut conn, get("http://evil/x").header("host", "orders")).await;
    expect(&r, 200, "evil", "evil", ":authority against Host: orders");

    // Host alone names the authority, as :authority would.
    let r = call(&mut conn, get("/x").header("host", "orders")).await;
    expect(&r, 200, "orders", "orders", "Host without :authority");

    // Neither: 400 bad-request. Several Host lines: 400, even beside :authority.
    let r = call(&mut conn, get("/x")).await;
    expect(&r, 400, "bad-request", "", "neither :authority nor Host");
    let r = call(
        &mut conn,
        get("http://orders/x")
            .header("host", "orders")
            .header("host", "evil"),
    )
    .await;
    expect(&r, 400, "bad-request", "", ":authority and two Hosts");
    let r = call(&mut conn, get("/x").header("host", "user@orders")).await;
    expect(&r, 400, "bad-request", "", "Host with userinfo");

    // CONNECT and OPTIONS * as over HTTP/1.
    let r = call(
        &mut conn,
        Request::builder().method(Method::CONNECT).uri("orders:443"),
    )
    .await;
    expect(&r, 405, "method-not-allowed", "", "h2 CONNECT orders");
    let r = call(
        &mut conn,
        Request::builder()
            .method(Method::OPTIONS)
            .uri("*")
            .header("host", "orders"),
    )
    .await;
    expect(&r, 400, "bad-request", "", "h2 OPTIONS * orders");

    assert_eq!(orders.requests(), 3);
    assert_eq!(evil.requests(), 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_listener_applies_the_rule_too() {
    let app = Upstream::http1("app").await;
    let proxy = TestProxy::start_with(
        &sluice_e2e::single_backend_policy("orders", "orders", app.addr()),
        ProxyOptions {
            inbound: true,
            app: Some(app.addr()),
            service: Some("orders".into()),
            ..Default::default()
        },
    )
    .await;
    let addr = proxy.inbound_addr();
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = call(&mut conn, get("http://orders/x").header("host", "evil")).await;
    expect(&r, 200, "app", "orders", "absolute-form inbound");
    for (case, req) in [
        (
            "two Hosts",
            get("/x").header("host", "orders").header("host", "evil"),
        ),
        ("no Host", get("/x")),
        (
            "CONNECT",
            Request::builder()
                .method(Method::CONNECT)
                .uri("orders:443")
                .header("host", "orders:443"),
        ),
    ] {
        let mut conn = HttpConn::h1(addr).await.unwrap();
        let r = call(&mut conn, req).await;
        let want = if case == "CONNECT" {
            (405, "method-not-allowed")
        } else {
            (400, "bad-request")
        };
        expect(&r, want.0, want.1, "", case);
    }
    assert_eq!(app.requests(), 1);
    proxy.shutdown().await;
}
