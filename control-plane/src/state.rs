//! The control plane's shared state: the policy source, the published snapshot,
//! the rollouts, the proxies and their reports, the metrics.
//!
//! Every task (the directory watcher, the Kubernetes watches, the gRPC streams, the
//! admin server, the rollout driver) holds an `Arc<Shared>`; [`Shared::reload`] and
//! [`Shared::republish`] are the one way a new snapshot is published.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sluice_api::pb;
use sluice_config::PolicySet;
use tokio::sync::watch;

use crate::k8s::endpoints::ServiceEndpoints;
use crate::k8s::policies::KubePolicies;
use crate::metrics::Metrics;
use crate::proxies::ProxyRegistry;
use crate::rollout::forward::{REMOTE_FRESH, RemoteProxy, ReportForwarder};
use crate::rollout::{Clock, ReportBook, Rollouts};
use crate::source::{FileView, PolicyDir, PolicyView, ScanReport};
use crate::views;

/// The policy set in force and what each schema version's proxies receive of it.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) set: PolicySet,
    /// Where each policy came from, as published with it.
    pub(crate) metas: Vec<pb::PolicyMeta>,
    /// One per schema version this build writes, oldest first (see [`views`]).
    pub(crate) views: Vec<views::View>,
    /// When this version replaced the previous one (push latency starts here).
    pub(crate) changed_at: Instant,
}

/// Where policies come from.
#[derive(Debug)]
pub(crate) enum PolicySource {
    /// A directory of YAML files.
    Dir(PolicyDir),
    /// RoutePolicy objects in the Kubernetes API.
    Kubernetes(KubePolicies),
}

impl PolicySource {
    fn rescan(&mut self) -> ScanReport {
        match self {
            Self::Dir(d) => d.rescan(),
            // Objects arrive through the reflector, which syncs before reloading.
            Self::Kubernetes(_) => ScanReport::default(),
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            Self::Dir(_) => true,
            Self::Kubernetes(k) => k.is_synced(),
        }
    }

    fn build_set(&mut self) -> Option<(PolicySet, Vec<pb::PolicyMeta>)> {
        match self {
            Self::Dir(d) => d.build_set(),
            Self::Kubernetes(k) => k.build_set(),
        }
    }

    pub(crate) fn policy_views(&self) -> Vec<PolicyView> {
        match self {
            Self::Dir(d) => d.policy_views(),
            Self::Kubernetes(k) => k.policy_views(),
        }
    }

    pub(crate) fn file_views(&self) -> Vec<FileView> {
        match self {
            Self::Dir(d) => d.file_views(),
            Self::Kubernetes(k) => k.file_views(),
        }
    }
}

/// State shared by the source, the gRPC service and the admin server.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) source: Mutex<PolicySource>,
    /// Service endpoints that `service` backends resolve to.
    pub(crate) endpoints: Arc<Mutex<ServiceEndpoints>>,
    pub(crate) snapshots: watch::Sender<Option<Arc<Published>>>,
    /// Last expressible form of each policy per schema version.
    pub(crate) view_memory: Mutex<views::ViewMemory>,
    /// Held from reading the weights to sending the snapshot built with them, so
    /// publications are sent in the order their weights were read: a build that read
    /// a canary's old weight can never be sent after the build that read its rollback.
    pub(crate) publishing: Mutex<()>,
    /// Every rollout of the published set; their weights are what proxies receive
    /// for each weighted rule (the file's weights where there is none).
    pub(crate) rollouts: Rollouts,
    pub(crate) proxies: ProxyRegistry,
    /// The proxies' traffic reports and the per-route count of proxies with traffic.
    pub(crate) reports: ReportBook,
    /// Reports relayed to the lease holder while this replica does not hold it.
    pub(crate) forwarder: ReportForwarder,
    /// While this replica holds the lease: the proxies connected to each other
    /// replica, as it last sent them, and when.
    pub(crate) remote_proxies: Mutex<HashMap<String, (Instant, Vec<RemoteProxy>)>>,
    /// The time the rollouts and the proxies' traffic counts go by.
    pub(crate) clock: Clock,
    pub(crate) metrics: Metrics,
    pub(crate) ready: std::sync::atomic::AtomicBool,
    /// Bumped whenever what the admin API shows may have changed.
    pub(crate) changes: watch::Sender<u64>,
    /// Tests only: the schema version every snapshot is stamped with instead of its own.
    pub(crate) stamp_schema_version: Option<u32>,
}

impl Shared {
    /// Nothing published yet: policies from `source`, `service` backends resolved
    /// by `endpoints`, rollout states kept in `state_dir`.
    pub(crate) fn new(
        source: PolicySource,
        endpoints: ServiceEndpoints,
        state_dir: Option<&Path>,
        stamp_schema_version: Option<u32>,
    ) -> Self {
        let metrics = Metrics::new();
        let reports = crate::rollout::reports::counter();
        metrics.register(Box::new(reports.clone()));
        let clock = Clock::default();
        let rollouts = Rollouts::new(state_dir, clock.clone());
        for c in rollouts.collectors() {
            metrics.register(c);
        }
        let (snapshots, _) = watch::channel(None);
        let (changes, _) = watch::channel(0);
        Self {
            source: Mutex::new(source),
            endpoints: Arc::new(Mutex::new(endpoints)),
            snapshots,
            view_memory: Mutex::new(views::ViewMemory::default()),
            publishing: Mutex::new(()),
            rollouts,
            changes: changes.clone(),
            proxies: ProxyRegistry::new(metrics.connected.clone(), changes),
            forwarder: ReportForwarder::new(reports.clone()),
            remote_proxies: Mutex::default(),
            clock,
            reports: ReportBook::new(reports),
            metrics,
            ready: std::sync::atomic::AtomicBool::new(false),
            stamp_schema_version,
        }
    }

    /// Re-reads the policy directory and publishes the mesh's set if its hash
    /// changed. Called from the watcher thread and once at start.
    pub(crate) fn reload(&self) {
        // A panic in reading, validating or resolving the policies (a bug of ours) must
        // cost this re-read, not the policy-dir watcher thread or a Kubernetes watch
        // task that calls this: either dying would leave the mesh on its set, deaf to
        // every later edit, until a restart. The locks it takes survive poisoning.
        self.surviving_panics(|| self.reload_unguarded());
    }

    /// Runs one re-read; a panic in it is counted as a refused version and logged.
    fn surviving_panics(&self, reread: impl FnOnce()) {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(reread)) {
            self.metrics.validation_failures.inc();
            tracing::error!(
                panic = %sluice_config::panic_message(panic.as_ref()),
                "re-reading the policies failed; the set in force keeps serving, and the next change is read again"
            );
        }
    }

    fn reload_unguarded(&self) {
        // The whole re-read is one publication: two re-reads at once must not send
        // their sets in the opposite order to reading them.
        let _publishing = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let services = {
            let endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
            endpoints
                .services_known()
                .then(|| endpoints.service_ports())
        };
        let mut source = self.source.lock().unwrap_or_else(|e| e.into_inner());
        if let PolicySource::Kubernetes(k) = &mut *source {
            k.gateway.set_services(services);
        }
        let report = source.rescan();
        self.metrics
            .validation_failures
            .inc_by(report.failures as u64);
        let ready = source.is_ready();
        let built = source.build_set();
        drop(source);
        let endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        // Nothing is published before every source has listed once: a restarted
        // replica must not hand proxies an empty or unresolved set.
        let ready = ready && endpoints.is_ready();
        let resolved = match built {
            Some((set, metas)) if ready => match endpoints.resolve(set) {
                Ok(set) => Some((set, metas)),
                Err(e) => {
                    tracing::warn!(error = %e, "the set with resolved endpoints is refused; keeping the previous one");
                    None
                }
            },
            _ => None,
        };
        drop(endpoints);
        if let Some((set, metas)) = resolved {
            self.publish(set, metas);
        }
        if ready {
            self.ready.store(true, std::sync::atomic::Ordering::Release);
        }
        self.changes.send_modify(|c| *c += 1);
    }

    /// Runs `f` on the Kubernetes policy state, if that is the source.
    pub(crate) fn with_kube_policies<T>(
        &self,
        f: impl FnOnce(&mut KubePolicies) -> T,
    ) -> Option<T> {
        let mut source = self.source.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *source {
            PolicySource::Kubernetes(k) => Some(f(k)),
            PolicySource::Dir(_) => None,
        }
    }

    /// Publishes `set` when what any proxy would receive of it changed: the set
    /// itself or, for the same set, the effective weights (a rollout step). The
    /// caller holds `publishing`.
    fn publish(&self, set: PolicySet, policies: Vec<pb::PolicyMeta>) {
        self.rollouts.sync(&set);
        // One read of the weights serves the build and the record of its versions.
        let weights = self.rollouts.frozen();
        let views = {
            let mut memory = self.view_memory.lock().unwrap_or_else(|e| e.into_inner());
            views::build(&set, &policies, &weights, &mut memory)
        };
        for v in &views {
            self.rollouts.record_version(&v.snapshot.version, &weights);
        }
        let versions = |v: &[views::View]| -> Vec<String> {
            v.iter().map(|v| v.snapshot.version.clone()).collect()
        };
        let changed = self.snapshots.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|p| {
                p.set.hash() == set.hash() && versions(&p.views) == versions(&views)
            }) {
                return false;
            }
            *cur = Some(Arc::new(Published {
                set: set.clone(),
                metas: policies.clone(),
                views: views.clone(),
                changed_at: Instant::now(),
            }));
            // Before the streams are woken: a proxy that has acked this version can be
            // read beside the metrics that name it.
            self.metrics.set_policy_hash(newest(&views));
            self.metrics.set_held_back(&views);
            true
        });
        if changed {
            let version = newest(&views);
            tracing::info!(%version, policies = set.policies().len(), "publishing policy set");
            for v in &views {
                for h in &v.held_back {
                    // Only news for proxies that old: each one's stream warns when it
                    // is served this view.
                    tracing::info!(schema = v.schema, policy = %h.policy, needs = h.needs, state = h.state, "policy not expressible in an older schema version; its proxies get the last form they can take");
                }
            }
        }
    }

    /// Publishes the set in force again, with the rollouts' current weights.
    pub(crate) fn republish(&self) {
        {
            let _publishing = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
            // Read under the lock: a set published by a re-read meanwhile is the one
            // to send again, never the one it replaced.
            let current = self.snapshots.borrow().clone();
            if let Some(p) = current {
                self.publish(p.set.clone(), p.metas.clone());
            }
        }
        self.changes.send_modify(|c| *c += 1);
    }

    /// A well-formed report from proxy `node`, received on this replica's stream
    /// number `stream`: judged here when this replica drives the rollouts, else
    /// relayed to the one that does.
    pub(crate) fn on_report(&self, node: &str, stream: u64, report: pb::Report) {
        if self.rollouts.is_leading() {
            self.judge_reports();
        } else {
            // Counted here for the traffic table; judged by the holder.
            drop(self.reports.take());
            self.forwarder.forward(node, stream, report);
        }
    }

    /// Feeds the reports received so far to the rollouts, publishing new weights at
    /// once when one moved.
    pub(crate) fn judge_reports(&self) {
        let (taken, bounds) = self.reports.take();
        if !taken.is_empty() && self.rollouts.on_reports(&taken, &bounds) {
            self.republish();
        }
    }

    /// The rollout driver's look at acks and interval ends, publishing new weights
    /// at once when one moved.
    pub(crate) fn tick_rollouts(&self) {
        if self.rollouts.tick(|| self.proxies_everywhere()) {
            self.republish();
        }
    }

    /// Every proxy stream whose acks a step waits for, and those recently closed:
    /// this replica's own and, on the lease holder, those the other replicas listed
    /// within [`REMOTE_FRESH`].
    pub(crate) fn proxies_everywhere(&self) -> Vec<crate::proxies::ProxyRecord> {
        let mut all = self
            .proxies
            .with_departed(crate::unix_ms(std::time::SystemTime::now()));
        // Not `clock`: the lists come on the followers' real-time cadence
        // (ACKS_EVERY), which a test moving the rollouts' clock must not make look late.
        let now = Instant::now();
        let mut remote = self
            .remote_proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        remote.retain(|_, (at, _)| now.saturating_duration_since(*at) <= REMOTE_FRESH);
        for (replica, (_, list)) in remote.iter() {
            all.extend(list.iter().map(|p| crate::proxies::ProxyRecord {
                node_id: p.node_id.clone(),
                stream: p.stream,
                replica: Some(replica.clone()),
                acked_version: p.acked_version.clone(),
                nacked_version: p.nacked_version.clone(),
                version_sent: p.version_sent.clone(),
                connected: p.connected,
                connected_at_unix_ms: p.connected_at_unix_ms,
                disconnected_at_unix_ms: p.disconnected_at_unix_ms,
                ..Default::default()
            }));
        }
        all
    }

    /// The version the newest proxies receive: the content hash of the canonical
    /// policies with their effective weights.
    pub(crate) fn current_version(&self) -> Option<String> {
        self.snapshots
            .borrow()
            .as_ref()
            .and_then(|p| p.views.last())
            .map(|v| v.snapshot.version.clone())
    }
}

/// The version of the newest schema's view: the one the policy metrics name.
fn newest(views: &[views::View]) -> &str {
    views
        .last()
        .map(|v| v.snapshot.version.as_str())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::rollout::RolloutId;
    use crate::rollout::engine::Command;

    use crate::rollout::TEST_POLICY as POLICY;

    fn id() -> RolloutId {
        RolloutId {
            namespace: "shop".into(),
            policy: "log".into(),
            route: "ingest".into(),
        }
    }

    fn shared(dir: &Path) -> Shared {
        std::fs::write(dir.join("log.yaml"), POLICY).expect("write the policy");
        let source = PolicySource::Dir(
            PolicyDir::open(dir, None, sluice_config::Limits::default()).expect("open the dir"),
        );
        let shared = Shared::new(source, ServiceEndpoints::default(), None, None);
        shared.reload();
        shared
    }

    /// The canary weight the newest proxies receive, and the one recorded for that
    /// version.
    fn published(shared: &Shared) -> (u32, Option<u32>) {
        let p = shared.snapshots.borrow().clone().expect("published");
        let view = p.views.last().expect("a view");
        let set = PolicySet::from_canonical("snapshot", &view.snapshot.canonical).expect("decodes");
        let weight = set.policies()[0].spec.routes[0].split[0]
            .weights
            .as_ref()
            .and_then(|w| w.get("v2").copied())
            .expect("a canary weight");
        let recorded = shared
            .rollouts
            .recorded_weight(&view.snapshot.version, &id());
        (weight, recorded)
    }

    /// A rollback published while other publications of the old weight are in flight
    /// (the driver's tick, another proxy's report) is the last one sent, and every
    /// version is recorded with the weights it carries. Each round races two threads
    /// republishing against one rolling back. Without the publication lock this failed
    /// within the first three rounds; the racers yield between publications so that the
    /// rolling-back thread is not starved on a busy two-core machine.
    #[test]
    fn a_rollback_is_never_overwritten_by_a_publication_of_the_old_weight() {
        for round in 0..30 {
            let dir = tempfile::tempdir().expect("tempdir");
            let shared = Arc::new(shared(dir.path()));
            assert_eq!(published(&shared), (10, Some(10)), "round {round}: before");
            let stop = Arc::new(AtomicBool::new(false));
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let (shared, stop) = (shared.clone(), stop.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            shared.republish();
                            std::thread::yield_now();
                        }
                    })
                })
                .collect();
            std::thread::yield_now();
            shared
                .rollouts
                .command(&id(), Command::Abort)
                .expect("abort applies");
            shared.republish();
            stop.store(true, Ordering::Relaxed);
            for r in racers {
                r.join().expect("racer");
            }
            assert_eq!(published(&shared), (0, Some(0)), "round {round}: after");
        }
    }

    /// `GET /served` reads what is published while publications go on beside it, and
    /// never hangs. It once borrowed the watch a second time while holding the first
    /// borrow, and a publication queued between the two (the lock lets a waiting writer
    /// go first) waited for the first borrow while the second waited for it: the
    /// control plane's watcher and admin both hung, and so did this test, in each of two
    /// runs.
    #[test]
    fn served_reads_beside_publications_and_never_hangs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = Arc::new(shared(dir.path()));
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    shared.republish();
                }
            })
        };
        let (done, finished) = std::sync::mpsc::channel();
        let reader = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for _ in 0..200_000 {
                    let served = crate::operator::served(&shared);
                    assert!(served["version"].is_string(), "{served}");
                }
                let _ = done.send(());
            })
        };
        // A bound on a hang, not a measurement: the reads take well under a second.
        let outcome = finished.recv_timeout(std::time::Duration::from_secs(120));
        stop.store(true, Ordering::Relaxed);
        assert!(outcome.is_ok(), "/served hung beside publications");
        reader.join().expect("reader");
        publisher.join().expect("publisher");
    }

    /// A rollout whose block leaves the policy ends: it is no longer listed, and
    /// proxies get the file's weights (here the canary's 0), whatever its step.
    /// A panic in a re-read (here with the source's lock held, as one in validating
    /// would be) costs that re-read only: it is counted, and the next edit is published.
    #[test]
    fn a_panic_in_a_reread_is_counted_and_the_next_edit_is_still_published() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = shared(dir.path());
        let before = shared.current_version().expect("a version");
        shared.surviving_panics(|| {
            let _source = shared.source.lock().expect("not poisoned yet");
            panic!("a bug while {}", "validating");
        });
        assert_eq!(shared.metrics.validation_failures.get(), 1);
        let edited = POLICY.replace("127.0.0.1:2", "127.0.0.1:3");
        std::fs::write(dir.path().join("log.yaml"), edited).expect("write the policy");
        shared.reload();
        let after = shared.current_version().expect("a version");
        assert_ne!(after, before);
        assert_eq!(shared.metrics.validation_failures.get(), 1);
    }

    #[test]
    fn a_rollout_whose_block_is_removed_ends_and_the_file_weights_are_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = shared(dir.path());
        assert_eq!(published(&shared), (10, Some(10)));
        let without = POLICY
            .split("          rollout:")
            .next()
            .expect("the policy")
            .to_string();
        std::fs::write(dir.path().join("log.yaml"), without).expect("write the policy");
        shared.reload();
        assert_eq!(shared.rollouts.view()["rollouts"], serde_json::json!([]));
        assert_eq!(published(&shared).0, 0);
        assert!(shared.rollouts.statuses().is_empty());
    }
}
