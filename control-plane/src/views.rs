//! One snapshot per policy schema version, so a new field used by one policy never
//! freezes the proxies that only accept an older schema.
//!
//! For every schema version this build writes, the published set is turned into
//! what proxies of that version receive:
//!
//! - each policy becomes its [`proxy_view`]: `rollout` removed, the effective
//!   weights in place (the [`EffectiveWeights`] hook the rollout engine drives;
//!   [`sluice_config::FileWeights`] until then);
//! - a policy that needs a newer schema than the view's is *held*: the view keeps
//!   the last version of it that the older schema expressed (remembered from earlier
//!   publications), or, if there never was one, *withholds* it;
//! - the view's snapshot carries the lowest schema version that expresses what it
//!   holds, and its version is the content hash of exactly those bytes (canonical
//!   policies and effective weights), so every change a proxy receives is a version.
//!
//! Held and withheld policies are named in `/policies` (`schemaViews`) and in the
//! `sluice_cp_policies_held_back` metric. The memory of last expressible versions
//! lives in the control plane's memory: after a restart, a policy that has changed
//! to need a newer schema is withheld from older proxies until it is expressible
//! again (those proxies keep what they have only while their stream stays up).

use std::collections::HashMap;

use serde::Serialize;
use sluice_api::pb;
use sluice_config::{
    EffectiveWeights, PolicySet, RoutePolicy, SCHEMA_VERSIONS, proxy_view, required_version,
};

/// A policy an older schema's view does not carry as it is now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldBack {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// The schema version its current form needs.
    pub needs: u32,
    /// `held` (its last expressible version is served) or `withheld` (none exists).
    pub state: &'static str,
}

/// What proxies accepting at most one schema version receive.
#[derive(Clone, Debug)]
pub(crate) struct View {
    /// The newest schema version of the proxies this view is for.
    pub(crate) schema: u32,
    /// Ready to send; its `schema_version` is the lowest that expresses it.
    pub(crate) snapshot: pb::Snapshot,
    /// `snapshot` encoded once for every stream, without its `schema_version`, which
    /// differs by proxy and each stream adds (see [`crate::push::Outgoing`]).
    pub(crate) encoded: bytes::Bytes,
    /// Policies carried in an older form, or not at all.
    pub(crate) held_back: Vec<HeldBack>,
}

/// Last expressible form of each policy per schema version, across publications.
#[derive(Debug, Default)]
pub(crate) struct ViewMemory {
    last: HashMap<(u32, String), RoutePolicy>,
}

fn key(p: &RoutePolicy) -> String {
    format!("{}/{}", p.metadata.namespace_or_default(), p.metadata.name)
}

/// Builds one view per schema version this build writes, oldest first.
pub(crate) fn build(
    set: &PolicySet,
    metas: &[pb::PolicyMeta],
    effective: &dyn EffectiveWeights,
    memory: &mut ViewMemory,
) -> Vec<View> {
    let current: Vec<RoutePolicy> = set
        .policies()
        .iter()
        .map(|p| proxy_view(p, effective))
        .collect();
    SCHEMA_VERSIONS
        .iter()
        .filter_map(|&schema| {
            let mut carried = Vec::with_capacity(current.len());
            let mut held_back = Vec::new();
            let mut held = Vec::new();
            for p in &current {
                let needs = required_version(p);
                let k = key(p);
                if needs <= schema {
                    memory.last.insert((schema, k), p.clone());
                    carried.push(p.clone());
                } else if let Some(old) = memory.last.get(&(schema, k.clone())) {
                    held.push(old.clone());
                    held_back.push(HeldBack {
                        policy: k,
                        needs,
                        state: "held",
                    });
                } else {
                    held_back.push(HeldBack {
                        policy: k,
                        needs,
                        state: "withheld",
                    });
                }
            }
            let with_held = carried.iter().chain(&held).cloned().collect();
            let view_set = match PolicySet::from_effective(with_held) {
                Ok(s) => s,
                Err(e) => {
                    // A held form can clash with today's policies (a host taken over):
                    // then the older proxies get today's policies without it.
                    tracing::warn!(schema, error = %e, "held policies clash with the current set; withholding them");
                    for h in &mut held_back {
                        h.state = "withheld";
                    }
                    match PolicySet::from_effective(carried) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(schema, error = %e, "no snapshot for this schema version");
                            return None;
                        }
                    }
                }
            };
            let names: Vec<String> = view_set.policies().iter().map(key).collect();
            let policies = metas
                .iter()
                .filter(|m| {
                    let ns = if m.namespace.is_empty() {
                        "default"
                    } else {
                        &m.namespace
                    };
                    names.contains(&format!("{ns}/{}", m.name))
                })
                .cloned()
                .collect();
            let snapshot = pb::Snapshot {
                version: view_set.hash().to_string(),
                schema_version: view_set.schema_version(),
                canonical: bytes::Bytes::copy_from_slice(view_set.canonical_bytes()),
                policies,
                route_traffic: None,
            };
            let encoded = crate::push::encode_shared(&snapshot);
            Some(View {
                schema,
                snapshot,
                encoded,
                held_back,
            })
        })
        .collect()
}

/// The schema versions a proxy accepts, from its `Hello`.
pub(crate) fn accepted(hello: &pb::Hello) -> Vec<u32> {
    if hello.accepted_schema_versions.is_empty() {
        vec![hello.schema_version]
    } else {
        hello.accepted_schema_versions.clone()
    }
}

/// The view a proxy accepting `accepted` is served: the newest schema it accepts, else
/// the newest of all.
pub(crate) fn view_for<'a>(views: &'a [View], accepted: &[u32]) -> Option<&'a View> {
    views
        .iter()
        .rev()
        .find(|v| accepted.contains(&v.schema))
        .or(views.last())
}

/// The snapshot for a proxy accepting `accepted`: the view of the newest schema it
/// accepts, labelled with the lowest accepted version that expresses it. A proxy
/// accepting none of ours gets the newest view, and its NACK says why.
#[cfg(test)]
pub(crate) fn snapshot_for(views: &[View], accepted: &[u32]) -> Option<pb::Snapshot> {
    let view = view_for(views, accepted)?;
    let mut snapshot = view.snapshot.clone();
    snapshot.schema_version = label_for(view, accepted);
    Some(snapshot)
}

/// The schema version `view`'s snapshot is labelled with for a proxy accepting
/// `accepted`: the lowest accepted version that expresses it, else its own.
pub(crate) fn label_for(view: &View, accepted: &[u32]) -> u32 {
    let own = view.snapshot.schema_version;
    accepted
        .iter()
        .copied()
        .filter(|a| *a >= own)
        .min()
        .unwrap_or(own)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_config::{FileWeights, SCHEMA_V1, SCHEMA_VERSION, parse_policies};

    fn policy(name: &str, host: &str, hash: &str, timeout: &str) -> String {
        format!(
            "apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: {name}, namespace: shop }}
spec:
  host: {host}
  backends:
    v1: {{ addresses: [\"127.0.0.1:9101\"] }}
    v2: {{ addresses: [\"127.0.0.1:9102\"] }}
  routes:
    - name: all
      timeout: {timeout}
      split:
        - weights: {{ v1: 90, v2: 10 }}
          stickyBy: {{ header: x-user-id, hash: {hash} }}
"
        )
    }

    fn set(texts: &[String]) -> PolicySet {
        let mut all = Vec::new();
        for t in texts {
            all.extend(parse_policies("p.yaml", t).unwrap());
        }
        PolicySet::new(all).unwrap()
    }

    fn names(s: &pb::Snapshot) -> Vec<String> {
        PolicySet::from_canonical("s", &s.canonical)
            .unwrap()
            .policies()
            .iter()
            .map(|p| format!("{}:{}", p.metadata.name, p.spec.routes[0].timeout.unwrap()))
            .collect()
    }

    #[test]
    fn an_older_schema_keeps_the_last_expressible_form_of_a_policy() {
        let mut memory = ViewMemory::default();
        let first = set(&[
            policy("a", "a", "ordered", "1s"),
            policy("b", "b", "ordered", "1s"),
        ]);
        let views = build(&first, &[], &FileWeights, &mut memory);
        assert_eq!(views.len(), 2);
        // Without new fields both views are the same bytes and version.
        assert_eq!(views[0].snapshot.version, views[1].snapshot.version);
        assert_eq!(views[0].snapshot.version, first.hash());
        assert_eq!(views[0].snapshot.schema_version, SCHEMA_V1);

        // `a` turns on rendezvous (and a new timeout); `b` changes too.
        let second = set(&[
            policy("a", "a", "rendezvous", "2s"),
            policy("b", "b", "ordered", "3s"),
        ]);
        let views = build(&second, &[], &FileWeights, &mut memory);
        let old = snapshot_for(&views, &[SCHEMA_V1]).unwrap();
        assert_eq!(old.schema_version, SCHEMA_V1);
        assert_eq!(names(&old), ["a:1s", "b:3s"]);
        assert_eq!(
            views[0].held_back,
            [HeldBack {
                policy: "shop/a".into(),
                needs: SCHEMA_VERSION,
                state: "held"
            }]
        );
        let new = snapshot_for(&views, &[SCHEMA_V1, SCHEMA_VERSION]).unwrap();
        assert_eq!(new.schema_version, SCHEMA_VERSION);
        assert_eq!(names(&new), ["a:2s", "b:3s"]);
        assert!(views[1].held_back.is_empty());
        // A proxy accepting only the new schema gets the new view labelled so.
        assert_eq!(
            snapshot_for(&views, &[SCHEMA_VERSION]).unwrap().version,
            new.version
        );
    }

    #[test]
    fn a_policy_never_expressible_in_an_older_schema_is_withheld() {
        let mut memory = ViewMemory::default();
        let only_new = set(&[
            policy("a", "a", "rendezvous", "1s"),
            policy("b", "b", "ordered", "1s"),
        ]);
        let views = build(&only_new, &[], &FileWeights, &mut memory);
        assert_eq!(names(&views[0].snapshot), ["b:1s"]);
        assert_eq!(views[0].held_back[0].state, "withheld");
        // A proxy from before the second wave says only `schema_version: 1`.
        let hello = pb::Hello {
            schema_version: SCHEMA_V1,
            ..Default::default()
        };
        assert_eq!(accepted(&hello), [SCHEMA_V1]);
    }
}
