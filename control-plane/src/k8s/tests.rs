//! The control plane against a scripted API server: RoutePolicies and
//! EndpointSlices reach the published set, statuses are written by the leader only.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sluice_config::PolicySet;
use tokio::sync::mpsc;

use super::testing::{Call, Reply, fake_api, status};
use super::{KubeConfig, LeaseConfig};
use crate::{ControlPlaneConfig, RunningControlPlane};

const POLICIES: &str = "/apis/sluice.dev/v1alpha1/routepolicies";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases/sluice-control-plane";

/// A fake cluster: RoutePolicies and EndpointSlices with watches the test feeds,
/// a Lease, and the status patches it receives.
struct Cluster {
    policy_events: mpsc::UnboundedSender<Value>,
    slice_events: mpsc::UnboundedSender<Value>,
    patches: mpsc::UnboundedReceiver<Call>,
    /// Another replica holds the Lease and renews it while this is true.
    other_leader_alive: Arc<AtomicBool>,
    /// The RoutePolicy objects as the fake API server has them, by name.
    objects: Arc<Mutex<std::collections::HashMap<String, Value>>>,
    client: kube::Client,
}

fn list(kind: &str, items: &[Value]) -> Reply {
    Reply::Json(
        200,
        json!({ "kind": kind, "apiVersion": "v1", "metadata": { "resourceVersion": "1" }, "items": items }),
    )
}

impl Cluster {
    fn new(policies: Vec<Value>, slices: Vec<Value>, other_leader: bool) -> Self {
        let (policy_tx, policy_rx) = mpsc::unbounded_channel();
        let (slice_tx, slice_rx) = mpsc::unbounded_channel();
        let (patch_tx, patches) = mpsc::unbounded_channel();
        let mut policy_rx = Some(policy_rx);
        let mut slice_rx = Some(slice_rx);
        let other_alive = Arc::new(AtomicBool::new(other_leader));
        let alive = other_alive.clone();
        let renewals = AtomicU64::new(0);
        let lease: Arc<Mutex<Option<Value>>> = Arc::new(Mutex::new(other_leader.then(|| {
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": "sluice-control-plane", "namespace": "sluice-system", "resourceVersion": "1" },
                "spec": { "holderIdentity": "cp-other", "leaseDurationSeconds": 15,
                          "renewTime": "2026-01-01T00:00:00.000000Z" }
            })
        })));
        let objects: Arc<Mutex<std::collections::HashMap<String, Value>>> = Arc::new(Mutex::new(
            policies
                .iter()
                .map(|p| {
                    (
                        p["metadata"]["name"].as_str().unwrap().to_string(),
                        p.clone(),
                    )
                })
                .collect(),
        ));
        let stored = objects.clone();
        let echo = policy_tx.clone();
        let (client, _calls) = fake_api(move |c| {
            if c.path == POLICIES {
                return match (
                    c.is_watch(),
                    c.is_watch().then(|| policy_rx.take()).flatten(),
                ) {
                    (true, Some(rx)) => Reply::Stream(rx),
                    (true, None) => Reply::Hang,
                    (false, _) => list("RoutePolicyList", &policies),
                };
            }
            if c.path == SLICES {
                assert!(
                    c.query
                        .contains("labelSelector=kubernetes.io%2Fservice-name"),
                    "{c:?}"
                );
                return match (
                    c.is_watch(),
                    c.is_watch().then(|| slice_rx.take()).flatten(),
                ) {
                    (true, Some(rx)) => Reply::Stream(rx),
                    (true, None) => Reply::Hang,
                    (false, _) => list("EndpointSliceList", &slices),
                };
            }
            if c.path == LEASE || c.path == LEASE.trim_end_matches("/sluice-control-plane") {
                let mut lease = lease.lock().unwrap();
                return match (c.method.as_str(), lease.as_mut()) {
                    ("GET", None) => status(404, "NotFound"),
                    ("GET", Some(l)) => {
                        if alive.load(Ordering::SeqCst) {
                            // The other replica renews between our looks.
                            let n = renewals.fetch_add(1, Ordering::SeqCst);
                            l["spec"]["renewTime"] = json!(format!(
                                "2026-01-01T00:{:02}:{:02}.000000Z",
                                n / 60 % 60,
                                n % 60
                            ));
                            l["metadata"]["resourceVersion"] = json!(format!("r{n}"));
                        }
                        Reply::Json(200, l.clone())
                    }
                    ("POST", None) | ("PUT", Some(_)) => {
                        *lease = Some(c.body.clone());
                        Reply::Json(200, c.body.clone())
                    }
                    ("POST", Some(_)) => status(409, "AlreadyExists"),
                    other => panic!("unexpected lease call {other:?}"),
                };
            }
            if let Some(pod) = c.path.strip_prefix("/api/v1/namespaces/shop/pods/pod-") {
                // Pods at 10.0.0.x run as log-v1, others as log-canary.
                assert_eq!(c.method, "GET");
                let sa = if pod.starts_with("10.0.0.") {
                    "log-v1"
                } else {
                    "log-canary"
                };
                return Reply::Json(
                    200,
                    json!({ "apiVersion": "v1", "kind": "Pod",
                            "metadata": { "name": format!("pod-{pod}"), "namespace": "shop", "uid": format!("uid-{pod}") },
                            "spec": { "serviceAccountName": sa, "containers": [] } }),
                );
            }
            if c.method == "PATCH" && c.path.ends_with("/status") {
                // Like the API server: the patched object comes back through the watch.
                let name = c.path.rsplit('/').nth(1).unwrap().to_string();
                assert_eq!(c.query, "", "a plain merge patch: {c:?}");
                let _ = patch_tx.send(c.clone());
                let mut stored = stored.lock().unwrap();
                let Some(obj) = stored.get_mut(&name) else {
                    return status(404, "NotFound");
                };
                obj["status"] = c.body["status"].clone();
                let _ = echo.send(json!({ "type": "MODIFIED", "object": obj.clone() }));
                return Reply::Json(200, obj.clone());
            }
            panic!("unexpected call {c:?}");
        });
        Self {
            policy_events: policy_tx,
            objects,
            slice_events: slice_tx,
            patches,
            other_leader_alive: other_alive,
            client,
        }
    }

    async fn start(&self, policies: bool) -> RunningControlPlane {
        let dir = std::env::temp_dir();
        crate::start(ControlPlaneConfig {
            policy_dir: dir,
            kubernetes: Some(KubeConfig {
                client: self.client.clone(),
                policies,
                lease: LeaseConfig::new("sluice-system", "sluice-control-plane", "cp-a"),
                trust_domain: "cluster.local".to_string(),
            }),
            ..ControlPlaneConfig::default()
        })
        .await
        .unwrap()
    }

    fn policy_event(&self, kind: &str, obj: Value) {
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let mut objects = self.objects.lock().unwrap();
        if kind == "DELETED" {
            objects.remove(&name);
        } else {
            objects.insert(name, obj.clone());
        }
        drop(objects);
        self.policy_events
            .send(json!({ "type": kind, "object": obj }))
            .unwrap();
    }

    fn slice_event(&self, kind: &str, obj: Value) {
        self.slice_events
            .send(json!({ "type": kind, "object": obj }))
            .unwrap();
    }

    async fn next_patch(&mut self) -> (String, Value) {
        let c = tokio::time::timeout(Duration::from_secs(60), self.patches.recv())
            .await
            .expect("a status patch")
            .unwrap();
        let name = c.path.rsplit('/').nth(1).unwrap().to_string();
        (name, c.body["status"].clone())
    }
}

fn policy(name: &str, generation: i64, spec: Value) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RoutePolicy",
        "metadata": { "name": name, "namespace": "shop", "generation": generation, "uid": name,
                      "resourceVersion": format!("{name}-{generation}"),
                      "creationTimestamp": "2026-01-01T00:00:00Z" },
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
                         "routes": [{ "name": "r", "timeout": "2x" }] });
    let mut cluster = Cluster::new(
        vec![
            policy("log-service", 1, log_spec("2s")),
            policy("broken", 4, broken),
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
    assert_eq!(broken_status["observedGeneration"], 4);
    assert!(broken_status["hash"].is_null());
    let error = broken_status["error"].as_str().unwrap();
    assert!(error.starts_with("spec.routes[0].timeout: "), "{error}");
    let (name, good) = &verdicts[1];
    assert_eq!(name, "log-service");
    assert_eq!(
        good,
        &json!({ "observedGeneration": 1, "accepted": true,
                 "hash": single_hash(log_spec("2s"), "log-service"), "error": null })
    );

    // An edit is served and its new generation acknowledged in status.
    cluster.policy_event("MODIFIED", policy("log-service", 2, log_spec("3s")));
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
    cluster.policy_event("MODIFIED", policy("log-service", 3, log_spec("soon")));
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
    cluster.policy_event("DELETED", policy("log-service", 3, log_spec("soon")));
    served(&cp, |s| s.policies().is_empty()).await;
    cp.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn only_the_leader_writes_statuses() {
    let mut cluster = Cluster::new(vec![policy("log-service", 1, log_spec("2s"))], vec![], true);
    let cp = cluster.start(true).await;
    // Every replica serves.
    served(&cp, |s| s.policies().len() == 1).await;
    // While the other replica keeps renewing, this one writes nothing.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        cluster.patches.try_recv().is_err(),
        "a follower wrote a status"
    );
    // The other replica dies; once its Lease expires this one leads and writes.
    cluster.other_leader_alive.store(false, Ordering::SeqCst);
    let (name, st) = cluster.next_patch().await;
    assert_eq!(name, "log-service");
    assert_eq!(st["accepted"], true);
    // The write's own watch event does not cause another write.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(cluster.patches.try_recv().is_err());
    cp.shutdown().await;
}

fn slice(name: &str, service: &str, endpoints: &[(&str, Option<bool>)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": { "name": name, "namespace": "shop", "resourceVersion": name,
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
        vec![policy("log-service", 1, service_spec())],
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
    cluster.slice_event(
        "MODIFIED",
        slice(
            "log-v1-a",
            "log-v1",
            &[
                ("10.0.0.2", Some(true)),
                ("10.0.0.1", None),
                ("10.0.0.3", Some(true)),
            ],
        ),
    );
    cluster.slice_event(
        "ADDED",
        slice("log-v1-b", "log-v1", &[("10.0.1.1", Some(true))]),
    );
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
    cluster.slice_event("DELETED", slice("log-v1-a", "log-v1", &[]));
    cluster.slice_event("DELETED", slice("log-v1-b", "log-v1", &[]));
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
    let (client, mut calls) = fake_api(|c| match c.method.as_str() {
        "GET" => status(404, "NotFound"),
        "POST" => Reply::Json(201, c.body.clone()),
        other => panic!("unexpected {other}"),
    });
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
    let get = calls.recv().await.unwrap();
    assert_eq!(get.path, "/api/v1/namespaces/mesh/secrets/sluice-ca");
    let create = calls.recv().await.unwrap();
    assert_eq!(create.path, "/api/v1/namespaces/mesh/secrets");
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

#[test]
fn a_restart_with_a_broken_object_serves_its_last_accepted_version() {
    use kube::api::DynamicObject;

    use super::policies::KubePolicies;

    let state = tempfile::tempdir().unwrap();
    let obj = |spec: Value| {
        Arc::new(serde_json::from_value::<DynamicObject>(policy("log-service", 1, spec)).unwrap())
    };
    let mut first = KubePolicies::new(Some(state.path()), sluice_config::Limits::default());
    assert_eq!(first.sync(&[obj(log_spec("2s"))]), 0);
    let (set, _) = first.build_set().unwrap();
    assert_eq!(set.policies().len(), 1);

    // Restarted while the object is broken: its last accepted version is served.
    let mut again = KubePolicies::new(Some(state.path()), sluice_config::Limits::default());
    assert_eq!(again.sync(&[obj(log_spec("soon"))]), 1);
    let (restored, _) = again.build_set().unwrap();
    assert_eq!(restored.hash(), set.hash());
    let (_, status) = again.pending_statuses().remove(0);
    assert!(!status.accepted);
    assert_eq!(
        status.hash,
        Some(single_hash(log_spec("2s"), "log-service"))
    );

    // Deleted while the replica was down: forgotten, file and all.
    let mut third = KubePolicies::new(Some(state.path()), sluice_config::Limits::default());
    third.sync(&[]);
    assert!(third.build_set().unwrap().0.policies().is_empty());
    let files = std::fs::read_dir(state.path().join("routepolicies")).unwrap();
    assert_eq!(files.count(), 0);
}
