//! Schema versions, the second-wave fields this build enforces, and the proxies' view
//! of a policy.
//!
//! Schema 1 is the first wave's model. Schema 2 adds the second wave's fields
//! (`split[].rollout`, `stickyBy.hash`, `routes[].fallback`, `backends.*.slowStart`,
//! `backends.*.port`, `retry.backoff.min`, `rateLimit.scope`, `routes[].upgrades`,
//! `inbound.concurrency`) and weights of any total. A policy that uses none of them is
//! written exactly as schema 1 wrote it (defaults are left out of the canonical form),
//! so [`required_version`] tells the control plane the lowest version a proxy must
//! accept to take it.
//!
//! A field is accepted only once its capability is enforced: until then the
//! validator refuses it with `<field>: not supported yet`. [`Capability::enforced`]
//! is the one switch per field.

use indexmap::IndexMap;

use crate::{RateLimitScope, RoutePolicy, StickyHash};

/// The first-wave schema: what proxies from before the second wave accept.
pub const SCHEMA_V1: u32 = 1;

/// The newest policy schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

/// Every schema version this build accepts in a snapshot, oldest first.
pub const SCHEMA_VERSIONS: [u32; 2] = [SCHEMA_V1, SCHEMA_VERSION];

/// A second-wave field whose enforcement lands with its own capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Capability {
    /// `split[].rollout`: the control plane's rollout engine.
    Rollout,
    /// `stickyBy.hash: rendezvous`: weighted rendezvous hashing in the split layer.
    RendezvousHash,
    /// `routes[].fallback`: degradation to another backend or a static answer.
    Fallback,
    /// `backends.*.slowStart`: new endpoints ramp in.
    SlowStart,
    /// `backends.*.port`: the Service port of a `service` backend.
    ServicePort,
    /// `retry.backoff.min`: no retry sooner than this.
    BackoffMin,
    /// `rateLimit.scope: fleet`: one quota for all callers, counted in Redis.
    FleetRateLimit,
    /// `routes[].upgrades`: extra HTTP upgrade tokens a route lets through.
    Upgrades,
    /// `inbound.concurrency`: overload protection.
    InboundConcurrency,
}

impl Capability {
    /// Whether this build enforces the capability, so its field is accepted.
    ///
    /// Turning a capability on is one line here, in the same change as its enforcement
    /// (and its `examples/policies/` file and README row).
    pub const fn enforced(self) -> bool {
        match self {
            Capability::RendezvousHash => true,
            Capability::BackoffMin => true,
            Capability::Rollout => true,
            Capability::Fallback => true,
            Capability::SlowStart => true,
            Capability::ServicePort => true,
            Capability::FleetRateLimit => true,
            Capability::Upgrades => true,
            Capability::InboundConcurrency => true,
        }
    }
}

/// The lowest schema version that expresses `policy` as proxies receive it.
///
/// Schema 1 has none of the second-wave fields and requires weights to sum to 100.
pub fn required_version(policy: &RoutePolicy) -> u32 {
    let spec = &policy.spec;
    let backends = spec
        .backends
        .values()
        .any(|b| b.port.is_some() || b.slow_start.is_some());
    let routes = spec.routes.iter().any(|r| {
        r.fallback.is_some()
            || !r.upgrades.is_empty()
            || r.rate_limit
                .as_ref()
                .is_some_and(|rl| rl.scope != RateLimitScope::Local)
            || r.retry
                .as_ref()
                .and_then(|rt| rt.backoff.as_ref())
                .is_some_and(|b| b.min.is_some())
            || r.split.iter().any(|rule| {
                rule.rollout.is_some()
                    || rule
                        .sticky_by
                        .as_ref()
                        .is_some_and(|s| s.hash != StickyHash::Ordered)
                    || rule
                        .weights
                        .as_ref()
                        .is_some_and(|w| w.values().map(|v| u64::from(*v)).sum::<u64>() != 100)
            })
    });
    let inbound = spec.inbound.as_ref().is_some_and(|i| {
        i.concurrency.is_some()
            || i.rate_limit
                .as_ref()
                .is_some_and(|rl| rl.scope != RateLimitScope::Local)
    });
    // A schema-1 proxy refuses the unknown `aliases` key.
    let aliases = !spec.aliases.is_empty();
    if backends || routes || inbound || aliases {
        SCHEMA_VERSION
    } else {
        SCHEMA_V1
    }
}

/// Where a split rule's weights stand right now: the hook the rollout engine drives.
///
/// Proxies never receive `rollout`; they receive the weights this returns for each
/// weighted rule, keyed by policy, route and the rule's index in `split`.
pub trait EffectiveWeights: std::fmt::Debug {
    /// The weights in force for `split[rule]` of `route` in the policy
    /// `namespace/name`, or `None` to keep the file's weights.
    fn weights(
        &self,
        policy: &RoutePolicy,
        route: &str,
        rule: usize,
    ) -> Option<IndexMap<String, u32>>;

    /// A backend that header rules (`when` … `backend`) of `route` no longer send to:
    /// a rolled-back canary. Their rules are left out of what proxies receive.
    fn withdrawn(&self, policy: &RoutePolicy, route: &str) -> Option<String> {
        let _ = (policy, route);
        None
    }
}

/// The effective weights with no rollout engine: the file's weights.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileWeights;

impl EffectiveWeights for FileWeights {
    fn weights(&self, _: &RoutePolicy, _: &str, _: usize) -> Option<IndexMap<String, u32>> {
        None
    }
}

/// `policy` as proxies receive it: every `rollout` removed, its rule's weights
/// replaced by the effective ones, and header rules to a withdrawn backend left out.
pub fn proxy_view(policy: &RoutePolicy, effective: &dyn EffectiveWeights) -> RoutePolicy {
    let mut out = policy.clone();
    for route in &mut out.spec.routes {
        for (i, rule) in route.split.iter_mut().enumerate() {
            if rule.weights.is_some()
                && let Some(w) = effective.weights(policy, &route.name, i)
            {
                rule.weights = Some(w);
            }
            rule.rollout = None;
        }
        if let Some(gone) = effective.withdrawn(policy, &route.name) {
            route
                .split
                .retain(|rule| rule.backend.as_deref() != Some(gone.as_str()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Rollout, StickyBy, parse_policies};

    const BASE: &str = "\
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log, namespace: shop }
spec:
  host: log-service
  backends:
    log-v1: { addresses: [\"127.0.0.1:9101\"] }
    log-v2: { addresses: [\"127.0.0.1:9102\"] }
  routes:
    - name: all
      split:
        - weights: { log-v1: 90, log-v2: 10 }
          stickyBy: { header: x-user-id }
";

    fn base() -> RoutePolicy {
        parse_policies("base.yaml", BASE).unwrap().remove(0)
    }

    #[test]
    fn a_first_wave_policy_needs_schema_1_and_each_new_field_schema_2() {
        let p = base();
        assert_eq!(required_version(&p), SCHEMA_V1);
        // `hash: ordered` is the default and leaves the policy expressible in schema 1.
        let explicit = parse_policies(
            "b.yaml",
            &BASE.replace(
                "{ header: x-user-id }",
                "{ header: x-user-id, hash: ordered }",
            ),
        )
        .unwrap()
        .remove(0);
        assert_eq!(explicit, p);
        assert_eq!(required_version(&explicit), SCHEMA_V1);

        let mut rv = p.clone();
        rv.spec.routes[0].split[0].sticky_by = Some(StickyBy {
            header: "x-user-id".into(),
            hash: StickyHash::Rendezvous,
        });
        assert_eq!(required_version(&rv), SCHEMA_VERSION);

        let mut odd = p.clone();
        odd.spec.routes[0].split[0].weights = Some(IndexMap::from([
            ("log-v1".to_string(), 1),
            ("log-v2".to_string(), 2),
        ]));
        assert_eq!(required_version(&odd), SCHEMA_VERSION);

        let mut slow = p;
        slow.spec.backends[0].slow_start = Some(crate::Duration::from_secs(0));
        assert_eq!(required_version(&slow), SCHEMA_VERSION);
    }

    #[derive(Debug)]
    struct Driven;

    impl EffectiveWeights for Driven {
        fn weights(
            &self,
            policy: &RoutePolicy,
            route: &str,
            rule: usize,
        ) -> Option<IndexMap<String, u32>> {
            assert_eq!(
                (policy.metadata.name.as_str(), route, rule),
                ("log", "all", 0)
            );
            Some(IndexMap::from([
                ("log-v1".to_string(), 95),
                ("log-v2".to_string(), 5),
            ]))
        }
    }

    #[test]
    fn the_proxy_view_strips_rollout_and_carries_the_effective_weights() {
        let mut p = base();
        p.spec.routes[0].split[0].rollout = Some(Rollout {
            canary: "log-v2".into(),
            steps: vec![5, 50, 100],
            ..Default::default()
        });
        let file = proxy_view(&p, &FileWeights);
        assert_eq!(file.spec.routes[0].split[0].rollout, None);
        assert_eq!(
            file.spec.routes[0].split[0].weights,
            p.spec.routes[0].split[0].weights
        );
        assert_eq!(required_version(&file), SCHEMA_V1);
        let driven = proxy_view(&p, &Driven);
        let w = driven.spec.routes[0].split[0].weights.as_ref().unwrap();
        assert_eq!(w.values().copied().collect::<Vec<_>>(), [95, 5]);
        assert_eq!(driven.spec.routes[0].split[0].rollout, None);
    }

    #[derive(Debug)]
    struct RolledBack;

    impl EffectiveWeights for RolledBack {
        fn weights(&self, _: &RoutePolicy, _: &str, _: usize) -> Option<IndexMap<String, u32>> {
            None
        }
        fn withdrawn(&self, _: &RoutePolicy, route: &str) -> Option<String> {
            (route == "all").then(|| "log-v2".to_string())
        }
    }

    #[test]
    fn header_rules_to_a_withdrawn_backend_are_left_out() {
        let mut p = base();
        let weighted = p.spec.routes[0].split[0].clone();
        let to = |b: &str| crate::SplitRule {
            when: Some(crate::SplitWhen {
                headers: IndexMap::from([("x-canary".to_string(), "true".to_string())]),
            }),
            backend: Some(b.into()),
            ..Default::default()
        };
        p.spec.routes[0].split = vec![to("log-v2"), to("log-v1"), weighted.clone()];
        let view = proxy_view(&p, &RolledBack);
        assert_eq!(view.spec.routes[0].split, [to("log-v1"), weighted]);
        assert_eq!(proxy_view(&p, &FileWeights).spec.routes[0].split.len(), 3);
    }
}
