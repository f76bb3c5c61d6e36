//! Parsing and validating one policy file with 1,000 routes, the size at which a
//! control plane's validation of every edit must still feel instant.

use std::fmt::Write;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_config::{PolicySet, parse_policies};

/// A policy of `routes` routes using every governance feature.
fn policy_text(routes: usize) -> String {
    let mut s = String::from(
        "apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: big, namespace: bench }
spec:
  host: big-service
  backends:
    v1: { addresses: [\"127.0.0.1:9101\", \"127.0.0.1:9102\"] }
    v2: { addresses: [\"127.0.0.1:9103\"], identity: \"spiffe://cluster.local/ns/bench/sa/big\" }
  routes:
",
    );
    for i in 0..routes {
        let method = ["GET", "POST", "PUT"][i % 3];
        writeln!(
            s,
            "    - name: route-{i}
      match: {{ path: {{ prefix: /api/r{i} }}, method: {method}, headers: {{ x-tier: gold }} }}
      timeout: 2s
      rateLimit: {{ perSecond: 200, burst: 50, key: {{ header: x-tenant-id }} }}
      retry:
        attempts: 2
        on: [connect-failure, gateway-error]
        perTryTimeout: 500ms
        budget: {{ ratio: 0.2, minPerSecond: 10 }}
      circuitBreaker: {{ consecutiveFailures: 5, openFor: 10s, halfOpenRequests: 2 }}
      split:
        - when: {{ headers: {{ x-canary: \"true\" }} }}
          backend: v2
        - weights: {{ v1: 90, v2: 10 }}
          stickyBy: {{ header: x-user-id }}"
        )
        .expect("writing to a String");
    }
    s
}

fn bench(c: &mut Criterion) {
    let text = policy_text(1_000);
    assert_eq!(
        parse_policies("big.yaml", &text).expect("valid")[0]
            .spec
            .routes
            .len(),
        1_000
    );
    c.bench_function("parse_and_validate_1000_routes", |b| {
        b.iter(|| parse_policies("big.yaml", black_box(&text)).expect("valid"))
    });
    let policies = parse_policies("big.yaml", &text).expect("valid");
    c.bench_function("canonical_form_and_hash_1000_routes", |b| {
        b.iter(|| PolicySet::new(black_box(policies.clone())).expect("valid"))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
