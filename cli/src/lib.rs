//! `sluicectl`: see, explain and act on a Sluice mesh in one command.
//!
//! The commands speak to the admin APIs of the control plane (`--control-plane`) and
//! of proxies (`--proxy`, several allowed) through [`client::AdminClient`], which
//! sends the `--token-file` token on every call and turns every failure into one
//! line. Offline commands (`validate`, `explain`) read policy files with the same
//! `sluice-config` validator the control plane and the proxies use; `explain` decides
//! with the proxy's own route table and split ([`sluice_proxy::RouteTable`],
//! [`sluice_filters::split::SplitParams`]). Each command lives in a module of [`cmd`]
//! and prints a table ([`table`]) or, with `-o json`, one JSON document.
//!
//! Exit codes: 0 all well; 1 the answer is no (drift, NACK, invalid policy,
//! differences); 2 bad flags or unreadable files; 3 an admin API could not be used.

#![warn(missing_docs, unreachable_pub)]

pub mod args;
pub mod client;
pub mod cmd;
pub mod error;
pub mod explain;
pub mod policies;
pub mod table;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::args::{Cli, Global, Output};
use crate::client::{AdminClient, Side};
use crate::error::CliError;

/// The proxy admin asked when `--proxy` is not given (DESIGN's default admin port).
pub const DEFAULT_PROXY: &str = "http://127.0.0.1:15000";

/// What a command found: all well, or an answer of "no" (exit 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Exit 0.
    Ok,
    /// Exit 1: drift, NACK, an invalid policy, differences.
    Failing,
}

/// What every command is given: the global flags, the token, and where to print.
pub struct Ctx<'a> {
    /// The global flags.
    pub global: &'a Global,
    /// The admin token from `--token-file`.
    pub token: Option<Arc<str>>,
    /// Where answers go (stdout in the binary).
    pub out: &'a mut dyn Write,
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("global", &self.global)
            .finish_non_exhaustive()
    }
}

impl Ctx<'_> {
    /// Whether `-o json` was asked for.
    pub fn json(&self) -> bool {
        self.global.output == Output::Json
    }

    /// A client of the control plane's admin API.
    pub fn control_plane(&self) -> Result<AdminClient, CliError> {
        AdminClient::new(
            Side::ControlPlane,
            &self.global.control_plane,
            self.token.clone(),
            self.global.timeout.get(),
        )
    }

    /// A client per `--proxy`, or of the local proxy's admin port when none is given.
    pub fn proxies(&self) -> Result<Vec<AdminClient>, CliError> {
        let mut clients = self.explicit_proxies()?;
        if clients.is_empty() {
            clients.push(AdminClient::new(
                Side::Proxy,
                DEFAULT_PROXY,
                self.token.clone(),
                self.global.timeout.get(),
            )?);
        }
        Ok(clients)
    }

    /// A client per `--proxy` given (none when the flag is absent).
    pub fn explicit_proxies(&self) -> Result<Vec<AdminClient>, CliError> {
        self.global
            .proxy
            .iter()
            .filter(|u| !u.trim().is_empty())
            .map(|u| {
                AdminClient::new(
                    Side::Proxy,
                    u.trim(),
                    self.token.clone(),
                    self.global.timeout.get(),
                )
            })
            .collect()
    }

    /// Prints text as it is.
    pub fn print(&mut self, text: &str) -> Result<(), CliError> {
        self.out
            .write_all(text.as_bytes())
            .map_err(|e| CliError::Usage(format!("cannot write the answer: {e}")))
    }

    /// Prints a value as pretty JSON, with a final newline.
    pub fn print_json(&mut self, value: &serde_json::Value) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(value).unwrap_or_default();
        self.print(&text)?;
        self.print("\n")
    }
}

/// Reads the token file: its content, surrounding whitespace trimmed.
fn read_token(global: &Global) -> Result<Option<Arc<str>>, CliError> {
    let Some(path) = &global.token_file else {
        return Ok(None);
    };
    sluice_api::AdminGate::read_token(path)
        .map(Some)
        .map_err(|e| CliError::File {
            path: path.clone(),
            reason: e.to_string(),
        })
}

/// Runs a parsed command line, printing to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<Verdict, CliError> {
    let token = read_token(&cli.global)?;
    let mut ctx = Ctx {
        global: &cli.global,
        token,
        out,
    };
    cmd::run(&mut ctx, cli.command).await
}

/// Whether a command line clap could not parse asked for `-o json` (its last
/// `-o`/`--output`, else `SLUICECTL_OUTPUT`), read the way clap reads it.
pub fn asked_for_json(args: &[std::ffi::OsString], env: Option<std::ffi::OsString>) -> bool {
    let mut output = env.and_then(|v| v.into_string().ok());
    let mut args = args.iter().map(|a| a.to_string_lossy());
    while let Some(arg) = args.next() {
        let value = match arg.as_ref() {
            "--" => break,
            "-o" | "--output" => args.next().map(|v| v.into_owned()),
            a => a
                .strip_prefix("--output=")
                .or_else(|| a.strip_prefix("-o="))
                .or_else(|| a.strip_prefix("-o").filter(|v| !v.is_empty()))
                .map(str::to_string),
        };
        if value.is_some() {
            output = value;
        }
    }
    output.as_deref() == Some("json")
}

/// What `-o json` prints when a command gives no answer: scripts read one JSON
/// document whatever happened, and the exit code still says which failure it was.
pub fn error_json(e: &CliError) -> serde_json::Value {
    serde_json::json!({ "error": e.to_string(), "exitCode": e.exit_code() })
}

/// Parses the command line, runs it and maps the outcome to the exit code; errors are
/// one line on stderr (and, with `-o json`, a JSON document on stdout too).
#[allow(clippy::print_stderr)] // the command's own error line
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A command line clap refuses never reaches the command, but a script that
            // asked for JSON still gets one document (help and version are not errors).
            let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            if e.use_stderr() && asked_for_json(&args, std::env::var_os("SLUICECTL_OUTPUT")) {
                // Clap's first paragraph, without its usage and hint.
                let text = e.to_string();
                let first = text.split("\n\n").next().unwrap_or_default();
                let first = first.strip_prefix("error: ").unwrap_or(first);
                let message = first.split_whitespace().collect::<Vec<_>>().join(" ");
                let doc = serde_json::json!({ "error": message, "exitCode": e.exit_code() });
                let _ = writeln!(
                    std::io::stdout().lock(),
                    "{}",
                    serde_json::to_string_pretty(&doc).unwrap_or_default()
                );
            }
            e.exit()
        }
    };
    let json = cli.global.output == Output::Json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluicectl: cannot start: {e}");
            return ExitCode::from(3);
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match runtime.block_on(run(cli, &mut out)) {
        Ok(Verdict::Ok) => ExitCode::SUCCESS,
        Ok(Verdict::Failing) => ExitCode::from(1),
        Err(e) => {
            if json {
                let text = serde_json::to_string_pretty(&error_json(&e)).unwrap_or_default();
                let _ = writeln!(out, "{text}");
            }
            let _ = out.flush();
            eprintln!("sluicectl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// `--proxy` values (blank ones skipped, whitespace trimmed), the local proxy when
    /// none is given, `-o json`, and JSON printed pretty with a final newline.
    #[test]
    fn the_context_reads_the_global_flags() {
        let cli = Cli::try_parse_from([
            "sluicectl",
            "--proxy",
            " ",
            "--proxy",
            " http://10.0.0.7:15000 ",
            "-o",
            "json",
            "status",
        ])
        .unwrap();
        let mut out = Vec::new();
        let mut ctx = Ctx {
            global: &cli.global,
            token: None,
            out: &mut out,
        };
        assert!(ctx.json());
        let urls = |c: Vec<AdminClient>| c.iter().map(|c| c.url().to_string()).collect::<Vec<_>>();
        assert_eq!(
            urls(ctx.explicit_proxies().unwrap()),
            ["http://10.0.0.7:15000"]
        );
        assert_eq!(urls(ctx.proxies().unwrap()), ["http://10.0.0.7:15000"]);
        ctx.print_json(&serde_json::json!({ "a": 1 })).unwrap();
        ctx.print("x").unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "{\n  \"a\": 1\n}\nx");

        let cli = Cli::try_parse_from(["sluicectl", "status"]).unwrap();
        let mut out = Vec::new();
        let ctx = Ctx {
            global: &cli.global,
            token: None,
            out: &mut out,
        };
        assert!(!ctx.json());
        assert!(ctx.explicit_proxies().unwrap().is_empty());
        assert_eq!(urls(ctx.proxies().unwrap()), [DEFAULT_PROXY]);
    }

    #[test]
    fn an_error_as_json_carries_its_exit_code() {
        let e = CliError::Usage("bad".into());
        let v = error_json(&e);
        assert_eq!(v["error"], e.to_string());
        assert_eq!(v["exitCode"], e.exit_code());
    }

    #[test]
    fn finds_json_asked_for_in_a_command_line_clap_refused() {
        let asked = |args: &[&str], env: Option<&str>| {
            let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
            asked_for_json(&args, env.map(Into::into))
        };
        assert!(asked(&["-o", "json", "rollout", "pause"], None));
        assert!(asked(&["rollout", "--output=json", "pause"], None));
        assert!(asked(&["-ojson", "tap", "--bogus"], None));
        assert!(asked(&["rollout"], Some("json")));
        assert!(
            !asked(&["-o", "json", "-o", "table", "x"], None),
            "the last one counts"
        );
        assert!(!asked(&["--output", "table"], Some("json")));
        assert!(!asked(&["explain", "--", "-o", "json"], None));
        assert!(!asked(&["rollout", "pause"], None));
    }
}
