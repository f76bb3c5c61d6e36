//! What `sluicectl` says when the answer is not the usual one: `-o json` gives one
//! JSON document whatever the outcome, a bad argument is a bad flag (exit 2) before
//! any admin API is asked, and an ended rollout, a check without data and a proxy
//! without breakers are each told as they are.

use std::path::Path;
use std::process::{Command, Output};

use sluice_e2e::rollout::{FILE, rollout_policy};
use sluice_e2e::{TestControlPlane, TestProxy};

/// Runs `sluicectl ARGS` with no `SLUICECTL_*` from the environment leaking in.
fn sluicectl(args: &[&str]) -> Output {
    let bin: &Path = env!("CARGO_BIN_EXE_e2e-sluicectl").as_ref();
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars() {
        if k.starts_with("SLUICECTL_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).output().expect("run sluicectl")
}

/// The one JSON document on stdout, and the exit code.
fn json(o: &Output) -> (Option<i32>, serde_json::Value) {
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code(), v)
}

/// An address nothing listens on.
fn closed() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

/// A control plane holding the rollout `e2e/log/ingest` at its first step.
async fn control_plane() -> TestControlPlane {
    let block = "            canary: v2
            steps: [10, 50, 100]
            interval: 10m
            minRequests: 1
            slo: { errorRate: 0.01 }
";
    TestControlPlane::start(&[(FILE, &policy(block))]).await
}

/// The `log` policy with the rollout block `block`; its backends are never called.
fn policy(block: &str) -> String {
    rollout_policy(
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
        block,
        "",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_commands_answer_json_whatever_the_outcome() {
    let cp = control_plane().await;
    let url = format!("http://{}", cp.admin_addr());
    let id = "e2e/log/ingest";
    let run = |action: &str, id: &str| {
        sluicectl(&["--control-plane", &url, "-o", "json", "rollout", action, id])
    };

    // Done: the control plane's answer is the transition, as an object.
    let (code, v) = json(&run("pause", id));
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["done"], true, "{v:#}");
    assert_eq!(v["answer"]["result"], "paused", "{v:#}");
    assert_eq!(v["now"]["phase"], "paused", "{v:#}");

    // Refused (409) and no such rollout (404): answers of no, exit 1, still JSON.
    let (code, v) = json(&run("pause", id));
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(
        (v["done"].clone(), v["status"].clone()),
        (false.into(), 409.into()),
        "{v:#}"
    );
    assert!(v["refused"].as_str().unwrap().contains("paused"), "{v:#}");
    let (code, v) = json(&run("abort", "e2e/log/nope"));
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(v["status"], 404, "{v:#}");

    // A control plane that cannot be reached: exit 3, and the error as JSON.
    let down = closed();
    let out = sluicectl(&[
        "--control-plane",
        &down,
        "-o",
        "json",
        "rollout",
        "abort",
        id,
    ]);
    let (code, v) = json(&out);
    assert_eq!(code, Some(3), "{v:#}");
    assert_eq!(v["exitCode"], 3, "{v:#}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("cannot reach the control plane admin"),
        "{v:#}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "still one line on stderr: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_argument_is_a_bad_flag_before_any_request() {
    let cp = control_plane().await;
    let up = format!("http://{}", cp.admin_addr());
    let down = closed();
    // The same exit code whether the admin API is up or not: nothing was asked.
    for url in [&up, &down] {
        let out = sluicectl(&["--control-plane", url, "rollout", "status", "a/b"]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (code, v) = json(&sluicectl(&[
            "--control-plane",
            url,
            "-o",
            "json",
            "rollout",
            "status",
            "a/b",
        ]));
        assert_eq!(
            (code, v["exitCode"].clone()),
            (Some(2), 2.into()),
            "{url}: {v:#}"
        );
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("is not <namespace>/<policy>/<route>"),
            "{v:#}"
        );

        let out = sluicectl(&["--proxy", url, "tap", "--status", "999"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {err}");
        assert!(
            err.starts_with("sluicectl: --status \"999\": expected"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_a_check_without_data_and_a_rollout_promoted_by_hand() {
    let cp = control_plane().await;
    let url = format!("http://{}", cp.admin_addr());
    let id = "e2e/log/ingest";
    let status = || {
        let out = sluicectl(&["--control-plane", &url, "rollout", "status", id]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // No proxy, no request: the open window's errorRate has no data, and says so.
    let (_, v) = json(&sluicectl(&[
        "--control-plane",
        &url,
        "-o",
        "json",
        "rollout",
        "status",
        id,
    ]));
    let checks = &v["rollouts"][0]["currentWindow"]["checks"];
    let error_rate = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "errorRate")
        .unwrap();
    assert_eq!(error_rate["verdict"], "not-judged", "{v:#}");
    assert_eq!(error_rate["note"], "no canary requests", "{v:#}");
    let text = status();
    assert!(text.contains("not-judged (no canary requests)"), "{text}");
    assert!(text.contains("1/3 (10%)"), "{text}");

    let out = sluicectl(&["--control-plane", &url, "rollout", "promote", id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = status();
    let first = text.lines().nth(1).unwrap();
    assert!(first.contains("promoted at 1/3"), "{text}");
    assert!(first.contains("v1 0, v2 100"), "{text}");
    assert!(
        !first.contains("(10%)"),
        "no stale step beside the weights: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_says_no_route_sets_one_when_policies_are_loaded() {
    let proxy = TestProxy::start(&policy(
        "            canary: v2\n            steps: [10, 100]\n",
    ))
    .await;
    let url = format!("http://{}", proxy.admin_addr());
    let out = sluicectl(&["--proxy", &url, "breakers"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text,
        format!("{url}: no breakers: no route sets circuitBreaker (1 route in force)\n")
    );
    proxy.shutdown().await;
}

/// A command line the parser refuses is a bad flag (exit 2) and, with `-o json`
/// (or `SLUICECTL_OUTPUT=json`), still one JSON document; help is not an error.
#[test]
fn a_refused_command_line_answers_json_when_json_was_asked_for() {
    let (code, v) = json(&sluicectl(&["-o", "json", "rollout", "pause"]));
    assert_eq!((code, v["exitCode"].clone()), (Some(2), 2.into()), "{v:#}");
    assert_eq!(
        v["error"],
        "the following required arguments were not provided: <ROLLOUT>"
    );
    let out = sluicectl(&["rollout", "--output=json", "--no-such-flag"]);
    let (code, v) = json(&out);
    assert_eq!(code, Some(2), "{v:#}");
    assert!(
        v["error"].as_str().unwrap().contains("--no-such-flag"),
        "{v:#}"
    );
    let out = sluicectl(&["-o", "json", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Usage: ") && !help.contains("exitCode"),
        "{help}"
    );
    let out = sluicectl(&["rollout", "pause"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "no JSON unless asked for");
    // The same for a command that runs and fails: the error on stderr only.
    let out = sluicectl(&["--proxy", "ftp://x", "breakers"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty(), "no JSON unless asked for");
    assert!(err.starts_with("sluicectl: "), "{err}");
}
