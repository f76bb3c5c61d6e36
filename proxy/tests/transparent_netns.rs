//! Transparent mode over real iptables redirects, in network namespaces: the building
//! blocks (original destination, sniff, passthrough), then the real proxy binary running
//! under its own UID with its outbound listener intercepting an unchanged client.
//! Needs root, `ip`, `iptables` and `setpriv`; without them the tests fail and say which
//! is missing.
//!
//! Each test binary re-runs itself inside a fresh namespace (`ip netns exec`) to run an
//! `*_in_namespace` test, which is ignored when run directly.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sluice_proxy::transparent::{Protocol, original_dst, passthrough, sniff};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHILD_ENV: &str = "SLUICE_TRANSPARENT_NETNS_CHILD";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (install iproute2 and iptables)"))
}

/// A network namespace, deleted when dropped (also when an assertion fails).
struct Netns(String);

impl Netns {
    fn new(prefix: &str) -> Self {
        let uid = run("id", &["-u"]);
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "this test must run as root (it creates a network namespace)"
        );
        for tool in ["ip", "iptables", "setpriv"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "{tool} is missing: apt-get install iptables iproute2 util-linux"
            );
        }
        let ns = Netns(format!("{prefix}-{}", std::process::id()));
        let out = run("ip", &["netns", "add", &ns.0]);
        assert!(
            out.status.success(),
            "ip netns add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns
    }

    /// Runs the ignored test `name` of this binary inside the namespace; it must pass.
    fn run_child(&self, name: &str) {
        let exe = std::env::current_exe().unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .arg(exe)
            .args(["--exact", name, "--ignored", "--nocapture"])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "in the namespace:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

#[test]
fn redirected_connections_keep_their_destination_and_pass_through() {
    let ns = Netns::new("sluice-transparent");
    ns.run_child("in_namespace");
}

#[tokio::test]
#[ignore = "run inside a network namespace by redirected_connections_keep_their_destination_and_pass_through"]
async fn in_namespace() {
    assert!(
        std::env::var_os(CHILD_ENV).is_some(),
        "run by the namespace test only"
    );
    assert!(run("ip", &["link", "set", "lo", "up"]).status.success());
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = proxy.local_addr().unwrap().port().to_string();
    // Only port 80 is redirected, so the passthrough's own connection is not.
    let out = run(
        "iptables",
        &[
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "127.0.0.1",
            "--dport",
            "80",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An upstream that echoes everything it reads.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let app_target: SocketAddr = "127.0.0.1:80".parse().unwrap();

    // HTTP/1 is recognised; the sniffed bytes reach the upstream first.
    let mut client = TcpStream::connect(app_target).await.unwrap();
    let (mut accepted, _) = proxy.accept().await.unwrap();
    assert_eq!(original_dst(&accepted).unwrap(), app_target);
    let request = b"GET /x HTTP/1.1\r\nhost: orders\r\n\r\n";
    client.write_all(request).await.unwrap();
    let (proto, prefix) = sniff(&mut accepted, Duration::from_secs(5)).await.unwrap();
    assert_eq!(proto, Protocol::Http1);
    let relay = tokio::spawn(async move { passthrough(accepted, &prefix, upstream_addr).await });
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
    let relay = tokio::spawn(async move { passthrough(accepted, &prefix, upstream_addr).await });
    let mut echoed = [0; 10];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, hello);
    drop(client);
    relay.await.unwrap().unwrap();

    // A server-first client sends nothing: opaque once the sniff stops waiting.
    let _client = TcpStream::connect(app_target).await.unwrap();
    let (mut accepted, _) = proxy.accept().await.unwrap();
    let (proto, prefix) = sniff(&mut accepted, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!((proto, prefix.len()), (Protocol::Opaque, 0));
}

// === the outbound listener in transparent mode ===

const BIN: &str = env!("CARGO_BIN_EXE_sluice-proxy");
/// The proxy's UID; its own connections are not redirected.
const PROXY_UID: &str = "1337";

#[test]
fn outbound_listener_routes_governed_http_and_passes_everything_else_through() {
    let ns = Netns::new("sluice-outbound");
    ns.run_child("outbound_in_namespace");
}

/// A child process killed when dropped; its log is shown if the test failed.
struct Child(std::process::Child, std::path::PathBuf);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            eprintln!("proxy log:\n{log}");
        }
    }
}

/// An HTTP/1.1 and h2c server answering `NAME HOST PATH` with `x-upstream: NAME`.
async fn http_server(addr: &str, name: &'static str) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let host = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .or_else(|| {
                            req.headers()
                                .get("host")
                                .map(|h| h.to_str().unwrap().to_owned())
                        })
                        .unwrap_or_default();
                    let text = format!("{name} {host} {}", req.uri().path());
                    let resp = Response::builder()
                        .header("x-upstream", name)
                        .body(Full::new(Bytes::from(text)))
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
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

/// An echo server; with `banner`, it speaks first (as MySQL or SMTP servers do).
async fn echo_server(addr: &str, banner: Option<&'static [u8]>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Some(b) = banner {
                    s.write_all(b).await.unwrap();
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

/// A reply's status, `x-upstream`, `x-sluice-reason` and body.
#[derive(Debug)]
struct Reply {
    status: u16,
    upstream: String,
    reason: String,
    body: String,
}

async fn reply(resp: Response<Incoming>) -> Reply {
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (status, upstream, reason) = (
        resp.status().as_u16(),
        header("x-upstream"),
        header("x-sluice-reason"),
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        upstream,
        reason,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// An unchanged HTTP/1.1 client connection to `addr`.
async fn h1(addr: &str) -> H1 {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(conn: &mut H1, host: &str, path: &str) -> Reply {
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    conn.ready()
        .await
        .expect("the keep-alive connection stays open");
    reply(conn.send_request(req).await.unwrap()).await
}

async fn wait_ready(admin: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(stream) = TcpStream::connect(admin).await
            && let Ok((mut sender, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        {
            tokio::spawn(conn);
            let req = Request::get("/ready")
                .header("host", admin)
                .body(Empty::<Bytes>::new())
                .unwrap();
            if sender
                .send_request(req)
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts the real binary as UID 1337 with `policy`, outbound on 15001 and admin on 15000.
async fn proxy_as_own_uid(dir: &std::path::Path, policy: &str) -> Child {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("policy.yaml");
    std::fs::write(&path, policy).unwrap();
    let log_path = dir.join("proxy.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new("setpriv")
        .args([
            "--reuid",
            PROXY_UID,
            "--regid",
            PROXY_UID,
            "--clear-groups",
            BIN,
            "run",
        ])
        .args([
            "--outbound",
            "127.0.0.1:15001",
            "--admin",
            "127.0.0.1:15000",
        ])
        .arg("--policy")
        .arg(&path)
        .args(["--log-level", "sluice_proxy=debug,info"])
        .stderr(log)
        .spawn()
        .expect("setpriv (util-linux) runs the proxy under its own UID");
    let child = Child(child, log_path);
    wait_ready("127.0.0.1:15000").await;
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run inside a network namespace by outbound_listener_routes_governed_http_and_passes_everything_else_through"]
async fn outbound_in_namespace() {
    assert!(
        std::env::var_os(CHILD_ENV).is_some(),
        "run by the namespace test only"
    );
    // "Remote" addresses of this namespace; everything the test process (root) sends
    // there is redirected to the proxy, which runs as its own UID and is exempt.
    for cmd in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "addr", "add", "10.55.0.2/24", "dev", "lo"],
        vec!["ip", "addr", "add", "10.55.0.3/32", "dev", "lo"],
        vec!["ip", "addr", "add", "10.55.0.4/32", "dev", "lo"],
        vec![
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.55.0.0/24",
            "-m",
            "owner",
            "!",
            "--uid-owner",
            PROXY_UID,
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    ] {
        let out = run(cmd[0], &cmd[1..]);
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    http_server("10.55.0.2:80", "external").await;
    http_server("10.55.0.3:8080", "orders-v1").await;
    echo_server("10.55.0.2:7", None).await;
    echo_server("10.55.0.2:25", Some(b"220 ready\r\n")).await;
    let recorded = recorder("10.55.0.4:80").await;

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
    // The same keep-alive connection naming a host no policy claims: sent on, ungoverned,
    // to where the application addressed it.
    let r = get(&mut conn, "example.com", "/x").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "external example.com /x"),
        "{r:?}"
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
    let stream = TcpStream::connect("10.55.0.2:80").await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let r = reply(
        h2.send_request(
            Request::get("http://orders/api/h2")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert!(
        (r.status == 200 && r.upstream == "orders-v1") || r.reason == "rate-limited",
        "{r:?}"
    );
    let r = reply(
        h2.send_request(
            Request::get("http://example.com/h2")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap(),
    )
    .await;
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
}
