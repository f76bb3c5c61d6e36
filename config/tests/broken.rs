//! The corpus of broken policies: every `tests/broken/NAME.yaml` must be refused
//! with exactly the diagnostics written in `tests/broken/NAME.expected`, one
//! `file:line:col: path: message` per line.
//!
//! After a deliberate change of wording, `SLUICE_BLESS=1 cargo test -p sluice-config
//! --test broken` rewrites the expected files; review the diff before committing.

use std::fs;
use std::path::{Path, PathBuf};

use sluice_config::{PolicySet, parse_policies};

mod hostile;

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("tests/broken exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn diagnostics_of(path: &Path) -> String {
    let name = path.file_name().unwrap().to_str().unwrap();
    let text = fs::read_to_string(path).unwrap();
    match parse_policies(name, &text) {
        Ok(p) => panic!("{name} was accepted ({} policies)", p.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_broken_policy_is_refused_with_its_exact_message() {
    let files = corpus();
    assert!(files.len() >= 30, "corpus too small: {}", files.len());
    let bless = std::env::var_os("SLUICE_BLESS").is_some();
    let mut failures = Vec::new();
    for path in &files {
        let got = diagnostics_of(path);
        let expected_path = path.with_extension("expected");
        if bless {
            fs::write(&expected_path, format!("{got}\n")).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("missing {}", expected_path.display()));
        if expected.trim_end() != got {
            failures.push(format!(
                "{}:\n--- expected\n{}\n--- got\n{got}",
                path.display(),
                expected.trim_end()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Bounds are inclusive: a value equal to its bound is accepted, as a tab in a header
/// value is (the one control character a field value may carry).
#[test]
fn values_at_their_bounds_are_accepted() {
    let text = r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log-service, namespace: shop }
spec:
  host: log-service
  backends:
    log-v1: { addresses: ["127.0.0.1:9101"] }
  routes:
    - name: ingest
      match: { headers: { x-tenant-id: "a\tb" } }
      timeout: 2s
      retry:
        attempts: 2
        on: [timeout]
        perTryTimeout: 2s
        backoff: { base: 1s, max: 1s }
      circuitBreaker: { consecutiveFailures: 3, openFor: 10s, maxOpenFor: 10s }
"#;
    if let Err(e) = parse_policies("bounds.yaml", text) {
        panic!("refused: {e}");
    }
}

/// The second wave's bounds are inclusive too: ratios at 0 and 1, a p99 ratio at 1 and
/// 1000, a static fallback body of exactly 64 KiB, an adaptive limit whose minimum is
/// its maximum, a retry backoff whose minimum is its maximum (given, or the default).
#[test]
fn second_wave_values_at_their_bounds_are_accepted() {
    for (error_rate, increase, p99_ratio, backoff) in [
        (0.0, 1.0, 1.0, "{ min: 100ms, max: 100ms }"),
        (1.0, 0.0, 1000.0, "{ min: 250ms }"),
    ] {
        let text = format!(
            r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: log-service, namespace: shop }}
spec:
  host: log-service
  inbound:
    concurrency:
      adaptive: {{ minLimit: 20, maxLimit: 20 }}
  backends:
    log-v1: {{ addresses: ["127.0.0.1:9101"] }}
    log-v2: {{ addresses: ["127.0.0.1:9102"] }}
  routes:
    - name: ingest
      retry: {{ attempts: 1, backoff: {backoff} }}
      fallback:
        on: [upstream-unavailable]
        response: {{ status: 503, body: "{body}" }}
      split:
        - weights: {{ log-v1: 100, log-v2: 0 }}
          rollout:
            canary: log-v2
            steps: [5, 50, 100]
            slo: {{ errorRate: {error_rate:?} }}
            baseline: {{ errorRateIncrease: {increase:?}, p99Ratio: {p99_ratio:?} }}
"#,
            body = "x".repeat(64 * 1024),
        );
        if let Err(e) = parse_policies("bounds.yaml", &text) {
            panic!("refused: {e}");
        }
    }
}

#[test]
fn the_parse_stops_at_nothing_but_syntax_errors() {
    // Document 1 has a type error, document 2 three semantic errors; all are reported.
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/broken/49-several-errors-several-documents.yaml");
    let text = fs::read_to_string(&path).unwrap();
    let err = parse_policies("f.yaml", &text).unwrap_err();
    let paths: Vec<&str> = err.diagnostics().iter().map(|d| d.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.routes[0].rateLimit.perSecond",
            "spec.routes[0].retry.attempts",
            "spec.routes[0].split[0].weights",
            "spec.routes[1]",
        ]
    );
}

const ORDER_A: &str = "\
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: order, namespace: shop }
spec:
  host: order-service
  inbound: { rateLimit: { perSecond: 10 } }
";

const ORDER_B: &str = "\
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata:
  name: order-again
  namespace: shop
spec:
  host: order-service
  inbound: { rateLimit: { perSecond: 20 } }
";

#[test]
fn a_host_in_two_files_is_refused_with_both_positions() {
    let err = PolicySet::from_files([("a.yaml", ORDER_A), ("b.yaml", ORDER_B)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "b.yaml:7:9: spec.host: host \"order-service\" already has a policy: shop/order at a.yaml:5:9"
    );
}

#[test]
fn an_alias_is_a_host_like_any_other() {
    // Another policy's alias takes the host: refused with both positions.
    let aliased = ORDER_B.replace("order-again", "order-alias").replace(
        "host: order-service\n",
        "host: order-service.shop\n  aliases: [orders, order-service]\n",
    );
    let err =
        PolicySet::from_files([("a.yaml", ORDER_A), ("b.yaml", aliased.as_str())]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "b.yaml:8:21: spec.aliases[1]: host \"order-service\" already has a policy: shop/order at a.yaml:5:9"
    );
    // A malformed alias, or one naming the policy's own host, points at the entry.
    let bad = ORDER_B.replace(
        "host: order-service\n",
        "host: order-service\n  aliases: [Orders:80, order-service]\n",
    );
    let err = PolicySet::from_files([("b.yaml", bad.as_str())]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "b.yaml:8:13: spec.aliases[0]: expected a lower-case host name without scheme or port (e.g. \"log-service.prod\"), got \"Orders:80\"\n\
         b.yaml:8:24: spec.aliases[1]: \"order-service\" is already a name of this policy"
    );
}

#[test]
fn a_name_in_two_files_is_refused() {
    let renamed = ORDER_B
        .replace("order-again", "order")
        .replace("order-service", "billing");
    let err =
        PolicySet::from_files([("a.yaml", ORDER_A), ("b.yaml", renamed.as_str())]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "b.yaml:4:9: metadata.name: duplicate policy shop/order (also at a.yaml:3:19)"
    );
}

#[test]
fn hostile_files_too_large_to_keep_are_refused_with_their_exact_message() {
    for (name, text, expected) in hostile::cases() {
        let got = match parse_policies(name, &text) {
            Ok(p) => panic!("{name} was accepted ({} policies)", p.len()),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn the_policies_of_a_set_count_together() {
    let limits = sluice_config::Limits {
        max_policies: 1,
        ..Default::default()
    };
    let err = PolicySet::from_files_with([("a.yaml", ORDER_A), ("b.yaml", ORDER_B)], &limits)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "b.yaml:1:1: more than 1 policies (--policy-max-policies)"
    );
}
