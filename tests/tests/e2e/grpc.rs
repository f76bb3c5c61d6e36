//! gRPC through Sluice: client → outbound proxy → inbound proxy → tonic server.

use std::net::SocketAddr;

use sluice_e2e::grpc::GrpcServer;
use sluice_e2e::grpc::proto::EchoRequest;
use sluice_e2e::grpc::proto::echo_client::EchoClient;
use sluice_e2e::{ProxyOptions, TestProxy, single_backend_policy};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

/// A channel to `addr` whose requests carry `:authority: echo`.
async fn channel(addr: SocketAddr) -> Channel {
    channel_for(addr, "echo").await
}

/// A channel to `addr` whose requests carry `:authority: host`.
async fn channel_for(addr: SocketAddr, host: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .origin(format!("http://{host}").parse().unwrap())
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect the gRPC client")
}

fn request(message: &str, count: u32, fail_code: i32) -> Request<EchoRequest> {
    Request::new(EchoRequest {
        message: message.to_string(),
        count,
        fail_code,
    })
}

async fn check_echo(mut client: EchoClient<Channel>) {
    // Unary: message and metadata both ways.
    let mut req = request("hello", 0, 0);
    req.metadata_mut()
        .insert("x-test-meta", "m-1".parse().unwrap());
    let resp = client.unary(req).await.expect("unary call");
    assert_eq!(
        resp.metadata()
            .get("x-echo-meta")
            .and_then(|v| v.to_str().ok()),
        Some("m-1")
    );
    assert_eq!(resp.into_inner().message, "hello");

    // Unary error: a trailers-only answer keeps its code, message and metadata.
    for code in [Code::NotFound, Code::PermissionDenied, Code::Unavailable] {
        let status = client
            .unary(request("x", 0, code as i32))
            .await
            .expect_err("the server fails this call");
        assert_eq!(status.code(), code, "{status:?}");
        assert_eq!(
            status.message(),
            format!("asked to fail with {}", code as i32)
        );
        assert_eq!(
            status
                .metadata()
                .get("x-fail-meta")
                .and_then(|v| v.to_str().ok()),
            Some("unary")
        );
    }

    // Server streaming ending with OK in the trailers.
    let mut stream = client
        .server_stream(request("tick", 5, 0))
        .await
        .expect("stream call")
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(reply) = stream.message().await.expect("stream item") {
        assert_eq!(reply.message, format!("tick #{}", reply.seq));
        seqs.push(reply.seq);
    }
    assert_eq!(seqs, [0, 1, 2, 3, 4]);

    // Server streaming ending with an error status in the trailers, after the data.
    let mut stream = client
        .server_stream(request("tock", 3, Code::Aborted as i32))
        .await
        .expect("stream call")
        .into_inner();
    let mut got = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(reply)) => {
                assert_eq!(reply.seq, got);
                got += 1;
            }
            Ok(None) => panic!("the stream ended with OK; the server sent Aborted"),
            Err(status) => break status,
        }
    };
    assert_eq!(got, 3, "all replies before the trailers arrived");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("x-fail-meta")
            .and_then(|v| v.to_str().ok()),
        Some("stream"),
        "trailer metadata passes"
    );

    // Many calls at once on one HTTP/2 connection.
    let calls = (0..32).map(|i| {
        let mut c = client.clone();
        async move {
            let r = c.unary(request(&format!("m{i}"), 0, 0)).await;
            (i, r.map(|r| r.into_inner().message))
        }
    });
    for (i, r) in futures_util::future::join_all(calls).await {
        assert_eq!(r.expect("concurrent call"), format!("m{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_pass_outbound_then_inbound() {
    let server = GrpcServer::start().await;
    // The callee's sidecar: inbound only, forwarding to the gRPC server.
    let inbound = TestProxy::start_with(
        &single_backend_policy("echo", "echo", server.addr()),
        ProxyOptions {
            outbound: false,
            inbound: true,
            app: Some(server.addr()),
            service: Some("echo".into()),
            ..Default::default()
        },
    )
    .await;
    // The caller's sidecar: outbound, routing `echo` to the callee's inbound listener.
    let outbound = TestProxy::start(&single_backend_policy(
        "echo",
        "echo",
        inbound.inbound_addr(),
    ))
    .await;

    check_echo(EchoClient::new(channel(outbound.outbound_addr()).await)).await;
    // And straight into the inbound listener, as a caller without a sidecar would.
    check_echo(EchoClient::new(channel(inbound.inbound_addr()).await)).await;

    outbound.shutdown().await;
    inbound.shutdown().await;
    server.shutdown().await;
}

/// The `x-sluice-reason` a refused call carries in its metadata.
fn sluice_reason(status: &tonic::Status) -> Option<&str> {
    status
        .metadata()
        .get("x-sluice-reason")
        .and_then(|v| v.to_str().ok())
}

/// What the proxy itself refuses reaches a gRPC caller as a gRPC status (trailers-only,
/// HTTP 200), which tonic reads as the call's code; the same refusal is an HTTP status
/// for any other caller (the `authority` and `governance` tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_refusals_reach_a_grpc_caller_as_grpc_statuses() {
    let server = GrpcServer::start().await;
    let policy = format!(
        "{}      rateLimit: {{ perSecond: 1, burst: 1 }}\n",
        single_backend_policy("echo", "echo", server.addr())
    );
    let proxy = TestProxy::start(&policy).await;

    // The route's limit: one call now and one a second; back-to-back calls soon meet it.
    let mut client = EchoClient::new(channel(proxy.outbound_addr()).await);
    let mut refused = None;
    for _ in 0..50 {
        if let Err(status) = client.unary(request("hi", 0, 0)).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("the rate limit refuses a call within 50");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "rate limited by sluice");
    assert_eq!(sluice_reason(&status), Some("rate-limited"));

    // A host no policy names.
    let mut client = EchoClient::new(channel_for(proxy.outbound_addr(), "nowhere").await);
    let status = client
        .unary(request("hi", 0, 0))
        .await
        .expect_err("no route");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_eq!(sluice_reason(&status), Some("no-route"));

    proxy.shutdown().await;
    server.shutdown().await;
}
