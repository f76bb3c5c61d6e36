//! `/app-health/...` on the admin port over real sockets: the proxy calls the
//! application's original probe (port, path, headers, HTTP or HTTPS) and relays its status.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sluice_proxy::{ProxyConfig, start};
use tokio::net::{TcpListener, TcpStream};

/// The request target, `x-probe` and `user-agent` of a probe.
type Probe = (String, Option<String>, Option<String>);

/// What the application saw of the last probe.
#[derive(Default)]
struct Seen {
    status: AtomicU16,
    last: std::sync::Mutex<Option<Probe>>,
}

/// A plain-HTTP or (with `tls`) HTTPS application answering `seen.status` and recording
/// the path, `x-probe` and `user-agent` of each request.
async fn app(seen: Arc<Seen>, tls: Option<tokio_rustls::TlsAcceptor>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let header =
                            |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                        *seen.last.lock().unwrap() = Some((
                            req.uri().to_string(),
                            header("x-probe"),
                            header("user-agent"),
                        ));
                        let status = StatusCode::from_u16(seen.status.load(Ordering::SeqCst))
                            .unwrap_or(StatusCode::OK);
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"app\n")));
                        *resp.status_mut() = status;
                        Ok::<_, Infallible>(resp)
                    }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(tls) => {
                        if let Ok(s) = tls.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            });
        }
    });
    addr
}

/// A self-signed server certificate, as applications serving HTTPS probes often have.
fn self_signed() -> tokio_rustls::TlsAcceptor {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["app.local".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn get(admin: SocketAddr, path: &str) -> (StatusCode, String) {
    let stream = TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", admin.to_string())
        .header("user-agent", "kube-probe/1.33")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_probes_reach_the_application_and_relay_its_status() {
    let plain = Arc::new(Seen::default());
    plain.status.store(200, Ordering::SeqCst);
    let plain_addr = app(plain.clone(), None).await;
    let secure = Arc::new(Seen::default());
    secure.status.store(204, Ordering::SeqCst);
    let secure_addr = app(secure.clone(), Some(self_signed())).await;
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();

    // The JSON exactly as the webhook writes it into SLUICE_APP_PROBES.
    let probes = serde_json::json!({
        "/app-health/orders/livez": {"port": plain_addr.port(), "path": "/healthz?deep=1",
            "scheme": "HTTP", "httpHeaders": [{"name": "X-Probe", "value": "live"}]},
        "/app-health/orders/readyz": {"port": secure_addr.port(), "path": "/ready", "scheme": "HTTPS"},
        "/app-health/sidecar/startupz": {"port": dead.port(), "path": "/", "scheme": "HTTP"},
    });
    let proxy = start(ProxyConfig {
        admin: "127.0.0.1:0".parse().unwrap(),
        no_outbound: true,
        app_probes: Some(probes.to_string()),
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = proxy.admin_addr().unwrap();

    let (status, _) = get(admin, "/app-health/orders/livez").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        plain.last.lock().unwrap().clone().unwrap(),
        (
            "/healthz?deep=1".to_owned(),
            Some("live".to_owned()),
            Some("kube-probe/1.33".to_owned())
        ),
        "the original path, the probe's headers and the kubelet's user agent reach the app"
    );

    // The application turns unhealthy: the kubelet sees its status, not the proxy's.
    plain.status.store(500, Ordering::SeqCst);
    let (status, _) = get(admin, "/app-health/orders/livez").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);

    // HTTPS with a self-signed certificate, not verified, as the kubelet does.
    let (status, _) = get(admin, "/app-health/orders/readyz").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        secure.last.lock().unwrap().as_ref().map(|l| l.0.clone()),
        Some("/ready".to_owned())
    );

    // Nothing listening: a failure the kubelet counts, with the reason.
    let (status, body) = get(admin, "/app-health/sidecar/startupz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains(&dead.to_string()), "{body}");

    let (status, _) = get(admin, "/app-health/nobody/livez").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    proxy.shutdown().await;
}

#[tokio::test]
async fn malformed_probe_json_stops_the_start_with_a_clear_error() {
    let err = start(ProxyConfig {
        admin: "127.0.0.1:0".parse().unwrap(),
        no_outbound: true,
        app_probes: Some(r#"{"/app-health/a/livez": {"port": "http"}}"#.into()),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().starts_with("--app-probes: "), "{err}");
}
