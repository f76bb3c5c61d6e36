//! The admin port's page (`GET /`): one static HTML file built into the binary, whose
//! script reads the admin API of the same port (no CDN, no build step); and
//! `GET /routes`, the routes of the policy in force in the order they are tried,
//! which the page lists.

use sluice_config::precedence_order;

use crate::policy::PolicyStore;

/// The page: version and last rejection, breakers with reset and open buttons,
/// recent refusals, routes.
pub(crate) const PAGE: &str = include_str!("admin_page.html");

/// `GET /routes`: per host, its routes by precedence with their match, backends and
/// governance in brief.
/// The backends `r` can send to, in the policy's order: those its split rules name, the
/// first backend that is not its fallback when it has no `split` (validation makes a
/// split end in a rule without `when`, so nothing falls through one), and its fallback
/// backend.
fn route_backends<'a>(p: &'a sluice_config::RoutePolicy, r: &sluice_config::Route) -> Vec<&'a str> {
    let fallback = r.fallback.as_ref().and_then(|f| f.backend.as_deref());
    let falls_through = r.split.is_empty();
    let primary = p
        .spec
        .backends
        .keys()
        .find(|b| Some(b.as_str()) != fallback);
    let named = |b: &str| {
        r.split.iter().any(|rule| {
            rule.backend.as_deref() == Some(b)
                || rule.weights.as_ref().is_some_and(|w| w.contains_key(b))
        })
    };
    p.spec
        .backends
        .keys()
        .filter(|b| {
            named(b) || Some(b.as_str()) == fallback || (falls_through && Some(*b) == primary)
        })
        .map(String::as_str)
        .collect()
}

pub(crate) fn routes_json(store: &PolicyStore) -> serde_json::Value {
    let snap = store.current();
    let mut routes = Vec::new();
    for p in snap.policy_set().map(|s| s.policies()).unwrap_or_default() {
        for i in precedence_order(&p.spec.routes) {
            let r = &p.spec.routes[i];
            let mut governance = Vec::new();
            if let Some(t) = r.timeout {
                governance.push(format!("timeout {t}"));
            }
            if let Some(rl) = &r.rate_limit {
                governance.push(format!("rate limit {}/s", rl.per_second));
            }
            if let Some(retry) = &r.retry {
                governance.push(format!("{} retries", retry.attempts));
            }
            if r.circuit_breaker.is_some() {
                governance.push("breaker".into());
            }
            if r.fallback.is_some() {
                governance.push("fallback".into());
            }
            routes.push(serde_json::json!({
                "host": p.spec.host,
                "namespace": p.metadata.namespace_or_default(),
                "policy": p.metadata.name,
                "route": format!("{}.{}", p.metadata.name, r.name),
                "match": r.matches.describe(),
                "backends": route_backends(p, r),
                "governance": governance,
            }));
        }
    }
    serde_json::json!({ "version": snap.hash(), "routes": routes })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/routes` names what each route can reach, not every backend of its policy.
    #[test]
    fn a_route_lists_the_backends_it_can_send_to() {
        let yaml = r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: web }
spec:
  host: web
  backends:
    v1: { addresses: ["127.0.0.1:1"] }
    v2: { addresses: ["127.0.0.1:2"] }
    dead: { addresses: ["127.0.0.1:3"] }
    fb: { addresses: ["127.0.0.1:4"] }
  routes:
    - name: only-dead
      match: { path: { prefix: /dead } }
      split: [{ backend: dead }]
    - name: weighted
      match: { path: { prefix: /w } }
      split: [{ weights: { v1: 90, v2: 10 } }]
      fallback: { on: [breaker-open], backend: fb }
    - name: header
      match: { path: { prefix: /h } }
      split: [{ when: { headers: { x-canary: "true" } }, backend: v2 }, { backend: v1 }]
---
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: one }
spec:
  host: one
  backends:
    only: { addresses: ["127.0.0.1:5"] }
  routes:
    - name: plain
"#;
        let policies = sluice_config::parse_policies("web.yaml", yaml).unwrap();
        let of = |name: &str| {
            let (p, r) = policies
                .iter()
                .flat_map(|p| p.spec.routes.iter().map(move |r| (p, r)))
                .find(|(_, r)| r.name == name)
                .unwrap();
            route_backends(p, r)
        };
        assert_eq!(of("only-dead"), ["dead"]);
        assert_eq!(of("weighted"), ["v1", "v2", "fb"]);
        assert_eq!(of("header"), ["v1", "v2"]);
        assert_eq!(of("plain"), ["only"]);
    }
}
