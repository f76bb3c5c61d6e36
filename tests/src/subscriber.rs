//! A policy subscriber that is not a whole proxy: the real `sluice_api::Subscriber`
//! feeding a sink that keeps the last set it was given, so a test can stand in a
//! proxy that accepts only some schema versions (an older release) beside real ones.

use std::sync::{Arc, Mutex};

use sluice_api::{SnapshotSink, Subscriber, SubscriberConfig, SubscriberStatus};
use sluice_config::PolicySet;
use tokio::sync::watch;

/// Keeps the policy set last applied.
#[derive(Debug, Default)]
pub struct RecordingSink {
    current: Mutex<Option<PolicySet>>,
}

impl RecordingSink {
    /// The set in force, if any.
    pub fn current(&self) -> Option<PolicySet> {
        self.current.lock().expect("sink lock").clone()
    }
}

impl SnapshotSink for RecordingSink {
    fn apply(&self, set: PolicySet) -> Result<bool, String> {
        let mut cur = self.current.lock().expect("sink lock");
        let changed = cur.as_ref().map(PolicySet::hash) != Some(set.hash());
        *cur = Some(set);
        Ok(changed)
    }

    fn current_version(&self) -> Option<String> {
        self.current
            .lock()
            .expect("sink lock")
            .as_ref()
            .map(|s| s.hash().to_string())
    }
}

/// A real subscriber to `control_plane` as `node`, accepting only `schema_versions`.
pub struct SchemaSubscriber {
    /// What it has applied.
    pub sink: Arc<RecordingSink>,
    status: watch::Receiver<SubscriberStatus>,
    subscriber: Subscriber,
}

impl SchemaSubscriber {
    /// Starts subscribing on the current runtime (no state directory).
    pub fn start(control_plane: &str, node: &str, schema_versions: &[u32]) -> Self {
        let mut cfg = SubscriberConfig::new(control_plane, node);
        cfg.service = node.to_string();
        cfg.schema_versions = schema_versions.to_vec();
        let sink = Arc::new(RecordingSink::default());
        let subscriber = Subscriber::spawn(cfg, sink.clone()).expect("a valid control-plane URL");
        Self {
            sink,
            status: subscriber.status(),
            subscriber,
        }
    }

    /// The subscriber's status (last applied, last rejected).
    pub fn status(&self) -> SubscriberStatus {
        self.status.borrow().clone()
    }

    /// Ends the subscription.
    pub async fn shutdown(self) {
        self.subscriber.shutdown().await;
    }
}
