//! WebSocket: the HTTP/1.1 upgrade passes through the proxy, then frames flow both ways.

use futures_util::{SinkExt, StreamExt};
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
