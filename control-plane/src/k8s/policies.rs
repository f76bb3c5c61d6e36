//! RoutePolicy objects as the policy source: a reflector over the API, the same
//! validator as files, the verdict written back to each object's `status`.
//!
//! Objects are read as `DynamicObject`s, not as the typed resource: a typed watch
//! would fail to decode an object whose spec the validator refuses (a duration
//! like `2x`), and one such object must not stop the others from loading. Each
//! object's spec is turned back into a policy document (YAML) and handed to
//! [`sluice_config::parse_policies`], so objects and files get exactly the same
//! verdicts; the synthesized text has no meaning for the user, so messages about
//! objects carry field paths (`spec.routes[0].retry.attempts: ...`) without
//! positions.
//!
//! Like files, a refused generation leaves the object's last accepted one in
//! force, and with a state directory the last accepted version of every object
//! is kept in `<state-dir>/routepolicies/<namespace>.<name>.yaml`, so a replica
//! restarting while an object is broken still serves its last good version. Two objects governing the same host: the older one (by creation time,
//! then namespace and name) wins and the other is refused with the reason.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use kube::api::{ApiResource, DynamicObject};
use serde_json::{Value, json};
use sluice_api::pb;
use sluice_config::{
    API_VERSION, ConfigError, KIND, PolicySet, RolloutStatus, RoutePolicy, RoutePolicyResource,
    RoutePolicyStatus,
};

use crate::k8s::httproutes::GatewayRoutes;
use crate::rollout::RolloutId;
use crate::source::{FileView, PolicyView};

/// `namespace`, `name`.
pub(crate) type ObjectKey = (String, String);

/// The API resource behind `RoutePolicy` objects.
pub(crate) fn api_resource() -> ApiResource {
    ApiResource::erase::<RoutePolicyResource>(&())
}

/// Validates one object's spec as a policy document named `namespace/name`, within
/// `limits` like a file (the API's JSON has no aliases, but its size, depth and
/// routes are bounded the same way).
///
/// The error is the validator's messages, one per line, each `path: message`.
pub fn validate_object(
    namespace: &str,
    name: &str,
    spec: &Value,
    limits: &sluice_config::Limits,
) -> Result<RoutePolicy, String> {
    let doc = json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    });
    let text = serde_yaml::to_string(&doc).map_err(|e| format!("spec: {e}"))?;
    let label = format!("routepolicy/{namespace}/{name}");
    match sluice_config::parse_policies_with(&label, &text, limits) {
        Ok(mut policies) if policies.len() == 1 => Ok(policies.remove(0)),
        Ok(_) => Err("spec: expected exactly one policy".to_string()),
        Err(e) => Err(field_messages(&e)),
    }
}

/// The content hash of one policy on its own (what its status reports).
fn single_hash(policy: &RoutePolicy) -> String {
    PolicySet::new(vec![policy.clone()])
        .map(|s| s.hash().to_string())
        .unwrap_or_default()
}

/// The validator's diagnostics as `path: message` lines (positions left out).
fn field_messages(e: &ConfigError) -> String {
    e.diagnostics()
        .iter()
        .map(|d| {
            if d.path.is_empty() {
                d.message.clone()
            } else {
                format!("{}: {}", d.path, d.message)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Clone, Debug)]
struct Good {
    policy: RoutePolicy,
    hash: String,
    loaded_at: SystemTime,
}

#[derive(Clone, Debug, Default)]
struct ObjectState {
    generation: Option<i64>,
    created: String,
    /// The spec last validated, so an unchanged object is not validated again.
    spec: Value,
    good: Option<Good>,
    error: Option<String>,
    error_at: Option<SystemTime>,
    /// The status the object carries now.
    status: Option<RoutePolicyStatus>,
    /// The object's resourceVersion when last seen: a status write names it, so
    /// a verdict on a version that has since changed is refused (409), not written.
    resource_version: Option<String>,
}

/// Every RoutePolicy object seen and what was concluded about it.
#[derive(Debug, Default)]
pub(crate) struct KubePolicies {
    objects: BTreeMap<ObjectKey, ObjectState>,
    /// Objects left out because another one governs the same host.
    conflicts: HashMap<ObjectKey, String>,
    /// The initial list is complete; nothing is published before.
    synced: bool,
    /// Statuses written whose watch event has not come back yet.
    written: HashMap<ObjectKey, RoutePolicyStatus>,
    /// Where last accepted versions are kept, if anywhere.
    state_dir: Option<PathBuf>,
    /// Last accepted versions restored from the state directory, not yet seen
    /// in the API.
    saved: HashMap<ObjectKey, Good>,
    /// Bounds on each object and on the set of them.
    limits: sluice_config::Limits,
    /// HTTPRoutes (Gateway API), translated into policies beside these.
    pub(crate) gateway: Box<GatewayRoutes>,
}

/// Subdirectory of the state directory holding last accepted objects.
const STATE_SUBDIR: &str = "routepolicies";

impl KubePolicies {
    /// Policies from the API, keeping last accepted versions in `state_dir`.
    pub(crate) fn new(state_dir: Option<&Path>, limits: sluice_config::Limits) -> Self {
        let mut saved = HashMap::new();
        if let Some(dir) = state_dir {
            let dir = dir.join(STATE_SUBDIR);
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let Ok(bytes) = sluice_api::read_policy_file(&path, limits.max_file_bytes) else {
                    continue;
                };
                match sluice_config::parse_policy_bytes(
                    &path.display().to_string(),
                    &bytes,
                    &limits,
                ) {
                    Ok(mut p) if p.len() == 1 => {
                        let policy = p.remove(0);
                        let key = (
                            policy.metadata.namespace.clone().unwrap_or_default(),
                            policy.metadata.name.clone(),
                        );
                        let hash = single_hash(&policy);
                        saved.insert(
                            key,
                            Good {
                                policy,
                                hash,
                                loaded_at: SystemTime::now(),
                            },
                        );
                    }
                    _ => {
                        tracing::warn!(file = %path.display(), "saved RoutePolicy no longer validates; ignoring it")
                    }
                }
            }
        }
        Self {
            state_dir: state_dir.map(|d| d.join(STATE_SUBDIR)),
            gateway: Box::new(GatewayRoutes::new(state_dir)),
            saved,
            limits,
            ..Self::default()
        }
    }

    fn state_file(&self, key: &ObjectKey) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join(format!("{}.{}.yaml", key.0, key.1)))
    }

    /// Takes in the reflector's whole store; validates new and changed objects.
    /// Returns how many were refused in this pass.
    pub(crate) fn sync(&mut self, objects: &[Arc<DynamicObject>]) -> usize {
        self.synced = true;
        let mut failures = 0;
        let mut present = BTreeMap::new();
        for obj in objects {
            let (Some(ns), Some(name)) = (&obj.metadata.namespace, &obj.metadata.name) else {
                continue;
            };
            let key = (ns.clone(), name.clone());
            let mut state = self.objects.remove(&key).unwrap_or_default();
            let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
            state.resource_version = obj.metadata.resource_version.clone();
            let status = obj
                .data
                .get("status")
                .and_then(|s| serde_json::from_value::<RoutePolicyStatus>(s.clone()).ok());
            if status != state.status {
                // Whatever we wrote has come back (or someone else wrote): trust the object.
                self.written.remove(&key);
                state.status = status;
            }
            state.created = obj
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            let fresh = state.good.is_none() && state.error.is_none();
            if fresh && let Some(good) = self.saved.remove(&key) {
                state.good = Some(good);
            }
            if fresh || spec != state.spec || obj.metadata.generation != state.generation {
                state.generation = obj.metadata.generation;
                state.spec = spec;
                match validate_object(ns, name, &state.spec, &self.limits) {
                    Ok(policy) => {
                        let hash = single_hash(&policy);
                        tracing::info!(namespace = %ns, %name, %hash, "RoutePolicy accepted");
                        if let Some(path) = self.state_file(&key)
                            && let Ok(text) = serde_yaml::to_string(&policy)
                            && let Err(e) = sluice_api::write_atomic(&path, text.as_bytes())
                        {
                            tracing::warn!(file = %path.display(), error = %e, "cannot save the last accepted RoutePolicy");
                        }
                        state.good = Some(Good {
                            policy,
                            hash,
                            loaded_at: SystemTime::now(),
                        });
                        state.error = None;
                        state.error_at = None;
                    }
                    Err(error) => {
                        failures += 1;
                        tracing::warn!(namespace = %ns, %name, %error, last_good = ?state.good.as_ref().map(|g| &g.hash), "RoutePolicy refused; keeping its last accepted version");
                        state.error = Some(error);
                        state.error_at = Some(SystemTime::now());
                    }
                }
            }
            present.insert(key, state);
        }
        self.written.retain(|k, _| present.contains_key(k));
        for gone in self.objects.keys().filter(|k| !present.contains_key(*k)) {
            if let Some(path) = self.state_file(gone) {
                let _ = std::fs::remove_file(path);
            }
        }
        // An object deleted while this replica was down is gone for good.
        for key in std::mem::take(&mut self.saved).into_keys() {
            if let Some(path) = self.state_file(&key) {
                let _ = std::fs::remove_file(path);
            }
        }
        self.objects = present;
        failures
    }

    pub(crate) fn is_synced(&self) -> bool {
        self.synced
    }

    /// The mesh's set from every object's version in force.
    pub(crate) fn build_set(&mut self) -> Option<(PolicySet, Vec<pb::PolicyMeta>)> {
        if !self.synced || !self.gateway.is_ready() {
            return None;
        }
        self.conflicts.clear();
        let mut order: Vec<(&ObjectKey, &ObjectState)> = self
            .objects
            .iter()
            .filter(|(_, s)| s.good.is_some())
            .collect();
        order.sort_by(|a, b| (&a.1.created, a.0).cmp(&(&b.1.created, b.0)));
        let mut hosts: HashMap<&str, &ObjectKey> = HashMap::new();
        let mut policies = Vec::new();
        let mut metas = Vec::new();
        for (key, state) in order {
            let Some(good) = &state.good else { continue };
            if let Some((host, other)) = good
                .policy
                .spec
                .hosts()
                .find_map(|h| hosts.get(h).map(|other| (h, other)))
            {
                let field = if host == good.policy.spec.host {
                    "spec.host"
                } else {
                    "spec.aliases"
                };
                self.conflicts.insert(
                    key.clone(),
                    format!(
                        "{field}: host {host:?} is already governed by RoutePolicy {}/{}",
                        other.0, other.1
                    ),
                );
                continue;
            }
            for h in good.policy.spec.hosts() {
                hosts.insert(h, key);
            }
            metas.push(pb::PolicyMeta {
                name: key.1.clone(),
                namespace: key.0.clone(),
                source: format!("routepolicy/{}/{}", key.0, key.1),
            });
            policies.push(good.policy.clone());
        }
        let taken_hosts: HashMap<String, ObjectKey> = hosts
            .iter()
            .map(|(h, k)| (h.to_string(), (*k).clone()))
            .collect();
        let taken_names: HashSet<ObjectKey> = self.objects.keys().cloned().collect();
        for (policy, meta) in self.gateway.translate(&taken_hosts, &taken_names) {
            policies.push(policy);
            metas.push(meta);
        }
        // Each RoutePolicy was validated on its own (weights summing to 100); the
        // translated policies keep Gateway API's proportions, of any total.
        match PolicySet::from_effective_with(policies, &self.limits) {
            Ok(set) => Some((set, metas)),
            Err(e) => {
                tracing::warn!(error = %e, "the mesh's policy set is refused; keeping the previous one");
                None
            }
        }
    }

    /// What each object's status should say.
    fn desired(
        &self,
        key: &ObjectKey,
        state: &ObjectState,
        rollouts: &BTreeMap<ObjectKey, Vec<RolloutStatus>>,
    ) -> RoutePolicyStatus {
        let error = state
            .error
            .clone()
            .or_else(|| self.conflicts.get(key).cloned());
        RoutePolicyStatus {
            observed_generation: state.generation,
            accepted: error.is_none() && state.good.is_some(),
            hash: state.good.as_ref().map(|g| g.hash.clone()),
            error,
            rollouts: rollouts.get(key).cloned().unwrap_or_default(),
        }
    }

    /// The rollout states the objects' statuses carry now (the elected replica's).
    pub(crate) fn rollout_statuses(&self) -> HashMap<RolloutId, RolloutStatus> {
        self.objects
            .iter()
            .flat_map(|(key, state)| {
                state.status.iter().flat_map(move |st| {
                    st.rollouts.iter().map(move |r| {
                        let id = RolloutId {
                            namespace: key.0.clone(),
                            policy: key.1.clone(),
                            route: r.route.clone(),
                        };
                        (id, r.clone())
                    })
                })
            })
            .collect()
    }

    /// Objects whose status differs from the verdict (and was not just written),
    /// with the resourceVersion the verdict is about.
    pub(crate) fn pending_statuses(
        &self,
        rollouts: &BTreeMap<ObjectKey, Vec<RolloutStatus>>,
    ) -> Vec<(ObjectKey, RoutePolicyStatus, Option<String>)> {
        if !self.synced {
            return Vec::new();
        }
        self.objects
            .iter()
            .filter_map(|(key, state)| {
                let want = self.desired(key, state, rollouts);
                let have = self.written.get(key).or(state.status.as_ref());
                (have != Some(&want)).then(|| (key.clone(), want, state.resource_version.clone()))
            })
            .collect()
    }

    pub(crate) fn mark_written(&mut self, key: ObjectKey, status: RoutePolicyStatus) {
        if self.objects.contains_key(&key) {
            self.written.insert(key, status);
        }
    }

    /// Every policy in force, for `/policies`.
    pub(crate) fn policy_views(&self) -> Vec<PolicyView> {
        let mut views: Vec<PolicyView> = self
            .objects
            .iter()
            .filter(|(k, _)| !self.conflicts.contains_key(*k))
            .filter_map(|(key, state)| {
                let good = state.good.as_ref()?;
                Some(PolicyView {
                    name: key.1.clone(),
                    namespace: key.0.clone(),
                    host: good.policy.spec.host.clone(),
                    aliases: good.policy.spec.aliases.clone(),
                    file: format!("routepolicy/{}/{}", key.0, key.1),
                    file_version: good.hash.clone(),
                    file_error: state.error.clone(),
                })
            })
            .collect();
        views.extend(self.gateway.policy_views());
        views
    }

    /// Every object, for `/policies` (in the `files` list).
    pub(crate) fn file_views(&self) -> Vec<FileView> {
        let mut views: Vec<FileView> = self
            .objects
            .iter()
            .map(|(key, state)| {
                let conflict = self.conflicts.get(key);
                FileView {
                    file: format!("routepolicy/{}/{}", key.0, key.1),
                    version: state.good.as_ref().map(|g| g.hash.clone()),
                    from_state: false,
                    loaded_at_unix_ms: state.good.as_ref().map(|g| crate::unix_ms(g.loaded_at)),
                    error: state.error.clone().or_else(|| conflict.cloned()),
                    error_at_unix_ms: state.error_at.map(crate::unix_ms),
                    policies: if conflict.is_some() || state.good.is_none() {
                        Vec::new()
                    } else {
                        vec![format!("{}/{}", key.0, key.1)]
                    },
                }
            })
            .collect();
        views.extend(self.gateway.file_views());
        views
    }
}
