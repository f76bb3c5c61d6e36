//! Proxy smoke tests over real sockets: a real upstream, a proxy from `start()` with a
//! policy file, and real HTTP/1.1 and HTTP/2 clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sluice_proxy::workers::Workers;
use sluice_proxy::{ProxyConfig, RunningProxy, start};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// An upstream answering `NAME METHOD PATH VERSION` with an `x-upstream: NAME` header.
async fn upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let text = format!(
                        "{name} {} {} {:?}",
                        req.method(),
                        req.uri().path(),
                        req.version()
                    );
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
    addr
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn policy(v1: SocketAddr, v2: SocketAddr, dead: SocketAddr, default_backend: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: orders }}
spec:
  host: orders
  backends:
    v1: {{ addresses: ["{v1}"] }}
    v2: {{ addresses: ["{v2}"] }}
    dead: {{ addresses: ["{dead}"] }}
  routes:
    - name: default
      split:
        - backend: {default_backend}
    - name: canary
      match: {{ path: {{ prefix: /api }}, headers: {{ x-canary: "true" }} }}
      split:
        - backend: v2
    - name: writes
      match: {{ path: {{ prefix: /api }}, method: POST }}
      split:
        - backend: v2
    - name: broken
      match: {{ path: {{ exact: /dead }} }}
      split:
        - backend: dead
---
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: logs }}
spec:
  host: logs
  backends:
    v1: {{ addresses: ["{v1}"] }}
  routes:
    - name: ingest
      match: {{ path: {{ prefix: /logs }} }}
"#
    )
}

struct Fixture {
    proxy: RunningProxy,
    dir: tempfile::TempDir,
    v1: SocketAddr,
    v2: SocketAddr,
    dead: SocketAddr,
}

impl Fixture {
    async fn new() -> Self {
        let (v1, v2, dead) = (
            upstream("v1").await,
            upstream("v2").await,
            closed_port().await,
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, policy(v1, v2, dead, "v1")).unwrap();
        let proxy = start(ProxyConfig {
            outbound: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            policy: Some(path),
            drain_timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .await
        .unwrap();
        Fixture {
            proxy,
            dir,
            v1,
            v2,
            dead,
        }
    }

    fn policy_path(&self) -> std::path::PathBuf {
        self.dir.path().join("policy.yaml")
    }

    async fn get(&self, host: &str, path: &str) -> Response<Bytes> {
        let req = Request::get(path)
            .header("host", host)
            .body(Full::default())
            .unwrap();
        send(self.proxy.outbound_addr().unwrap(), false, req).await
    }

    async fn admin(&self, path: &str) -> Response<Bytes> {
        let req = Request::get(path)
            .header("host", "admin")
            .body(Full::default())
            .unwrap();
        send(self.proxy.admin_addr().unwrap(), false, req).await
    }

    async fn config(&self) -> serde_json::Value {
        serde_json::from_slice(self.admin("/config").await.body()).unwrap()
    }
}

async fn send(addr: SocketAddr, h2: bool, req: Request<Full<Bytes>>) -> Response<Bytes> {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let resp = if h2 {
        let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        tx.send_request(req).await.unwrap()
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        tx.send_request(req).await.unwrap()
    };
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

fn text(resp: &Response<Bytes>) -> &str {
    std::str::from_utf8(resp.body()).unwrap()
}

fn reason(resp: &Response<Bytes>) -> &str {
    resp.headers()["x-sluice-reason"].to_str().unwrap()
}

/// Polls until `cond` holds, for at most five seconds.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..250 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_path_method_and_header() {
    let f = Fixture::new().await;
    let resp = f.get("orders", "/anything?x=1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(text(&resp), "v1 GET /anything HTTP/1.1");
    assert_eq!(
        text(&f.get("ORDERS:15001", "/api/x").await),
        "v1 GET /api/x HTTP/1.1"
    );

    let req = Request::get("/api/x")
        .header("host", "orders")
        .header("x-canary", "true")
        .body(Full::default())
        .unwrap();
    let resp = send(f.proxy.outbound_addr().unwrap(), false, req).await;
    assert_eq!(text(&resp), "v2 GET /api/x HTTP/1.1");

    let req = Request::post("/api/orders")
        .header("host", "orders")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let resp = send(f.proxy.outbound_addr().unwrap(), false, req).await;
    assert_eq!(text(&resp), "v2 POST /api/orders HTTP/1.1");

    // HTTP proxy style: absolute-form request target, whose authority routes (HTTP/1.1
    // still carries a Host, as `curl -x` sends it; a differing one is replaced).
    let req = Request::get("http://logs/logs/a")
        .header("host", "orders")
        .body(Full::default())
        .unwrap();
    let resp = send(f.proxy.outbound_addr().unwrap(), false, req).await;
    assert_eq!(text(&resp), "v1 GET /logs/a HTTP/1.1");

    let metrics = text(&f.admin("/metrics").await).to_string();
    assert!(
        metrics.contains(
            r#"sluice_requests_total{backend="v2",code="200",direction="outbound",namespace="default",peer_identity="",route="orders.writes"} 1"#
        ),
        "{metrics}"
    );
    assert_eq!(f.admin("/ready").await.status(), StatusCode::OK);
    assert_eq!(f.admin("/live").await.status(), StatusCode::OK);
    f.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_or_path_is_no_route_and_dead_upstream_is_502() {
    let f = Fixture::new().await;
    let resp = f.get("nobody", "/").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(reason(&resp), "no-route");
    let resp = f.get("logs", "/other").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(reason(&resp), "no-route");

    let resp = f.get("orders", "/dead").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(reason(&resp), "upstream-unavailable");
    assert!(text(&resp).contains("dead"), "{}", text(&resp));
    let _ = f.dead;
    f.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_apply_and_broken_edits_are_refused() {
    let f = Fixture::new().await;
    let first = f.config().await["version"].as_str().unwrap().to_string();
    assert_eq!(text(&f.get("orders", "/").await), "v1 GET / HTTP/1.1");

    // An atomic replace (write + rename), as editors and config tools do.
    let tmp = f.dir.path().join("policy.yaml.new");
    std::fs::write(&tmp, policy(f.v1, f.v2, f.dead, "v2")).unwrap();
    std::fs::rename(&tmp, f.policy_path()).unwrap();
    eventually("the edit to apply", || async {
        f.config().await["version"].as_str() != Some(first.as_str())
    })
    .await;
    assert_eq!(text(&f.get("orders", "/").await), "v2 GET / HTTP/1.1");
    let second = f.config().await["version"].as_str().unwrap().to_string();

    // A broken in-place write is refused; the last good policy keeps serving.
    std::fs::write(
        f.policy_path(),
        "apiVersion: sluice.dev/v1alpha1\nkind: [\n",
    )
    .unwrap();
    eventually("the broken edit to be refused", || async {
        !f.config().await["last_rejected"].is_null()
    })
    .await;
    let config = f.config().await;
    assert_eq!(config["version"].as_str(), Some(second.as_str()));
    let error = config["last_rejected"]["error"].as_str().unwrap();
    assert!(error.contains("policy.yaml:"), "{error}");
    assert_eq!(text(&f.get("orders", "/").await), "v2 GET / HTTP/1.1");
    let metrics = text(&f.admin("/metrics").await).to_string();
    assert!(
        metrics.contains(r#"sluice_policy_reloads_total{result="rejected"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(r#"sluice_policy_info{{hash="{second}"}} 1"#)));
    f.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_goes_upstream_as_http2() {
    let f = Fixture::new().await;
    let req = Request::get("http://orders/api/x")
        .header("x-canary", "true")
        .header("te", "trailers")
        .body(Full::default())
        .unwrap();
    let resp = send(f.proxy.outbound_addr().unwrap(), true, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(text(&resp), "v2 GET /api/x HTTP/2.0");
    let req = Request::get("http://nobody/")
        .body(Full::default())
        .unwrap();
    let resp = send(f.proxy.outbound_addr().unwrap(), true, req).await;
    assert_eq!(reason(&resp), "no-route");
    f.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_policy_at_start_keeps_running_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, "kind: RoutePolicy\n").unwrap();
    let addr_file = dir.path().join("addrs.json");
    let proxy = start(ProxyConfig {
        outbound: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        policy: Some(path),
        addr_file: Some(addr_file.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let addrs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&addr_file).unwrap()).unwrap();
    let admin: SocketAddr = addrs["admin"].as_str().unwrap().parse().unwrap();
    assert_eq!(Some(admin), proxy.admin_addr());
    assert!(addrs.get("inbound").is_none());
    let get = |p: &'static str| {
        send(
            admin,
            false,
            Request::get(p)
                .header("host", "a")
                .body(Full::default())
                .unwrap(),
        )
    };
    assert_eq!(
        get("/ready").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let config: serde_json::Value = serde_json::from_slice(get("/config").await.body()).unwrap();
    assert!(config["version"].is_null());
    assert!(
        config["last_rejected"]["error"]
            .as_str()
            .unwrap()
            .contains("policy.yaml")
    );
    proxy.shutdown().await;
    assert!(Path::new(&addr_file).exists());
}

fn single_backend(host: &str, addr: SocketAddr) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: {host} }}\nspec:\n  host: {host}\n  backends:\n    main: {{ addresses: [\"{addr}\"] }}\n  routes:\n    - name: all\n"
    )
}

async fn start_with(policy: &str, app: Option<SocketAddr>) -> (RunningProxy, tempfile::TempDir) {
    start_on(policy, app, Workers::here()).await
}

/// `start_with`, its connections served by `workers`.
async fn start_on(
    policy: &str,
    app: Option<SocketAddr>,
    workers: Workers,
) -> (RunningProxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, policy).unwrap();
    let proxy = start(ProxyConfig {
        outbound: "127.0.0.1:0".parse().unwrap(),
        inbound: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        app,
        service: Some("echo".into()),
        policy: Some(path),
        drain_timeout: Duration::from_secs(5),
        workers,
        ..Default::default()
    })
    .await
    .unwrap();
    (proxy, dir)
}

/// An upstream that accepts any upgrade and then echoes bytes.
async fn upgrade_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<Incoming>| async move {
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(up) = on.await else { return };
                        let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                    let resp = Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header("connection", "upgrade")
                        .header("upgrade", "echo")
                        .body(Full::<Bytes>::default())
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_tunnels_bytes_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upgrade_echo().await;
    // `echo` is no WebSocket: the route lists it.
    let policy = format!("{}      upgrades: [echo]\n", single_backend("echo", up));
    let (proxy, _dir) = start_with(&policy, None).await;
    let io = TokioIo::new(
        TcpStream::connect(proxy.outbound_addr().unwrap())
            .await
            .unwrap(),
    );
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::get("/chat")
        .header("host", "echo")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["upgrade"], "echo");
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    for msg in [&b"ping"[..], &[7u8; 100_000][..]] {
        io.write_all(msg).await.unwrap();
        let mut back = vec![0; msg.len()];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_forwards_to_the_app() {
    let app = upstream("app").await;
    let (proxy, _dir) = start_with(&single_backend("echo", app), Some(app)).await;
    let req = Request::get("/anything")
        .header("host", "whatever")
        .body(Full::default())
        .unwrap();
    let resp = send(proxy.inbound_addr().unwrap(), false, req).await;
    assert_eq!(text(&resp), "app GET /anything HTTP/1.1");
    let req = Request::get("http://whatever/h2")
        .body(Full::default())
        .unwrap();
    let resp = send(proxy.inbound_addr().unwrap(), true, req).await;
    assert_eq!(text(&resp), "app GET /h2 HTTP/2.0");
    proxy.shutdown().await;
}

/// An upstream that holds every request until released.
async fn held_upstream() -> (SocketAddr, Arc<Notify>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let release = Arc::new(Notify::new());
    let arrived = Arc::new(AtomicUsize::new(0));
    let (r, a) = (release.clone(), arrived.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (release, arrived) = (r.clone(), a.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let (release, arrived) = (release.clone(), arrived.clone());
                    async move {
                        let released = release.notified();
                        arrived.fetch_add(1, Ordering::SeqCst);
                        released.await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("released"))))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, release, arrived)
}

/// Starts `proxy`'s shutdown while requests are held upstream, and waits until its
/// listener has closed while the shutdown still waits for them.
async fn shut_down_with_requests_in_flight(
    proxy: RunningProxy,
    outbound: SocketAddr,
) -> tokio::task::JoinHandle<()> {
    let shutdown = tokio::spawn(proxy.shutdown());
    eventually("the listener to close", || async {
        TcpStream::connect(outbound).await.is_err()
    })
    .await;
    assert!(!shutdown.is_finished(), "requests are still in flight");
    shutdown
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_drains_in_flight_requests() {
    let (up, release, arrived) = held_upstream().await;
    let (proxy, _dir) = start_with(&single_backend("held", up), None).await;
    let outbound = proxy.outbound_addr().unwrap();
    let h1 = tokio::spawn(send(
        outbound,
        false,
        Request::get("/")
            .header("host", "held")
            .body(Full::default())
            .unwrap(),
    ));
    let h2 = tokio::spawn(send(
        outbound,
        true,
        Request::get("http://held/").body(Full::default()).unwrap(),
    ));
    eventually("both requests to reach the upstream", || async {
        arrived.load(Ordering::SeqCst) == 2
    })
    .await;
    let shutdown = shut_down_with_requests_in_flight(proxy, outbound).await;
    release.notify_waiters();
    let (h1, h2) = (h1.await.unwrap(), h2.await.unwrap());
    assert_eq!(text(&h1), "released");
    assert_eq!(h1.headers()["connection"], "close");
    assert_eq!(text(&h2), "released");
    shutdown.await.unwrap();
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap_is_applied() {
    use std::os::unix::fs::symlink;
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Kubernetes' layout: file → ..data/file, ..data → a timestamped directory.
    for (ts, addr) in [("..t1", v1), ("..t2", v2)] {
        std::fs::create_dir(d.join(ts)).unwrap();
        std::fs::write(d.join(ts).join("policy.yaml"), single_backend("cm", addr)).unwrap();
    }
    symlink("..t1", d.join("..data")).unwrap();
    symlink("..data/policy.yaml", d.join("policy.yaml")).unwrap();
    let proxy = start(ProxyConfig {
        outbound: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        policy: Some(d.join("policy.yaml")),
        ..Default::default()
    })
    .await
    .unwrap();
    let get = || {
        send(
            proxy.outbound_addr().unwrap(),
            false,
            Request::get("/")
                .header("host", "cm")
                .body(Full::default())
                .unwrap(),
        )
    };
    assert_eq!(text(&get().await), "v1 GET / HTTP/1.1");
    symlink("..t2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    let mut rx = proxy.policy_store().subscribe();
    let first = rx.borrow_and_update().clone();
    eventually("the swap to apply", || {
        let now = proxy.policy_store().current().hash().map(str::to_string);
        let first = first.clone();
        async move { now != first }
    })
    .await;
    assert_eq!(text(&get().await), "v2 GET / HTTP/1.1");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_is_set_through_the_admin_api() {
    let seen = Arc::new(std::sync::Mutex::new(String::new()));
    let sink = seen.clone();
    let proxy = start(ProxyConfig {
        no_outbound: true,
        admin: "127.0.0.1:0".parse().unwrap(),
        log_control: Some(sluice_proxy::LogControl::new(move |d| {
            if d == "nonsense=[" {
                return Err("invalid filter".into());
            }
            *sink.lock().unwrap() = d.to_string();
            Ok(())
        })),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(proxy.outbound_addr(), None);
    let admin = proxy.admin_addr().unwrap();
    let put = |body: &'static str| {
        send(
            admin,
            false,
            Request::put("/log-level")
                .header("host", "admin")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap(),
        )
    };
    assert_eq!(put("debug\n").await.status(), StatusCode::OK);
    assert_eq!(*seen.lock().unwrap(), "debug");
    assert_eq!(put("nonsense=[").await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(*seen.lock().unwrap(), "debug");
    let get = |p: &'static str| {
        send(
            admin,
            false,
            Request::get(p)
                .header("host", "a")
                .body(Full::default())
                .unwrap(),
        )
    };
    assert_eq!(get("/nope").await.status(), StatusCode::NOT_FOUND);
    assert_eq!(text(&get("/breakers").await), "[]");
    assert_eq!(
        get("/ready").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    proxy.shutdown().await;
}

/// With worker threads, each connection runs whole on one of them: HTTP/1.1 and HTTP/2
/// requests over connections on every worker are answered, a policy edit reaches them
/// all, and shutdown drains requests in flight on the worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_serve_connections_apply_edits_and_drain() {
    let (workers, threads) = Workers::start(2).unwrap();
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let (proxy, dir) = start_on(&single_backend("orders", v1), None, workers).await;
    let outbound = proxy.outbound_addr().unwrap();
    let get = |h2: bool| {
        let req = Request::get("http://orders/x")
            .header("host", "orders")
            .body(Full::default())
            .unwrap();
        send(outbound, h2, req)
    };
    // Six connections: three turns of the two workers, over both protocols.
    for i in 0..6 {
        let h2 = i % 2 == 1;
        let want = if h2 {
            "v1 GET /x HTTP/2.0"
        } else {
            "v1 GET /x HTTP/1.1"
        };
        assert_eq!(text(&get(h2).await), want, "connection {i}");
    }
    // The policy store is shared: an edit applies on every worker.
    let path = dir.path().join("policy.yaml");
    let tmp = dir.path().join("policy.yaml.new");
    std::fs::write(&tmp, single_backend("orders", v2)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    eventually("the edit to apply", || async {
        text(&get(false).await).starts_with("v2")
    })
    .await;
    for i in 0..6 {
        assert!(
            text(&get(i % 2 == 1).await).starts_with("v2 GET /x"),
            "connection {i}"
        );
    }
    // Requests in flight on three connections, on both workers, drain on shutdown.
    let (held, release, arrived) = held_upstream().await;
    std::fs::write(&tmp, single_backend("orders", held)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    eventually("the second edit to apply", || async {
        // A request that reaches the held upstream waits there; ask with a timeout.
        tokio::time::timeout(Duration::from_millis(200), get(false))
            .await
            .is_err()
    })
    .await;
    release.notify_waiters();
    let before = arrived.load(Ordering::SeqCst);
    let in_flight: Vec<_> = (0..3).map(|i| tokio::spawn(get(i == 1))).collect();
    eventually("three requests to reach the upstream", || async {
        arrived.load(Ordering::SeqCst) >= before + 3
    })
    .await;
    let shutdown = shut_down_with_requests_in_flight(proxy, outbound).await;
    release.notify_waiters();
    for r in in_flight {
        assert_eq!(text(&r.await.unwrap()), "released");
    }
    shutdown.await.unwrap();
    drop(threads);
}
