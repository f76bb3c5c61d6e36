//! Malformed HTTP/1.1 and HTTP/2 over raw TCP: each input is refused with a 4xx, an
//! HTTP/2 error, or a closed connection; none is answered as if it were fine, and the
//! proxy keeps serving well-formed requests after every one.

use sluice_e2e::{HttpConn, TestProxy, Upstream, malformed, single_backend_policy};

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
        let r = conn.get("steady", "/head-bytes/1024").await.unwrap();
        let reason = r.headers.get("x-sluice-reason");
        assert_eq!(r.status, 200, "{protocol}: {reason:?}");
        assert_eq!(&r.body[..], b"steady");
    }
}
