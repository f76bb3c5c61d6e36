//! The identity service over a real gRPC socket.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use sluice_api::pb;
use sluice_api::pb::identity_client::IdentityClient;
use sluice_control_plane::ca::{Ca, TokenFile};
use sluice_control_plane::identity::IdentityService;
use tokio_stream::wrappers::TcpListenerStream;
use x509_parser::prelude::*;

async fn serve() -> (IdentityClient<tonic::transport::Channel>, Arc<Ca>) {
    let ca = Arc::new(Ca::generate("cluster.local", Duration::from_secs(600)).unwrap());
    let tokens = TokenFile::parse(
        std::path::Path::new("tokens"),
        r#"{"token":"tok-log","namespace":"shop","serviceAccount":"log"}"#,
    )
    .unwrap();
    let svc = IdentityService::new(ca.clone(), Arc::new(tokens));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc.into_server())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = IdentityClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (client, ca)
}

fn csr() -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["asks-for-this.example".to_string()]).unwrap();
    params.serialize_request(&key).unwrap().der().to_vec()
}

#[tokio::test]
async fn certify_issues_the_identity_the_token_proves() {
    let (mut client, ca) = serve().await;
    let resp = client
        .certify(pb::CertifyRequest {
            token: "tok-log".into(),
            csr_der: csr(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.trust_root_der, ca.root_der().to_vec());
    assert_eq!(resp.cert_chain_der.len(), 1);
    let (_, leaf) = X509Certificate::from_der(&resp.cert_chain_der[0]).unwrap();
    let (_, root) = X509Certificate::from_der(&resp.trust_root_der).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
    let names = &leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(
        names,
        &vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/log")]
    );
    assert_eq!(resp.not_after, leaf.validity().not_after.timestamp() as u64);
}

#[tokio::test]
async fn certify_refuses_unknown_token_and_bad_csr() {
    let (mut client, _ca) = serve().await;
    let err = client
        .certify(pb::CertifyRequest {
            token: "stolen".into(),
            csr_der: csr(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = client
        .certify(pb::CertifyRequest {
            token: "tok-log".into(),
            csr_der: b"not a csr".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn control_plane_serving_cert_verifies_against_the_mesh_root() {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ca = Ca::generate("cluster.local", Duration::from_secs(600)).unwrap();
    let (cert, key) = ca
        .issue_server_cert(
            &[
                "sluice-control-plane.sluice-system.svc".into(),
                "127.0.0.1".into(),
            ],
            Duration::from_secs(3600),
        )
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let _ = tls.write_all(b"ok").await;
                let _ = tls.shutdown().await;
            }
        }
    });

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root_der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    for name in ["sluice-control-plane.sluice-system.svc", "127.0.0.1"] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = connector
            .connect(ServerName::try_from(name).unwrap(), tcp)
            .await
            .unwrap();
        let mut out = String::new();
        tls.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "ok");
    }
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        connector
            .connect(ServerName::try_from("elsewhere.example").unwrap(), tcp)
            .await
            .is_err()
    );
}

/// The real control plane with its CA: the gRPC port is TLS with a serving
/// certificate from the mesh root, `Certify` and the policy stream both answer
/// over it, and a client trusting another root is refused.
#[tokio::test]
async fn control_plane_serves_certify_and_policies_over_tls() {
    use sluice_control_plane::{ControlPlaneConfig, IdentityConfig};

    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("a.yaml"),
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { name: a }\nspec:\n  host: a\n",
    )
    .unwrap();
    let ca = Arc::new(Ca::generate("cluster.local", Duration::from_secs(600)).unwrap());
    let tokens = TokenFile::parse(
        std::path::Path::new("tokens"),
        r#"{"token":"tok-log","namespace":"shop","serviceAccount":"log"}"#,
    )
    .unwrap();
    let root_file = dir.path().join("root.pem");
    let mut identity = IdentityConfig::new(ca.clone(), Arc::new(tokens));
    identity.write_trust_root = Some(root_file.clone());
    let cp = sluice_control_plane::start(ControlPlaneConfig {
        policy_dir: policies,
        identity: Some(identity),
        ..Default::default()
    })
    .await
    .unwrap();
    let url = cp.grpc_url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let root = std::fs::read(&root_file).unwrap();
    assert_eq!(cp.trust_root_pem().unwrap().as_bytes(), &root[..]);

    // Certify over TLS, verified against the written root by IP SAN.
    let channel = sluice_api::control_plane_endpoint(&url, Some(&root))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let resp = IdentityClient::new(channel.clone())
        .certify(pb::CertifyRequest {
            token: "tok-log".into(),
            csr_der: csr(),
        })
        .await
        .unwrap()
        .into_inner();
    let (_, leaf) = X509Certificate::from_der(&resp.cert_chain_der[0]).unwrap();
    assert!(format!("{:?}", leaf.subject_alternative_name()).contains("sa/log"));

    // The policy stream shares the port.
    let mut stream = pb::policy_discovery_client::PolicyDiscoveryClient::new(channel)
        .stream_policies(tokio_stream::iter([pb::ProxyMessage {
            message: Some(pb::proxy_message::Message::Hello(pb::Hello {
                node_id: "n1".into(),
                schema_version: sluice_config::SCHEMA_VERSION,
                ..Default::default()
            })),
        }]))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(Some(first.version), cp.policy_version());

    // A client trusting another root cannot connect; plaintext gRPC is refused too.
    let other = Ca::generate("cluster.local", Duration::from_secs(600)).unwrap();
    let refused = sluice_api::control_plane_endpoint(&url, Some(other.root_pem().as_bytes()))
        .unwrap()
        .connect()
        .await;
    assert!(refused.is_err());
    let plain_answered = match IdentityClient::connect(url.replace("https://", "http://")).await {
        Ok(mut c) => c
            .certify(pb::CertifyRequest {
                token: "tok-log".into(),
                csr_der: csr(),
            })
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!plain_answered);
    cp.shutdown().await;
}
