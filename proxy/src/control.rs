//! The control-plane client: the saved snapshot first, then the policy stream.
//!
//! [`sluice_api::Subscriber`] owns the stream (connect, re-validate, ACK/NACK, save,
//! reconnect with backoff); this module only plugs it into the [`PolicyStore`], so a
//! snapshot from the control plane goes through the same compile-and-swap as a
//! policy file does.

use std::path::Path;

use sluice_api::{SnapshotSink, Subscriber, SubscriberConfig};
use sluice_config::PolicySet;
use tracing::{info, warn};

use crate::ProxyError;
use crate::config::ProxyConfig;
use crate::policy::{ApplyOutcome, PolicyStore};

/// The source name `/config` shows for a policy read back from `--state-dir`.
pub(crate) const SAVED_SOURCE: &str = "saved";

/// Hands validated snapshots from the stream to the store.
struct StoreSink {
    store: PolicyStore,
    source: String,
}

impl SnapshotSink for StoreSink {
    fn apply(&self, set: PolicySet) -> Result<bool, String> {
        match self.store.apply(&self.source, set) {
            Ok(ApplyOutcome::Applied { .. }) => Ok(true),
            Ok(ApplyOutcome::Unchanged) => Ok(false),
            // The store has already recorded the rejection; the error becomes the NACK.
            Err(e) => Err(e.to_string()),
        }
    }

    fn current_version(&self) -> Option<String> {
        self.store.current().hash().map(str::to_string)
    }

    fn rejected(&self, version: &str, error: &str) {
        self.store
            .reject(&self.source, format!("snapshot {version}: {error}"));
    }
}

/// Applies the snapshot saved in `dir`, if there is one that still validates, so the
/// proxy serves (and is ready) before the control plane answers.
pub(crate) fn apply_saved(store: &PolicyStore, dir: &Path) {
    let Some(set) = sluice_api::load_saved(dir) else {
        info!(state_dir = %dir.display(), "no saved policy snapshot");
        return;
    };
    match store.apply(SAVED_SOURCE, set) {
        Ok(_) => info!(state_dir = %dir.display(), "serving the saved policy snapshot"),
        Err(e) => warn!(state_dir = %dir.display(), error = %e, "saved policy snapshot refused"),
    }
}

/// Starts following the control plane at `url`.
pub(crate) fn subscribe(
    cfg: &ProxyConfig,
    url: &str,
    store: PolicyStore,
) -> Result<Subscriber, ProxyError> {
    let node_id = cfg.node_id.clone().unwrap_or_else(default_node_id);
    let mut sc = SubscriberConfig::new(url, node_id.clone());
    sc.namespace = cfg.namespace.clone();
    sc.service = cfg.service.clone().unwrap_or_default();
    sc.proxy_version = env!("CARGO_PKG_VERSION").into();
    sc.state_dir = cfg.state_dir.clone();
    let sink = StoreSink {
        store,
        source: url.to_string(),
    };
    let sub = Subscriber::spawn(sc, sink)
        .map_err(|e| ProxyError::Compile(format!("--control-plane: {e}")))?;
    info!(control_plane = %url, %node_id, namespace = %cfg.namespace, "subscribed to the control plane");
    Ok(sub)
}

/// The host name (the pod name in a cluster), which is what `--node-id` defaults to.
pub(crate) fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "sluice-proxy".into())
}
