//! Running in a Kubernetes cluster (kube-rs).
//!
//! - [`policies`]: `--source kubernetes` takes policies from `RoutePolicy` objects
//!   (`sluice.dev/v1alpha1`) through a reflector, validates each with
//!   `sluice-config` and publishes them like files; the elected replica writes
//!   each object's verdict to its `status`.
//! - `policy_watch`: the RoutePolicy and HTTPRoute reflector tasks and the status
//!   writer. The status also carries each route's rollout state: only the elected
//!   replica judges and drives rollouts and writes it; the others serve the weights
//!   it says (so every replica publishes the same versions and `/rollouts`), relay
//!   the proxies' reports to the elected one ([`crate::rollout::forward`]), and a
//!   newly elected replica resumes from it.
//! - [`leader`]: the election (a `coordination.k8s.io/v1` Lease).
//! - [`endpoints`]: backends naming a Service get its ready endpoints from its
//!   EndpointSlices (on the Service port a backend names), resolved into the
//!   published set.
//! - [`httproutes`]: Gateway API HTTPRoutes bound to Services, translated
//!   ([`crate::gateway`]) into policies beside the RoutePolicies; the elected
//!   replica writes Sluice's entries of their `status.parents`.
//! - [`identity`]: bootstrap tokens checked with TokenReview; the mesh root kept in
//!   a Secret shared by the replicas.
//! - [`ca_bundle`]: the webhook configurations' `caBundle` kept in step with the
//!   webhook's serving certificate.
//! - [`trust_root`]: the mesh root published as a ConfigMap in every namespace,
//!   for injected proxies to verify the control plane's TLS gRPC port.
//! - The validating webhook (`POST /validate` on the webhook server) refuses a
//!   RoutePolicy that `sluice-config` refuses, with [`policies::validate_object`].
//!
//! # What the control plane asks of the API server (its RBAC)
//!
//! Exactly these calls are made; nothing else is needed.
//!
//! | API group | resource | verbs | when |
//! |---|---|---|---|
//! | `sluice.dev` | `routepolicies` (all namespaces) | `list`, `watch` | `--source kubernetes` |
//! | `sluice.dev` | `routepolicies/status` (all namespaces) | `patch` | `--source kubernetes`, elected replica only |
//! | `coordination.k8s.io` | `leases` (own namespace, name `--lease-name`) | `get`, `create`, `update` | `--source kubernetes` |
//! | `discovery.k8s.io` | `endpointslices` (all namespaces) | `list`, `watch` | `--source kubernetes` or `--discover-endpoints` |
//! | `""` (core) | `pods` (all namespaces) | `get` | same: the service account of each endpoint's pod |
//! | `""` (core) | `services` (all namespaces) | `list`, `watch` | same: port numbers name Service ports |
//! | `gateway.networking.k8s.io` | `httproutes`, `referencegrants` (all namespaces) | `list`, `watch` | `--source kubernetes` (404 without the CRDs is fine) |
//! | `gateway.networking.k8s.io` | `httproutes/status` (all namespaces) | `patch` | `--source kubernetes`, elected replica only |
//! | `authentication.k8s.io` | `tokenreviews` | `create` | `--token-review` |
//! | `""` (core) | `secrets` (own namespace, name `--ca-secret`) | `get`, `create` | `--ca-secret` |
//! | `admissionregistration.k8s.io` | `mutatingwebhookconfigurations` (name `--mutating-webhook-config`) | `get`, `patch` | `--mutating-webhook-config` |
//! | `admissionregistration.k8s.io` | `validatingwebhookconfigurations` (name `--validating-webhook-config`) | `get`, `patch` | `--validating-webhook-config` |
//! | `""` (core) | `namespaces` | `list`, `watch` | `--trust-root-configmap` |
//! | `""` (core) | `configmaps` (all namespaces, name `--trust-root-configmap`) | `list`, `watch`, `patch`, `create` | `--trust-root-configmap` |
//!
//! A Role cannot name a resource that does not exist yet for `create`, so the
//! Secret's `create` is granted without `resourceNames` (its `get` can carry it).
//! The Lease's `create` likewise, and the trust-root ConfigMap's (server-side
//! apply creates it through `patch`); its `list` and `watch` carry a
//! `metadata.name` field selector, so they can be granted for that name alone.
//!
//! # Flags
//!
//! - `--source dir|kubernetes` (`SLUICE_SOURCE`, default `dir`): where policies come
//!   from. `dir` needs `--policy-dir`.
//! - `--discover-endpoints` (`SLUICE_DISCOVER_ENDPOINTS`): with `--source dir` in a
//!   cluster, still resolve `service` backends from EndpointSlices (always on with
//!   `--source kubernetes`).
//! - `--pod-namespace NS` (`SLUICE_POD_NAMESPACE`, default: the namespace of the
//!   service account the control plane runs as): where the Lease and the CA
//!   Secret live.
//! - `--pod-name NAME` (`SLUICE_POD_NAME`, default `$HOSTNAME`): this replica's
//!   name in the Lease.
//! - `--pod-ip IP` (`SLUICE_POD_IP`): where the other replicas relay the proxies'
//!   traffic reports (to the admin port) while this replica holds the Lease.
//! - `--lease-name NAME` (`SLUICE_LEASE_NAME`, default `sluice-control-plane`).
//! - `--ca-secret NAME` (`SLUICE_CA_SECRET`): keep the mesh root in this Secret
//!   (keys `ca.crt`, `ca.key`), created on first start.
//! - `--token-review` (`SLUICE_TOKEN_REVIEW`): check proxies' bootstrap tokens with
//!   TokenReview (audience `sluice`), instead of a token file.
//! - `--webhook-ca FILE` (`SLUICE_WEBHOOK_CA`) with `--mutating-webhook-config NAME`
//!   and/or `--validating-webhook-config NAME`: keep those configurations'
//!   `caBundle` equal to the CA in FILE (the webhook Secret's `ca.crt`). When the
//!   mesh CA issues the webhook's certificate (`--webhook` without
//!   `--webhook-cert`), the bundle is the mesh root and no FILE is needed.
//! - `--trust-root-configmap NAME` (`SLUICE_TRUST_ROOT_CONFIGMAP`): keep the mesh
//!   root in a ConfigMap of this name in every namespace, and have the injection
//!   webhook mount it into the proxies it adds.

pub mod ca_bundle;
pub mod endpoints;
pub mod httproutes;
pub mod identity;
pub mod leader;
pub mod policies;
mod policy_watch;
pub mod trust_root;

#[cfg(any(test, feature = "test-support"))]
pub mod double;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use identity::{TokenReviewVerifier, load_or_create_ca_secret};
pub use leader::LeaseConfig;
pub use policies::validate_object;

use crate::proxies::RECENTLY_CLOSED;
use crate::rollout::forward::RemoteProxy;
use crate::state::Shared;

/// What the control plane does with the Kubernetes API.
#[derive(Clone)]
pub struct KubeConfig {
    /// The API client.
    pub client: Client,
    /// RoutePolicy objects are the policy source (`--source kubernetes`);
    /// otherwise only Service endpoints are discovered.
    pub policies: bool,
    /// The Lease that elects the replica writing statuses.
    pub lease: LeaseConfig,
    /// Trust domain of the identities derived from endpoints' service accounts.
    pub trust_domain: String,
    /// This replica's pod IP: other replicas reach its admin port there (when the
    /// admin port is bound to a specific address, that address is used instead).
    pub pod_ip: Option<std::net::IpAddr>,
}

impl fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeConfig")
            .field("policies", &self.policies)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// Starts the watches (and, with RoutePolicies as the source, the election and the
/// status writer); every task ends when `shutdown` turns true.
pub(crate) fn spawn(
    cfg: &KubeConfig,
    shared: &Arc<Shared>,
    admin_token: Option<Arc<str>>,
    shutdown: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(endpoints::watch_endpoints(
            cfg.client.clone(),
            shared.endpoints.clone(),
            reload(shared),
            shutdown.clone(),
        )),
        tokio::spawn(endpoints::watch_services(
            cfg.client.clone(),
            shared.endpoints.clone(),
            reload(shared),
            shutdown.clone(),
        )),
    ];
    if cfg.policies {
        let (leading_tx, leading_rx) = watch::channel(false);
        tasks.push(tokio::spawn(policy_watch::watch_httproutes(
            cfg.client.clone(),
            shared.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(policy_watch::watch_policies(
            cfg.client.clone(),
            shared.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(leader::run(
            cfg.client.clone(),
            cfg.lease.clone(),
            leading_tx,
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(policy_watch::write_statuses(
            cfg.client.clone(),
            shared.clone(),
            leading_rx.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(drive_while_leading(
            shared.clone(),
            leading_rx,
            shutdown.clone(),
        )));
        let (holder_tx, holder_rx) = watch::channel(None);
        tasks.push(tokio::spawn(leader::watch_holder(
            cfg.client.clone(),
            cfg.lease.clone(),
            holder_tx,
            shutdown.clone(),
        )));
        let relaying = shared.clone();
        let stop = shutdown.clone();
        let replica = cfg.lease.holder.clone();
        tasks.push(tokio::spawn(async move {
            // Open streams, and those closed lately: the holder names one that went
            // before acking a step however soon it went.
            let acks = || {
                let now = crate::unix_ms(std::time::SystemTime::now());
                let since = now.saturating_sub(RECENTLY_CLOSED.as_millis() as u64);
                relaying
                    .proxies
                    .with_departed(now)
                    .into_iter()
                    .filter(|p| {
                        p.connected || p.disconnected_at_unix_ms.is_some_and(|at| at >= since)
                    })
                    .map(|p| RemoteProxy {
                        node_id: p.node_id,
                        acked_version: p.acked_version,
                        nacked_version: p.nacked_version,
                        stream: p.stream,
                        version_sent: p.version_sent,
                        connected: p.connected,
                        connected_at_unix_ms: p.connected_at_unix_ms,
                        disconnected_at_unix_ms: p.disconnected_at_unix_ms,
                    })
                    .collect()
            };
            // The holder's counts of the whole fleet, for this replica's proxies.
            let fleet = |table: Option<sluice_api::pb::RouteTraffic>| {
                let now = relaying.clock.instant();
                relaying.reports.set_fleet(table.as_ref(), now);
            };
            let forwarder = &relaying.forwarder;
            forwarder
                .run(holder_rx, admin_token, replica, acks, fleet, stop)
                .await;
        }));
    }
    tasks
}

/// Only the lease holder judges and drives rollouts; the others serve the states
/// it writes into the statuses. Mirrors leadership into the rollouts until
/// `shutdown`.
async fn drive_while_leading(
    shared: Arc<Shared>,
    mut leading: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let now = *leading.borrow_and_update();
        shared.rollouts.set_leading(now);
        // `/rollouts` shows who drives them, and the status writer waits for this.
        shared.changes.send_modify(|c| *c += 1);
        if !now {
            // What the statuses say now, at once rather than at their next change.
            let statuses = shared
                .with_kube_policies(|k| k.rollout_statuses())
                .unwrap_or_default();
            if shared.rollouts.follow(statuses) {
                shared.republish();
            }
        }
        tokio::select! {
            r = leading.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// Re-reads the sources and publishes: what the endpoint watches call on a change.
fn reload(shared: &Arc<Shared>) -> impl Fn() + Send + Sync + 'static {
    let shared = shared.clone();
    move || shared.reload()
}

/// Runs a reflector over `api` until `shutdown` (or the stream ends), handing the
/// whole store to `on_change` once listed and after every change; `what` names the
/// objects in the log when the watch fails (it is retried with backoff).
pub(crate) async fn reflect<K>(
    api: kube::Api<K>,
    writer: kube::runtime::reflector::store::Writer<K>,
    config: kube::runtime::watcher::Config,
    what: &str,
    shutdown: watch::Receiver<bool>,
    mut on_change: impl FnMut(&[Arc<K>]),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    reflect_async(api, writer, config, what, shutdown, |objects| {
        on_change(&objects);
        std::future::ready(())
    })
    .await
}

/// [`reflect`] with an `on_change` that may wait (for reads of other objects); the
/// next event is taken once it is done.
pub(crate) async fn reflect_async<K, F>(
    api: kube::Api<K>,
    writer: kube::runtime::reflector::store::Writer<K>,
    config: kube::runtime::watcher::Config,
    what: &str,
    mut shutdown: watch::Receiver<bool>,
    mut on_change: impl FnMut(Vec<Arc<K>>) -> F,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
    F: std::future::Future<Output = ()>,
{
    use futures_util::StreamExt as _;
    use kube::runtime::WatchStreamExt as _;
    use kube::runtime::watcher::{Event, watcher};

    let store = writer.as_reader();
    let stream = kube::runtime::reflector(writer, watcher(api, config)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = shutdown.changed() => return,
        };
        match event {
            Some(Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_))) => {
                on_change(store.state()).await
            }
            Some(Ok(Event::Init | Event::InitApply(_))) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "{what} watch failed; retrying"),
            None => return,
        }
    }
}

/// Where to publish the mesh root for injected proxies (`--trust-root-configmap`).
#[derive(Clone)]
pub struct PublishTrustRoot {
    /// The API client.
    pub client: Client,
    /// Name of the ConfigMap kept in every namespace.
    pub configmap: String,
}

impl fmt::Debug for PublishTrustRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishTrustRoot")
            .field("configmap", &self.configmap)
            .finish_non_exhaustive()
    }
}

/// Starts keeping `pem` in the ConfigMap of every namespace.
pub(crate) fn spawn_trust_root(
    cfg: &PublishTrustRoot,
    pem: &str,
    shutdown: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(trust_root::publish(
        cfg.client.clone(),
        cfg.configmap.clone(),
        pem.to_string(),
        shutdown.clone(),
    ))
}

/// The control plane's Kubernetes flags.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KubeArgs {
    /// With `--source dir` in a cluster, still resolve `service` backends from
    /// EndpointSlices (always on with `--source kubernetes`).
    #[arg(long, env = "SLUICE_DISCOVER_ENDPOINTS")]
    pub discover_endpoints: bool,
    /// Namespace of the Lease and the CA Secret (default: the service account's).
    #[arg(long, env = "SLUICE_POD_NAMESPACE", value_name = "NS")]
    pub pod_namespace: Option<String>,
    /// This replica's name in the Lease (default: `$HOSTNAME`).
    #[arg(long, env = "SLUICE_POD_NAME", value_name = "NAME")]
    pub pod_name: Option<String>,
    /// This replica's pod IP: while it holds the Lease, the other replicas relay the
    /// proxies' traffic reports to its admin port there.
    #[arg(long, env = "SLUICE_POD_IP", value_name = "IP")]
    pub pod_ip: Option<std::net::IpAddr>,
    /// Name of the Lease electing the replica that writes RoutePolicy statuses.
    #[arg(
        long,
        env = "SLUICE_LEASE_NAME",
        value_name = "NAME",
        default_value = "sluice-control-plane"
    )]
    pub lease_name: String,
    /// Keep the mesh root in this Secret (`ca.crt`, `ca.key`) of the pod's
    /// namespace, created on first start and shared by the replicas.
    #[arg(long, env = "SLUICE_CA_SECRET", value_name = "NAME")]
    pub ca_secret: Option<String>,
    /// Check proxies' bootstrap tokens with TokenReview (audience `sluice`).
    #[arg(long, env = "SLUICE_TOKEN_REVIEW")]
    pub token_review: bool,
    /// Keep the mesh root (`root.pem`) in a ConfigMap of this name in every
    /// namespace; the injection webhook mounts it into the proxies it adds.
    #[arg(long, env = "SLUICE_TRUST_ROOT_CONFIGMAP", value_name = "NAME")]
    pub trust_root_configmap: Option<String>,
    /// PEM CA of the webhook's serving certificate (its Secret's `ca.crt`), written
    /// into the named webhook configurations' `caBundle`.
    #[arg(long, env = "SLUICE_WEBHOOK_CA", value_name = "FILE")]
    pub webhook_ca: Option<PathBuf>,
    /// MutatingWebhookConfiguration whose `caBundle` follows `--webhook-ca` (or
    /// the mesh root, when the mesh CA issues the webhook's certificate).
    #[arg(long, env = "SLUICE_MUTATING_WEBHOOK_CONFIG", value_name = "NAME")]
    pub mutating_webhook_config: Option<String>,
    /// ValidatingWebhookConfiguration whose `caBundle` follows `--webhook-ca` (or
    /// the mesh root, as above).
    #[arg(long, env = "SLUICE_VALIDATING_WEBHOOK_CONFIG", value_name = "NAME")]
    pub validating_webhook_config: Option<String>,
}

impl KubeArgs {
    /// Whether these flags (with RoutePolicies as the source or not) need the API.
    pub fn needs_client(&self, policies: bool) -> bool {
        policies
            || self.discover_endpoints
            || self.ca_secret.is_some()
            || self.token_review
            || self.trust_root_configmap.is_some()
            || self.mutating_webhook_config.is_some()
            || self.validating_webhook_config.is_some()
    }

    /// The namespace the Lease and the CA Secret live in.
    pub fn namespace(&self, client: &Client) -> String {
        self.pod_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string())
    }

    /// `--ca-secret`: the mesh root kept in that Secret of the pod's namespace
    /// (created with a fresh root if absent).
    pub async fn ca(
        &self,
        client: &Client,
        trust_domain: &str,
        leaf_ttl: std::time::Duration,
    ) -> Result<Option<crate::ca::Ca>, crate::Error> {
        let Some(name) = &self.ca_secret else {
            return Ok(None);
        };
        let ns = self.namespace(client);
        load_or_create_ca_secret(client.clone(), &ns, name, trust_domain, leaf_ttl)
            .await
            .map(Some)
    }

    /// `--token-review`: bootstrap tokens checked with TokenReview.
    pub fn verifier(&self, client: &Client) -> Option<TokenReviewVerifier> {
        self.token_review
            .then(|| TokenReviewVerifier::new(client.clone(), identity::TOKEN_AUDIENCE))
    }

    /// `--trust-root-configmap`: where the mesh root is published.
    pub fn publish_trust_root(&self, client: &Client) -> Option<PublishTrustRoot> {
        self.trust_root_configmap
            .as_ref()
            .map(|name| PublishTrustRoot {
                client: client.clone(),
                configmap: name.clone(),
            })
    }

    /// `--webhook-ca` (or, when the mesh CA issues the webhook's certificate,
    /// `mesh_root`) with the configurations whose `caBundle` follows it.
    pub fn webhook_bundles(
        &self,
        client: &Client,
        mesh_root: Option<&str>,
    ) -> Option<ca_bundle::WebhookBundles> {
        if self.mutating_webhook_config.is_none() && self.validating_webhook_config.is_none() {
            return None;
        }
        let ca = match (&self.webhook_ca, mesh_root) {
            (Some(file), _) => ca_bundle::BundleSource::File(file.clone()),
            (None, Some(pem)) => ca_bundle::BundleSource::MeshRoot(pem.to_string()),
            (None, None) => return None,
        };
        Some(ca_bundle::WebhookBundles {
            client: client.clone(),
            ca,
            mutating: self.mutating_webhook_config.clone(),
            validating: self.validating_webhook_config.clone(),
        })
    }

    /// The control plane's Kubernetes configuration, if it watches anything.
    pub fn to_config(
        &self,
        client: &Client,
        policies: bool,
        trust_domain: &str,
    ) -> Option<KubeConfig> {
        if !(policies || self.discover_endpoints) {
            return None;
        }
        let holder = self
            .pod_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "sluice-control-plane".to_string());
        Some(KubeConfig {
            client: client.clone(),
            policies,
            lease: LeaseConfig::new(&self.namespace(client), &self.lease_name, &holder),
            trust_domain: trust_domain.to_string(),
            pod_ip: self.pod_ip,
        })
    }
}

#[cfg(test)]
mod tests;
