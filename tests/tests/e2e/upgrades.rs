//! HTTP/1.1 upgrades: only `websocket` and the protocols a route's `upgrades` lists are
//! tunnelled. An `h2c` offer is dropped, so the connection stays HTTP/1.1 and every later
//! request on it is routed and governed; a listed protocol is tunnelled; and a tunnel
//! passes the route's rate limit once, however much flows through it.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use hyper_util::rt::TokioIo;
use sluice_e2e::ws::WsEchoServer;
use sluice_e2e::{HttpConn, TestProxy, Upstream, full_body, metric_sum, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Host `feeds` to `upstream`: `/live` lists `upgrades` (when given), everything else
/// has none; both share a rate limit of `burst` with a refill of one a second.
fn policy(upstream: std::net::SocketAddr, upgrades: &str, burst: u32) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: feeds }}
spec:
  host: feeds
  backends:
    v1: {{ addresses: ["{upstream}"] }}
  routes:
    - name: live
      match: {{ path: {{ prefix: /upgrade/live }} }}
      rateLimit: {{ perSecond: 1, burst: {burst} }}{upgrades}
    - name: all
      rateLimit: {{ perSecond: 1, burst: {burst} }}
"#
    )
}

/// An upgrade request offering `protocol`, as `curl --http2` (h2c) or a WebSocket
/// client writes it.
fn offer(path: &str, protocol: &str) -> Request<sluice_e2e::ReqBody> {
    let mut b = Request::builder()
        .uri(path)
        .header("host", "feeds")
        .header("upgrade", protocol);
    b = if protocol == "h2c" {
        b.header("connection", "Upgrade, HTTP2-Settings")
            .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
    } else {
        b.header("connection", "upgrade")
    };
    b.body(full_body(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_offer_is_dropped_and_the_connection_stays_governed() {
    // The upstream switches to whatever it is offered, as the one that carried 20
    // requests past a rate limit did.
    let up = Upstream::http1("feeds").await;
    let proxy = TestProxy::start(&policy(up.addr(), "", 3)).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let r = conn.call(offer("/upgrade/x", "h2c")).await.unwrap();
    assert_eq!(r.status, 200, "answered as HTTP/1.1: {:?}", r.headers);
    assert_eq!(r.header("x-upstream"), "feeds");
    assert_eq!(r.header("x-seen-upgrade"), "", "the offer never reached it");
    assert_eq!(r.header("x-seen-http2-settings"), "");
    // The same connection carries on as HTTP/1.1, each request through the rate limit:
    // the offer took one of the 3 tokens, so at most 2 of 6 more pass.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = conn.get("feeds", "/upgrade/x").await.unwrap();
        statuses.push(r.status.as_u16());
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        limited >= 3,
        "rate limit holds on the connection: {statuses:?}"
    );
    assert_eq!(up.requests() as usize, 1 + statuses.len() - limited);

    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_the_route_lists_is_tunnelled_and_others_are_not() {
    let up = Upstream::http1("feeds").await;
    let proxy = TestProxy::start(&policy(up.addr(), "\n      upgrades: [h2c]", 50)).await;
    let addr = proxy.outbound_addr();

    // `/upgrade/live` lists h2c: the upstream's 101 comes through and the tunnel carries
    // bytes both ways.
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let mut resp = conn.send(offer("/upgrade/live", "h2c")).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["upgrade"], "h2c");
    let io = hyper::upgrade::on(&mut resp).await.expect("switched");
    let mut io = TokioIo::new(io);
    io.write_all(b"bytes of another protocol").await.unwrap();
    let mut back = [0u8; 25];
    io.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"bytes of another protocol");

    // The other route lists nothing: the same offer is dropped there.
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = conn.call(offer("/upgrade/other", "h2c")).await.unwrap();
    assert_eq!((r.status.as_u16(), r.header("x-seen-upgrade")), (200, ""));

    // Nor is any other protocol the route does not list.
    let r = conn.call(offer("/upgrade/other", "foo/1")).await.unwrap();
    assert_eq!((r.status.as_u16(), r.header("x-seen-upgrade")), (200, ""));

    // An offer of several keeps only what the route allows.
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let resp = conn.send(offer("/upgrade/live", "foo, h2c")).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["upgrade"], "h2c", "foo was never offered on");

    // An upstream switching to a protocol that was not offered gets no tunnel.
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = conn
        .call(offer("/upgrade/live/to/foo", "h2c"))
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.header("x-sluice-reason")),
        (502, "upstream-unavailable"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("not offered"), "{}", r.text());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_tunnel_passes_the_route_governance_once() {
    let server = WsEchoServer::start().await;
    let policy = format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: ws }}
spec:
  host: ws-echo
  backends:
    v1: {{ addresses: ["{}"] }}
  routes:
    - name: chat
      rateLimit: {{ perSecond: 1, burst: 2 }}
      circuitBreaker: {{ consecutiveFailures: 1 }}
"#,
        server.addr()
    );
    let proxy = TestProxy::start(&policy).await;
    let open = || async {
        let stream = TcpStream::connect(proxy.outbound_addr()).await.unwrap();
        let req = "ws://ws-echo/chat".into_client_request().unwrap();
        tokio_tungstenite::client_async(req, stream).await
    };
    // Two upgrades take the two tokens; a third, at once, is refused 429.
    let mut first = open().await.expect("first upgrade").0;
    let mut second = open().await.expect("second upgrade").0;
    match open().await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 429);
            assert_eq!(resp.headers()["x-sluice-reason"], "rate-limited");
        }
        other => panic!("third upgrade not rate limited: {:?}", other.map(|r| r.1)),
    }
    // Hundreds of frames through the open tunnels take no token and no breaker slot.
    for i in 0..200 {
        for ws in [&mut first, &mut second] {
            let text = format!("frame {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
        }
    }
    let text = scrape(proxy.admin_addr()).await;
    let route = r#"route="ws.chat""#;
    let decisions = |d: &str| {
        metric_sum(
            &text,
            "sluice_ratelimit_decisions_total",
            &[route, &format!(r#"decision="{d}""#)],
        )
    };
    assert_eq!(
        (decisions("allowed"), decisions("limited")),
        (2.0, 1.0),
        "{text}"
    );
    let requests = |code: &str| {
        metric_sum(
            &text,
            "sluice_requests_total",
            &[route, &format!(r#"code="{code}""#)],
        )
    };
    assert_eq!((requests("101"), requests("429")), (2.0, 1.0), "{text}");
    let breakers = proxy.admin_json("/breakers").await;
    assert_eq!(breakers[0]["state"], "closed", "{breakers}");
    first.close(None).await.unwrap();
    second.close(None).await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_takes_the_upgrades_its_own_policy_lists() {
    let app = Upstream::http1("app").await;
    // The app's own policy lists h2c on one route: its inbound sidecar lets h2c through
    // to the app (callers' sidecars have decided per route already), and nothing else.
    let proxy = TestProxy::start_with(
        &policy(app.addr(), "\n      upgrades: [h2c]", 50),
        sluice_e2e::ProxyOptions {
            inbound: true,
            app: Some(app.addr()),
            service: Some("feeds".into()),
            ..Default::default()
        },
    )
    .await;
    let mut conn = HttpConn::h1(proxy.inbound_addr()).await.unwrap();
    let resp = conn.send(offer("/upgrade/any", "h2c")).await.unwrap();
    assert_eq!(resp.status(), 101);
    let mut conn = HttpConn::h1(proxy.inbound_addr()).await.unwrap();
    let r = conn.call(offer("/upgrade/any", "foo")).await.unwrap();
    assert_eq!((r.status.as_u16(), r.header("x-seen-upgrade")), (200, ""));
    proxy.shutdown().await;
}
