//! A scripted Kubernetes API server behind `kube::Client`, for tests (the
//! `test-support` feature exposes it to the end-to-end tests).
//!
//! This is kube-rs's documented mock approach: a `tower_test::mock::pair` stands in
//! for the HTTP connection, and a task answers each request the client sends with
//! what the test's handler says. Watches can stay open and receive events later.

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{Method, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use kube::client::Body;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

type MockBody = BoxBody<Bytes, Infallible>;

/// One request the fake API server received.
#[derive(Clone, Debug)]
pub struct Call {
    /// The HTTP method.
    pub method: Method,
    /// The URL path (`/apis/sluice.dev/v1alpha1/routepolicies`).
    pub path: String,
    /// The query string, without `?`.
    pub query: String,
    /// The JSON body (`null` when there is none).
    pub body: Value,
}

impl Call {
    /// Whether this is a watch (`watch=true`).
    pub fn is_watch(&self) -> bool {
        self.query.split('&').any(|q| q == "watch=true")
    }
}

/// How the fake API server answers one request.
pub enum Reply {
    /// A complete JSON answer with this status code.
    Json(u16, Value),
    /// A watch answer: every value sent later is one event line.
    Stream(mpsc::UnboundedReceiver<Value>),
    /// Never answered (an idle watch).
    Hang,
}

/// A client talking to a fake API server driven by `handler`, and the calls it saw
/// (in order).
pub fn fake_api<F>(mut handler: F) -> (kube::Client, mpsc::UnboundedReceiver<Call>)
where
    F: FnMut(&Call) -> Reply + Send + 'static,
{
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut parked = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let call = Call {
                method: parts.method,
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or("").to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let reply = handler(&call);
            let _ = tx.send(call);
            match reply {
                Reply::Json(code, v) => send.send_response(
                    Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(v.to_string())).boxed())
                        .expect("valid response"),
                ),
                Reply::Stream(events) => {
                    let lines = UnboundedReceiverStream::new(events)
                        .map(|v| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{v}\n")))));
                    send.send_response(
                        Response::builder()
                            .status(200)
                            .header("content-type", "application/json")
                            .body(http_body_util::BodyExt::boxed(StreamBody::new(lines)))
                            .expect("valid response"),
                    )
                }
                Reply::Hang => parked.push(send),
            }
        }
    });
    (kube::Client::new(svc, "sluice-system"), rx)
}

/// A Kubernetes `Status` error body.
pub fn status(code: u16, reason: &str) -> Reply {
    Reply::Json(
        code,
        serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": reason, "reason": reason, "code": code,
        }),
    )
}
