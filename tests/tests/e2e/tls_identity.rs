//! mTLS between two real TLS endpoints on loopback, with certificates issued by
//! the control plane's CA through its Identity service.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use sluice_api::pb::identity_client::IdentityClient;
use sluice_control_plane::ca::{Ca, TokenFile, WorkloadIdentity};
use sluice_control_plane::identity::IdentityService;
use sluice_proxy::tls::{Credentials, TlsStore, peer_identity, peer_spiffe_id, run_renewal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;

const TOKENS: &str = r#"
{"token":"tok-order","namespace":"shop","serviceAccount":"order"}
{"token":"tok-log","namespace":"shop","serviceAccount":"log"}
{"token":"tok-billing","namespace":"shop","serviceAccount":"billing"}
"#;
const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";
const LOG: &str = "spiffe://cluster.local/ns/shop/sa/log";
const BILLING: &str = "spiffe://cluster.local/ns/shop/sa/billing";

/// A control plane Identity service on a real socket; returns a client for it.
async fn identity_service(ca: Arc<Ca>) -> IdentityClient<tonic::transport::Channel> {
    let tokens = TokenFile::parse(std::path::Path::new("tokens"), TOKENS).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityService::new(ca, Arc::new(tokens)).into_server())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    IdentityClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

async fn creds(ca: &Arc<Ca>, token: &str) -> Credentials {
    let mut client = identity_service(ca.clone()).await;
    Credentials::request(&mut client, token).await.unwrap()
}

/// An inbound-like TLS listener: loads the store's server config per
/// connection, answers each handshake with the peer's SPIFFE ID and the ALPN.
async fn tls_server(store: Arc<TlsStore>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(store.server_config().unwrap());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                assert_eq!(
                    peer_identity(conn).map(|p| p.0.to_string()),
                    conn.peer_certificates().and_then(peer_spiffe_id)
                );
                let id = conn.peer_certificates().and_then(peer_spiffe_id);
                let alpn = conn
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                let line = format!("{} {}\n", id.unwrap_or_default(), alpn.unwrap_or_default());
                let _ = tls.write_all(line.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// Dials `addr` as `client` expecting `expected`; returns what the server saw.
async fn call(
    client: &TlsStore,
    expected: Option<&str>,
    addr: std::net::SocketAddr,
) -> Result<String, std::io::Error> {
    let connector = tokio_rustls::TlsConnector::from(client.client_config(expected).unwrap());
    let tcp = TcpStream::connect(addr).await?;
    // Mesh certificates carry no DNS name; the verifier checks the SPIFFE ID instead.
    let name = ServerName::try_from("mesh.sluice.invalid").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let mut out = String::new();
    // With TLS 1.3 the server judges our certificate after our side finished,
    // so a refusal shows up here, as an alert instead of the answer.
    tls.read_to_string(&mut out).await?;
    if out.is_empty() {
        return Err(std::io::Error::other("server closed without answering"));
    }
    Ok(out.trim_end().to_string())
}

fn ca() -> Arc<Ca> {
    Arc::new(Ca::generate("cluster.local", Duration::from_secs(600)).unwrap())
}

#[tokio::test]
async fn mutual_tls_with_ca_issued_certs_carries_peer_identity_and_alpn() {
    let ca = ca();
    let server = Arc::new(TlsStore::new(creds(&ca, "tok-log").await).unwrap());
    let client = TlsStore::new(creds(&ca, "tok-order").await).unwrap();
    assert_eq!(client.spiffe_id().as_deref(), Some(ORDER));
    let addr = tls_server(server).await;
    assert_eq!(
        call(&client, Some(LOG), addr).await.unwrap(),
        format!("{ORDER} h2")
    );
    // Without an expected identity any mesh server is accepted.
    assert_eq!(
        call(&client, None, addr).await.unwrap(),
        format!("{ORDER} h2")
    );
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    let (ca, other) = (ca(), ca());
    let server = Arc::new(TlsStore::new(creds(&ca, "tok-log").await).unwrap());
    let mut stranger = creds(&other, "tok-order").await;
    // The stranger trusts our root (so it accepts the server) but its own
    // certificate comes from another CA: the server must refuse it.
    stranger.trust_root = ca.root_der().clone();
    let stranger = TlsStore::new(stranger).unwrap();
    let addr = tls_server(server).await;
    assert!(call(&stranger, Some(LOG), addr).await.is_err());
}

#[tokio::test]
async fn server_cert_from_another_ca_is_refused_by_client() {
    let (ca, other) = (ca(), ca());
    let server = Arc::new(TlsStore::new(creds(&other, "tok-log").await).unwrap());
    let client = TlsStore::new(creds(&ca, "tok-order").await).unwrap();
    let addr = tls_server(server).await;
    let err = call(&client, Some(LOG), addr).await.unwrap_err();
    // Both roots share a subject name, so webpki finds "an issuer" and the
    // signature check is what fails.
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_client_cert_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    let ca = Arc::new(
        Ca::load_or_generate("cluster.local", &cert, &key, Duration::from_secs(600)).unwrap(),
    );
    let server = Arc::new(TlsStore::new(creds(&ca, "tok-log").await).unwrap());

    // Signed by the same root, expired an hour ago.
    let (leaf, leaf_key) = ca.issue_expired(ORDER).unwrap();
    let expired = TlsStore::new(Credentials {
        chain: vec![leaf],
        key: PrivatePkcs8KeyDer::from(leaf_key),
        trust_root: ca.root_der().clone(),
        not_after: std::time::SystemTime::now() - Duration::from_secs(3600),
    })
    .unwrap();
    let addr = tls_server(server).await;
    assert!(call(&expired, Some(LOG), addr).await.is_err());
}

#[tokio::test]
async fn wrong_spiffe_identity_is_refused_by_client() {
    let ca = ca();
    let server = Arc::new(TlsStore::new(creds(&ca, "tok-log").await).unwrap());
    let client = TlsStore::new(creds(&ca, "tok-order").await).unwrap();
    let addr = tls_server(server).await;
    let err = call(&client, Some(BILLING), addr).await.unwrap_err();
    assert!(err.to_string().contains("not the expected"), "{err}");
}

#[tokio::test]
async fn installed_credentials_serve_the_next_handshake_without_restarting_the_listener() {
    let ca = ca();
    let server = Arc::new(TlsStore::new(creds(&ca, "tok-log").await).unwrap());
    let client = TlsStore::new(creds(&ca, "tok-order").await).unwrap();
    let addr = tls_server(server.clone()).await;
    assert!(call(&client, Some(LOG), addr).await.is_ok());
    server.install(creds(&ca, "tok-billing").await).unwrap();
    assert!(call(&client, Some(BILLING), addr).await.is_ok());
    assert!(call(&client, Some(LOG), addr).await.is_err());
}

/// Credentials signed directly by `ca` (no socket: this test runs on paused time).
fn direct(ca: &Ca, sa: &str) -> Credentials {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let issued = ca
        .sign_csr(csr.der(), &WorkloadIdentity::new("shop", sa).unwrap())
        .unwrap();
    Credentials {
        chain: vec![CertificateDer::from(issued.cert_der.to_vec())],
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        trust_root: ca.root_der().clone(),
        not_after: issued.not_after,
    }
}

#[tokio::test(start_paused = true)]
async fn renewal_happens_between_70_and_80_percent_of_lifetime() {
    let ca = Arc::new(Ca::generate("cluster.local", Duration::from_secs(100)).unwrap());
    let store = Arc::new(TlsStore::new(direct(&ca, "order")).unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(run_renewal(store.clone(), {
        let (ca, calls) = (ca.clone(), calls.clone());
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            let creds = direct(&ca, "order-renewed");
            async move { Ok(creds) }
        }
    }));
    tokio::time::sleep(Duration::from_secs(69)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 0, "renewed before 70 %");
    assert_eq!(store.spiffe_id().as_deref(), Some(ORDER));
    tokio::time::sleep(Duration::from_millis(11_100)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not renewed by 80 %");
    assert_eq!(
        store.spiffe_id().as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/order-renewed")
    );
    task.abort();
}

#[test]
fn renew_delay_is_70_to_80_percent() {
    let l = Duration::from_secs(1000);
    assert_eq!(
        sluice_proxy::tls::renew_delay(l, 0.0),
        Duration::from_secs(700)
    );
    assert_eq!(
        sluice_proxy::tls::renew_delay(l, 0.5),
        Duration::from_secs(750)
    );
    assert!(sluice_proxy::tls::renew_delay(l, 0.999) < Duration::from_secs(800));
}
