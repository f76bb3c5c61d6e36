//! Renewing the workload certificate before it expires.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Credentials, TlsStore};
use crate::ProxyError;

/// Renewal starts at this fraction of the remaining lifetime…
pub const RENEW_AT: f64 = 0.7;
/// …plus up to this fraction more, at random, so that proxies certified
/// together (a rollout) do not all renew in the same instant.
pub const RENEW_JITTER: f64 = 0.1;

const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long to wait before renewing a certificate with `lifetime` left;
/// `jitter` in `[0, 1)` picks the point in the jitter window.
pub fn renew_delay(lifetime: Duration, jitter: f64) -> Duration {
    lifetime.mul_f64(RENEW_AT + RENEW_JITTER * jitter.clamp(0.0, 1.0))
}

/// Renews the store's credentials forever: waits [`renew_delay`] of what is
/// left of the current certificate, calls `obtain` (retrying with backoff
/// capped at 30 s while the current certificate stays in force) and installs
/// the result. An empty store is certified at once, so this also obtains the
/// first certificate. Spawn it; abort the task to stop.
pub async fn run_renewal<F, Fut>(store: Arc<TlsStore>, mut obtain: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Credentials, ProxyError>>,
{
    loop {
        let left = store
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let delay = renew_delay(left, rand::random::<f64>());
        store.set_next_renewal(SystemTime::now() + delay);
        tokio::time::sleep(delay).await;
        let mut backoff = RETRY_MIN;
        loop {
            match obtain().await.and_then(|c| store.install(c)) {
                Ok(()) => break,
                Err(e) => {
                    if store.is_expired() {
                        // Peers now refuse this proxy's new mesh connections: say why.
                        tracing::error!(error = %e, retry_in = ?backoff, "certificate renewal failed and the workload certificate has expired: new mesh connections are refused by peers");
                    } else {
                        tracing::warn!(error = %e, retry_in = ?backoff, "certificate renewal failed");
                    }
                    store.set_next_renewal(SystemTime::now() + backoff);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }
}
