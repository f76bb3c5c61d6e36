//! Checks on the second wave's fields, and the refusal of fields whose capability
//! this build does not enforce yet ([`Capability::enforced`]).

use std::collections::HashSet;

use indexmap::IndexMap;

use super::{Checker, DEFAULT_BACKOFF_MAX, IntRange, is_dns_label, is_tchar, quote_value};
use crate::spans::{child_index, child_key};
use crate::{
    Backend, Backoff, Capability, Concurrency, Duration, Fallback, RateLimit, RateLimitScope,
    Rollout, Route, RoutePolicy, ServicePort, SplitRule, StickyHash,
};

const STEP: IntRange = IntRange { min: 1, max: 100 };
const ROLLOUT_MIN_REQUESTS: IntRange = IntRange {
    min: 1,
    max: 1_000_000,
};
const FALLBACK_STATUS: IntRange = IntRange { min: 200, max: 599 };
const GRPC_STATUS: IntRange = IntRange { min: 0, max: 16 };
const PORT_NUMBER: IntRange = IntRange {
    min: 1,
    max: 65_535,
};
const CONCURRENCY_LIMIT: IntRange = IntRange {
    min: 1,
    max: 1_000_000,
};
const QUEUE_MAX: IntRange = IntRange {
    min: 0,
    max: 1_000_000,
};
/// Largest static fallback body: an answer, not a payload.
const MAX_FALLBACK_BODY: usize = 64 * 1024;
/// What a backend's `slowStart` is when not given.
const DURATION_OR_ZERO: &str = "0s (off) or a duration 1ms..=1h";

impl Checker {
    /// Refuses a field whose capability this build does not enforce. The field's own
    /// checks still run, so a policy written today is right once the capability lands.
    pub(super) fn supported(&mut self, path: &str, capability: Capability) {
        if !capability.enforced() {
            self.err(path, "not supported yet");
        }
    }

    /// Backends named only as some route's fallback: they need no split to choose them.
    pub(super) fn fallback_only<'a>(&self, p: &'a RoutePolicy) -> HashSet<&'a str> {
        let in_splits: HashSet<&str> = p
            .spec
            .routes
            .iter()
            .flat_map(|r| &r.split)
            .flat_map(|rule| {
                rule.backend.iter().map(String::as_str).chain(
                    rule.weights
                        .iter()
                        .flat_map(|w| w.keys().map(String::as_str)),
                )
            })
            .collect();
        p.spec
            .routes
            .iter()
            .filter_map(|r| r.fallback.as_ref()?.backend.as_deref())
            .filter(|b| !in_splits.contains(b))
            .collect()
    }

    pub(super) fn backend_v2(&mut self, path: &str, b: &Backend) {
        if let Some(port) = &b.port {
            let pp = child_key(path, "port");
            self.supported(&pp, Capability::ServicePort);
            if b.service.is_none() {
                self.err(
                    &pp,
                    "only a service backend has a port (addresses carry their own); add service or remove port",
                );
            }
            match port {
                ServicePort::Number(n) => self.int(&pp, *n, PORT_NUMBER),
                ServicePort::Name(name) => {
                    if !is_port_name(name) {
                        self.err(
                            &pp,
                            format!(
                                "expected a port number 1..=65535 or a Service port name (lower-case letters, digits and '-', at most 15), got {}", quote_value(name)
                            ),
                        );
                    }
                }
            }
        }
        if let Some(d) = b.slow_start {
            let sp = child_key(path, "slowStart");
            self.supported(&sp, Capability::SlowStart);
            if !d.get().is_zero() {
                let ok = (super::DURATION_MIN..=super::DURATION_MAX).contains(&d.get());
                if !ok {
                    self.err(&sp, format!("expected {DURATION_OR_ZERO}, got {d}"));
                }
            }
        }
    }

    pub(super) fn route_v2(&mut self, path: &str, r: &Route, backends: &IndexMap<String, Backend>) {
        if let Some(f) = &r.fallback {
            let fp = child_key(path, "fallback");
            self.supported(&fp, Capability::Fallback);
            self.fallback(&fp, f, r, backends);
        }
        if !r.upgrades.is_empty() {
            let up = child_key(path, "upgrades");
            self.supported(&up, Capability::Upgrades);
            for (i, token) in r.upgrades.iter().enumerate() {
                if !is_upgrade_token(token) {
                    self.err(
                        child_index(&up, i),
                        format!(
                            "expected a lower-case upgrade token such as \"h2c\" or \"proto/2\" (RFC 9110 token, optional /version), got {}", quote_value(token)
                        ),
                    );
                }
            }
            self.no_duplicates(&up, r.upgrades.iter().map(|t| quote_value(t)));
        }
        let mut first_rollout: Option<usize> = None;
        for (k, rule) in r.split.iter().enumerate() {
            if rule.rollout.is_none() {
                continue;
            }
            let rp = child_key(&child_index(&child_key(path, "split"), k), "rollout");
            match first_rollout {
                Some(first) => self.err(
                    &rp,
                    format!("a route has at most one rollout; split[{first}] already has one"),
                ),
                None => first_rollout = Some(k),
            }
        }
    }

    pub(super) fn split_rule_v2(&mut self, rp: &str, rule: &SplitRule) {
        if let Some(s) = &rule.sticky_by
            && s.hash == StickyHash::Rendezvous
        {
            self.supported(
                &child_key(&child_key(rp, "stickyBy"), "hash"),
                Capability::RendezvousHash,
            );
        }
        if let Some(ro) = &rule.rollout {
            let rop = child_key(rp, "rollout");
            self.supported(&rop, Capability::Rollout);
            self.rollout(&rop, ro, rule);
        }
    }

    fn rollout(&mut self, path: &str, ro: &Rollout, rule: &SplitRule) {
        match &rule.weights {
            None => self.err(
                path,
                "only a rule with weights can have a rollout; this rule has none",
            ),
            Some(w) if !w.contains_key(&ro.canary) => {
                let names: Vec<&str> = w.keys().map(String::as_str).collect();
                self.err(
                    child_key(path, "canary"),
                    format!(
                        "the canary must be one of this rule's weights ({}), got {}",
                        names.join(", "),
                        quote_value(&ro.canary)
                    ),
                );
            }
            Some(_) => {}
        }
        let sp = child_key(path, "steps");
        if ro.steps.is_empty() {
            self.err(&sp, "expected at least one step, the last being 100");
        }
        for (i, step) in ro.steps.iter().enumerate() {
            let p = child_index(&sp, i);
            self.int(&p, *step, STEP);
            if i > 0 && *step <= ro.steps[i - 1] {
                self.err(
                    &p,
                    format!(
                        "steps must increase strictly: {step} follows {}",
                        ro.steps[i - 1]
                    ),
                );
            }
        }
        if let Some(last) = ro.steps.last()
            && *last != 100
        {
            self.err(
                child_index(&sp, ro.steps.len() - 1),
                format!("the last step must be 100 (the canary takes everything), got {last}"),
            );
        }
        self.opt_duration(&child_key(path, "interval"), ro.interval);
        self.opt_duration(&child_key(path, "deadline"), ro.deadline);
        if let Some(n) = ro.min_requests {
            self.int(&child_key(path, "minRequests"), n, ROLLOUT_MIN_REQUESTS);
        }
        if let Some(slo) = &ro.slo {
            let p = child_key(path, "slo");
            if let Some(r) = slo.error_rate {
                self.ratio(&child_key(&p, "errorRate"), r);
            }
            self.opt_duration(&child_key(&p, "p99"), slo.p99);
        }
        if let Some(b) = &ro.baseline {
            let p = child_key(path, "baseline");
            if let Some(r) = b.error_rate_increase {
                self.ratio(&child_key(&p, "errorRateIncrease"), r);
            }
            if let Some(r) = b.p99_ratio
                && !(r.is_finite() && (1.0..=1000.0).contains(&r))
            {
                self.err(
                    child_key(&p, "p99Ratio"),
                    format!("expected a number 1..=1000, got {r}"),
                );
            }
        }
    }

    fn ratio(&mut self, path: &str, r: f64) {
        if !(0.0..=1.0).contains(&r) {
            self.err(path, format!("expected {}, got {r}", super::RATIO_EXPECTED));
        }
    }

    fn fallback(
        &mut self,
        path: &str,
        f: &Fallback,
        r: &Route,
        backends: &IndexMap<String, Backend>,
    ) {
        let on = child_key(path, "on");
        if f.on.is_empty() {
            self.err(
                &on,
                "expected at least one of breaker-open, no-healthy-endpoint, upstream-unavailable, timeout",
            );
        }
        self.no_duplicates(&on, f.on.iter().map(super::quoted));
        self.exactly_one(
            path,
            &["backend", "response"],
            &[f.backend.is_some(), f.response.is_some()],
        );
        if let Some(b) = &f.backend {
            let bp = child_key(path, "backend");
            if !backends.contains_key(b) {
                let known: Vec<&str> = backends.keys().map(String::as_str).collect();
                self.err(
                    &bp,
                    format!(
                        "unknown backend {}; defined: {}",
                        quote_value(b),
                        known.join(", ")
                    ),
                );
            } else if primaries(r, backends).contains(b.as_str()) {
                self.err(
                    &bp,
                    format!(
                        "{} is a backend this route already sends to; a fallback must be another backend", quote_value(b)
                    ),
                );
            }
        }
        if let Some(rsp) = &f.response {
            let rp = child_key(path, "response");
            self.int(&child_key(&rp, "status"), rsp.status, FALLBACK_STATUS);
            self.header_map(&child_key(&rp, "headers"), &rsp.headers);
            if let Some(body) = &rsp.body
                && body.len() > MAX_FALLBACK_BODY
            {
                self.err(
                    child_key(&rp, "body"),
                    format!(
                        "expected at most {MAX_FALLBACK_BODY} bytes (64 KiB), got {}",
                        body.len()
                    ),
                );
            }
            if let Some(code) = rsp.grpc_status {
                self.int(&child_key(&rp, "grpcStatus"), code, GRPC_STATUS);
            }
            if let Some(msg) = &rsp.grpc_message
                && msg.bytes().any(|b| b.is_ascii_control())
            {
                self.err(
                    child_key(&rp, "grpcMessage"),
                    format!(
                        "expected a message without control characters, got {}",
                        quote_value(msg)
                    ),
                );
            }
        }
    }

    /// `rateLimit.scope` of a route limit (`inbound: false`) or an inbound one.
    pub(super) fn rate_limit_scope(&mut self, path: &str, rl: &RateLimit, inbound: bool) {
        if rl.scope != RateLimitScope::Fleet {
            return;
        }
        let sp = child_key(path, "scope");
        if inbound {
            self.err(
                &sp,
                "fleet applies to outbound route limits only; an inbound limit protects each serving pod on its own",
            );
        } else {
            self.supported(&sp, Capability::FleetRateLimit);
        }
    }

    /// `retry.backoff.min`, which must not exceed the largest delay.
    pub(super) fn backoff_min(&mut self, bp: &str, b: &Backoff) {
        let Some(min) = b.min else {
            return;
        };
        let mp = child_key(bp, "min");
        self.supported(&mp, Capability::BackoffMin);
        if !self.duration(&mp, min) {
            return;
        }
        let (max, what) = match b.max {
            Some(m) => (m.get(), format!("backoff.max {m}")),
            None => (
                DEFAULT_BACKOFF_MAX,
                format!("the default backoff.max {}", Duration(DEFAULT_BACKOFF_MAX)),
            ),
        };
        if min.get() > max {
            self.err(&mp, format!("{min} is longer than {what}"));
        }
    }

    pub(super) fn concurrency(&mut self, path: &str, c: &Concurrency) {
        self.supported(path, Capability::InboundConcurrency);
        self.exactly_one(
            path,
            &["adaptive", "fixed"],
            &[c.adaptive.is_some(), c.fixed.is_some()],
        );
        if let Some(a) = &c.adaptive {
            let ap = child_key(path, "adaptive");
            let min_p = child_key(&ap, "minLimit");
            if let Some(n) = a.min_limit {
                self.int(&min_p, n, CONCURRENCY_LIMIT);
            }
            if let Some(n) = a.max_limit {
                self.int(&child_key(&ap, "maxLimit"), n, CONCURRENCY_LIMIT);
            }
            if let (Some(lo), Some(hi)) = (a.min_limit, a.max_limit)
                && lo > hi
            {
                self.err(&min_p, format!("minLimit {lo} is above maxLimit {hi}"));
            }
        }
        if let Some(f) = &c.fixed {
            self.int(
                &child_key(&child_key(path, "fixed"), "max"),
                f.max,
                CONCURRENCY_LIMIT,
            );
        }
        if let Some(q) = &c.queue {
            let qp = child_key(path, "queue");
            self.int(&child_key(&qp, "max"), q.max, QUEUE_MAX);
            self.opt_duration(&child_key(&qp, "timeout"), q.timeout);
        }
        if let Some(p) = &c.priority {
            let pp = child_key(path, "priority");
            self.header_name(&child_key(&pp, "header"), false, &p.header);
            let lp = child_key(&pp, "levels");
            for (i, level) in p.levels.iter().enumerate() {
                if !is_dns_label(level) {
                    self.err(
                        child_index(&lp, i),
                        format!(
                            "expected a level name of lower-case letters, digits and '-', got {}",
                            quote_value(level)
                        ),
                    );
                }
            }
            self.no_duplicates(&lp, p.levels.iter().map(|l| quote_value(l)));
            if !p.levels.iter().any(|l| l == "default") {
                self.err(
                    &lp,
                    "expected the level \"default\" among the levels (requests without the header get it)",
                );
            }
        }
    }
}

/// The backends a route's own traffic goes to: its split's, or the policy's primary
/// backend when it has no split.
fn primaries<'a>(r: &'a Route, backends: &'a IndexMap<String, Backend>) -> HashSet<&'a str> {
    if r.split.is_empty() {
        let fallback = r.fallback.as_ref().and_then(|f| f.backend.as_deref());
        return backends
            .keys()
            .map(String::as_str)
            .filter(|b| Some(*b) != fallback)
            .take(1)
            .chain(fallback.filter(|_| backends.len() == 1))
            .collect();
    }
    r.split
        .iter()
        .flat_map(|rule| {
            rule.backend.iter().map(String::as_str).chain(
                rule.weights
                    .iter()
                    .flat_map(|w| w.keys().map(String::as_str)),
            )
        })
        .collect()
}

/// An IANA service name, as a Service port's `name` is written.
fn is_port_name(s: &str) -> bool {
    s.len() <= 15 && is_dns_label(s) && s.bytes().any(|b| b.is_ascii_lowercase())
}

/// An upgrade protocol as `Upgrade` carries it: `token ["/" token]`, written lower-case.
fn is_upgrade_token(s: &str) -> bool {
    let token =
        |t: &str| !t.is_empty() && t.bytes().all(|b| is_tchar(b) && !b.is_ascii_uppercase());
    match s.split_once('/') {
        Some((name, version)) => token(name) && token(version),
        None => token(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_and_port_name_syntax() {
        assert!(is_upgrade_token("h2c"));
        assert!(is_upgrade_token("websocket"));
        assert!(is_upgrade_token("proto/2"));
        assert!(!is_upgrade_token("H2C"));
        assert!(!is_upgrade_token("web socket"));
        assert!(!is_upgrade_token("a/"));
        assert!(!is_upgrade_token("a/b/c"));
        assert!(!is_upgrade_token(""));
        assert!(is_port_name("http"));
        assert!(is_port_name("grpc-web"));
        assert!(!is_port_name("8080"));
        assert!(!is_port_name("Http"));
        assert!(!is_port_name("a-name-far-too-long"));
    }
}

#[cfg(test)]
mod policy_tests {
    use crate::parse_policies;

    /// Every second-wave field, written correctly.
    const ALL_FIELDS: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: quote, namespace: shop }
spec:
  host: quote
  backends:
    quote-v1: { service: quote-v1.shop, port: http, slowStart: 0s }
    quote-v2: { service: quote-v2.shop, port: 8080, slowStart: 30s }
    quote-cache: { addresses: ["127.0.0.1:9200"] }
  routes:
    - name: quote
      upgrades: [h2c, proto/2]
      rateLimit: { perSecond: 100, scope: fleet }
      retry: { attempts: 2, on: [reset], backoff: { min: 50ms, max: 200ms } }
      fallback: { on: [breaker-open, timeout], backend: quote-cache }
      split:
        - weights: { quote-v1: 100, quote-v2: 0 }
          stickyBy: { header: x-user-id, hash: rendezvous }
          rollout:
            canary: quote-v2
            steps: [5, 25, 50, 100]
            interval: 30s
            minRequests: 100
            slo: { errorRate: 0.001, p99: 150ms }
            baseline: { errorRateIncrease: 0.005, p99Ratio: 1.5 }
            onInconclusive: rollback
            deadline: 30m
    - name: static
      match: { path: { prefix: /static } }
      fallback:
        on: [no-healthy-endpoint, upstream-unavailable]
        response:
          status: 200
          headers: { content-type: application/json }
          body: '{"degraded":true}'
          grpcStatus: 14
          grpcMessage: degraded
      split:
        - weights: { quote-v1: 1, quote-v2: 99 }
  inbound:
    concurrency:
      adaptive: { minLimit: 4, maxLimit: 2000 }
      queue: { max: 100, timeout: 50ms }
      priority: { header: x-priority, levels: [critical, default, sheddable] }
"#;

    #[test]
    fn every_second_wave_field_used_correctly_is_accepted() {
        if let Err(e) = parse_policies("all.yaml", ALL_FIELDS) {
            panic!("every second-wave field is enforced now: {e}");
        }
    }

    #[test]
    fn new_fields_survive_the_canonical_form() {
        let policy: crate::RoutePolicy = serde_yaml::from_str(ALL_FIELDS).unwrap();
        let text = serde_yaml::to_string(&policy).unwrap();
        let again: crate::RoutePolicy = serde_yaml::from_str(&text).unwrap();
        assert_eq!(policy, again);
        assert!(text.contains("hash: rendezvous"), "{text}");
        assert!(text.contains("port: http"), "{text}");
        assert!(text.contains("port: 8080"), "{text}");
    }
}
