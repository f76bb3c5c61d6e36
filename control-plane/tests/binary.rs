//! The `sluice-control-plane` binary: flags from the environment, the address
//! file, serving, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

#[test]
fn binary_serves_from_env_flags_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("a.yaml"),
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { name: a }\nspec:\n  host: a\n  inbound: { rateLimit: { perSecond: 5, burst: 1 } }\n",
    )
    .unwrap();
    let addr_file = dir.path().join("addrs.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-control-plane"))
        .env("SLUICE_POLICY_DIR", &policies)
        .env("SLUICE_GRPC", "127.0.0.1:0")
        .env("SLUICE_ADMIN", "127.0.0.1:0")
        .env("SLUICE_STATE_DIR", dir.path().join("state"))
        .env("SLUICE_ADDR_FILE", &addr_file)
        .env("SLUICE_LOG_LEVEL", "info")
        .env("SLUICE_LOG_FORMAT", "json")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    // The start line is logged once the address file is written.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "exited before starting"
        );
        // Every line is one JSON object (`--log-format json`).
        let event: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        if event["fields"]["message"] == "control plane started" {
            assert_eq!(event["level"], "INFO", "{line}");
            break;
        }
    }
    let addrs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&addr_file).unwrap()).unwrap();
    let admin = addrs["admin"].as_str().unwrap();
    assert!(addrs["grpc"].as_str().unwrap().starts_with("127.0.0.1:"));

    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /policies HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("\"host\": \"a\""), "{body}");
    assert!(dir.path().join("state/policies/a.yaml").exists());
    // The CA is generated on first start and kept in the state directory.
    assert!(dir.path().join("state/ca.pem").exists());
    assert!(dir.path().join("state/ca.key").exists());

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
