//! Slow clients: a request body that stops arriving frees its upstream connection
//! after the request body timeout and gets 408, so stalled clients cannot pin
//! upstream connections beyond it; an idle keep-alive connection is closed after the
//! idle timeout.

use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_e2e::{ProxyOptions, TestProxy, WAIT, single_backend_policy, tcp_sink, wait_until};
use sluice_proxy::timeouts::Timeouts;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SLOW_CLIENTS: usize = 20;

fn with_timeouts(timeouts: Timeouts) -> ProxyOptions {
    ProxyOptions {
        timeouts,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_bodies_free_their_upstream_connections_with_408() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let open = tcp_sink(listener);
    let proxy = TestProxy::start_with(
        &single_backend_policy("slow", "slow", upstream),
        with_timeouts(Timeouts {
            request_body: Duration::from_secs(1),
            ..Timeouts::default()
        }),
    )
    .await;

    // Each client promises 1,000 bytes, sends 2 and stalls.
    let mut clients = Vec::new();
    for _ in 0..SLOW_CLIENTS {
        let mut s = TcpStream::connect(proxy.outbound_addr()).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: slow\r\nContent-Length: 1000\r\n\r\nab")
            .await
            .unwrap();
        clients.push(s);
    }
    // The requests reached the upstream: each holds one of its connections...
    wait_until(
        "every stalled request holds an upstream connection",
        WAIT,
        || std::future::ready(open.load(Ordering::SeqCst) == SLOW_CLIENTS as u64),
    )
    .await;
    // ...until the body timeout frees them all, while the clients still hold theirs.
    wait_until("the upstream connections are freed", WAIT, || {
        std::future::ready(open.load(Ordering::SeqCst) == 0)
    })
    .await;
    for mut s in clients {
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, s.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "closed without an answer");
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(text.starts_with("http/1.1 408"), "{text}");
        assert!(text.contains("x-sluice-reason: request-timeout"), "{text}");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let up = sluice_e2e::Upstream::http1("idle").await;
    let proxy = TestProxy::start_with(
        &single_backend_policy("idle", "idle", up.addr()),
        with_timeouts(Timeouts {
            idle: Duration::from_secs(1),
            ..Timeouts::default()
        }),
    )
    .await;
    let mut s = TcpStream::connect(proxy.outbound_addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n")
        .await
        .unwrap();
    // Read the answer, then nothing more comes until the proxy closes the connection.
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the idle connection is closed")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    assert!(
        all.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&all)
    );
    proxy.shutdown().await;
}
