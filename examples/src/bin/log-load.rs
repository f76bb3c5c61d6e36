//! `log-load`: open-loop load on the log service in a mix of priorities, one JSON line out.
//!
//! The overload benchmark (`examples/bench/overload.sh`) runs it against each system
//! under test. Stops by itself after `--duration` plus at most `--timeout`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use serde_json::json;
use sluice_examples::load::{self, Load, Outcome};

/// Open-loop `POST` load with priorities; prints what came back per level as JSON.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Listener to send to (HTTP/2 with prior knowledge).
    #[arg(long)]
    target: SocketAddr,
    /// `:authority` of the requests.
    #[arg(long, default_value = "log-service")]
    host: String,
    /// Path of the requests.
    #[arg(long, default_value = "/logs")]
    path: String,
    /// Requests per second.
    #[arg(long)]
    rate: f64,
    /// How long to send.
    #[arg(long, default_value = "10s")]
    duration: sluice_config::Duration,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Priority levels and weights, e.g. critical=20,default=50,sheddable=30.
    #[arg(long, default_value = "default=1")]
    mix: String,
    /// Header carrying the level.
    #[arg(long, default_value = "x-priority")]
    priority_header: String,
    /// An answer later than this after its request was due counts as timed out.
    #[arg(long, default_value = "1s")]
    timeout: sluice_config::Duration,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

fn ms(d: Option<Duration>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| json!(d.as_secs_f64() * 1000.0))
}

fn outcome_json(o: &Outcome) -> serde_json::Value {
    json!({
        "sent": o.sent, "ok": o.ok, "refused": o.refused, "overloaded": o.overloaded,
        "other": o.other, "timed_out": o.timed_out, "failed": o.failed,
        "p50_ms": ms(o.ok_percentile(0.5)), "p99_ms": ms(o.ok_percentile(0.99)),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut mix = Vec::new();
    for part in args.mix.split(',').filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .with_context(|| format!("--mix part {part:?} is not LEVEL=WEIGHT"))?;
        let weight: u32 = weight
            .parse()
            .with_context(|| format!("--mix weight {weight:?} is not a whole number"))?;
        mix.push((name.to_string(), weight));
    }
    if mix.is_empty() {
        bail!("--mix names no level");
    }
    let load = Load {
        target: args.target,
        host: args.host,
        path: args.path,
        rate: args.rate,
        duration: args.duration.get(),
        body: Bytes::from(vec![b'x'; args.body_bytes]),
        headers: Vec::new(),
        priority_header: args.priority_header,
        mix,
        timeout: args.timeout.get(),
        connections: args.connections,
    };
    let report = load::run(&load).await.context("sending the load")?;
    let levels: serde_json::Map<String, serde_json::Value> = report
        .levels
        .iter()
        .map(|(k, o)| (k.clone(), outcome_json(o)))
        .collect();
    let out = json!({
        "rate": args.rate,
        "duration_s": load.duration.as_secs_f64(),
        "total": outcome_json(&report.total()),
        "levels": levels,
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{out}");
    }
    Ok(())
}
