//! The command line: global flags (with their `SLUICECTL_*` variables) and one
//! subcommand per view of the mesh.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_config::Duration;

const EXAMPLES: &str = "\
Examples:
  sluicectl status                                  every proxy's version, NACKs, drift
  sluicectl --proxy 127.0.0.1:15000 breakers        breakers of one proxy
  sluicectl breakers reset log-service.ingest log-v2
  sluicectl explain -f policies/ log-service POST /logs -H x-user-id:alice
  sluicectl tap --status 5xx --min-latency 100ms    recent failures and slow requests
  sluicectl top                                     requests, errors, latency per route × backend
  sluicectl rollout status
  sluicectl validate policies/                      the verdict CI and the control plane give
  sluicectl diff policies/                          files against what the control plane serves

Exit codes: 0 all well; 1 the answer is no (drift, NACK, invalid policy, differences);
2 bad flags or unreadable files; 3 an admin API could not be used (unreachable, refused
token, malformed answer).";

/// See, explain and act on a Sluice mesh.
#[derive(Debug, Parser)]
#[command(name = "sluicectl", version, after_help = EXAMPLES)]
pub struct Cli {
    /// Flags every command takes.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the admin APIs are and how answers are printed.
#[derive(Clone, Debug, Args)]
pub struct Global {
    /// The control plane's admin URL.
    #[arg(
        long,
        global = true,
        env = "SLUICECTL_CONTROL_PLANE",
        default_value = "http://127.0.0.1:15014",
        value_name = "URL"
    )]
    pub control_plane: String,
    /// A proxy's admin URL; repeat the flag (or separate with commas) for several.
    /// Commands about proxies use http://127.0.0.1:15000 when none is given; `status`
    /// asks only the proxies given (for their certificates).
    #[arg(
        long,
        global = true,
        env = "SLUICECTL_PROXY",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub proxy: Vec<String>,
    /// A file holding the admin token, sent as `Authorization: Bearer` on every call
    /// (admin ports bound beyond loopback answer only with it).
    #[arg(long, global = true, env = "SLUICECTL_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// How to print answers.
    #[arg(
        short = 'o',
        long,
        global = true,
        value_enum,
        default_value = "table",
        env = "SLUICECTL_OUTPUT"
    )]
    pub output: Output,
    /// How long one admin call may take.
    #[arg(long, global = true, default_value = "5s", value_name = "DURATION")]
    pub timeout: Duration,
}

/// How answers are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON document for scripts.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List circuit breakers (route × backend) of each proxy, or open / reset one.
    #[command(after_help = "\
Examples:
  sluicectl breakers
  sluicectl breakers open log-service.ingest log-v2
  sluicectl --proxy 127.0.0.1:15000 breakers reset log-service.ingest log-v2")]
    Breakers(BreakersArgs),
    /// Which route, backend and governance a request would get, from policy files,
    /// offline, with the proxy's own route table and split.
    #[command(after_help = "\
Examples:
  sluicectl explain -f policies/ log-service POST /logs -H x-user-id:alice
  sluicectl explain -f log-service.yaml log-service GET /healthz -o json")]
    Explain(ExplainArgs),
    /// Validate policy files (files or directories of `*.yaml`) as the control plane
    /// and the proxies do; exits 1 when any is refused.
    #[command(after_help = "\
Examples:
  sluicectl validate examples/policies/
  sluicectl validate log-service.yaml order-service.yaml -o json")]
    Validate(ValidateArgs),
    /// Every proxy's acked and refused (NACK) version, drift from what was sent, and
    /// certificate expiry; exits 1 on drift or NACK.
    #[command(after_help = "\
Examples:
  sluicectl status
  sluicectl status --proxy 10.0.0.7:15000,10.0.0.8:15000 --token-file token   (adds certificate expiry)
  sluicectl status -o json | jq '.proxies[] | select(.state != \"in-sync\")'")]
    Status(StatusArgs),
    /// Requests, errors and latency per route × backend from the proxies' counters,
    /// refreshed in place.
    #[command(after_help = "\
Examples:
  sluicectl top
  sluicectl top --interval 5s --proxy a:15000,b:15000
  sluicectl top --once -o json")]
    Top(TopArgs),
    /// Policy files against the policies the control plane serves (weights a rollout
    /// drives aside); exits 1 when they differ.
    #[command(after_help = "\
Examples:
  sluicectl diff policies/
  sluicectl diff log-service.yaml -o json")]
    Diff(DiffArgs),
    /// Progressive rollouts on the control plane: status, or pause / resume / promote /
    /// abort one.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Recent requests from each proxy's bounded ring (`--recent-requests N` on the
    /// proxy), filtered after the response.
    #[command(after_help = "\
Examples:
  sluicectl tap
  sluicectl tap --status 5xx --reason timeout
  sluicectl tap --route log-service.ingest --backend log-v2 --min-latency 250ms --follow")]
    Tap(TapArgs),
}

/// `status`.
#[derive(Clone, Debug, Args)]
pub struct StatusArgs {
    /// How long a proxy may take to ack a version before it counts as drift.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub grace: Duration,
}

/// `explain`.
#[derive(Clone, Debug, Args)]
pub struct ExplainArgs {
    /// Policy files or directories of `*.yaml`.
    #[arg(
        short = 'f',
        long = "file",
        env = "SLUICECTL_POLICIES",
        value_delimiter = ',',
        default_value = ".",
        value_name = "PATH"
    )]
    pub files: Vec<PathBuf>,
    /// The host the request is sent to (`log-service`, a port is ignored).
    pub host: String,
    /// The request method.
    pub method: String,
    /// The request path (a query is ignored, as the proxy ignores it).
    pub path: String,
    /// A request header, `name:value`; repeat for several.
    #[arg(short = 'H', long = "header", value_name = "NAME:VALUE")]
    pub headers: Vec<String>,
}

/// `breakers`.
#[derive(Clone, Debug, Args)]
pub struct BreakersArgs {
    /// What to do; `list` when absent.
    #[command(subcommand)]
    pub action: Option<BreakerAction>,
}

/// A breaker action.
#[derive(Clone, Debug, Subcommand)]
pub enum BreakerAction {
    /// Every breaker of each proxy.
    List,
    /// Open one breaker by hand (it stays open until reset).
    Open(BreakerRef),
    /// Close one breaker by hand.
    Reset(BreakerRef),
}

/// One breaker: route key and backend.
#[derive(Clone, Debug, Args)]
pub struct BreakerRef {
    /// The route, `<policy>.<route>`.
    pub route: String,
    /// The backend name.
    pub backend: String,
    /// The namespace of the route's policy; needed only when a policy of that name is
    /// in several namespaces.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

/// `top`.
#[derive(Clone, Debug, Args)]
pub struct TopArgs {
    /// Time between two samples.
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub interval: Duration,
    /// Take two samples one interval apart, print once and exit.
    #[arg(long)]
    pub once: bool,
}

/// `tap`.
#[derive(Clone, Debug, Args)]
pub struct TapArgs {
    /// Only this status: `503`, or a class such as `5xx`.
    #[arg(long, value_name = "CODE|CLASS")]
    pub status: Option<String>,
    /// Only answers with this `x-sluice-reason` (`timeout`, `breaker-open`, …).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this route (`<policy>.<route>`).
    #[arg(long)]
    pub route: Option<String>,
    /// Only routes of policies in this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only this backend.
    #[arg(long)]
    pub backend: Option<String>,
    /// Only requests that took at least this long to their response headers.
    #[arg(long, value_name = "DURATION")]
    pub min_latency: Option<Duration>,
    /// At most this many requests per proxy, the newest (with `--follow`, on the first
    /// poll; later polls print every new request).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Keep polling and print new requests as they come.
    #[arg(long)]
    pub follow: bool,
    /// Time between polls with `--follow`.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub interval: Duration,
    /// Show secret header values (credentials, cookies, names like `x-api-key`; only a
    /// proxy started with `--recent-requests-secrets` keeps them).
    #[arg(long)]
    pub show_secrets: bool,
    /// Print the request and response headers of each request.
    #[arg(long)]
    pub headers: bool,
}

/// `rollout …`.
#[derive(Clone, Debug, Subcommand)]
pub enum RolloutCommand {
    /// Every rollout (or one): step, weights, checks, decision and why.
    #[command(after_help = "\
Examples:
  sluicectl rollout status
  sluicectl rollout status shop/log-service/ingest -o json")]
    Status {
        /// `<namespace>/<policy>/<route>`; every rollout when absent.
        rollout: Option<String>,
    },
    /// Hold the canary at its current step.
    Pause {
        /// `<namespace>/<policy>/<route>`.
        rollout: String,
    },
    /// Let a paused rollout go on.
    Resume {
        /// `<namespace>/<policy>/<route>`.
        rollout: String,
    },
    /// Send the canary straight to 100 %.
    Promote {
        /// `<namespace>/<policy>/<route>`.
        rollout: String,
    },
    /// Roll the canary back to 0.
    Abort {
        /// `<namespace>/<policy>/<route>`.
        rollout: String,
    },
}

/// `validate`.
#[derive(Clone, Debug, Args)]
pub struct ValidateArgs {
    /// Policy files or directories of `*.yaml`.
    #[arg(required = true, value_name = "PATH")]
    pub files: Vec<PathBuf>,
}

/// `diff`.
#[derive(Clone, Debug, Args)]
pub struct DiffArgs {
    /// Policy files or directories of `*.yaml`.
    #[arg(required = true, value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// Count policies the control plane serves that the files do not hold as
    /// differences (for a whole policy directory).
    #[arg(long)]
    pub all: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_global_flags_after_the_command() {
        let cli = Cli::try_parse_from([
            "sluicectl",
            "breakers",
            "--proxy",
            "a:1,b:2",
            "-o",
            "json",
            "reset",
            "p.r",
            "v1",
        ])
        .unwrap();
        assert_eq!(cli.global.proxy, ["a:1", "b:2"]);
        assert_eq!(cli.global.output, Output::Json);
        let Command::Breakers(BreakersArgs {
            action: Some(BreakerAction::Reset(b)),
        }) = cli.command
        else {
            panic!("breakers reset");
        };
        assert_eq!((b.route.as_str(), b.backend.as_str()), ("p.r", "v1"));
    }
}
