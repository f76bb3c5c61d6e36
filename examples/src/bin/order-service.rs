//! `order-service`: the example order service, without any governance code.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use sluice_examples::order_service::{self, OrderServiceConfig};

/// The example order service (`POST /orders`, `GET /health`); logs every order
/// through its outbound sidecar.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The outbound sidecar the log calls go to.
    #[arg(long, default_value = "http://127.0.0.1:15001")]
    log_url: String,
    /// The Host header of log calls (the sidecar routes by it).
    #[arg(long, default_value = "log-service")]
    log_host: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let service = order_service::start(
        args.listen,
        OrderServiceConfig {
            log_url: args.log_url.clone(),
            log_host: args.log_host.clone(),
        },
    )
    .await?;
    #[allow(clippy::print_stdout)]
    {
        println!(
            "order-service listening on http://{} (logs via {} as Host: {})",
            service.addr(),
            args.log_url,
            args.log_host
        );
    }
    tokio::signal::ctrl_c().await?;
    service.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
