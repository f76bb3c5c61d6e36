//! The fleet-wide rate limits' settings and their command-line flags.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

/// How the proxy reaches Redis for `rateLimit.scope: fleet`, and its fallback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// `redis://` or `rediss://` URL; without it fleet limits run on the fallback only.
    pub redis_url: Option<String>,
    /// Extra root certificates (PEM) for a `rediss://` server, beside the system's.
    pub redis_ca_file: Option<PathBuf>,
    /// Longest wait for one reconciliation round trip (and for a connection).
    pub redis_timeout: Duration,
    /// How often every key's share is reconciled in one pipelined round trip.
    pub sync_interval: Duration,
    /// N of the fallback `perSecond / N` when the control plane names none for a route.
    pub fleet_size: NonZeroU32,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_ca_file: None,
            redis_timeout: Duration::from_secs(1),
            sync_interval: Duration::from_millis(100),
            fleet_size: NonZeroU32::MIN,
        }
    }
}

/// Flags of `sluice-proxy run` for fleet-wide rate limits.
#[derive(Debug, clap::Args)]
pub(crate) struct FleetArgs {
    /// Redis counting `rateLimit.scope: fleet` limits (redis://host:6379 or rediss://…);
    /// without it each proxy enforces perSecond / --fleet-size.
    #[arg(long, env = "SLUICE_REDIS_URL", value_name = "URL", value_parser = parse_redis_url)]
    pub(crate) redis_url: Option<String>,
    /// Extra root certificates (PEM) to verify a rediss:// server with.
    #[arg(long, env = "SLUICE_REDIS_CA_FILE", value_name = "FILE")]
    pub(crate) redis_ca_file: Option<PathBuf>,
    /// Longest wait for Redis per reconciliation; requests never wait on it.
    #[arg(
        long,
        env = "SLUICE_REDIS_TIMEOUT",
        value_name = "DURATION",
        default_value = "1s"
    )]
    pub(crate) redis_timeout: sluice_config::Duration,
    /// How often the shares of every fleet limit are reconciled with Redis.
    #[arg(
        long,
        env = "SLUICE_REDIS_SYNC_INTERVAL",
        value_name = "DURATION",
        default_value = "100ms"
    )]
    pub(crate) redis_sync_interval: sluice_config::Duration,
    /// Proxies sharing each fleet limit, for the fallback perSecond / N while Redis is
    /// unreachable, when the control plane does not say.
    #[arg(long, env = "SLUICE_FLEET_SIZE", value_name = "N", default_value = "1")]
    pub(crate) fleet_size: NonZeroU32,
}

fn parse_redis_url(s: &str) -> Result<String, String> {
    if s.starts_with("redis://") || s.starts_with("rediss://") {
        Ok(s.to_owned())
    } else {
        Err(format!("expected a redis:// or rediss:// URL, got {s:?}"))
    }
}

impl From<FleetArgs> for FleetConfig {
    fn from(a: FleetArgs) -> Self {
        Self {
            redis_url: a.redis_url,
            redis_ca_file: a.redis_ca_file,
            redis_timeout: a.redis_timeout.get(),
            sync_interval: a.redis_sync_interval.get().max(Duration::from_millis(1)),
            fleet_size: a.fleet_size,
        }
    }
}
