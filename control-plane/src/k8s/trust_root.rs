//! The mesh root in every namespace: the ConfigMap injected proxies mount.
//!
//! The control plane's gRPC port is TLS, its certificate signed by the mesh root,
//! so a proxy needs the root before it can talk to it at all, before it has a
//! certificate of its own. The control plane keeps the root (PEM, key
//! [`TRUST_ROOT_KEY`]) in a ConfigMap named by `--trust-root-configmap` in every
//! namespace; the injection webhook mounts that ConfigMap into each proxy it adds
//! and points `SLUICE_TRUST_ROOT` at the file. A root that changes reaches running
//! pods through the kubelet's ConfigMap refresh, with no re-injection.
//!
//! Every replica writes with server-side apply under one field manager. The
//! writes are idempotent (the API server does not touch an object an apply leaves
//! unchanged), so replicas need no election to share the job. A ConfigMap that
//! is deleted or edited by hand is written back; a namespace that appears gets
//! one at once. `kube-system`, `kube-public` and `kube-node-lease` are skipped:
//! the webhook never injects there. A write that fails is retried every
//! [`RETRY_EVERY`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

/// The ConfigMap key holding the root certificate (PEM).
pub const TRUST_ROOT_KEY: &str = "root.pem";
/// The field manager of the server-side applies.
const FIELD_MANAGER: &str = "sluice-control-plane";
/// Namespaces the webhook never injects into, so they need no root.
const SKIPPED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// How long a failed write waits before it is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(30);

/// The ConfigMap applied in `namespace`: the root under [`TRUST_ROOT_KEY`].
pub fn trust_root_configmap(name: &str, namespace: &str, pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    FIELD_MANAGER.to_string(),
                ),
                (
                    "app.kubernetes.io/part-of".to_string(),
                    "sluice".to_string(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            TRUST_ROOT_KEY.to_string(),
            pem.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

/// What the two watches have shown: which namespaces need the ConfigMap and
/// which already hold the current root.
#[derive(Debug, Default)]
struct State {
    /// Namespaces that should hold it (neither skipped nor terminating).
    live: BTreeSet<String>,
    /// Namespaces whose ConfigMap holds the current root.
    current: BTreeSet<String>,
    /// Writes that failed since the last retry tick.
    failed: BTreeSet<String>,
    /// A re-list in progress, collected until it is done.
    listing_ns: Option<BTreeSet<String>>,
    listing_cm: Option<BTreeSet<String>>,
    /// Both watches have listed once: before that, `current` is not known.
    ns_synced: bool,
    cm_synced: bool,
}

impl State {
    /// Namespaces whose ConfigMap must be written now.
    fn missing(&self) -> Vec<String> {
        if !(self.ns_synced && self.cm_synced) {
            return Vec::new();
        }
        self.live
            .iter()
            .filter(|ns| !self.current.contains(*ns) && !self.failed.contains(*ns))
            .cloned()
            .collect()
    }

    fn on_namespace(&mut self, event: watcher::Event<Namespace>) {
        match event {
            watcher::Event::Init => self.listing_ns = Some(BTreeSet::new()),
            watcher::Event::InitApply(ns) => {
                if let (Some(list), Some(name)) = (self.listing_ns.as_mut(), wanted(&ns)) {
                    list.insert(name);
                }
            }
            watcher::Event::InitDone => {
                self.live = self.listing_ns.take().unwrap_or_default();
                self.ns_synced = true;
            }
            watcher::Event::Apply(ns) => match wanted(&ns) {
                Some(name) => {
                    self.live.insert(name);
                }
                None => self.forget(&ns.metadata.name.unwrap_or_default()),
            },
            watcher::Event::Delete(ns) => self.forget(&ns.metadata.name.unwrap_or_default()),
        }
    }

    fn forget(&mut self, ns: &str) {
        self.live.remove(ns);
        self.current.remove(ns);
        self.failed.remove(ns);
    }

    fn on_configmap(&mut self, event: watcher::Event<ConfigMap>, pem: &str) {
        match event {
            watcher::Event::Init => self.listing_cm = Some(BTreeSet::new()),
            watcher::Event::InitApply(cm) => {
                if let (Some(list), Some(ns)) = (self.listing_cm.as_mut(), holds(&cm, pem)) {
                    list.insert(ns);
                }
            }
            watcher::Event::InitDone => {
                self.current = self.listing_cm.take().unwrap_or_default();
                self.cm_synced = true;
            }
            watcher::Event::Apply(cm) => match holds(&cm, pem) {
                Some(ns) => {
                    self.current.insert(ns);
                }
                None => {
                    let ns = cm.metadata.namespace.unwrap_or_default();
                    self.current.remove(&ns);
                    // Edited by someone else: put it back without waiting for the tick.
                    self.failed.remove(&ns);
                }
            },
            watcher::Event::Delete(cm) => {
                let ns = cm.metadata.namespace.unwrap_or_default();
                self.current.remove(&ns);
                self.failed.remove(&ns);
            }
        }
    }
}

/// The namespace's name if it should hold the root.
fn wanted(ns: &Namespace) -> Option<String> {
    let name = ns.metadata.name.clone()?;
    let terminating = ns.metadata.deletion_timestamp.is_some()
        || ns
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Terminating");
    (!terminating && !SKIPPED.contains(&name.as_str())).then_some(name)
}

/// The ConfigMap's namespace if it holds exactly the current root.
fn holds(cm: &ConfigMap, pem: &str) -> Option<String> {
    let data = cm.data.as_ref()?;
    (data.get(TRUST_ROOT_KEY).map(String::as_str) == Some(pem))
        .then(|| cm.metadata.namespace.clone())
        .flatten()
}

/// Keeps ConfigMap `name` holding `pem` in every namespace until `shutdown`.
pub(crate) async fn publish(
    client: Client,
    name: String,
    pem: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    // Only the one name: RBAC can then grant list/watch on that name alone.
    let configmaps = watcher(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff();
    let mut namespaces = std::pin::pin!(namespaces);
    let mut configmaps = std::pin::pin!(configmaps);
    let mut retry = tokio::time::interval(RETRY_EVERY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = State::default();
    loop {
        tokio::select! {
            e = namespaces.next() => match e {
                Some(Ok(event)) => state.on_namespace(event),
                Some(Err(e)) => tracing::warn!(error = %e, "Namespace watch failed; retrying"),
                None => return,
            },
            e = configmaps.next() => match e {
                Some(Ok(event)) => state.on_configmap(event, &pem),
                Some(Err(e)) => tracing::warn!(error = %e, configmap = %name, "ConfigMap watch failed; retrying"),
                None => return,
            },
            _ = retry.tick() => state.failed.clear(),
            _ = shutdown.changed() => return,
        }
        for ns in state.missing() {
            match apply(&client, &name, &ns, &pem).await {
                Ok(()) => {
                    tracing::info!(namespace = %ns, configmap = %name, "mesh trust root published");
                    state.current.insert(ns);
                }
                Err(e) => {
                    // A namespace being deleted refuses writes; its Delete event follows.
                    tracing::warn!(namespace = %ns, configmap = %name, error = %e, "cannot publish the mesh trust root; retrying");
                    state.failed.insert(ns);
                }
            }
        }
    }
}

async fn apply(client: &Client, name: &str, ns: &str, pem: &str) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = trust_root_configmap(name, ns, pem);
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};
    use serde_json::{Value, json};

    use super::*;
    use crate::k8s::double::ApiServer;

    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n";
    const NAME: &str = "sluice-trust-root";

    fn namespace(name: &str, phase: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name},
               "status": {"phase": phase}})
    }

    fn configmap(ns: &str, pem: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": NAME, "namespace": ns},
               "data": {TRUST_ROOT_KEY: pem}})
    }

    /// The API double with the publisher running against it.
    struct Cluster {
        api: ApiServer,
        /// Requests already looked at.
        seen: usize,
        _shutdown: watch::Sender<bool>,
    }

    impl Cluster {
        /// Namespaces and ConfigMaps as they are at start; applies to a
        /// namespace in `failing` answer 500 the first time.
        fn start(namespaces: Vec<Value>, configmaps: Vec<Value>, failing: &[&str]) -> Self {
            let api = ApiServer::new();
            for ns in namespaces {
                set_namespace(&api, ns);
            }
            for cm in configmaps {
                api.put(cm);
            }
            for ns in failing {
                let path = format!("/api/v1/namespaces/{ns}/configmaps/{NAME}");
                api.fail_next(StatusCode::INTERNAL_SERVER_ERROR, move |c| {
                    c.method == Method::PATCH && c.path == path
                });
            }
            let (shutdown, rx) = watch::channel(false);
            tokio::spawn(publish(
                api.client(),
                NAME.to_string(),
                ROOT.to_string(),
                rx,
            ));
            Self {
                api,
                seen: 0,
                _shutdown: shutdown,
            }
        }

        /// The namespace of the next apply, after checking it is the whole object
        /// under its field manager, and that ConfigMaps are read by name only.
        async fn next_apply(&mut self) -> String {
            let (i, c) = tokio::time::timeout(
                Duration::from_secs(300),
                self.api.wait_call(self.seen, |c| c.method == Method::PATCH),
            )
            .await
            .expect("an apply");
            self.check_reads(i);
            self.seen = i + 1;
            let ns = c.body["metadata"]["namespace"]
                .as_str()
                .unwrap()
                .to_string();
            assert_eq!(c.path, format!("/api/v1/namespaces/{ns}/configmaps/{NAME}"));
            assert_eq!(c.content_type, "application/apply-patch+yaml");
            assert_eq!(c.param("fieldManager"), Some("sluice-control-plane"));
            assert_eq!(c.param("force"), Some("true"));
            assert_eq!(c.body["apiVersion"], "v1");
            assert_eq!(c.body["kind"], "ConfigMap");
            assert_eq!(c.body["metadata"]["name"], NAME);
            assert_eq!(c.body["data"][TRUST_ROOT_KEY], ROOT);
            if c.status == 200 || c.status == 201 {
                let stored = self.api.get("configmaps", &ns, NAME).unwrap();
                assert_eq!(stored["data"][TRUST_ROOT_KEY], ROOT);
            }
            ns
        }

        /// No apply arrives while the publisher has nothing left to do.
        async fn no_apply(&mut self) {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let calls = self.api.calls();
            let applies: Vec<_> = calls[self.seen..]
                .iter()
                .filter(|c| c.method == Method::PATCH)
                .collect();
            assert!(applies.is_empty(), "unexpected apply: {applies:?}");
            self.check_reads(calls.len());
            self.seen = calls.len();
        }

        /// ConfigMaps among the first `upto` requests are listed and watched by name.
        fn check_reads(&self, upto: usize) {
            for c in &self.api.calls()[..upto] {
                if c.path == "/api/v1/configmaps" {
                    assert_eq!(
                        c.param("fieldSelector"),
                        Some(format!("metadata.name={NAME}").as_str()),
                        "ConfigMaps are watched by name only"
                    );
                }
            }
        }
    }

    /// Creates or updates a Namespace, its phase included.
    fn set_namespace(api: &ApiServer, ns: Value) {
        api.put(ns.clone());
        api.put_status(ns);
    }

    #[tokio::test(start_paused = true)]
    async fn every_namespace_gets_the_root_once_and_keeps_it() {
        let mut cluster = Cluster::start(
            vec![
                namespace("default", "Active"),
                namespace("shop", "Active"),
                namespace("kube-system", "Active"),
                namespace("old", "Terminating"),
            ],
            vec![configmap("shop", ROOT), configmap("default", "stale")],
            &[],
        );
        // `shop` already holds it; `kube-system` and the terminating one never get it.
        assert_eq!(cluster.next_apply().await, "default");
        cluster.no_apply().await;

        // A new namespace gets it at once; the stored ConfigMap then satisfies it.
        set_namespace(&cluster.api, namespace("billing", "Active"));
        assert_eq!(cluster.next_apply().await, "billing");
        cluster.no_apply().await;

        // Deleted or edited by hand: written back.
        assert!(cluster.api.remove(&configmap("shop", ROOT)));
        assert_eq!(cluster.next_apply().await, "shop");
        cluster.api.put(configmap("billing", "edited"));
        assert_eq!(cluster.next_apply().await, "billing");
        cluster.no_apply().await;

        // A namespace going away is left alone.
        set_namespace(&cluster.api, namespace("billing", "Terminating"));
        // The two watches are separate streams: let the namespace's event land first.
        cluster.no_apply().await;
        assert!(cluster.api.remove(&configmap("billing", ROOT)));
        cluster.no_apply().await;
        assert!(cluster.api.get("configmaps", "billing", NAME).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_retried_later() {
        let mut cluster = Cluster::start(vec![namespace("shop", "Active")], vec![], &["shop"]);
        assert_eq!(cluster.next_apply().await, "shop");
        assert!(
            cluster.api.get("configmaps", "shop", NAME).is_none(),
            "refused"
        );
        // Not hammered: the retry waits for the tick.
        let before = tokio::time::Instant::now();
        assert_eq!(cluster.next_apply().await, "shop");
        assert!(before.elapsed() >= RETRY_EVERY - Duration::from_secs(1));
        cluster.no_apply().await;
    }

    #[test]
    fn the_applied_object_holds_the_root_under_its_key() {
        let cm = trust_root_configmap(NAME, "shop", ROOT);
        assert_eq!(cm.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(cm.data.unwrap()[TRUST_ROOT_KEY], ROOT);
    }
}
