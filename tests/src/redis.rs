//! A real `redis-server` (the Debian package, installed by `tests/setup.sh`) per test,
//! on a port of 127.0.0.1 below the ephemeral range, with no persistence; it can be
//! killed, restarted on the same port, paused (SIGSTOP) and resumed.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{WAIT, wait_until};

/// A `redis-server` child process.
pub struct TestRedis {
    child: Option<Child>,
    addr: SocketAddr,
    /// The TLS port, when started with [`start_tls`](Self::start_tls).
    tls: Option<SocketAddr>,
    dir: TempDir,
}

impl TestRedis {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// Like [`start`](Self::start), plus a TLS port with a certificate for 127.0.0.1
    /// (its root: [`ca_file`](Self::ca_file)); the plain port stays for the test's own
    /// queries.
    pub async fn start_tls() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sluice-redis-")
            .tempdir()
            .expect("temporary directory");
        if tls {
            let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
                .expect("certificate");
            std::fs::write(dir.path().join("tls.crt"), ck.cert.pem()).expect("write cert");
            std::fs::write(dir.path().join("tls.key"), ck.signing_key.serialize_pem())
                .expect("write key");
        }
        for _ in 0..20 {
            // The port is free when picked; another process may take it before
            // redis-server binds it, so a failed start picks another.
            let addr = free_port();
            let tls = tls.then(free_port);
            let mut child = spawn(addr, tls, dir.path());
            if wait_up(&mut child, addr).await {
                return Self {
                    child: Some(child),
                    addr,
                    tls,
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start (is it installed? tests/setup.sh installs it)");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// `rediss://127.0.0.1:TLS_PORT`, when started with [`start_tls`](Self::start_tls).
    pub fn tls_url(&self) -> String {
        format!("rediss://{}", self.tls.expect("started with TLS"))
    }

    /// The PEM root the TLS port's certificate is verified with.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("tls.crt")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server runs").id()
    }

    /// Kills the server (SIGKILL) and reaps it: connections drop, everything is lost.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a fresh server on the same port after [`kill`](Self::kill).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        let mut child = spawn(self.addr, self.tls, self.dir.path());
        let up = wait_up(&mut child, self.addr).await;
        self.child = Some(child);
        assert!(up, "redis-server did not come back on {}", self.addr);
    }

    /// Pauses the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal("STOP", self.pid());
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) {
        signal("CONT", self.pid());
    }

    /// A command's answer, e.g. `query(&["DBSIZE"])`.
    pub async fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        query(self.addr, args).await
    }

    /// Keys in the database.
    pub async fn dbsize(&self) -> u64 {
        self.query(&["DBSIZE"]).await.expect("DBSIZE")
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A paused server would not die of SIGKILL before it is resumed on some systems.
            signal("CONT", c.id());
        }
        self.kill();
    }
}

async fn query<T: redis::FromRedisValue>(addr: SocketAddr, args: &[&str]) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://{addr}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await
}

/// Waits (bounded) until the server answers `PING`; false if it exited or never did.
async fn wait_up(child: &mut Child, addr: SocketAddr) -> bool {
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(pong) = query::<String>(addr, &["PING"]).await
            && pong == "PONG"
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A port [`TestRedis::restart`] can have again ([`crate::restartable_addr`]).
fn free_port() -> SocketAddr {
    crate::restartable_addr()
}

fn spawn(addr: SocketAddr, tls: Option<SocketAddr>, dir: &Path) -> Child {
    let mut cmd = Command::new("redis-server");
    if let Some(tls) = tls {
        cmd.args(["--tls-port", &tls.port().to_string()])
            .arg("--tls-cert-file")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key-file")
            .arg(dir.join("tls.key"))
            .args(["--tls-auth-clients", "no"]);
    }
    cmd.args([
        "--port",
        &addr.port().to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
    ])
    .arg(dir)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("run redis-server (tests/setup.sh installs it)")
}

fn signal(sig: &str, pid: u32) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Waits until `redis` holds exactly `n` keys.
pub async fn wait_keys(redis: &TestRedis, what: &str, n: u64) {
    wait_until(what, WAIT, || async { redis.dbsize().await == n }).await;
}
