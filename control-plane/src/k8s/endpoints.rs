//! Service discovery: backends naming a Service get its ready endpoints.
//!
//! A reflector watches every EndpointSlice that belongs to a Service (label
//! `kubernetes.io/service-name`). Before a set is published, each backend with
//! `service: NAME.NAMESPACE` is rewritten to `addresses:` holding the Service's
//! ready endpoints (`ip:port`, sorted, so every replica computes the same bytes),
//! and `service` is dropped. The rewrite happens before the canonical form and its
//! hash are computed, so a pod coming or going is a new version that proxies
//! re-validate and acknowledge like any edit, and the proxy's balancer and
//! breakers simply see the backend's endpoint list change. Proxies need no
//! Kubernetes knowledge.
//!
//! A Service with no ready endpoint keeps its `service` field and no addresses:
//! the proxy then has no endpoint for that backend and answers
//! `503 no-healthy-endpoint` (the validator allows exactly one of the two
//! fields, and a backend with neither would be refused).
//!
//! Which port: a backend's `port` names a Service port, by name or by number (a
//! number is turned into its name through the Service, which a second reflector
//! watches), and the slice's port of that name is dialled; a backend `port` that
//! the Service does not have leaves the backend without endpoints. Without `port`:
//! a slice of a one-port Service has one; for several, the port named `http`,
//! else the TCP port with the lowest number. Endpoints count as ready
//! unless their `ready` condition is false (the API's rule for an absent one).
//!
//! Identities: each endpoint's `targetRef` names its Pod; the Pod's service
//! account is read once (`get`, cached by pod uid, since it cannot change). When
//! every ready endpoint of a Service runs as the same service account and the
//! backend names no `identity:` itself, the backend gets
//! `identity: spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, which the proxy's mTLS
//! verifies. Endpoints of mixed or unknown accounts leave the identity unset (a
//! backend has one identity), so peers are then checked against the mesh root only.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::{Api, Client};
use sluice_config::{ConfigError, PolicySet, ServicePort};
use tokio::sync::watch;

use crate::gateway::{ServiceInfo, ServicePortInfo};

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Pod as an endpoint names it: namespace, name, uid.
type PodRef = (String, String, String);

/// One ready endpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    address: String,
    pod: Option<PodRef>,
}

/// The ready endpoints of every Service, and the service accounts of their pods.
#[derive(Debug, Default)]
pub(crate) struct ServiceEndpoints {
    /// Discovery runs; until it has listed once, nothing is published.
    enabled: bool,
    synced: bool,
    /// Trust domain of the SPIFFE identities derived from service accounts.
    trust_domain: String,
    /// `name.namespace` → sorted, de-duplicated endpoints (on the default port).
    services: BTreeMap<String, Vec<Endpoint>>,
    /// (`name.namespace`, port name) → the endpoints on that named port.
    named: BTreeMap<(String, String), Vec<Endpoint>>,
    /// Every Service's ports, by namespace and name.
    service_ports: Arc<BTreeMap<(String, String), ServiceInfo>>,
    /// The Services have been listed once.
    services_synced: bool,
    /// The Services cannot be read (RBAC): their ports are unknown, not absent.
    services_unreadable: bool,
    /// Service account of each pod seen (`None`: the pod could not be read).
    accounts: HashMap<PodRef, Option<String>>,
}

impl ServiceEndpoints {
    /// Discovery that must list before anything is published.
    pub(crate) fn enabled(trust_domain: &str) -> Self {
        Self {
            enabled: true,
            trust_domain: trust_domain.to_string(),
            ..Self::default()
        }
    }

    /// Pods of ready endpoints whose service account is not known yet.
    fn unknown_pods(&self) -> Vec<PodRef> {
        let mut pods: Vec<PodRef> = self
            .services
            .values()
            .flatten()
            .filter_map(|e| e.pod.clone())
            .filter(|p| !self.accounts.contains_key(p))
            .collect();
        pods.sort();
        pods.dedup();
        pods
    }

    /// The SPIFFE identity shared by every endpoint, if they share one.
    fn identity_of(&self, endpoints: &[Endpoint]) -> Option<String> {
        let mut accounts = endpoints.iter().map(|e| {
            let pod = e.pod.as_ref()?;
            let sa = self.accounts.get(pod)?.as_ref()?;
            Some((pod.0.as_str(), sa.as_str()))
        });
        let first = accounts.next()??;
        if accounts.all(|a| a == Some(first)) {
            Some(format!(
                "spiffe://{}/ns/{}/sa/{}",
                self.trust_domain, first.0, first.1
            ))
        } else {
            None
        }
    }

    /// Nothing to wait for: discovery is off, or it has listed once.
    pub(crate) fn is_ready(&self) -> bool {
        !self.enabled || (self.synced && self.services_synced)
    }

    /// Whether the Services have been listed once (or found unreadable).
    pub(crate) fn services_known(&self) -> bool {
        self.services_synced
    }

    /// Every Service's ports (shared, cheap to clone); `None` when they cannot be read.
    pub(crate) fn service_ports(&self) -> Option<Arc<BTreeMap<(String, String), ServiceInfo>>> {
        (!self.services_unreadable).then(|| self.service_ports.clone())
    }

    /// The Services cannot be read: discovery goes on without their ports.
    fn services_unreadable(&mut self) {
        self.services_unreadable = true;
        self.services_synced = true;
    }

    /// Replaces the Services from their reflector's store; `true` if any port changed.
    pub(crate) fn sync_services(&mut self, services: &[Arc<Service>]) -> bool {
        let mut ports = BTreeMap::new();
        for svc in services {
            let (Some(ns), Some(name)) = (&svc.metadata.namespace, &svc.metadata.name) else {
                continue;
            };
            let info = ServiceInfo {
                ports: svc
                    .spec
                    .as_ref()
                    .and_then(|s| s.ports.as_ref())
                    .into_iter()
                    .flatten()
                    .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                    .map(|p| ServicePortInfo {
                        name: p.name.clone().unwrap_or_default(),
                        port: p.port,
                    })
                    .collect(),
            };
            ports.insert((ns.clone(), name.clone()), info);
        }
        let changed = !self.services_synced || *self.service_ports != ports;
        self.services_synced = true;
        if changed {
            self.service_ports = Arc::new(ports);
        }
        changed
    }

    /// The ready endpoints of backend `svc` (`name.namespace`) on `port`.
    fn endpoints_for(&self, svc: &str, port: Option<&ServicePort>) -> Option<&Vec<Endpoint>> {
        let by_name = |name: &str| self.named.get(&(svc.to_string(), name.to_string()));
        match port {
            None => self.services.get(svc),
            Some(ServicePort::Name(name)) => by_name(name),
            Some(ServicePort::Number(n)) => {
                let (name, ns) = svc.split_once('.')?;
                let info = self
                    .service_ports
                    .get(&(ns.to_string(), name.to_string()))?;
                let port = info
                    .ports
                    .iter()
                    .find(|p| i64::from(p.port) == i64::from(*n))?;
                if info.ports.len() == 1 {
                    self.services.get(svc)
                } else {
                    by_name(&port.name)
                }
            }
        }
    }

    /// Replaces everything from the reflector's store; `true` if anything changed.
    pub(crate) fn sync(&mut self, slices: &[Arc<EndpointSlice>]) -> bool {
        let mut services: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
        let mut named: BTreeMap<(String, String), Vec<Endpoint>> = BTreeMap::new();
        for slice in slices {
            let Some(ns) = &slice.metadata.namespace else {
                continue;
            };
            let Some(svc) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            let key = format!("{svc}.{ns}");
            let entry = services.entry(key.clone()).or_default();
            let ready: Vec<(&String, Option<PodRef>)> = slice
                .endpoints
                .iter()
                .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .filter_map(|ep| {
                    let addr = ep.addresses.first()?;
                    let pod = ep.target_ref.as_ref().and_then(|r| {
                        (r.kind.as_deref() == Some("Pod")).then_some((
                            r.namespace.clone().unwrap_or_else(|| ns.clone()),
                            r.name.clone()?,
                            r.uid.clone().unwrap_or_default(),
                        ))
                    });
                    Some((addr, pod))
                })
                .collect();
            let on_port = |port: i32| {
                ready.iter().map(move |(addr, pod)| Endpoint {
                    address: if addr.contains(':') {
                        format!("[{addr}]:{port}")
                    } else {
                        format!("{addr}:{port}")
                    },
                    pod: pod.clone(),
                })
            };
            if let Some(port) = pick_port(slice) {
                entry.extend(on_port(port));
            }
            for p in slice.ports.as_deref().unwrap_or_default() {
                if let (Some(name), Some(port)) = (&p.name, p.port)
                    && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                {
                    named
                        .entry((key.clone(), name.clone()))
                        .or_default()
                        .extend(on_port(port));
                }
            }
        }
        for eps in services.values_mut().chain(named.values_mut()) {
            eps.sort();
            eps.dedup_by(|a, b| a.address == b.address);
        }
        let changed = !self.synced || services != self.services || named != self.named;
        self.synced = true;
        self.services = services;
        self.named = named;
        let live: std::collections::HashSet<&PodRef> = self
            .services
            .values()
            .flatten()
            .filter_map(|e| e.pod.as_ref())
            .collect();
        self.accounts.retain(|p, _| live.contains(p));
        changed
    }

    /// The set with every `service` backend rewritten to its ready endpoints.
    pub(crate) fn resolve(&self, set: PolicySet) -> Result<PolicySet, ConfigError> {
        if !self.enabled
            || !set
                .policies()
                .iter()
                .any(|p| p.spec.backends.values().any(|b| b.service.is_some()))
        {
            return Ok(set);
        }
        let mut policies = set.policies().to_vec();
        for p in &mut policies {
            for backend in p.spec.backends.values_mut() {
                let Some(svc) = &backend.service else {
                    continue;
                };
                if let Some(eps) = self
                    .endpoints_for(svc, backend.port.as_ref())
                    .filter(|e| !e.is_empty())
                {
                    backend.addresses = eps.iter().map(|e| e.address.clone()).collect();
                    backend.service = None;
                    backend.port = None;
                    if backend.identity.is_none() {
                        backend.identity = self.identity_of(eps);
                    }
                }
            }
        }
        // Validated already; weights translated from Gateway API may have any total.
        PolicySet::from_effective(policies)
    }
}

/// The port proxies dial: the only one, else `http`, else the lowest TCP port.
fn pick_port(slice: &EndpointSlice) -> Option<i32> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let tcp: Vec<_> = ports
        .iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| Some((p.name.as_deref().unwrap_or(""), p.port?)))
        .collect();
    if let [(_, port)] = tcp.as_slice() {
        return Some(*port);
    }
    tcp.iter()
        .find(|(name, _)| *name == "http")
        .or_else(|| tcp.iter().min_by_key(|(_, port)| *port))
        .map(|(_, port)| *port)
}

/// Runs the EndpointSlice reflector until `shutdown`, republishing whenever a
/// Service's ready endpoints change.
pub(crate) async fn watch_endpoints(
    client: Client,
    endpoints: Arc<Mutex<ServiceEndpoints>>,
    reload: impl Fn(),
    shutdown: watch::Receiver<bool>,
) {
    let (client, endpoints, reload) = (&client, &endpoints, &reload);
    super::reflect_async(
        Api::<EndpointSlice>::all(client.clone()),
        Writer::default(),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
        "EndpointSlice",
        shutdown,
        |slices| async move {
            let (changed, unknown) = {
                let mut eps = endpoints.lock().unwrap_or_else(|e| e.into_inner());
                (eps.sync(&slices), eps.unknown_pods())
            };
            let learned = !unknown.is_empty();
            for pod in unknown {
                // A failed read is not cached: the next event tries again.
                if let Some(account) = service_account(client, &pod).await {
                    endpoints
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .accounts
                        .insert(pod, account);
                }
            }
            if changed || learned {
                reload();
            }
        },
    )
    .await
}

/// Runs the Service reflector until `shutdown`, republishing whenever a Service's
/// ports change (backend `port`s and HTTPRoute parents are checked against them).
pub(crate) async fn watch_services(
    client: Client,
    endpoints: Arc<Mutex<ServiceEndpoints>>,
    reload: impl Fn(),
    shutdown: watch::Receiver<bool>,
) {
    // An older chart's RBAC may not grant Services: discovery then goes on without
    // their ports (a backend `port` number does not resolve) rather than never
    // becoming ready.
    let probe = Api::<Service>::all(client.clone())
        .list(&kube::api::ListParams::default().limit(1))
        .await;
    if let Err(kube::Error::Api(s)) = &probe
        && s.code == 403
    {
        tracing::warn!(
            "the control plane may not list Services (RBAC): backend port numbers and HTTPRoute ports cannot be checked"
        );
        endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .services_unreadable();
        reload();
        return;
    }
    super::reflect(
        Api::<Service>::all(client),
        Writer::default(),
        watcher::Config::default(),
        "Service",
        shutdown,
        |services| {
            let changed = endpoints
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sync_services(services);
            if changed {
                reload();
            }
        },
    )
    .await
}

/// The service account a pod runs as (`default` when its spec names none);
/// `Some(None)` when the pod is gone (or replaced), `None` when the API failed.
async fn service_account(client: &Client, pod: &PodRef) -> Option<Option<String>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.0);
    match api.get_opt(&pod.1).await {
        Ok(Some(p)) if pod.2.is_empty() || p.metadata.uid.as_deref() == Some(pod.2.as_str()) => {
            Some(Some(
                p.spec
                    .and_then(|s| s.service_account_name)
                    .unwrap_or_else(|| "default".to_string()),
            ))
        }
        Ok(_) => Some(None),
        Err(e) => {
            tracing::warn!(namespace = %pod.0, pod = %pod.1, error = %e, "cannot read an endpoint's pod; its identity stays unknown");
            None
        }
    }
}

#[cfg(test)]
mod port_tests {
    use serde_json::json;
    use sluice_config::PolicySet;

    use super::*;

    fn policy(port: Option<&str>) -> PolicySet {
        let port = port.map(|p| format!(", port: {p}")).unwrap_or_default();
        let text = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: p, namespace: shop }}\nspec:\n  host: p\n  backends:\n    b: {{ service: web.shop{port} }}\n  routes: [{{ name: all }}]\n"
        );
        PolicySet::from_files([("p.yaml", text.as_str())]).unwrap()
    }

    fn discovery() -> ServiceEndpoints {
        let mut eps = ServiceEndpoints::enabled("cluster.local");
        let slice: EndpointSlice = serde_json::from_value(json!({
            "addressType": "IPv4",
            "metadata": { "name": "web-1", "namespace": "shop",
                          "labels": { "kubernetes.io/service-name": "web" } },
            "ports": [{ "name": "http", "port": 8000 }, { "name": "admin", "port": 9000 }],
            "endpoints": [{ "addresses": ["10.0.0.5"] }],
        }))
        .unwrap();
        let service: Service = serde_json::from_value(json!({
            "metadata": { "name": "web", "namespace": "shop" },
            "spec": { "ports": [{ "name": "http", "port": 80 }, { "name": "admin", "port": 9090 }] },
        }))
        .unwrap();
        eps.sync(&[Arc::new(slice)]);
        eps.sync_services(&[Arc::new(service)]);
        eps
    }

    fn addresses(set: &PolicySet) -> Vec<String> {
        set.policies()[0].spec.backends["b"].addresses.clone()
    }

    #[test]
    fn a_backend_port_picks_the_slice_port_of_that_service_port() {
        let eps = discovery();
        assert!(eps.is_ready());
        // By number (through the Service's port names) and by name.
        assert_eq!(
            addresses(&eps.resolve(policy(Some("9090"))).unwrap()),
            ["10.0.0.5:9000"]
        );
        assert_eq!(
            addresses(&eps.resolve(policy(Some("admin"))).unwrap()),
            ["10.0.0.5:9000"]
        );
        assert_eq!(
            addresses(&eps.resolve(policy(Some("80"))).unwrap()),
            ["10.0.0.5:8000"]
        );
        // Without a port: `http`, as before.
        assert_eq!(
            addresses(&eps.resolve(policy(None)).unwrap()),
            ["10.0.0.5:8000"]
        );
        // A port the Service lacks: no endpoints, the backend keeps its service.
        let set = eps.resolve(policy(Some("81"))).unwrap();
        let b = &set.policies()[0].spec.backends["b"];
        assert!(b.addresses.is_empty());
        assert_eq!(b.service.as_deref(), Some("web.shop"));
    }
}
