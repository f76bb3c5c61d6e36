//! An HTTP/2 upstream that goes away under a stream it was sent.
//!
//! RFC 9113 §6.8: a stream above the last stream id a GOAWAY names was not processed,
//! and the client may send it again on a new connection. A real server only does that
//! to a stream that crosses its GOAWAY on the wire (a drain, a stream cap's rotation),
//! a race no test can time, so this one does it on purpose: it takes the stream's
//! `HEADERS` and answers with a GOAWAY naming stream 0. Its frames are written byte by
//! byte for the same reason as [`crate::malformed`]'s: no server library sends a GOAWAY
//! below a stream it has read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::malformed::{PREFACE, frame};

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const HEADERS: u8 = 0x1;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// HPACK for `:status: 200`: the static table's entry 8, indexed.
const STATUS_200: &[u8] = &[0x88];

#[derive(Debug, Default)]
struct State {
    connections: AtomicU64,
    streams: AtomicU64,
}

/// An h2c (prior knowledge) upstream whose first connections go away under their first
/// stream; later ones answer every stream `200` with no body.
#[derive(Debug)]
pub struct GoingAwayUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl GoingAwayUpstream {
    /// Starts one on an ephemeral port whose first `going_away` connections each answer
    /// their first stream with `GOAWAY(last stream 0, NO_ERROR)`.
    pub async fn start(going_away: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let n = st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                tokio::spawn(async move {
                    // The client closing (as it should, once the GOAWAY leaves it no
                    // stream) ends the connection; nothing here to report.
                    let _ = serve(sock, n < going_away, &st).await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Streams whose `HEADERS` it read so far, answered or gone away under.
    pub fn streams(&self) -> u64 {
        self.state.streams.load(Ordering::SeqCst)
    }
}

impl Drop for GoingAwayUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut sock: TcpStream, go_away: bool, state: &State) -> std::io::Result<()> {
    let mut preface = [0u8; 24];
    sock.read_exact(&mut preface).await?;
    if preface != PREFACE {
        return Ok(());
    }
    sock.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    let mut gone = false;
    loop {
        let mut head = [0u8; 9];
        sock.read_exact(&mut head).await?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        sock.read_exact(&mut payload).await?;
        match kind {
            SETTINGS if flags & ACK == 0 => sock.write_all(&frame(SETTINGS, ACK, 0, &[])).await?,
            PING if flags & ACK == 0 => sock.write_all(&frame(PING, ACK, 0, &payload)).await?,
            HEADERS if !gone => {
                state.streams.fetch_add(1, Ordering::SeqCst);
                if go_away {
                    // Last stream id 0, error code NO_ERROR (0).
                    sock.write_all(&frame(GOAWAY, 0, 0, &[0; 8])).await?;
                    gone = true;
                } else {
                    let flags = END_STREAM | END_HEADERS;
                    sock.write_all(&frame(HEADERS, flags, stream, STATUS_200))
                        .await?;
                }
            }
            _ => {}
        }
    }
}
