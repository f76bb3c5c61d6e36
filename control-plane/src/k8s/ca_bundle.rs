//! The webhook configurations' `caBundle`, kept in step with the webhook's
//! serving certificate.
//!
//! The API server trusts the injection and validation webhooks through the
//! `caBundle` of their configurations. The serving certificate lives in a Secret
//! the control plane mounts (and reloads on change, see `inject::server`); this
//! task reads the CA beside it (`--webhook-ca`, the Secret's `ca.crt`) and writes
//! it into every webhook of the named configurations whose bundle differs: at
//! start, whenever the file changes, and every [`RESYNC_EVERY`] in case someone
//! else wrote a stale one. A rotated certificate is therefore trusted as soon as
//! the kubelet has swapped the files, without a `helm upgrade`.
//!
//! The patch is a strategic merge keyed by webhook name, so it touches only
//! `clientConfig.caBundle` and cannot disturb webhooks added by others. Every
//! replica reads the same Secret and writes the same bytes; an unchanged bundle
//! is never written, so replicas need no election. With cert-manager's CA
//! injector doing this job, the flags are simply not given.
//!
//! When the mesh CA issues the webhook's certificate (no `--webhook-cert`), the
//! bundle is the mesh root: its leaf certificates rotate under it without the
//! bundle changing, and every replica sharing the root (`--ca-secret`) writes
//! the same bytes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::{mpsc, watch};

/// How often the bundles are checked even when the CA file did not change.
pub const RESYNC_EVERY: Duration = Duration::from_secs(60);

/// Which configurations to keep and where the CA is.
#[derive(Clone)]
pub struct WebhookBundles {
    /// The API client.
    pub client: Client,
    /// The CA that signs the webhook's serving certificate.
    pub ca: BundleSource,
    /// The `MutatingWebhookConfiguration` of the injection webhook.
    pub mutating: Option<String>,
    /// The `ValidatingWebhookConfiguration` of the RoutePolicy webhook.
    pub validating: Option<String>,
}

/// Where the bundle's CA comes from.
#[derive(Clone, Debug)]
pub enum BundleSource {
    /// A PEM file (the webhook Secret's `ca.crt`), followed when it changes.
    File(PathBuf),
    /// The mesh root (PEM), which issues the webhook's certificate itself.
    MeshRoot(String),
}

impl std::fmt::Debug for WebhookBundles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookBundles")
            .field("ca", &self.ca)
            .field("mutating", &self.mutating)
            .field("validating", &self.validating)
            .finish_non_exhaustive()
    }
}

/// Keeps the bundles in step with `cfg.ca_file` until `shutdown`.
pub(crate) async fn keep(cfg: WebhookBundles, mut shutdown: watch::Receiver<bool>) {
    let (tx, mut changed) = mpsc::channel(1);
    // A Secret volume swaps a `..data` symlink: only a directory watch sees it.
    let _watcher = match &cfg.ca {
        BundleSource::File(path) => watch_dir(path, tx),
        BundleSource::MeshRoot(_) => None,
    };
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = resync.tick() => {}
            Some(()) = changed.recv() => {}
            _ = shutdown.changed() => return,
        }
        let pem = match &cfg.ca {
            BundleSource::MeshRoot(pem) => pem.as_bytes().to_vec(),
            BundleSource::File(path) => match std::fs::read(path) {
                Ok(pem) if !pem.is_empty() => pem,
                Ok(_) => {
                    tracing::warn!(file = %path.display(), "the webhook CA file is empty; caBundles left as they are");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read the webhook CA; caBundles left as they are");
                    continue;
                }
            },
        };
        if let Some(name) = &cfg.mutating {
            let api: Api<MutatingWebhookConfiguration> = Api::all(cfg.client.clone());
            sync(&api, name, &pem).await;
        }
        if let Some(name) = &cfg.validating {
            let api: Api<ValidatingWebhookConfiguration> = Api::all(cfg.client.clone());
            sync(&api, name, &pem).await;
        }
    }
}

/// Writes `pem` into every webhook of configuration `name` whose bundle differs.
async fn sync<K>(api: &Api<K>, name: &str, pem: &[u8])
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let kind = K::kind(&());
    let config = match api.get_opt(name).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            tracing::warn!(%kind, %name, "webhook configuration not found; its caBundle is not kept");
            return;
        }
        Err(e) => {
            tracing::warn!(%kind, %name, error = %e, "cannot read the webhook configuration; retrying later");
            return;
        }
    };
    let stale: Vec<String> = bundles(&config)
        .into_iter()
        .filter(|(_, b)| b.as_ref().map(|b| b.0.as_slice()) != Some(pem))
        .map(|(n, _)| n)
        .collect();
    if stale.is_empty() {
        return;
    }
    let bundle = ByteString(pem.to_vec());
    let webhooks: Vec<_> = stale
        .iter()
        .map(|n| json!({"name": n, "clientConfig": {"caBundle": bundle}}))
        .collect();
    let patch = json!({ "webhooks": webhooks });
    match api
        .patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
    {
        Ok(_) => {
            tracing::info!(%kind, %name, webhooks = ?stale, "caBundle brought in step with the webhook certificate")
        }
        Err(e) => {
            tracing::warn!(%kind, %name, error = %e, "cannot write the caBundle; retrying later")
        }
    }
}

/// Each webhook's name and `caBundle`: the two kinds of configuration share the
/// `webhooks[].clientConfig` shape but not a Rust type.
fn bundles<K: serde::Serialize>(config: &K) -> Vec<(String, Option<ByteString>)> {
    let value = serde_json::to_value(config).unwrap_or_default();
    value["webhooks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let name = w["name"].as_str().unwrap_or_default().to_string();
            let bundle = serde_json::from_value(w["clientConfig"]["caBundle"].clone()).ok();
            (name, bundle)
        })
        .collect()
}

fn watch_dir(file: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            // A full channel already holds a pending sync, which reads the latest file.
            let _ = tx.try_send(());
        }
    });
    match watcher.and_then(|mut w| {
        w.watch(&dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the webhook CA; checking every {RESYNC_EVERY:?} only");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::Value;

    use super::*;
    use crate::k8s::double::{ApiCall, ApiServer};

    const MUTATING: &str =
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/sluice-injector";
    const VALIDATING: &str =
        "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/sluice-validator";

    fn b64(pem: &str) -> Value {
        serde_json::to_value(ByteString(pem.as_bytes().to_vec())).unwrap()
    }

    fn config(kind: &str, name: &str, bundles: &[(&str, Option<&str>)]) -> Value {
        let webhooks: Vec<Value> = bundles
            .iter()
            .map(|(n, b)| {
                let mut cc = json!({"service": {"name": "sluice", "namespace": "sluice-system"}});
                if let Some(b) = b {
                    cc["caBundle"] = b64(b);
                }
                json!({"name": n, "clientConfig": cc, "sideEffects": "None",
                       "admissionReviewVersions": ["v1"]})
            })
            .collect();
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
               "metadata": {"name": name}, "webhooks": webhooks})
    }

    /// The API double holding the two configurations (the validating one maybe
    /// absent), and the PATCHes it received.
    struct Cluster {
        api: ApiServer,
        seen: usize,
    }

    impl Cluster {
        fn new(mutating: Value, validating: Option<Value>) -> Self {
            let api = ApiServer::new();
            api.put(mutating);
            if let Some(v) = validating {
                api.put(v);
            }
            Self { api, seen: 0 }
        }

        fn patches_since(&self, seen: usize) -> Vec<(usize, ApiCall)> {
            self.api
                .calls()
                .into_iter()
                .enumerate()
                .skip(seen)
                .filter(|(_, c)| c.method == Method::PATCH)
                .collect()
        }

        /// The next PATCH, after checking the double took it.
        async fn next_patch(&mut self) -> ApiCall {
            let (i, call) = tokio::time::timeout(RESYNC_EVERY * 3, async {
                loop {
                    if let Some(p) = self.patches_since(self.seen).into_iter().next() {
                        return p;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
            .await
            .expect("a caBundle patch");
            self.seen = i + 1;
            assert_eq!(call.status, 200, "{call:?}");
            assert_eq!(call.content_type, "application/strategic-merge-patch+json");
            call
        }

        async fn no_patch(&mut self) {
            tokio::time::sleep(RESYNC_EVERY * 2).await;
            let unexpected = self.patches_since(self.seen);
            assert!(unexpected.is_empty(), "unexpected patch: {unexpected:?}");
        }

        /// The stored bundles of configuration `plural`/`name`.
        fn bundles(&self, plural: &str, name: &str) -> Vec<Value> {
            let obj = self.api.get(plural, "", name).unwrap();
            obj["webhooks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["clientConfig"]["caBundle"].clone())
                .collect()
        }
    }

    fn start(client: Client, ca_file: &Path, validating: bool) -> watch::Sender<bool> {
        let (stop, rx) = watch::channel(false);
        tokio::spawn(keep(
            WebhookBundles {
                client,
                ca: BundleSource::File(ca_file.to_path_buf()),
                mutating: Some("sluice-injector".into()),
                validating: validating.then(|| "sluice-validator".into()),
            },
            rx,
        ));
        stop
    }

    #[tokio::test(start_paused = true)]
    async fn stale_bundles_are_rewritten_and_follow_a_rotated_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "CA-1").unwrap();
        let mut cluster = Cluster::new(
            config(
                "MutatingWebhookConfiguration",
                "sluice-injector",
                &[
                    ("ns.inject.sluice.dev", Some("OLD")),
                    ("pod.inject.sluice.dev", Some("CA-1")),
                ],
            ),
            Some(config(
                "ValidatingWebhookConfiguration",
                "sluice-validator",
                &[("routepolicies.sluice.dev", None)],
            )),
        );
        let _stop = start(cluster.api.client(), &ca, true);

        // Only the webhooks whose bundle differs are named.
        let p = cluster.next_patch().await;
        assert_eq!(p.path, MUTATING);
        assert_eq!(
            p.body,
            json!({"webhooks": [{"name": "ns.inject.sluice.dev", "clientConfig": {"caBundle": b64("CA-1")}}]})
        );
        let p = cluster.next_patch().await;
        assert_eq!(p.path, VALIDATING);
        assert_eq!(
            p.body["webhooks"][0]["clientConfig"]["caBundle"],
            b64("CA-1")
        );
        assert_eq!(
            cluster.bundles("mutatingwebhookconfigurations", "sluice-injector"),
            [b64("CA-1"), b64("CA-1")]
        );
        // In step: nothing more is written.
        cluster.no_patch().await;

        // The Secret rotates: both configurations follow.
        std::fs::write(&ca, "CA-2").unwrap();
        let p = cluster.next_patch().await;
        assert_eq!(p.path, MUTATING);
        assert_eq!(p.body["webhooks"].as_array().unwrap().len(), 2);
        assert_eq!(
            p.body["webhooks"][1]["clientConfig"]["caBundle"],
            b64("CA-2")
        );
        assert_eq!(cluster.next_patch().await.path, VALIDATING);
        cluster.no_patch().await;
        assert_eq!(
            cluster.bundles("mutatingwebhookconfigurations", "sluice-injector"),
            [b64("CA-2"), b64("CA-2")]
        );
        assert_eq!(
            cluster.bundles("validatingwebhookconfigurations", "sluice-validator"),
            [b64("CA-2")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_configuration_or_ca_file_breaks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        let mut cluster = Cluster::new(
            config(
                "MutatingWebhookConfiguration",
                "sluice-injector",
                &[("ns.inject.sluice.dev", Some("OLD"))],
            ),
            None,
        );
        // The validating configuration does not exist, and the CA file is not there yet.
        let _stop = start(cluster.api.client(), &ca, true);
        cluster.no_patch().await;
        std::fs::write(&ca, "CA-1").unwrap();
        let p = cluster.next_patch().await;
        assert_eq!(p.path, MUTATING);
        assert_eq!(
            p.body["webhooks"][0]["clientConfig"]["caBundle"],
            b64("CA-1")
        );
    }
}
