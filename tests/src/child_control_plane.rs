//! The real `sluice-control-plane` command line as a child process (the
//! `e2e-control-plane` binary of this crate), on ephemeral ports it reports
//! through `--addr-file`. Killed when dropped.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::WAIT;
use crate::proxy::{admin_get, parse_json};

/// A `sluice-control-plane` process.
pub struct ChildControlPlane {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    log_path: PathBuf,
    dir: TempDir,
}

impl ChildControlPlane {
    /// Runs `bin` with ephemeral gRPC and admin listeners, a state directory of
    /// its own, `env` (name, value) and `args`. Nothing is inherited from the
    /// test's `SLUICE_*` or Kubernetes environment.
    pub async fn spawn(bin: &Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sluice-e2e-cp-child-")
            .tempdir()
            .expect("temporary directory");
        let addr_file = dir.path().join("addrs.json");
        let log_path = dir.path().join("control-plane.log");
        let log = fs::File::create(&log_path).expect("create log file");
        let mut cmd = Command::new(bin);
        for (key, _) in std::env::vars_os() {
            let key_str = key.to_string_lossy();
            if key_str.starts_with("SLUICE_")
                || key_str.starts_with("KUBERNETES_")
                || key_str == "KUBECONFIG"
            {
                cmd.env_remove(&key);
            }
        }
        cmd.env("SLUICE_GRPC", "127.0.0.1:0")
            .env("SLUICE_ADMIN", "127.0.0.1:0")
            .env("SLUICE_STATE_DIR", dir.path().join("state"))
            .env("SLUICE_ADDR_FILE", &addr_file)
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log file")))
            .stderr(Stdio::from(log));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let deadline = Instant::now() + WAIT;
        let addrs: serde_json::Value = loop {
            if let Ok(text) = fs::read_to_string(&addr_file)
                && let Ok(v) = serde_json::from_str(&text)
            {
                break v;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the control plane exited with {status} before writing its addresses:\n{}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "the control plane did not write {} within {WAIT:?}:\n{}",
                    addr_file.display(),
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let addr = |key: &str| -> SocketAddr {
            addrs[key]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{key} in the address file: {addrs}"))
        };
        Self {
            grpc: addr("grpc"),
            admin: addr("admin"),
            child,
            log_path,
            dir,
        }
    }

    /// The gRPC listener's address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Its state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GET on the admin port, parsed as JSON (panics unless 2xx and JSON).
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = admin_get(self.admin, path).await;
        parse_json(path, status, &body)
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the control plane") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the control plane did not exit within {timeout:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ChildControlPlane {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A control-plane child whose snapshots claim a schema version one past this build's,
/// and a proxy subscribed to it that refuses them: a real NACK, already recorded.
pub struct NackingMesh {
    /// The control plane (`bin`, e.g. the `e2e-control-plane` binary).
    pub cp: ChildControlPlane,
    /// The proxy that NACKed; it applied nothing.
    pub proxy: crate::TestProxy,
    /// The schema version the snapshots claim.
    pub future: u32,
    _dirs: (TempDir, TempDir),
}

impl NackingMesh {
    /// Serves `policy` (one file) to a proxy named `node` and waits until the control
    /// plane's `/proxies` shows the proxy's NACK.
    pub async fn start(bin: &Path, policy: &str, node: &str) -> Self {
        let policies = tempfile::tempdir().expect("temporary directory");
        fs::write(policies.path().join("policy.yaml"), policy).expect("write the policy");
        let future = sluice_config::SCHEMA_VERSION + 1;
        let cp = ChildControlPlane::spawn(
            bin,
            &[
                (
                    "SLUICE_POLICY_DIR",
                    policies.path().to_str().expect("UTF-8 path"),
                ),
                ("SLUICE_PLAINTEXT", "true"),
            ],
            &["--test-stamp-schema-version", &future.to_string()],
        )
        .await;
        let state = tempfile::tempdir().expect("temporary directory");
        let proxy = crate::TestProxy::start_subscribed(
            &format!("http://{}", cp.grpc_addr()),
            node,
            state.path(),
            crate::ProxyOptions {
                skip_ready_wait: true,
                ..crate::ProxyOptions::default()
            },
        )
        .await;
        crate::wait_until("the control plane records the NACK", WAIT, || async {
            cp.admin_json("/proxies").await["proxies"][0]["nacked_version"].is_string()
        })
        .await;
        Self {
            cp,
            proxy,
            future,
            _dirs: (policies, state),
        }
    }
}
