//! What tracing costs a request at the edge: the span work `edge::forward` does per
//! request (extract the caller's context, start the span, inject its context into the
//! forwarded headers, record the outcome, end it), with no tracer (no `--otlp-endpoint`),
//! with a tracer that samples nothing, and with one that records every request into
//! the batch processor (its exporter drops the batches, so only the request's share is
//! measured, not the export).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Request};
use opentelemetry::trace::SpanKind;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
};
use sluice_proxy::telemetry::{Propagation, Telemetry};

/// Accepts every batch and keeps nothing.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        black_box(batch);
        Ok(())
    }
}

fn telemetry(ratio: f64) -> Telemetry {
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(Discard).build())
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .build();
    Telemetry::with_provider(provider, &[Propagation::W3c])
}

/// A typical request as the application sends it, with or without a trace context.
fn request(traceparent: bool) -> Request<()> {
    let mut b = Request::builder()
        .method("POST")
        .uri("/logs/orders")
        .header("host", "log-service")
        .header("user-agent", "order-service/1.0")
        .header("content-type", "application/json")
        .header("x-user-id", "u-1234");
    if traceparent {
        b = b.header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
    }
    b.body(()).unwrap()
}

/// The edge's per-request span work, as `edge::forward` does it.
fn per_request(
    t: Option<&Telemetry>,
    (namespace, route): (&Arc<str>, &Arc<str>),
    mut req: Request<()>,
    answer: &HeaderMap,
) {
    let span = t.map(|t| t.start_request(SpanKind::Client, namespace, route, &mut req));
    black_box(&req);
    if let Some(s) = span {
        s.finish(200, Some(route), answer);
    }
}

fn bench(c: &mut Criterion) {
    let route: Arc<str> = "log-service.ingest".into();
    let namespace: Arc<str> = "shop".into();
    let answer = HeaderMap::new();
    let sampled = telemetry(1.0);
    let unsampled = telemetry(0.0);
    let mut g = c.benchmark_group("tracing_per_request");
    let cases: [(&str, Option<&Telemetry>, bool); 4] = [
        ("off (no --otlp-endpoint)", None, true),
        ("on, ratio 0, no parent", Some(&unsampled), false),
        ("on, ratio 1, no parent", Some(&sampled), false),
        ("on, sampled parent", Some(&sampled), true),
    ];
    for (name, t, parent) in cases {
        g.bench_function(name, |b| {
            b.iter_batched(
                || request(parent),
                |req| per_request(black_box(t), (&namespace, &route), req, &answer),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
    sampled.shutdown();
    unsampled.shutdown();
}

criterion_group!(benches, bench);
criterion_main!(benches);
