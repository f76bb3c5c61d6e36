//! SIGTERM drains: requests in flight finish, new connections are refused, `/ready` says
//! draining, exit 0.

use hyper::{Method, StatusCode};
use sluice_e2e::{ChildProxy, HttpConn, Upstream, WAIT, single_backend_policy, wait_until};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    const H1_REQUESTS: u64 = 12;
    const H2_STREAMS: u64 = 4;

    let upstream = Upstream::auto("slow").await;
    let mut proxy = ChildProxy::spawn(
        env!("CARGO_BIN_EXE_e2e-proxy").as_ref(),
        &single_backend_policy("slow", "slow", upstream.addr()),
        &["--drain-timeout", "15s", "--log-level", "warn"],
    )
    .await;
    let addr = proxy.outbound_addr();

    // Requests that the upstream holds until the test releases them: twelve HTTP/1.1
    // connections and four streams on one HTTP/2 connection.
    let mut in_flight = Vec::new();
    for i in 0..H1_REQUESTS {
        let mut conn = HttpConn::h1(addr).await.unwrap();
        in_flight.push(tokio::spawn(async move {
            conn.request(Method::GET, "slow", &format!("/hold/{i}"), &[])
                .await
        }));
    }
    let h2 = HttpConn::h2(addr).await.unwrap();
    for i in 0..H2_STREAMS {
        let mut conn = h2.try_clone().expect("an HTTP/2 connection is shared");
        in_flight.push(tokio::spawn(async move {
            conn.request(Method::GET, "slow", &format!("/hold/h2-{i}"), &[])
                .await
        }));
    }
    wait_until("every request is held by the upstream", WAIT, || async {
        upstream.held() == H1_REQUESTS + H2_STREAMS
    })
    .await;

    proxy.sigterm();

    // The listener closes at once, while the held requests are still in flight.
    wait_until("new connections are refused", WAIT, || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert_eq!(upstream.held(), H1_REQUESTS + H2_STREAMS, "still in flight");
    // The admin port stays up through the drain, reporting not ready, and why.
    let (status, body) = proxy.admin_send(Method::GET, "/ready", "").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
    );

    upstream.release_held();
    for task in in_flight {
        let reply = task.await.unwrap().expect("an in-flight request completes");
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.text(), "released");
    }

    let status = proxy.wait_exit(WAIT).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}:\n{}",
        proxy.log()
    );
    assert!(TcpStream::connect(addr).await.is_err());
}
