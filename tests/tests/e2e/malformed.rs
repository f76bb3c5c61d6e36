//! Malformed HTTP/1.1 and HTTP/2 over raw TCP: each input is refused with a 4xx, an
//! HTTP/2 error, or a closed connection; none is answered as if it were fine, and the
//! proxy keeps serving well-formed requests after every one.

use std::sync::atomic::Ordering;

use sluice_e2e::{
    HttpConn, ProxyOptions, TestProxy, Upstream, malformed, single_backend_policy, tcp_coded,
};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_the_proxy_keeps_serving() {
    let up = Upstream::auto("steady").await;
    let proxy = TestProxy::start(&single_backend_policy("steady", "steady", up.addr())).await;
    let mut failed = Vec::new();
    for attack in malformed::attacks("steady") {
        let outcome = malformed::send(proxy.outbound_addr(), &attack).await;
        if !outcome.ok {
            failed.push(format!("{}: {}", outcome.name, outcome.seen));
        }
        let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
        let r = conn.get("steady", "/").await.unwrap();
        assert_eq!(r.status, 200, "after {}", attack.name);
    }
    assert!(failed.is_empty(), "not refused:\n{}", failed.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_request_body_is_the_clients_fault_400_not_502() {
    let up = Upstream::auto("steady").await;
    let proxy = TestProxy::start(&single_backend_policy("steady", "steady", up.addr())).await;
    let bad_chunk = malformed::attacks("steady")
        .into_iter()
        .find(|a| a.name == "chunk size that is not hex")
        .unwrap();
    let outcome = malformed::send(proxy.outbound_addr(), &bad_chunk).await;
    assert_eq!(outcome.seen, "400", "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_head_over_64_kib_is_a_502_and_the_proxy_keeps_serving() {
    // Up to 64 KiB passes on both protocols (the HTTP/2 client took 16 KiB once).
    let up = Upstream::auto("steady").await;
    let proxy = TestProxy::start(&single_backend_policy("steady", "steady", up.addr())).await;
    for (protocol, conn) in [
        (
            "HTTP/1.1",
            HttpConn::h1(proxy.outbound_addr()).await.unwrap(),
        ),
        ("HTTP/2", HttpConn::h2(proxy.outbound_addr()).await.unwrap()),
    ] {
        let mut conn = conn;
        let r = conn.get("steady", "/head-bytes/71680").await.unwrap();
        let reason = r.headers.get("x-sluice-reason");
        assert_eq!(r.status, 502, "{protocol}: {reason:?}");
        for n in [1024, 40960] {
            let r = conn
                .get("steady", &format!("/head-bytes/{n}"))
                .await
                .unwrap();
            let reason = r.headers.get("x-sluice-reason");
            assert_eq!(r.status, 200, "{protocol} {n}: {reason:?}");
            assert_eq!(&r.body[..], b"steady");
        }
    }
}

/// A transfer coding besides `chunked` cannot be handed on (hyper takes only the chunked
/// framing off, and the bytes under it would pass as plain): a request with one is a
/// 400 `bad-request` that never reaches the upstream, an upstream answer with one a
/// 502; a plain chunked body goes through both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_besides_chunked_is_refused_both_ways() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = tcp_coded(listener);
    let proxy = TestProxy::start(&single_backend_policy("coded", "coded", addr)).await;

    let refused = malformed::attacks("coded")
        .into_iter()
        .find(|a| a.name == "a transfer coding besides chunked (gzip, chunked)")
        .unwrap();
    let outcome = malformed::send(proxy.outbound_addr(), &refused).await;
    assert_eq!(outcome.seen, "400", "{outcome:?}");
    assert_eq!(seen.load(Ordering::SeqCst), 0);
    // The same on the inbound side, in front of the application.
    let inbound = TestProxy::start_with(
        &single_backend_policy("coded", "coded", addr),
        ProxyOptions {
            outbound: false,
            inbound: true,
            app: Some(addr),
            service: Some("coded".into()),
            ..Default::default()
        },
    )
    .await;
    let outcome = malformed::send(inbound.inbound_addr(), &refused).await;
    assert_eq!(outcome.seen, "400", "inbound: {outcome:?}");
    assert_eq!(seen.load(Ordering::SeqCst), 0);

    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let r = conn.get("coded", "/gzip").await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("x-sluice-reason"), "upstream-unavailable");
    assert!(
        r.text().contains("transfer coding other than chunked"),
        "{}",
        r.text()
    );
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let r = conn.get("coded", "/plain").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(&r.body[..], b"hello");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}
