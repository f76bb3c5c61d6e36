//! WebSocket: the HTTP/1.1 upgrade passes through the proxy, then frames flow both ways.

use futures_util::{SinkExt, StreamExt};
use sluice_e2e::autobahn;
use sluice_e2e::ws::WsEchoServer;
use sluice_e2e::{TestProxy, single_backend_policy};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_outbound_proxy() {
    let server = WsEchoServer::start().await;
    let proxy = TestProxy::start(&single_backend_policy("ws", "ws-echo", server.addr())).await;

    let stream = TcpStream::connect(proxy.outbound_addr()).await.unwrap();
    stream.set_nodelay(true).unwrap();
    // The URL's host becomes the Host header the proxy routes by.
    let req = "ws://ws-echo/chat".into_client_request().unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("the upgrade passes through the proxy");
    assert_eq!(resp.status(), 101);

    for i in 0..50 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let back = ws.next().await.expect("an echo").unwrap();
        assert_eq!(back, Message::text(text));
    }
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    let back = ws.next().await.expect("an echo").unwrap();
    assert_eq!(back.into_data().as_ref(), blob.as_slice());

    ws.close(None).await.unwrap();
    // The server answers the close; the stream then ends.
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Close(_)) | Err(_) => {}
            Ok(other) => panic!("unexpected message after close: {other:?}"),
        }
    }
    proxy.shutdown().await;
}

/// Autobahn cases 1–7 (framing, pings, reserved bits, opcodes, fragmentation, UTF-8,
/// closing) through the outbound listener get the verdicts a direct run gets (`OK` and
/// `NON-STRICT` alike: which of the two a fail-fast case gets is timing, see
/// [`autobahn::differences`]).
/// `cargo run -p sluice-e2e --bin autobahn` runs the whole set the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_cases_1_to_7_through_the_outbound_proxy_match_a_direct_run() {
    let kosoku = autobahn::kosoku_path();
    assert!(
        kosoku.exists(),
        "{} is missing: run tests/setup.sh (or set SLUICE_KOSOKU)",
        kosoku.display()
    );
    let reports = tempfile::tempdir().unwrap();
    let cmp = autobahn::compare_through_outbound(&kosoku, autobahn::CI_CASES, reports.path())
        .await
        .expect("run the Autobahn cases");
    assert!(
        cmp.direct.len() > 200 && cmp.direct.keys().all(|id| id.as_bytes()[0] <= b'7'),
        "cases 1–7 ran: {:?}",
        cmp.direct.keys().collect::<Vec<_>>()
    );
    let diff = autobahn::differences(&cmp.direct, &cmp.proxied);
    assert!(
        diff.is_empty(),
        "verdicts differ from a direct run: {diff:#?}"
    );
}
