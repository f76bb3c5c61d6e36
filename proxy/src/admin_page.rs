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
                "policy": p.metadata.name,
                "route": format!("{}.{}", p.metadata.name, r.name),
                "match": r.matches.describe(),
                "backends": p.spec.backends.keys().collect::<Vec<_>>(),
                "governance": governance,
            }));
        }
    }
    serde_json::json!({ "version": snap.hash(), "routes": routes })
}
