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
//! Which port: a slice of a one-port Service has one; for several, the port named
//! `http`, else the TCP port with the lowest number. Endpoints count as ready
//! unless their `ready` condition is false (the API's rule for an absent one).
//! Identities are not derived from the pods: a backend that wants its peers'
//! certificates checked names `identity:` itself.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use sluice_config::{ConfigError, PolicySet};
use tokio::sync::watch;

use crate::Shared;

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The ready endpoints of every Service, as `host:port` strings.
#[derive(Debug, Default)]
pub(crate) struct ServiceEndpoints {
    /// Discovery runs; until it has listed once, nothing is published.
    enabled: bool,
    synced: bool,
    /// `name.namespace` → sorted, de-duplicated `ip:port`.
    services: BTreeMap<String, Vec<String>>,
}

impl ServiceEndpoints {
    /// Discovery that must list before anything is published.
    pub(crate) fn enabled() -> Self {
        Self {
            enabled: true,
            ..Self::default()
        }
    }

    /// Nothing to wait for: discovery is off, or it has listed once.
    pub(crate) fn is_ready(&self) -> bool {
        !self.enabled || self.synced
    }

    /// Replaces everything from the reflector's store; `true` if anything changed.
    pub(crate) fn sync(&mut self, slices: &[Arc<EndpointSlice>]) -> bool {
        let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
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
            let entry = services.entry(format!("{svc}.{ns}")).or_default();
            let Some(port) = pick_port(slice) else {
                continue;
            };
            for ep in &slice.endpoints {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                let Some(addr) = ep.addresses.first() else {
                    continue;
                };
                entry.push(if addr.contains(':') {
                    format!("[{addr}]:{port}")
                } else {
                    format!("{addr}:{port}")
                });
            }
        }
        for eps in services.values_mut() {
            eps.sort();
            eps.dedup();
        }
        let changed = !self.synced || services != self.services;
        self.synced = true;
        self.services = services;
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
                if let Some(eps) = self.services.get(svc).filter(|e| !e.is_empty()) {
                    backend.addresses = eps.clone();
                    backend.service = None;
                }
            }
        }
        PolicySet::new(policies)
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
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<EndpointSlice> = Api::all(client);
    let writer = Writer::default();
    let store = writer.as_reader();
    let config = watcher::Config::default().labels(SERVICE_NAME_LABEL);
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = shutdown.changed() => return,
        };
        match event {
            Some(Ok(
                watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_),
            )) => {
                let slices = store.state();
                let changed = shared
                    .endpoints
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .sync(&slices);
                if changed {
                    shared.reload();
                }
            }
            Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "EndpointSlice watch failed; retrying"),
            None => return,
        }
    }
}
