//! `sluice-proxy init` in a real network namespace: the rules it installs, that a second
//! run changes nothing, and that `--remove` leaves no trace. Needs root, `ip` and
//! `iptables`; without them the test fails and says which is missing.

use sluice_e2e::netns::{Netns, stderr};

const BIN: &str = env!("CARGO_BIN_EXE_e2e-proxy");

/// The nat table's rules, without counters and comments, so two dumps compare.
fn nat_rules(ns: &Netns) -> Vec<String> {
    let out = ns.exec("iptables-save", &["-t", "nat"]);
    assert!(out.status.success(), "iptables-save: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A") || l.starts_with(':'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
        .collect()
}

#[test]
fn init_installs_once_and_remove_leaves_nothing() {
    let ns = Netns::new("sluice-init", &["iptables", "iptables-save"]);
    let before = nat_rules(&ns);
    let init = [
        "init",
        "--skip-inbound-ports",
        "9090,9091",
        "--skip-outbound-ports",
        "5432",
    ];
    let out = ns.exec(BIN, &init);
    assert!(out.status.success(), "init: {}", stderr(&out));
    let rules = nat_rules(&ns);
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
    assert_eq!(nat_rules(&ns), rules);

    // A dry run of the removal prints what it would run, each once, and changes nothing.
    let out = ns.exec(BIN, &["init", "--remove", "--dry-run"]);
    assert!(
        out.status.success(),
        "init --remove --dry-run: {}",
        stderr(&out)
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    for expected in [
        "-D PREROUTING -p tcp -j SLUICE_INBOUND",
        "-D OUTPUT -p tcp -j SLUICE_OUTPUT",
        "-F SLUICE_INBOUND",
        "-X SLUICE_OUTPUT",
    ] {
        assert_eq!(
            printed.matches(expected).count(),
            1,
            "{expected:?} in {printed}"
        );
    }
    assert_eq!(nat_rules(&ns), rules);

    let out = ns.exec(BIN, &["init", "--remove"]);
    assert!(out.status.success(), "init --remove: {}", stderr(&out));
    let after = nat_rules(&ns);
    assert!(
        !after.iter().any(|r| r.contains("SLUICE")),
        "left behind: {after:#?}"
    );
    assert_eq!(after, before);
    // Removing again is harmless.
    let out = ns.exec(BIN, &["init", "--remove"]);
    assert!(out.status.success(), "second remove: {}", stderr(&out));
}
