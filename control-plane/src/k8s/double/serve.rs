//! The double behind a `kube::Client` in process, or over real HTTP on loopback.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{Answer, ApiServer};

type DoubleBody = BoxBody<Bytes, Infallible>;

impl ApiServer {
    /// Answers one HTTP request (any body type).
    async fn respond_http<B>(self, req: Request<B>) -> Response<DoubleBody>
    where
        B: hyper::body::Body,
    {
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let answer = self.handle(
            parts.method,
            parts.uri.path(),
            parts.uri.query().unwrap_or(""),
            &content_type,
            &bytes,
        );
        let (code, body) = match answer {
            Answer::Json(code, v) => (code, Full::new(Bytes::from(v.to_string())).boxed()),
            Answer::Watch(events) => {
                let lines = UnboundedReceiverStream::new(events)
                    .map(|v| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{v}\n")))));
                (http::StatusCode::OK, BodyExt::boxed(StreamBody::new(lines)))
            }
        };
        Response::builder()
            .status(code)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .expect("a valid response")
    }

    /// A client of this double, in process (default namespace `sluice-system`).
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.respond_http(req).await) }
        });
        kube::Client::new(svc, "sluice-system")
    }

    /// Serves this double over HTTP on `127.0.0.1` and writes a kubeconfig for
    /// it (namespace `sluice-system`) into `dir`.
    pub async fn serve(&self, dir: &Path) -> std::io::Result<ServedApi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let api = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let api = api.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let api = api.clone();
                            async move { Ok::<_, Infallible>(api.respond_http(req).await) }
                        });
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://{addr}\n\
                 users:\n- name: double\n  user:\n    token: double-token\n\
                 contexts:\n- name: double\n  context:\n    cluster: double\n    user: double\n    namespace: sluice-system\n\
                 current-context: double\n"
            ),
        )?;
        Ok(ServedApi {
            addr,
            kubeconfig,
            task,
        })
    }
}

/// The double served on loopback; stops serving when dropped.
#[derive(Debug)]
pub struct ServedApi {
    /// Where it listens.
    pub addr: SocketAddr,
    /// A kubeconfig naming it.
    pub kubeconfig: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for ServedApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}
