//! Runs the Autobahn WebSocket cases with `kosoku` straight to an echo server and
//! through a Sluice outbound listener, and compares the verdicts case by case.
//!
//! `cargo run -p sluice-e2e --bin autobahn` runs every case (cargo test runs 1–7);
//! `--case 9.*` (repeatable) picks some. Exits non-zero when a verdict differs (`OK` and
//! `NON-STRICT` count as the same: `autobahn::differences`).

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use clap::Parser;
use sluice_e2e::autobahn;

#[derive(Parser)]
#[command(about = "Autobahn WebSocket cases straight and through Sluice, compared")]
struct Args {
    /// Case ids or globs to run (repeatable); every case when absent.
    #[arg(long = "case")]
    cases: Vec<String>,
    /// The kosoku executable (default: the test venv's, or $SLUICE_KOSOKU).
    #[arg(long)]
    kosoku: Option<PathBuf>,
    /// Where the HTML and JSON reports go.
    #[arg(long, default_value = "target/autobahn")]
    reports: PathBuf,
}

#[allow(clippy::print_stdout)] // a command line reporting to its user
#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let kosoku = args.kosoku.unwrap_or_else(autobahn::kosoku_path);
    let cases: Vec<&str> = args.cases.iter().map(String::as_str).collect();
    let cmp = autobahn::compare_through_outbound(&kosoku, &cases, &args.reports)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let mut tally = std::collections::BTreeMap::<&str, usize>::new();
    for v in cmp.proxied.values() {
        *tally.entry(v.behavior.as_str()).or_default() += 1;
    }
    println!(
        "{} cases through the outbound listener: {tally:?}; reports in {}",
        cmp.proxied.len(),
        args.reports.display()
    );
    let diff = autobahn::differences(&cmp.direct, &cmp.proxied);
    for (case, direct, proxied) in &diff {
        println!("{case}: direct {direct:?}, through the proxy {proxied:?}");
    }
    if diff.is_empty() {
        println!("every verdict is the same as straight to the echo server");
        Ok(())
    } else {
        Err(anyhow!("{} cases differ from a direct run", diff.len()))
    }
}
