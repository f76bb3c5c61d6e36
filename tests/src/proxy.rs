//! Sluice proxies under test: in process ([`TestProxy`]) and as a child process
//! ([`ChildProxy`]).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use tempfile::TempDir;

use crate::client::HttpConn;
use crate::{WAIT, full_body, wait_until};

/// What an in-process proxy listens on and forwards to, besides its policy.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// Open the outbound listener (on an ephemeral port).
    pub outbound: bool,
    /// Open the inbound listener (on an ephemeral port); needs `app`.
    pub inbound: bool,
    /// The application the inbound listener forwards to.
    pub app: Option<SocketAddr>,
    /// The service this proxy serves (`--service`).
    pub service: Option<String>,
    /// Grace period for requests in flight at shutdown.
    pub drain_timeout: Duration,
    /// mTLS: certify with the control plane and use it on the mesh hops.
    pub mtls: Option<MeshTls>,
    /// Trace export (`--otlp-endpoint` and friends); off by default.
    pub trace: sluice_proxy::telemetry::TraceConfig,
    /// Idle, request header and request body timeouts (the flags' defaults).
    pub timeouts: sluice_proxy::timeouts::Timeouts,
    /// Return as soon as it listens, without waiting for `/ready` (for tests of
    /// what keeps it unready).
    pub skip_ready_wait: bool,
    /// Where the admin listener binds (default `127.0.0.1:0`; `0.0.0.0:0` stands for a pod).
    pub admin: Option<SocketAddr>,
    /// The admin token file (`--admin-token-file`).
    pub admin_token_file: Option<PathBuf>,
    /// Per-connection HTTP/2 limits (`--h2-max-*`).
    pub h2_limits: sluice_proxy::H2Limits,
    /// The ring of recent requests behind `/recent` (`--recent-requests`; 0 is off).
    pub recent_requests: usize,
    /// Fleet rate limits: Redis URL, timeout, sync interval, fleet size.
    pub fleet: sluice_proxy::fleet::FleetConfig,
    /// How often a subscribed proxy reports its traffic (`--report-interval`).
    pub report_interval: Duration,
}

/// How a proxy under test joins the mesh's mTLS.
#[derive(Clone, Debug)]
pub struct MeshTls {
    /// The control plane's gRPC URL (`https://…`) to certify with.
    pub identity_url: String,
    /// The mesh root (PEM).
    pub trust_root: PathBuf,
    /// The bootstrap token file.
    pub token_file: PathBuf,
    /// Accept plaintext inbound too.
    pub permissive: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            outbound: true,
            inbound: false,
            app: None,
            service: None,
            drain_timeout: Duration::from_secs(5),
            mtls: None,
            trace: Default::default(),
            timeouts: Default::default(),
            skip_ready_wait: false,
            admin: None,
            admin_token_file: None,
            h2_limits: Default::default(),
            recent_requests: 0,
            fleet: Default::default(),
            report_interval: sluice_api::DEFAULT_REPORT_INTERVAL,
        }
    }
}

/// Writes `text` to `path` atomically: a sibling temporary file renamed over it, the
/// way editors and Kubernetes' ConfigMap volumes replace a file.
pub(crate) fn write_atomically(path: &Path, text: &str) {
    let dir = path.parent().expect("policy file has a directory");
    let tmp = tempfile::NamedTempFile::new_in(dir).expect("temporary policy file");
    fs::write(tmp.path(), text).expect("write temporary policy file");
    tmp.persist(path).expect("rename policy file into place");
}

/// An HTTP GET to an admin port, read to its end.
pub(crate) async fn admin_get(admin: SocketAddr, path: &str) -> (StatusCode, String) {
    let mut conn = HttpConn::h1(admin)
        .await
        .unwrap_or_else(|e| panic!("connect to admin {admin}: {e}"));
    let reply = conn
        .get(&admin.to_string(), path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on admin {admin}: {e}"));
    (reply.status, reply.text())
}

/// An HTTP request with a body to an admin port, read to its end.
pub(crate) async fn admin_send(
    admin: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, String) {
    let mut conn = HttpConn::h1(admin)
        .await
        .unwrap_or_else(|e| panic!("connect to admin {admin}: {e}"));
    let req = conn
        .request_builder(method, &admin.to_string(), path)
        .body(full_body(Bytes::from(body.to_string())))
        .expect("admin request");
    let reply = conn
        .call(req)
        .await
        .unwrap_or_else(|e| panic!("{path} on admin {admin}: {e}"));
    (reply.status, reply.text())
}

pub(crate) fn parse_json(path: &str, status: StatusCode, body: &str) -> serde_json::Value {
    assert!(
        status.is_success(),
        "admin {path} answered {status}: {body}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("admin {path} is not JSON ({e}): {body}"))
}

/// The policy version a `/config` answer reports.
fn version_of(config: &serde_json::Value) -> Option<String> {
    config.get("version").and_then(|v| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    })
}

// === impl TestProxy ===

/// A `sluice-proxy` started in process with `sluice_proxy::start`, on ephemeral ports,
/// watching a policy file in its own temporary directory.
pub struct TestProxy {
    running: Option<sluice_proxy::RunningProxy>,
    outbound: Option<SocketAddr>,
    inbound: Option<SocketAddr>,
    admin: SocketAddr,
    policy_path: PathBuf,
    _dir: TempDir,
}

impl TestProxy {
    /// A proxy with only the outbound listener, routing by `policy_yaml`.
    pub async fn start(policy_yaml: &str) -> Self {
        Self::start_with(policy_yaml, ProxyOptions::default()).await
    }

    /// A proxy with the given listeners, routing by `policy_yaml`.
    pub async fn start_with(policy_yaml: &str, opts: ProxyOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sluice-e2e-")
            .tempdir()
            .expect("temporary directory");
        let policy_path = dir.path().join("policy.yaml");
        fs::write(&policy_path, policy_yaml).expect("write policy");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");

        let cfg = sluice_proxy::ProxyConfig {
            outbound: any,
            inbound: any,
            admin: opts.admin.unwrap_or(any),
            admin_token_file: opts.admin_token_file.clone(),
            h2_limits: opts.h2_limits,
            recent_requests: opts.recent_requests,
            no_outbound: !opts.outbound,
            no_inbound: !opts.inbound,
            app: opts.app,
            policy: Some(policy_path.clone()),
            service: opts.service.clone(),
            drain_timeout: opts.drain_timeout,
            trust_root: opts.mtls.as_ref().map(|m| m.trust_root.clone()),
            identity_token_file: opts.mtls.as_ref().map(|m| m.token_file.clone()),
            identity_url: opts.mtls.as_ref().map(|m| m.identity_url.clone()),
            inbound_permissive: opts.mtls.as_ref().is_some_and(|m| m.permissive),
            trace: opts.trace.clone(),
            timeouts: opts.timeouts,
            fleet: opts.fleet.clone(),
            ..Default::default()
        };
        let running = sluice_proxy::start(cfg).await.expect("start the proxy");
        let outbound = running.outbound_addr();
        let inbound = running.inbound_addr();
        let admin = running.admin_addr().expect("the admin listener is open");
        let proxy = Self {
            running: Some(running),
            outbound,
            inbound,
            admin,
            policy_path,
            _dir: dir,
        };
        if !opts.skip_ready_wait {
            proxy.wait_ready().await;
        }
        proxy
    }

    /// A proxy that takes its policy from the control plane at `url` as `node_id`,
    /// keeping its last snapshot in `state_dir`; returns once `/ready` answers 200
    /// (from the saved snapshot or the first one streamed) unless
    /// `opts.skip_ready_wait`.
    pub async fn start_subscribed(
        url: &str,
        node_id: &str,
        state_dir: &Path,
        opts: ProxyOptions,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sluice-e2e-")
            .tempdir()
            .expect("temporary directory");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let cfg = sluice_proxy::ProxyConfig {
            outbound: any,
            inbound: any,
            admin: any,
            no_outbound: !opts.outbound,
            no_inbound: !opts.inbound,
            app: opts.app,
            control_plane: Some(url.to_string()),
            report_interval: opts.report_interval,
            state_dir: Some(state_dir.to_path_buf()),
            node_id: Some(node_id.to_string()),
            namespace: "e2e".into(),
            service: opts.service.clone(),
            drain_timeout: opts.drain_timeout,
            trust_root: opts.mtls.as_ref().map(|m| m.trust_root.clone()),
            identity_token_file: opts.mtls.as_ref().map(|m| m.token_file.clone()),
            identity_url: opts.mtls.as_ref().map(|m| m.identity_url.clone()),
            inbound_permissive: opts.mtls.as_ref().is_some_and(|m| m.permissive),
            trace: opts.trace.clone(),
            timeouts: opts.timeouts,
            recent_requests: opts.recent_requests,
            fleet: opts.fleet.clone(),
            ..Default::default()
        };
        let running = sluice_proxy::start(cfg).await.expect("start the proxy");
        let proxy = Self {
            outbound: running.outbound_addr(),
            inbound: running.inbound_addr(),
            admin: running.admin_addr().expect("the admin listener is open"),
            running: Some(running),
            policy_path: dir.path().join("policy.yaml"),
            _dir: dir,
        };
        if !opts.skip_ready_wait {
            proxy.wait_ready().await;
        }
        proxy
    }

    /// The weights of the first weighted rule of `route` in the policy named `policy`,
    /// as this proxy enforces them now.
    pub fn split_weights(&self, policy: &str, route: &str) -> Option<Vec<(String, u32)>> {
        let snapshot = self.running.as_ref()?.policy_store().current();
        let p = snapshot
            .policy_set()?
            .policies()
            .iter()
            .find(|p| p.metadata.name == policy)?
            .clone();
        let r = p.spec.routes.iter().find(|r| r.name == route)?;
        let w = r.split.iter().find_map(|rule| rule.weights.clone())?;
        Some(w.into_iter().collect())
    }

    /// How many proxies have traffic on each (policy, route), as the control plane
    /// last told this proxy.
    pub fn route_traffic(&self) -> std::sync::Arc<sluice_api::RouteTraffic> {
        self.running
            .as_ref()
            .expect("the proxy is running")
            .route_traffic()
    }

    /// The proxy's workload certificate store, when mTLS is on.
    pub fn tls_store(&self) -> Option<std::sync::Arc<sluice_proxy::tls::TlsStore>> {
        self.running.as_ref().and_then(|r| r.tls_store())
    }

    /// The outbound listener's address.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound.expect("this proxy has an outbound listener")
    }

    /// The inbound listener's address.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound.expect("this proxy has an inbound listener")
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The policy file the proxy watches.
    pub fn policy_path(&self) -> &Path {
        &self.policy_path
    }

    /// Replaces the policy file atomically (the proxy picks the change up by itself).
    pub fn write_policy(&self, yaml: &str) {
        write_atomically(&self.policy_path, yaml);
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self) {
        let admin = self.admin;
        wait_until("the proxy is ready", WAIT, || async move {
            admin_get(admin, "/ready").await.0 == StatusCode::OK
        })
        .await;
    }

    /// GET on the admin port: status and body.
    pub async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        admin_get(self.admin, path).await
    }

    /// Any request on the admin port: status and body.
    pub async fn admin_send(&self, method: Method, path: &str, body: &str) -> (StatusCode, String) {
        admin_send(self.admin, method, path, body).await
    }

    /// GET on the admin port, parsed as JSON (panics unless 2xx and JSON).
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.admin_get(path).await;
        parse_json(path, status, &body)
    }

    /// The policy version in force, from `/config`.
    pub async fn version(&self) -> Option<String> {
        version_of(&self.admin_json("/config").await)
    }

    /// Waits until `/config` reports a version other than `old`, and returns it.
    pub async fn wait_version_change(&self, old: Option<&str>) -> String {
        let mut new = None;
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let v = self.version().await;
            if v.is_some() && v.as_deref() != old {
                new = v;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        new.unwrap_or_else(|| panic!("the policy version stayed {old:?} for {WAIT:?}"))
    }

    /// Stops the proxy, draining what is in flight.
    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

// === impl ChildProxy ===

/// Resident memory of a process, from `/proc/PID/status`, in KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcMemory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the most that was ever resident.
    pub hwm_kib: u64,
}

/// The real `sluice-proxy` command line running as a child process, on ephemeral
/// ports it reports through `--addr-file`. Killed when dropped.
pub struct ChildProxy {
    child: Child,
    outbound: Option<SocketAddr>,
    inbound: Option<SocketAddr>,
    admin: SocketAddr,
    log_path: PathBuf,
    dir: TempDir,
}

impl ChildProxy {
    /// Runs `bin run` on `policy_yaml` with ephemeral outbound and admin listeners,
    /// no inbound listener, and `extra_args` after those.
    pub async fn spawn(bin: &Path, policy_yaml: &str, extra_args: &[&str]) -> Self {
        Self::spawn_via(bin, policy_yaml, extra_args, false, true).await
    }

    /// Like [`ChildProxy::spawn`], but with an ephemeral inbound listener and no
    /// outbound one (`extra_args` name the application, and mTLS if wanted).
    pub async fn spawn_inbound(bin: &Path, policy_yaml: &str, extra_args: &[&str]) -> Self {
        let mut args = vec!["--inbound", "127.0.0.1:0", "--no-outbound"];
        args.extend_from_slice(extra_args);
        Self::spawn_via(bin, policy_yaml, &args, false, true).await
    }

    /// Like [`ChildProxy::spawn`], but returns once listening, without waiting for a
    /// policy to be in force: for a proxy started on a policy it refuses.
    pub async fn spawn_unready(bin: &Path, policy_yaml: &str, extra_args: &[&str]) -> Self {
        Self::spawn_via(bin, policy_yaml, extra_args, false, false).await
    }

    /// Replaces the child's policy file, atomically, as an editor would.
    pub fn write_policy(&self, yaml: &str) {
        write_atomically(&self.dir.path().join("policy.yaml"), yaml);
    }

    /// Like [`ChildProxy::spawn`], but gives the child every setting through its
    /// `SLUICE_<FLAG>` environment variables instead of flags (`extra_args` still
    /// go on the command line).
    pub async fn spawn_with_env(bin: &Path, policy_yaml: &str, extra_args: &[&str]) -> Self {
        Self::spawn_via(bin, policy_yaml, extra_args, true, true).await
    }

    async fn spawn_via(
        bin: &Path,
        policy_yaml: &str,
        extra_args: &[&str],
        via_env: bool,
        wait_ready: bool,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sluice-e2e-child-")
            .tempdir()
            .expect("temporary directory");
        let policy = dir.path().join("policy.yaml");
        fs::write(&policy, policy_yaml).expect("write policy");
        let addr_file = dir.path().join("addrs.json");
        let log_path = dir.path().join("proxy.log");
        let log = fs::File::create(&log_path).expect("create log file");

        let mut cmd = Command::new(bin);
        // Configuration is passed as flags only: drop any SLUICE_* inherited from the
        // environment the tests run in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SLUICE_") {
                cmd.env_remove(&key);
            }
        }
        cmd.arg("run");
        if via_env {
            cmd.env("SLUICE_OUTBOUND", "127.0.0.1:0")
                .env("SLUICE_ADMIN", "127.0.0.1:0")
                .env("SLUICE_NO_INBOUND", "true")
                .env("SLUICE_POLICY", &policy)
                .env("SLUICE_ADDR_FILE", &addr_file);
        } else {
            cmd.args(["--admin", "127.0.0.1:0"]);
            // The inbound listener instead when the caller opens it.
            if !extra_args.contains(&"--no-outbound") {
                cmd.args(["--outbound", "127.0.0.1:0"]).arg("--no-inbound");
            }
            cmd.arg("--policy")
                .arg(&policy)
                .arg("--addr-file")
                .arg(&addr_file);
        }
        cmd.args(extra_args)
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
                    "the proxy exited with {status} before writing {}:\n{}",
                    addr_file.display(),
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "the proxy did not write {} within {WAIT:?}:\n{}",
                    addr_file.display(),
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let addr = |key: &str| -> Option<SocketAddr> {
            addrs
                .get(key)
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok())
        };
        let proxy = Self {
            outbound: addr("outbound"),
            inbound: addr("inbound"),
            admin: addr("admin").expect("the address file names the admin listener"),
            child,
            log_path,
            dir,
        };
        let admin = proxy.admin;
        if wait_ready {
            wait_until("the child proxy is ready", WAIT, || async move {
                admin_get(admin, "/ready").await.0 == StatusCode::OK
            })
            .await;
        }
        proxy
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The outbound listener's address.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound
            .expect("the address file names the outbound listener")
    }

    /// The inbound listener's address, when it has one.
    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The directory holding the child's policy, address file and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the child has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GET on the admin port, parsed as JSON.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = admin_get(self.admin, path).await;
        parse_json(path, status, &body)
    }

    /// Any request on the admin port: status and body.
    pub async fn admin_send(&self, method: Method, path: &str, body: &str) -> (StatusCode, String) {
        admin_send(self.admin, method, path, body).await
    }

    /// Resident memory now and at its peak.
    pub fn memory(&self) -> ProcMemory {
        self.try_memory()
            .unwrap_or_else(|| panic!("the child proxy is gone:\n{}", self.log()))
    }

    /// Resident memory now and at its peak, or `None` once the process has exited
    /// (a zombie has no resident memory).
    pub fn try_memory(&self) -> Option<ProcMemory> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let field = |name: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        };
        Some(ProcMemory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_alive(&self) -> bool {
        fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .ok()
            .and_then(|stat| {
                // The state follows the parenthesised command name.
                let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
                Some(state != 'Z' && state != 'X')
            })
            .unwrap_or(false)
    }

    /// How many file descriptors the process has open.
    pub fn open_fds(&self) -> Option<usize> {
        Some(
            fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .ok()?
                .count(),
        )
    }

    /// The process's open-files limit, soft and hard (`None` for unlimited), from
    /// `/proc/PID/limits`.
    pub fn open_files_limit(&self) -> Option<(Option<u64>, Option<u64>)> {
        let limits = fs::read_to_string(format!("/proc/{}/limits", self.pid())).ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut nums = line["Max open files".len()..].split_whitespace();
        let parse = |v: &str| v.parse::<u64>().ok();
        let soft = nums.next()?;
        let hard = nums.next()?;
        Some((parse(soft), parse(hard)))
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits (bounded) for the child to exit and returns how it exited.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the child proxy") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not exit within {timeout:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
