//! What bounding policy input costs, and how validation grows with routes once the
//! caps are raised: the unreachable-route check indexes earlier routes instead of
//! comparing every pair, so 10× the routes should cost about 10× the time.

use std::fmt::Write;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sluice_config::{Limits, parse_policies_with};

/// One policy of `routes` small routes with distinct path prefixes.
fn routes_text(routes: usize) -> String {
    let mut s = String::from(
        "apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: many, namespace: bench }
spec:
  host: many-routes
  backends:
    v1: { addresses: [\"127.0.0.1:9101\"] }
  routes:
",
    );
    for i in 0..routes {
        writeln!(
            s,
            "    - {{ name: r{i}, match: {{ path: {{ prefix: /api/r{i} }}, method: GET }}, split: [{{ backend: v1 }}] }}"
        )
        .expect("writing to a String");
    }
    s
}

fn bench(c: &mut Criterion) {
    let raised = Limits {
        max_file_bytes: usize::MAX,
        max_total_bytes: usize::MAX,
        max_nodes: usize::MAX,
        max_routes: usize::MAX,
        ..Limits::default()
    };
    let mut group = c.benchmark_group("parse_and_validate_routes");
    group.sample_size(10);
    for n in [1_000, 10_000, 100_000] {
        let text = routes_text(n);
        let parsed = parse_policies_with("many.yaml", &text, &raised).expect("valid");
        assert_eq!(parsed[0].spec.routes.len(), n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &text, |b, text| {
            b.iter(|| parse_policies_with("many.yaml", black_box(text), &raised).expect("valid"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
