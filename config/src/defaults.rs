//! The documented default of every policy field that has one, and the canonical
//! form's rule that leaves them out.
//!
//! A value written equal to its default means what leaving it out means, so the
//! canonical form drops it: `openFor: 5s` or `accessLog: false` added to a policy
//! keeps its content hash, and a no-op edit rolls no new version to the mesh.
//! The proxy's layers and the control plane's rollout engine fill in these same
//! values when a field is absent.

use std::time::Duration;

use crate::{
    Backoff, CircuitBreaker, Concurrency, FailureClass, GrpcCode, OnInconclusive, RateLimit, Retry,
    RetryBudget, Rollout, RoutePolicy,
};

/// `metadata.namespace`.
pub const NAMESPACE: &str = "default";
/// `backends.*.slowStart`.
pub const SLOW_START: Duration = Duration::from_secs(10);
/// `routes[].accessLog` and `inbound.accessLog`.
pub const ACCESS_LOG: bool = false;
/// `retry.maxReplayBytes`.
pub const MAX_REPLAY_BYTES: u64 = 64 * 1024;
/// `retry.backoff.base`.
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// `retry.backoff.max`.
pub const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// `retry.budget.ratio` of a route without `budget`.
pub const BUDGET_RATIO: f64 = 0.2;
/// `retry.budget.minPerSecond` of a route without `budget`.
pub const BUDGET_MIN_PER_SECOND: u32 = 10;
/// `retry.budget.minPerSecond` of a `budget` that names none.
pub const BUDGET_MIN_PER_SECOND_GIVEN_BUDGET: u32 = 0;
/// `retry.budget.window`.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// `circuitBreaker.openFor`.
pub const OPEN_FOR: Duration = Duration::from_secs(5);
/// `circuitBreaker.maxOpenFor`.
pub const MAX_OPEN_FOR: Duration = Duration::from_secs(60);
/// `circuitBreaker.halfOpenRequests`.
pub const HALF_OPEN_REQUESTS: u32 = 1;
/// `circuitBreaker.failureOn`, in any order.
pub const FAILURE_ON: [FailureClass; 3] = [
    FailureClass::ConnectFailure,
    FailureClass::Timeout,
    FailureClass::ServerError,
];
/// `circuitBreaker.grpcStatuses`, in any order.
pub const BREAKER_GRPC_STATUSES: [GrpcCode; 5] = [
    GrpcCode::Unavailable,
    GrpcCode::Internal,
    GrpcCode::Unknown,
    GrpcCode::DeadlineExceeded,
    GrpcCode::DataLoss,
];
/// `rollout.interval`.
pub const ROLLOUT_INTERVAL: Duration = Duration::from_secs(30);
/// `rollout.minRequests`.
pub const ROLLOUT_MIN_REQUESTS: u32 = 100;
/// `rollout.onInconclusive`.
pub const ROLLOUT_ON_INCONCLUSIVE: OnInconclusive = OnInconclusive::Hold;
/// `rollout.deadline`.
pub const ROLLOUT_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// `inbound.concurrency.adaptive.minLimit`.
pub const ADAPTIVE_MIN_LIMIT: u32 = 4;
/// `inbound.concurrency.adaptive.maxLimit`.
pub const ADAPTIVE_MAX_LIMIT: u32 = 2000;
/// `inbound.concurrency.queue.timeout`.
pub const QUEUE_TIMEOUT: Duration = Duration::from_millis(50);

/// Clears `field` when it holds its default.
fn clear<T: PartialEq>(field: &mut Option<T>, default: T) {
    if field.as_ref() == Some(&default) {
        *field = None;
    }
}

/// Clears a duration `field` when it holds its default, however it was spelt.
fn clear_duration(field: &mut Option<crate::Duration>, default: Duration) {
    clear(field, crate::Duration(default));
}

/// Whether `list` names exactly the members of `default` (order and repeats aside).
fn same_set<T: PartialEq>(list: &[T], default: &[T]) -> bool {
    list.iter().all(|x| default.contains(x)) && default.iter().all(|x| list.contains(x))
}

/// Drops from `policy` every value equal to its default: what is left is what the
/// canonical form serialises. A validated policy stays valid and means the same.
pub(crate) fn leave_out(policy: &mut RoutePolicy) {
    clear(&mut policy.metadata.namespace, NAMESPACE.to_string());
    let spec = &mut policy.spec;
    for b in spec.backends.values_mut() {
        clear_duration(&mut b.slow_start, SLOW_START);
    }
    for r in &mut spec.routes {
        clear(&mut r.access_log, ACCESS_LOG);
        if let Some(rl) = &mut r.rate_limit {
            rate_limit(rl);
        }
        if let Some(rt) = &mut r.retry {
            retry(rt);
        }
        if let Some(cb) = &mut r.circuit_breaker {
            breaker(cb);
        }
        for rule in &mut r.split {
            if let Some(ro) = &mut rule.rollout {
                rollout(ro);
            }
        }
    }
    if let Some(i) = &mut spec.inbound {
        clear(&mut i.access_log, ACCESS_LOG);
        if let Some(rl) = &mut i.rate_limit {
            rate_limit(rl);
        }
        if let Some(c) = &mut i.concurrency {
            concurrency(c);
        }
    }
}

fn rate_limit(rl: &mut RateLimit) {
    // `burst` defaults to the rate itself.
    clear(&mut rl.burst, rl.per_second);
}

fn retry(rt: &mut Retry) {
    clear(&mut rt.max_replay_bytes, MAX_REPLAY_BYTES);
    if let Some(b) = &mut rt.backoff {
        clear_duration(&mut b.base, BACKOFF_BASE);
        clear_duration(&mut b.max, BACKOFF_MAX);
    }
    clear(&mut rt.backoff, Backoff::default());
    if let Some(b) = &mut rt.budget {
        clear_duration(&mut b.window, BUDGET_WINDOW);
    }
    // A route without `budget` has this one.
    clear(
        &mut rt.budget,
        RetryBudget {
            ratio: BUDGET_RATIO,
            min_per_second: BUDGET_MIN_PER_SECOND,
            window: None,
        },
    );
}

fn breaker(cb: &mut CircuitBreaker) {
    // `consecutiveFailures` has no default a policy can lean on: the validator wants
    // it or `failureRate`, and beside `failureRate` absent means no such trigger.
    clear_duration(&mut cb.open_for, OPEN_FOR);
    clear_duration(&mut cb.max_open_for, MAX_OPEN_FOR);
    clear(&mut cb.half_open_requests, HALF_OPEN_REQUESTS);
    if same_set(&cb.failure_on, &FAILURE_ON) {
        cb.failure_on.clear();
    }
    if same_set(&cb.grpc_statuses, &BREAKER_GRPC_STATUSES) {
        cb.grpc_statuses.clear();
    }
}

fn rollout(ro: &mut Rollout) {
    clear_duration(&mut ro.interval, ROLLOUT_INTERVAL);
    clear(&mut ro.min_requests, ROLLOUT_MIN_REQUESTS);
    clear(&mut ro.on_inconclusive, ROLLOUT_ON_INCONCLUSIVE);
    clear_duration(&mut ro.deadline, ROLLOUT_DEADLINE);
}

fn concurrency(c: &mut Concurrency) {
    if let Some(a) = &mut c.adaptive {
        clear(&mut a.min_limit, ADAPTIVE_MIN_LIMIT);
        clear(&mut a.max_limit, ADAPTIVE_MAX_LIMIT);
    }
    if let Some(q) = &mut c.queue {
        clear_duration(&mut q.timeout, QUEUE_TIMEOUT);
    }
}

/// Whether a given budget's `minPerSecond` is its default (serde's test for leaving
/// it out).
pub(crate) fn is_budget_floor_default(n: &u32) -> bool {
    *n == BUDGET_MIN_PER_SECOND_GIVEN_BUDGET
}

#[cfg(test)]
mod tests {
    use crate::PolicySet;

    /// A policy using every section that has defaulted fields; each `#name` comment
    /// marks where a row writes its field.
    const BASE: &str = r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata:
  name: svc
  #metadata
spec:
  host: svc
  backends:
    v1:
      addresses: ["127.0.0.1:9001"]
      #backend
    v2:
      addresses: ["127.0.0.1:9002"]
  routes:
    - name: r
      match: { path: { prefix: /r } }
      #route
      rateLimit:
        perSecond: 10
        #rateLimit
      retry:
        attempts: 2
        #retry
      circuitBreaker:
        failureRate: { percent: 50, window: 10s, minRequests: 5 }
        #breaker
      split:
        - weights: { v1: 100, v2: 0 }
          #split
          rollout:
            canary: v2
            steps: [10, 100]
            #rollout
    - name: s
      #route2
      split:
        - backend: v1
  inbound:
    #inbound
    rateLimit:
      perSecond: 5
      #inboundRateLimit
    concurrency:
      adaptive: {}
      queue:
        max: 10
        #queue
"#;

    /// Every field with a default: where it goes, the text without it, with it at its
    /// default, and with another value.
    const ROWS: &[(&str, &str, &str, &str, &str)] = &[
        (
            "metadata.namespace",
            "#metadata",
            "",
            "namespace: default",
            "namespace: shop",
        ),
        (
            "backends.*.slowStart",
            "#backend",
            "",
            "slowStart: 10s",
            "slowStart: 11s",
        ),
        (
            "routes[].accessLog",
            "#route",
            "",
            "accessLog: false",
            "accessLog: true",
        ),
        (
            "rateLimit.burst",
            "#rateLimit",
            "",
            "burst: 10",
            "burst: 11",
        ),
        (
            "rateLimit.shadow",
            "#rateLimit",
            "",
            "shadow: false",
            "shadow: true",
        ),
        (
            "rateLimit.scope",
            "#rateLimit",
            "",
            "scope: local",
            "scope: fleet",
        ),
        (
            "retry.nonIdempotent",
            "#retry",
            "",
            "nonIdempotent: false",
            "nonIdempotent: true",
        ),
        (
            "retry.maxReplayBytes",
            "#retry",
            "",
            "maxReplayBytes: 65536",
            "maxReplayBytes: 65537",
        ),
        (
            "split.stickyBy.hash",
            "#split",
            "stickyBy: { header: x-user }",
            "stickyBy: { header: x-user, hash: ordered }",
            "stickyBy: { header: x-user, hash: rendezvous }",
        ),
        (
            "retry.backoff.base",
            "#retry",
            "",
            "backoff: { base: 25ms }",
            "backoff: { base: 26ms }",
        ),
        (
            "retry.backoff.max",
            "#retry",
            "",
            "backoff: { max: 250ms }",
            "backoff: { max: 251ms }",
        ),
        (
            "retry.backoff (all defaults)",
            "#retry",
            "",
            "backoff: { base: 25ms, max: 250ms }",
            "backoff: { base: 25ms, max: 300ms }",
        ),
        (
            "retry.budget (the default one)",
            "#retry",
            "",
            "budget: { ratio: 0.2, minPerSecond: 10, window: 10s }",
            "budget: { ratio: 0.2, minPerSecond: 10, window: 11s }",
        ),
        (
            "retry.budget.window",
            "#retry",
            "budget: { ratio: 0.5 }",
            "budget: { ratio: 0.5, window: 10s }",
            "budget: { ratio: 0.5, window: 11s }",
        ),
        (
            "retry.budget.minPerSecond",
            "#retry",
            "budget: { ratio: 0.5 }",
            "budget: { ratio: 0.5, minPerSecond: 0 }",
            "budget: { ratio: 0.5, minPerSecond: 1 }",
        ),
        (
            "circuitBreaker.openFor",
            "#breaker",
            "",
            "openFor: 5s",
            "openFor: 6s",
        ),
        (
            "circuitBreaker.openFor (as 5000ms)",
            "#breaker",
            "",
            "openFor: 5000ms",
            "openFor: 5001ms",
        ),
        (
            "circuitBreaker.maxOpenFor",
            "#breaker",
            "",
            "maxOpenFor: 1m",
            "maxOpenFor: 2m",
        ),
        (
            "circuitBreaker.halfOpenRequests",
            "#breaker",
            "",
            "halfOpenRequests: 1",
            "halfOpenRequests: 2",
        ),
        (
            "circuitBreaker.failureOn",
            "#breaker",
            "",
            "failureOn: [5xx, connect-failure, timeout]",
            "failureOn: [5xx, connect-failure]",
        ),
        (
            "circuitBreaker.grpcStatuses",
            "#breaker",
            "",
            "grpcStatuses: [unavailable, internal, unknown, deadline-exceeded, data-loss]",
            "grpcStatuses: [unavailable, internal]",
        ),
        (
            "stickyBy.hash",
            "- backend: v1",
            "- weights: { v1: 50, v2: 50 }\n          stickyBy: { header: x-user }",
            "- weights: { v1: 50, v2: 50 }\n          stickyBy: { header: x-user, hash: ordered }",
            "- weights: { v1: 50, v2: 50 }\n          stickyBy: { header: x-user, hash: rendezvous }",
        ),
        (
            "rollout.interval",
            "#rollout",
            "",
            "interval: 30s",
            "interval: 31s",
        ),
        (
            "rollout.minRequests",
            "#rollout",
            "",
            "minRequests: 100",
            "minRequests: 101",
        ),
        (
            "rollout.onInconclusive",
            "#rollout",
            "",
            "onInconclusive: hold",
            "onInconclusive: rollback",
        ),
        (
            "rollout.deadline",
            "#rollout",
            "",
            "deadline: 30m",
            "deadline: 31m",
        ),
        (
            "inbound.accessLog",
            "#inbound",
            "",
            "accessLog: false",
            "accessLog: true",
        ),
        (
            "inbound.rateLimit.burst",
            "#inboundRateLimit",
            "",
            "burst: 5",
            "burst: 6",
        ),
        (
            "inbound.concurrency.adaptive.minLimit",
            "adaptive: {}",
            "adaptive: {}",
            "adaptive: { minLimit: 4 }",
            "adaptive: { minLimit: 5 }",
        ),
        (
            "inbound.concurrency.adaptive.maxLimit",
            "adaptive: {}",
            "adaptive: {}",
            "adaptive: { maxLimit: 2000 }",
            "adaptive: { maxLimit: 2001 }",
        ),
        (
            "inbound.concurrency.queue.timeout",
            "#queue",
            "",
            "timeout: 50ms",
            "timeout: 51ms",
        ),
    ];

    fn set(field: &str, text: &str) -> PolicySet {
        PolicySet::from_files([("svc.yaml", text)])
            .unwrap_or_else(|e| panic!("{field}: refused: {e}\n{text}"))
    }

    /// Writing any field at its default is no edit: the canonical bytes and the hash
    /// stay those of the policy without it (and survive a trip through a snapshot),
    /// while any other value is an edit.
    #[test]
    fn a_value_written_at_its_default_keeps_the_hash() {
        for (field, marker, absent_text, default, other) in ROWS {
            assert!(BASE.contains(marker), "{field}: no {marker} in the policy");
            let with = |v: &str| BASE.replacen(marker, v, 1);
            let (absent, default, other) = (
                set(field, &with(absent_text)),
                set(field, &with(default)),
                set(field, &with(other)),
            );
            assert_eq!(
                String::from_utf8_lossy(default.canonical_bytes()),
                String::from_utf8_lossy(absent.canonical_bytes()),
                "{field}: written at its default"
            );
            assert_eq!(default.hash(), absent.hash(), "{field}");
            // Left out, not written at its default: the canonical form of a policy that
            // never named the field does not name it either.
            let name = field.split(" (").next().unwrap_or(field);
            let key = format!("{}:", name.rsplit('.').next().unwrap_or(name));
            let canonical = String::from_utf8_lossy(absent.canonical_bytes());
            assert!(
                canonical.matches(&key).count() <= with(absent_text).matches(&key).count(),
                "{field}: the canonical form writes it out\n{canonical}"
            );
            assert_eq!(default.policies(), absent.policies(), "{field}");
            assert_ne!(
                other.hash(),
                absent.hash(),
                "{field}: another value is an edit"
            );
            let again = PolicySet::from_canonical("snapshot", default.canonical_bytes())
                .unwrap_or_else(|e| panic!("{field}: the canonical form is refused: {e}"));
            assert_eq!(again.hash(), default.hash(), "{field}: a snapshot's hash");
            assert_eq!(
                again.canonical_bytes(),
                default.canonical_bytes(),
                "{field}"
            );
        }
    }

    /// Every field the model documents a default for has a row: a new one without a
    /// row fails here.
    #[test]
    fn every_documented_default_has_a_row() {
        let model = include_str!("model.rs");
        let documented = model
            .lines()
            .filter(|l| l.trim_start().starts_with("///") && l.contains("default"))
            .count();
        // Lines that mention "default" without documenting a field's default value.
        let not_defaults = [
            "True for the default, which is left out of the canonical form.",
            "Level names, most important first; must include `default`, which requests",
        ];
        let skipped = model
            .lines()
            .filter(|l| not_defaults.iter().any(|n| l.contains(n)))
            .count();
        let fields: std::collections::BTreeSet<&str> = ROWS
            .iter()
            .map(|r| r.0.split(" (").next().unwrap_or(r.0))
            .collect();
        assert!(
            documented - skipped <= fields.len(),
            "{} documented defaults, {} fields in the table: add a row (and a rule in leave_out)",
            documented - skipped,
            fields.len()
        );
    }
}
