//! The Grafana dashboard and the alert rules in `charts/sluice/dashboards/` use only
//! metrics that a running proxy and control plane export: every `sluice_*` name in
//! their expressions is checked against real scrapes after real traffic.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hyper::StatusCode;
use sluice_e2e::{HttpConn, ProxyOptions, TestControlPlane, TestProxy, Upstream, wait_until};

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sluice/dashboards")
}

/// Every PromQL expression of the dashboard: panel targets and template queries.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", serde_json::Value::String(s))
                        if s.contains("sluice_") =>
                    {
                        out.push(s.clone())
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, out)),
        _ => {}
    }
}

/// `sluice_…` metric names in a PromQL expression. Recording rules' own names
/// (`sluice:…`) are not exported series and do not match.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("sluice_") {
        let preceded = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded && !tail[end..].starts_with(':') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// Family names and their types from a Prometheus text scrape (`# TYPE name type`).
fn families(scrape: &str) -> Vec<(String, String)> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// Whether `name` is exported: a family itself, or a histogram's `_bucket`/`_sum`/`_count`.
fn exported(name: &str, families: &[(String, String)]) -> bool {
    families.iter().any(|(f, t)| {
        f == name
            || (t == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f.as_str())))
    })
}

fn policy(backend: std::net::SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: log-service, namespace: e2e }}
spec:
  host: log-service
  backends:
    log: {{ addresses: ["{backend}"] }}
  routes:
    - name: flaky
      match: {{ path: {{ prefix: /status }} }}
      retry: {{ attempts: 2, on: [gateway-error], backoff: {{ base: 1ms, max: 2ms }} }}
      circuitBreaker: {{ consecutiveFailures: 1, openFor: 30s }}
    - name: logs
      rateLimit: {{ perSecond: 1000 }}
"#
    )
}

#[test]
fn every_expression_names_only_known_sluice_metrics_or_none_at_all() {
    // The scanner itself, on the shapes the files use.
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(sluice_request_duration_seconds_bucket{route=~\"$route\"}[5m]))) / sluice:route_error_ratio:rate5m",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["sluice_request_duration_seconds_bucket"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alert_rules_use_is_exported() {
    let dir = dashboards_dir();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sluice-mesh.json")).unwrap())
            .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() > 10));
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("alerts.yaml")).unwrap())
            .expect("the alert rules are YAML");
    assert_eq!(rules["kind"].as_str(), Some("PrometheusRule"));
    let mut alerts = 0;
    for group in rules["spec"]["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            alerts += usize::from(rule.get("alert").is_some());
            exprs.push(expr.to_string());
        }
    }
    assert!(alerts >= 5, "alerts: {alerts}");
    let mut used = BTreeSet::new();
    for e in &exprs {
        let names = metric_names(e);
        assert!(
            !names.is_empty() || e.contains("sluice:"),
            "expression uses no Sluice metric: {e}"
        );
        used.extend(names);
    }
    // The SLO rules are there.
    assert!(
        exprs.iter().any(|e| e.contains("> 0.150")),
        "p99 < 150 ms rule"
    );
    assert!(
        exprs.iter().any(|e| e.contains("0.001")),
        "0.1 % error rule"
    );

    // A control plane, a proxy subscribed to it, and traffic that makes every family
    // of the proxy hold a series: successes, retries, a breaker that opens, rate-limit
    // decisions.
    let app = Upstream::http1("log-app").await;
    let cp = TestControlPlane::start(&[("log.yaml", &policy(app.addr()))]).await;
    let state = tempfile::tempdir().unwrap();
    let proxy =
        TestProxy::start_subscribed(&cp.url(), "dash-1", state.path(), ProxyOptions::default())
            .await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for _ in 0..3 {
        let r = conn.get("log-service", "/logs").await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = conn.get("log-service", "/status/503").await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    // A refused policy file counts on the control plane, which keeps serving the last good.
    cp.write_policy(
        "broken.yaml",
        "apiVersion: sluice.dev/v1alpha1\nkind: Nope\n",
    );
    let cp_admin = cp.admin_addr();
    wait_until(
        "the control plane counts the refused file",
        sluice_e2e::WAIT,
        || async move {
            let (_, body) = admin_get(cp_admin, "/metrics").await;
            body.lines().any(|l| {
                l.starts_with("sluice_cp_validation_failures_total ") && !l.ends_with(" 0")
            })
        },
    )
    .await;

    let (status, proxy_scrape) = proxy.admin_get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let (status, cp_scrape) = admin_get(cp_admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let mut exported_families = families(&proxy_scrape);
    exported_families.extend(families(&cp_scrape));

    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !exported(n, &exported_families))
        .collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or alert rules but not exported: {missing:?}\nproxy:\n{proxy_scrape}\ncontrol plane:\n{cp_scrape}"
    );
    proxy.shutdown().await;
}

async fn admin_get(addr: std::net::SocketAddr, path: &str) -> (StatusCode, String) {
    let mut conn = HttpConn::h1(addr).await.unwrap();
    let r = conn.get(&addr.to_string(), path).await.unwrap();
    (r.status, r.text())
}
