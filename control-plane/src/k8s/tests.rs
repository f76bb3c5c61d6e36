//! The control plane against the stateful API double: RoutePolicies and
//! EndpointSlices reach the published set, statuses are written by the leader
//! only, and the reflectors survive what a real API server does to watches
//! (restarts, bookmarks, 410 Gone) and a concurrent writer (409).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use sluice_config::PolicySet;

use super::double::{ApiCall, ApiServer};
use super::{KubeConfig, LeaseConfig};
use crate::{ControlPlaneConfig, RunningControlPlane};

/// A cluster in the API double: RoutePolicies, EndpointSlices, the pods behind
/// them, and (maybe) another replica holding the Lease.
struct Cluster {
    api: ApiServer,
    /// Requests already looked at by `next_patch`.
    seen: usize,
    /// Another replica holds the Lease and renews it while this is true.
    other_leader_alive: Arc<AtomicBool>,
    client: kube::Client,
}

/// Pods at 10.0.0.x run as log-v1, others as log-canary.
fn pod(ip: &str) -> Value {
    let sa = if ip.starts_with("10.0.0.") {
        "log-v1"
    } else {
        "log-canary"
    };
    json!({ "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": format!("pod-{ip}"), "namespace": "shop" },
            "spec": { "serviceAccountName": sa, "containers": [{ "name": "app" }] } })
}

fn lease(holder: &str, renew: u64) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": "sluice-control-plane", "namespace": "sluice-system" },
        "spec": { "holderIdentity": holder, "leaseDurationSeconds": 15,
                  "renewTime": format!("2026-01-01T00:{:02}:{:02}.000000Z", renew / 60 % 60, renew % 60) }
    })
}

impl Cluster {
    fn new(policies: Vec<Value>, slices: Vec<Value>, other_leader: bool) -> Self {
        let api = ApiServer::new();
        for p in policies {
            api.put(p);
        }
        for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.7", "10.0.1.1"] {
            api.put(pod(ip));
        }
        for s in slices {
            api.put(with_pod_uids(&api, s));
        }
        let alive = Arc::new(AtomicBool::new(other_leader));
        if other_leader {
            api.put(lease("cp-other", 0));
            // The other replica renews between this one's looks.
            let renewing = alive.clone();
            let renewals = AtomicU64::new(1);
            api.before_each(move |c, api| {
                if c.method == Method::GET
                    && c.path.ends_with("/leases/sluice-control-plane")
                    && renewing.load(Ordering::SeqCst)
                {
                    api.put(lease("cp-other", renewals.fetch_add(1, Ordering::SeqCst)));
                }
            });
        }
        Self {
            client: api.client(),
            api,
            seen: 0,
            other_leader_alive: alive,
        }
    }

    async fn start(&self, policies: bool) -> RunningControlPlane {
        self.start_as(policies, "cp-a").await
    }

    /// A replica named `holder` in the Lease.
    async fn start_as(&self, policies: bool, holder: &str) -> RunningControlPlane {
        self.start_with(policies, holder, ControlPlaneConfig::default(), None)
            .await
    }

    /// A replica named `holder` started from `base`, naming `admin_url` in the Lease
    /// while it holds it (by default, its admin address).
    async fn start_with(
        &self,
        policies: bool,
        holder: &str,
        base: ControlPlaneConfig,
        admin_url: Option<String>,
    ) -> RunningControlPlane {
        let dir = std::env::temp_dir();
        let mut lease = LeaseConfig::new("sluice-system", "sluice-control-plane", holder);
        lease.retry_every = Duration::from_millis(500);
        lease.admin_url = admin_url;
        crate::start(ControlPlaneConfig {
            policy_dir: dir,
            kubernetes: Some(KubeConfig {
                client: self.client.clone(),
                policies,
                lease,
                pod_ip: None,
                trust_domain: "cluster.local".to_string(),
            }),
            ..base
        })
        .await
        .unwrap()
    }

    /// The next status write (name, status sent), and whether it was accepted.
    async fn next_status_write(&mut self) -> (String, Value, u16) {
        let (i, c) = self.api.wait_call(self.seen, is_status_write).await;
        self.seen = i + 1;
        let name = c.path.rsplit('/').nth(1).unwrap().to_string();
        (name, c.body["status"].clone(), c.status)
    }

    /// The next successful status write.
    async fn next_patch(&mut self) -> (String, Value) {
        loop {
            let (name, status, code) = self.next_status_write().await;
            if code == 200 {
                return (name, status);
            }
        }
    }

    /// Status writes not yet looked at.
    fn unseen_status_writes(&self) -> usize {
        self.api.calls()[self.seen..]
            .iter()
            .filter(|c| is_status_write(c))
            .count()
    }

    fn generation(&self, name: &str) -> Value {
        self.api.get("routepolicies", "shop", name).unwrap()["metadata"]["generation"].clone()
    }
}

/// `slice` with each endpoint's `targetRef.uid` set to its pod's, as the
/// EndpointSlice controller writes them (the API server picks pods' uids).
fn with_pod_uids(api: &ApiServer, mut slice: Value) -> Value {
    for ep in slice["endpoints"].as_array_mut().into_iter().flatten() {
        let name = ep["targetRef"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(pod) = api.get("pods", "shop", &name) {
            ep["targetRef"]["uid"] = pod["metadata"]["uid"].clone();
        }
    }
    slice
}

fn is_status_write(c: &ApiCall) -> bool {
    c.method == Method::PATCH && c.path.ends_with("/status")
}

fn policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RoutePolicy",
        "metadata": { "name": name, "namespace": "shop" },
        "spec": spec,
    })
}

fn log_spec(timeout: &str) -> Value {
    json!({
        "host": "log-service",
        "backends": { "log-v1": { "addresses": ["10.0.0.9:8080"] } },
        "routes": [{ "name": "ingest", "match": { "path": { "prefix": "/logs" } }, "timeout": timeout }],
    })
}

/// The set being served, once there is one that satisfies `f`.
async fn served(cp: &RunningControlPlane, f: impl Fn(&PolicySet) -> bool) -> PolicySet {
    let mut rx = cp.shared.snapshots.subscribe();
    let published = tokio::time::timeout(
        Duration::from_secs(60),
        rx.wait_for(|p| p.as_ref().is_some_and(|p| f(&p.set))),
    )
    .await
    .expect("the expected set is published")
    .unwrap();
    published.as_ref().unwrap().set.clone()
}

fn single_hash(spec: Value, name: &str) -> String {
    let policy =
        super::validate_object("shop", name, &spec, &sluice_config::Limits::default()).unwrap();
    PolicySet::new(vec![policy]).unwrap().hash().to_string()
}

#[tokio::test]
async fn route_policies_are_served_and_their_verdicts_written_to_status() {
    let broken = json!({ "host": "billing", "backends": { "b": { "addresses": ["10.0.0.1:80"] } },
                         "routes": [{ "name": "r", "timeout": "0s" }] });
    let mut cluster = Cluster::new(
        vec![
            policy("log-service", log_spec("2s")),
            policy("broken", broken),
        ],
        vec![],
        false,
    );
    let cp = cluster.start(true).await;

    // Only the valid object is served; the broken one does not block it.
    let set = served(&cp, |s| !s.policies().is_empty()).await;
    let hosts: Vec<&str> = set
        .policies()
        .iter()
        .map(|p| p.spec.host.as_str())
        .collect();
    assert_eq!(hosts, ["log-service"]);
    assert_eq!(cp.shared.metrics.validation_failures.get(), 1);

    // The leader writes both verdicts: accepted with hash, refused with the field path.
    let mut verdicts = [cluster.next_patch().await, cluster.next_patch().await];
    verdicts.sort_by(|a, b| a.0.cmp(&b.0));
    let (name, broken_status) = &verdicts[0];
    assert_eq!(name, "broken");
    assert_eq!(broken_status["accepted"], false);
    assert_eq!(
        broken_status["observedGeneration"],
        cluster.generation("broken")
    );
    assert!(broken_status["hash"].is_null());
    let error = broken_status["error"].as_str().unwrap();
    assert!(error.starts_with("spec.routes[0].timeout: "), "{error}");
    let (name, good) = &verdicts[1];
    assert_eq!(name, "log-service");
    assert_eq!(
        good,
        &json!({ "observedGeneration": 1, "accepted": true,
                 "hash": single_hash(log_spec("2s"), "log-service"), "error": null,
                 "rollouts": null })
    );

    // An edit is served and its new generation acknowledged in status.
    cluster.api.put(policy("log-service", log_spec("3s")));
    let set = served(&cp, |s| {
        s.policies().first().is_some_and(|p| {
            p.spec.routes[0].timeout.map(|t| t.get()) == Some(Duration::from_secs(3))
        })
    })
    .await;
    let v2 = set.hash().to_string();
    let (name, st) = cluster.next_patch().await;
    assert_eq!(
        (name.as_str(), &st["observedGeneration"]),
        ("log-service", &json!(2))
    );
    assert_eq!(st["hash"], single_hash(log_spec("3s"), "log-service"));

    // A broken edit is refused: generation 2 stays in force, status says why.
    cluster.api.put(policy("log-service", log_spec("2h")));
    let (name, st) = cluster.next_patch().await;
    assert_eq!(name, "log-service");
    assert_eq!(st["observedGeneration"], 3);
    assert_eq!(st["accepted"], false);
    assert_eq!(st["hash"], single_hash(log_spec("3s"), "log-service"));
    assert!(
        st["error"]
            .as_str()
            .unwrap()
            .contains("spec.routes[0].timeout"),
        "{st}"
    );
    assert_eq!(cp.policy_version().as_deref(), Some(v2.as_str()));

    // Deleting an object drops its policy.
    assert!(cluster.api.remove(&policy("log-service", Value::Null)));
    served(&cp, |s| s.policies().is_empty()).await;
    cp.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn only_the_leader_writes_statuses() {
    let mut cluster = Cluster::new(vec![policy("log-service", log_spec("2s"))], vec![], true);
    let cp = cluster.start(true).await;
    // Every replica serves.
    served(&cp, |s| s.policies().len() == 1).await;
    // While the other replica keeps renewing, this one writes nothing.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        cluster.unseen_status_writes(),
        0,
        "a follower wrote a status"
    );
    // The other replica dies; once its Lease expires this one leads and writes.
    cluster.other_leader_alive.store(false, Ordering::SeqCst);
    let (name, st) = cluster.next_patch().await;
    assert_eq!(name, "log-service");
    assert_eq!(st["accepted"], true);
    // The write's own watch event does not cause another write.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(cluster.unseen_status_writes(), 0);
    cp.shutdown().await;
}

fn slice(name: &str, service: &str, endpoints: &[(&str, Option<bool>)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": { "name": name, "namespace": "shop",
                      "labels": { "kubernetes.io/service-name": service } },
        "ports": [{ "name": "metrics", "port": 9090, "protocol": "TCP" },
                  { "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": endpoints.iter().map(|(ip, ready)| json!({
            "addresses": [ip],
            "conditions": ready.map_or(json!({}), |r| json!({ "ready": r })),
            "targetRef": { "kind": "Pod", "namespace": "shop", "name": format!("pod-{ip}"), "uid": format!("uid-{ip}") },
        })).collect::<Vec<_>>(),
    })
}

fn service_spec() -> Value {
    json!({
        "host": "log-service",
        "backends": { "log-v1": { "service": "log-v1.shop" }, "log-v2": { "addresses": ["10.9.9.9:80"] } },
        "routes": [{ "name": "all", "split": [{ "weights": { "log-v1": 90, "log-v2": 10 } }] }],
    })
}

fn addresses_of(set: &PolicySet, backend: &str) -> Vec<String> {
    set.policies()[0].spec.backends[backend].addresses.clone()
}

#[tokio::test]
async fn endpoint_slices_become_the_backends_addresses() {
    let cluster = Cluster::new(
        vec![policy("log-service", service_spec())],
        vec![slice(
            "log-v1-a",
            "log-v1",
            &[
                ("10.0.0.2", Some(true)),
                ("10.0.0.1", None),
                ("10.0.0.3", Some(false)),
            ],
        )],
        false,
    );
    let cp = cluster.start(true).await;
    // Ready (or unknown) endpoints only, on the `http` port, sorted.
    let set = served(&cp, |s| !s.policies().is_empty()).await;
    assert_eq!(
        addresses_of(&set, "log-v1"),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
    assert_eq!(set.policies()[0].spec.backends["log-v1"].service, None);
    assert_eq!(addresses_of(&set, "log-v2"), ["10.9.9.9:80"]);
    // Every ready pod runs as log-v1: that is the identity proxies expect.
    let set = served(&cp, |s| {
        s.policies()[0].spec.backends["log-v1"].identity.is_some()
    })
    .await;
    assert_eq!(
        set.policies()[0].spec.backends["log-v1"]
            .identity
            .as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/log-v1")
    );
    assert_eq!(set.policies()[0].spec.backends["log-v2"].identity, None);
    let v1 = set.hash().to_string();

    // A pod becomes ready, and a second slice of the same Service appears.
    cluster.api.put(with_pod_uids(
        &cluster.api,
        slice(
            "log-v1-a",
            "log-v1",
            &[
                ("10.0.0.2", Some(true)),
                ("10.0.0.1", None),
                ("10.0.0.3", Some(true)),
            ],
        ),
    ));
    cluster.api.put(with_pod_uids(
        &cluster.api,
        slice("log-v1-b", "log-v1", &[("10.0.1.1", Some(true))]),
    ));
    let set = served(&cp, |s| addresses_of(s, "log-v1").len() == 4).await;
    assert_eq!(
        addresses_of(&set, "log-v1"),
        [
            "10.0.0.1:8080",
            "10.0.0.2:8080",
            "10.0.0.3:8080",
            "10.0.1.1:8080"
        ]
    );
    assert_ne!(set.hash(), v1, "new endpoints are a new version");
    // 10.0.1.1 runs as another account: one backend cannot expect both.
    let set = served(&cp, |s| {
        addresses_of(s, "log-v1").len() == 4
            && s.policies()[0].spec.backends["log-v1"].identity.is_none()
    })
    .await;
    // Proxies re-validate the canonical bytes: they must parse back to the same set.
    let again = PolicySet::from_canonical("snapshot", set.canonical_bytes()).unwrap();
    assert_eq!(again.hash(), set.hash());

    // Every pod goes away: the backend keeps its Service and has no endpoint.
    cluster.api.remove(&slice("log-v1-a", "log-v1", &[]));
    cluster.api.remove(&slice("log-v1-b", "log-v1", &[]));
    let set = served(&cp, |s| addresses_of(s, "log-v1").is_empty()).await;
    assert_eq!(
        set.policies()[0].spec.backends["log-v1"].service.as_deref(),
        Some("log-v1.shop")
    );
    cp.shutdown().await;
}

#[tokio::test]
async fn discovery_also_resolves_policies_from_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let doc = json!({ "apiVersion": "sluice.dev/v1alpha1", "kind": "RoutePolicy",
                      "metadata": { "name": "log-service", "namespace": "shop" }, "spec": service_spec() });
    std::fs::write(
        dir.path().join("log.yaml"),
        serde_yaml::to_string(&doc).unwrap(),
    )
    .unwrap();
    let cluster = Cluster::new(
        vec![],
        vec![slice("s", "log-v1", &[("10.0.0.7", None)])],
        false,
    );
    let cp = crate::start(ControlPlaneConfig {
        policy_dir: dir.path().to_path_buf(),
        kubernetes: Some(KubeConfig {
            client: cluster.client.clone(),
            policies: false,
            lease: LeaseConfig::new("sluice-system", "sluice-control-plane", "cp-a"),
            pod_ip: None,
            trust_domain: "cluster.local".to_string(),
        }),
        ..ControlPlaneConfig::default()
    })
    .await
    .unwrap();
    let set = served(&cp, |s| !addresses_of(s, "log-v1").is_empty()).await;
    assert_eq!(addresses_of(&set, "log-v1"), ["10.0.0.7:8080"]);
    cp.shutdown().await;
}

#[tokio::test]
async fn the_ca_secret_flag_keeps_the_root_in_the_pods_namespace() {
    let api = ApiServer::new();
    let client = api.client();
    let args = super::KubeArgs {
        ca_secret: Some("sluice-ca".into()),
        pod_namespace: Some("mesh".into()),
        token_review: true,
        ..super::KubeArgs::default()
    };
    let ca = args
        .ca(&client, "cluster.local", Duration::from_secs(60))
        .await
        .unwrap()
        .expect("a CA");
    assert_eq!(ca.trust_domain(), "cluster.local");
    let calls = api.calls();
    assert_eq!(
        (calls[0].path.as_str(), calls[0].status),
        ("/api/v1/namespaces/mesh/secrets/sluice-ca", 404)
    );
    assert_eq!(
        (calls[1].path.as_str(), calls[1].status),
        ("/api/v1/namespaces/mesh/secrets", 201)
    );
    let secret = api.get("secrets", "mesh", "sluice-ca").expect("the Secret");
    assert!(secret["data"]["ca.crt"].is_string(), "{secret}");
    // A second replica starting later reads the same root.
    let again = args
        .ca(&client, "cluster.local", Duration::from_secs(60))
        .await
        .unwrap()
        .expect("a CA");
    assert_eq!(again.root_pem(), ca.root_pem());
    assert!(args.verifier(&client).is_some());
    let none = super::KubeArgs::default();
    assert!(
        none.ca(&client, "cluster.local", Duration::from_secs(60))
            .await
            .unwrap()
            .is_none()
    );
    assert!(none.verifier(&client).is_none());
}

/// RoutePolicy lists the control plane has made since request `after`.
fn relists(api: &ApiServer, after: usize) -> usize {
    api.calls()[after..]
        .iter()
        .filter(|c| c.is_list_of("routepolicies"))
        .count()
}

fn is_policy_watch(c: &ApiCall) -> bool {
    c.is_watch() && c.path.ends_with("/routepolicies")
}

fn hosts(set: &PolicySet) -> Vec<String> {
    set.policies().iter().map(|p| p.spec.host.clone()).collect()
}

fn other_spec(host: &str) -> Value {
    json!({ "host": host, "backends": { "b": { "addresses": ["10.0.0.9:8080"] } },
            "routes": [{ "name": "all" }] })
}

#[tokio::test]
async fn a_watch_resumed_after_compaction_is_gone_and_the_reflector_relists() {
    let cluster = Cluster::new(vec![policy("log-service", log_spec("2s"))], vec![], false);
    let cp = cluster.start(true).await;
    served(&cp, |s| s.policies().len() == 1).await;
    cluster.api.wait_call(0, is_policy_watch).await;
    let mark = cluster.api.calls().len();
    // While the watch is down, an object is created and etcd compacts past the
    // reflector's resourceVersion: resuming is 410 Gone.
    let compacted = Arc::new(AtomicU64::new(0));
    let once = compacted.clone();
    cluster.api.before_each(move |c, api| {
        if is_policy_watch(c) && once.load(Ordering::SeqCst) == 0 {
            api.put(policy("billing", other_spec("billing")));
            api.compact();
            once.store(api.resource_version(), Ordering::SeqCst);
        }
    });
    cluster.api.close_watches();
    let set = served(&cp, |s| s.policies().len() == 2).await;
    assert_eq!(hosts(&set), ["billing", "log-service"]);
    assert_eq!(relists(&cluster.api, mark), 1, "one relist after the 410");
    let calls = cluster.api.calls();
    let resumed = calls[mark..].iter().find(|c| is_policy_watch(c)).unwrap();
    let from: u64 = resumed.param("resourceVersion").unwrap().parse().unwrap();
    assert!(
        from < compacted.load(Ordering::SeqCst),
        "the watch first resumed where it was, before the compaction"
    );
    // The watch after the relist carries on: a later edit arrives.
    cluster.api.put(policy("billing", other_spec("billing-2")));
    served(&cp, |s| hosts(s).contains(&"billing-2".to_string())).await;
    cp.shutdown().await;
}

#[tokio::test]
async fn a_restarted_watch_resumes_from_its_last_bookmark_without_relisting() {
    let cluster = Cluster::new(vec![policy("log-service", log_spec("2s"))], vec![], false);
    let cp = cluster.start(true).await;
    served(&cp, |s| s.policies().len() == 1).await;
    let (i, watch) = cluster.api.wait_call(0, is_policy_watch).await;
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    // Other resources move the resourceVersion on; a bookmark tells the
    // reflector, and history up to it is compacted away.
    for ip in ["10.0.2.1", "10.0.2.2", "10.0.2.3"] {
        cluster.api.put(pod(ip));
    }
    let bookmark = cluster.api.resource_version();
    cluster.api.bookmark();
    cluster.api.compact();
    let mark = cluster.api.calls().len();
    cluster.api.close_watches();
    let (_, resumed) = cluster.api.wait_call(i + 1, is_policy_watch).await;
    assert_eq!(
        resumed.param("resourceVersion"),
        Some(bookmark.to_string().as_str()),
        "resumed from the bookmark, which compaction has not passed"
    );
    cluster.api.put(policy("log-service", log_spec("3s")));
    served(&cp, |s| {
        s.policies()[0].spec.routes[0].timeout.map(|t| t.get()) == Some(Duration::from_secs(3))
    })
    .await;
    assert_eq!(relists(&cluster.api, mark), 0, "no relist was needed");
    cp.shutdown().await;
}

#[tokio::test]
async fn a_status_write_that_lost_a_race_is_refused_and_redone_for_the_new_generation() {
    let mut cluster = Cluster::new(vec![policy("log-service", log_spec("2s"))], vec![], false);
    // A user edits the object just as the first verdict is being written.
    let edited = Arc::new(AtomicBool::new(false));
    let once = edited.clone();
    cluster.api.before_each(move |c, api| {
        if is_status_write(c) && !once.swap(true, Ordering::SeqCst) {
            api.put(policy("log-service", log_spec("3s")));
        }
    });
    let cp = cluster.start(true).await;
    let (name, st, code) = cluster.next_status_write().await;
    assert_eq!((name.as_str(), code), ("log-service", 409));
    assert_eq!(st["observedGeneration"], 1);
    // The verdict on generation 1 never lands; generation 2's does.
    let (_, st) = cluster.next_patch().await;
    assert_eq!(st["observedGeneration"], 2);
    assert_eq!(st["hash"], single_hash(log_spec("3s"), "log-service"));
    let stored = cluster
        .api
        .get("routepolicies", "shop", "log-service")
        .unwrap();
    assert_eq!(stored["status"]["observedGeneration"], 2);
    assert_eq!(stored["metadata"]["generation"], 2);
    cp.shutdown().await;
}

#[test]
fn a_restart_with_a_broken_object_serves_its_last_accepted_version() {
    use kube::api::DynamicObject;

    use super::policies::KubePolicies;

    let state = tempfile::tempdir().unwrap();
    let obj = |spec: Value| {
        Arc::new(serde_json::from_value::<DynamicObject>(policy("log-service", spec)).unwrap())
    };
    let mut first = KubePolicies::new(Some(state.path()), sluice_config::Limits::default());
    first.gateway.set_installed(false);
    assert_eq!(first.sync(&[obj(log_spec("2s"))]), 0);
    let (set, _) = first.build_set().unwrap();
    assert_eq!(set.policies().len(), 1);

    // Restarted while the object is broken: its last accepted version is served.
    let mut again = KubePolicies::new(Some(state.path()), sluice_config::Limits::default());
    again.gateway.set_installed(false);
    assert_eq!(again.sync(&[obj(log_spec("2h"))]), 1);
    let (restored, _) = again.build_set().unwrap();
    assert_eq!(restored.hash(), set.hash());
    let (_, status, _) = again.pending_statuses(&Default::default()).remove(0);
    assert!(!status.accepted);
    assert_eq!(
        status.hash,
        Some(single_hash(log_spec("2s"), "log-service"))
    );

    // Deleted while the replica was down: forgotten, file and all.
    let mut third = KubePolicies::new(Some(state.path()), sluice_config::Limits::default());
    third.gateway.set_installed(false);
    third.sync(&[]);
    assert!(third.build_set().unwrap().0.policies().is_empty());
    let files = std::fs::read_dir(state.path().join("routepolicies")).unwrap();
    assert_eq!(files.count(), 0);
}

// === Gateway API input ===

const MESH: &str = "gateway-conformance-mesh";

/// A Service of the conformance namespace on ports 80 (`http`) and 8080 (`http-alt`).
fn mesh_service(name: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": MESH },
            "spec": { "ports": [{ "name": "http", "port": 80 }, { "name": "http-alt", "port": 8080 }] } })
}

/// One endpoint of `service` at `ip`, serving `http` on 8000 and `http-alt` on 8001.
fn mesh_slice(service: &str, ip: &str) -> Value {
    json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": { "name": format!("{service}-1"), "namespace": MESH,
                          "labels": { "kubernetes.io/service-name": service } },
            "ports": [{ "name": "http", "port": 8000, "protocol": "TCP" },
                      { "name": "http-alt", "port": 8001, "protocol": "TCP" }],
            "endpoints": [{ "addresses": [ip] }] })
}

/// The HTTPRoute objects of a fixture file.
fn fixture_routes(text: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

fn gateway_cluster(routes: &[Value]) -> Cluster {
    let cluster = Cluster::new(vec![], vec![], false);
    cluster.api.install_gateway_api();
    for s in ["echo", "echo-v1", "echo-v2"] {
        cluster.api.put(mesh_service(s));
    }
    cluster.api.put(mesh_slice("echo-v1", "10.1.0.1"));
    cluster.api.put(mesh_slice("echo-v2", "10.1.0.2"));
    for r in routes {
        cluster.api.put(r.clone());
    }
    cluster
}

/// The `status.parents` entry of Sluice in HTTPRoute `name`, once written.
async fn sluice_parent(cluster: &Cluster, name: &str) -> Value {
    let api = cluster.api.clone();
    let name = name.to_string();
    tokio::time::timeout(Duration::from_secs(60), async move {
        loop {
            if let Some(obj) = api.get("httproutes", MESH, &name)
                && let Some(p) = obj["status"]["parents"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| p["controllerName"] == "sluice.dev/mesh"))
            {
                return p.clone();
            }
            api.wait_call(api.calls().len(), |_| true).await;
        }
    })
    .await
    .expect("a status entry")
}

fn condition<'a>(parent: &'a Value, ty: &str) -> &'a Value {
    parent["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == ty)
        .unwrap()
}

#[tokio::test]
async fn httproutes_are_served_and_refusals_written_to_their_status() {
    let weight = fixture_routes(include_str!(
        "../../testdata/gateway-api/conformance-mesh/httproute-weight.yaml"
    ));
    let mut redirect = fixture_routes(include_str!(
        "../../testdata/gateway-api/conformance-mesh/httproute-303-redirect.yaml"
    ));
    // Another controller's entry for a Gateway parent of the same route.
    redirect[0]["spec"]["parentRefs"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "gw" }));
    let cluster = gateway_cluster(&[weight[0].clone(), redirect[0].clone()]);
    let cp = cluster.start(true).await;

    // The weighted route is served with its proportions and the backends' ports.
    let set = served(&cp, |s| !s.policies().is_empty()).await;
    let p = set
        .policies()
        .iter()
        .find(|p| p.spec.hosts().any(|h| h == "echo"))
        .expect("the bare Service name");
    assert_eq!(p.metadata.name, "httproute-echo");
    let weights = p.spec.routes[0].split[0].weights.as_ref().unwrap();
    assert_eq!(weights.values().copied().collect::<Vec<_>>(), [70, 30]);
    assert_eq!(p.spec.backends["echo-v1-8080"].addresses, ["10.1.0.1:8001"]);
    assert_eq!(p.spec.backends["echo-v2-8080"].addresses, ["10.1.0.2:8001"]);
    assert_eq!(set.policies().len(), 1, "one policy for the Service");
    assert_eq!(
        p.spec.hosts().collect::<Vec<_>>(),
        [
            &format!("echo.{MESH}.svc.cluster.local"),
            "echo",
            &format!("echo.{MESH}")
        ]
    );

    let ok = sluice_parent(&cluster, "mesh-weighted-backends").await;
    assert_eq!(condition(&ok, "Accepted")["status"], "True");
    assert_eq!(condition(&ok, "Accepted")["observedGeneration"], 1);
    assert_eq!(condition(&ok, "ResolvedRefs")["status"], "True");
    let refused = sluice_parent(&cluster, "mesh-303-redirect").await;
    let accepted = condition(&refused, "Accepted");
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "UnsupportedValue");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.rules[0].filters[0]: filter RequestRedirect"),
        "{accepted}"
    );
    // Every status write passed the CRD's schema in the double.
    assert!(
        cluster
            .api
            .calls()
            .iter()
            .filter(|c| is_status_write(c))
            .all(|c| c.status == 200),
        "a status write was refused"
    );

    // An edit Sluice refuses (a filter): generation 2 is refused in status, and
    // generation 1 stays in force.
    let mut edited = weight[0].clone();
    edited["spec"]["rules"][0]["filters"] = json!([{ "type": "RequestHeaderModifier", "requestHeaderModifier": { "set": [{ "name": "x", "value": "y" }] } }]);
    cluster.api.put(edited);
    let api = cluster.api.clone();
    let accepted = tokio::time::timeout(Duration::from_secs(60), async move {
        loop {
            let obj = api
                .get("httproutes", MESH, "mesh-weighted-backends")
                .unwrap();
            let c = obj["status"]["parents"][0]["conditions"][0].clone();
            if c["observedGeneration"] == 2 {
                return c;
            }
            api.wait_call(api.calls().len(), |_| true).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(accepted["status"], "False");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .ends_with("(generation 1 stays in force)"),
        "{accepted}"
    );
    let set = served(&cp, |s| !s.policies().is_empty()).await;
    assert_eq!(
        set.policies()[0].spec.routes[0].split[0]
            .weights
            .as_ref()
            .unwrap()
            .values()
            .copied()
            .collect::<Vec<_>>(),
        [70, 30]
    );

    // A RoutePolicy for the same host: it keeps the host, the HTTPRoute is refused
    // with both names.
    let rp = json!({ "apiVersion": "sluice.dev/v1alpha1", "kind": "RoutePolicy",
                     "metadata": { "name": "echo", "namespace": MESH },
                     "spec": { "host": "echo", "backends": { "b": { "addresses": ["10.0.0.9:80"] } },
                               "routes": [{ "name": "all" }] } });
    cluster.api.put(rp);
    let set = served(&cp, |s| {
        s.policies().len() == 1 && s.policies()[0].metadata.name == "echo"
    })
    .await;
    assert_eq!(set.policies()[0].spec.host, "echo");
    let api = cluster.api.clone();
    let message = tokio::time::timeout(Duration::from_secs(60), async move {
        loop {
            let obj = api
                .get("httproutes", MESH, "mesh-weighted-backends")
                .unwrap();
            let m = obj["status"]["parents"][0]["conditions"][0]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if m.contains("RoutePolicy") {
                return m;
            }
            api.wait_call(api.calls().len(), |_| true).await;
        }
    })
    .await
    .unwrap();
    assert!(
        message.contains("RoutePolicy gateway-conformance-mesh/echo")
            && message.contains("HTTPRoutes gateway-conformance-mesh/mesh-weighted-backends"),
        "{message}"
    );
    cp.shutdown().await;
}

#[tokio::test]
async fn without_the_httproute_crd_route_policies_are_served_as_before() {
    let cluster = Cluster::new(vec![policy("log-service", log_spec("2s"))], vec![], false);
    let cp = cluster.start(true).await;
    let set = served(&cp, |s| !s.policies().is_empty()).await;
    assert_eq!(set.policies().len(), 1);
    let probes = cluster
        .api
        .calls()
        .iter()
        .filter(|c| c.path.ends_with("/httproutes"))
        .map(|c| c.status)
        .collect::<Vec<_>>();
    assert_eq!(probes, [404], "asked once, found no CRD");
    cp.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn gateway_api_installed_later_is_picked_up_without_a_restart() {
    let cluster = Cluster::new(vec![policy("log-service", log_spec("2s"))], vec![], false);
    let cp = cluster.start(true).await;
    served(&cp, |s| s.policies().len() == 1).await;
    cluster.api.install_gateway_api();
    for s in ["echo", "echo-v1", "echo-v2"] {
        cluster.api.put(mesh_service(s));
    }
    for r in fixture_routes(include_str!(
        "../../testdata/gateway-api/conformance-mesh/httproute-simple-same-namespace.yaml"
    )) {
        cluster.api.put(r);
    }
    // Within a minute the control plane asks again and serves the HTTPRoute.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let set = served(&cp, |s| s.policies().len() == 2).await;
    assert!(
        set.policies()
            .iter()
            .any(|p| p.metadata.name == "httproute-echo"),
        "{:?}",
        set.policies()
    );
    cp.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn only_the_leader_writes_httproute_statuses() {
    let routes = fixture_routes(include_str!(
        "../../testdata/gateway-api/conformance-mesh/httproute-simple-same-namespace.yaml"
    ));
    let mut cluster = Cluster::new(vec![], vec![], true);
    cluster.api.install_gateway_api();
    for s in ["echo", "echo-v1"] {
        cluster.api.put(mesh_service(s));
    }
    cluster.api.put(routes[0].clone());
    let cp = cluster.start(true).await;
    // A follower serves the route and writes nothing.
    served(&cp, |s| !s.policies().is_empty()).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        cluster.unseen_status_writes(),
        0,
        "a follower wrote a status"
    );
    // Once it leads, it writes Sluice's entry.
    cluster.other_leader_alive.store(false, Ordering::SeqCst);
    let (name, status) = cluster.next_patch().await;
    assert_eq!(name, "gateway-conformance-mesh-test");
    assert_eq!(status["parents"][0]["controllerName"], "sluice.dev/mesh");
    assert_eq!(status["parents"][0]["conditions"][0]["status"], "True");
    cp.shutdown().await;
}

#[tokio::test]
async fn a_forbidden_httproute_status_write_keeps_the_route_served_and_is_tried_again() {
    let routes = fixture_routes(include_str!(
        "../../testdata/gateway-api/conformance-mesh/httproute-simple-same-namespace.yaml"
    ));
    let mut cluster = Cluster::new(vec![], vec![], false);
    cluster.api.install_gateway_api();
    for s in ["echo", "echo-v1"] {
        cluster.api.put(mesh_service(s));
    }
    cluster.api.put(routes[0].clone());
    // RBAC without `httproutes/status` (an older chart): the first write is a 403.
    cluster.api.fail_next(http::StatusCode::FORBIDDEN, |c| {
        is_status_write(c) && c.path.contains("/httproutes/")
    });
    let cp = cluster.start(true).await;
    let set = served(&cp, |s| !s.policies().is_empty()).await;
    assert_eq!(set.policies()[0].metadata.name, "httproute-echo");
    let (name, _, code) = cluster.next_status_write().await;
    assert_eq!(
        (name.as_str(), code),
        ("gateway-conformance-mesh-test", 403)
    );
    // The route stays served meanwhile, and the write is tried again until it lands.
    assert_eq!(
        cp.shared
            .snapshots
            .borrow()
            .as_ref()
            .unwrap()
            .set
            .policies()
            .len(),
        1
    );
    let (name, status) = cluster.next_patch().await;
    assert_eq!(name, "gateway-conformance-mesh-test");
    assert_eq!(status["parents"][0]["controllerName"], "sluice.dev/mesh");
    assert_eq!(status["parents"][0]["conditions"][0]["status"], "True");
    cp.shutdown().await;
}

/// Log lines written while a test runs (the subscriber is this thread's; a paused
/// test's runtime runs every task on it).
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures this thread's log lines until the guard is dropped.
///
/// `tracing` caches whether a log line is wanted once per line, process-wide, asking the
/// subscriber of the first thread that reaches it: a sibling test with no subscriber
/// reaching the same line first (the HTTPRoute watcher runs in several tests) would
/// cache "never" and silence it here too. A global default that takes every event and
/// keeps none makes every thread's answer "wanted"; each thread's own subscriber then
/// decides.
fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    static GLOBAL: std::sync::Once = std::sync::Once::new();
    GLOBAL.call_once(|| {
        // Another global default set first serves as well.
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // Setting a subscriber asks every line reached so far again, so a "never" cached
    // before the global default existed does not outlive this call.
    (logs, tracing::subscriber::set_default(subscriber))
}

#[tokio::test(start_paused = true)]
async fn without_the_httproute_crd_it_says_so_once_and_keeps_asking() {
    let (logs, _guard) = capture_logs();
    let cluster = Cluster::new(vec![policy("log-service", log_spec("2s"))], vec![], false);
    let cp = cluster.start(true).await;
    served(&cp, |s| s.policies().len() == 1).await;
    tokio::time::sleep(Duration::from_secs(200)).await;
    let probes = cluster
        .api
        .calls()
        .iter()
        .filter(|c| c.path.ends_with("/httproutes") && c.status == 404)
        .count();
    assert!(probes >= 3, "asked {probes} times in 200 s");
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.matches("Gateway API input is off").count(),
        1,
        "{text}"
    );
    cp.shutdown().await;
}

fn rollout_spec() -> Value {
    json!({
        "host": "log-service",
        "backends": { "log-v1": { "addresses": ["10.0.0.9:8080"] },
                      "log-v2": { "addresses": ["10.0.0.8:8080"] } },
        "routes": [{ "name": "ingest", "split": [{
            "weights": { "log-v1": 100, "log-v2": 0 },
            "rollout": { "canary": "log-v2", "steps": [10, 50, 100], "interval": "1s",
                         "minRequests": 5 },
        }] }],
    })
}

/// A healthy report of `canary` and `stable` requests on the rollout's route.
fn healthy_report(canary: u64, stable: u64) -> sluice_api::pb::Report {
    let entry = |backend: &str, requests| sluice_api::pb::BackendCounts {
        policy: "log-service".into(),
        route: "ingest".into(),
        backend: backend.into(),
        requests,
        ..Default::default()
    };
    sluice_api::pb::Report {
        seq: 1,
        interval_ms: 200,
        entries: vec![entry("log-v2", canary), entry("log-v1", stable)],
        ..Default::default()
    }
}

/// The canary's weight in the set `cp` serves proxies now.
fn served_canary_weight(cp: &RunningControlPlane) -> Option<u32> {
    canary_weight_in(cp.shared.snapshots.borrow().as_deref())
}

/// Waits until `cp` serves the canary at `weight`.
async fn serves_canary_at(cp: &RunningControlPlane, weight: u32) {
    let mut rx = cp.shared.snapshots.subscribe();
    tokio::time::timeout(
        Duration::from_secs(60),
        rx.wait_for(|p| canary_weight_in(p.as_deref()) == Some(weight)),
    )
    .await
    .unwrap_or_else(|_| panic!("never served the canary at {weight} %"))
    .unwrap();
}

/// The canary's weight in the published set `p`.
fn canary_weight_in(p: Option<&crate::state::Published>) -> Option<u32> {
    let view = p?.views.last()?;
    let set = PolicySet::from_canonical("snapshot", &view.snapshot.canonical).ok()?;
    let policy = set.policies().first()?.clone();
    policy.spec.routes[0].split[0]
        .weights
        .as_ref()?
        .get("log-v2")
        .copied()
}

/// The rollout state the RoutePolicy's status carries now.
fn status_rollout(cluster: &Cluster) -> Value {
    cluster
        .api
        .get("routepolicies", "shop", "log-service")
        .map(|o| o["status"]["rollouts"][0].clone())
        .unwrap_or(Value::Null)
}

/// `sluice_cp_reports_total{result}` on `cp`.
fn reports_total(cp: &RunningControlPlane, result: &str) -> f64 {
    let metrics = String::from_utf8(cp.shared.metrics.render()).unwrap();
    let line = format!("sluice_cp_reports_total{{result=\"{result}\"}}");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
}

/// A healthy report from proxy-1, connected to `cp`, taken in as its stream takes one.
fn report_to(cp: &RunningControlPlane) {
    let report = healthy_report(20, 80);
    cp.shared
        .reports
        .ingest("proxy-1", "#1", &report, cp.shared.clock.instant())
        .unwrap();
    cp.shared.on_report("proxy-1", 1, report);
}

/// A healthy report to the follower, once the holder answered its relay (it answers
/// after judging the report).
async fn relay_report(follower: &RunningControlPlane) {
    let before = reports_total(follower, "forwarded");
    report_to(follower);
    eventually("the holder took in the relayed report", || {
        reports_total(follower, "forwarded") > before
    })
    .await;
}

/// `by` passes for the rollouts of every replica in `replicas`.
fn time_passes(replicas: &[&RunningControlPlane], by: Duration) {
    for cp in replicas {
        cp.shared.clock.advance(by);
    }
}

/// The interval of `rollout_spec`'s steps.
const INTERVAL: Duration = Duration::from_secs(1);

/// Waits (real time, generous) until `f` holds; `what` names it on failure.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two replicas: the lease holder judges and writes the step into the status, the
/// follower serves the same weights from it and relays its proxies' reports to the
/// holder; when the holder goes, the follower takes the lease and resumes the same
/// step (it does not start over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holder_drives_a_rollout_the_follower_serves_and_resumes_it() {
    let cluster = Cluster::new(vec![policy("log-service", rollout_spec())], vec![], false);
    let a = cluster.start_as(true, "cp-a").await;
    eventually("cp-a holds the lease", || a.shared.rollouts.is_leading()).await;
    let b = cluster.start_as(true, "cp-b").await;
    served(&b, |s| s.policies().len() == 1).await;
    assert!(!b.shared.rollouts.is_leading());

    // The holder writes the first step into the status; both serve 10 %.
    eventually("the status shows step 0 at 10 %", || {
        let st = status_rollout(&cluster);
        st["step"] == 0 && st["weights"]["log-v2"] == 10 && st["phase"] == "progressing"
    })
    .await;
    assert_eq!(served_canary_weight(&a), Some(10));
    assert_eq!(served_canary_weight(&b), Some(10));

    // A proxy connected to the follower only, at the version it serves.
    let hello = sluice_api::pb::Hello {
        node_id: "proxy-b".into(),
        last_applied_version: b.policy_version().unwrap(),
        ..Default::default()
    };
    let stream = b.shared.proxies.connect(&hello, None);
    eventually("the holder knows the follower's proxy", || {
        a.shared
            .remote_proxies
            .lock()
            .unwrap()
            .values()
            .any(|(_, list)| list.iter().any(|p| p.node_id == "proxy-b"))
    })
    .await;

    // Reports reach the follower only: it relays them; once the holder's takeover
    // grace is over, every proxy acked the step and its interval passed, the holder
    // judges the window, advances, writes step 1, and the follower serves 50 % from
    // the status.
    time_passes(&[&a, &b], crate::rollout::driver::TAKEOVER_GRACE);
    let mut relayed = 0;
    while a.shared.rollouts.view()["rollouts"][0]["step"] == 0 {
        relayed += 1;
        assert!(
            relayed <= 10,
            "the holder never judged step 0: {}",
            a.shared.rollouts.view()
        );
        relay_report(&b).await;
        time_passes(&[&a, &b], INTERVAL);
        a.shared.tick_rollouts();
    }
    serves_canary_at(&b, 50).await;
    let st = status_rollout(&cluster);
    assert_eq!(
        (st["step"].clone(), st["decision"].clone()),
        (json!(1), json!("pass")),
        "{st}"
    );
    assert_eq!(served_canary_weight(&a), Some(50));
    // The holder's step 1 waits for the follower's proxy, which has not acked it:
    // however many reports arrive and intervals pass (ten, well within the ack grace
    // after which a silent proxy is left out), no window opens.
    for _ in 0..10 {
        relay_report(&b).await;
        time_passes(&[&a, &b], INTERVAL);
        a.shared.tick_rollouts();
    }
    let view = a.shared.rollouts.view();
    assert_eq!(
        (
            view["rollouts"][0]["step"].clone(),
            view["rollouts"][0]["stepAcked"].clone()
        ),
        (json!(1), json!(false)),
        "{view}"
    );
    // Once it acks the follower's version (the same as the holder's), the window opens.
    let v = b.policy_version().unwrap();
    assert_eq!(a.policy_version().as_deref(), Some(v.as_str()));
    stream.acked(&v);
    eventually("the holder counts the follower's proxy's ack", || {
        a.shared.rollouts.view()["rollouts"][0]["stepAcked"] == true
    })
    .await;
    let metrics = String::from_utf8(b.shared.metrics.render()).unwrap();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("sluice_cp_reports_total{result=\"forwarded\"}")
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    // The follower's `/rollouts` shows the holder's step and the window it judged,
    // with its numbers, from the status; it applies no command itself (its admin
    // relays them to the holder).
    let view = b.shared.rollouts.view();
    assert_eq!(view["rollouts"][0]["step"], 1, "{view}");
    assert_eq!(view["rollouts"][0]["drivenHere"], false);
    assert_eq!(
        view["rollouts"][0]["lastWindow"]["decision"], "pass",
        "{view}"
    );
    assert!(view["rollouts"][0]["currentWindow"].is_null(), "{view}");
    assert!(
        view["rollouts"][0]["lastWindow"]["canaryRequests"]
            .as_u64()
            .is_some_and(|n| n >= 5),
        "{view}"
    );
    let follower_history = view["rollouts"][0]["history"].to_string();
    assert_eq!(
        follower_history.matches("\"started\"").count(),
        1,
        "{follower_history}"
    );
    let id = crate::rollout::RolloutId {
        namespace: "shop".into(),
        policy: "log-service".into(),
        route: "ingest".into(),
    };
    assert_eq!(
        b.shared
            .rollouts
            .command(&id, crate::rollout::engine::Command::Pause),
        Err(crate::rollout::driver::CommandError::NotLeading)
    );

    // The holder goes (releasing the lease): the follower takes over at step 1.
    a.shutdown().await;
    eventually("cp-b holds the lease", || b.shared.rollouts.is_leading()).await;
    assert_eq!(
        served_canary_weight(&b),
        Some(50),
        "the new holder started over"
    );
    assert_eq!(b.shared.rollouts.view()["rollouts"][0]["step"], 1);
    // It drives on from there, after its own takeover grace: its own proxies'
    // reports promote the canary.
    time_passes(&[&b], crate::rollout::driver::TAKEOVER_GRACE);
    let mut sent = 0;
    while b.shared.rollouts.view()["rollouts"][0]["phase"] != "promoted" {
        sent += 1;
        assert!(
            sent <= 20,
            "the new holder never promoted: {}",
            b.shared.rollouts.view()
        );
        // Its proxy acks whatever it is served.
        stream.acked(&b.policy_version().unwrap());
        report_to(&b);
        time_passes(&[&b], INTERVAL);
        b.shared.tick_rollouts();
    }
    cluster
        .api
        .wait_call(0, |c| {
            is_status_write(c)
                && c.status == 200
                && c.body["status"]["rollouts"][0]["phase"] == "promoted"
        })
        .await;
    assert_eq!(status_rollout(&cluster)["phase"], "promoted");
    assert_eq!(served_canary_weight(&b), Some(100));
    let history = b.shared.rollouts.view()["rollouts"][0]["history"].clone();
    let results: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["result"].as_str().unwrap())
        .collect();
    // One start, the first holder's: the follower recorded none of its own while it
    // waited for the status, and the new holder never started the rollout over.
    assert_eq!(
        results.iter().filter(|r| **r == "started").count(),
        1,
        "{results:?}"
    );
    assert_eq!(results.first(), Some(&"started"), "{results:?}");
    assert!(results.contains(&"advanced"), "{results:?}");
    drop(stream);
    b.shutdown().await;
}

/// `POST path` on an admin port (with `headers`): the status and the body.
async fn admin_post(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::post(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(
            req.body(http_body_util::Full::<bytes::Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// POSTs `path` to the follower `cp` at `addr` once it knows the lease holder's
/// address (read from the Lease on its own schedule; before, it answers 503).
async fn post_once_holder_known(
    cp: &RunningControlPlane,
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    eventually("the follower's relay starts", || {
        cp.shared.forwarder.holder().is_some()
    })
    .await;
    let mut holder = cp.shared.forwarder.holder().unwrap();
    tokio::time::timeout(Duration::from_secs(60), holder.wait_for(Option::is_some))
        .await
        .expect("the follower never learned the holder's address")
        .unwrap();
    admin_post(addr, path, headers).await
}

/// A proxy connected to a follower that goes before acking a step, before the
/// follower ever listed it to the holder as connected, is named left out by the
/// holder all the same: the follower lists streams that closed lately too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_names_a_proxy_that_left_a_follower_before_acking() {
    let cluster = Cluster::new(vec![policy("log-service", rollout_spec())], vec![], false);
    let a = cluster.start_as(true, "cp-a").await;
    eventually("cp-a holds the lease", || a.shared.rollouts.is_leading()).await;
    let hello = |node: &str| sluice_api::pb::Hello {
        node_id: node.into(),
        last_applied_version: "before".into(),
        ..Default::default()
    };
    // A proxy on the holder that has not acked the step keeps it waiting (from
    // before the holder counts acks, however long the follower takes to start).
    let waiting = a.shared.proxies.connect(&hello("proxy-a"), None);
    let b = cluster.start_as(true, "cp-b").await;
    served(&b, |s| s.policies().len() == 1).await;
    eventually("the follower serves the first step", || {
        served_canary_weight(&b) == Some(10)
    })
    .await;
    let v = b.policy_version().unwrap();
    assert_eq!(a.policy_version().as_deref(), Some(v.as_str()));

    // A proxy comes to the follower, is sent the step's weights and goes at once: no
    // list the follower sends ever shows it connected.
    let quick = b.shared.proxies.connect(&hello("quick-b"), None);
    quick.sent(&v);
    drop(quick);
    eventually(
        "the follower lists the proxy that left to the holder",
        || {
            a.shared
                .remote_proxies
                .lock()
                .unwrap()
                .get("cp-b")
                .is_some_and(|(_, list)| {
                    list.iter().any(|p| p.node_id == "quick-b" && !p.connected)
                })
        },
    )
    .await;

    // The takeover grace over, the step waits for the proxy that stays; once it
    // acks, the one that went is named.
    time_passes(&[&a, &b], crate::rollout::driver::TAKEOVER_GRACE);
    a.shared.tick_rollouts();
    let view = a.shared.rollouts.view();
    assert_eq!(view["rollouts"][0]["stepAcked"], false, "{view}");
    waiting.acked(&v);
    eventually("the holder counts its own proxy's ack", || {
        a.shared.rollouts.view()["rollouts"][0]["stepAcked"] == true
    })
    .await;
    let r = &a.shared.rollouts.view()["rollouts"][0];
    assert_eq!(r["proxiesLeftOut"], json!(["quick-b"]), "{r}");
    assert_eq!(
        r["proxiesLeftOutWhy"]["quick-b"], "disconnected before acking",
        "{r}"
    );
}

/// A command by hand sent to a follower reaches the lease holder, which applies it;
/// the follower answers with the holder's answer (refusals included) and shows the
/// new state once the holder wrote it into the status. A command another replica
/// relayed is never relayed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_to_a_follower_is_relayed_to_the_lease_holder() {
    let cluster = Cluster::new(vec![policy("log-service", rollout_spec())], vec![], false);
    let a = cluster.start_as(true, "cp-a").await;
    eventually("cp-a holds the lease", || a.shared.rollouts.is_leading()).await;
    let b = cluster.start_as(true, "cp-b").await;
    served(&b, |s| s.policies().len() == 1).await;
    assert!(!b.shared.rollouts.is_leading());
    let base = "/rollouts/shop/log-service/ingest";

    let (code, body) =
        post_once_holder_known(&b, b.admin_addr(), &format!("{base}/pause"), &[]).await;
    assert_eq!(code, 200, "{body}");
    let t: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(t["result"], "paused", "{t}");
    // The holder applied it; the follower shows it from the status.
    assert_eq!(a.shared.rollouts.view()["rollouts"][0]["phase"], "paused");
    eventually("the follower shows the pause", || {
        b.shared.rollouts.view()["rollouts"][0]["phase"] == "paused"
    })
    .await;
    // The holder's refusal comes back as it is.
    let (code, body) = admin_post(b.admin_addr(), &format!("{base}/pause"), &[]).await;
    assert_eq!((code, body.as_str()), (409, "already paused\n"));
    let (code, _) = admin_post(b.admin_addr(), "/rollouts/shop/log-service/nope/pause", &[]).await;
    assert_eq!(code, 404);
    // A relayed command is never relayed on.
    let (code, body) = admin_post(
        b.admin_addr(),
        &format!("{base}/resume"),
        &[(crate::rollout::forward::RELAYED_HEADER, "cp-x")],
    )
    .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(a.shared.rollouts.view()["rollouts"][0]["phase"], "paused");
    let (code, body) = admin_post(b.admin_addr(), &format!("{base}/resume"), &[]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        a.shared.rollouts.view()["rollouts"][0]["phase"],
        "progressing"
    );
    let results: Vec<Value> = a.shared.rollouts.view()["rollouts"][0]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["result"].clone())
        .filter(|r| r != "inconclusive")
        .collect();
    // The history keeps its last 64 entries: when the follower is slow to learn the
    // holder's address, the windows judged inconclusive meanwhile can push "started" out.
    let (before, tail) = results.split_at(results.len().saturating_sub(2));
    assert_eq!(tail, [json!("paused"), json!("resumed")], "{results:?}");
    assert!(before.iter().all(|r| r == "started"), "{results:?}");
    b.shutdown().await;
    a.shutdown().await;
}

/// While the Lease names no holder's admin address, a follower answers a command
/// with 503 and why, rather than taking it or refusing it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_knows_no_holder_answers_commands_with_503() {
    let cluster = Cluster::new(vec![policy("log-service", rollout_spec())], vec![], true);
    let b = cluster.start_as(true, "cp-b").await;
    served(&b, |s| s.policies().len() == 1).await;
    assert!(!b.shared.rollouts.is_leading());
    let (code, body) = admin_post(
        b.admin_addr(),
        "/rollouts/shop/log-service/ingest/abort",
        &[],
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("only the holder drives rollouts"), "{body}");
    b.shutdown().await;
}

/// Replicas whose admin ports are bound beyond loopback, as in a pod, with one admin
/// token (what the chart mounts into each): the follower's relays to the holder, its
/// proxies' reports and a command by hand, pass the holder's token rule; a caller
/// without the token is refused by the follower itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_between_replicas_bound_beyond_loopback_carry_the_shared_admin_token() {
    // Ports picked now, so the holder's address can be named before it binds.
    let free_port = || {
        std::net::TcpListener::bind("0.0.0.0:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let token: std::sync::Arc<str> = "s3cret-shared-by-every-replica".into();
    let replica = |port: u16| ControlPlaneConfig {
        admin_addr: std::net::SocketAddr::from(([0, 0, 0, 0], port)),
        admin_token: Some(token.clone()),
        ..ControlPlaneConfig::default()
    };
    let (port_a, port_b) = (free_port(), free_port());
    let cluster = Cluster::new(vec![policy("log-service", rollout_spec())], vec![], false);
    let a = cluster
        .start_with(
            true,
            "cp-a",
            replica(port_a),
            Some(format!("http://127.0.0.1:{port_a}")),
        )
        .await;
    eventually("cp-a holds the lease", || a.shared.rollouts.is_leading()).await;
    let b = cluster
        .start_with(
            true,
            "cp-b",
            replica(port_b),
            Some(format!("http://127.0.0.1:{port_b}")),
        )
        .await;
    served(&b, |s| s.policies().len() == 1).await;
    let b_admin = std::net::SocketAddr::from(([127, 0, 0, 1], port_b));
    let base = "/rollouts/shop/log-service/ingest";

    // Without the token the follower refuses the caller; it never reaches the holder.
    let (code, _) = admin_post(b_admin, &format!("{base}/pause"), &[]).await;
    assert_eq!(code, 401);
    // With it, the command goes through the follower to the holder.
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let (code, body) = post_once_holder_known(&b, b_admin, &format!("{base}/pause"), &auth).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(a.shared.rollouts.view()["rollouts"][0]["phase"], "paused");

    // The follower's proxies' reports reach the holder too: relayed, not dropped.
    report_to(&b);
    eventually("the follower relayed the report", || {
        reports_total(&b, "forwarded") >= 1.0
    })
    .await;
    assert_eq!(reports_total(&b, "forward_dropped"), 0.0);
    b.shutdown().await;
    a.shutdown().await;
}

/// A replica publishes nothing before every source has listed once: while the API
/// server fails the first EndpointSlice list, proxies get no set (rather than one
/// whose Service backend has no addresses yet, which they would apply), and the set
/// goes out resolved once a list succeeds.
#[tokio::test]
async fn nothing_is_published_before_the_endpoints_are_listed_once() {
    let cluster = Cluster::new(
        vec![policy("log-service", service_spec())],
        vec![slice("log-v1-a", "log-v1", &[("10.0.0.2", Some(true))])],
        false,
    );
    cluster
        .api
        .fail_next(http::StatusCode::INTERNAL_SERVER_ERROR, |c| {
            c.is_list_of("endpointslices")
        });
    let cp = cluster.start(true).await;
    let resolved_or_none = |cp: &RunningControlPlane| {
        cp.shared
            .snapshots
            .borrow()
            .as_ref()
            .is_none_or(|p| addresses_of(&p.set, "log-v1") == ["10.0.0.2:8080"])
    };
    assert!(resolved_or_none(&cp), "published before the first list");
    cluster
        .api
        .wait_call(0, |c| c.is_list_of("endpointslices") && c.status == 500)
        .await;
    assert!(resolved_or_none(&cp), "published after a failed list");

    let set = served(&cp, |s| !s.policies().is_empty()).await;
    assert_eq!(addresses_of(&set, "log-v1"), ["10.0.0.2:8080"]);
}
