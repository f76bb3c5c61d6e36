//! HTTPRoutes (Gateway API, v1) as policy input beside RoutePolicy objects.
//!
//! A reflector over every HTTPRoute and one over every ReferenceGrant feed
//! `GatewayRoutes`; the Services come from the endpoint discovery's reflector.
//! Each time the mesh's set is built, the HTTPRoutes are translated
//! ([`crate::gateway::translate()`]) and their policies join the RoutePolicies'.
//!
//! A host is defined either by a RoutePolicy or by HTTPRoutes: when both name one
//! host, the RoutePolicy keeps it and the HTTPRoutes' policies are left out, with
//! both names in the HTTPRoutes' status and in `/policies`.
//!
//! Without the HTTPRoute CRD the control plane runs as before: it says so once and
//! looks again every minute, so installing Gateway API later needs no restart.
//! Objects are read as `DynamicObject`s, so one malformed HTTPRoute is refused in
//! its own status and never stops the others.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;
use sluice_api::pb;
use sluice_config::RoutePolicy;

use crate::gateway::translate::{Key, policy_name};
use crate::gateway::{
    Cluster, ReferenceGrant, RouteObject, RouteVerdict, ServiceInfo, Translation, merged_parents,
    translate,
};
use crate::source::{FileView, PolicyView};

/// The API resource behind HTTPRoute objects.
pub(crate) fn httproute_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    )
}

/// The API resource behind ReferenceGrant objects.
pub(crate) fn reference_grant_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1beta1", "ReferenceGrant"),
        "referencegrants",
    )
}

/// One HTTPRoute as last seen.
#[derive(Clone, Debug)]
struct RouteState {
    object: RouteObject,
    /// `status.parents` as the object carries it.
    parents: Value,
    resource_version: Option<String>,
}

/// Every HTTPRoute and ReferenceGrant seen, and the last translation.
#[derive(Debug, Default)]
pub(crate) struct GatewayRoutes {
    /// `None` until the API has been asked; `Some(false)`: no HTTPRoute CRD.
    pub(crate) installed: Option<bool>,
    routes_synced: bool,
    grants_synced: bool,
    /// The Services have been listed once (or found unreadable): until then a parent or
    /// backend Service missing from `services` may only be not listed yet.
    services_known: bool,
    routes: BTreeMap<Key, RouteState>,
    grants: Vec<ReferenceGrant>,
    /// Every Service's ports; `None` when they cannot be read (references are then
    /// taken as written).
    services: Option<Arc<BTreeMap<Key, ServiceInfo>>>,
    translation: Translation,
    /// Content hash of each generated policy in force, by namespace and name.
    hashes: HashMap<Key, String>,
    /// Statuses written whose watch event has not come back yet.
    written: HashMap<Key, Value>,
    /// The last generation of each HTTPRoute that was in force at every Service
    /// parent: it stays in force while a later generation is refused.
    last_good: HashMap<Key, RouteObject>,
    /// Where `last_good` is kept (`<state-dir>/httproutes`), so that a restarted
    /// replica still serves it while the object's current generation is refused.
    state_dir: Option<PathBuf>,
}

/// Under `--state-dir`: one JSON file per HTTPRoute, its last accepted generation.
const STATE_SUBDIR: &str = "httproutes";

impl GatewayRoutes {
    /// No HTTPRoute seen yet; the last accepted generations kept in `state_dir` (if
    /// any) are read back.
    pub(crate) fn new(state_dir: Option<&Path>) -> Self {
        let state_dir = state_dir.map(|d| d.join(STATE_SUBDIR));
        let mut last_good = HashMap::new();
        if let Some(dir) = &state_dir {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let read = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        serde_json::from_slice::<RouteObject>(&b).map_err(|e| e.to_string())
                    });
                match read {
                    Ok(obj) => {
                        last_good.insert(obj.key(), obj);
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "saved HTTPRoute unreadable; ignoring it")
                    }
                }
            }
        }
        Self {
            last_good,
            state_dir,
            ..Self::default()
        }
    }

    fn state_file(&self, key: &Key) -> Option<PathBuf> {
        state_file(self.state_dir.as_deref(), key)
    }
}

fn state_file(dir: Option<&Path>, key: &Key) -> Option<PathBuf> {
    dir.map(|d| d.join(format!("{}.{}.json", key.0, key.1)))
}

/// Records `obj` as its route's last accepted generation, in `dir` too.
fn keep_good(last_good: &mut HashMap<Key, RouteObject>, dir: Option<&Path>, obj: &RouteObject) {
    let key = obj.key();
    if last_good.get(&key) == Some(obj) {
        return;
    }
    if let Some(path) = state_file(dir, &key) {
        let written = serde_json::to_vec(obj)
            .map_err(|e| e.to_string())
            .and_then(|bytes| sluice_api::write_atomic(&path, &bytes).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::warn!(file = %path.display(), error = %e, "cannot keep the accepted HTTPRoute");
        }
    }
    last_good.insert(key, obj.clone());
}

impl GatewayRoutes {
    /// Nothing to wait for: the CRD is absent, or everything has been listed once.
    pub(crate) fn is_ready(&self) -> bool {
        match self.installed {
            None => false,
            Some(false) => true,
            Some(true) => self.routes_synced && self.grants_synced && self.services_known,
        }
    }

    /// Whether the HTTPRoute CRD is installed (known once the API has been asked).
    pub(crate) fn set_installed(&mut self, installed: bool) {
        self.installed = Some(installed);
        if !installed {
            self.routes.clear();
            self.grants.clear();
        }
    }

    /// Takes in the Services' ports (from endpoint discovery): `None` while the Services
    /// have not been listed yet, which keeps every HTTPRoute verdict (and status) back.
    pub(crate) fn set_services(&mut self, known: Option<Option<Arc<BTreeMap<Key, ServiceInfo>>>>) {
        if let Some(services) = known {
            self.services = services;
            self.services_known = true;
        }
    }

    /// Takes in the HTTPRoute reflector's whole store.
    pub(crate) fn sync_routes(&mut self, objects: &[Arc<DynamicObject>]) {
        self.routes_synced = true;
        let mut routes = BTreeMap::new();
        for obj in objects {
            let (Some(ns), Some(name)) = (&obj.metadata.namespace, &obj.metadata.name) else {
                continue;
            };
            let key = (ns.clone(), name.clone());
            let parents = obj.data["status"]["parents"].clone();
            if self
                .routes
                .get(&key)
                .is_none_or(|old| old.parents != parents)
            {
                // Whatever we wrote has come back (or someone else wrote): trust the object.
                self.written.remove(&key);
            }
            routes.insert(
                key,
                RouteState {
                    object: RouteObject {
                        namespace: ns.clone(),
                        name: name.clone(),
                        generation: obj.metadata.generation,
                        created: obj
                            .metadata
                            .creation_timestamp
                            .as_ref()
                            .map(|t| t.0.to_string())
                            .unwrap_or_default(),
                        spec: obj.data.get("spec").cloned().unwrap_or(Value::Null),
                    },
                    parents,
                    resource_version: obj.metadata.resource_version.clone(),
                },
            );
        }
        self.written.retain(|k, _| routes.contains_key(k));
        let gone: Vec<Key> = self
            .last_good
            .keys()
            .filter(|k| !routes.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(path) = self.state_file(&key) {
                let _ = std::fs::remove_file(path);
            }
            self.last_good.remove(&key);
        }
        self.routes = routes;
    }

    /// Takes in the ReferenceGrant reflector's whole store.
    pub(crate) fn sync_grants(&mut self, objects: &[Arc<DynamicObject>]) {
        self.grants_synced = true;
        self.grants = objects
            .iter()
            .filter_map(|o| {
                let v = serde_json::to_value(o.as_ref()).ok()?;
                ReferenceGrant::from_object(&v)
            })
            .collect();
    }

    /// Translates every HTTPRoute; returns the policies to serve. `taken` maps each
    /// host and each `namespace/name` governed by a RoutePolicy to that policy.
    pub(crate) fn translate(
        &mut self,
        taken_hosts: &HashMap<String, Key>,
        taken_names: &HashSet<Key>,
    ) -> Vec<(RoutePolicy, pb::PolicyMeta)> {
        let mut t = self.translate_keeping_last_good();
        let mut refused = Vec::new();
        for sp in &t.services {
            let routes = sp
                .routes
                .iter()
                .map(|k| format!("{}/{}", k.0, k.1))
                .collect::<Vec<_>>()
                .join(", ");
            for p in std::slice::from_ref(&sp.policy) {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                if let Some((host, rp)) = p
                    .spec
                    .hosts()
                    .find_map(|h| taken_hosts.get(h).map(|rp| (h, rp)))
                {
                    refused.push((
                        sp.service.clone(),
                        format!(
                            "host {host:?} is defined both by RoutePolicy {}/{} and by HTTPRoutes {routes}; a host is defined by one or the other, and the RoutePolicy keeps it",
                            rp.0, rp.1
                        ),
                    ));
                    break;
                }
                if taken_names.contains(&(ns.clone(), p.metadata.name.clone())) {
                    refused.push((
                        sp.service.clone(),
                        format!(
                            "RoutePolicy {ns}/{} exists, so the policy generated from HTTPRoutes {routes} cannot take that name",
                            p.metadata.name
                        ),
                    ));
                    break;
                }
            }
        }
        for (service, message) in refused {
            tracing::warn!(namespace = %service.0, service = %service.1, %message, "HTTPRoutes refused");
            t.refuse_service(&service, &message);
        }
        let mut out = Vec::new();
        self.hashes.clear();
        for sp in &t.services {
            let source = format!(
                "httproute/{}",
                sp.routes
                    .iter()
                    .map(|k| format!("{}/{}", k.0, k.1))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            for p in std::slice::from_ref(&sp.policy) {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let hash = sluice_config::PolicySet::from_effective(vec![p.clone()])
                    .map(|s| s.hash().to_string())
                    .unwrap_or_default();
                self.hashes
                    .insert((ns.clone(), p.metadata.name.clone()), hash);
                out.push((
                    p.clone(),
                    pb::PolicyMeta {
                        name: p.metadata.name.clone(),
                        namespace: ns,
                        source: source.clone(),
                    },
                ));
            }
        }
        self.translation = t;
        out
    }

    /// Translates the HTTPRoutes as they are; a route refused there whose last
    /// accepted generation still translates is served in that generation, with the
    /// refusal of the new one (and the generation kept) as its verdict.
    fn translate_keeping_last_good(&mut self) -> Translation {
        let cluster = Cluster {
            services: self.services.as_deref(),
            grants: &self.grants,
        };
        let current: Vec<RouteObject> = self.routes.values().map(|r| r.object.clone()).collect();
        let first = translate(&current, cluster);
        let mut kept = Vec::new();
        let objects: Vec<RouteObject> = current
            .into_iter()
            .map(|obj| {
                let key = obj.key();
                match first.verdicts.get(&key) {
                    Some(v) if v.parents.iter().all(|p| p.problems.is_empty()) => {
                        keep_good(&mut self.last_good, self.state_dir.as_deref(), &obj);
                        obj
                    }
                    Some(_) => match self.last_good.get(&key) {
                        Some(good) => {
                            kept.push(key);
                            good.clone()
                        }
                        None => obj,
                    },
                    None => obj,
                }
            })
            .collect();
        if kept.is_empty() {
            return first;
        }
        let mut t = translate(&objects, cluster);
        for key in kept {
            let Some(mut verdict) = first.verdicts.get(&key).cloned() else {
                continue;
            };
            // (If the last accepted generation no longer translates either, it is
            // out like any refused route.)
            let good = t.verdicts.get(&key);
            if good.is_some_and(|g| g.parents.iter().all(|p| p.problems.is_empty())) {
                verdict.kept_generation = good.and_then(|g| g.generation);
            }
            t.verdicts.insert(key, verdict);
        }
        t
    }

    /// The generated policy (`namespace/name`) an HTTPRoute's parent is in force as.
    fn policy_of(&self, route: &Key, parent: usize) -> Option<String> {
        let v = self.translation.verdicts.get(route)?;
        let p = v.parents.iter().find(|p| p.index == parent)?;
        if !p.problems.is_empty() {
            return None;
        }
        Some(format!("{}/{}", p.service.0, policy_name(&p.service.1)))
    }

    /// HTTPRoutes whose `status.parents` should change: the whole list to write,
    /// and the resourceVersion it is about.
    pub(crate) fn pending_statuses(&self, now: &str) -> Vec<(Key, Value, Option<String>)> {
        if !self.is_ready() {
            return Vec::new();
        }
        // A route that no longer names a Service keeps no entry of Sluice's.
        let none = RouteVerdict::default();
        self.routes
            .iter()
            .filter_map(|(key, state)| {
                let verdict = self.translation.verdicts.get(key).unwrap_or(&none);
                let have = self.written.get(key).unwrap_or(&state.parents);
                let want = merged_parents(have, verdict, |i| self.policy_of(key, i), now);
                let empty = |v: &Value| v.is_null() || v.as_array().is_some_and(|a| a.is_empty());
                let same = *have == want || (empty(have) && empty(&want));
                (!same).then(|| (key.clone(), want, state.resource_version.clone()))
            })
            .collect()
    }

    /// Records a status write until its watch event comes back.
    pub(crate) fn mark_written(&mut self, key: Key, parents: Value) {
        if self.routes.contains_key(&key) {
            self.written.insert(key, parents);
        }
    }

    /// The generated policies in force, for `/policies`.
    pub(crate) fn policy_views(&self) -> Vec<PolicyView> {
        self.translation
            .services
            .iter()
            .flat_map(|sp| {
                let file = format!(
                    "httproute/{}",
                    sp.routes
                        .iter()
                        .map(|k| format!("{}/{}", k.0, k.1))
                        .collect::<Vec<_>>()
                        .join(",")
                );
                std::iter::once(&sp.policy).map(move |p| {
                    let ns = p.metadata.namespace.clone().unwrap_or_default();
                    PolicyView {
                        file_version: self
                            .hashes
                            .get(&(ns.clone(), p.metadata.name.clone()))
                            .cloned()
                            .unwrap_or_default(),
                        name: p.metadata.name.clone(),
                        namespace: ns,
                        host: p.spec.host.clone(),
                        aliases: p.spec.aliases.clone(),
                        file: file.clone(),
                        file_error: None,
                    }
                })
            })
            .collect()
    }

    /// Every HTTPRoute Sluice serves, for `/policies` (in the `files` list), with
    /// why it is refused where it is.
    pub(crate) fn file_views(&self) -> Vec<FileView> {
        self.translation
            .verdicts
            .iter()
            .map(|(key, v)| {
                let errors: Vec<String> = v
                    .parents
                    .iter()
                    .flat_map(|p| {
                        p.problems.iter().map(move |pr| {
                            format!("parent Service {}/{}: {pr}", p.service.0, p.service.1)
                        })
                    })
                    .collect();
                let policies: Vec<String> = v
                    .parents
                    .iter()
                    .filter(|p| p.problems.is_empty() || v.kept_generation.is_some())
                    .map(|p| format!("{}/{}", p.service.0, policy_name(&p.service.1)))
                    .collect();
                FileView {
                    file: format!("httproute/{}/{}", key.0, key.1),
                    // The content hash of the (first) generated policy it is part of.
                    version: v
                        .parents
                        .iter()
                        .filter(|p| p.problems.is_empty() || v.kept_generation.is_some())
                        .find_map(|p| {
                            self.hashes
                                .get(&(p.service.0.clone(), policy_name(&p.service.1)))
                                .cloned()
                        }),
                    from_state: false,
                    loaded_at_unix_ms: None,
                    error: (!errors.is_empty()).then(|| errors.join("\n")),
                    error_at_unix_ms: None,
                    policies,
                }
            })
            .collect()
    }
}

/// The time a condition changes, as Kubernetes writes it (whole seconds, UTC).
pub(crate) fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    now.round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or(now)
        .to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn route(generation: i64, matches: Value) -> Arc<DynamicObject> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": { "name": "r", "namespace": "mesh", "generation": generation,
                              "creationTimestamp": "2026-01-01T00:00:00Z" },
                "spec": {
                    "parentRefs": [{ "group": "", "kind": "Service", "name": "echo" }],
                    "rules": [{ "matches": matches,
                                "backendRefs": [{ "name": "echo-v1", "port": 8080 }] }],
                },
            }))
            .unwrap(),
        )
    }

    /// A replica that has listed everything (Services unreadable: references as written).
    fn replica(dir: &Path, routes: &[Arc<DynamicObject>]) -> GatewayRoutes {
        let mut g = GatewayRoutes::new(Some(dir));
        g.set_installed(true);
        g.set_services(Some(None));
        g.sync_grants(&[]);
        g.sync_routes(routes);
        g
    }

    fn served_paths(g: &mut GatewayRoutes) -> Vec<Value> {
        g.translate(&HashMap::new(), &HashSet::new())
            .iter()
            .flat_map(|(p, _)| &p.spec.routes)
            .map(|r| serde_json::to_value(&r.matches).unwrap())
            .collect()
    }

    #[test]
    fn a_restarted_replica_keeps_serving_the_last_accepted_generation() {
        let state = tempfile::tempdir().unwrap();
        let good = json!([{ "path": { "type": "PathPrefix", "value": "/v1" } }]);
        let mut first = replica(state.path(), &[route(1, good.clone())]);
        let accepted = served_paths(&mut first);
        assert_eq!(accepted.len(), 1);
        let file = state.path().join("httproutes").join("mesh.r.json");
        assert!(file.exists());

        // Restarted while generation 2 is refused (a RegularExpression match): the
        // saved generation 1 is served, and the status says so.
        let broken = json!([{ "path": { "type": "RegularExpression", "value": "/v.*" } }]);
        let mut again = replica(state.path(), &[route(2, broken)]);
        assert_eq!(served_paths(&mut again), accepted);
        let (_, parents, _) = again.pending_statuses("2026-01-02T00:00:00Z").remove(0);
        let message = parents[0]["conditions"][0]["message"].as_str().unwrap();
        assert!(
            message.ends_with("(generation 1 stays in force)"),
            "{message}"
        );

        // Deleted while the replica was down: forgotten, file and all.
        let mut third = replica(state.path(), &[]);
        assert!(served_paths(&mut third).is_empty());
        assert!(!file.exists());
    }
}
