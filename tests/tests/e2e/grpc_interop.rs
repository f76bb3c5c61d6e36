//! gRPC's interop cases (`sluice_e2e::interop`) run straight to the server and then
//! through Sluice on every path a call can take: the outbound listener alone, outbound
//! then inbound in plaintext, and outbound then inbound over the mTLS hop. Every path
//! must observe exactly what the direct run observed.

use std::net::SocketAddr;
use std::time::Duration;

use sluice_e2e::interop::{InteropServer, run_cases};
use sluice_e2e::{ProxyOptions, TestControlPlane, TestProxy, single_backend_policy};
use tonic::transport::{Channel, Endpoint};

const HOST: &str = "interop";
const SERVER_ID: &str = "spiffe://cluster.local/ns/e2e/sa/interop";

/// A channel to `addr` whose requests carry `:authority: interop`.
async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .origin(format!("http://{HOST}").parse().unwrap())
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect the interop client")
}

/// The outbound policy of the mTLS path: the callee's sidecar, dialled with mTLS.
fn mtls_policy(inbound: SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: interop, namespace: e2e }}
spec:
  host: {HOST}
  backends:
    server: {{ addresses: ["{inbound}"], identity: "{SERVER_ID}" }}
  routes:
    - name: all
"#
    )
}

/// The callee's sidecar: inbound only, to the interop server.
async fn inbound_sidecar(server: SocketAddr, mtls: Option<sluice_e2e::MeshTls>) -> TestProxy {
    TestProxy::start_with(
        &single_backend_policy("interop", HOST, server),
        ProxyOptions {
            outbound: false,
            inbound: true,
            app: Some(server),
            service: Some(HOST.into()),
            mtls,
            ..Default::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_interop_cases_through_every_path_match_a_direct_run() {
    let server = InteropServer::start().await;
    let direct = run_cases(channel(server.addr()).await, &server).await;
    let failed: Vec<_> = direct
        .iter()
        .filter(|(_, r)| r.starts_with("FAIL"))
        .collect();
    assert!(failed.is_empty(), "direct run: {failed:#?}");

    // Outbound alone.
    let outbound = TestProxy::start(&single_backend_policy("interop", HOST, server.addr())).await;
    // Outbound → inbound, plaintext.
    let inbound = inbound_sidecar(server.addr(), None).await;
    let caller = TestProxy::start(&single_backend_policy(
        "interop",
        HOST,
        inbound.inbound_addr(),
    ))
    .await;
    // Outbound → inbound over mTLS, identities from the control plane's CA.
    let cp = TestControlPlane::start_with_ca(
        &[],
        &[
            ("tok-client", "e2e", "client"),
            ("tok-server", "e2e", "interop"),
        ],
        Duration::from_secs(600),
    )
    .await;
    let mtls_inbound = inbound_sidecar(server.addr(), Some(cp.mesh_tls("tok-server"))).await;
    let mtls_caller = TestProxy::start_with(
        &mtls_policy(mtls_inbound.inbound_addr()),
        ProxyOptions {
            mtls: Some(cp.mesh_tls("tok-client")),
            ..Default::default()
        },
    )
    .await;

    let paths = [
        ("outbound", outbound.outbound_addr()),
        ("outbound → inbound", caller.outbound_addr()),
        ("outbound → inbound over mTLS", mtls_caller.outbound_addr()),
    ];
    for (path, addr) in paths {
        let through = run_cases(channel(addr).await, &server).await;
        assert_eq!(
            through, direct,
            "{path}: the interop cases differ from a direct run"
        );
    }
    // The mTLS hop was taken: the callee's sidecar saw the caller's identity.
    let metrics = mtls_inbound.admin_get("/metrics").await.1;
    assert!(
        metrics.contains(r#"peer_identity="spiffe://cluster.local/ns/e2e/sa/client""#),
        "{metrics}"
    );

    for proxy in [outbound, caller, inbound, mtls_caller, mtls_inbound] {
        proxy.shutdown().await;
    }
    server.shutdown().await;
}
