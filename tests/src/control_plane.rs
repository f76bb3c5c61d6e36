//! A `sluice-control-plane` started in process, on a policy directory of its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper::StatusCode;
use sluice_control_plane::{ControlPlaneConfig, RunningControlPlane};
use tempfile::TempDir;

use crate::proxy::{admin_get, parse_json, write_atomically};
use crate::{WAIT, wait_until};

/// A control plane watching `policies/` in its own temporary directory and keeping
/// its last good files in `state/` there; restartable on the same ports.
pub struct TestControlPlane {
    running: Option<RunningControlPlane>,
    grpc: SocketAddr,
    admin: SocketAddr,
    policy_dir: PathBuf,
    state_dir: PathBuf,
    _dir: TempDir,
}

impl TestControlPlane {
    /// Starts on ephemeral ports with `files` (name, YAML) in its policy directory.
    pub async fn start(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sluice-e2e-cp-")
            .tempdir()
            .expect("temporary directory");
        let policy_dir = dir.path().join("policies");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&policy_dir).expect("create policy directory");
        for (name, yaml) in files {
            std::fs::write(policy_dir.join(name), yaml).expect("write policy file");
        }
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let running = launch(&policy_dir, &state_dir, any, any).await;
        Self {
            grpc: running.grpc_addr(),
            admin: running.admin_addr(),
            running: Some(running),
            policy_dir,
            state_dir,
            _dir: dir,
        }
    }

    /// The URL proxies subscribe to (`--control-plane`).
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The watched policy directory.
    pub fn policy_dir(&self) -> &Path {
        &self.policy_dir
    }

    /// Replaces (or creates) one policy file atomically, as an editor would.
    pub fn write_policy(&self, name: &str, yaml: &str) {
        write_atomically(&self.policy_dir.join(name), yaml);
    }

    /// GET on the admin port, parsed as JSON (panics unless 2xx and JSON).
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = admin_get(self.admin, path).await;
        parse_json(path, status, &body)
    }

    /// The version the control plane serves.
    pub fn version(&self) -> Option<String> {
        self.running
            .as_ref()
            .and_then(RunningControlPlane::policy_version)
    }

    /// Waits until `/proxies` lists `n` connected proxies that all acknowledged `version`.
    pub async fn wait_acked_everywhere(&self, version: &str, n: usize) {
        let admin = self.admin;
        wait_until(
            &format!("{n} connected proxies acknowledged {version}"),
            WAIT,
            || async move {
                let (status, body) = admin_get(admin, "/proxies").await;
                if status != StatusCode::OK {
                    return false;
                }
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let proxies = v["proxies"].as_array().cloned().unwrap_or_default();
                let acked = proxies
                    .iter()
                    .filter(|p| p["connected"] == true && p["acked_version"] == version)
                    .count();
                acked == n
            },
        )
        .await;
    }

    /// Stops the control plane, ending every proxy stream (its ports are kept for
    /// [`TestControlPlane::restart`]).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Starts it again on the same ports, policy directory and state directory.
    pub async fn restart(&mut self) {
        self.stop().await;
        let running = launch(&self.policy_dir, &self.state_dir, self.grpc, self.admin).await;
        self.running = Some(running);
    }
}

async fn launch(
    policy_dir: &Path,
    state_dir: &Path,
    grpc: SocketAddr,
    admin: SocketAddr,
) -> RunningControlPlane {
    let cfg = ControlPlaneConfig {
        policy_dir: policy_dir.to_path_buf(),
        state_dir: Some(state_dir.to_path_buf()),
        grpc_addr: grpc,
        admin_addr: admin,
        ..Default::default()
    };
    sluice_control_plane::start(cfg)
        .await
        .expect("start the control plane")
}
