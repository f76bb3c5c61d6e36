//! The command line of the real binary: `validate`, settings from `SLUICE_*`, one worker
//! thread, and what it logs about endpoints it cannot reach.

use std::path::{Path, PathBuf};
use std::process::Command;

use hyper::{Method, StatusCode};
use sluice_e2e::{ChildProxy, HttpConn, Upstream, single_backend_policy};

fn bin() -> &'static Path {
    env!("CARGO_BIN_EXE_e2e-proxy").as_ref()
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

#[test]
fn validate_accepts_the_shipped_policies_and_locates_errors() {
    // Every policy the project ships validates.
    let mut files = vec![repo_file("examples/demo/policies/log-service.yaml")];
    let dir = repo_file("examples/policies");
    for entry in std::fs::read_dir(&dir).expect("examples/policies") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    let out = Command::new(bin())
        .arg("validate")
        .args(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "validate failed:\n{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok")).count(),
        files.len(),
        "{stdout}"
    );
    // Each line counts the file's policies, in the right number.
    let said = |file: &str| {
        let path = repo_file(&format!("examples/policies/{file}"));
        let prefix = format!("ok  {} (", path.display());
        let line = stdout.lines().find(|l| l.starts_with(&prefix));
        let line = line.unwrap_or_else(|| panic!("no line for {file}:\n{stdout}"));
        line[prefix.len()..]
            .split(", hash")
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(said("routing.yaml"), "1 policy");
    assert_eq!(said("multi-document.yaml"), "2 policies");

    // A broken one is refused with file, line and column, and a failing exit code.
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken.yaml");
    let text =
        single_backend_policy("b", "b", "127.0.0.1:1".parse().unwrap()) + "      retriez: 3\n";
    std::fs::write(&broken, text).unwrap();
    let out = Command::new(bin())
        .arg("validate")
        .arg(&broken)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a broken policy validated:\n{stdout}"
    );
    let located = format!("{}:", broken.display());
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&located) && l.contains("retriez")),
        "no file:line:column diagnostic naming the field:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_takes_its_settings_from_sluice_environment_variables() {
    let upstream = Upstream::auto("env").await;
    let mut proxy = ChildProxy::spawn_with_env(
        bin(),
        &single_backend_policy("env", "env", upstream.addr()),
        &[],
    )
    .await;
    assert!(
        proxy.inbound_addr().is_none(),
        "SLUICE_NO_INBOUND took effect"
    );
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let reply = conn.get("env", "/").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-upstream"), "env");
    let config = proxy.admin_json("/config").await;
    assert!(config["version"].is_string(), "{config}");
    // The log level changes at run time, and a bad one is refused.
    let (status, body) = proxy.admin_send(Method::PUT, "/log-level", "debug").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = proxy
        .admin_send(Method::PUT, "/log-level", "sluice_proxy=loudest")
        .await;
    assert!(status.is_client_error(), "{status} {body}");

    proxy.sigterm();
    let status = proxy.wait_exit(sluice_e2e::WAIT).await;
    assert_eq!(status.code(), Some(0), "{}", proxy.log());
}

/// The names of the proxy's worker threads, sorted.
fn worker_threads(proxy: &ChildProxy) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", proxy.pid()))
        .expect("the proxy's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .filter(|name| name.starts_with("sluice-worker"))
        .collect();
    names.sort();
    names
}

/// A policy for host `name` with one route, `all` (then `route_fields`), to `upstream`.
fn one_route_policy(name: &str, upstream: std::net::SocketAddr, route_fields: &str) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: {name} }}
spec:
  host: {name}
  backends:
    app: {{ addresses: [\"{upstream}\"] }}
  routes:
    - name: all
{route_fields}"
    )
}

/// `--worker-threads 2` starts two worker threads beside the main one, which serve
/// the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_threads_run_beside_the_main_one() {
    let upstream = Upstream::auto("two").await;
    let policy = one_route_policy("two", upstream.addr(), "");
    let mut proxy = ChildProxy::spawn(bin(), &policy, &["--worker-threads", "2"]).await;
    // A thread takes its name once it runs: a busy machine may not have run one yet.
    let named = &proxy;
    sluice_e2e::wait_until(
        "both worker threads are named",
        sluice_e2e::WAIT,
        || async move { worker_threads(named).len() == 2 },
    )
    .await;
    assert_eq!(
        worker_threads(&proxy),
        ["sluice-worker-1", "sluice-worker-2"]
    );
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    let reply = conn.get("two", "/").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", proxy.log());
    proxy.sigterm();
    let status = proxy.wait_exit(sluice_e2e::WAIT).await;
    assert_eq!(status.code(), Some(0), "{}", proxy.log());
}

/// `--worker-threads 1` runs a current-thread runtime: the proxy still serves both
/// protocols, with the retry layer's per-try timer on the route, and stops on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_on_one_worker_thread_serves_both_protocols_and_stops() {
    let upstream = Upstream::auto("one").await;
    let policy = one_route_policy(
        "one",
        upstream.addr(),
        "      timeout: 2s
      retry: { attempts: 2, on: [connect-failure, gateway-error], perTryTimeout: 500ms }
",
    );
    let mut proxy = ChildProxy::spawn(bin(), &policy, &["--worker-threads", "1"]).await;
    // One thread serves everything: no worker threads beside it.
    assert_eq!(worker_threads(&proxy), Vec::<String>::new());
    for mut conn in [
        HttpConn::h1(proxy.outbound_addr()).await.unwrap(),
        HttpConn::h2(proxy.outbound_addr()).await.unwrap(),
    ] {
        for _ in 0..3 {
            let reply = conn.get("one", "/").await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{}", proxy.log());
            assert_eq!(reply.header("x-upstream"), "one");
        }
    }
    proxy.sigterm();
    let status = proxy.wait_exit(sluice_e2e::WAIT).await;
    assert_eq!(status.code(), Some(0), "{}", proxy.log());
}

/// An endpoint the proxy cannot connect to is logged once, at WARN, with why (a name
/// that does not resolve, a port that refuses), and at INFO once it is back; the log,
/// going to a file and not a terminal, carries no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_logged_once_with_why_and_its_return() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let policy = format!(
        "{}---\n{}",
        one_route_policy("later", closed, ""),
        one_route_policy("gone", "127.0.0.1:9".parse().unwrap(), "")
            .replace("127.0.0.1:9", "nonexistent.invalid:80")
    );
    let proxy = ChildProxy::spawn(bin(), &policy, &[]).await;
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for host in ["later", "gone"] {
        for _ in 0..3 {
            let reply = conn.get(host, "/").await.unwrap();
            assert!(reply.status.is_server_error(), "{host}: {}", reply.status);
        }
    }
    let refused = format!("endpoint ejected: cannot connect endpoint={closed} error=");
    let log = proxy.log();
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in\n{log}"))
            .to_string()
    };
    let first = line(&refused);
    assert!(
        first.contains(" WARN ") && first.contains("Connection refused"),
        "{first}"
    );
    assert_eq!(log.matches(&refused).count(), 1, "{log}");
    let dns = line("endpoint ejected: cannot connect endpoint=nonexistent.invalid:80 error=");
    assert!(dns.contains("dns error"), "{dns}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );

    let up = Upstream::start_on("later", sluice_e2e::Protocol::Http1, closed).await;
    sluice_e2e::wait_until(
        "the endpoint takes requests again",
        sluice_e2e::WAIT,
        || {
            let addr = proxy.outbound_addr();
            async move {
                let mut conn = HttpConn::h1(addr).await.unwrap();
                conn.get("later", "/").await.unwrap().status == StatusCode::OK
            }
        },
    )
    .await;
    assert!(up.requests() >= 1);
    let back = format!("endpoint back in rotation endpoint={closed}");
    let log = proxy.log();
    assert!(
        log.lines()
            .any(|l| l.contains(" INFO ") && l.contains(&back)),
        "{log}"
    );
    assert_eq!(log.matches(&refused).count(), 1, "{log}");
}
