//! Observability across two sidecars: one trace from order's outbound sidecar through
//! log's inbound sidecar to the log application, exported by OTLP (gRPC and HTTP) to
//! a real OTLP receiver; access logs on the routes that ask for them.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hyper::{Method, StatusCode};
use sluice_e2e::otlp::{KIND_CLIENT, KIND_SERVER, OtlpReceiver, ReceivedSpan};
use sluice_e2e::{
    ChildProxy, HttpConn, ProxyOptions, TestProxy, Upstream, WAIT, access_lines, full_body,
    wait_until,
};
use sluice_proxy::telemetry::{OtlpProtocol, Propagation, TraceConfig};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN: &str = "00f067aa0ba902b7";

/// The mesh's policy for `log-service`; `backend` is log's inbound sidecar (the log
/// sidecar itself only needs the host to exist).
fn log_policy(backend: SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: log-service, namespace: e2e }}
spec:
  host: log-service
  backends:
    log: {{ addresses: ["{backend}"] }}
  routes:
    - name: flaky
      match: {{ path: {{ prefix: /status }} }}
      retry: {{ attempts: 2, on: [gateway-error], backoff: {{ base: 1ms, max: 2ms }} }}
    - name: logs
      match: {{ path: {{ prefix: /logs }} }}
      accessLog: true
    - name: other
"#
    )
}

fn traced(endpoint: String, protocol: OtlpProtocol, propagation: &[Propagation]) -> TraceConfig {
    TraceConfig {
        otlp_endpoint: Some(endpoint),
        otlp_protocol: protocol,
        sampling: 1.0,
        propagation: propagation.to_vec(),
    }
}

/// Log's sidecar: inbound only, in front of `app`, exporting to `trace`.
async fn log_sidecar(app: SocketAddr, trace: TraceConfig) -> TestProxy {
    TestProxy::start_with(
        &log_policy(app),
        ProxyOptions {
            outbound: false,
            inbound: true,
            app: Some(app),
            service: Some("log-service".into()),
            trace,
            ..Default::default()
        },
    )
    .await
}

fn one<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    f: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {what}, got {found:#?}\nall spans: {spans:#?}"
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_to_log_is_one_trace_across_both_sidecars_over_otlp_grpc() {
    let receiver = OtlpReceiver::start().await;
    let app = Upstream::http1("log-app").await;
    let trace = || {
        traced(
            receiver.grpc_endpoint(),
            OtlpProtocol::Grpc,
            &[Propagation::W3c],
        )
    };
    let log = log_sidecar(app.addr(), trace()).await;
    let order = TestProxy::start_with(
        &log_policy(log.inbound_addr()),
        ProxyOptions {
            service: Some("order-service".into()),
            trace: trace(),
            ..Default::default()
        },
    )
    .await;

    // The order application calls log with the context of its own span.
    let mut conn = HttpConn::h1(order.outbound_addr()).await.unwrap();
    let req = conn
        .request_builder(Method::POST, "log-service", "/logs/orders")
        .header("traceparent", format!("00-{TRACE}-{APP_SPAN}-01"))
        .header("tracestate", "shop=1")
        .body(full_body("order 42"))
        .unwrap();
    let reply = conn.call(req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    // What the log application saw: the same trace, its parent the log sidecar's span.
    let seen = reply.header("x-seen-traceparent").to_string();
    assert!(seen.starts_with(&format!("00-{TRACE}-")), "{seen}");
    assert!(seen.ends_with("-01"), "{seen}");

    // A call without context starts a trace in order's sidecar; a failing backend is
    // retried twice, each try a child of the same client span.
    let reply = conn.get("log-service", "/status/503").await.unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.requests(), 4);

    // A host no policy names: the proxy's own 404 is traced too.
    let reply = conn.get("nowhere", "/missing").await.unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);

    // Shutting down flushes the batch processors.
    order.shutdown().await;
    log.shutdown().await;
    let spans = receiver.spans();
    assert!(spans.iter().all(|s| s.via == "grpc"));

    // The first call: app span → order client span → log server span → the app.
    let in_trace: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == TRACE)
        .cloned()
        .collect();
    assert_eq!(in_trace.len(), 2, "{in_trace:#?}");
    let client = one(&in_trace, "client span", |s| s.kind == KIND_CLIENT);
    let server = one(&in_trace, "server span", |s| s.kind == KIND_SERVER);
    assert_eq!(client.parent_span_id, APP_SPAN);
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(seen, format!("00-{TRACE}-{}-01", server.span_id));
    assert_eq!(client.service, "order-service");
    assert_eq!(server.service, "log-service");
    // Without `--node-id` the instance is still named (the host name, as the control
    // plane knows the proxy).
    for s in [client, server] {
        let instance = s.resource.get("service.instance.id");
        assert!(instance.is_some_and(|i| !i.is_empty()), "{:?}", s.resource);
    }
    assert_eq!(client.name, "POST log-service.logs");
    for (k, v) in [
        ("http.request.method", "POST"),
        ("url.path", "/logs/orders"),
        ("server.address", "log-service"),
        ("http.response.status_code", "200"),
        ("sluice.route", "log-service.logs"),
        ("sluice.backend", "log"),
        ("network.protocol.version", "1.1"),
    ] {
        assert_eq!(client.attr(k), Some(v), "client span {k}: {client:#?}");
    }
    assert_eq!(client.attr("sluice.reason"), None);
    for (k, v) in [
        ("http.request.method", "POST"),
        ("url.path", "/logs/orders"),
        ("http.response.status_code", "200"),
        ("sluice.route", "inbound"),
        ("sluice.backend", "app"),
    ] {
        assert_eq!(server.attr(k), Some(v), "server span {k}: {server:#?}");
    }
    assert_eq!(client.status, 0);

    // The second call: a root client span with its retries, three server spans under it.
    let retried = one(&spans, "retried client span", |s| {
        s.kind == KIND_CLIENT && s.attr("url.path") == Some("/status/503")
    });
    assert_eq!(retried.parent_span_id, "", "a new trace starts here");
    assert_eq!(retried.attr("sluice.route"), Some("log-service.flaky"));
    assert_eq!(retried.attr("sluice.retries"), Some("2"));
    assert_eq!(retried.attr("http.response.status_code"), Some("503"));
    assert_eq!(retried.status, 2, "a 5xx is an error");
    let tries: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == KIND_SERVER && s.trace_id == retried.trace_id)
        .collect();
    assert_eq!(tries.len(), 3, "{tries:#?}");
    assert!(tries.iter().all(|s| s.parent_span_id == retried.span_id));

    // The unrouted call: a client span with the reason and no route.
    let unrouted = one(&spans, "no-route client span", |s| {
        s.attr("url.path") == Some("/missing")
    });
    assert_eq!(unrouted.kind, KIND_CLIENT);
    assert_eq!(unrouted.name, "GET");
    assert_eq!(unrouted.attr("sluice.reason"), Some("no-route"));
    assert_eq!(unrouted.attr("http.response.status_code"), Some("404"));
    assert_eq!(unrouted.attr("sluice.route"), None);
    assert_eq!(unrouted.status, 2, "a client span is an error from 400 on");
}

fn bin() -> &'static Path {
    env!("CARGO_BIN_EXE_e2e-proxy").as_ref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_context_over_otlp_http_from_the_command_line_and_access_logs_per_route() {
    let receiver = OtlpReceiver::start().await;
    let app = Upstream::http1("log-app").await;
    let log = log_sidecar(
        app.addr(),
        traced(
            receiver.http_endpoint(),
            OtlpProtocol::Http,
            &[Propagation::W3c, Propagation::B3],
        ),
    )
    .await;
    // Order's sidecar is the real binary, configured by flags.
    let endpoint = receiver.http_endpoint();
    let mut order = ChildProxy::spawn(
        bin(),
        &log_policy(log.inbound_addr()),
        &[
            "--service",
            "order-service",
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "http",
            "--trace-propagation",
            "w3c,b3",
            "--log-format",
            "json",
        ],
    )
    .await;

    // An application that speaks B3 only.
    let mut conn = HttpConn::h1(order.outbound_addr()).await.unwrap();
    let req = conn
        .request_builder(Method::GET, "log-service", "/logs/today")
        .header("x-b3-traceid", TRACE)
        .header("x-b3-spanid", APP_SPAN)
        .header("x-b3-sampled", "1")
        // The same context in the single form, and a parent of the caller's own.
        .header("b3", format!("{TRACE}-{APP_SPAN}-1"))
        .header("x-b3-parentspanid", "05e3ac9a4f6e3b90")
        .body(full_body(""))
        .unwrap();
    let reply = conn.call(req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.header("x-seen-traceparent").contains(TRACE));
    // Each sidecar replaces the caller's B3 headers with its own span's context: none
    // of the caller's reaches the application beside it, and no empty `tracestate`.
    assert_eq!(reply.header("x-seen-b3"), "");
    assert_eq!(reply.header("x-seen-b3-parent"), "");
    assert_eq!(reply.header("x-seen-tracestate"), "absent");
    // A route without `accessLog` writes no access line.
    let reply = conn.get("log-service", "/other").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);

    order.sigterm();
    assert!(order.wait_exit(Duration::from_secs(20)).await.success());
    log.shutdown().await;

    let spans = receiver.spans();
    let in_trace: Vec<_> = spans.iter().filter(|s| s.trace_id == TRACE).collect();
    assert_eq!(in_trace.len(), 2, "{spans:#?}");
    assert!(in_trace.iter().all(|s| s.via == "http"));
    let client = in_trace
        .iter()
        .find(|s| s.kind == KIND_CLIENT)
        .expect("client span");
    let server = in_trace
        .iter()
        .find(|s| s.kind == KIND_SERVER)
        .expect("server span");
    assert_eq!(client.parent_span_id, APP_SPAN);
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(client.service, "order-service");

    // One JSON access line, for the `logs` route only.
    let log_text = order.log();
    let access = access_lines(&log_text);
    assert_eq!(access.len(), 1, "{log_text}");
    let f = &access[0]["fields"];
    assert_eq!(f["route"], "log-service.logs", "{f}");
    assert_eq!(f["backend"], "log");
    assert_eq!(f["direction"], "outbound");
    assert_eq!(f["method"], "GET");
    assert_eq!(f["path"], "/logs/today");
    assert_eq!(f["status"], 200);
    assert_eq!(f["retries"], 0);
    assert_eq!(f["trace_id"], TRACE);
    assert!(f["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{f}");
}

/// `inbound.accessLog` in the host's own policy writes one access line per request the
/// inbound sidecar hands to its application; without it the sidecar writes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_access_log_follows_the_hosts_own_policy() {
    let app = Upstream::http1("log-app").await;
    let app_addr = app.addr().to_string();
    for logged in [true, false] {
        let policy = log_policy(app.addr()).replace(
            "  routes:\n",
            &format!("  inbound: {{ accessLog: {logged} }}\n  routes:\n"),
        );
        let mut log = ChildProxy::spawn_inbound(
            bin(),
            &policy,
            &[
                "--app",
                &app_addr,
                "--service",
                "log-service",
                "--log-format",
                "json",
            ],
        )
        .await;
        let inbound = log.inbound_addr().expect("an inbound listener");
        let mut conn = HttpConn::h1(inbound).await.unwrap();
        let reply = conn.get("log-service", "/other/x").await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        log.sigterm();
        assert!(log.wait_exit(Duration::from_secs(20)).await.success());

        let log_text = log.log();
        let access = access_lines(&log_text);
        if !logged {
            assert!(access.is_empty(), "{log_text}");
            continue;
        }
        assert_eq!(access.len(), 1, "{log_text}");
        let f = &access[0]["fields"];
        assert_eq!(f["direction"], "inbound", "{f}");
        assert_eq!(f["method"], "GET");
        assert_eq!(f["path"], "/other/x");
        assert_eq!(f["status"], 200);
    }
    assert_eq!(app.requests(), 2);
}

/// A request its client abandons before the answer (the metrics and `/recent` are
/// checked in `governance`) also ends its access line and its client span as 499, so
/// a storm of client timeouts shows in the logs and traces, not only in the counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_client_abandons_is_499_in_the_access_log_and_its_span() {
    let receiver = OtlpReceiver::start().await;
    let up = Upstream::auto("stuck").await;
    let policy = format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: stuck, namespace: e2e }}
spec:
  host: stuck
  backends:
    up: {{ addresses: ["{}"] }}
  routes:
    - name: main
      accessLog: true
"#,
        up.addr()
    );
    let endpoint = receiver.http_endpoint();
    let mut proxy = ChildProxy::spawn(
        bin(),
        &policy,
        &[
            "--service",
            "order-service",
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "http",
            "--log-format",
            "json",
        ],
    )
    .await;
    up.abandon_held_request(proxy.outbound_addr(), "stuck")
        .await;
    wait_until("the abandoned request's access line", WAIT, || async {
        !access_lines(&proxy.log()).is_empty()
    })
    .await;
    up.release_held();
    proxy.sigterm();
    assert!(proxy.wait_exit(Duration::from_secs(20)).await.success());

    let log_text = proxy.log();
    let access = access_lines(&log_text);
    assert_eq!(access.len(), 1, "{log_text}");
    let f = &access[0]["fields"];
    assert_eq!(f["route"], "stuck.main", "{f}");
    assert_eq!(f["path"], "/hold");
    assert_eq!(f["status"], 499, "{f}");
    let spans = receiver.spans();
    let span = one(&spans, "client span of /hold", |s| s.kind == KIND_CLIENT);
    assert_eq!(
        span.attr("http.response.status_code"),
        Some("499"),
        "{span:#?}"
    );
    assert_eq!(span.attr("sluice.route"), Some("stuck.main"), "{span:#?}");
    assert_eq!(span.status, 2, "a client span is an error from 400 on");
}
