//! What a hostile client or peer can no longer do: admin routes beyond probes and
//! metrics need the token on an admin port bound beyond loopback (proxy and control
//! plane), and an HTTP/2 client that resets each stream once the proxy has forwarded it
//! (paced rapid reset) is cut off with GOAWAY after a bounded number of them.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use http::{Method, Request, StatusCode};
use sluice_e2e::{HttpConn, ProxyOptions, TestProxy, Unsent, Upstream, WAIT, wait_until};
use sluice_proxy::H2Limits;
use tokio::net::TcpStream;

/// `orders` → `upstream`, with a breaker on its one route when `breaker` (the admin
/// test opens it by hand; the reset tests leave it out, as cancelled calls count).
fn policy_with(upstream: SocketAddr, breaker: bool) -> String {
    let breaker = if breaker {
        "\n      circuitBreaker: { consecutiveFailures: 5 }"
    } else {
        ""
    };
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: orders }}
spec:
  host: orders
  backends:
    v1: {{ addresses: ["{upstream}"] }}
  routes:
    - name: all{breaker}
"#
    )
}

fn policy(upstream: SocketAddr) -> String {
    policy_with(upstream, false)
}

async fn status(admin: SocketAddr, method: Method, path: &str, token: Option<&str>) -> u16 {
    let mut conn = HttpConn::h1(admin).await.unwrap();
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("authorization", b)])
        .unwrap_or_default();
    conn.request(method, "admin", path, &headers)
        .await
        .unwrap()
        .status
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_admin_beyond_loopback_serves_only_probes_and_metrics_without_the_token() {
    let upstream = Upstream::http1("v1").await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let proxy = TestProxy::start_with(
        &policy_with(upstream.addr(), true),
        ProxyOptions {
            admin: Some("0.0.0.0:0".parse().unwrap()),
            admin_token_file: Some(token),
            ..Default::default()
        },
    )
    .await;
    // Bound to every address; reached here over loopback, which earns nothing.
    let admin = SocketAddr::from(([127, 0, 0, 1], proxy.admin_addr().port()));
    for path in ["/live", "/ready", "/metrics"] {
        assert_eq!(status(admin, Method::GET, path, None).await, 200, "{path}");
    }
    let guarded = [
        (Method::GET, "/config"),
        (Method::GET, "/breakers"),
        (Method::GET, "/identity"),
        (Method::POST, "/breakers/orders.all/v1/open"),
        (Method::PUT, "/log-level"),
    ];
    for (method, path) in &guarded {
        let got = status(admin, method.clone(), path, None).await;
        assert_eq!(got, 401, "{method} {path} without the token");
        let got = status(admin, method.clone(), path, Some("wrong")).await;
        assert_eq!(got, 401, "{method} {path} with a wrong token");
    }
    assert_eq!(
        status(admin, Method::GET, "/config", Some("t0ken")).await,
        200
    );
    assert_eq!(
        status(
            admin,
            Method::POST,
            "/breakers/orders.all/v1/open",
            Some("t0ken")
        )
        .await,
        200,
        "the token unlocks the mutating routes"
    );

    // Beyond loopback with no token configured: closed, and saying why.
    let open = TestProxy::start_with(
        &policy(upstream.addr()),
        ProxyOptions {
            admin: Some("0.0.0.0:0".parse().unwrap()),
            ..Default::default()
        },
    )
    .await;
    let admin = SocketAddr::from(([127, 0, 0, 1], open.admin_addr().port()));
    assert_eq!(status(admin, Method::GET, "/ready", None).await, 200);
    assert_eq!(status(admin, Method::GET, "/config", None).await, 403);

    // Bound to loopback (the default outside a pod): everything answers, as before.
    let local = TestProxy::start(&policy(upstream.addr())).await;
    assert_eq!(
        status(local.admin_addr(), Method::GET, "/config", None).await,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_admin_token_file_guards_policies_and_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("orders.yaml"),
        policy("127.0.0.1:9".parse().unwrap()),
    )
    .unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "cp-t0ken").unwrap();
    // The flags exactly as an operator gives them.
    let args = sluice_control_plane::Args::parse_from([
        "sluice-control-plane".as_ref(),
        "--policy-dir".as_ref(),
        policies.as_os_str(),
        "--grpc".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--admin".as_ref(),
        "0.0.0.0:0".as_ref(),
        "--admin-token-file".as_ref(),
        token.as_os_str(),
        "--plaintext".as_ref(),
    ]);
    let cp = sluice_control_plane::start(args.to_config().unwrap())
        .await
        .unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], cp.admin_addr().port()));
    wait_until("the control plane is ready", WAIT, || async move {
        status(admin, Method::GET, "/ready", None).await == 200
    })
    .await;
    for path in ["/live", "/metrics"] {
        assert_eq!(status(admin, Method::GET, path, None).await, 200, "{path}");
    }
    for path in ["/policies", "/proxies", "/rollouts"] {
        assert_eq!(status(admin, Method::GET, path, None).await, 401, "{path}");
        assert_eq!(
            status(admin, Method::GET, path, Some("nope")).await,
            401,
            "{path}"
        );
        assert_eq!(
            status(admin, Method::GET, path, Some("cp-t0ken")).await,
            200,
            "{path}"
        );
    }

    // Commands on rollouts too: without the token nothing is looked up.
    let pause = "/rollouts/shop/orders/all/pause";
    assert_eq!(status(admin, Method::POST, pause, None).await, 401);
    assert_eq!(
        status(admin, Method::POST, pause, Some("cp-t0ken")).await,
        404
    );

    // An empty token file is refused at start, not taken as "no token needed".
    std::fs::write(&token, "\n").unwrap();
    let args = sluice_control_plane::Args::parse_from([
        "sluice-control-plane".as_ref(),
        "--policy-dir".as_ref(),
        policies.as_os_str(),
        "--admin-token-file".as_ref(),
        token.as_os_str(),
        "--plaintext".as_ref(),
    ]);
    let err = args.to_config().unwrap_err().to_string();
    assert!(err.contains("admin token file"), "{err}");
}

/// How a paced-reset run on one connection ended.
#[derive(Debug, Default)]
struct Run {
    /// Streams that reached the upstream before the client reset them.
    reset: u32,
    /// Streams the proxy refused (`REFUSED_STREAM` or beyond the GOAWAY) before any route saw them.
    refused: u32,
    /// The error that ended the run: GOAWAY, or the connection closed after it.
    ended: Option<h2::Error>,
}

/// Opens up to `streams` streams on one HTTP/2 connection to `addr`, each a GET of
/// `/hold` (which the upstream never answers); each stream is reset (CANCEL) once
/// `upstream` has seen it, the attack's pacing at its most favourable to the client.
async fn paced_resets(addr: SocketAddr, upstream: &Upstream, streams: u32) -> Run {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut run = Run::default();
    for _ in 0..streams {
        client = match client.ready().await {
            Ok(c) => c,
            Err(e) => {
                run.ended = Some(e);
                break;
            }
        };
        let req = Request::get("http://orders/hold").body(()).unwrap();
        let before = upstream.requests();
        let (mut resp, mut stream) = match client.send_request(req, true) {
            Ok(pair) => pair,
            Err(e) => {
                run.ended = Some(e);
                break;
            }
        };
        let reached = async {
            while upstream.requests() == before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::select! {
            answer = &mut resp => {
                let e = answer.expect_err("the upstream holds /hold: no answer");
                // Refused either by RST_STREAM(REFUSED_STREAM) or, when the GOAWAY
                // overtakes it, by the GOAWAY's last-stream-id (h2 then fails the stream
                // with the GOAWAY's code, NO_ERROR): both say "not processed".
                assert!(
                    e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away(),
                    "{e:?}"
                );
                run.refused += 1;
            }
            () = reached => {
                stream.send_reset(h2::Reason::CANCEL);
                run.reset += 1;
            }
            () = tokio::time::sleep(WAIT) => panic!("stream neither forwarded nor refused"),
        }
    }
    if run.ended.is_none() {
        run.ended = conn.await.unwrap().err();
    }
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_rapid_reset_is_cut_off_with_goaway() {
    let upstream = Upstream::http1("v1").await;
    let limits = H2Limits {
        max_resets: 20,
        reset_interval: Duration::from_secs(3600),
        ..H2Limits::default()
    };
    let proxy = TestProxy::start_with(
        &policy(upstream.addr()),
        ProxyOptions {
            h2_limits: limits,
            ..Default::default()
        },
    )
    .await;
    let run = paced_resets(proxy.outbound_addr(), &upstream, 1000).await;
    // The 21st reset trips the limit; the GOAWAY follows, and streams the client
    // opened before it saw the GOAWAY are refused without reaching the upstream.
    // (A stream or two may be opened while the 21st reset is still being processed.)
    assert!((21..=24).contains(&run.reset), "{run:?}");
    assert_eq!(upstream.requests(), u64::from(run.reset), "{run:?}");
    let ended = run.ended.expect("the connection ended");
    assert!(
        ended.is_go_away() || ended.is_io() || ended.is_remote(),
        "ended by the server: {ended:?}"
    );
    // The proxy itself is fine: a new connection is served.
    let mut fresh = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    let r = fresh.get("orders", "/").await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{} {}",
        r.header("x-sluice-reason"),
        r.text()
    );
}

/// An upstream, and a proxy in front of it holding each HTTP/2 connection to
/// `max_streams` streams.
async fn capped(max_streams: u32) -> (Upstream, TestProxy) {
    let upstream = Upstream::http1("v1").await;
    let options = ProxyOptions {
        h2_limits: H2Limits {
            max_streams,
            ..H2Limits::default()
        },
        ..Default::default()
    };
    let proxy = TestProxy::start_with(&policy(upstream.addr()), options).await;
    (upstream, proxy)
}

/// Many streams at once on one connection: the ones the client opened before the cap's
/// GOAWAY reached it are served, not refused, and the client takes the rest to new
/// connections. No request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_racing_the_cap_are_served() {
    let (upstream, proxy) = capped(50).await;
    let addr = proxy.outbound_addr();
    let first = HttpConn::h2(addr).await.unwrap();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let mut conn = first.try_clone().expect("an HTTP/2 connection");
        clients.spawn(async move {
            let mut moved = 0;
            for _ in 0..20 {
                let reply = match conn.get("orders", "/").await {
                    Err(e) if e.is::<Unsent>() => {
                        moved += 1;
                        conn = HttpConn::h2(addr).await.unwrap();
                        conn.get("orders", "/").await
                    }
                    other => other,
                };
                assert_eq!(reply.expect("no stream refused").status, 200);
            }
            moved
        });
    }
    let mut moved = 0;
    while let Some(m) = clients.join_next().await {
        moved += m.unwrap();
    }
    assert_eq!(upstream.requests(), 400);
    assert!(moved > 0, "the cap closed the first connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_capped_with_goaway() {
    let (upstream, proxy) = capped(5).await;
    // One request at a time: the fifth stream is served and brings the GOAWAY with it,
    // so the client never has a sixth refused; the connection just takes no more, and
    // the next request goes on a new one.
    let mut conn = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    for _ in 0..5 {
        assert_eq!(conn.get("orders", "/").await.unwrap().status, 200);
    }
    let sixth = conn.get("orders", "/").await.unwrap_err();
    assert!(
        sixth.is::<Unsent>(),
        "the connection takes no sixth stream, and says so before sending it: {sixth}"
    );
    assert_eq!(upstream.requests(), 5);
    let mut next = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    assert_eq!(next.get("orders", "/").await.unwrap().status, 200);
    assert_eq!(upstream.requests(), 6);
    // HTTP/1 keep-alive connections are not counted.
    let mut h1 = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for _ in 0..10 {
        assert_eq!(h1.get("orders", "/").await.unwrap().status, 200);
    }
}
