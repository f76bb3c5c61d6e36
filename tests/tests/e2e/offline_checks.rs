//! Files checked offline by the command lines: `sluicectl validate` refuses a route
//! that could never match, and `sluice-control-plane convert` refuses what the
//! HTTPRoute CRD forbids.

use std::path::Path;
use std::process::{Command, Output};

/// Runs a binary of this crate with `args`.
fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env_remove("SLUICECTL_CONTROL_PLANE")
        .env_remove("SLUICECTL_PROXY")
        .env_remove("SLUICECTL_TOKEN_FILE")
        .output()
        .expect("run the binary")
}

fn sluicectl(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_e2e-sluicectl"), args)
}

fn control_plane(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_e2e-control-plane"), args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_string()
}

/// An HTTPRoute on Service `echo` with one rule of `matches` and backendRefs
/// `backends` (`name: weight`, each on port 8080).
fn httproute(matches: &str, backends: &[(&str, u32)]) -> String {
    let refs: String = backends
        .iter()
        .map(|(name, w)| format!("        - {{ name: {name}, port: 8080, weight: {w} }}\n"))
        .collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: echo-route, namespace: shop }}
spec:
  parentRefs: [{{ group: \"\", kind: Service, name: echo, port: 80 }}]
  rules:
    - matches: {matches}
      backendRefs:
{refs}"
    )
}

#[test]
fn validate_refuses_a_route_path_with_a_dot_segment_and_says_what_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "dots.yaml",
        "apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log, namespace: shop }
spec:
  host: log
  backends:
    v1: { addresses: [\"127.0.0.1:9101\"] }
  routes:
    - name: admin
      match: { path: { prefix: /logs/%2E%2e/admin } }
",
    );
    let out = sluicectl(&["validate", &file]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(
        said.contains(&format!(
            "{file}:10:32: spec.routes[0].match.path.prefix: \"/logs/%2E%2e/admin\" has the dot-segment \"%2E%2e\""
        )) && said.contains("write \"/admin\""),
        "{said}"
    );
}

#[test]
fn convert_refuses_paths_the_httproute_crd_forbids() {
    let dir = tempfile::tempdir().unwrap();
    for (value, says) in [
        ("/a//b", "must not contain \"//\", an empty segment"),
        ("/a/../b", "must not contain \"/../\", a dot-segment"),
        ("/a%2Fb", "must not contain \"%2F\", an encoded slash"),
    ] {
        let file = write(
            dir.path(),
            "route.yaml",
            &httproute(
                &format!("[{{ path: {{ type: Exact, value: \"{value}\" }} }}]"),
                &[("echo-v1", 1)],
            ),
        );
        let out = control_plane(&["convert", &file]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{value}: {err}");
        assert!(out.stdout.is_empty(), "{value}");
        assert!(
            err.contains("spec.rules[0].matches[0].path.value: path")
                && err.contains(says)
                && err.contains("the Gateway API forbids it in Exact and PathPrefix matches"),
            "{value}: {err}"
        );
    }
}

/// `convert -o FILE` writes a file `sluicectl validate` (and the control plane's
/// policy directory) takes: backendRef weights of another total become percentages,
/// with a warning where rounding changed their ratio.
#[test]
fn convert_writes_a_file_validate_takes_whatever_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let backends = |w: [u32; 3]| [("echo-v1", w[0]), ("echo-v2", w[1]), ("echo-v3", w[2])];
    for (w, percent, warns) in [
        (
            [3, 0, 7],
            "echo-v1-8080: 30 echo-v2-8080: 0 echo-v3-8080: 70",
            false,
        ),
        (
            [1, 1, 1],
            "echo-v1-8080: 34 echo-v2-8080: 33 echo-v3-8080: 33",
            true,
        ),
    ] {
        let route = write(
            dir.path(),
            "route.yaml",
            &httproute(
                "[{ path: { type: PathPrefix, value: /api } }]",
                &backends(w),
            ),
        );
        let out_file = dir.path().join("out.yaml");
        let out_file = out_file.to_str().unwrap();
        let out = control_plane(&["convert", &route, "-o", out_file]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{w:?}: {err}");
        assert_eq!(
            err.starts_with(
                "warning: policy shop/httproute-echo, route echo-route-0-0: backendRef weights"
            ),
            warns,
            "{w:?}: {err}"
        );
        let written = std::fs::read_to_string(out_file).unwrap();
        let flat: String = written.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains(percent), "{w:?}: {written}");

        let out = sluicectl(&["validate", out_file]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{w:?}: {}{}\n{written}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}
