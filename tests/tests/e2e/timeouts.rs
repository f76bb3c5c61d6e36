//! Slow clients: a request body that stops arriving frees its upstream connection
//! after the request body timeout and gets 408, so stalled clients cannot pin
//! upstream connections beyond it; a request head that stalls, or trickles in, gets
//! 408 and a closed connection one header timeout after its first byte, while
//! connections that sent nothing yet (HTTP/1 or HTTP/2) are left to the idle timeout,
//! which closes an idle keep-alive connection and one that never spoke, and which a
//! shutdown does not wait for.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rustls::pki_types::ServerName;
use sluice_e2e::{
    ChildProxy, HttpConn, ProxyOptions, TestControlPlane, TestProxy, Upstream, WAIT, metric_sum,
    read_until_closed, scrape, single_backend_policy, tcp_sink, wait_until,
};
use sluice_proxy::timeouts::Timeouts;
use sluice_proxy::tls::TlsStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SLOW_CLIENTS: usize = 20;

fn with_timeouts(timeouts: Timeouts) -> ProxyOptions {
    ProxyOptions {
        timeouts,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_bodies_free_their_upstream_connections_with_408() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let open = tcp_sink(listener);
    let proxy = TestProxy::start_with(
        &single_backend_policy("slow", "slow", upstream),
        with_timeouts(Timeouts {
            request_body: Duration::from_secs(1),
            ..Timeouts::default()
        }),
    )
    .await;

    // Each client promises 1,000 bytes, sends 2 and stalls.
    let mut clients = Vec::new();
    for _ in 0..SLOW_CLIENTS {
        let mut s = TcpStream::connect(proxy.outbound_addr()).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: slow\r\nContent-Length: 1000\r\n\r\nab")
            .await
            .unwrap();
        clients.push(s);
    }
    // The requests reached the upstream: each holds one of its connections...
    wait_until(
        "every stalled request holds an upstream connection",
        WAIT,
        || std::future::ready(open.load(Ordering::SeqCst) == SLOW_CLIENTS as u64),
    )
    .await;
    // ...until the body timeout frees them all, while the clients still hold theirs.
    wait_until("the upstream connections are freed", WAIT, || {
        std::future::ready(open.load(Ordering::SeqCst) == 0)
    })
    .await;
    for mut s in clients {
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, s.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "closed without an answer");
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(text.starts_with("http/1.1 408"), "{text}");
        assert!(text.contains("x-sluice-reason: request-timeout"), "{text}");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let up = sluice_e2e::Upstream::http1("idle").await;
    let proxy = TestProxy::start_with(
        &single_backend_policy("idle", "idle", up.addr()),
        with_timeouts(Timeouts {
            idle: Duration::from_secs(1),
            ..Timeouts::default()
        }),
    )
    .await;
    // One that never says anything is held to the same timeout before its first byte.
    let mut silent = TcpStream::connect(proxy.outbound_addr()).await.unwrap();
    let mut s = TcpStream::connect(proxy.outbound_addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n")
        .await
        .unwrap();
    // Read the answer, then nothing more comes until the proxy closes the connection.
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the idle connection is closed")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    assert!(
        all.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&all)
    );
    assert_eq!(
        read_until_closed(&mut silent).await,
        "",
        "the silent connection is closed unanswered"
    );
    proxy.shutdown().await;
}

/// A connection that has sent nothing is closed as the proxy shuts down: it has nothing
/// in flight, so the drain does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_does_not_hold_the_drain() {
    let up = Upstream::http1("silent").await;
    let proxy = TestProxy::start_with(
        &single_backend_policy("silent", "silent", up.addr()),
        ProxyOptions {
            // Far beyond `WAIT`: a drain that waited for the silent connection would
            // outlast the test's patience.
            drain_timeout: Duration::from_secs(600),
            ..Default::default()
        },
    )
    .await;
    let mut silent = TcpStream::connect(proxy.outbound_addr()).await.unwrap();
    let mut kept = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    assert_eq!(kept.get("silent", "/").await.unwrap().status, 200);
    tokio::time::timeout(WAIT, proxy.shutdown())
        .await
        .expect("the drain ends without waiting for the silent connection");
    assert_eq!(read_until_closed(&mut silent).await, "");
}

/// The answer to a late head: 408 `request-timeout`, `connection: close`, then the end.
fn assert_head_timeout_answer(answer: &str) {
    let text = answer.to_lowercase();
    assert!(
        text.starts_with("http/1.1 408 request timeout\r\n"),
        "{answer}"
    );
    assert!(
        text.contains("\r\nx-sluice-reason: request-timeout\r\n"),
        "{answer}"
    );
    assert!(text.contains("\r\nconnection: close\r\n"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_trickled_heads_get_408_while_quiet_connections_stay() {
    let up = Upstream::http1("heads").await;
    let header_timeout = Duration::from_millis(300);
    let proxy = TestProxy::start_with(
        &single_backend_policy("heads", "heads", up.addr()),
        with_timeouts(Timeouts {
            request_header: header_timeout,
            ..Timeouts::default()
        }),
    )
    .await;
    let addr = proxy.outbound_addr();

    // Connections that have sent no byte of a head: pre-opened, kept alive after a
    // request, and HTTP/2 after its preface. None is late; each is merely idle.
    let mut quiet = TcpStream::connect(addr).await.unwrap();
    let mut kept = HttpConn::h1(addr).await.unwrap();
    assert_eq!(kept.get("heads", "/first").await.unwrap().status, 200);
    let mut h2 = HttpConn::h2(addr).await.unwrap();

    // A head that stops halfway.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /stalled HTTP/1.1\r\nHost: heads\r\nX-Wait: ")
        .await
        .unwrap();
    // A head trickled one byte every 50 ms: it would take 10 s to complete.
    let head = format!(
        "GET /trickled HTTP/1.1\r\nHost: heads\r\nX-Pad: {}\r\n\r\n",
        "x".repeat(160)
    );
    let total = head.len();
    let trickled = TcpStream::connect(addr).await.unwrap();
    let (mut trickled_rx, mut trickled_tx) = trickled.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for b in head.bytes() {
            tick.tick().await;
            if trickled_tx.write_all(&[b]).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });

    assert_head_timeout_answer(&read_until_closed(&mut stalled).await);
    assert_head_timeout_answer(&read_until_closed(&mut trickled_rx).await);
    let sent = writer.await.unwrap();
    assert!(
        sent < total / 2,
        "cut off after {sent} of {total} bytes, long before the head was complete"
    );
    assert_eq!(up.requests(), 1, "neither late head reached the upstream");

    // By now every quiet connection has waited longer than the header timeout.
    let mut probe = [0u8; 1];
    match quiet.try_read(&mut probe) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the quiet connection was answered or closed: {other:?}"),
    }
    quiet
        .write_all(b"GET /late-but-whole HTTP/1.1\r\nHost: heads\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut quiet).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(kept.get("heads", "/second").await.unwrap().status, 200);
    assert_eq!(h2.get("heads", "/h2").await.unwrap().status, 200);

    let metrics = scrape(proxy.admin_addr()).await;
    let timed_out = metric_sum(
        &metrics,
        "sluice_requests_total",
        &[r#"direction="outbound""#, r#"route="""#, r#"code="408""#],
    );
    assert_eq!(timed_out, 2.0, "{metrics}");
    proxy.shutdown().await;
}

const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";
const LOG: &str = "spiffe://cluster.local/ns/shop/sa/log";

/// A control plane whose CA certifies the log and order workloads.
async fn log_ca() -> TestControlPlane {
    TestControlPlane::start_with_ca(
        &[],
        &[("tok-log", "shop", "log"), ("tok-order", "shop", "order")],
        Duration::from_secs(600),
    )
    .await
}

/// The log service's policy as its own sidecar's inbound side reads it: only the order
/// identity may call.
fn log_inbound_policy() -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: log-service, namespace: shop }}
spec:
  host: log-service
  backends:
    log: {{ addresses: ["127.0.0.1:9"] }}
  routes:
    - name: all
  inbound:
    allow: ["{ORDER}"]
"#
    )
}

/// An mTLS session to the log sidecar's inbound `addr`, as the order workload.
async fn as_order(
    cp: &TestControlPlane,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let order = TlsStore::new(cp.certify("tok-order").await).unwrap();
    let config = order.client_config_for(Some(LOG), &[b"http/1.1"]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("log.mesh.invalid").unwrap(), tcp)
        .await
        .expect("the mTLS handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_head_over_mtls_gets_408_inside_the_tls_session() {
    let app = Upstream::http1("log-app").await;
    let cp = log_ca().await;
    let policy = log_inbound_policy();
    let log = TestProxy::start_with(
        &policy,
        ProxyOptions {
            outbound: false,
            inbound: true,
            app: Some(app.addr()),
            service: Some("log-service".into()),
            mtls: Some(cp.mesh_tls("tok-log")),
            timeouts: Timeouts {
                request_header: Duration::from_millis(300),
                ..Timeouts::default()
            },
            ..Default::default()
        },
    )
    .await;

    let mut tls = as_order(&cp, log.inbound_addr()).await;
    tls.write_all(b"GET /hello HTTP/1.1\r\nHost: log-service\r\n")
        .await
        .unwrap();
    assert_head_timeout_answer(&read_until_closed(&mut tls).await);
    assert_eq!(app.requests(), 0);

    let metrics = scrape(log.admin_addr()).await;
    let timed_out = metric_sum(
        &metrics,
        "sluice_requests_total",
        &[
            r#"direction="inbound""#,
            r#"code="408""#,
            &format!(r#"peer_identity="{ORDER}""#),
        ],
    );
    assert_eq!(timed_out, 1.0, "{metrics}");
    log.shutdown().await;
}

/// Reads one HTTP/1 response with a `content-length` from `s`; returns its head and body.
async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = all.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&all[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if all.len() >= end + 4 + len {
                return String::from_utf8_lossy(&all).into_owned();
            }
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("a response")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&all)
        );
        all.extend_from_slice(&buf[..n]);
    }
}

/// A plaintext HTTP/1 keep-alive connection that goes quiet between requests is parked
/// (the server's per-connection state and buffers dropped until its next byte) and
/// serves its next request on the same connection; so does one whose next head had
/// begun when it went quiet, which is not parked but kept as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_keep_alive_connection_is_parked_and_serves_its_next_request() {
    let up = Upstream::http1("parked").await;
    let mut proxy = ChildProxy::spawn(
        env!("CARGO_BIN_EXE_e2e-proxy").as_ref(),
        &single_backend_policy("parked", "parked", up.addr()),
        &["--log-level", "debug"],
    )
    .await;
    let mut s = TcpStream::connect(proxy.outbound_addr()).await.unwrap();
    parks_between_requests(&mut s, &proxy, "parked").await;
    assert_eq!(up.requests(), 3);

    proxy.sigterm();
    assert!(proxy.wait_exit(WAIT).await.success(), "{}", proxy.log());
}

/// On one kept-alive connection `s` to `proxy` (logging at debug) for `host`: two
/// requests, each answered and then parked in the quiet after it (the second woken from
/// the park), then half a head and quiet, which is kept rather than parked, and its end,
/// which is answered.
async fn parks_between_requests<S>(s: &mut S, proxy: &ChildProxy, host: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let parked = |log: &str| log.matches("parked an idle connection").count();
    for (n, path) in [(1, "/a"), (2, "/b")] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let answer = read_response(s).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        wait_until("the quiet connection is parked", WAIT, || async {
            parked(&proxy.log()) >= n
        })
        .await;
    }
    s.write_all(b"GET /c HTTP/1.1\r\nHo").await.unwrap();
    wait_until("the begun head is kept, not parked", WAIT, || async {
        proxy
            .log()
            .contains("not parking a connection whose next head has begun")
    })
    .await;
    s.write_all(format!("st: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let third = read_response(s).await;
    assert!(third.starts_with("HTTP/1.1 200"), "{third}");
}

/// An mTLS connection that goes quiet between requests is parked as a plaintext one is,
/// when rustls holds nothing decrypted and nothing to send: the next request, decrypted
/// from the same session, is served, and a head begun before the quiet is finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_mtls_connection_is_parked_and_serves_its_next_request() {
    let app = Upstream::http1("log-app").await;
    let cp = log_ca().await;
    let policy = log_inbound_policy();
    let mesh = cp.mesh_tls("tok-log");
    let app_addr = app.addr().to_string();
    let (trust_root, token_file) = (
        mesh.trust_root.to_string_lossy().into_owned(),
        mesh.token_file.to_string_lossy().into_owned(),
    );
    let mut proxy = ChildProxy::spawn_inbound(
        env!("CARGO_BIN_EXE_e2e-proxy").as_ref(),
        &policy,
        &[
            "--app",
            &app_addr,
            "--service",
            "log-service",
            "--trust-root",
            &trust_root,
            "--identity-token-file",
            &token_file,
            "--identity-url",
            &mesh.identity_url,
            "--log-level",
            "debug",
        ],
    )
    .await;
    let mut tls = as_order(&cp, proxy.inbound_addr().expect("an inbound listener")).await;
    parks_between_requests(&mut tls, &proxy, "log-service").await;
    assert_eq!(app.requests(), 3);

    proxy.sigterm();
    assert!(proxy.wait_exit(WAIT).await.success(), "{}", proxy.log());
}

/// A connection upgraded to another protocol has no more HTTP/1 heads: its bytes, sent
/// over several request-header timeouts, are the tunnel's, never a head running late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_outlives_the_request_header_timeout() {
    let up = Upstream::http1("feeds").await;
    let policy = single_backend_policy("feeds", "feeds", up.addr()).replace(
        "    - name: all\n",
        "    - name: all\n      upgrades: [websocket]\n",
    );
    let proxy = TestProxy::start_with(
        &policy,
        with_timeouts(Timeouts {
            request_header: Duration::from_millis(300),
            ..Timeouts::default()
        }),
    )
    .await;
    let mut tunnel = TcpStream::connect(proxy.outbound_addr()).await.unwrap();
    tunnel
        .write_all(
            b"GET /upgrade/ws HTTP/1.1\r\nHost: feeds\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tunnel.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // A message every 100 ms for a second: over three header timeouts.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..10u8 {
        tick.tick().await;
        let msg = [b'm', b'0' + i];
        tunnel.write_all(&msg).await.unwrap();
        let mut back = [0u8; 2];
        tunnel.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg, "message {i} came back as {back:?}");
    }
    proxy.shutdown().await;
}

/// A policy `up` for host `uploads` whose `upload` route (POST `/sink`) retries on
/// timeouts with `per_try` per try and `total` in all, behind a breaker that opens on
/// the first failure of any class, and whose `witness` route (`/hold`) times out after
/// `witness`: a request there answered 504 proves that much time has passed in the proxy.
fn upload_policy(upstream: SocketAddr, per_try: &str, total: &str, witness: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: up, namespace: e2e }}
spec:
  host: uploads
  backends:
    store: {{ addresses: ["{upstream}"] }}
  routes:
    - name: upload
      match: {{ path: {{ prefix: /sink }}, method: POST }}
      timeout: {total}
      retry: {{ attempts: 2, on: [timeout, reset, gateway-error], perTryTimeout: {per_try},
               nonIdempotent: true, backoff: {{ base: 1ms, max: 2ms }} }}
      circuitBreaker: {{ consecutiveFailures: 1, openFor: 60s, failureOn: [connect-failure, timeout, 5xx] }}
    - name: witness
      match: {{ path: {{ prefix: /hold }} }}
      timeout: {witness}
"#
    )
}

/// Opens a POST of `len` bytes to `/sink` on `uploads` and sends its first `first`.
async fn begin_upload(proxy: SocketAddr, len: usize, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!("POST /sink HTTP/1.1\r\nHost: uploads\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(first).await.unwrap();
    s
}

/// The state of breaker `route` × `backend` in the proxy's `/breakers`.
async fn breaker_state(proxy: &TestProxy, route: &str, backend: &str) -> String {
    let all = proxy.admin_json("/breakers").await;
    let list = all
        .as_array()
        .cloned()
        .or_else(|| all["breakers"].as_array().cloned())
        .unwrap_or_default();
    list.iter()
        .find(|b| b["route"] == route && b["backend"] == backend)
        .map(|b| b["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no breaker {route}/{backend} in {all}"))
}

/// A client that pauses its upload longer than the route's per-try and total timeouts
/// (but within the request body timeout) is waited for: those timers start once the
/// body is in, so the pause is neither retried nor charged to the upstream, and the
/// upload is answered by the upstream once it is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_upload_is_not_timed_against_the_upstream() {
    let up = Upstream::http1("store").await;
    let proxy = TestProxy::start(&upload_policy(up.addr(), "200ms", "400ms", "600ms")).await;
    let mut upload = begin_upload(proxy.outbound_addr(), 10, b"hello").await;
    wait_until("the upload reached the upstream", WAIT, || {
        std::future::ready(up.requests() == 1)
    })
    .await;
    // The witness times out 600 ms after it went: by then the upload has paused past
    // its per-try (200 ms) and total (400 ms) timeouts.
    let mut witness = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let w = witness.get("uploads", "/hold").await.unwrap();
    assert_eq!(w.status, 504, "{w:?}");
    upload.write_all(b"world").await.unwrap();
    let answer = read_response(&mut upload).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_lowercase().contains("x-body-bytes: 10"),
        "{answer}"
    );
    assert_eq!(up.requests(), 2, "the upload went once, and the witness");

    let metrics = scrape(proxy.admin_addr()).await;
    let route = r#"route="up.upload""#;
    assert_eq!(
        metric_sum(&metrics, "sluice_retries_total", &[route]),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "sluice_requests_total",
            &[route, r#"backend="store""#, r#"code="200""#]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(breaker_state(&proxy, "up.upload", "store").await, "closed");
    proxy.shutdown().await;
}

/// A client that stalls its upload past the request body timeout gets 408: the stall is
/// its own, so it is not retried, not counted against the backend and leaves the
/// backend's breaker closed, however short the route's per-try timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_the_clients_outcome_not_the_upstreams() {
    let up = Upstream::http1("store").await;
    let proxy = TestProxy::start_with(
        &upload_policy(up.addr(), "100ms", "200ms", "1s"),
        with_timeouts(Timeouts {
            request_body: Duration::from_millis(500),
            ..Timeouts::default()
        }),
    )
    .await;
    let mut upload = begin_upload(proxy.outbound_addr(), 10, b"hello").await;
    let answer = read_response(&mut upload).await.to_lowercase();
    assert!(answer.starts_with("http/1.1 408"), "{answer}");
    assert!(
        answer.contains("x-sluice-reason: request-timeout"),
        "{answer}"
    );
    assert_eq!(up.requests(), 1, "not retried");

    let metrics = scrape(proxy.admin_addr()).await;
    let route = r#"route="up.upload""#;
    assert_eq!(
        metric_sum(
            &metrics,
            "sluice_requests_total",
            &[route, r#"backend="""#, r#"code="408""#]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "sluice_requests_total",
            &[route, r#"backend="store""#]
        ),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "sluice_retries_total", &[route]),
        0.0,
        "{metrics}"
    );
    assert_eq!(breaker_state(&proxy, "up.upload", "store").await, "closed");
    proxy.shutdown().await;
}

/// A policy `fb` for host `quote` whose route `main` sends to a `primary` backend with
/// a `cache` fallback on timeouts, within a route `timeout` of 400 ms; `retry` is the
/// route's retry line, if any.
fn fallback_policy(primary: SocketAddr, cache: SocketAddr, retry: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: fb, namespace: e2e }}
spec:
  host: quote
  backends:
    primary: {{ addresses: ["{primary}"] }}
    cache: {{ addresses: ["{cache}"] }}
  routes:
    - name: main
      timeout: 400ms
{retry}      fallback: {{ on: [timeout], backend: cache }}
"#
    )
}

/// The total timeout of a route with a fallback is counted against the backend being
/// tried when it ran out: the primary while the primary is tried, the fallback backend
/// once the request went there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_with_a_fallback_names_the_backend_it_cut_off() {
    let primary = Upstream::auto("primary").await;
    let cache = Upstream::auto("cache").await;
    primary.set_stall(sluice_e2e::Stall::Hang);
    cache.set_stall(sluice_e2e::Stall::Hang);

    // No per-try timeout: the primary holds the request until the route's time is up.
    let proxy = TestProxy::start(&fallback_policy(primary.addr(), cache.addr(), "")).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let r = conn.get("quote", "/quote/1").await.unwrap();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("x-sluice-reason"), "timeout");
    assert_eq!(cache.requests(), 0, "a total timeout does not fall back");
    let metrics = scrape(proxy.admin_addr()).await;
    let main = r#"route="fb.main""#;
    let timed_out = |backend: &str| {
        metric_sum(
            &metrics,
            "sluice_requests_total",
            &[main, &format!(r#"backend="{backend}""#), r#"code="504""#],
        )
    };
    assert_eq!(timed_out("primary"), 1.0, "{metrics}");
    assert_eq!(timed_out(""), 0.0, "{metrics}");
    proxy.shutdown().await;

    // A per-try timeout sends it to the cache, which holds it until the route's time is up.
    let retry = "      retry: { attempts: 0, perTryTimeout: 100ms }\n";
    let proxy = TestProxy::start(&fallback_policy(primary.addr(), cache.addr(), retry)).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let r = conn.get("quote", "/quote/2").await.unwrap();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(cache.requests(), 1);
    let metrics = scrape(proxy.admin_addr()).await;
    let timed_out = |backend: &str| {
        metric_sum(
            &metrics,
            "sluice_requests_total",
            &[main, &format!(r#"backend="{backend}""#), r#"code="504""#],
        )
    };
    assert_eq!(timed_out("cache"), 1.0, "{metrics}");
    assert_eq!(timed_out("primary") + timed_out(""), 0.0, "{metrics}");
    primary.set_stall(sluice_e2e::Stall::None);
    cache.set_stall(sluice_e2e::Stall::None);
    proxy.shutdown().await;
}

/// An HTTP/1 upstream that answers `/stall` with a head promising 100 bytes, sends 10
/// and goes silent, holding the connection; anything else gets a whole `ok`. Returns
/// its address and a count of `/stall` connections the proxy has closed.
async fn stalling_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    if !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    if head.starts_with(b"GET /stall") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                            .await;
                        // Silent from here; the proxy closing its end is what ends this.
                        let _ = s.read(&mut buf).await;
                        closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    head.clear();
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    (addr, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_the_upstream_stalls_is_cut_off_and_both_connections_freed() {
    // A proxy that cuts a response body off after 300 ms of silence.
    let cutting = |upstream| async move {
        let policy = single_backend_policy("stall", "stall", upstream);
        let cut = Timeouts {
            response_body: Duration::from_millis(300),
            ..Timeouts::default()
        };
        TestProxy::start_with(&policy, with_timeouts(cut)).await
    };
    let (upstream, closed) = stalling_upstream().await;
    let proxy = cutting(upstream).await;

    // HTTP/1: the head and the first bytes arrive, then the connection is closed short
    // of the promised length, so the client knows the body is cut.
    let mut s = TcpStream::connect(proxy.outbound_addr()).await.unwrap();
    s.write_all(b"GET /stall HTTP/1.1\r\nHost: stall\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
    assert!(got.ends_with("\r\n\r\n0123456789"), "{got}");
    wait_until("the upstream connection is closed", WAIT, || {
        std::future::ready(closed.load(Ordering::SeqCst) == 1)
    })
    .await;
    let text = scrape(proxy.admin_addr()).await;
    let cut_off = "sluice_response_body_timeouts_total";
    assert_eq!(metric_sum(&text, cut_off, &["direction=\"outbound\""]), 1.0);
    proxy.shutdown().await;

    // HTTP/2 end to end: the client's stream is reset, the upstream's stream is
    // cancelled, and the connection serves the next request.
    let (upstream, closed) = stalling_h2_upstream().await;
    let proxy = cutting(upstream).await;
    let mut conn = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    let cut = conn.get("stall", "/stall").await;
    assert!(cut.is_err(), "{cut:?}");
    let next = conn.get("stall", "/ok").await.unwrap();
    assert_eq!(next.status, 200);
    wait_until("the upstream stream is cancelled", WAIT, || {
        std::future::ready(closed.load(Ordering::SeqCst) == 1)
    })
    .await;
    let text = scrape(proxy.admin_addr()).await;
    assert_eq!(metric_sum(&text, cut_off, &["direction=\"outbound\""]), 1.0);
    // The head went out as a 200: the cut is counted apart, not as a second outcome.
    assert_eq!(
        metric_sum(&text, "sluice_requests_total", &["code=\"200\""]),
        2.0
    );
    proxy.shutdown().await;
}

/// [`stalling_upstream`] over HTTP/2 (prior knowledge): `/stall` gets a head and 10
/// bytes of a promised 100, then nothing; the count is of `/stall` streams the proxy
/// has reset.
async fn stalling_h2_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = closed.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let closed = seen.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let closed = closed.clone();
                    tokio::spawn(async move {
                        if req.uri().path() != "/stall" {
                            let head = http::Response::builder()
                                .header("content-length", "2")
                                .body(())
                                .unwrap();
                            if let Ok(mut body) = respond.send_response(head, false) {
                                let _ = body.send_data(bytes::Bytes::from_static(b"ok"), true);
                            }
                            return;
                        }
                        let head = http::Response::builder()
                            .header("content-length", "100")
                            .body(())
                            .unwrap();
                        let Ok(mut body) = respond.send_response(head, false) else {
                            return;
                        };
                        let _ = body.send_data(bytes::Bytes::from_static(b"0123456789"), false);
                        if std::future::poll_fn(|cx| body.poll_reset(cx)).await.is_ok() {
                            closed.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                }
            });
        }
    });
    (addr, closed)
}
