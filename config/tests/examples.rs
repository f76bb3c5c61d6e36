//! Every policy under `examples/policies/` parses, shows the feature it is there
//! for, and the whole directory forms one valid policy set.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_config::{
    PolicySet, RateLimitKey, RateLimitScope, RetryOn, RoutePolicy, SCHEMA_VERSION, StickyHash,
    parse_policies, precedence_order, rendezvous_backend, required_version, sticky_point,
    weighted_backend,
};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
}

fn example(name: &str) -> Vec<RoutePolicy> {
    let text = fs::read_to_string(examples_dir().join(name)).unwrap();
    parse_policies(name, &text).unwrap_or_else(|e| panic!("{e}"))
}

fn one(name: &str) -> RoutePolicy {
    let mut p = example(name);
    assert_eq!(p.len(), 1, "{name}");
    p.remove(0)
}

#[test]
fn routing_orders_routes_by_precedence() {
    let p = one("routing.yaml");
    let names: Vec<&str> = precedence_order(&p.spec.routes)
        .into_iter()
        .map(|i| p.spec.routes[i].name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "health",
            "admin-writes",
            "item-writes",
            "items",
            "everything-else"
        ]
    );
}

#[test]
fn rate_limit_is_keyed_by_a_header() {
    let p = one("rate-limit-by-header.yaml");
    let rl = p.spec.routes[0].rate_limit.as_ref().unwrap();
    assert_eq!((rl.per_second, rl.burst), (50, Some(20)));
    assert_eq!(
        rl.key,
        Some(RateLimitKey {
            header: Some("x-tenant-id".into()),
            ..Default::default()
        })
    );
    assert!(p.spec.routes[1].rate_limit.as_ref().unwrap().shadow);
}

#[test]
fn fleet_rate_limit_shares_one_quota_per_tenant() {
    let p = one("fleet-rate-limit.yaml");
    let rl = p.spec.routes[0].rate_limit.as_ref().unwrap();
    assert_eq!((rl.per_second, rl.burst), (200, Some(400)));
    assert_eq!(rl.scope, RateLimitScope::Fleet);
    assert_eq!(
        rl.key.as_ref().unwrap().header.as_deref(),
        Some("x-tenant-id")
    );
    assert_eq!(
        p.spec.routes[1].rate_limit.as_ref().unwrap().scope,
        RateLimitScope::Local
    );
    assert_eq!(required_version(&p), SCHEMA_VERSION);
}

#[test]
fn retry_has_a_budget() {
    let p = one("retry-budget.yaml");
    let retry = p.spec.routes[0].retry.as_ref().unwrap();
    assert_eq!(retry.attempts, 2);
    assert!(retry.non_idempotent);
    assert!(retry.on.contains(&RetryOn::GatewayError));
    let budget = retry.budget.as_ref().unwrap();
    assert_eq!((budget.ratio, budget.min_per_second), (0.2, 5));
    assert_eq!(budget.window.unwrap().get(), Duration::from_secs(10));
}

#[test]
fn circuit_breaker_has_both_triggers() {
    let p = one("circuit-breaker.yaml");
    let cb = p.spec.routes[0].circuit_breaker.as_ref().unwrap();
    assert_eq!(cb.consecutive_failures, Some(5));
    assert_eq!(cb.failure_rate.as_ref().unwrap().percent, 50);
    assert_eq!(cb.max_open_for.unwrap().get(), Duration::from_secs(120));
}

#[test]
fn canary_split_is_sticky_and_weighted_in_file_order() {
    let p = one("canary-sticky.yaml");
    let rule = &p.spec.routes[0].split[0];
    let weights = rule.weights.as_ref().unwrap();
    assert_eq!(
        weights
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect::<Vec<_>>(),
        [("checkout-v1", 90), ("checkout-v2", 10)]
    );
    assert_eq!(rule.sticky_by.as_ref().unwrap().header, "x-user-id");
    let canary = (0..10_000)
        .filter(|i| {
            let point = sticky_point(format!("user-{i}").as_bytes());
            weighted_backend(weights, point) == Some("checkout-v2")
        })
        .count();
    assert!(
        (800..=1_200).contains(&canary),
        "{canary} of 10000 in canary"
    );
}

#[test]
fn canary_rendezvous_is_order_independent_and_needs_the_new_schema() {
    let p = one("canary-rendezvous.yaml");
    let rule = &p.spec.routes[0].split[0];
    assert_eq!(
        rule.sticky_by.as_ref().unwrap().hash,
        StickyHash::Rendezvous
    );
    assert_eq!(required_version(&p), SCHEMA_VERSION);
    let weights: Vec<(&str, u32)> = rule
        .weights
        .as_ref()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    let reversed: Vec<(&str, u32)> = weights.iter().rev().copied().collect();
    let mut canary = 0;
    for i in 0..10_000 {
        let user = format!("user-{i}");
        let a = weights[rendezvous_backend(user.as_bytes(), weights.iter().copied()).unwrap()].0;
        let b = reversed[rendezvous_backend(user.as_bytes(), reversed.iter().copied()).unwrap()].0;
        assert_eq!(a, b, "{user}");
        canary += usize::from(a == "profiles-v2");
    }
    assert!(
        (800..=1_200).contains(&canary),
        "{canary} of 10000 in canary"
    );
}

#[test]
fn header_split_rules_end_with_a_default() {
    let p = one("header-split.yaml");
    let split = &p.spec.routes[0].split;
    assert_eq!(split.len(), 3);
    assert!(split[..2].iter().all(|r| r.when.is_some()));
    assert_eq!(split[2].when, None);
    assert_eq!(
        p.spec.backends["recs-v2"].service.as_deref(),
        Some("recs-v2.shop")
    );
}

#[test]
fn timeouts_total_and_per_try() {
    let p = one("timeouts.yaml");
    assert_eq!(
        p.spec.routes[0].timeout.unwrap().get(),
        Duration::from_secs(90)
    );
    let read = &p.spec.routes[1];
    assert!(read.retry.as_ref().unwrap().per_try_timeout.unwrap() < read.timeout.unwrap());
}

#[test]
fn inbound_allows_identities_and_limits_rate() {
    let p = one("inbound.yaml");
    let inbound = p.spec.inbound.as_ref().unwrap();
    assert_eq!(inbound.allow.as_ref().unwrap().len(), 2);
    let rl = inbound.rate_limit.as_ref().unwrap();
    assert_eq!(rl.key.as_ref().unwrap().peer_identity, Some(true));
    assert!(p.spec.routes.is_empty());
}

#[test]
fn access_log_is_per_route_and_off_by_default() {
    let p = one("access-log.yaml");
    let by_name = |n: &str| p.spec.routes.iter().find(|r| r.name == n).unwrap();
    assert_eq!(by_name("health").access_log, None);
    assert_eq!(by_name("writes").access_log, Some(true));
    assert_eq!(p.spec.inbound.as_ref().unwrap().access_log, Some(true));
}

#[test]
fn multi_document_file_holds_several_policies() {
    let hosts: Vec<String> = example("multi-document.yaml")
        .into_iter()
        .map(|p| p.spec.host)
        .collect();
    assert_eq!(hosts, ["order-service", "notifications"]);
}

#[test]
fn the_design_example_parses() {
    let p = one("log-service.yaml");
    assert_eq!(p.spec.routes[0].split.len(), 2);
}

#[test]
fn all_examples_form_one_policy_set() {
    let mut files: Vec<(String, String)> = fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read_to_string(&p).unwrap())
        })
        .collect();
    assert!(files.len() >= 10);
    let set = PolicySet::from_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str())))
        .unwrap_or_else(|e| panic!("{e}"));
    files.reverse();
    let reversed =
        PolicySet::from_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str()))).unwrap();
    assert_eq!(set.hash(), reversed.hash());
    assert_eq!(set.policies().len(), files.len() + 1);
}

#[test]
fn upgrades_lists_h2c_on_one_route_and_needs_the_new_schema() {
    let p = one("upgrades.yaml");
    assert_eq!(p.spec.routes[0].upgrades, ["h2c"]);
    assert!(p.spec.routes[1].upgrades.is_empty());
    assert_eq!(required_version(&p), SCHEMA_VERSION);
}

#[test]
fn fallback_examples_show_both_forms() {
    let p = one("fallback-backend.yaml");
    let f = p.spec.routes[0].fallback.as_ref().unwrap();
    assert_eq!(f.backend.as_deref(), Some("quote-cache"));
    assert!(
        p.spec.routes[0].split.is_empty(),
        "a fallback-only backend needs no split"
    );
    let p = one("fallback-response.yaml");
    let r = p.spec.routes[0]
        .fallback
        .as_ref()
        .unwrap()
        .response
        .as_ref()
        .unwrap();
    assert_eq!((r.status, r.grpc_status), (200, Some(14)));
    assert_eq!(required_version(&p), SCHEMA_VERSION);
}

#[test]
fn slow_start_is_per_backend() {
    let p = one("slow-start.yaml");
    let b = &p.spec.backends["shipping-v1"];
    assert_eq!(
        b.slow_start.unwrap().get(),
        std::time::Duration::from_secs(30)
    );
}

#[test]
fn canary_rollout_steps_to_100_and_needs_the_new_schema() {
    let p = one("canary-rollout.yaml");
    let rule = &p.spec.routes[0].split[0];
    let rollout = rule.rollout.as_ref().unwrap();
    assert_eq!(rollout.canary, "log-v2");
    assert_eq!(rule.weights.as_ref().unwrap()["log-v2"], 0);
    assert_eq!(rollout.steps, [5, 25, 50, 100]);
    assert_eq!(
        rollout.slo.as_ref().unwrap().p99.unwrap().get(),
        Duration::from_millis(150)
    );
    assert_eq!(rollout.baseline.as_ref().unwrap().p99_ratio, Some(1.5));
    assert_eq!(required_version(&p), SCHEMA_VERSION);
}
