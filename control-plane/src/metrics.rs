//! The control plane's Prometheus metrics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the control plane exports, registered in its own registry.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// Open policy streams.
    pub(crate) connected: IntGauge,
    /// Snapshots sent.
    pub(crate) pushes: IntCounter,
    /// Answers received, by `result` (`ack`, `nack`).
    pub(crate) acks: IntCounterVec,
    /// Policy files refused by validation.
    pub(crate) validation_failures: IntCounter,
    /// From a version's publication (or the stream's start, if later) to its ACK.
    pub(crate) push_latency: Histogram,
    /// Renewals of the gRPC serving certificate.
    pub(crate) serving_cert_renewals: IntCounter,
    /// Renewals of the webhook's serving certificate, when the mesh CA issues it.
    pub(crate) webhook_cert_renewals: IntCounter,
    /// Policy streams opened (a proxy that lost its stream opens another).
    pub(crate) streams_opened: IntCounter,
    policy_info: IntGaugeVec,
    held_back: IntGaugeVec,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let connected = IntGauge::new(
            "sluice_cp_connected_proxies",
            "Policy streams currently open.",
        )
        .expect("valid metric");
        let pushes = IntCounter::new(
            "sluice_cp_pushes_total",
            "Policy snapshots sent to proxies.",
        )
        .expect("valid metric");
        let acks = IntCounterVec::new(
            Opts::new(
                "sluice_cp_acks_total",
                "Snapshot answers from proxies, by result (ack, nack).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let validation_failures = IntCounter::new(
            "sluice_cp_validation_failures_total",
            "Policy file versions refused by validation.",
        )
        .expect("valid metric");
        let push_latency = Histogram::with_opts(
            HistogramOpts::new(
                "sluice_cp_push_latency_seconds",
                "Time from a policy version's publication to a proxy's ACK of it.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        let serving_cert_renewals = IntCounter::new(
            "sluice_cp_serving_cert_renewals_total",
            "Renewals of the gRPC port's serving certificate.",
        )
        .expect("valid metric");
        let webhook_cert_renewals = IntCounter::new(
            "sluice_cp_webhook_cert_renewals_total",
            "Renewals of the injection webhook's serving certificate issued by the mesh CA.",
        )
        .expect("valid metric");
        let streams_opened = IntCounter::new(
            "sluice_cp_streams_opened_total",
            "Policy streams opened by proxies.",
        )
        .expect("valid metric");
        let policy_info = IntGaugeVec::new(
            Opts::new(
                "sluice_cp_policy_info",
                "The policy version (content hash) being served; always 1.",
            ),
            &["hash"],
        )
        .expect("valid metric");
        let held_back = IntGaugeVec::new(
            Opts::new(
                "sluice_cp_policies_held_back",
                "Policies proxies of an older schema version get in an older form (held) or not at all (withheld); always 1.",
            ),
            &["schema_version", "policy", "state"],
        )
        .expect("valid metric");
        for m in [
            Box::new(connected.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(pushes.clone()),
            Box::new(acks.clone()),
            Box::new(validation_failures.clone()),
            Box::new(push_latency.clone()),
            Box::new(policy_info.clone()),
            Box::new(held_back.clone()),
            Box::new(serving_cert_renewals.clone()),
            Box::new(webhook_cert_renewals.clone()),
            Box::new(streams_opened.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        // Both results exist from the start, so rate() works before the first NACK.
        acks.with_label_values(&["ack"]);
        acks.with_label_values(&["nack"]);
        Self {
            registry,
            connected,
            pushes,
            acks,
            validation_failures,
            push_latency,
            serving_cert_renewals,
            webhook_cert_renewals,
            streams_opened,
            policy_info,
            held_back,
        }
    }

    /// One series per policy that a schema version's proxies get held back.
    pub(crate) fn set_held_back(&self, views: &[crate::views::View]) {
        self.held_back.reset();
        for v in views {
            for h in &v.held_back {
                self.held_back
                    .with_label_values(&[&v.schema.to_string(), &h.policy, h.state])
                    .set(1);
            }
        }
    }

    pub(crate) fn set_policy_hash(&self, hash: &str) {
        self.policy_info.reset();
        self.policy_info.with_label_values(&[hash]).set(1);
    }

    /// Registers a family kept by another module (the rollout engine's).
    pub(crate) fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::error!(error = %e, "metric not registered");
        }
    }

    pub(crate) fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}
