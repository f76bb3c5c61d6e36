//! Prometheus metrics of the proxy, in one registry of its own.
//!
//! Label handles for the data path are resolved once per route × backend and kept in
//! [`RouteMetrics`], so a request never formats labels or takes the family's lock
//! (only a status code outside [`COMMON_CODES`] does, once per request). Inbound
//! requests over mTLS carry the caller's SPIFFE ID as `peer_identity` (empty
//! otherwise); handles per peer are kept in a copy-on-write map, read without a lock.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::ProxyError;

/// Buckets from 100 µs to 10 s: loopback hops are sub-millisecond, timeouts are seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Distinct peer identities with their own series per route; later ones share `other`.
const MAX_PEERS: usize = 1024;

/// Status codes whose counters are cached per route × backend.
pub const COMMON_CODES: [u16; 20] = [
    200, 201, 202, 204, 206, 301, 302, 304, 400, 401, 403, 404, 409, 429, 499, 500, 501, 502, 503,
    504,
];

/// Every metric family of the proxy, registered in [`Metrics::registry`].
#[derive(Clone, Debug)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// `sluice_requests_total{direction,namespace,route,backend,code,peer_identity}`.
    pub requests: IntCounterVec,
    /// `sluice_request_duration_seconds{direction,namespace,route,backend,peer_identity}`: time to
    /// response headers.
    pub duration: HistogramVec,
    /// `sluice_ratelimit_decisions_total{direction,namespace,route,decision}` (allowed, limited, shadow).
    pub ratelimit_decisions: IntCounterVec,
    /// `sluice_ratelimit_backend_errors_total{reason}` (timeout, error): failed
    /// reconciliations of the fleet limits with Redis.
    pub ratelimit_backend_errors: IntCounterVec,
    /// `sluice_ratelimit_fleet_degraded`: 1 while fleet limits run on their local fallback.
    pub ratelimit_fleet_degraded: IntGauge,
    /// `sluice_retries_total{namespace,route,backend,outcome}`.
    pub retries: IntCounterVec,
    /// `sluice_fallbacks_total{namespace,route,backend,reason}`: answers a route's fallback gave
    /// because its primary `backend` failed for `reason`.
    pub fallbacks: IntCounterVec,
    /// `sluice_breaker_state{namespace,route,backend,state}`: 1 for the current state, 0 for the others.
    pub breaker_state: IntGaugeVec,
    /// `sluice_breaker_transitions_total{namespace,route,backend,from,to}`.
    pub breaker_transitions: IntCounterVec,
    /// `sluice_policy_info{hash}`: 1 for the policy version in force.
    pub policy_info: IntGaugeVec,
    /// `sluice_policy_reloads_total{result}` (applied, unchanged, rejected).
    pub policy_reloads: IntCounterVec,
    /// `sluice_identity_cert_expiry_timestamp_seconds`: when the workload certificate
    /// expires (Unix seconds; 0 before the first one, or without mTLS).
    pub identity_expiry: Gauge,
    /// `sluice_tcp_connections_total{direction,outcome}`: connections passed through as
    /// opaque TCP, counted when they end (`passthrough`, `connect_error`, `error`).
    pub tcp_connections: IntCounterVec,
    /// `sluice_tcp_bytes_total{direction,flow}`: bytes of passed-through connections as
    /// they flow, `sent` from the client to its destination, `received` back.
    pub tcp_bytes: IntCounterVec,
    /// `sluice_tcp_open_connections{direction}`: passed-through connections open now.
    pub tcp_open: IntGaugeVec,
    /// `sluice_concurrency_limit`: the inbound limit on requests in flight to the app.
    pub concurrency_limit: IntGauge,
    /// `sluice_concurrency_in_flight`: inbound requests in flight to the app now.
    pub concurrency_in_flight: IntGauge,
    /// `sluice_overload_refusals_total{priority}`: inbound requests refused `overloaded`.
    pub overload_refusals: IntCounterVec,
    /// `sluice_response_body_timeouts_total{direction}`: response bodies cut off because
    /// the upstream sent nothing for `--response-body-timeout`.
    pub response_body_timeouts: IntCounterVec,
    /// `sluice_reports_dropped_total`: traffic reports to the control plane dropped
    /// because the stream's queue was full.
    pub reports_dropped: IntCounter,
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Result<Self, ProxyError> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("sluice_requests_total", "Requests handled, by outcome."),
            &[
                "direction",
                "namespace",
                "route",
                "backend",
                "code",
                "peer_identity",
            ],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_request_duration_seconds",
                "Time from request to response headers.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &[
                "direction",
                "namespace",
                "route",
                "backend",
                "peer_identity",
            ],
        )?;
        let ratelimit_decisions = IntCounterVec::new(
            Opts::new("sluice_ratelimit_decisions_total", "Rate limit decisions."),
            &["direction", "namespace", "route", "decision"],
        )?;
        let ratelimit_backend_errors = IntCounterVec::new(
            Opts::new(
                "sluice_ratelimit_backend_errors_total",
                "Failed reconciliations of the fleet rate limits with Redis.",
            ),
            &["reason"],
        )?;
        let ratelimit_fleet_degraded = IntGauge::new(
            "sluice_ratelimit_fleet_degraded",
            "1 while fleet rate limits are enforced locally (perSecond / N) because Redis is unreachable.",
        )?;
        let retries = IntCounterVec::new(
            Opts::new("sluice_retries_total", "Retries, by outcome."),
            &["namespace", "route", "backend", "outcome"],
        )?;
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "sluice_fallbacks_total",
                "Answers given by a route's fallback, by the primary backend and its failure.",
            ),
            &["namespace", "route", "backend", "reason"],
        )?;
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "sluice_breaker_state",
                "Circuit breaker state: 1 for the current state, 0 for the others.",
            ),
            &["namespace", "route", "backend", "state"],
        )?;
        let breaker_transitions = IntCounterVec::new(
            Opts::new(
                "sluice_breaker_transitions_total",
                "Circuit breaker state changes.",
            ),
            &["namespace", "route", "backend", "from", "to"],
        )?;
        let policy_info = IntGaugeVec::new(
            Opts::new("sluice_policy_info", "The policy version in force."),
            &["hash"],
        )?;
        let policy_reloads = IntCounterVec::new(
            Opts::new("sluice_policy_reloads_total", "Policy updates, by result."),
            &["result"],
        )?;
        let identity_expiry = Gauge::new(
            "sluice_identity_cert_expiry_timestamp_seconds",
            "When the workload certificate expires, in Unix seconds.",
        )?;
        let tcp_connections = IntCounterVec::new(
            Opts::new(
                "sluice_tcp_connections_total",
                "Connections passed through as opaque TCP, by outcome, counted when they end.",
            ),
            &["direction", "outcome"],
        )?;
        let tcp_bytes = IntCounterVec::new(
            Opts::new(
                "sluice_tcp_bytes_total",
                "Bytes of passed-through connections: sent to the destination, received from it.",
            ),
            &["direction", "flow"],
        )?;
        let tcp_open = IntGaugeVec::new(
            Opts::new(
                "sluice_tcp_open_connections",
                "Passed-through connections open now.",
            ),
            &["direction"],
        )?;
        let concurrency_limit = IntGauge::new(
            "sluice_concurrency_limit",
            "The inbound limit on requests in flight to the app.",
        )?;
        let concurrency_in_flight = IntGauge::new(
            "sluice_concurrency_in_flight",
            "Inbound requests in flight to the app.",
        )?;
        let overload_refusals = IntCounterVec::new(
            Opts::new(
                "sluice_overload_refusals_total",
                "Inbound requests refused as overloaded, by priority level.",
            ),
            &["priority"],
        )?;
        let response_body_timeouts = IntCounterVec::new(
            Opts::new(
                "sluice_response_body_timeouts_total",
                "Response bodies cut off because the upstream sent nothing for the response body timeout.",
            ),
            &["direction"],
        )?;
        let reports_dropped = IntCounter::new(
            "sluice_reports_dropped_total",
            "Traffic reports to the control plane dropped because the stream's queue was full.",
        )?;
        registry.register(Box::new(reports_dropped.clone()))?;
        registry.register(Box::new(concurrency_limit.clone()))?;
        registry.register(Box::new(concurrency_in_flight.clone()))?;
        registry.register(Box::new(overload_refusals.clone()))?;
        registry.register(Box::new(response_body_timeouts.clone()))?;
        registry.register(Box::new(tcp_connections.clone()))?;
        registry.register(Box::new(tcp_bytes.clone()))?;
        registry.register(Box::new(tcp_open.clone()))?;
        registry.register(Box::new(identity_expiry.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(ratelimit_decisions.clone()))?;
        registry.register(Box::new(ratelimit_backend_errors.clone()))?;
        registry.register(Box::new(ratelimit_fleet_degraded.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(fallbacks.clone()))?;
        registry.register(Box::new(breaker_state.clone()))?;
        registry.register(Box::new(breaker_transitions.clone()))?;
        registry.register(Box::new(policy_info.clone()))?;
        registry.register(Box::new(policy_reloads.clone()))?;
        Ok(Self {
            registry,
            requests,
            duration,
            ratelimit_decisions,
            ratelimit_backend_errors,
            ratelimit_fleet_degraded,
            retries,
            fallbacks,
            breaker_state,
            breaker_transitions,
            policy_info,
            policy_reloads,
            identity_expiry,
            tcp_connections,
            tcp_bytes,
            tcp_open,
            concurrency_limit,
            concurrency_in_flight,
            overload_refusals,
            response_body_timeouts,
            reports_dropped,
        })
    }

    /// Label handles for connections passed through as opaque TCP on `direction`'s
    /// listener, resolved once per listener.
    pub fn tcp(&self, direction: &'static str) -> TcpMetrics {
        let outcome = |o: &str| self.tcp_connections.with_label_values(&[direction, o]);
        let flow = |f: &str| self.tcp_bytes.with_label_values(&[direction, f]);
        TcpMetrics {
            passthrough: outcome("passthrough"),
            connect_error: outcome("connect_error"),
            error: outcome("error"),
            refused: outcome("refused"),
            sent: flow("sent"),
            received: flow("received"),
            open: self.tcp_open.with_label_values(&[direction]),
        }
    }

    /// The counters of `direction`'s HTTP/1 request heads that missed the header timeout
    /// and of its response bodies cut off by the response body timeout.
    pub fn head_timeouts(&self, direction: &'static str) -> HeadTimeouts {
        HeadTimeouts {
            requests: self.requests.clone(),
            direction,
            response_bodies: self.response_body_timeouts.with_label_values(&[direction]),
        }
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec fails only on a broken metric, which registration rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Marks `hash` as the policy version in force.
    pub(crate) fn set_policy_version(&self, old: Option<&str>, new: &str) {
        if let Some(old) = old {
            let _ = self.policy_info.remove_label_values(&[old]);
        }
        self.policy_info.with_label_values(&[new]).set(1);
    }

    /// Label handles for one route (or the inbound pseudo-route) and its backends; `key`
    /// is the route's key, shown as its `namespace` and `route` labels.
    pub fn route(&self, direction: &'static str, key: &str, backends: &[&str]) -> RouteMetrics {
        let (namespace, route) = crate::route::key_labels(key);
        let labels = RouteLabels {
            metrics: self.clone(),
            direction,
            namespace: namespace.into(),
            route: route.into(),
            backends: backends.iter().map(|b| Arc::from(*b)).collect(),
        };
        RouteMetrics {
            plain: labels.set(Arc::from("")),
            peers: ArcSwap::from_pointee(HashMap::new()),
            other: OnceLock::new(),
            labels,
        }
    }
}

/// Counts one listener's request heads that did not arrive within the header timeout,
/// answered 408 before any route was known: `sluice_requests_total{namespace="",route="",backend="",
/// code="408"}`, beside the 408s of stalled bodies, which carry their route.
#[derive(Clone, Debug)]
pub struct HeadTimeouts {
    requests: IntCounterVec,
    direction: &'static str,
    /// `sluice_response_body_timeouts_total{direction}`, resolved once per listener.
    pub response_bodies: IntCounter,
}

impl HeadTimeouts {
    /// Counts one timed-out head from `peer` (its SPIFFE ID over mTLS). Only on the
    /// timeout's own path, so the label lookup is no hot-path cost.
    pub fn count(&self, peer: Option<&str>) {
        self.requests
            .with_label_values(&[self.direction, "", "", "", "408", peer.unwrap_or("")])
            .inc();
    }
}

/// The series of one listener's passed-through connections.
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    /// Ended normally (both sides closed).
    pub passthrough: IntCounter,
    /// The original destination could not be reached.
    pub connect_error: IntCounter,
    /// Ended with an error (a reset, or cut at shutdown).
    pub error: IntCounter,
    /// Closed at once: inbound, its original destination was one of the proxy's own
    /// ports or a loopback address.
    pub refused: IntCounter,
    /// Bytes from the client to the destination.
    pub sent: IntCounter,
    /// Bytes from the destination to the client.
    pub received: IntCounter,
    /// Open now.
    pub open: IntGauge,
}

/// What the label handles of a route are made from.
#[derive(Debug)]
struct RouteLabels {
    metrics: Metrics,
    direction: &'static str,
    namespace: Arc<str>,
    route: Arc<str>,
    backends: Box<[Arc<str>]>,
}

impl RouteLabels {
    fn set(&self, peer: Arc<str>) -> LabelSet {
        let mk = |backend: &Arc<str>| BackendMetrics {
            metrics: self.metrics.clone(),
            direction: self.direction,
            namespace: self.namespace.clone(),
            route: self.route.clone(),
            backend: backend.clone(),
            peer: peer.clone(),
            handles: OnceLock::new(),
        };
        LabelSet {
            backends: self.backends.iter().map(mk).collect(),
            unresolved: mk(&Arc::from("")),
        }
    }
}

/// Cached label handles for one route: one entry per backend, plus one for requests that
/// failed before a backend was chosen; per peer identity on inbound mTLS.
#[derive(Debug)]
pub struct RouteMetrics {
    plain: LabelSet,
    peers: ArcSwap<HashMap<Arc<str>, Arc<LabelSet>>>,
    /// Peers beyond [`MAX_PEERS`].
    other: OnceLock<LabelSet>,
    labels: RouteLabels,
}

/// The handles of one route for one `peer_identity` value.
#[derive(Debug)]
struct LabelSet {
    backends: Box<[BackendMetrics]>,
    unresolved: BackendMetrics,
}

impl LabelSet {
    fn record(&self, backend: Option<usize>, code: u16, elapsed: Duration) {
        let b = backend
            .and_then(|i| self.backends.get(i))
            .unwrap_or(&self.unresolved);
        b.record(code, elapsed);
    }
}

impl RouteMetrics {
    /// Counts one request answered with `code` after `elapsed`; `backend` is the index of
    /// the backend that answered, if one was chosen; `peer` the caller's SPIFFE ID when
    /// it came over mTLS.
    pub fn record(&self, backend: Option<usize>, peer: Option<&str>, code: u16, elapsed: Duration) {
        let Some(peer) = peer else {
            return self.plain.record(backend, code, elapsed);
        };
        let peers = self.peers.load();
        if let Some(set) = peers.get(peer) {
            return set.record(backend, code, elapsed);
        }
        if peers.len() >= MAX_PEERS {
            let other = self
                .other
                .get_or_init(|| self.labels.set(Arc::from("other")));
            return other.record(backend, code, elapsed);
        }
        drop(peers);
        self.peer_set(peer).record(backend, code, elapsed);
    }

    /// The slow path, once per new peer of this route: copy the map with it added.
    fn peer_set(&self, peer: &str) -> Arc<LabelSet> {
        let mut added = None;
        self.peers.rcu(|map| {
            let mut map = HashMap::clone(map);
            let set = map
                .entry(Arc::from(peer))
                .or_insert_with(|| Arc::new(self.labels.set(Arc::from(peer))))
                .clone();
            added = Some(set);
            map
        });
        added.expect("rcu ran at least once")
    }
}

/// Label handles for one route × backend, created on first use.
#[derive(Debug)]
struct BackendMetrics {
    metrics: Metrics,
    direction: &'static str,
    namespace: Arc<str>,
    route: Arc<str>,
    backend: Arc<str>,
    peer: Arc<str>,
    handles: OnceLock<Handles>,
}

#[derive(Debug)]
struct Handles {
    duration: Histogram,
    // Filled per code on first use, so codes never seen do not show up as zero series.
    codes: [OnceLock<IntCounter>; COMMON_CODES.len()],
}

impl BackendMetrics {
    fn handles(&self) -> &Handles {
        self.handles.get_or_init(|| Handles {
            duration: self.metrics.duration.with_label_values(&[
                self.direction,
                &self.namespace,
                &self.route,
                &self.backend,
                &self.peer,
            ]),
            codes: [const { OnceLock::new() }; COMMON_CODES.len()],
        })
    }

    fn counter(&self, code: u16) -> IntCounter {
        self.metrics.requests.with_label_values(&[
            self.direction,
            &self.namespace,
            &self.route,
            &self.backend,
            &code.to_string(),
            &self.peer,
        ])
    }

    fn record(&self, code: u16, elapsed: Duration) {
        let h = self.handles();
        h.duration.observe(elapsed.as_secs_f64());
        match COMMON_CODES.iter().position(|&c| c == code) {
            Some(i) => h.codes[i].get_or_init(|| self.counter(code)).inc(),
            None => self.counter(code).inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_cached_and_rare_codes() {
        let m = Metrics::new().unwrap();
        let r = m.route("outbound", "shop/log.ingest", &["log-v1"]);
        r.record(Some(0), None, 200, Duration::from_millis(1));
        r.record(Some(0), None, 418, Duration::from_millis(1));
        r.record(None, None, 504, Duration::from_millis(1));
        let text = m.encode();
        assert!(text.contains(
            r#"sluice_requests_total{backend="log-v1",code="200",direction="outbound",namespace="shop",peer_identity="",route="log.ingest"} 1"#
        ));
        assert!(text.contains(
            r#"sluice_requests_total{backend="log-v1",code="418",direction="outbound",namespace="shop",peer_identity="",route="log.ingest"} 1"#
        ));
        assert!(text.contains(
            r#"sluice_requests_total{backend="",code="504",direction="outbound",namespace="shop",peer_identity="",route="log.ingest"} 1"#
        ));
        assert!(text.contains("sluice_request_duration_seconds_bucket"));
    }

    #[test]
    fn inbound_series_carry_the_peer_identity() {
        let m = Metrics::new().unwrap();
        let r = m.route("inbound", "inbound", &["app"]);
        let order = "spiffe://cluster.local/ns/shop/sa/order";
        r.record(Some(0), Some(order), 200, Duration::from_millis(1));
        r.record(Some(0), Some(order), 200, Duration::from_millis(1));
        r.record(None, Some(order), 403, Duration::from_millis(1));
        let text = m.encode();
        assert!(text.contains(&format!(
            r#"sluice_requests_total{{backend="app",code="200",direction="inbound",namespace="",peer_identity="{order}",route="inbound"}} 2"#
        )), "{text}");
        assert!(text.contains(&format!(
            r#"sluice_requests_total{{backend="",code="403",direction="inbound",namespace="",peer_identity="{order}",route="inbound"}} 1"#
        )));
        assert!(text.contains("sluice_identity_cert_expiry_timestamp_seconds 0"));
    }
}
