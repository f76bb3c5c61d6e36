//! Route selection cost at 10 and 10,000 hosts: it should not grow with the host count.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use sluice_config::{Metadata, PathMatch, Route, RouteMatch, RoutePolicy, RoutePolicySpec};
use sluice_proxy::RouteTable;

fn route(name: &str, exact: Option<&str>, prefix: Option<&str>, method: Option<&str>) -> Route {
    Route {
        name: name.into(),
        matches: RouteMatch {
            path: (exact.is_some() || prefix.is_some()).then(|| PathMatch {
                exact: exact.map(Into::into),
                prefix: prefix.map(Into::into),
            }),
            method: method.map(Into::into),
            headers: Default::default(),
        },
        ..Default::default()
    }
}

fn policies(hosts: usize) -> Vec<RoutePolicy> {
    (0..hosts)
        .map(|i| RoutePolicy {
            api_version: sluice_config::API_VERSION.into(),
            kind: sluice_config::KIND.into(),
            metadata: Metadata {
                name: format!("svc-{i}"),
                ..Default::default()
            },
            spec: RoutePolicySpec {
                host: format!("svc-{i}.shop.svc.cluster.local"),
                routes: vec![
                    route("health", Some("/health"), None, None),
                    route("writes", None, Some("/api"), Some("POST")),
                    route("canary", None, Some("/api"), None),
                    route("api", None, Some("/api"), None),
                    route("default", None, None, None),
                ],
                ..Default::default()
            },
        })
        .map(|mut p| {
            p.spec.routes[2]
                .matches
                .headers
                .insert("x-canary".into(), "true".into());
            p
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_select");
    let mut headers = HeaderMap::new();
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    for hosts in [10usize, 10_000] {
        let (table, _) =
            RouteTable::build(&policies(hosts), |p, i| Ok(p.spec.routes[i].name.clone())).unwrap();
        let host = format!("svc-{}.shop.svc.cluster.local:80", hosts / 2);
        assert_eq!(
            table
                .select(&host, &Method::GET, "/api/orders/17", &headers)
                .map(String::as_str),
            Some("api")
        );
        group.bench_with_input(BenchmarkId::new("hosts", hosts), &host, |b, host| {
            b.iter(|| {
                table.select(
                    black_box(host),
                    &Method::GET,
                    black_box("/api/orders/17"),
                    &headers,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
