//! The policy store: the one place that swaps the snapshot.
//!
//! File watching and the control-plane subscriber both hand it validated sets
//! ([`PolicyStore::apply`]) or report refused ones ([`PolicyStore::reject`]). Observers
//! follow the applied version through [`PolicyStore::subscribe`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::uri::Authority;
use sluice_config::PolicySet;
use tokio::sync::watch;
use tracing::{info, warn};

use super::PolicySnapshot;
use crate::ProxyError;
use crate::stack::StackContext;

/// What [`PolicyStore::apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The set was compiled and swapped in.
    Applied {
        /// The new version.
        hash: String,
    },
    /// The set has the hash already in force; nothing changed.
    Unchanged,
}

/// The last refused update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Where it came from.
    pub source: String,
    /// When it was refused.
    pub at: SystemTime,
    /// Why, with file:line:column where known.
    pub error: String,
}

/// Holds the snapshot in force; clones share it.
#[derive(Clone, Debug)]
pub struct PolicyStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    current: ArcSwap<PolicySnapshot>,
    ctx: StackContext,
    service: Option<String>,
    app: Option<Authority>,
    draining: AtomicBool,
    // Serialises updates (control path only; requests never take it).
    updates: Mutex<Option<Rejection>>,
    version: watch::Sender<Option<String>>,
}

impl PolicyStore {
    /// An empty store. `service` selects the policy whose `inbound` rules apply; `app`
    /// is where inbound requests go.
    pub fn new(ctx: StackContext, service: Option<String>, app: Option<Authority>) -> Self {
        let current = ArcSwap::from_pointee(PolicySnapshot::empty(&ctx, app.as_ref()));
        Self {
            inner: Arc::new(Inner {
                current,
                ctx,
                service,
                app,
                draining: AtomicBool::new(false),
                updates: Mutex::new(None),
                version: watch::Sender::new(None),
            }),
        }
    }

    fn updates(&self) -> MutexGuard<'_, Option<Rejection>> {
        // A panic while holding it cannot leave the store inconsistent: the swap is atomic.
        self.inner.updates.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Compiles `set` and swaps it in, unless its hash is the one in force. A set that
    /// cannot be compiled is recorded as rejected and the old one keeps serving.
    pub fn apply(&self, source: &str, set: PolicySet) -> Result<ApplyOutcome, ProxyError> {
        let metrics = &self.inner.ctx.metrics;
        let _guard = self.updates();
        let old = self.inner.current.load();
        if old.hash() == Some(set.hash()) {
            metrics
                .policy_reloads
                .with_label_values(&["unchanged"])
                .inc();
            return Ok(ApplyOutcome::Unchanged);
        }
        let hash = set.hash().to_string();
        let snapshot = match PolicySnapshot::compile(
            &self.inner.ctx,
            set,
            source,
            self.inner.service.as_deref(),
            self.inner.app.as_ref(),
        ) {
            Ok(s) => s,
            Err(e) => {
                drop(_guard);
                self.reject(source, e.to_string());
                return Err(e);
            }
        };
        let policies = snapshot.policy_set().map_or(0, |s| s.policies().len());
        self.inner.current.store(Arc::new(snapshot));
        metrics.set_policy_version(old.hash(), &hash);
        metrics.policy_reloads.with_label_values(&["applied"]).inc();
        info!(source, version = %hash, policies, "policy applied");
        self.inner.version.send_replace(Some(hash.clone()));
        Ok(ApplyOutcome::Applied { hash })
    }

    /// Records a refused update: the policy in force stays.
    pub fn reject(&self, source: &str, error: String) {
        warn!(source, "policy refused, keeping the one in force:\n{error}");
        self.inner
            .ctx
            .metrics
            .policy_reloads
            .with_label_values(&["rejected"])
            .inc();
        *self.updates() = Some(Rejection {
            source: source.to_string(),
            at: SystemTime::now(),
            error,
        });
    }

    /// Runs `take`, one attempt to take an update from `source`; a panic in it (a bug of
    /// ours in validating or compiling some policy) is recorded as that update's refusal
    /// and gives `refused`, so the task or thread that feeds the store lives on instead of
    /// leaving the proxy deaf to every later update until restarted.
    pub(crate) fn refusing_panics<T>(
        &self,
        source: &str,
        refused: T,
        take: impl FnOnce() -> T,
    ) -> T {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(take)).unwrap_or_else(|panic| {
            self.reject(
                source,
                format!(
                    "{source}: the proxy failed while taking this content ({}); the policy in force keeps serving",
                    sluice_config::panic_message(panic.as_ref())
                ),
            );
            refused
        })
    }

    /// The snapshot in force (what a request loads).
    pub fn current(&self) -> Arc<PolicySnapshot> {
        self.inner.current.load_full()
    }

    /// The last refused update, if any.
    pub fn last_rejected(&self) -> Option<Rejection> {
        self.updates().clone()
    }

    /// Follows the applied version (`None` until a policy is loaded).
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.inner.version.subscribe()
    }

    /// Whether a policy is loaded and the proxy is not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.inner.current.load().hash().is_some()
    }

    /// Whether shutdown has begun: requests in flight finish, no new connection is taken.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Shared stack context (metrics, upstream pools, registries).
    pub fn context(&self) -> &StackContext {
        &self.inner.ctx
    }

    pub(crate) fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::store_for_tests as store;

    fn set(host: &str) -> PolicySet {
        let text = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: p }}\nspec:\n  host: {host}\n  backends:\n    b: {{ addresses: [\"127.0.0.1:1\"] }}\n  routes:\n    - name: r\n"
        );
        PolicySet::new(sluice_config::parse_policies("t.yaml", &text).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn applies_once_and_reports_unchanged() {
        let store = store();
        let mut rx = store.subscribe();
        assert!(!store.is_ready());
        let a = set("a");
        let hash = a.hash().to_string();
        assert_eq!(
            store.apply("t", a.clone()).unwrap(),
            ApplyOutcome::Applied { hash: hash.clone() }
        );
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().as_deref(), Some(hash.as_str()));
        assert_eq!(store.apply("t", a).unwrap(), ApplyOutcome::Unchanged);
        assert!(!rx.has_changed().unwrap());
        assert!(store.is_ready());
        store.reject("t", "bad".into());
        assert_eq!(store.current().hash(), Some(hash.as_str()));
        assert_eq!(store.last_rejected().unwrap().error, "bad");
        let text = store.context().metrics.encode();
        assert!(text.contains(r#"sluice_policy_reloads_total{result="rejected"} 1"#));
        assert!(text.contains(&format!(r#"sluice_policy_info{{hash="{hash}"}} 1"#)));
    }
}
