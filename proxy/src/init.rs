//! `sluice-proxy init`: installs (or with `--remove` removes) the iptables redirect of a pod.
//!
//! Runs once, as root with `NET_ADMIN`/`NET_RAW`, in the pod's network namespace, before
//! the proxy starts (the injection webhook adds it as the first init container). In the
//! `nat` table it creates four chains and two jumps to them:
//!
//! - `PREROUTING -p tcp -j SLUICE_INBOUND`: inbound TCP goes to `SLUICE_IN_REDIRECT`
//!   (→ the inbound port, 15006), except the admin port (kubelet probes, scrapes) and the
//!   skipped inbound ports.
//! - `OUTPUT -p tcp -j SLUICE_OUTPUT`: outbound TCP goes to `SLUICE_REDIRECT`
//!   (→ the outbound port, 15001), except traffic of the proxy's own UID (its upstream
//!   calls would loop back into it), traffic over loopback (the pod talking to itself)
//!   and the skipped outbound ports.
//!
//! Re-running is harmless: the chains are flushed and refilled and a jump is added only
//! if `iptables -C` does not find it. IPv4 only (`ip6tables` is not set up).

use std::ffi::OsString;
use std::process::{Command, ExitCode};

/// The proxy's UID in its image (`USER` in `proxy/Dockerfile`; a test checks they agree).
pub const PROXY_UID: u32 = 1337;

/// Chain reached from `PREROUTING`.
pub const CHAIN_INBOUND: &str = "SLUICE_INBOUND";
/// Chain that redirects to the inbound port.
pub const CHAIN_IN_REDIRECT: &str = "SLUICE_IN_REDIRECT";
/// Chain reached from `OUTPUT`.
pub const CHAIN_OUTPUT: &str = "SLUICE_OUTPUT";
/// Chain that redirects to the outbound port.
pub const CHAIN_REDIRECT: &str = "SLUICE_REDIRECT";
const CHAINS: [&str; 4] = [
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
];

/// Flags of `sluice-proxy init`; each also reads `SLUICE_<FLAG>`.
#[derive(Clone, Debug, clap::Args)]
pub struct InitArgs {
    /// UID the proxy runs as; its own traffic is not redirected.
    #[arg(long, env = "SLUICE_PROXY_UID", default_value_t = PROXY_UID)]
    pub proxy_uid: u32,
    /// Port outbound TCP is redirected to.
    #[arg(long, env = "SLUICE_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port inbound TCP is redirected to.
    #[arg(long, env = "SLUICE_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// The proxy's admin port, reached directly (probes, metrics).
    #[arg(long, env = "SLUICE_ADMIN_PORT", default_value_t = 15000)]
    pub admin_port: u16,
    /// Inbound ports not redirected (comma-separated).
    #[arg(long, env = "SLUICE_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports not redirected (comma-separated).
    #[arg(long, env = "SLUICE_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// Remove the chains and jumps instead of installing them.
    #[arg(long)]
    pub remove: bool,
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// The iptables program.
    #[arg(long, env = "SLUICE_IPTABLES", default_value = "iptables")]
    pub iptables: OsString,
}

/// A failed iptables call.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The program could not be started.
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        /// The iptables program.
        program: OsString,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A rule was refused.
    #[error("iptables {args} failed: {stderr}")]
    Failed {
        /// The arguments, space-separated.
        args: String,
        /// What iptables printed.
        stderr: String,
    },
}

/// The rules appended to each chain, as `iptables -t nat` arguments, in order.
pub fn chain_rules(a: &InitArgs) -> Vec<Vec<String>> {
    let mut rules: Vec<Vec<String>> = Vec::new();
    let mut rule = |parts: &[&str]| rules.push(parts.iter().map(|s| s.to_string()).collect());
    let (outbound, inbound) = (a.outbound_port.to_string(), a.inbound_port.to_string());
    rule(&[
        "-A",
        CHAIN_REDIRECT,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &outbound,
    ]);
    rule(&[
        "-A",
        CHAIN_IN_REDIRECT,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &inbound,
    ]);

    let admin = a.admin_port.to_string();
    rule(&[
        "-A",
        CHAIN_INBOUND,
        "-p",
        "tcp",
        "--dport",
        &admin,
        "-j",
        "RETURN",
    ]);
    for p in &a.skip_inbound_ports {
        rule(&[
            "-A",
            CHAIN_INBOUND,
            "-p",
            "tcp",
            "--dport",
            &p.to_string(),
            "-j",
            "RETURN",
        ]);
    }
    rule(&["-A", CHAIN_INBOUND, "-p", "tcp", "-j", CHAIN_IN_REDIRECT]);

    let uid = a.proxy_uid.to_string();
    rule(&[
        "-A",
        CHAIN_OUTPUT,
        "-m",
        "owner",
        "--uid-owner",
        &uid,
        "-j",
        "RETURN",
    ]);
    rule(&["-A", CHAIN_OUTPUT, "-o", "lo", "-j", "RETURN"]);
    rule(&["-A", CHAIN_OUTPUT, "-d", "127.0.0.1/32", "-j", "RETURN"]);
    for p in &a.skip_outbound_ports {
        rule(&[
            "-A",
            CHAIN_OUTPUT,
            "-p",
            "tcp",
            "--dport",
            &p.to_string(),
            "-j",
            "RETURN",
        ]);
    }
    rule(&["-A", CHAIN_OUTPUT, "-p", "tcp", "-j", CHAIN_REDIRECT]);
    rules
}

/// The jumps from the built-in chains, as the rule spec after `-A`/`-C`/`-D`.
pub fn jumps() -> [[&'static str; 5]; 2] {
    [
        ["PREROUTING", "-p", "tcp", "-j", CHAIN_INBOUND],
        ["OUTPUT", "-p", "tcp", "-j", CHAIN_OUTPUT],
    ]
}

/// Runs `init` (or `init --remove`).
#[allow(clippy::print_stdout, clippy::print_stderr)] // the command's own output
pub fn main(args: &InitArgs) -> ExitCode {
    let mut ipt = Iptables {
        program: args.iptables.clone(),
        dry_run: args.dry_run,
    };
    let result = if args.remove {
        remove(&mut ipt)
    } else {
        install(&mut ipt, args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-proxy init: {e}");
            ExitCode::FAILURE
        }
    }
}

fn install(ipt: &mut Iptables, args: &InitArgs) -> Result<(), InitError> {
    for chain in CHAINS {
        if !ipt.check(&["-S", chain]) {
            ipt.run(&["-N", chain])?;
        }
        ipt.run(&["-F", chain])?;
    }
    for rule in chain_rules(args) {
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        ipt.run(&rule)?;
    }
    for jump in jumps() {
        let mut check = vec!["-C"];
        check.extend(jump);
        if !ipt.check(&check) {
            let mut add = vec!["-A"];
            add.extend(jump);
            ipt.run(&add)?;
        }
    }
    Ok(())
}

/// Takes the rules out. What is there is asked even in a dry run (the checks only
/// read), so `--remove --dry-run` prints the commands a removal would run, each once.
fn remove(ipt: &mut Iptables) -> Result<(), InitError> {
    for jump in jumps() {
        let mut check = vec!["-C"];
        check.extend(jump);
        // A jump added twice by hand is removed twice.
        while ipt.exists(&check) {
            let mut del = vec!["-D"];
            del.extend(jump);
            ipt.run(&del)?;
            if ipt.dry_run {
                break;
            }
        }
    }
    let present: Vec<&str> = CHAINS
        .into_iter()
        .filter(|chain| ipt.exists(&["-S", chain]))
        .collect();
    for chain in &present {
        ipt.run(&["-F", chain])?;
    }
    // Deleted only once all are empty: one chain jumps to another.
    for chain in &present {
        ipt.run(&["-X", chain])?;
    }
    Ok(())
}

struct Iptables {
    program: OsString,
    dry_run: bool,
}

impl Iptables {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.program);
        // -w: wait for the xtables lock instead of failing if another tool holds it.
        c.args(["-w", "-t", "nat"]).args(args);
        c
    }

    /// Whether a check (`-C`, `-S`) succeeds; in a dry run nothing exists yet.
    fn check(&self, args: &[&str]) -> bool {
        !self.dry_run && self.exists(args)
    }

    /// Whether a check (`-C`, `-S`) succeeds, asked even in a dry run: it only reads.
    fn exists(&self, args: &[&str]) -> bool {
        self.command(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    #[allow(clippy::print_stdout)] // --dry-run prints the commands
    fn run(&mut self, args: &[&str]) -> Result<(), InitError> {
        if self.dry_run {
            println!(
                "{} -w -t nat {}",
                self.program.to_string_lossy(),
                args.join(" ")
            );
            return Ok(());
        }
        let out = self
            .command(args)
            .output()
            .map_err(|source| InitError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(InitError::Failed {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn args(extra: &[&str]) -> InitArgs {
        Cli::parse_from(std::iter::once("init").chain(extra.iter().copied())).init
    }

    fn lines(a: &InitArgs) -> Vec<String> {
        chain_rules(a).iter().map(|r| r.join(" ")).collect()
    }

    #[test]
    fn defaults_redirect_to_the_contract_ports() {
        let a = args(&[]);
        assert_eq!(a.proxy_uid, PROXY_UID);
        assert_eq!(
            lines(&a),
            [
                "-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                "-A SLUICE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                "-A SLUICE_INBOUND -p tcp --dport 15000 -j RETURN",
                "-A SLUICE_INBOUND -p tcp -j SLUICE_IN_REDIRECT",
                "-A SLUICE_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A SLUICE_OUTPUT -o lo -j RETURN",
                "-A SLUICE_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A SLUICE_OUTPUT -p tcp -j SLUICE_REDIRECT",
            ]
        );
    }

    #[test]
    fn skipped_ports_return_before_the_redirect() {
        let a = args(&[
            "--skip-inbound-ports",
            "9090,9091",
            "--skip-outbound-ports",
            "5432",
            "--proxy-uid",
            "2000",
        ]);
        let l = lines(&a);
        let pos = |s: &str| l.iter().position(|x| x == s).unwrap();
        assert!(
            pos("-A SLUICE_INBOUND -p tcp --dport 9091 -j RETURN")
                < pos("-A SLUICE_INBOUND -p tcp -j SLUICE_IN_REDIRECT")
        );
        assert!(
            pos("-A SLUICE_OUTPUT -p tcp --dport 5432 -j RETURN")
                < pos("-A SLUICE_OUTPUT -p tcp -j SLUICE_REDIRECT")
        );
        assert!(l.contains(&"-A SLUICE_OUTPUT -m owner --uid-owner 2000 -j RETURN".to_owned()));
    }

    #[test]
    fn bad_port_lists_are_refused() {
        assert!(Cli::try_parse_from(["init", "--skip-inbound-ports", "80,http"]).is_err());
    }
}
