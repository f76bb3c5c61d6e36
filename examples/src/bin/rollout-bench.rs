//! `rollout-bench`: how fast the control plane rolls a failing canary back, and whether
//! it ever rolls a healthy one back.
//!
//! Each run starts a fresh mesh in process on loopback: a control plane watching one
//! policy, three proxies subscribed to it (outbound only, reporting every
//! `--report-interval`), and two log services, `v1` and the canary `v2`. The route's
//! split starts at `v1: 100, v2: 0` with a rollout block (steps 10, 50, 100, 1 s each,
//! judged on 20 canary requests). Once every proxy sends the canary 10 %, `--rate`
//! requests a second in all go through the proxies.
//!
//! - A bad run's canary fails half its requests with 503: timed from the first failed
//!   answer the load sees to the moment every proxy enforces canary weight 0 (read from
//!   each proxy's own policy store, polled every 5 ms).
//! - A healthy run's canary never fails: it must be promoted; a rollback is a false one.
//!
//! Prints a markdown summary (the BENCHMARKS.md section) to stdout; progress to stderr.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a CLI that reports to its user

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluice_examples::RunningService;
use sluice_examples::log_service::{self, LogServiceConfig};

/// Time a failing canary's rollback and count false rollbacks of healthy ones.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Runs with a canary failing half its requests.
    #[arg(long, default_value_t = 20)]
    bad_runs: usize,
    /// Runs with a healthy canary.
    #[arg(long, default_value_t = 20)]
    healthy_runs: usize,
    /// Requests a second through the three proxies together.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// How often each proxy reports its traffic to the control plane.
    #[arg(long, default_value = "500ms")]
    report_interval: sluice_config::Duration,
    /// Give up on a run after this long.
    #[arg(long, default_value = "60s")]
    run_timeout: sluice_config::Duration,
}

/// The number of proxies in each run's mesh.
const PROXIES: usize = 3;
/// The canary's share of failed requests in a bad run.
const BAD_FAIL_RATE: f64 = 0.5;
/// The rollout block every run uses (indented under `rollout:`).
const BLOCK: &str = "            canary: v2
            steps: [10, 50, 100]
            interval: 1s
            minRequests: 20
            slo: { errorRate: 0.01, p99: 2s }
            baseline: { errorRateIncrease: 0.01 }
";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The policy: route `ingest` of host `log`, `v1: 100, v2: 0` under [`BLOCK`].
fn policy(v1: SocketAddr, v2: SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: log, namespace: bench }}
spec:
  host: log
  backends:
    v1: {{ addresses: ["{v1}"] }}
    v2: {{ addresses: ["{v2}"] }}
  routes:
    - name: ingest
      timeout: 2s
      split:
        - weights: {{ v1: 100, v2: 0 }}
          rollout:
{BLOCK}"#
    )
}

/// One run's mesh.
struct Mesh {
    cp: sluice_control_plane::RunningControlPlane,
    proxies: Vec<sluice_proxy::RunningProxy>,
    upstreams: Vec<RunningService>,
    _dir: tempfile::TempDir,
}

impl Mesh {
    async fn start(canary_fail_rate: f64, report_interval: Duration) -> anyhow::Result<Self> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let v1 = log_service::start(
            any,
            LogServiceConfig {
                name: "v1".into(),
                ..Default::default()
            },
        )
        .await?;
        let v2 = log_service::start(
            any,
            LogServiceConfig {
                name: "v2".into(),
                fail_rate: canary_fail_rate,
                ..Default::default()
            },
        )
        .await?;
        let dir = tempfile::tempdir()?;
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir)?;
        std::fs::write(policy_dir.join("log.yaml"), policy(v1.addr(), v2.addr()))?;
        let cp = sluice_control_plane::start(sluice_control_plane::ControlPlaneConfig {
            policy_dir,
            grpc_addr: any,
            admin_addr: any,
            state_dir: Some(dir.path().join("cp-state")),
            ..Default::default()
        })
        .await
        .context("starting the control plane")?;
        let mut proxies = Vec::new();
        for i in 0..PROXIES {
            let cfg = sluice_proxy::ProxyConfig {
                outbound: any,
                admin: any,
                no_inbound: true,
                control_plane: Some(format!("http://{}", cp.grpc_addr())),
                report_interval,
                state_dir: Some(dir.path().join(format!("p{i}"))),
                node_id: Some(format!("p{i}")),
                namespace: "bench".into(),
                log_level: "error".into(),
                ..Default::default()
            };
            proxies.push(sluice_proxy::start(cfg).await.context("starting a proxy")?);
        }
        Ok(Self {
            cp,
            proxies,
            upstreams: vec![v1, v2],
            _dir: dir,
        })
    }

    /// The canary weight each proxy enforces now.
    fn canary_weights(&self) -> Vec<Option<u32>> {
        self.proxies.iter().map(canary_weight).collect()
    }

    async fn wait_canary_everywhere(&self, weight: u32, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while !self.canary_weights().iter().all(|w| *w == Some(weight)) {
            if Instant::now() > deadline {
                bail!(
                    "the proxies did not reach canary {weight} % within {limit:?}: {:?}",
                    self.canary_weights()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// The phase of the rollout in the control plane's `/rollouts`.
    async fn phase(&self, client: &HttpClient) -> String {
        let url = format!("http://{}/rollouts", self.cp.admin_addr());
        let Ok(req) = Request::get(url).body(Full::default()) else {
            return String::new();
        };
        let Ok(resp) = client.request(req).await else {
            return String::new();
        };
        let Ok(body) = resp.into_body().collect().await else {
            return String::new();
        };
        let v: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
        v["rollouts"][0]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn shutdown(self) {
        for p in self.proxies {
            p.shutdown().await;
        }
        self.cp.shutdown().await;
        for u in self.upstreams {
            u.shutdown().await;
        }
    }
}

/// The canary's weight a proxy enforces now, from its own policy store.
fn canary_weight(p: &sluice_proxy::RunningProxy) -> Option<u32> {
    let snapshot = p.policy_store().current();
    let policy = snapshot
        .policy_set()?
        .policies()
        .iter()
        .find(|p| p.metadata.name == "log")?
        .clone();
    let route = policy.spec.routes.iter().find(|r| r.name == "ingest")?;
    route
        .split
        .iter()
        .find_map(|rule| rule.weights.as_ref()?.get("v2").copied())
}

/// What the load was answered.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    failed: u64,
    first_failure: Option<Instant>,
}

/// Requests at `rate` a second in all, round-robin over the proxies, until aborted.
fn start_load(
    client: &HttpClient,
    targets: Vec<SocketAddr>,
    rate: f64,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Tally>>) {
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let (client, shared) = (client.clone(), tally.clone());
    let task = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        for target in targets.iter().cycle() {
            pace.tick().await;
            let (client, shared, target) = (client.clone(), shared.clone(), *target);
            tokio::spawn(async move {
                let ok = match Request::post(format!("http://{target}/logs"))
                    .header("host", "log")
                    .body(Full::new(Bytes::from_static(b"bench line")))
                {
                    Ok(req) => match client.request(req).await {
                        Ok(resp) => {
                            let ok = resp.status().is_success();
                            let _ = resp.into_body().collect().await;
                            ok
                        }
                        Err(_) => false,
                    },
                    Err(_) => false,
                };
                let now = Instant::now();
                let mut t = shared.lock().unwrap_or_else(PoisonError::into_inner);
                t.sent += 1;
                if !ok {
                    t.failed += 1;
                    t.first_failure.get_or_insert(now);
                }
            });
        }
    });
    (task, tally)
}

/// How a run ended.
#[derive(Debug)]
enum Outcome {
    /// Bad canary at 0 on every proxy, this long after the first failure.
    RolledBack(Duration),
    /// Healthy canary promoted (and at 100 on every proxy), this long after the load began.
    Promoted(Duration),
    /// Healthy canary rolled back.
    FalseRollback,
    /// Nothing within the run's time limit, or the mesh failed: why.
    Stuck(String),
}

async fn run(client: &HttpClient, args: &Args, bad: bool) -> anyhow::Result<(Outcome, Tally)> {
    let mesh = Mesh::start(
        if bad { BAD_FAIL_RATE } else { 0.0 },
        args.report_interval.get(),
    )
    .await?;
    let limit = args.run_timeout.get();
    mesh.wait_canary_everywhere(10, Duration::from_secs(30))
        .await?;
    let targets: Vec<SocketAddr> = mesh
        .proxies
        .iter()
        .filter_map(sluice_proxy::RunningProxy::outbound_addr)
        .collect();
    let began = Instant::now();
    let (load, tally) = start_load(client, targets, args.rate);
    let outcome = loop {
        if began.elapsed() > limit {
            break Outcome::Stuck(format!(
                "after {limit:?}: phase {:?}, proxies at {:?}",
                mesh.phase(client).await,
                mesh.canary_weights()
            ));
        }
        let weights = mesh.canary_weights();
        if bad {
            if weights.iter().all(|w| *w == Some(0)) {
                let at = Instant::now();
                let first = tally
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .first_failure;
                break match first {
                    Some(first) => Outcome::RolledBack(at.saturating_duration_since(first)),
                    None => Outcome::Stuck("rolled back before any failure was seen".into()),
                };
            }
        } else if weights.iter().all(|w| *w == Some(0)) {
            break Outcome::FalseRollback;
        } else if weights.iter().all(|w| *w == Some(100)) && mesh.phase(client).await == "promoted"
        {
            break Outcome::Promoted(began.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    load.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(PoisonError::into_inner));
    mesh.shutdown().await;
    Ok((outcome, tally))
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn median(sorted: &[Duration]) -> Option<Duration> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--rate must be above 0");
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);

    let mut rollbacks = Vec::new();
    let mut bad_stuck = Vec::new();
    for i in 0..args.bad_runs {
        let (outcome, tally) = run(&client, &args, true).await?;
        eprintln!(
            "bad run {}: {outcome:?} ({} sent, {} failed)",
            i + 1,
            tally.sent,
            tally.failed
        );
        match outcome {
            Outcome::RolledBack(d) => rollbacks.push(d),
            Outcome::Stuck(why) => bad_stuck.push(why),
            other => bad_stuck.push(format!("{other:?}")),
        }
    }
    let mut promotions = Vec::new();
    let mut false_rollbacks = 0;
    let mut healthy_stuck = Vec::new();
    let mut healthy_failed = 0;
    for i in 0..args.healthy_runs {
        let (outcome, tally) = run(&client, &args, false).await?;
        eprintln!(
            "healthy run {}: {outcome:?} ({} sent, {} failed)",
            i + 1,
            tally.sent,
            tally.failed
        );
        healthy_failed += tally.failed;
        match outcome {
            Outcome::Promoted(d) => promotions.push(d),
            Outcome::FalseRollback => false_rollbacks += 1,
            Outcome::Stuck(why) => healthy_stuck.push(why),
            other => healthy_stuck.push(format!("{other:?}")),
        }
    }
    rollbacks.sort();
    promotions.sort();

    let interval = args.report_interval;
    println!(
        "| {PROXIES} proxies, {:.0} req/s in all, reports every {interval}, steps 10/50/100 × 1 s, minRequests 20 | Sluice | Flagger, default analysis (interval 1m × threshold 5) |",
        args.rate
    );
    println!("|---|---|---|");
    match (median(&rollbacks), rollbacks.last()) {
        (Some(med), Some(max)) => println!(
            "| first failure → canary at 0 on every proxy (canary failing 50 %), median / max of {} runs | **{} s / {} s** (goal ≤ 3 s / ≤ 6 s) | ≥ 5 min (five failed checks a minute apart) |",
            rollbacks.len(),
            secs(med),
            secs(*max)
        ),
        _ => println!(
            "| first failure → canary at 0 on every proxy | no run rolled back | ≥ 5 min |"
        ),
    }
    println!(
        "| false rollbacks of a healthy canary | **{false_rollbacks} of {}** (goal 0) | |",
        args.healthy_runs
    );
    if let (Some(med), Some(max)) = (median(&promotions), promotions.last()) {
        println!(
            "| healthy canary: load start → promoted, at 100 on every proxy, median / max of {} runs | {} s / {} s | (set by the interval, not comparable) |",
            promotions.len(),
            secs(med),
            secs(*max)
        );
    }
    println!();
    if !rollbacks.is_empty() {
        let all: Vec<String> = rollbacks.iter().map(|d| secs(*d)).collect();
        println!("Every bad run, sorted (s): {}.", all.join(", "));
        println!();
    }
    if !bad_stuck.is_empty() || !healthy_stuck.is_empty() {
        println!(
            "Runs that ended otherwise: {}.",
            bad_stuck
                .iter()
                .chain(&healthy_stuck)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
        println!();
    }
    println!(
        "Failed answers during the healthy runs: {healthy_failed}. Runs: {} bad, {} healthy (asked for {} and {}).",
        rollbacks.len() + bad_stuck.len(),
        promotions.len() + false_rollbacks + healthy_stuck.len(),
        args.bad_runs,
        args.healthy_runs
    );
    Ok(())
}
