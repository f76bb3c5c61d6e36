//! Network namespaces for the tests that need real iptables redirects: the check that
//! the test can run at all (root, `ip`, `iptables`, `setpriv`), namespaces and veth pairs
//! torn down when dropped (also when an assertion fails), and a test binary re-running
//! one of its own ignored tests inside a namespace.
//!
//! A test that cannot run here fails, naming what is missing; it never passes quietly.
//!
//! The pattern: an ordinary test creates a [`Netns`] and calls [`Netns::run_test`] with
//! the name of an `#[ignore]`d test of the same binary; that test starts with
//! [`assert_in_namespace`] and does its work inside the namespace, where the redirect
//! rules it installs touch nothing outside.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{HttpConn, WAIT, wait_until};

/// The proxy's UID in a pod: `init` exempts its connections from the redirect.
pub const PROXY_UID: &str = "1337";

/// Set in the environment of a test re-run inside a namespace.
pub const CHILD_ENV: &str = "SLUICE_NETNS_CHILD";

/// Runs `program` and returns its output; panics if it cannot be started at all.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (apt-get install iptables iproute2 util-linux)")
        })
}

/// Runs `program` and panics with its stderr unless it succeeds.
pub fn must(program: &str, args: &[&str]) {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        stderr(&out)
    );
}

/// Runs a command written as one line, its words separated by spaces (no quoting),
/// and panics with its stderr unless it succeeds.
pub fn must_line(line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    must(words[0], &words[1..]);
}

/// A command's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Fails the test unless it runs as root with every one of `tools` on the `PATH`,
/// naming what is missing and how to install it.
pub fn require_root_and(tools: &[&str]) {
    let uid = run("id", &["-u"]);
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test must run as root (it creates network namespaces)"
    );
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing: apt-get install iptables iproute2 util-linux"
        );
    }
}

/// Fails unless this test was started by [`Netns::run_test`] or [`Netns::test_command`].
pub fn assert_in_namespace() {
    assert!(
        std::env::var_os(CHILD_ENV).is_some(),
        "run by the namespace test only"
    );
}

/// A network namespace, deleted when dropped (also when an assertion fails).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named after `prefix`, this process and a counter, after
    /// checking for root, `ip` and `tools`.
    pub fn new(prefix: &str, tools: &[&str]) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let mut all = vec!["ip"];
        all.extend_from_slice(tools);
        require_root_and(&all);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        must("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.must(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `program` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `cmd[0]` with the rest as arguments inside the namespace; it must succeed.
    pub fn must(&self, cmd: &[&str]) {
        let out = self.exec(cmd[0], &cmd[1..]);
        assert!(
            out.status.success(),
            "in {}: {}: {}",
            self.name,
            cmd.join(" "),
            stderr(&out)
        );
    }

    /// The command that runs the ignored test `test` of this test binary inside the
    /// namespace, alone.
    pub fn test_command(&self, test: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(std::env::current_exe().expect("the test binary's path"))
            .args(["--exact", test, "--ignored", "--nocapture"])
            .env(CHILD_ENV, "1");
        cmd
    }

    /// Runs the ignored test `test` of this test binary inside the namespace; it must pass.
    pub fn run_test(&self, test: &str) {
        let out = self.test_command(test).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "in the namespace:\n{stdout}\n{}",
            stderr(&out)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace also removes the veth ends in it, and with them the peers.
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Joins `a` and `b` with a veth pair, `a_ip` and `b_ip` (CIDR, e.g. `10.0.0.1/24`) on
/// its two ends; the pair goes when either namespace is deleted.
pub fn veth(a: &Netns, a_ip: &str, b: &Netns, b_ip: &str) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // Interface names are at most 15 bytes.
    let id = format!(
        "{}x{}",
        std::process::id() % 1_000_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let (va, vb) = (format!("sla{id}"), format!("slb{id}"));
    must(
        "ip",
        &[
            "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns",
            &b.name,
        ],
    );
    for (ns, dev, ip) in [(a, &va, a_ip), (b, &vb, b_ip)] {
        ns.must(&["ip", "addr", "add", ip, "dev", dev]);
        ns.must(&["ip", "link", "set", dev, "up"]);
    }
}

/// A child process killed when dropped; when the test is failing, its log (if any) is
/// printed first.
#[derive(Debug)]
pub struct Killed {
    child: Child,
    log: Option<PathBuf>,
}

impl Killed {
    /// Takes ownership of `child`; `log` is where its output went.
    pub fn new(child: Child, log: Option<PathBuf>) -> Self {
        Self { child, log }
    }

    /// The process, e.g. to see whether it has exited.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking()
            && let Some(log) = &self.log
        {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            eprintln!("{}:\n{text}", log.display());
        }
    }
}

/// Starts `bin args…` under the proxy's UID ([`PROXY_UID`], as the injected sidecar runs),
/// its stderr in `log`; it is killed with this process and when the returned value drops.
pub fn spawn_as_proxy_uid(bin: &Path, args: &[&OsStr], log: &Path) -> Killed {
    let file = std::fs::File::create(log).unwrap();
    let child = Command::new("setpriv")
        .args(["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups"])
        .args(["--pdeathsig", "KILL"])
        .arg(bin)
        .args(args)
        .stderr(file)
        .spawn()
        .expect("setpriv (util-linux) runs the proxy under its own UID");
    Killed::new(child, Some(log.to_owned()))
}

/// Lets the proxy's UID read and write `dir` (a temporary directory is private to root).
pub fn open_to_proxy_uid(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
}

/// Starts the real proxy (`bin`, a `sluice-proxy` command line) under the proxy's UID
/// with `policy` written to `dir/NAME.yaml`, `run --policy … args…`, its log in
/// `dir/NAME.log`; returns once `ready` (its admin address) answers `/ready` with 200.
pub async fn sidecar(
    bin: &Path,
    dir: &Path,
    name: &str,
    policy: &str,
    args: &[&str],
    ready: SocketAddr,
) -> Killed {
    open_to_proxy_uid(dir);
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, policy).unwrap();
    let mut all: Vec<&OsStr> = vec!["run".as_ref(), "--policy".as_ref(), path.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    let child = spawn_as_proxy_uid(bin, &all, &dir.join(format!("{name}.log")));
    wait_until("the sidecar is ready", WAIT, || async move {
        match HttpConn::h1(ready).await {
            Ok(mut c) => c
                .get("admin", "/ready")
                .await
                .is_ok_and(|r| r.status == 200),
            Err(_) => false,
        }
    })
    .await;
    child
}
