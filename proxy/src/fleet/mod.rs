//! Fleet-wide rate limits on the proxy's side: the flags, the Redis lease store
//! ([`RedisLeases`]) and the reconciliation task that connects the two.
//!
//! The accounting itself (shares, fallback, reconciliation) is in
//! [`sluice_filters::ratelimit::fleet`]; this module only talks to Redis and counts
//! `sluice_ratelimit_backend_errors_total` / `sluice_ratelimit_fleet_degraded`.

mod config;
mod redis;

use std::sync::Arc;

use sluice_filters::ratelimit::fleet::{
    BackendError, FleetObserver, FleetRegistry, FleetSizes, SyncOptions,
};
use tokio::task::JoinHandle;
use tracing::info;

pub(crate) use self::config::FleetArgs;
pub use self::config::FleetConfig;
pub use self::redis::RedisLeases;
use crate::ProxyError;
use crate::metrics::Metrics;

/// Starts reconciling `registry` with the Redis of `cfg`; without one, only keeps the
/// fallback's N current (from `sizes`, else `--fleet-size`). The task ends once the
/// registry is dropped.
pub fn spawn<K>(
    cfg: &FleetConfig,
    registry: &Arc<FleetRegistry<K>>,
    sizes: FleetSizes,
    metrics: &Metrics,
) -> Result<JoinHandle<()>, ProxyError>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    let Some(url) = &cfg.redis_url else {
        return Ok(registry.spawn_sizes(sizes));
    };
    if url.starts_with("rediss://") {
        // The process's rustls provider is ring, as everywhere in the mesh.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let ca = match &cfg.redis_ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|source| ProxyError::File {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let store = RedisLeases::new(url, ca, cfg.redis_timeout)?;
    info!(
        interval = ?cfg.sync_interval,
        fleet_size = cfg.fleet_size.get(),
        "fleet rate limits reconcile with Redis"
    );
    let opts = SyncOptions::new(cfg.redis_timeout, cfg.sync_interval);
    // Both series exist from the start: an alert on their rate sees 0, not no data.
    for e in [BackendError::Timeout, BackendError::Error] {
        let _ = metrics
            .ratelimit_backend_errors
            .with_label_values(&[e.as_str()]);
    }
    let observer = Arc::new(FleetMetrics(metrics.clone()));
    Ok(registry.spawn_sync(store, opts, sizes, observer))
}

/// Feeds `sluice_ratelimit_backend_errors_total{reason}` and `sluice_ratelimit_fleet_degraded`.
struct FleetMetrics(Metrics);

impl FleetObserver for FleetMetrics {
    fn on_backend_error(&self, error: BackendError) {
        self.0
            .ratelimit_backend_errors
            .with_label_values(&[error.as_str()])
            .inc();
    }

    fn on_degraded(&self, degraded: bool) {
        self.0.ratelimit_fleet_degraded.set(i64::from(degraded));
    }
}
