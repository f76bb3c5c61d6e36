//! `log-service`: the example log-ingest service, without any governance code.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use sluice_examples::log_service::{self, LogServiceConfig};

/// The example log-ingest service (`POST /logs`, `GET /logs/stats`, `GET /health`).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9101")]
    listen: SocketAddr,
    /// Version name reported in answers (e.g. log-v1, log-v2).
    #[arg(long, default_value = "log-v1")]
    name: String,
    /// Share of ingests answered 503, from 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Delay before answering an ingest (e.g. 0s, 150ms, 2s).
    #[arg(long, default_value = "0s")]
    delay: sluice_config::Duration,
    /// Workers ingests share (a capacity, as an app's thread pool); absent: unlimited.
    #[arg(long)]
    workers: Option<usize>,
    /// Work time on a worker per whole KiB of an ingest (e.g. 25ms); with --workers.
    #[arg(long, default_value = "0s")]
    work_per_kib: sluice_config::Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.fail_rate) {
        anyhow::bail!("--fail-rate must be between 0.0 and 1.0");
    }
    let service = log_service::start(
        args.listen,
        LogServiceConfig {
            name: args.name.clone(),
            fail_rate: args.fail_rate,
            delay: args.delay.get(),
            workers: args.workers,
            work_per_kib: args.work_per_kib.get(),
        },
    )
    .await?;
    #[allow(clippy::print_stdout)]
    {
        println!(
            "log-service {} listening on http://{}",
            args.name,
            service.addr()
        );
    }
    tokio::signal::ctrl_c().await?;
    service.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
