//! The shipped binary turns transparent huge pages off for itself as it loads (a
//! sidecar's heap is a few MiB; a huge page would map 2 MiB at a time), unless
//! `MIMALLOC_ALLOW_THP` is set.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const POLICY: &str = "apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: thp, namespace: test }
spec:
  host: thp
  backends:
    app: { addresses: [\"127.0.0.1:9\"] }
  routes:
    - name: all
";

/// `THP_enabled` of `pid`'s status, or `None` on kernels that do not show it.
fn thp_enabled(pid: u32) -> Option<u8> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs the proxy until it has bound its ports (its address file is written, so it is
/// well past `main`), and returns it.
fn run_proxy(dir: &Path, allow_thp: bool) -> Child {
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let addr_file = dir.join(format!("addrs-{allow_thp}.json"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice-proxy"));
    cmd.args(["run", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--no-inbound", "--log-level", "warn", "--policy"])
        .arg(&policy)
        .arg("--addr-file")
        .arg(&addr_file)
        .env_remove("MIMALLOC_ALLOW_THP")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if allow_thp {
        cmd.env("MIMALLOC_ALLOW_THP", "1");
    }
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    while !addr_file.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the proxy exited early"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the proxy wrote no address file in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn the_proxy_runs_without_huge_pages_unless_mimalloc_is_told_otherwise() {
    let Some(own) = thp_enabled(std::process::id()) else {
        eprintln!("this kernel does not report THP_enabled; nothing to check");
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    let mut proxy = run_proxy(dir.path(), false);
    let off = thp_enabled(proxy.id());
    proxy.kill().unwrap();
    proxy.wait().unwrap();
    assert_eq!(off, Some(0), "huge pages stayed on for the proxy");

    let mut proxy = run_proxy(dir.path(), true);
    let kept = thp_enabled(proxy.id());
    proxy.kill().unwrap();
    proxy.wait().unwrap();
    assert_eq!(
        kept,
        Some(own),
        "MIMALLOC_ALLOW_THP=1 leaves the system's setting"
    );
}
