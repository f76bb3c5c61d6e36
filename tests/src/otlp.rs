//! An OpenTelemetry collector stand-in: the real OTLP `TraceService` (gRPC, from
//! opentelemetry-proto's tonic types) and the OTLP/HTTP `POST /v1/traces` endpoint
//! (protobuf bodies decoded with the same types), both keeping every span they receive.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

/// One span as a collector received it, with ids in lower-case hex.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// Every attribute of that resource, values rendered as text.
    pub resource: BTreeMap<String, String>,
    /// Which endpoint it came through: `grpc` or `http`.
    pub via: &'static str,
    /// The span's name.
    pub name: String,
    /// `SPAN_KIND_*` as its protobuf number (2 server, 3 client).
    pub kind: i32,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, or empty for a root span.
    pub parent_span_id: String,
    /// Attributes, values rendered as text.
    pub attributes: BTreeMap<String, String>,
    /// Status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
}

impl ReceivedSpan {
    /// The attribute `key` as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// `SPAN_KIND_SERVER`.
pub const KIND_SERVER: i32 = 2;
/// `SPAN_KIND_CLIENT`.
pub const KIND_CLIENT: i32 = 3;

type Store = Arc<Mutex<Vec<ReceivedSpan>>>;

/// A running receiver with an OTLP/gRPC and an OTLP/HTTP endpoint on ephemeral ports.
#[derive(Debug)]
pub struct OtlpReceiver {
    grpc: SocketAddr,
    http: SocketAddr,
    spans: Store,
    tasks: Vec<JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Starts both endpoints on 127.0.0.1.
    pub async fn start() -> Self {
        let spans: Store = Arc::default();
        let grpc_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP/gRPC receiver");
        let grpc = grpc_listener.local_addr().expect("address");
        let incoming = TcpIncoming::from(grpc_listener);
        let svc = TraceServiceServer::new(Collector(spans.clone()));
        let grpc_task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        let http_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP/HTTP receiver");
        let http = http_listener.local_addr().expect("address");
        let store = spans.clone();
        let http_task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = http_listener.accept().await else {
                    continue;
                };
                let store = store.clone();
                let svc = service_fn(move |req| {
                    let store = store.clone();
                    async move { Ok::<_, Infallible>(http_export(store, req).await) }
                });
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            grpc,
            http,
            spans,
            tasks: vec![grpc_task, http_task],
        }
    }

    /// `http://ADDR` of the OTLP/gRPC endpoint, for `--otlp-endpoint` with `--otlp-protocol grpc`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `http://ADDR` of the OTLP/HTTP endpoint, for `--otlp-endpoint` with `--otlp-protocol http`.
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("span store").clone()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Collector(Store);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn http_export(store: Store, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let ok_path = req.method() == hyper::Method::POST && req.uri().path() == "/v1/traces";
    let protobuf = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/x-protobuf");
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status(StatusCode::BAD_REQUEST),
    };
    if !ok_path {
        return status(StatusCode::NOT_FOUND);
    }
    if !protobuf {
        return status(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    match ExportTraceServiceRequest::decode(body) {
        Ok(export) => {
            keep(&store, export, "http");
            let mut r = Response::new(Full::new(Bytes::from(
                ExportTraceServiceResponse {
                    partial_success: None,
                }
                .encode_to_vec(),
            )));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/x-protobuf"),
            );
            r
        }
        Err(_) => status(StatusCode::BAD_REQUEST),
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}

fn keep(store: &Store, export: ExportTraceServiceRequest, via: &'static str) {
    let mut out = store.lock().expect("span store");
    for rs in export.resource_spans {
        let resource = rs
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    resource: resource.clone(),
                    via,
                    name: s.name,
                    kind: s.kind,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    attributes: attributes(&s.attributes),
                    status: s.status.map_or(0, |st| st.code),
                });
            }
        }
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(text).unwrap_or_default(),
            )
        })
        .collect()
}

fn text(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
