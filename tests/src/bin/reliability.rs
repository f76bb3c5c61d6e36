//! The reliability suite's command line: `reliability` runs the short suite,
//! `reliability --long` the ten-minute one; `hold-idle` is the helper process that
//! holds idle connections open (the suite starts it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluice_e2e::reliability::{self, SuiteOptions};

/// Sustained load through a real sluice-proxy while faults and malformed input hit it.
#[derive(Debug, Parser)]
#[command(name = "reliability")]
struct Cli {
    /// Run the long suite (ten minutes, fault cycle repeated) instead of the short one.
    #[arg(long)]
    long: bool,
    /// Override the run's length, in seconds.
    #[arg(long)]
    seconds: Option<u64>,
    /// Requests per second of each of the 20 client loops (0: unpaced).
    #[arg(long)]
    rate: Option<u32>,
    /// The sluice-proxy binary (default: `e2e-proxy` beside this program).
    #[arg(long)]
    proxy: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Open idle connections and hold them until standard input closes.
    HoldIdle {
        /// Where to connect.
        #[arg(long)]
        target: SocketAddr,
        /// How many connections.
        #[arg(long)]
        count: usize,
    },
}

#[allow(clippy::print_stdout, clippy::print_stderr)] // a command line reporting to its user
fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(Sub::HoldIdle { target, count }) = cli.command {
        runtime.block_on(reliability::hold_idle_connections(target, count))?;
        return Ok(ExitCode::SUCCESS);
    }
    let me = std::env::current_exe()?;
    let proxy = match cli.proxy {
        Some(p) => p,
        None => me.with_file_name("e2e-proxy"),
    };
    anyhow::ensure!(
        proxy.exists(),
        "no proxy binary at {} (build it with `cargo build -p sluice-e2e`, or pass --proxy)",
        proxy.display()
    );
    let mut opts = if cli.long {
        SuiteOptions::long(proxy, me)
    } else {
        SuiteOptions::short(proxy, me)
    };
    if let Some(s) = cli.seconds {
        opts.duration = Duration::from_secs(s);
    }
    if let Some(r) = cli.rate {
        opts.rate_per_loop = r;
    }
    // The proxy starts with a low soft limit, as on most hosts, and must raise it
    // itself to hold the idle connections.
    reliability::lower_open_files_limit(1024);
    eprintln!(
        "reliability: {} s through {}",
        opts.duration.as_secs(),
        opts.proxy_bin.display()
    );
    let report = runtime.block_on(reliability::run(opts));
    println!("{report}");
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
