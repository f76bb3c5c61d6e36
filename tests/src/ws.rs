//! A WebSocket echo server: every text and binary message comes back unchanged.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::Message;

/// A running WebSocket echo server on an ephemeral port of 127.0.0.1.
#[derive(Debug)]
pub struct WsEchoServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl WsEchoServer {
    /// Starts the server. It accepts the upgrade on any path.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the WebSocket server");
        let addr = listener.local_addr().expect("WebSocket server address");
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                conns.spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        match msg {
                            Message::Text(_) | Message::Binary(_) => {
                                let sent = ws.send(msg).await;
                                if sent.is_err() {
                                    return;
                                }
                            }
                            Message::Close(frame) => {
                                let _ = ws.close(frame).await;
                                return;
                            }
                            _ => {}
                        }
                    }
                });
            }
        });
        Self { addr, task }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for WsEchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
