//! mTLS across the mesh: a control plane with its CA (TLS gRPC, `Certify`),
//! sidecars that certify with bootstrap tokens, and the order → log hop over
//! TLS 1.3 with SPIFFE identities. Clients here are real rustls clients holding
//! certificates from the same CA (or from one it never issued).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use sluice_control_plane::ca::{Ca, WorkloadIdentity};
use sluice_e2e::grpc::GrpcServer;
use sluice_e2e::grpc::proto::EchoRequest;
use sluice_e2e::grpc::proto::echo_client::EchoClient;
use sluice_e2e::{
    BoxError, HttpConn, MeshTls, ProxyOptions, TestControlPlane, TestProxy, Upstream,
};
use sluice_proxy::tls::{Credentials, TlsStore, peer_spiffe_id};
use tokio::net::TcpStream;

const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";
const LOG: &str = "spiffe://cluster.local/ns/shop/sa/log";
const BILLING: &str = "spiffe://cluster.local/ns/shop/sa/billing";
const TOKENS: &[(&str, &str, &str)] = &[
    ("tok-order", "shop", "order"),
    ("tok-log", "shop", "log"),
    ("tok-billing", "shop", "billing"),
];

/// The log service's policy: one backend (the log sidecar's inbound) expected to
/// be the log identity; only the order identity may call it.
fn log_policy(host: &str, log_inbound: SocketAddr, inbound: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: log-service, namespace: shop }}
spec:
  host: {host}
  backends:
    log: {{ addresses: ["{log_inbound}"], identity: "{LOG}" }}
  routes:
    - name: all
  inbound:
{inbound}
"#
    )
}

const ALLOW_ORDER: &str = r#"    allow: ["spiffe://cluster.local/ns/shop/sa/order"]"#;

/// Control plane with its CA, the log app behind the log sidecar (inbound, mTLS),
/// the order sidecar (outbound, mTLS) routing `host` to it.
struct Mesh {
    cp: TestControlPlane,
    log: TestProxy,
    order: TestProxy,
}

impl Mesh {
    async fn start(host: &str, app: SocketAddr, lifetime: Duration, inbound: &str) -> Self {
        let cp = TestControlPlane::start_with_ca(&[], TOKENS, lifetime).await;
        Self::start_on(cp, host, app, inbound, false).await
    }

    async fn start_on(
        cp: TestControlPlane,
        host: &str,
        app: SocketAddr,
        inbound: &str,
        permissive: bool,
    ) -> Self {
        let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let log = TestProxy::start_with(
            &log_policy(host, unused, inbound),
            ProxyOptions {
                outbound: false,
                inbound: true,
                app: Some(app),
                service: Some(host.to_string()),
                mtls: Some(MeshTls {
                    permissive,
                    ..cp.mesh_tls("tok-log")
                }),
                ..Default::default()
            },
        )
        .await;
        let order = TestProxy::start_with(
            &log_policy(host, log.inbound_addr(), inbound),
            ProxyOptions {
                mtls: Some(cp.mesh_tls("tok-order")),
                ..Default::default()
            },
        )
        .await;
        Self { cp, log, order }
    }

    /// Credentials the CA issues for `token`, over its TLS gRPC port.
    async fn certify(&self, token: &str) -> Credentials {
        self.cp.certify(token).await
    }

    fn ca_files(&self) -> (String, String) {
        let dir = self.cp.trust_root();
        let dir = dir.parent().unwrap();
        (
            std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
            std::fs::read_to_string(dir.join("ca.key")).unwrap(),
        )
    }
}

/// What a direct TLS client saw from a sidecar's inbound port.
struct Seen {
    /// The SPIFFE ID of the leaf the server presented.
    server_id: Option<String>,
    /// How many certificates it presented.
    chain_len: usize,
    /// ALPN agreed.
    alpn: Option<Vec<u8>>,
}

/// Connects to `addr` as `client`, expecting the log identity, and sends one
/// HTTP/1.1 GET for `host`: what the handshake showed and the answer.
async fn call_inbound(
    client: &TlsStore,
    addr: SocketAddr,
    host: &str,
) -> Result<(Seen, StatusCode, String), BoxError> {
    let config = client.client_config_for(Some(LOG), &[b"http/1.1"])?;
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("log.mesh.invalid")?, tcp)
        .await?;
    let conn = tls.get_ref().1;
    let seen = Seen {
        server_id: conn.peer_certificates().and_then(peer_spiffe_id),
        chain_len: conn.peer_certificates().map_or(0, <[_]>::len),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
    };
    let (mut sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(driver);
    let req = Request::get("/hello")
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let reason = resp
        .headers()
        .get("x-sluice-reason")
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    let _ = resp.into_body().collect().await?;
    Ok((seen, status, reason))
}

async fn through_order(order: &TestProxy, host: &str) -> Result<StatusCode, BoxError> {
    let mut conn = HttpConn::h1(order.outbound_addr()).await?;
    Ok(conn.get(host, "/hello").await?.status)
}

#[tokio::test]
async fn order_to_log_is_mtls_end_to_end_and_the_peer_identity_is_seen() {
    let app = Upstream::http1("log-app").await;
    let mesh = Mesh::start(
        "log-service",
        app.addr(),
        Duration::from_secs(600),
        ALLOW_ORDER,
    )
    .await;

    // Both sidecars hold their identities; /identity and /config show them.
    for (proxy, id) in [(&mesh.order, ORDER), (&mesh.log, LOG)] {
        let v = proxy.admin_json("/identity").await;
        assert_eq!(v["mtls"], true, "{v}");
        assert_eq!(v["spiffe_id"], id, "{v}");
        assert!(v["not_after"].as_str().unwrap().ends_with('Z'), "{v}");
        assert!(v["next_renewal"].is_string(), "{v}");
        assert_eq!(
            proxy.admin_json("/config").await["identity"]["spiffe_id"],
            id
        );
    }

    // The application's call: plain HTTP to its own sidecar, mTLS on the hop.
    assert_eq!(
        through_order(&mesh.order, "log-service").await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(app.requests(), 1);
    let metrics = mesh.log.admin_get("/metrics").await.1;
    assert!(
        metrics.contains(&format!(
            r#"sluice_requests_total{{backend="app",code="200",direction="inbound",namespace="shop",peer_identity="{ORDER}",route="inbound"}} 1"#
        )),
        "{metrics}"
    );
    let expiry = mesh
        .order
        .tls_store()
        .unwrap()
        .not_after()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(mesh.order.admin_get("/metrics").await.1.contains(&format!(
        "sluice_identity_cert_expiry_timestamp_seconds {expiry}"
    )),);

    // A client holding the order identity sees the log sidecar's chain: the log
    // SPIFFE ID, verified against the mesh root, over TLS 1.3 with ALPN.
    let order = TlsStore::new(mesh.certify("tok-order").await).unwrap();
    let (seen, status, _) = call_inbound(&order, mesh.log.inbound_addr(), "log-service")
        .await
        .unwrap();
    assert_eq!(seen.server_id.as_deref(), Some(LOG));
    assert!(seen.chain_len >= 1);
    assert_eq!(seen.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.requests(), 2);
}

#[tokio::test]
async fn plaintext_another_ca_an_expired_cert_and_a_stranger_are_refused() {
    let app = Upstream::http1("log-app").await;
    let mesh = Mesh::start(
        "log-service",
        app.addr(),
        Duration::from_secs(600),
        ALLOW_ORDER,
    )
    .await;
    let inbound = mesh.log.inbound_addr();

    // Plaintext: the strict inbound listener never answers HTTP.
    let plain = async {
        let mut conn = HttpConn::h1(inbound).await?;
        conn.get("log-service", "/hello").await
    }
    .await;
    assert!(
        plain.is_err(),
        "plaintext was answered: {:?}",
        plain.map(|r| r.status)
    );

    // A certificate from another CA (the client trusts ours, so only the server's
    // check of the client certificate can refuse it).
    let other = Ca::generate("cluster.local", Duration::from_secs(600)).unwrap();
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let issued = other
        .sign_csr(csr.der(), &WorkloadIdentity::new("shop", "order").unwrap())
        .unwrap();
    let root = mesh.certify("tok-billing").await.trust_root;
    let stranger = TlsStore::new(Credentials {
        chain: vec![issued.cert_der.clone()],
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        trust_root: root.clone(),
        not_after: issued.not_after,
    })
    .unwrap();
    assert!(
        call_inbound(&stranger, inbound, "log-service")
            .await
            .is_err()
    );

    // An expired certificate signed by the mesh root itself.
    let (ca_pem, key_pem) = mesh.ca_files();
    let ca =
        Ca::from_pem_pair("cluster.local", &ca_pem, &key_pem, Duration::from_secs(60)).unwrap();
    let (leaf, leaf_key) = ca.issue_expired(ORDER).unwrap();
    let expired = TlsStore::new(Credentials {
        chain: vec![leaf],
        key: PrivatePkcs8KeyDer::from(leaf_key),
        trust_root: root,
        not_after: std::time::SystemTime::now() - Duration::from_secs(3600),
    })
    .unwrap();
    assert!(
        call_inbound(&expired, inbound, "log-service")
            .await
            .is_err()
    );

    // A mesh identity outside `inbound.allow`: authenticated, then forbidden.
    let billing = TlsStore::new(mesh.certify("tok-billing").await).unwrap();
    assert_eq!(billing.spiffe_id().as_deref(), Some(BILLING));
    let (seen, status, reason) = call_inbound(&billing, inbound, "log-service")
        .await
        .unwrap();
    assert_eq!(seen.server_id.as_deref(), Some(LOG));
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(reason, "forbidden");

    // None of them reached the application.
    assert_eq!(app.requests(), 0);
    // The order sidecar refuses a server that is not the identity the policy names.
    let old = mesh.order.version().await;
    mesh.order
        .write_policy(&log_policy("log-service", inbound, ALLOW_ORDER).replace(LOG, BILLING));
    mesh.order.wait_version_change(old.as_deref()).await;
    assert_eq!(
        through_order(&mesh.order, "log-service").await.unwrap(),
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(app.requests(), 0);
}

#[tokio::test]
async fn permissive_inbound_serves_plaintext_without_an_identity_and_limits_per_peer() {
    let app = Upstream::http1("log-app").await;
    let cp = TestControlPlane::start_with_ca(&[], TOKENS, Duration::from_secs(600)).await;
    // No allow list; one request per peer identity (and one bucket for plaintext).
    let inbound = "    rateLimit: { perSecond: 1, burst: 1, key: { peerIdentity: true } }";
    let mesh = Mesh::start_on(cp, "log-service", app.addr(), inbound, true).await;
    let addr = mesh.log.inbound_addr();

    let order = TlsStore::new(mesh.certify("tok-order").await).unwrap();
    let billing = TlsStore::new(mesh.certify("tok-billing").await).unwrap();
    let status = |r: Result<(Seen, StatusCode, String), BoxError>| r.unwrap().1;
    assert_eq!(status(call_inbound(&order, addr, "log-service").await), 200);
    assert_eq!(
        status(call_inbound(&order, addr, "log-service").await),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another identity has a bucket of its own.
    assert_eq!(
        status(call_inbound(&billing, addr, "log-service").await),
        200
    );
    // Plaintext is served on the same port, as nobody in particular.
    let mut conn = HttpConn::h1(addr).await.unwrap();
    assert_eq!(conn.get("log-service", "/x").await.unwrap().status, 200);
    assert_eq!(app.requests(), 3);
}

/// A policy expecting the wrong identity of an address (here the billing identity of
/// the log sidecar's port) fails its own requests (502, then 503 while the address is
/// ejected for it) and has the address ejected for that identity only: a policy
/// expecting the identity the address proves keeps reaching it. Endpoint state used to be kept per address alone, and the wrong
/// policy's failures turned the right one's requests into 503s.
#[tokio::test]
async fn a_wrong_identity_in_one_policy_takes_the_address_from_no_other_policy() {
    let app = Upstream::http1("log-app").await;
    let mesh = Mesh::start(
        "log-service",
        app.addr(),
        Duration::from_secs(600),
        ALLOW_ORDER,
    )
    .await;
    let log_inbound = mesh.log.inbound_addr();
    let wrong = format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: wrong-id, namespace: shop }}
spec:
  host: wrong-id
  backends:
    log: {{ addresses: ["{log_inbound}"], identity: "{BILLING}" }}
  routes:
    - name: all
"#
    );
    let both = format!(
        "{}---\n{wrong}",
        log_policy("log-service", log_inbound, ALLOW_ORDER)
    );
    let order = TestProxy::start_with(
        &both,
        ProxyOptions {
            mtls: Some(mesh.cp.mesh_tls("tok-order")),
            ..Default::default()
        },
    )
    .await;
    for i in 0..3 {
        // 502 from the failed handshake, then 503 while the address is ejected for it.
        let wrong = through_order(&order, "wrong-id").await.unwrap();
        assert!(
            wrong == StatusCode::BAD_GATEWAY || i > 0 && wrong == StatusCode::SERVICE_UNAVAILABLE,
            "request {i}: {wrong}"
        );
        assert_eq!(
            through_order(&order, "log-service").await.unwrap(),
            StatusCode::OK
        );
    }
    assert_eq!(app.requests(), 3);
    let endpoints = order.admin_json("/endpoints").await;
    let of = |id: &str| {
        endpoints
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == log_inbound.to_string() && e["identity"] == id)
            .unwrap_or_else(|| panic!("{id}: {endpoints}"))["health"]
            .clone()
    };
    assert_eq!(of(LOG), "healthy", "{endpoints}");
    assert_ne!(of(BILLING), "healthy", "{endpoints}");
}

#[tokio::test]
async fn grpc_crosses_the_mtls_hop_over_h2() {
    let server = GrpcServer::start().await;
    let mesh = Mesh::start("echo", server.addr(), Duration::from_secs(600), ALLOW_ORDER).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.order.outbound_addr()))
            .unwrap()
            .origin("http://echo".parse().unwrap())
            .connect()
            .await
            .unwrap();
    let mut client = EchoClient::new(channel);
    let resp = client
        .unary(EchoRequest {
            message: "over mTLS".into(),
            count: 0,
            fail_code: 0,
        })
        .await
        .expect("unary call through the mTLS hop");
    assert_eq!(resp.into_inner().message, "over mTLS");
    let status = client
        .unary(EchoRequest {
            message: "x".into(),
            count: 0,
            fail_code: tonic::Code::NotFound as i32,
        })
        .await
        .expect_err("the server fails this call");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let metrics = mesh.log.admin_get("/metrics").await.1;
    assert!(
        metrics.contains(&format!(r#"peer_identity="{ORDER}""#)),
        "{metrics}"
    );
}

/// Certificates live 10 s, so each sidecar renews every 7–8 s. Requests run
/// without pause over pooled connections while every rotation happens, and after
/// each rotation of the order sidecar a burst of concurrent requests forces new
/// upstream connections (handshakes with the new certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_rotations_under_continuous_load_fail_no_request() {
    let app = Upstream::http1("log-app").await;
    let mesh = Mesh::start(
        "log-service",
        app.addr(),
        Duration::from_secs(10),
        ALLOW_ORDER,
    )
    .await;
    let (order_store, log_store) = (
        mesh.order.tls_store().unwrap(),
        mesh.log.tls_store().unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let outbound = mesh.order.outbound_addr();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        workers.push(tokio::spawn(async move {
            let mut conn = HttpConn::h1(outbound).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                match conn.get("log-service", "/load").await {
                    Ok(r) if r.status == StatusCode::OK => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.lock().unwrap().push(format!(
                        "{} {}",
                        r.status,
                        r.header("x-sluice-reason")
                    )),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }

    let mut installs = order_store.watch_installs();
    let mut bursts = 0;
    let rotations = async {
        loop {
            installs.changed().await.unwrap();
            // A burst wider than the pool: new upstream connections, new certificate.
            let burst: Vec<_> = (0..12)
                .map(|_| tokio::spawn(async move { through_order_fresh(outbound).await }))
                .collect();
            for b in burst {
                match b.await.unwrap() {
                    Ok(StatusCode::OK) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.lock().unwrap().push(format!("burst: {other:?}")),
                }
            }
            bursts += 1;
            if order_store.installs() >= 4 && log_store.installs() >= 4 {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(90), rotations)
        .await
        .expect("both sidecars rotated three times within 90 s");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(bursts >= 3);
    let served = ok.load(Ordering::Relaxed);
    assert!(
        served > 100,
        "only {served} requests ran during the rotations"
    );
    // New handshakes get the log sidecar's current certificate.
    let client = TlsStore::new(mesh.certify("tok-order").await).unwrap();
    let config = client.client_config_for(Some(LOG), &[b"http/1.1"]).unwrap();
    let tcp = TcpStream::connect(mesh.log.inbound_addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("log").unwrap(), tcp)
        .await
        .unwrap();
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let expiry = x509_not_after(&presented);
    assert_eq!(
        expiry,
        log_store
            .not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    );
}

async fn through_order_fresh(outbound: SocketAddr) -> Result<StatusCode, String> {
    let mut conn = HttpConn::h1(outbound).await.map_err(|e| e.to_string())?;
    conn.get("log-service", "/burst")
        .await
        .map(|r| r.status)
        .map_err(|e| e.to_string())
}

/// A certificate's notAfter in Unix seconds.
fn x509_not_after(der: &CertificateDer<'_>) -> u64 {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    cert.validity().not_after.timestamp() as u64
}
