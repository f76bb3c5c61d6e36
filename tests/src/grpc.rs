//! A small tonic service, `sluice.e2e.Echo`, for proving gRPC passes through intact.
//!
//! `Unary` echoes the message and copies the request's `x-test-meta` metadata into
//! the response's `x-echo-meta`; with a non-zero `fail_code` it answers that status
//! (trailers-only) with `x-fail-meta: unary` in its metadata. `ServerStream` sends
//! `count` replies, then ends with OK, or, with a non-zero `fail_code`, with that
//! status and `x-fail-meta: stream` in the trailers after the replies.

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::Stream;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};

/// The generated protobuf types, client and server.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("sluice.e2e");
}

use proto::echo_server::{Echo, EchoServer};
use proto::{EchoReply, EchoRequest};

/// The `Echo` service implementation.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoService;

fn status_with_meta(code: i32, what: &'static str) -> Status {
    let mut meta = MetadataMap::new();
    meta.insert("x-fail-meta", what.parse().expect("ascii"));
    Status::with_metadata(
        Code::from_i32(code),
        format!("asked to fail with {code}"),
        meta,
    )
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let meta = req.metadata().get("x-test-meta").cloned();
        let msg = req.into_inner();
        if msg.fail_code != 0 {
            return Err(status_with_meta(msg.fail_code, "unary"));
        }
        let mut resp = Response::new(EchoReply {
            message: msg.message,
            seq: 0,
        });
        if let Some(v) = meta {
            resp.metadata_mut().insert("x-echo-meta", v);
        }
        Ok(resp)
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let msg = req.into_inner();
        let mut items: Vec<Result<EchoReply, Status>> = (0..msg.count)
            .map(|seq| {
                Ok(EchoReply {
                    message: format!("{} #{seq}", msg.message),
                    seq,
                })
            })
            .collect();
        if msg.fail_code != 0 {
            items.push(Err(status_with_meta(msg.fail_code, "stream")));
        }
        Ok(Response::new(Box::pin(futures_util::stream::iter(items))))
    }
}

/// A running `Echo` server on an ephemeral port of 127.0.0.1.
#[derive(Debug)]
pub struct GrpcServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl GrpcServer {
    /// Starts the server.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gRPC server");
        let addr = listener.local_addr().expect("gRPC server address");
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(EchoServer::new(EchoService))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Self {
            addr,
            stop: Some(stop_tx),
            task,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A tonic channel to `addr` (a proxy's listener) whose requests carry `:authority: host`.
pub async fn channel_to(addr: SocketAddr, host: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .origin(format!("http://{host}").parse().expect("a valid origin"))
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect the gRPC client")
}
