//! End-to-end tests: real clients, real Sluice proxies, real upstreams, on loopback.

mod admin_pages;
mod authority;
mod cert_rotation;
mod cli;
mod control_plane;
mod dashboards;
mod degradation;
mod first_contact;
mod fleet_limits;
mod gateway_api;
mod governance;
mod governance_load;
mod grpc;
mod grpc_interop;
mod hardening;
mod hostile_policy;
mod init_netns;
mod injected;
mod kubernetes;
mod malformed;
mod mesh;
mod mtls;
mod offline_checks;
mod overload;
mod pods;
mod reliability;
mod reload;
mod rollout_acks;
mod rollouts;
mod routing;
mod schema_versions;
mod shutdown;
mod sluicectl;
mod sluicectl_outcomes;
mod streaming;
mod telemetry;
mod timeouts;
mod tls_identity;
mod transparent;
mod upgrades;
mod websocket;

/// A log service on an ephemeral port that fails every ingest with 503.
async fn failing_log_service() -> sluice_examples::RunningService {
    use sluice_examples::log_service::{self, LogServiceConfig};
    let config = LogServiceConfig {
        name: "sick".into(),
        fail_rate: 1.0,
        ..Default::default()
    };
    log_service::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}
