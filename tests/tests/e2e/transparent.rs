//! Transparent mode over real iptables redirects, in network namespaces: the building
//! blocks (original destination, sniff, passthrough), then the real proxy binary running
//! under its own UID with its outbound listener intercepting an unchanged client.
//! Needs root, `ip`, `iptables` and `setpriv`; without them the tests fail and say which
//! is missing.
//!
//! The test binary re-runs itself inside a fresh namespace (`ip netns exec`) to run an
//! `*_in_namespace` test, which is ignored when run directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_e2e::netns::{self, Killed, Netns, PROXY_UID};
use sluice_e2e::{
    HttpConn, Protocol as UpstreamProtocol, Upstream, WAIT, metric_sum, scrape, tcp_coded,
    tcp_echo, wait_until,
};
use sluice_proxy::metrics::Metrics;
use sluice_proxy::transparent::{Protocol, original_dst, passthrough, sniff};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[test]
fn redirected_connections_keep_their_destination_and_pass_through() {
    let ns = Netns::new("sluice-transparent", &["iptables", "setpriv"]);
    ns.run_test("transparent::in_namespace");
}

#[tokio::test]
#[ignore = "run inside a network namespace by redirected_connections_keep_their_destination_and_pass_through"]
async fn in_namespace() {
    netns::assert_in_namespace();
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = proxy.local_addr().unwrap().port().to_string();
    // Only port 80 is redirected, so the passthrough's own connection is not.
    netns::must_line(&format!(
        "iptables -w -t nat -A OUTPUT -p tcp -d 127.0.0.1 --dport 80 -j REDIRECT --to-ports {port}"
    ));

    // An upstream that echoes everything it reads.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tcp_echo(upstream, None);
    let app_target: SocketAddr = "127.0.0.1:80".parse().unwrap();

    // HTTP/1 is recognised; the sniffed bytes reach the upstream first.
    let mut client = TcpStream::connect(app_target).await.unwrap();
    let (mut accepted, _) = proxy.accept().await.unwrap();
    assert_eq!(original_dst(&accepted).unwrap(), app_target);
    let request = b"GET /x HTTP/1.1\r\nhost: orders\r\n\r\n";
    client.write_all(request).await.unwrap();
    let (proto, prefix) = sniff(&mut accepted, Duration::from_secs(5)).await.unwrap();
    assert_eq!(proto, Protocol::Http1);
    let metrics = Metrics::new().unwrap();
    let tcp = Arc::new(metrics.tcp("outbound"));
    let relay = tokio::spawn({
        let tcp = tcp.clone();
        async move { passthrough(accepted, &prefix, upstream_addr, &tcp).await }
    });
    let mut echoed = vec![0; request.len()];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, request);
    drop(client);
    relay.await.unwrap().unwrap();

    // Not HTTP (a TLS ClientHello's first bytes): opaque, passed through untouched.
    let mut client = TcpStream::connect(app_target).await.unwrap();
    let (mut accepted, _) = proxy.accept().await.unwrap();
    let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
    client.write_all(&hello).await.unwrap();
    let (proto, prefix) = sniff(&mut accepted, Duration::from_secs(5)).await.unwrap();
    assert_eq!(proto, Protocol::Opaque);
    let relay = tokio::spawn({
        let tcp = tcp.clone();
        async move { passthrough(accepted, &prefix, upstream_addr, &tcp).await }
    });
    let mut echoed = [0; 10];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, hello);
    drop(client);
    relay.await.unwrap().unwrap();
    // Both connections counted: every byte each way, the sniffed ones included.
    let bytes = (request.len() + hello.len()) as u64;
    assert_eq!((tcp.sent.get(), tcp.received.get()), (bytes, bytes));
    assert_eq!((tcp.passthrough.get(), tcp.open.get()), (2, 0));

    // A server-first client sends nothing: opaque once the sniff stops waiting.
    let _client = TcpStream::connect(app_target).await.unwrap();
    let (mut accepted, _) = proxy.accept().await.unwrap();
    let (proto, prefix) = sniff(&mut accepted, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!((proto, prefix.len()), (Protocol::Opaque, 0));
}

// === the outbound listener in transparent mode ===

const BIN: &str = env!("CARGO_BIN_EXE_e2e-proxy");

#[test]
fn outbound_listener_routes_governed_http_and_passes_everything_else_through() {
    let ns = Netns::new("sluice-outbound", &["iptables", "setpriv"]);
    ns.run_test("transparent::outbound_in_namespace");
}

/// An HTTP/1.1 and h2c server on `addr` answering with `x-upstream: NAME`.
async fn http_server(addr: &str, name: &'static str) -> Upstream {
    Upstream::start_on(name, UpstreamProtocol::Auto, addr.parse().unwrap()).await
}

/// A server that records the exact bytes of one request head and answers `ok`.
async fn recorder(addr: &str) -> tokio::sync::oneshot::Receiver<Vec<u8>> {
    let listener = TcpListener::bind(addr).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the head ended");
            seen.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .await
            .unwrap();
        let _ = tx.send(seen);
    });
    rx
}

/// An echo server on `addr`; with `banner`, it speaks first (as MySQL or SMTP servers do).
async fn echo_server(addr: &str, banner: Option<&'static [u8]>) {
    tcp_echo(TcpListener::bind(addr).await.unwrap(), banner);
}

/// A reply's status, `x-upstream`, `x-sluice-reason`, and what the upstream saw:
/// `NAME HOST PATH`.
#[derive(Debug)]
struct Reply {
    status: u16,
    upstream: String,
    reason: String,
    seen: String,
}

async fn get(conn: &mut HttpConn, host: &str, path: &str) -> Reply {
    let r = conn
        .get(host, path)
        .await
        .expect("the keep-alive connection stays open");
    Reply {
        status: r.status.as_u16(),
        upstream: r.header("x-upstream").to_owned(),
        reason: r.header("x-sluice-reason").to_owned(),
        seen: format!(
            "{} {} {}",
            r.header("x-upstream"),
            r.header("x-seen-host"),
            r.header("x-seen-path")
        ),
    }
}

async fn h1(addr: &str) -> HttpConn {
    HttpConn::h1(addr.parse().unwrap()).await.unwrap()
}

/// Starts the real binary as UID 1337 with `policy`, outbound on 15001 and admin on 15000.
async fn proxy_as_own_uid(dir: &std::path::Path, policy: &str) -> Killed {
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let args = [
        "--outbound",
        "127.0.0.1:15001",
        "--admin",
        "127.0.0.1:15000",
        "--log-level",
        "sluice_proxy=debug,info",
    ];
    netns::sidecar(BIN.as_ref(), dir, "proxy", policy, &args, admin).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run inside a network namespace by outbound_listener_routes_governed_http_and_passes_everything_else_through"]
async fn outbound_in_namespace() {
    netns::assert_in_namespace();
    // "Remote" addresses of this namespace; everything the test process (root) sends
    // there is redirected to the proxy, which runs as its own UID and is exempt.
    for cmd in [
        "ip addr add 10.55.0.2/24 dev lo",
        "ip addr add 10.55.0.3/32 dev lo",
        "ip addr add 10.55.0.4/32 dev lo",
        "ip addr add 10.55.0.5/32 dev lo",
        &format!(
            "iptables -w -t nat -A OUTPUT -p tcp -d 10.55.0.0/24 -m owner ! --uid-owner {PROXY_UID} -j REDIRECT --to-ports 15001"
        ),
    ] {
        netns::must_line(cmd);
    }
    let _external = http_server("10.55.0.2:80", "external").await;
    let _orders = http_server("10.55.0.3:8080", "orders-v1").await;
    echo_server("10.55.0.2:7", None).await;
    echo_server("10.55.0.2:25", Some(b"220 ready\r\n")).await;
    let recorded = recorder("10.55.0.4:80").await;
    let coded = tcp_coded(TcpListener::bind("10.55.0.5:80").await.unwrap());

    let dir = tempfile::tempdir().unwrap();
    let _proxy = proxy_as_own_uid(
        dir.path(),
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: orders }
spec:
  host: orders
  backends:
    v1: { addresses: ["10.55.0.3:8080"] }
  routes:
    - name: api
      match: { path: { prefix: /api } }
      rateLimit: { perSecond: 1, burst: 3 }
"#,
    )
    .await;

    // The application calls what it always called; a governed host goes to its policy's
    // backend, not to the address the application dialled, and its rate limit applies.
    let mut conn = h1("10.55.0.2:80").await;
    let r = get(&mut conn, "orders", "/api/x").await;
    assert_eq!((r.status, r.upstream.as_str()), (200, "orders-v1"), "{r:?}");
    let mut limited = None;
    for _ in 0..20 {
        let r = get(&mut conn, "orders", "/api/x").await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let limited = limited.expect("the route's rate limit refuses within 20 requests");
    assert_eq!(limited.reason, "rate-limited");
    // A governed host with no matching route: the policy owns the host, so 404.
    let r = get(&mut conn, "orders", "/other").await;
    assert_eq!((r.status, r.reason.as_str()), (404, "no-route"));
    // Any method opens a governed connection, not only the common ones: a PURGE as the
    // first request is served by the proxy (its route's limit, spent above, or the
    // policy's backend once a token is back), not passed through to the address dialled.
    let mut purge = h1("10.55.0.2:80").await;
    let r = purge
        .call(
            http::Request::builder()
                .method("PURGE")
                .uri("/api/x")
                .header("host", "orders")
                .body(sluice_e2e::full_body(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let governed = match r.status.as_u16() {
        429 => r.header("x-sluice-reason") == "rate-limited",
        _ => r.header("x-upstream") == "orders-v1",
    };
    assert!(governed, "{r:?}");
    // The same keep-alive connection naming a host no policy claims: sent on, ungoverned,
    // to where the application addressed it.
    let r = get(&mut conn, "example.com", "/x").await;
    assert_eq!(
        (r.status, r.seen.as_str()),
        (200, "external example.com /x"),
        "{r:?}"
    );
    // An upgrade to a host no policy claims, on a connection already serving governed
    // requests: the upstream's 101 comes back and the tunnel carries bytes both ways.
    let mut tunnelled = h1("10.55.0.2:80").await;
    get(&mut tunnelled, "orders", "/other").await;
    let offer = http::Request::builder()
        .uri("/upgrade/t")
        .header("host", "example.com")
        .header("upgrade", "foo/1")
        .header("connection", "upgrade")
        .body(sluice_e2e::full_body(bytes::Bytes::new()))
        .unwrap();
    let mut resp = tunnelled.send(offer).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["upgrade"], "foo/1");
    let io = hyper::upgrade::on(&mut resp).await.expect("switched");
    let mut io = hyper_util::rt::TokioIo::new(io);
    io.write_all(b"bytes of another protocol").await.unwrap();
    let mut back = [0u8; 25];
    io.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"bytes of another protocol");
    // An answer the proxy cannot hand on is refused on this path too: a body coded
    // besides chunked is a 502, whether or not the request offered an upgrade (a
    // declined offer is an ordinary answer, not a tunnel).
    let mut coded_conn = h1("10.55.0.5:80").await;
    get(&mut coded_conn, "orders", "/other").await;
    let r = coded_conn.get("example.com", "/gzip").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.header("x-sluice-reason")),
        (502, "upstream-unavailable"),
        "{}",
        r.text()
    );
    let mut coded_conn = h1("10.55.0.5:80").await;
    get(&mut coded_conn, "orders", "/other").await;
    let offer = http::Request::builder()
        .uri("/gzip")
        .header("host", "example.com")
        .header("upgrade", "foo/1")
        .header("connection", "upgrade")
        .body(sluice_e2e::full_body(bytes::Bytes::new()))
        .unwrap();
    let r = coded_conn.call(offer).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.header("x-sluice-reason")),
        (502, "upstream-unavailable"),
        "{}",
        r.text()
    );
    let r = coded_conn.get("example.com", "/plain").await.unwrap();
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hello"[..]));
    assert_eq!(coded.load(std::sync::atomic::Ordering::SeqCst), 3);
    // One naming no host at all is none of the mesh's business either; one naming two
    // is refused, as everywhere (which of them would route it?).
    let bare = |hosts: &[&str]| {
        let mut b = http::Request::builder().uri("/bare");
        for h in hosts {
            b = b.header("host", *h);
        }
        b.body(sluice_e2e::full_body(bytes::Bytes::new())).unwrap()
    };
    let r = conn.call(bare(&[])).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.header("x-upstream")),
        (200, "external")
    );
    let r = conn.call(bare(&["example.com", "orders"])).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.header("x-sluice-reason")),
        (400, "bad-request")
    );
    // Also as the first request of a connection: the sniff does not pass it through.
    let mut fresh = h1("10.55.0.2:80").await;
    let r = fresh.call(bare(&["example.com", "orders"])).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.header("x-sluice-reason")),
        (400, "bad-request")
    );

    // A first request to a host no policy claims: the connection passes through byte for
    // byte (header case, order and spacing intact).
    let head = b"GET /raw HTTP/1.1\r\nHost: Example.COM\r\nX-Mixed-Case:  kept \r\nconnection: close\r\n\r\n";
    let mut raw = TcpStream::connect("10.55.0.4:80").await.unwrap();
    raw.write_all(head).await.unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.ends_with(b"\r\n\r\nok"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(recorded.await.unwrap(), head.to_vec());

    // HTTP/2 with prior knowledge: decided per request.
    let mut h2 = HttpConn::h2("10.55.0.2:80".parse().unwrap()).await.unwrap();
    let r = get(&mut h2, "orders", "/api/h2").await;
    assert!(
        (r.status == 200 && r.upstream == "orders-v1") || r.reason == "rate-limited",
        "{r:?}"
    );
    let r = get(&mut h2, "example.com", "/h2").await;
    assert_eq!((r.status, r.upstream.as_str()), (200, "external"), "{r:?}");

    // Not HTTP: raw bytes echo back unchanged, including a TLS-looking first record.
    let mut echo = TcpStream::connect("10.55.0.2:7").await.unwrap();
    let payload: Vec<u8> = [0x16, 0x03, 0x01, 0x00, 0x05]
        .into_iter()
        .chain((0..=255u8).cycle().take(100_000))
        .collect();
    let (mut r, mut w) = echo.split();
    let (_, back) = tokio::join!(
        async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        },
        async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            back
        }
    );
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");

    // A server-first protocol: the client waits, the sniff gives up, the banner arrives.
    let mut smtp = TcpStream::connect("10.55.0.2:25").await.unwrap();
    let mut banner = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(10), smtp.read_exact(&mut banner))
        .await
        .expect("the banner passes through")
        .unwrap();
    assert_eq!(&banner, b"220 ready\r\n");

    // Explicit mode is unchanged: a direct connection to the listener is routed by host,
    // and an unknown host is 404 no-route (there is no original destination).
    let mut direct = h1("127.0.0.1:15001").await;
    let r = get(&mut direct, "example.com", "/x").await;
    assert_eq!((r.status, r.reason.as_str()), (404, "no-route"));
    let r = get(&mut direct, "orders", "/other").await;
    assert_eq!((r.status, r.reason.as_str()), (404, "no-route"));

    // A destination nothing listens on: the client's connection is closed.
    let mut nobody = TcpStream::connect("10.55.0.2:9").await.unwrap();
    nobody.write_all(b"\x00ping").await.unwrap();
    let mut rest = Vec::new();
    let _ = nobody.read_to_end(&mut rest).await;
    assert!(rest.is_empty());

    // The passed-through connections in the proxy's metrics: the echo's bytes each way,
    // the connection that found nobody, the SMTP session still open.
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let echoed = payload.len() as f64;
    wait_until(
        "the proxy counts its passed-through connections",
        WAIT,
        || async move {
            let text = scrape(admin).await;
            let out = "direction=\"outbound\"";
            let m = |family: &str, label: &str| metric_sum(&text, family, &[out, label]);
            m("sluice_tcp_connections_total", "outcome=\"passthrough\"") >= 1.0
                && m("sluice_tcp_connections_total", "outcome=\"connect_error\"") == 1.0
                && m("sluice_tcp_bytes_total", "flow=\"sent\"") >= echoed
                && m("sluice_tcp_bytes_total", "flow=\"received\"") >= echoed
                && m("sluice_tcp_open_connections", "") >= 1.0
        },
    )
    .await;
    drop(smtp);
}
