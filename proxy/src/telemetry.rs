//! Traces: one OpenTelemetry span per proxied request, exported by OTLP.
//!
//! The outbound listener makes a `CLIENT` span (the sidecar calls the mesh for its
//! application), the inbound listener a `SERVER` span (the sidecar serves the mesh for
//! its application). Each continues the trace named in the request's `traceparent`/
//! `tracestate` (and B3 headers when `--trace-propagation` lists `b3`) and replaces those
//! headers with its own span's context before forwarding, so an application that copies
//! them from its inbound request to its outbound calls gets one trace across both
//! sidecars: order's client span is the parent of log's server span.
//!
//! The spans are built with the OpenTelemetry API directly rather than through
//! `tracing` spans: with no `--otlp-endpoint` there is no [`Telemetry`] at all and a
//! request pays one `Option` check, and with one the request task does no formatting and
//! takes no lock (the batch processor's queue is a bounded lock-free channel; a full
//! queue drops spans rather than waiting). A span ends when the response body has been
//! sent to its end (or fails, or the caller goes away), so a streamed answer is timed
//! whole; a gRPC status in the trailers is recorded as `rpc.grpc.status_code`. A request
//! no route matches gets a span too, without `sluice.route`.
//!
//! Attributes follow the HTTP semantic conventions (`http.request.method`, `url.path`,
//! `http.response.status_code`, `server.address`, `network.protocol.version`) plus
//! Sluice's own: `sluice.route` (`<policy>.<route>`, or `inbound`), `sluice.namespace`
//! (the route's policy's), `sluice.backend`,
//! `sluice.retries`, `sluice.reason` (the `x-sluice-reason` of a synthetic answer),
//! `sluice.degraded` (the `x-sluice-degraded` of a fallback's answer) and
//! `sluice.peer_identity` (the caller's SPIFFE ID, when mTLS proved one).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Version};
use http_body::Body as _;
use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span};
use sluice_filters::extensions::{PeerIdentity, RetryCount};

use crate::ProxyError;
use crate::body::Body;

/// How spans travel to the collector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`), port 4317 by convention.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`POST /v1/traces`), port 4318 by convention.
    Http,
}

/// A trace-context header format read from requests and written to forwarded ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Propagation {
    /// W3C Trace Context: `traceparent` and `tracestate`.
    W3c,
    /// Zipkin B3: read as the single `b3` header or the `x-b3-*` headers, written as `x-b3-*`.
    B3,
}

/// Trace settings (`--otlp-endpoint`, `--otlp-protocol`, `--trace-sampling`,
/// `--trace-propagation`).
#[derive(Clone, Debug, PartialEq)]
pub struct TraceConfig {
    /// The collector, e.g. `http://127.0.0.1:4317`; `None` turns tracing off.
    pub otlp_endpoint: Option<String>,
    /// gRPC or HTTP/protobuf.
    pub otlp_protocol: OtlpProtocol,
    /// Share of new traces recorded, 0.0..=1.0. A request that arrives with a trace
    /// context follows its parent's decision instead.
    pub sampling: f64,
    /// Header formats extracted and injected, in order (a later one wins on extraction).
    pub propagation: Vec<Propagation>,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            sampling: 1.0,
            propagation: vec![Propagation::W3c],
        }
    }
}

/// Who this proxy is in its spans' resource.
#[derive(Clone, Debug, Default)]
pub struct ResourceInfo {
    /// `service.name`: the `--service`, else `sluice-proxy`.
    pub service: Option<String>,
    /// `service.namespace`.
    pub namespace: Option<String>,
    /// `service.instance.id`: the node id.
    pub instance: Option<String>,
}

/// The W3C trace-state header.
const TRACESTATE: &str = "tracestate";

/// The tracer and propagators of a proxy with tracing on.
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TextMapCompositePropagator,
    /// B3 is propagated: the caller's B3 headers are taken off before ours are written.
    b3: bool,
}

/// Every B3 header, single and multiple: the propagator writes the multiple form only,
/// so a caller's single `b3` or its `x-b3-parentspanid` would otherwise reach the next
/// hop beside ours, naming another parent.
const B3_HEADERS: [&str; 6] = [
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Starts the exporter and batch processor for `cfg`; `None` when no endpoint is set.
    /// Must run inside a tokio runtime: the exporters' connections live on it.
    pub fn start(cfg: &TraceConfig, who: &ResourceInfo) -> Result<Option<Arc<Self>>, ProxyError> {
        let Some(endpoint) = cfg.otlp_endpoint.as_deref() else {
            return Ok(None);
        };
        if !(0.0..=1.0).contains(&cfg.sampling) {
            return Err(ProxyError::Telemetry(format!(
                "--trace-sampling {} is not in 0.0..=1.0",
                cfg.sampling
            )));
        }
        let exporter = exporter(endpoint, cfg.otlp_protocol)?;
        let mut resource = Resource::builder()
            .with_service_name(who.service.clone().unwrap_or_else(|| "sluice-proxy".into()));
        if let Some(ns) = &who.namespace {
            resource = resource.with_attribute(KeyValue::new("service.namespace", ns.clone()));
        }
        if let Some(id) = &who.instance {
            resource = resource.with_attribute(KeyValue::new("service.instance.id", id.clone()));
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sampling,
            ))))
            .with_resource(resource.build())
            .build();
        Ok(Some(Arc::new(Self::with_provider(
            provider,
            &cfg.propagation,
        ))))
    }

    /// Telemetry over a tracer provider built elsewhere (benchmarks, tests).
    pub fn with_provider(provider: SdkTracerProvider, propagation: &[Propagation]) -> Self {
        let mut propagators: Vec<Box<dyn TextMapPropagator + Send + Sync>> = Vec::new();
        let mut seen = Vec::new();
        for p in propagation {
            if seen.contains(p) {
                continue;
            }
            seen.push(*p);
            propagators.push(match p {
                Propagation::W3c => Box::new(TraceContextPropagator::new()),
                // The Zipkin crate is deprecated as an exporter (OTLP replaces it); its
                // B3 propagator is the maintained Rust one and is all we use of it.
                #[allow(deprecated)]
                Propagation::B3 => Box::new(opentelemetry_zipkin::Propagator::new()),
            });
        }
        Self {
            tracer: provider.tracer("sluice-proxy"),
            provider,
            propagator: TextMapCompositePropagator::new(propagators),
            b3: seen.contains(&Propagation::B3),
        }
    }

    /// Starts the span of one request on `route` (`<policy>.<route>`) of a policy in
    /// `namespace` (empty: none) and writes its context into the request's trace
    /// headers, so the next hop continues from it.
    pub fn start_request<B>(
        &self,
        kind: SpanKind,
        namespace: &Arc<str>,
        route: &Arc<str>,
        req: &mut Request<B>,
    ) -> RequestSpan {
        self.start_span(kind, Some((namespace, route)), req)
    }

    /// Starts the span of a request no route matched (it is answered by the proxy).
    pub fn start_unrouted<B>(&self, kind: SpanKind, req: &mut Request<B>) -> RequestSpan {
        self.start_span(kind, None, req)
    }

    fn start_span<B>(
        &self,
        kind: SpanKind,
        route: Option<(&Arc<str>, &Arc<str>)>,
        req: &mut Request<B>,
    ) -> RequestSpan {
        let parent = self
            .propagator
            .extract_with_context(&Context::new(), &HeaderExtractor(req.headers()));
        let method = method_value(req.method());
        let mut attrs = Vec::with_capacity(12);
        attrs.push(KeyValue::new("http.request.method", method.clone()));
        attrs.push(KeyValue::new("url.path", req.uri().path().to_owned()));
        if let Some(host) = host_of(req) {
            attrs.push(KeyValue::new("server.address", host.to_owned()));
        }
        attrs.push(KeyValue::new(
            "network.protocol.version",
            match req.version() {
                Version::HTTP_2 => "2",
                Version::HTTP_10 => "1.0",
                _ => "1.1",
            },
        ));
        if let Some((namespace, route)) = route {
            attrs.push(KeyValue::new("sluice.route", route.clone()));
            if !namespace.is_empty() {
                attrs.push(KeyValue::new("sluice.namespace", namespace.clone()));
            }
        }
        let route = route.map(|(_, r)| r);
        if let Some(PeerIdentity(id)) = req.extensions().get::<PeerIdentity>() {
            attrs.push(KeyValue::new("sluice.peer_identity", id.clone()));
        }
        let name = match (&method, route) {
            (Value::String(m), Some(route)) => format!("{} {route}", m.as_str()),
            (Value::String(m), None) => m.as_str().to_owned(),
            (_, Some(route)) => route.to_string(),
            (_, None) => "HTTP".to_owned(),
        };
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind.clone())
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        let headers = req.headers_mut();
        if self.b3 {
            for name in B3_HEADERS {
                headers.remove(name);
            }
        }
        self.propagator
            .inject_context(&cx, &mut HeaderInjector(headers));
        // W3C: no trace state to pass on is no header (the spec's SHOULD), not an empty one.
        if headers
            .get(TRACESTATE)
            .is_some_and(|v| v.as_bytes().is_empty())
        {
            headers.remove(TRACESTATE);
        }
        let retries = span.is_recording().then(|| {
            let count = RetryCount::new();
            req.extensions_mut().insert(count.clone());
            count
        });
        RequestSpan {
            span,
            kind,
            retries,
        }
    }

    /// Exports what is queued and stops the exporter; blocks, so call it off the runtime's
    /// worker threads (`spawn_blocking`).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "trace exporter shutdown");
        }
    }
}

/// The method as an attribute value: the standard ones are static strings; any other is
/// `_OTHER`, as the semantic conventions ask, so a client cannot mint values.
fn method_value(m: &Method) -> Value {
    let s: &'static str = match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    };
    Value::from(s)
}

/// The host the request names, without its port.
fn host_of<B>(req: &Request<B>) -> Option<&str> {
    let raw = crate::message::request_host(req)?;
    // `[::1]:80` keeps its brackets; `host:80` loses the port.
    Some(match raw.rfind(':') {
        Some(i) if !raw[i..].contains(']') => &raw[..i],
        _ => raw,
    })
}

/// The span of one request in flight; [`RequestSpan::finish`] ends it.
pub struct RequestSpan {
    span: Span,
    kind: SpanKind,
    retries: Option<RetryCount>,
}

impl fmt::Debug for RequestSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestSpan")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl RequestSpan {
    /// Records the outcome and ends the span: the status code, the backend that
    /// answered, the retries sent and, for a synthetic answer, its `x-sluice-reason`.
    pub fn finish(mut self, status: u16, backend: Option<&Arc<str>>, headers: &HeaderMap) {
        if self.span.is_recording() {
            self.record(status, backend, headers);
            self.span.end();
        }
    }

    /// Records the response head like [`finish`](Self::finish) and returns `body`
    /// carrying the span, which ends when the body does.
    pub fn finish_with_body(
        mut self,
        status: u16,
        backend: Option<&Arc<str>>,
        headers: &HeaderMap,
        body: Body,
    ) -> Body {
        if !self.span.is_recording() {
            return body;
        }
        self.record(status, backend, headers);
        if body.is_end_stream() {
            self.span.end();
            return body;
        }
        crate::body::boxed(SpannedBody {
            inner: body,
            span: Some(self),
        })
    }

    fn record(&mut self, status: u16, backend: Option<&Arc<str>>, headers: &HeaderMap) {
        self.span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(b) = backend {
            self.span
                .set_attribute(KeyValue::new("sluice.backend", b.clone()));
        }
        if let Some(count) = &self.retries {
            self.span
                .set_attribute(KeyValue::new("sluice.retries", i64::from(count.get())));
        }
        let reason = headers
            .get(sluice_filters::reason::HEADER)
            .and_then(|v| v.to_str().ok());
        if let Some(r) = reason {
            self.span
                .set_attribute(KeyValue::new("sluice.reason", r.to_owned()));
        }
        if let Some(d) = headers
            .get(sluice_filters::reason::DEGRADED_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            self.span
                .set_attribute(KeyValue::new("sluice.degraded", d.to_owned()));
        }
        // Per the HTTP conventions a client span is an error from 400 on, a server span
        // from 500 on (a 4xx there is the caller's mistake, not the server's).
        let failed = status >= 500 || (self.kind == SpanKind::Client && status >= 400);
        if failed {
            self.span.set_status(Status::error(
                reason.map_or_else(|| status.to_string(), str::to_owned),
            ));
        }
        self.grpc_status(headers);
    }

    /// A gRPC status (trailers-only answer, or the trailers of a streamed one).
    fn grpc_status(&mut self, headers: &HeaderMap) {
        let Some(code) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
        else {
            return;
        };
        self.span
            .set_attribute(KeyValue::new("rpc.grpc.status_code", code));
        if code != 0 {
            let message = headers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .map_or_else(|| format!("grpc-status {code}"), str::to_owned);
            self.span.set_status(Status::error(message));
        }
    }
}

/// A response body that ends its request's span when it ends: after its last frame,
/// on an error, or when dropped unfinished (the caller went away).
struct SpannedBody {
    // Boxed, hence `Unpin`: no pin projection needed.
    inner: Body,
    span: Option<RequestSpan>,
}

impl Drop for SpannedBody {
    fn drop(&mut self) {
        if let Some(mut s) = self.span.take() {
            s.span
                .set_attribute(KeyValue::new("sluice.body_complete", false));
            s.span.end();
        }
    }
}

impl http_body::Body for SpannedBody {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let std::task::Poll::Ready(frame) = &polled else {
            return polled;
        };
        let ended = match frame {
            None => true,
            Some(Err(e)) => {
                if let Some(s) = this.span.as_mut() {
                    s.span
                        .set_status(Status::error(format!("response body failed: {e}")));
                }
                true
            }
            Some(Ok(f)) => {
                if let (Some(trailers), Some(s)) = (f.trailers_ref(), this.span.as_mut()) {
                    s.grpc_status(trailers);
                }
                // hyper stops polling once the body says it is done.
                this.inner.is_end_stream()
            }
        };
        if ended && let Some(mut s) = this.span.take() {
            s.span.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn exporter(
    endpoint: &str,
    protocol: OtlpProtocol,
) -> Result<opentelemetry_otlp::SpanExporter, ProxyError> {
    let err = |e: opentelemetry_otlp::ExporterBuildError| {
        ProxyError::Telemetry(format!("--otlp-endpoint {endpoint}: {e}"))
    };
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| ProxyError::Telemetry(format!("--otlp-endpoint {endpoint}: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(ProxyError::Telemetry(format!(
            "--otlp-endpoint {endpoint}: expected http://HOST:PORT (a collector on the node or in the pod)"
        )));
    }
    const TIMEOUT: Duration = Duration::from_secs(10);
    match protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(TIMEOUT)
            .build()
            .map_err(err),
        OtlpProtocol::Http => {
            let url = http_traces_url(endpoint, uri.path());
            let client = RuntimeHttpClient {
                inner: opentelemetry_http::hyper::HyperClient::with_default_connector(
                    TIMEOUT, None,
                ),
                runtime: tokio::runtime::Handle::current(),
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(url)
                .with_timeout(TIMEOUT)
                .with_http_client(client)
                .build()
                .map_err(err)
        }
    }
}

/// Where OTLP/HTTP spans are posted: a collector's base URL (path `/`) gets the signal
/// path, as `OTEL_EXPORTER_OTLP_ENDPOINT` does; a URL with a path is taken as given.
fn http_traces_url(endpoint: &str, path: &str) -> String {
    if path == "/" && !endpoint.ends_with("/v1/traces") {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    } else {
        endpoint.to_owned()
    }
}

/// The hyper OTLP client, run on the proxy's runtime: the batch processor exports from
/// a thread of its own, which has no tokio timer or reactor.
#[derive(Debug)]
struct RuntimeHttpClient {
    inner: opentelemetry_http::hyper::HyperClient,
    runtime: tokio::runtime::Handle,
}

type SendFuture<'a> =
    Pin<Box<dyn Future<Output = Result<http::Response<Bytes>, HttpError>> + Send + 'a>>;

impl HttpClient for RuntimeHttpClient {
    fn send_bytes<'a, 'b>(&'a self, request: Request<Bytes>) -> SendFuture<'b>
    where
        'a: 'b,
        Self: 'b,
    {
        let inner = self.inner.clone();
        let task = self
            .runtime
            .spawn(async move { inner.send_bytes(request).await });
        Box::pin(async move { task.await.map_err(|e| -> HttpError { Box::new(e) })? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceId;
    use opentelemetry_sdk::trace::InMemorySpanExporter;

    fn telemetry(ratio: f64, propagation: &[Propagation]) -> (Telemetry, InMemorySpanExporter) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))))
            .build();
        (Telemetry::with_provider(provider, propagation), exporter)
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn continues_the_callers_trace_and_injects_its_own_span() {
        let (t, exporter) = telemetry(1.0, &[Propagation::W3c]);
        let mut req = Request::builder()
            .method("POST")
            .uri("/logs?x=1")
            .header("host", "log-service:80")
            .header("traceparent", PARENT)
            .header("tracestate", "vendor=1")
            .body(())
            .unwrap();
        req.extensions_mut().insert(PeerIdentity(
            "spiffe://cluster.local/ns/shop/sa/order".into(),
        ));
        let route: Arc<str> = "log-service.ingest".into();
        let span = t.start_request(SpanKind::Client, &"shop".into(), &route, &mut req);
        let injected = req.headers()["traceparent"].to_str().unwrap().to_owned();
        assert!(injected.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert_ne!(injected, PARENT, "the next hop's parent is this span");
        assert_eq!(req.headers()["tracestate"], "vendor=1");
        span.finish(503, Some(&"log-v1".into()), &{
            let mut h = HeaderMap::new();
            h.insert("x-sluice-reason", "breaker-open".parse().unwrap());
            h
        });

        let spans = exporter.get_finished_spans().unwrap();
        let s = &spans[0];
        assert_eq!(s.name, "POST log-service.ingest");
        assert_eq!(s.span_kind, SpanKind::Client);
        assert_eq!(
            s.span_context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(s.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(&injected[36..52], s.span_context.span_id().to_string());
        let attr = |k: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attr("http.request.method").as_deref(), Some("POST"));
        assert_eq!(attr("url.path").as_deref(), Some("/logs"));
        assert_eq!(attr("server.address").as_deref(), Some("log-service"));
        assert_eq!(attr("http.response.status_code").as_deref(), Some("503"));
        assert_eq!(attr("sluice.route").as_deref(), Some("log-service.ingest"));
        assert_eq!(attr("sluice.namespace").as_deref(), Some("shop"));
        assert_eq!(attr("sluice.backend").as_deref(), Some("log-v1"));
        assert_eq!(attr("sluice.retries").as_deref(), Some("0"));
        assert_eq!(attr("sluice.reason").as_deref(), Some("breaker-open"));
        assert_eq!(
            attr("sluice.peer_identity").as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/order")
        );
        assert!(matches!(s.status, Status::Error { .. }));
    }

    fn attr(s: &opentelemetry_sdk::trace::SpanData, k: &str) -> Option<String> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == k)
            .map(|kv| kv.value.to_string())
    }

    /// A streamed body the test feeds frame by frame.
    fn streamed() -> (
        tokio::sync::mpsc::UnboundedSender<http_body::Frame<Bytes>>,
        Body,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|f| (Ok::<_, crate::body::BoxError>(f), rx))
        });
        (
            tx,
            crate::body::boxed(http_body_util::StreamBody::new(stream)),
        )
    }

    #[tokio::test]
    async fn the_span_ends_with_the_body_and_records_grpc_trailers() {
        use http_body_util::BodyExt as _;
        let (t, exporter) = telemetry(1.0, &[Propagation::W3c]);
        let mut req = Request::builder()
            .uri("/echo.Echo/Stream")
            .body(())
            .unwrap();
        let route: Arc<str> = "echo.stream".into();
        let span = t.start_request(SpanKind::Client, &"".into(), &route, &mut req);
        let (tx, body) = streamed();
        let mut body = span.finish_with_body(200, None, &HeaderMap::new(), body);

        tx.send(http_body::Frame::data(Bytes::from_static(b"one")))
            .unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "one");
        assert!(
            exporter.get_finished_spans().unwrap().is_empty(),
            "the head is back but the body is still streaming"
        );

        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        trailers.insert("grpc-message", "backend gone".parse().unwrap());
        tx.send(http_body::Frame::trailers(trailers)).unwrap();
        drop(tx);
        while body.frame().await.is_some() {}
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(spans.len(), 1);
        assert_eq!(
            attr(&spans[0], "rpc.grpc.status_code").as_deref(),
            Some("14")
        );
        assert_eq!(attr(&spans[0], "sluice.body_complete"), None);
        assert_eq!(spans[0].status, Status::error("backend gone"));
    }

    /// An OTLP/HTTP collector's base URL gets the traces path; a URL with a path of its
    /// own is kept.
    #[test]
    fn a_base_url_gets_the_traces_path() {
        for (endpoint, path, url) in [
            ("http://c:4318", "/", "http://c:4318/v1/traces"),
            ("http://c:4318/", "/", "http://c:4318/v1/traces"),
            (
                "http://c:4318/v1/traces",
                "/v1/traces",
                "http://c:4318/v1/traces",
            ),
            (
                "http://c:4318/otlp/traces",
                "/otlp/traces",
                "http://c:4318/otlp/traces",
            ),
        ] {
            assert_eq!(http_traces_url(endpoint, path), url, "{endpoint}");
        }
    }

    #[tokio::test]
    async fn a_body_dropped_unfinished_ends_the_span_and_says_so() {
        let (t, exporter) = telemetry(1.0, &[Propagation::W3c]);
        let mut req = Request::builder().uri("/big").body(()).unwrap();
        let span = t.start_request(SpanKind::Server, &"".into(), &"inbound".into(), &mut req);
        let (_tx, body) = streamed();
        let body = span.finish_with_body(200, None, &HeaderMap::new(), body);
        assert!(!body.is_end_stream(), "the body is still to come");
        drop(body);
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(spans.len(), 1);
        assert_eq!(
            attr(&spans[0], "sluice.body_complete").as_deref(),
            Some("false")
        );
    }

    #[test]
    fn an_empty_body_ends_the_span_at_once_and_an_unrouted_span_has_no_route() {
        let (t, exporter) = telemetry(1.0, &[Propagation::W3c]);
        let mut req = Request::builder()
            .method("DELETE")
            .uri("/x")
            .body(())
            .unwrap();
        let span = t.start_unrouted(SpanKind::Client, &mut req);
        let _body = span.finish_with_body(404, None, &HeaderMap::new(), crate::body::empty());
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(spans.len(), 1, "ended before the body is even polled");
        assert_eq!(spans[0].name, "DELETE");
        assert_eq!(attr(&spans[0], "sluice.route"), None);
        assert_eq!(attr(&spans[0], "sluice.namespace"), None);
    }

    #[test]
    fn an_unsampled_parent_is_followed_and_still_propagated() {
        let (t, exporter) = telemetry(1.0, &[Propagation::W3c]);
        let mut req = Request::builder()
            .uri("/")
            .header("traceparent", &PARENT.replace("-01", "-00"))
            .body(())
            .unwrap();
        let span = t.start_request(SpanKind::Server, &"".into(), &"inbound".into(), &mut req);
        let injected = req.headers()["traceparent"].to_str().unwrap();
        assert!(injected.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(injected.ends_with("-00"));
        assert!(req.extensions().get::<RetryCount>().is_none());
        span.finish(200, None, &HeaderMap::new());
        assert!(exporter.get_finished_spans().unwrap().is_empty());
    }

    #[test]
    fn ratio_zero_records_no_new_trace_but_starts_one_downstream() {
        let (t, exporter) = telemetry(0.0, &[Propagation::W3c]);
        let mut req = Request::builder().uri("/").body(()).unwrap();
        let span = t.start_request(SpanKind::Client, &"".into(), &"r".into(), &mut req);
        assert!(
            req.headers()["traceparent"]
                .to_str()
                .unwrap()
                .ends_with("-00")
        );
        span.finish(200, None, &HeaderMap::new());
        assert!(exporter.get_finished_spans().unwrap().is_empty());
    }

    #[test]
    fn b3_is_read_and_written_when_configured() {
        let (t, exporter) = telemetry(1.0, &[Propagation::W3c, Propagation::B3]);
        let mut req = Request::builder()
            .uri("/")
            .header("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736")
            .header("x-b3-spanid", "00f067aa0ba902b7")
            .header("x-b3-sampled", "1")
            .body(())
            .unwrap();
        let span = t.start_request(SpanKind::Server, &"".into(), &"inbound".into(), &mut req);
        assert_eq!(
            req.headers()["x-b3-traceid"],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_ne!(req.headers()["x-b3-spanid"], "00f067aa0ba902b7");
        assert!(
            req.headers()["traceparent"]
                .to_str()
                .unwrap()
                .contains("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        span.finish(200, None, &HeaderMap::new());
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(spans[0].parent_span_id.to_string(), "00f067aa0ba902b7");
        // An inbound listener without a policy of its own names no namespace.
        assert_eq!(attr(&spans[0], "sluice.route").as_deref(), Some("inbound"));
        assert_eq!(attr(&spans[0], "sluice.namespace"), None);

        // Without b3 configured, B3 headers are not read.
        let (t, _) = telemetry(1.0, &[Propagation::W3c]);
        let mut req = Request::builder()
            .uri("/")
            .header("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736")
            .header("x-b3-spanid", "00f067aa0ba902b7")
            .header("x-b3-sampled", "1")
            .body(())
            .unwrap();
        let _span = t.start_request(SpanKind::Server, &"".into(), &"inbound".into(), &mut req);
        assert!(
            !req.headers()["traceparent"]
                .to_str()
                .unwrap()
                .contains("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    /// The method, protocol version and host attributes: every standard method by name
    /// and any other as `_OTHER`; `2`, `1.0` or `1.1`; the host without its port, an
    /// IPv6 literal keeping its brackets.
    #[test]
    fn method_version_and_host_attributes() {
        let (t, exporter) = telemetry(1.0, &[Propagation::W3c]);
        let cases = [
            ("GET", Version::HTTP_11, "a:80", "GET", "1.1", "a"),
            ("POST", Version::HTTP_2, "b", "POST", "2", "b"),
            ("PUT", Version::HTTP_10, "[::1]:8080", "PUT", "1.0", "[::1]"),
            (
                "DELETE",
                Version::HTTP_11,
                "[::1]",
                "DELETE",
                "1.1",
                "[::1]",
            ),
            ("HEAD", Version::HTTP_11, "c", "HEAD", "1.1", "c"),
            ("OPTIONS", Version::HTTP_11, "c", "OPTIONS", "1.1", "c"),
            ("PATCH", Version::HTTP_11, "c", "PATCH", "1.1", "c"),
            ("CONNECT", Version::HTTP_11, "c", "CONNECT", "1.1", "c"),
            ("TRACE", Version::HTTP_11, "c", "TRACE", "1.1", "c"),
            ("PURGE", Version::HTTP_11, "c", "_OTHER", "1.1", "c"),
        ];
        for (method, version, host, _, _, _) in cases {
            let mut req = Request::builder()
                .method(method)
                .version(version)
                .uri("/x")
                .header("host", host)
                .body(())
                .unwrap();
            t.start_unrouted(SpanKind::Server, &mut req)
                .finish(200, None, &HeaderMap::new());
        }
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(spans.len(), cases.len());
        for (s, (method, _, _, want_method, want_version, want_host)) in spans.iter().zip(cases) {
            assert_eq!(
                attr(s, "http.request.method").as_deref(),
                Some(want_method),
                "{method}"
            );
            assert_eq!(
                attr(s, "network.protocol.version").as_deref(),
                Some(want_version),
                "{method}"
            );
            assert_eq!(
                attr(s, "server.address").as_deref(),
                Some(want_host),
                "{method}"
            );
        }
    }

    /// A client span is an error from 400 on, a server span only from 500 on.
    #[test]
    fn a_4xx_fails_a_client_span_and_only_a_5xx_a_server_span() {
        let (t, exporter) = telemetry(1.0, &[Propagation::W3c]);
        let cases = [
            (SpanKind::Client, 399, false),
            (SpanKind::Client, 400, true),
            (SpanKind::Server, 404, false),
            (SpanKind::Server, 499, false),
            (SpanKind::Server, 500, true),
            (SpanKind::Client, 503, true),
        ];
        for (kind, status, _) in &cases {
            let mut req = Request::builder().uri("/x").body(()).unwrap();
            t.start_unrouted(kind.clone(), &mut req)
                .finish(*status, None, &HeaderMap::new());
        }
        let spans = exporter.get_finished_spans().unwrap();
        for (s, (kind, status, failed)) in spans.iter().zip(&cases) {
            assert_eq!(
                matches!(s.status, Status::Error { .. }),
                *failed,
                "{kind:?} {status}"
            );
        }
    }

    /// The span's body says what the body under it says about its end and length.
    #[tokio::test]
    async fn a_spanned_body_keeps_the_end_and_length_of_its_body() {
        use http_body::Body as _;
        let (t, _exporter) = telemetry(1.0, &[Propagation::W3c]);
        let mut req = Request::builder().uri("/x").body(()).unwrap();
        let body = t
            .start_unrouted(SpanKind::Client, &mut req)
            .finish_with_body(
                200,
                None,
                &HeaderMap::new(),
                crate::body::full(Bytes::from_static(b"hello")),
            );
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(5));
    }

    #[tokio::test]
    async fn endpoints_must_be_plain_http_urls() {
        let cfg = |e: &str| TraceConfig {
            otlp_endpoint: Some(e.into()),
            ..TraceConfig::default()
        };
        let who = ResourceInfo::default();
        assert!(
            Telemetry::start(&TraceConfig::default(), &who)
                .unwrap()
                .is_none()
        );
        for bad in ["collector:4317", "https://collector:4317", "not a url"] {
            let e = Telemetry::start(&cfg(bad), &who).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
            // A URI that parses but is no plain http://HOST:PORT says what is wanted.
            let parses = bad != "not a url";
            assert_eq!(e.contains("expected http://HOST:PORT"), parses, "{e}");
        }
        let mut c = cfg("http://127.0.0.1:4317");
        c.sampling = 1.5;
        assert!(Telemetry::start(&c, &who).is_err());
    }
}
