//! Two "pods" joined to the mesh unchanged: two network namespaces on a veth pair, each
//! with `sluice-proxy init` installing the redirect and the real proxy running under its
//! own UID (1337, the init step's owner exemption). An application in pod A calls pod
//! B's IP as it always would:
//!
//! - HTTP is intercepted and governed on both sides: A's outbound rate limit and B's
//!   inbound rate limit each refuse requests, seen in each proxy's metrics;
//! - a raw TCP echo and a TLS session (rustls on both ends, B's certificate seen by A)
//!   pass through both proxies byte for byte;
//! - what pod B keeps to itself stays private: a server bound to 127.0.0.1 in B, B's
//!   outbound listener (15001) and B's admin routes other than probes and metrics
//!   answer nothing (or 401/403) to A, while B's application port and a server bound
//!   to every address do.
//!
//! Needs root, `ip`, `iptables` and `setpriv`; without them the test fails saying which
//! is missing. The test binary re-runs itself inside each namespace (`ip netns exec`)
//! for the `pod_*_in_namespace` tests, which are ignored when run directly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use sluice_e2e::netns::{self, Killed, Netns};
use sluice_e2e::{HttpConn, Protocol, Upstream, WAIT, metric_sum, scrape, tcp_echo, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_e2e-proxy");
/// Where the pods tell each other things (B's certificate, readiness).
const SHARED_ENV: &str = "SLUICE_PODS_SHARED_DIR";
const POD_A: &str = "10.77.0.1";
const POD_B: &str = "10.77.0.2";
const APP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;
const TLS_PORT: u16 = 8443;
/// A server in pod B bound to 127.0.0.1 only.
const LOOPBACK_PORT: u16 = 7001;
/// Pod B's admin token (`--admin-token-file`).
const ADMIN_TOKEN: &str = "b-admin-token";

/// Two namespaces on a veth pair, each with the redirect `init` installs; deleted when
/// dropped (also on failure).
struct Pods {
    a: Netns,
    b: Netns,
}

impl Pods {
    fn new() -> Self {
        let tools = ["iptables", "setpriv"];
        let pods = Pods {
            a: Netns::new("sluice-pod-a", &tools),
            b: Netns::new("sluice-pod-b", &tools),
        };
        netns::veth(
            &pods.a,
            &format!("{POD_A}/24"),
            &pods.b,
            &format!("{POD_B}/24"),
        );
        for ns in [&pods.a, &pods.b] {
            // The init step exactly as the injected init container runs it.
            ns.must(&[BIN, "init"]);
        }
        pods
    }

    /// Runs the ignored test `name` in namespace `ns` as a child process.
    fn child(ns: &Netns, name: &str, shared: &Path) -> std::process::Command {
        let mut cmd = ns.test_command(name);
        cmd.env(SHARED_ENV, shared);
        cmd
    }
}

#[test]
fn an_unchanged_client_in_pod_a_is_governed_on_both_sides_and_other_traffic_passes_through() {
    let pods = Pods::new();
    let shared = tempfile::tempdir().unwrap();
    let b_log = shared.path().join("pod-b-test.log");
    netns::open_to_proxy_uid(shared.path());
    let b = Pods::child(&pods.b, "pods::pod_b_in_namespace", shared.path())
        .stdout(std::fs::File::create(&b_log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut b = Killed::new(b, None);
    let ready = shared.path().join("pod-b.ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if let Ok(Some(status)) = b.child().try_wait() {
            panic!(
                "pod B exited ({status}) before it was ready:\n{}",
                std::fs::read_to_string(&b_log).unwrap_or_default()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pod B not ready:\n{}",
            std::fs::read_to_string(&b_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Pods::child(&pods.a, "pods::pod_a_in_namespace", shared.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let read = |name: &str| std::fs::read_to_string(shared.path().join(name)).unwrap_or_default();
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "pod A:\n{stdout}\n{}\npod B:\n{}\nsidecar A:\n{}\nsidecar B:\n{}",
        String::from_utf8_lossy(&out.stderr),
        read("pod-b-test.log"),
        read("pod-a.log"),
        read("pod-b.log"),
    );
    drop(b);
}

fn shared_dir() -> PathBuf {
    std::env::var_os(SHARED_ENV)
        .expect("run by the two-pod test only")
        .into()
}

/// Starts the real proxy as UID 1337 in this namespace, the way the injected sidecar
/// runs (admin on 0.0.0.0:15000, inbound on 15006, outbound on 15001); killed with its
/// parent. Returns once `/ready` answers.
async fn sidecar(name: &str, policy: &str, extra: &[&str]) -> Killed {
    let mut args = vec!["--admin", "0.0.0.0:15000"];
    args.extend_from_slice(extra);
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    netns::sidecar(BIN.as_ref(), &shared_dir(), name, policy, &args, admin).await
}

const POLICY: &str = r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log-service, namespace: shop }
spec:
  host: log-service
  backends:
    log: { addresses: ["10.77.0.2:8080"] }
  routes:
    - name: ingest
      rateLimit: { perSecond: 1, burst: 5, key: { header: x-tenant-id } }
  inbound:
    rateLimit: { perSecond: 1, burst: 3 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run inside pod B's namespace by the two-pod test"]
async fn pod_b_in_namespace() {
    let dir = shared_dir();
    // The application: HTTP on its port, a TCP echo and a TLS echo, all on every address.
    let app = Upstream::start_on(
        "log-service",
        Protocol::Http1,
        SocketAddr::from(([0, 0, 0, 0], APP_PORT)),
    )
    .await;
    tcp_echo(
        TcpListener::bind(("0.0.0.0", ECHO_PORT)).await.unwrap(),
        None,
    );
    tcp_echo(
        TcpListener::bind(("127.0.0.1", LOOPBACK_PORT))
            .await
            .unwrap(),
        None,
    );
    let token_file = dir.join("pod-b.token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["log-service".to_owned()]).unwrap();
    std::fs::write(dir.join("pod-b.crt"), key.cert.der()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![key.cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into()),
    )
    .unwrap();
    tls_echo(
        TcpListener::bind(("0.0.0.0", TLS_PORT)).await.unwrap(),
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
    );
    let app_addr = format!("127.0.0.1:{APP_PORT}");
    let _proxy = sidecar(
        "pod-b",
        POLICY,
        &[
            "--app",
            &app_addr,
            "--service",
            "log-service",
            "--admin-token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    std::fs::write(dir.join("pod-b.ready"), "").unwrap();
    // Serve until the test kills this process.
    std::future::pending::<()>().await;
    drop(app);
}

/// A TLS echo: the handshake with `tls`, then every byte back.
fn tls_echo(listener: TcpListener, tls: tokio_rustls::TlsAcceptor) {
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Ok(s) = tls.accept(s).await {
                    let (mut r, mut w) = tokio::io::split(s);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
}

/// Connects to `addr` through this pod's redirect, sends `payload`, closes the write
/// side and returns what came back before the peer closed (nothing when it was
/// refused or reset).
async fn answer_of(addr: (&str, u16), payload: &[u8]) -> Vec<u8> {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return Vec::new();
    };
    let (mut r, mut w) = stream.into_split();
    let _ = w.write_all(payload).await;
    let _ = w.shutdown().await;
    let mut back = Vec::new();
    let read = tokio::time::timeout(WAIT, r.read_to_end(&mut back)).await;
    assert!(read.is_ok(), "{addr:?} neither answered nor closed");
    back
}

/// Sends `payload`, closes the write side, and returns everything read back.
async fn round_trip<S>(stream: S, payload: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let (_, back) = tokio::join!(
        async {
            w.write_all(payload).await.unwrap();
            w.shutdown().await.unwrap();
        },
        async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            back
        }
    );
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run inside pod A's namespace by the two-pod test"]
async fn pod_a_in_namespace() {
    let dir = shared_dir();
    let _proxy = sidecar("pod-a", POLICY, &[]).await;
    let b_app: SocketAddr = format!("{POD_B}:{APP_PORT}").parse().unwrap();

    // The application calls log-service (resolved to pod B's IP, as DNS would) with no
    // idea a proxy exists. Both sidecars govern: B's inbound limit (burst 3) refuses
    // first, then A's outbound limit for this tenant (burst 5).
    let mut client = HttpConn::h1(b_app).await.unwrap();
    let mut answers = Vec::new();
    for _ in 0..20 {
        let r = client
            .request(
                http::Method::GET,
                "log-service",
                "/logs",
                &[("x-tenant-id", "t1")],
            )
            .await
            .unwrap();
        answers.push((r.status.as_u16(), r.header("x-upstream").to_owned()));
    }
    assert!(
        answers
            .iter()
            .take(3)
            .all(|a| *a == (200, "log-service".to_owned())),
        "the first requests reach B's application: {answers:?}"
    );
    assert!(
        answers.iter().any(|a| a.0 == 429),
        "a rate limit refuses: {answers:?}"
    );
    let a_metrics = scrape("127.0.0.1:15000".parse().unwrap()).await;
    // Pod B's admin port is not redirected on B's side; from here it goes through A's
    // outbound listener as opaque TCP, like any other destination.
    let b_metrics = scrape(format!("{POD_B}:15000").parse().unwrap()).await;
    let limited = |text: &str, direction: &str| {
        metric_sum(
            text,
            "sluice_ratelimit_decisions_total",
            &[
                &format!("direction=\"{direction}\""),
                "decision=\"limited\"",
            ],
        )
    };
    assert!(
        limited(&a_metrics, "outbound") >= 1.0,
        "A's outbound rate limit refused:\n{a_metrics}"
    );
    assert!(
        limited(&b_metrics, "inbound") >= 1.0,
        "B's inbound rate limit refused:\n{b_metrics}"
    );
    let served = |text: &str, direction: &str| {
        metric_sum(
            text,
            "sluice_requests_total",
            &[&format!("direction=\"{direction}\""), "code=\"200\""],
        )
    };
    assert!(served(&a_metrics, "outbound") >= 3.0, "{a_metrics}");
    assert!(served(&b_metrics, "inbound") >= 3.0, "{b_metrics}");

    // A raw TCP echo through both interceptions: every byte back unchanged.
    let payload: Vec<u8> = (0..=255u8).cycle().take(256 * 1024).collect();
    let tcp = TcpStream::connect((POD_B, ECHO_PORT)).await.unwrap();
    let back = round_trip(tcp, &payload).await;
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");

    // TLS end to end: A's client verifies B's own certificate, so nothing in between
    // terminated it; the payload echoes back unchanged.
    let b_cert =
        rustls::pki_types::CertificateDer::from(std::fs::read(dir.join("pod-b.crt")).unwrap());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(b_cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect((POD_B, TLS_PORT)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("log-service").unwrap(),
            tcp,
        )
        .await
        .expect("the TLS handshake with B's application passes through");
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], b_cert);
    let back = round_trip(tls, &payload[..64 * 1024]).await;
    assert!(back == payload[..64 * 1024], "TLS echo differs");

    // Both sidecars counted what they passed through (the echo and the TLS session; on
    // A also the scrapes of B's admin port), with no address in any label.
    let at_least = (256 + 64) * 1024;
    let counted = |text: &str, direction: &str| {
        let d = format!("direction=\"{direction}\"");
        let bytes = |flow: &str| {
            let f = format!("flow=\"{flow}\"");
            metric_sum(text, "sluice_tcp_bytes_total", &[&d, &f])
        };
        let ended = metric_sum(
            text,
            "sluice_tcp_connections_total",
            &[&d, "outcome=\"passthrough\""],
        );
        let errors = metric_sum(
            text,
            "sluice_tcp_connections_total",
            &[&d, "outcome=\"error\""],
        );
        bytes("sent") >= at_least as f64
            && bytes("received") >= at_least as f64
            && ended >= 2.0
            && errors == 0.0
            && metric_sum(text, "sluice_tcp_open_connections", &[&d]) == 0.0
    };
    let (a_admin, b_admin): (SocketAddr, SocketAddr) = (
        "127.0.0.1:15000".parse().unwrap(),
        format!("{POD_B}:15000").parse().unwrap(),
    );
    wait_until(
        "A's outbound and B's inbound count the passed-through connections",
        WAIT,
        || async move {
            counted(&scrape(a_admin).await, "outbound")
                && counted(&scrape(b_admin).await, "inbound")
        },
    )
    .await;
    for text in [scrape(a_admin).await, scrape(b_admin).await] {
        let tcp: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("sluice_tcp_"))
            .collect();
        assert!(!tcp.is_empty(), "{text}");
        assert!(!tcp.iter().any(|l| l.contains("10.77.")), "{tcp:#?}");
    }

    // Last, as they end connections abruptly, which the counts above rule out.
    // B's loopback-only server, and B's outbound listener, are not B's network face:
    // the connection reaches B's inbound listener, which closes it (before, it was
    // relayed to 127.0.0.1 in B and answered). The same bytes to B's echo bound to
    // every address come back.
    let probe = b"GET / HTTP/1.1\r\nhost: not-governed\r\n\r\n";
    assert_eq!(
        answer_of((POD_B, ECHO_PORT), probe).await,
        probe.to_vec(),
        "a server bound to every address in B answers"
    );
    for (port, what) in [
        (LOOPBACK_PORT, "B's server bound to 127.0.0.1"),
        (15001, "B's outbound listener"),
        (15006 + 1, "a port nothing listens on"),
    ] {
        let back = answer_of((POD_B, port), probe).await;
        assert!(
            back.is_empty(),
            "{what} must not answer A: {:?}",
            String::from_utf8_lossy(&back)
        );
    }

    // B's admin port: probes and metrics are open, everything else needs B's token.
    let mut admin = HttpConn::h1(format!("{POD_B}:15000").parse().unwrap())
        .await
        .unwrap();
    for path in ["/live", "/ready", "/metrics"] {
        let r = admin.get("admin", path).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    for (method, path) in [
        (http::Method::GET, "/config"),
        (http::Method::GET, "/breakers"),
        (http::Method::POST, "/breakers/log-service.ingest/log/open"),
        (http::Method::PUT, "/log-level"),
    ] {
        let r = admin
            .request(method.clone(), "admin", path, &[])
            .await
            .unwrap();
        assert_eq!(
            r.status,
            401,
            "{method} {path} without the token: {}",
            r.text()
        );
        let r = admin
            .request(
                method.clone(),
                "admin",
                path,
                &[("authorization", "Bearer not-it")],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{method} {path} with a wrong token");
    }
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let r = admin
        .request(
            http::Method::GET,
            "admin",
            "/config",
            &[("authorization", &bearer)],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("log-service"), "{}", r.text());
}
