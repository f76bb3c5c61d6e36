//! Hostile policy files (alias fan-out, nesting 100,000 levels deep, oversized, too
//! many routes or policies) against the real binaries: `validate`, a proxy starting
//! on one, a proxy whose file is edited into one, and the control plane's watched
//! directory. Each refuses with file:line and a clear message and keeps running, with
//! the last good policy in force.

use std::path::Path;
use std::process::Command;

use hyper::StatusCode;
use sluice_e2e::{
    ChildProxy, HttpConn, TestControlPlane, Upstream, WAIT, single_backend_policy, wait_until,
};

#[path = "../../../config/tests/hostile/mod.rs"]
mod hostile;

fn bin() -> &'static Path {
    env!("CARGO_BIN_EXE_e2e-proxy").as_ref()
}

/// The refusal's text after `file:`, which is named differently by each program.
fn after_file(expected: &str) -> &str {
    expected.split_once(':').map_or(expected, |(_, rest)| rest)
}

#[test]
fn validate_refuses_every_hostile_file_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, expected) in hostile::cases() {
        let path = dir.path().join(name);
        std::fs::write(&path, &text).unwrap();
        let out = Command::new(bin())
            .arg("validate")
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{name}: {stdout}");
        assert_eq!(
            stdout.trim_end(),
            format!("{}:{}", path.display(), after_file(&expected)),
            "{name}"
        );
    }
}

#[test]
fn validate_takes_raised_limits_by_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, hostile::routes(1_001)).unwrap();
    let out = Command::new(bin())
        .args(["validate", "--policy-max-routes", "2000"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.starts_with("ok  "), "{stdout}");
}

/// The hostile files a live proxy and the control plane are fed.
fn live_cases() -> Vec<(&'static str, String, String)> {
    hostile::cases()
        .into_iter()
        .filter(|(name, ..)| {
            [
                "alias-fan-out.yaml",
                "deep-block-nesting.yaml",
                "deep-block-mappings.yaml",
                "oversized.yaml",
                "too-many-routes.yaml",
            ]
            .contains(name)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_survives_hostile_files_at_start_and_on_edit() {
    let upstream = Upstream::auto("good").await;
    let good = single_backend_policy("svc", "svc", upstream.addr());
    for (name, text, expected) in live_cases() {
        // Started on it: refused, not ready, alive; then a good edit is served.
        let proxy = ChildProxy::spawn_unready(bin(), &text, &[]).await;
        let message = after_file(&expected).to_string();
        wait_until("the hostile file is refused", WAIT, || {
            let proxy = &proxy;
            let message = message.clone();
            async move {
                let v = proxy.admin_json("/config").await;
                v["last_rejected"]["error"]
                    .as_str()
                    .is_some_and(|e| e.ends_with(&message))
            }
        })
        .await;
        assert!(proxy.is_alive(), "{name}:\n{}", proxy.log());
        assert!(proxy.admin_json("/config").await["version"].is_null());
        proxy.write_policy(&good);
        wait_until("the good edit is applied", WAIT, || async {
            !proxy.admin_json("/config").await["version"].is_null()
        })
        .await;
        let version = proxy.admin_json("/config").await["version"].clone();

        // Edited into it: refused, alive, the good policy still in force and serving.
        proxy.write_policy(&text);
        wait_until("the hostile edit is refused", WAIT, || {
            let proxy = &proxy;
            let message = message.clone();
            async move {
                proxy.admin_json("/config").await["last_rejected"]["error"]
                    .as_str()
                    .is_some_and(|e| e.ends_with(&message))
            }
        })
        .await;
        assert!(proxy.is_alive(), "{name}:\n{}", proxy.log());
        assert_eq!(
            proxy.admin_json("/config").await["version"],
            version,
            "{name}"
        );
        let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
        let reply = conn.get("svc", "/").await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_refuses_hostile_files_and_keeps_watching() {
    let upstream = Upstream::auto("good").await;
    let good = single_backend_policy("svc", "svc", upstream.addr());
    let cp = TestControlPlane::start(&[("good.yaml", &good)]).await;
    let v1 = cp.version().expect("the good file is in force");
    for (name, text, expected) in live_cases() {
        // A new hostile file beside the good one, and the good one edited into it.
        cp.write_policy(name, &text);
        cp.write_policy("good.yaml", &text);
        let message = after_file(&expected).to_string();
        wait_until("both files are refused", WAIT, || {
            let cp = &cp;
            let message = message.clone();
            async move {
                let v = cp.admin_json("/policies").await;
                let refused = |file: &str| {
                    v["files"].as_array().into_iter().flatten().any(|f| {
                        f["file"] == file
                            && f["error"].as_str().is_some_and(|e| e.ends_with(&message))
                    })
                };
                refused(name) && refused("good.yaml")
            }
        })
        .await;
        assert_eq!(cp.version().as_deref(), Some(v1.as_str()), "{name}");
        std::fs::remove_file(cp.policy_dir().join(name)).unwrap();
        cp.write_policy("good.yaml", &good);
    }
    // The watcher still follows edits: a changed good file is served.
    let changed = single_backend_policy("svc", "svc", upstream.addr()) + "# changed\n";
    cp.write_policy("good.yaml", &changed);
    wait_until("the watcher still applies edits", WAIT, || async {
        cp.admin_json("/policies").await["files"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|f| f["error"].is_null())
    })
    .await;
}

/// A second document that repeats a key and then names an anchor of the first one
/// (anchors do not carry over between documents): serde_yaml once left the rest of that
/// document to be read as the next one and panicked, which ended the proxy's and the
/// control plane's file watchers: every later edit went unseen until a restart.
fn alias_to_another_document(good: &str) -> String {
    let first = good.replacen("  backends:\n", "  backends: &b\n", 1);
    let second = good
        .replacen("name: svc,", "name: other,", 1)
        .replacen("  host: svc\n", "  host: other\n  host: other\n", 1)
        .replacen(
            "  backends:\n    only: {",
            "  backends: *b\n  unused:\n    only: {",
            1,
        );
    // The alias last in its mapping: what is left of the document is two mapping ends.
    let (head, tail) = second.split_once("  backends: *b\n").unwrap();
    format!("{first}---\n{head}{tail}  backends: *b\n")
}

const ALIAS_REFUSAL: &str = "invalid YAML: unknown anchor";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_refuses_an_alias_to_another_documents_anchor_and_takes_later_edits() {
    let upstream = Upstream::auto("good").await;
    let good = single_backend_policy("svc", "svc", upstream.addr());
    let bad = alias_to_another_document(&good);
    let proxy = ChildProxy::spawn(bin(), &good, &[]).await;
    let version = proxy.admin_json("/config").await["version"].clone();

    proxy.write_policy(&bad);
    wait_until("the edit is refused", WAIT, || async {
        proxy.admin_json("/config").await["last_rejected"]["error"]
            .as_str()
            .is_some_and(|e| e.ends_with(ALIAS_REFUSAL) && e.contains("duplicate key"))
    })
    .await;
    assert_eq!(proxy.admin_json("/config").await["version"], version);

    // The watcher still follows edits.
    proxy.write_policy(&good.replace("- name: all", "- name: every"));
    wait_until("a later edit is applied", WAIT, || async {
        proxy.admin_json("/config").await["version"] != version
    })
    .await;
    assert!(proxy.is_alive(), "{}", proxy.log());
    assert!(!proxy.log().contains("panicked"), "{}", proxy.log());
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    assert_eq!(conn.get("svc", "/").await.unwrap().status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_refuses_an_alias_to_another_documents_anchor_and_keeps_watching() {
    let upstream = Upstream::auto("good").await;
    let good = single_backend_policy("svc", "svc", upstream.addr());
    let cp = TestControlPlane::start(&[("good.yaml", &good)]).await;
    let v1 = cp.version().expect("the good file is in force");
    cp.write_policy("good.yaml", &alias_to_another_document(&good));
    wait_until("the edit is refused", WAIT, || async {
        cp.admin_json("/policies").await["files"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| {
                f["error"]
                    .as_str()
                    .is_some_and(|e| e.ends_with(ALIAS_REFUSAL))
            })
    })
    .await;
    assert_eq!(cp.version().as_deref(), Some(v1.as_str()));
    cp.write_policy("good.yaml", &good.replace("- name: all", "- name: every"));
    wait_until("a later edit is served", WAIT, || async {
        cp.version().is_some_and(|v| v != v1)
    })
    .await;
}
