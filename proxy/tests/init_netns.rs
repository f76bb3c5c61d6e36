//! `sluice-proxy init` in a real network namespace: the rules it installs, that a second
//! run changes nothing, and that `--remove` leaves no trace. Needs root, `ip` and
//! `iptables`; without them the test fails and says which is missing.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A network namespace deleted when dropped, also when an assertion fails.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "sluice-init-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = run("ip", &["netns", "add", &name]);
        assert!(out.status.success(), "ip netns add: {}", stderr(&out));
        Netns(name)
    }

    fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.0, program];
        all.extend(args);
        run("ip", &all)
    }

    /// The nat table's rules, without counters and comments, so two dumps compare.
    fn nat_rules(&self) -> Vec<String> {
        let out = self.exec("iptables-save", &["-t", "nat"]);
        assert!(out.status.success(), "iptables-save: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A") || l.starts_with(':'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (install iproute2 and iptables)"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn require_root_and_tools() {
    let uid = run("id", &["-u"]);
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test must run as root (it creates a network namespace)"
    );
    for tool in ["ip", "iptables", "iptables-save"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing: apt-get install iptables iproute2"
        );
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_sluice-proxy");

#[test]
fn init_installs_once_and_remove_leaves_nothing() {
    require_root_and_tools();
    let ns = Netns::new();
    let before = ns.nat_rules();
    let init = [
        "init",
        "--skip-inbound-ports",
        "9090,9091",
        "--skip-outbound-ports",
        "5432",
    ];
    let out = ns.exec(BIN, &init);
    assert!(out.status.success(), "init: {}", stderr(&out));
    let rules = ns.nat_rules();
    for expected in [
        ":SLUICE_INBOUND -",
        ":SLUICE_IN_REDIRECT -",
        ":SLUICE_OUTPUT -",
        ":SLUICE_REDIRECT -",
        "-A PREROUTING -p tcp -j SLUICE_INBOUND",
        "-A OUTPUT -p tcp -j SLUICE_OUTPUT",
        "-A SLUICE_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
        "-A SLUICE_INBOUND -p tcp -m tcp --dport 9090 -j RETURN",
        "-A SLUICE_INBOUND -p tcp -m tcp --dport 9091 -j RETURN",
        "-A SLUICE_INBOUND -p tcp -j SLUICE_IN_REDIRECT",
        "-A SLUICE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A SLUICE_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A SLUICE_OUTPUT -o lo -j RETURN",
        "-A SLUICE_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A SLUICE_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A SLUICE_OUTPUT -p tcp -j SLUICE_REDIRECT",
        "-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(
            rules.iter().any(|r| r.trim() == expected),
            "missing {expected:?} in {rules:#?}"
        );
    }

    // Idempotent: the same rules after a second run, no duplicated jump.
    let out = ns.exec(BIN, &init);
    assert!(out.status.success(), "second init: {}", stderr(&out));
    assert_eq!(ns.nat_rules(), rules);

    let out = ns.exec(BIN, &["init", "--remove"]);
    assert!(out.status.success(), "init --remove: {}", stderr(&out));
    let after = ns.nat_rules();
    assert!(
        !after.iter().any(|r| r.contains("SLUICE")),
        "left behind: {after:#?}"
    );
    assert_eq!(after, before);
    // Removing again is harmless.
    let out = ns.exec(BIN, &["init", "--remove"]);
    assert!(out.status.success(), "second remove: {}", stderr(&out));
}
