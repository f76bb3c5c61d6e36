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
    // Every restart reads the same file: a panic in taking it would be a crash loop.
    store.refusing_panics(SAVED_SOURCE, (), || {
        let Some(set) = sluice_api::load_saved(dir) else {
            info!(state_dir = %dir.display(), "no saved policy snapshot");
            return;
        };
        match store.apply(SAVED_SOURCE, set) {
            Ok(_) => info!(state_dir = %dir.display(), "serving the saved policy snapshot"),
            Err(e) => {
                warn!(state_dir = %dir.display(), error = %e, "saved policy snapshot refused")
            }
        }
    })
}

/// Starts following the control plane at `url`.
pub(crate) fn subscribe(
    cfg: &ProxyConfig,
    url: &str,
    trust_root: Option<Vec<u8>>,
    store: PolicyStore,
) -> Result<Subscriber, ProxyError> {
    let node_id = cfg.node_id.clone().unwrap_or_else(default_node_id);
    let mut sc = SubscriberConfig::new(url, node_id.clone());
    sc.namespace = cfg.namespace.clone();
    sc.service = cfg.service.clone().unwrap_or_default();
    sc.proxy_version = env!("CARGO_PKG_VERSION").into();
    sc.state_dir = cfg.state_dir.clone();
    sc.trust_root = trust_root;
    sc.limits = cfg.policy_limits;
    sc.report_interval = cfg.report_interval;
    sc.reports = Some(crate::report::CounterReports::new(store.clone()));
    sc.route_traffic = Some(store.context().route_traffic.clone());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::store_for_tests;

    fn set(host: &str) -> PolicySet {
        let text = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: p }}\nspec:\n  host: {host}\n  backends:\n    b: {{ addresses: [\"127.0.0.1:1\"] }}\n  routes:\n    - name: r\n"
        );
        PolicySet::new(sluice_config::parse_policies("t.yaml", &text).unwrap()).unwrap()
    }

    #[test]
    fn sink_reports_change_and_keeps_refusals() {
        let store = store_for_tests();
        let sink = StoreSink {
            store: store.clone(),
            source: "http://cp:15010".into(),
        };
        assert_eq!(sink.current_version(), None);
        let a = set("a");
        let hash = a.hash().to_string();
        assert_eq!(sink.apply(a.clone()), Ok(true));
        assert_eq!(sink.apply(a), Ok(false));
        assert_eq!(sink.current_version().as_deref(), Some(hash.as_str()));
        assert_eq!(store.current().source(), "http://cp:15010");
        sink.rejected("v9", "unknown field `mirror`");
        let r = store.last_rejected().unwrap();
        assert_eq!(r.source, "http://cp:15010");
        assert!(r.error.contains("v9") && r.error.contains("mirror"));
        assert_eq!(sink.current_version().as_deref(), Some(hash.as_str()));
    }

    #[test]
    fn saved_snapshot_is_served_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_for_tests();
        apply_saved(&store, dir.path());
        assert!(!store.is_ready(), "nothing saved yet");
        let a = set("a");
        sluice_api::save_snapshot(dir.path(), &a).unwrap();
        apply_saved(&store, dir.path());
        assert!(store.is_ready());
        assert_eq!(store.current().hash(), Some(a.hash()));
        assert_eq!(store.current().source(), SAVED_SOURCE);
    }
}
