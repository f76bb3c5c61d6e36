//! `demo`: the whole local mesh in one process, on loopback.
//!
//! Starts log-service v1 and v2, each behind its own sidecar (inbound), and the order
//! service behind its sidecar, whose outbound listener routes `Host: log-service` to
//! the log sidecars by the embedded policy. The policy is written to a policy directory
//! that an in-process control plane watches; every sidecar subscribes to that control
//! plane (`--control-plane`), so editing a file there changes the mesh live and the
//! control plane's `/proxies` shows which version each sidecar acknowledged. Sends a
//! little traffic, then shows governance (a burst rate-limited, the 90/10 split as shares,
//! log-v2 stopped and restarted while its breaker opens and closes, ~15 s), then overload
//! (log-v1 given three times the batches it can take, in a mix of priorities, ~6 s),
//! then a canary rollout (log-v2 promoted step by step by the control plane from the
//! sidecars' reports, then a bad log-v2 rolled back, ~10 s), prints what happened and
//! what to try, then runs until Ctrl-C.
//!
//! The mesh runs mTLS: the control plane's CA (a fresh root per run) certifies each
//! sidecar from a bootstrap token, the order → log hop is TLS 1.3 with SPIFFE
//! identities, and the log sidecars admit only the order service's identity.
//!
//! Ports (with the default `--base-port 15000`; another base shifts all of them by the
//! same amount): order app 8080, order sidecar admin 15000 / outbound 15001 / inbound
//! 15006; log-v1 app 9101, its sidecar admin 15100 / inbound 15106; log-v2 app 9102,
//! its sidecar admin 15200 / inbound 15206; control plane gRPC 15010 / admin 15014.

#![allow(clippy::print_stdout)] // a CLI that talks to its user

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluice_control_plane::{IdentityConfig, ca};
use sluice_examples::RunningService;
use sluice_examples::load;
use sluice_examples::log_service::{self, LogServiceConfig};
use sluice_examples::order_service::{self, OrderServiceConfig};

/// The default policy, as shipped in `examples/demo/policies/`.
const LOG_SERVICE_POLICY: &str = include_str!("policies/log-service.yaml");
/// The base port the embedded policy's addresses are written for.
const DEFAULT_BASE: u16 = 15000;
/// The namespace every demo workload runs in.
const NAMESPACE: &str = "demo";
/// Workers of each log pod: its capacity, which the overload scene exceeds threefold.
const LOG_WORKERS: usize = 4;
/// A log pod's work per KiB of an ingest: a batch of [`BATCH_BYTES`] takes 40 ms.
const LOG_WORK_PER_KIB: Duration = Duration::from_millis(10);
/// The size of a batch in the overload scene (one-line ingests cost no work).
const BATCH_BYTES: usize = 4096;
/// Bootstrap token and service account of each sidecar's workload: `(token, service account)`.
const ORDER_TOKEN: (&str, &str) = ("demo-order-token", "order-service");
/// The log pods share one service account, hence one identity.
const LOG_TOKEN: (&str, &str) = ("demo-log-token", "log-service");
/// How often each sidecar reports its traffic to the control plane.
const REPORT_INTERVAL: Duration = Duration::from_millis(500);
/// The rollout scene's route, inserted before `ingest`; `{STEPS}` is its steps list.
const ROLLOUT_ROUTE: &str =
    "    # the rollout scene: the control plane moves log-v2 in, step by step, from the
    # sidecars' own reports, and back to 0 at the first report that shows it failing
    - name: rollout
      match: { path: { prefix: /logs }, method: POST, headers: { x-demo: rollout } }
      timeout: 2s
      split:
        - weights: { log-v1: 100, log-v2: 0 }
          rollout:
            canary: log-v2
            steps: {STEPS}
            interval: 1s
            minRequests: 20
            slo: { errorRate: 0.01, p99: 1s }
            baseline: { errorRateIncrease: 0.01 }
";
/// Requests a second the rollout scene sends through the order sidecar.
const ROLLOUT_RATE: u32 = 100;
/// The share of ingests the bad log-v2 fails.
const BAD_FAIL_RATE: f64 = 0.5;

/// Run the local Sluice mesh demo: order service → sidecars → log service v1/v2.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// First port of the demo; every port shifts with it (order app = base - 6920).
    #[arg(long, default_value_t = DEFAULT_BASE)]
    base_port: u16,
    /// Share of ingests log-v2 fails with 503 (watch retries and the breaker act).
    #[arg(long, default_value_t = 0.0)]
    log_v2_fail_rate: f64,
    /// Delay before log-v2 answers an ingest (e.g. 300ms; try it against timeouts).
    #[arg(long, default_value = "0s")]
    log_v2_delay: sluice_config::Duration,
    /// Sidecar log level.
    #[arg(long, default_value = "warn")]
    log_level: String,
}

/// Every port of the demo.
#[derive(Clone, Copy, Debug)]
struct Ports {
    order_app: u16,
    order_admin: u16,
    order_outbound: u16,
    order_inbound: u16,
    v1_app: u16,
    v1_admin: u16,
    v1_inbound: u16,
    v2_app: u16,
    v2_admin: u16,
    v2_inbound: u16,
    cp_grpc: u16,
    cp_admin: u16,
}

impl Ports {
    fn from_base(base: u16) -> anyhow::Result<Self> {
        let shift = |p: u16| -> anyhow::Result<u16> {
            let v = i32::from(p) + i32::from(base) - i32::from(DEFAULT_BASE);
            u16::try_from(v)
                .ok()
                .filter(|v| *v > 0)
                .with_context(|| format!("--base-port {base} puts port {p} out of range"))
        };
        Ok(Self {
            order_app: shift(8080)?,
            order_admin: shift(15000)?,
            order_outbound: shift(15001)?,
            order_inbound: shift(15006)?,
            v1_app: shift(9101)?,
            v1_admin: shift(15100)?,
            v1_inbound: shift(15106)?,
            v2_app: shift(9102)?,
            v2_admin: shift(15200)?,
            v2_inbound: shift(15206)?,
            cp_grpc: shift(15010)?,
            cp_admin: shift(15014)?,
        })
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One sidecar's listeners and upstream app.
struct SidecarSpec {
    service: &'static str,
    admin: u16,
    outbound: Option<u16>,
    inbound: Option<u16>,
    app: u16,
    /// Bootstrap token and service account the sidecar certifies with.
    token: (&'static str, &'static str),
}

/// Starts one sidecar in process. Every use of the proxy's library API is here.
async fn start_sidecar(
    spec: &SidecarSpec,
    control_plane: &str,
    trust_root: &Path,
    state_dir: &Path,
    log_level: &str,
    log_control: &sluice_proxy::LogControl,
) -> anyhow::Result<sluice_proxy::RunningProxy> {
    let defaults = sluice_proxy::ProxyConfig::default();
    let token_file = state_dir.join(format!("token-{}", spec.admin));
    std::fs::write(&token_file, spec.token.0).context("writing a sidecar's token file")?;
    let cfg = sluice_proxy::ProxyConfig {
        outbound: spec.outbound.map_or(defaults.outbound, local),
        inbound: spec.inbound.map_or(defaults.inbound, local),
        no_outbound: spec.outbound.is_none(),
        no_inbound: spec.inbound.is_none(),
        admin: local(spec.admin),
        app: Some(local(spec.app)),
        control_plane: Some(control_plane.to_string()),
        // Each sidecar keeps its last snapshot, as a pod would on its own volume.
        state_dir: Some(state_dir.join(format!("sidecar-{}", spec.admin))),
        node_id: Some(format!("{}-{}", spec.service, spec.admin)),
        namespace: "demo".into(),
        service: Some(spec.service.to_string()),
        log_level: log_level.to_string(),
        log_control: Some(log_control.clone()),
        trust_root: Some(trust_root.to_path_buf()),
        identity_token_file: Some(token_file),
        // Frequent reports let the rollout scene judge each one-second step on time.
        report_interval: REPORT_INTERVAL,
        ..defaults
    };
    sluice_proxy::start(cfg).await.with_context(|| {
        format!(
            "starting the {} sidecar (admin port {})",
            spec.service, spec.admin
        )
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let log_control = init_logging(&args.log_level);
    if !(0.0..=1.0).contains(&args.log_v2_fail_rate) {
        bail!("--log-v2-fail-rate must be between 0.0 and 1.0");
    }
    let ports = Ports::from_base(args.base_port)?;

    // The policy, written where the control plane watches it.
    let work_dir = tempfile::Builder::new()
        .prefix("sluice-demo-")
        .tempdir()
        .context("creating the demo's work directory")?;
    let policy_dir = work_dir.path().join("policies");
    std::fs::create_dir_all(&policy_dir).context("creating the demo's policy directory")?;
    let policy_path = policy_dir.join("log-service.yaml");
    let policy = LOG_SERVICE_POLICY
        .replace("127.0.0.1:15106", &local(ports.v1_inbound).to_string())
        .replace("127.0.0.1:15206", &local(ports.v2_inbound).to_string());
    std::fs::write(&policy_path, &policy).context("writing the demo policy")?;

    // The control plane every sidecar subscribes to, with its CA: a fresh root per
    // run, certifying the holders of the bootstrap tokens written here.
    let tokens_path = work_dir.path().join("bootstrap-tokens.jsonl");
    let tokens: String = [ORDER_TOKEN, LOG_TOKEN]
        .iter()
        .map(|(token, sa)| {
            format!(
                "{}\n",
                serde_json::json!({"token": token, "namespace": NAMESPACE, "serviceAccount": sa})
            )
        })
        .collect();
    std::fs::write(&tokens_path, tokens).context("writing the bootstrap tokens")?;
    let ca = ca::Ca::generate("cluster.local", Duration::from_secs(24 * 3600))
        .context("generating the mesh root")?;
    let verifier = ca::TokenFile::load(&tokens_path).context("reading the bootstrap tokens")?;
    let trust_root = work_dir.path().join("trust-root.pem");
    let mut identity = IdentityConfig::new(Arc::new(ca), Arc::new(verifier));
    identity.write_trust_root = Some(trust_root.clone());
    let control_plane = sluice_control_plane::start(sluice_control_plane::ControlPlaneConfig {
        policy_dir: policy_dir.clone(),
        grpc_addr: local(ports.cp_grpc),
        admin_addr: local(ports.cp_admin),
        state_dir: Some(work_dir.path().join("control-plane-state")),
        identity: Some(identity),
        ..Default::default()
    })
    .await
    .with_context(|| {
        format!(
            "the control plane on ports {} and {} (try --base-port)",
            ports.cp_grpc, ports.cp_admin
        )
    })?;
    let control_plane_url = format!("https://{}", control_plane.grpc_addr());

    // The applications.
    let log_v1 = log_service::start(local(ports.v1_app), log_pod_config("log-v1"))
        .await
        .with_context(|| format!("log-v1 on port {} (try --base-port)", ports.v1_app))?;
    let log_v2 = log_service::start(local(ports.v2_app), log_v2_config(&args))
        .await
        .with_context(|| format!("log-v2 on port {} (try --base-port)", ports.v2_app))?;
    let order = order_service::start(
        local(ports.order_app),
        OrderServiceConfig {
            log_url: format!("http://{}", local(ports.order_outbound)),
            log_host: "log-service".into(),
        },
    )
    .await
    .with_context(|| {
        format!(
            "order-service on port {} (try --base-port)",
            ports.order_app
        )
    })?;

    // Their sidecars.
    let specs = [
        SidecarSpec {
            service: "order-service",
            admin: ports.order_admin,
            outbound: Some(ports.order_outbound),
            inbound: Some(ports.order_inbound),
            app: ports.order_app,
            token: ORDER_TOKEN,
        },
        SidecarSpec {
            service: "log-service",
            admin: ports.v1_admin,
            outbound: None,
            inbound: Some(ports.v1_inbound),
            app: ports.v1_app,
            token: LOG_TOKEN,
        },
        SidecarSpec {
            service: "log-service",
            admin: ports.v2_admin,
            outbound: None,
            inbound: Some(ports.v2_inbound),
            app: ports.v2_app,
            token: LOG_TOKEN,
        },
    ];
    let mut sidecars = Vec::new();
    for spec in &specs {
        sidecars.push(
            start_sidecar(
                spec,
                &control_plane_url,
                &trust_root,
                work_dir.path(),
                &args.log_level,
                &log_control,
            )
            .await?,
        );
    }

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    for spec in &specs {
        wait_ready(&client, spec.admin).await?;
    }

    println!("Sluice demo mesh is up.\n");
    println!(
        "  order-service  http://127.0.0.1:{}   sidecar: admin :{}  outbound :{}  inbound :{}",
        ports.order_app, ports.order_admin, ports.order_outbound, ports.order_inbound
    );
    println!(
        "  log-v1         http://127.0.0.1:{}   sidecar: admin :{}  inbound :{}",
        ports.v1_app, ports.v1_admin, ports.v1_inbound
    );
    println!(
        "  log-v2         http://127.0.0.1:{}   sidecar: admin :{}  inbound :{}",
        ports.v2_app, ports.v2_admin, ports.v2_inbound
    );
    println!(
        "  control plane  grpc {control_plane_url}   admin http://127.0.0.1:{}",
        ports.cp_admin
    );
    println!(
        "\n  policy directory (watched by the control plane): {}\n",
        policy_dir.display()
    );

    send_sample_traffic(&client, ports).await;
    show_mtls(&client, ports).await;
    let log_v2 = governance_scenes(&client, ports, log_v2, &args).await?;
    overload_scene(&client, ports).await?;
    let log_v2 = rollout_scene(
        &client,
        ports,
        &sidecars[0],
        RolloutFiles {
            path: &policy_path,
            policy: &policy,
        },
        log_v2,
        &args,
    )
    .await?;
    print_try(ports, &policy_path);

    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    println!("\nstopping…");
    for sidecar in sidecars {
        sidecar.shutdown().await;
    }
    control_plane.shutdown().await;
    for service in [order, log_v1, log_v2] {
        RunningService::shutdown(service).await;
    }
    drop(work_dir);
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr with a filter that the sidecars' `PUT /log-level` can change.
fn init_logging(level: &str) -> sluice_proxy::LogControl {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, reload};

    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("warn"));
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    sluice_proxy::LogControl::new(move |directive| {
        let filter = EnvFilter::try_new(directive).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// Waits (bounded) until a sidecar's admin answers `/ready` with 200.
async fn wait_ready(client: &Client<HttpConnector, Full<Bytes>>, admin: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let req = Request::get(format!("http://127.0.0.1:{admin}/ready")).body(Full::default())?;
        if let Ok(resp) = client.request(req).await
            && resp.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the sidecar with admin port {admin} did not become ready within 10s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A log pod's settings: its name and its capacity.
fn log_pod_config(name: &str) -> LogServiceConfig {
    LogServiceConfig {
        name: name.into(),
        workers: Some(LOG_WORKERS),
        work_per_kib: LOG_WORK_PER_KIB,
        ..Default::default()
    }
}

/// log-v2's settings from the command line.
fn log_v2_config(args: &Args) -> LogServiceConfig {
    LogServiceConfig {
        name: "log-v2".into(),
        fail_rate: args.log_v2_fail_rate,
        delay: args.log_v2_delay.get(),
        ..log_pod_config("log-v2")
    }
}

/// One ingest through the order sidecar's outbound listener: status, why the sidecar
/// answered (`x-sluice-reason`, or `degraded: <reason>` when the route's fallback
/// answered), body.
async fn ingest(
    client: &Client<HttpConnector, Full<Bytes>>,
    ports: Ports,
    headers: &[(&str, &str)],
) -> Option<(u16, String, String)> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://127.0.0.1:{}/logs", ports.order_outbound))
        .header("host", "log-service");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from_static(b"demo line"))).ok()?)
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let reason = match header("x-sluice-degraded") {
        d if d.is_empty() => header("x-sluice-reason"),
        d => format!("degraded: {d}"),
    };
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, reason, String::from_utf8_lossy(&body).into_owned()))
}

/// The state of the order sidecar's breaker for `ingest` × log-v2, from `/breakers`.
async fn v2_breaker(client: &Client<HttpConnector, Full<Bytes>>, ports: Ports) -> String {
    let url = format!("http://127.0.0.1:{}/breakers", ports.order_admin);
    let Ok(req) = Request::get(url).body(Full::default()) else {
        return "?".into();
    };
    let Ok(resp) = client.request(req).await else {
        return "?".into();
    };
    let Ok(body) = resp.into_body().collect().await else {
        return "?".into();
    };
    let list: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
    list.as_array()
        .and_then(|l| {
            l.iter()
                .find(|b| b["route"] == "log-service.ingest" && b["backend"] == "log-v2")
        })
        .map(|b| {
            let why = b["recent_transitions"]
                .as_array()
                .and_then(|t| t.last())
                .map(|t| t["reason"].as_str().unwrap_or("").to_string())
                .unwrap_or_default();
            format!("{} ({why})", b["state"].as_str().unwrap_or("?"))
        })
        .unwrap_or_else(|| "absent".into())
}

/// Governance, shown: a burst limited, the 90/10 split as shares, and log-v2's breaker
/// opening while it is down (its ingests then answered by the route's fallback, log-v1's
/// pod) and closing once it is back. Bounded: about 15 s.
async fn governance_scenes(
    client: &Client<HttpConnector, Full<Bytes>>,
    ports: Ports,
    log_v2: RunningService,
    args: &Args,
) -> anyhow::Result<RunningService> {
    println!("Governance (through the order sidecar, Host: log-service, POST /logs):");
    let (mut passed, mut limited) = (0, 0);
    for _ in 0..40 {
        match ingest(client, ports, &[("x-tenant-id", "burst")]).await {
            Some((429, _, _)) => limited += 1,
            Some(_) => passed += 1,
            None => {}
        }
    }
    println!(
        "  rate limit: a burst of 40 from one tenant (50/s, burst 20): {passed} passed, {limited} answered 429 rate-limited"
    );
    let (mut v1, mut v2) = (0u32, 0u32);
    // Paced below the log sidecars' inbound limit (500/s per pod), so no share is skewed
    // by requests that pod refused.
    let mut pace = tokio::time::interval(Duration::from_micros(2500));
    for i in 0..1000 {
        pace.tick().await;
        let (tenant, user) = (format!("t-{i}"), format!("u-{i}"));
        if let Some((_, _, body)) = ingest(
            client,
            ports,
            &[("x-tenant-id", &tenant), ("x-user-id", &user)],
        )
        .await
        {
            if body.contains("\"log-v1\"") {
                v1 += 1;
            } else if body.contains("\"log-v2\"") {
                v2 += 1;
            }
        }
    }
    let total = f64::from((v1 + v2).max(1));
    println!(
        "  split: 1000 users → log-v1 {:.1} %, log-v2 {:.1} % (policy: 90/10, sticky by x-user-id)",
        f64::from(v1) * 100.0 / total,
        f64::from(v2) * 100.0 / total
    );

    RunningService::shutdown(log_v2).await;
    let canary = [("x-tenant-id", "canary"), ("x-canary", "true")];
    let mut answers = Vec::new();
    let mut fallback_by = String::new();
    for _ in 0..12 {
        if let Some((status, reason, body)) = ingest(client, ports, &canary).await {
            answers.push(format!("{status} {reason}"));
            if reason == "degraded: breaker-open" || reason == "breaker-open" {
                if body.contains("\"log-v1\"") {
                    fallback_by = "log-v1".into();
                }
                break;
            }
        }
    }
    println!(
        "  log-v2 down; canary ingests answered: {}",
        answers.join(", ")
    );
    if !fallback_by.is_empty() {
        println!(
            "  breaker open: the route's fallback (backend log-fallback) answers them, logged by {fallback_by}, marked x-sluice-degraded"
        );
    }
    println!(
        "  /breakers ingest × log-v2: {}",
        v2_breaker(client, ports).await
    );
    let log_v2 = log_service::start(local(ports.v2_app), log_v2_config(args))
        .await
        .context("restarting log-v2")?;
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut recovered = false;
    while Instant::now() < deadline {
        // Only an answer log-v2 gave itself, not the fallback's, means it is back.
        if let Some((200..=299, reason, _)) = ingest(client, ports, &canary).await
            && reason.is_empty()
        {
            recovered = true;
            // The policy's `halfOpenRequests: 2`: a second probe closes the breaker.
            let _ = ingest(client, ports, &canary).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "  log-v2 back: {} after the open time; /breakers ingest × log-v2: {}",
        if recovered {
            "half-open probes passed"
        } else {
            "not yet recovered"
        },
        v2_breaker(client, ports).await
    );
    println!();
    Ok(log_v2)
}

/// A sample of log-v1 during the overload burst: its sidecar's learned limit and the
/// batches in flight at the app.
async fn sample_log_v1(
    client: &Client<HttpConnector, Full<Bytes>>,
    ports: Ports,
) -> (Option<f64>, Option<u64>) {
    let metrics = admin_text(client, ports.v1_admin, "/metrics").await;
    let limit = metric_value(&metrics, "sluice_concurrency_limit");
    let stats: serde_json::Value =
        serde_json::from_str(&admin_text(client, ports.v1_app, "/logs/stats").await)
            .unwrap_or_default();
    (limit, stats["in_flight"].as_u64())
}

/// The value of the first sample named exactly `series` (with its labels, if any).
fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Overload, shown: log-v1 takes about 100 batches a second; a burst of three times that
/// in a mix of priorities goes through the order sidecar. log-v1's sidecar learns the
/// limit from log-v1's latency, queues briefly and refuses the excess, sheddable first.
/// Bounded: about 6 s.
async fn overload_scene(
    client: &Client<HttpConnector, Full<Bytes>>,
    ports: Ports,
) -> anyhow::Result<()> {
    let capacity =
        LOG_WORKERS as f64 / (LOG_WORK_PER_KIB * u32::try_from(BATCH_BYTES / 1024)?).as_secs_f64();
    println!(
        "Overload (log-v1: {LOG_WORKERS} workers, a {} KiB batch takes {} ms: about {capacity:.0} batches/s):",
        BATCH_BYTES / 1024,
        (LOG_WORK_PER_KIB * u32::try_from(BATCH_BYTES / 1024)?).as_millis()
    );
    let mut spec = load::Load {
        target: local(ports.order_outbound),
        host: "log-service".into(),
        path: "/logs".into(),
        rate: capacity / 4.0,
        duration: Duration::from_secs(1),
        body: Bytes::from(vec![b'x'; BATCH_BYTES]),
        headers: vec![("x-log-batch".into(), "true".into())],
        priority_header: "x-priority".into(),
        mix: vec![
            ("critical".into(), 20),
            ("default".into(), 50),
            ("sheddable".into(), 30),
        ],
        timeout: Duration::from_secs(2),
        connections: 4,
    };
    let calm = load::run(&spec).await.context("the calm load")?.total();
    println!(
        "  at a quarter of that ({:.0}/s for 1 s): {} of {} admitted, p50 {}",
        spec.rate,
        calm.ok,
        calm.sent,
        fmt_ms(calm.ok_percentile(0.5))
    );

    spec.rate = capacity * 3.0;
    spec.duration = Duration::from_secs(4);
    let burst = spec.clone();
    let running = tokio::spawn(async move { load::run(&burst).await });
    let mut limits = Vec::new();
    let mut app_peak = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !running.is_finished() {
        tick.tick().await;
        let (limit, in_flight) = sample_log_v1(client, ports).await;
        limits.extend(limit);
        app_peak = app_peak.max(in_flight.unwrap_or(0));
    }
    let report = running.await?.context("the burst")?;
    println!(
        "  a burst of {:.0} batches/s for {} s, 20 % critical, 50 % default, 30 % sheddable (x-priority):",
        spec.rate,
        spec.duration.as_secs()
    );
    for level in ["critical", "default", "sheddable"] {
        let o = report.levels.get(level).cloned().unwrap_or_default();
        let lost = o.other + o.timed_out + o.failed;
        println!(
            "    {level:<10} {:>5} sent: {:>5} admitted, {:>5} refused 503 overloaded ({:.1} %){}",
            o.sent,
            o.ok,
            o.overloaded,
            o.overloaded as f64 * 100.0 / o.sent.max(1) as f64,
            if lost > 0 {
                format!(
                    "; {} timed out, {} other status, {} failed",
                    o.timed_out, o.other, o.failed
                )
            } else {
                String::new()
            }
        );
    }
    let all = report.total();
    println!(
        "    admitted p50 {}, p99 {}; log-v1 had at most {app_peak} batches in flight ({LOG_WORKERS} workers)",
        fmt_ms(all.ok_percentile(0.5)),
        fmt_ms(all.ok_percentile(0.99)),
    );
    if let (Some(first), Some(last)) = (limits.first(), limits.last()) {
        let low = limits.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "  log-v1 sidecar /metrics: sluice_concurrency_limit {first} at the start of the burst, {last} at its end (lowest {low})"
        );
    }
    let metrics = admin_text(client, ports.v1_admin, "/metrics").await;
    let refusals: Vec<String> = ["critical", "default", "sheddable"]
        .iter()
        .map(|l| {
            let series = format!("sluice_overload_refusals_total{{priority=\"{l}\"}}");
            format!("{l} {}", metric_value(&metrics, &series).unwrap_or(0.0))
        })
        .collect();
    println!(
        "  log-v1 sidecar /metrics: sluice_overload_refusals_total {}",
        refusals.join(", ")
    );
    println!();
    Ok(())
}

fn fmt_ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".into(),
        |d| format!("{:.1} ms", d.as_secs_f64() * 1000.0),
    )
}

/// GETs an admin path of a sidecar and returns the body as text.
async fn admin_text(client: &Client<HttpConnector, Full<Bytes>>, admin: u16, path: &str) -> String {
    let Ok(req) = Request::get(format!("http://127.0.0.1:{admin}{path}")).body(Full::default())
    else {
        return String::new();
    };
    let Ok(resp) = client.request(req).await else {
        return String::new();
    };
    match resp.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    }
}

/// Shows that the order → log hop is mTLS: each sidecar's own identity (`/identity`)
/// and the caller identity log-v1's sidecar authenticated (`peer_identity` on its
/// inbound series in `/metrics`).
async fn show_mtls(client: &Client<HttpConnector, Full<Bytes>>, ports: Ports) {
    println!("mTLS (identities from the control plane's CA):");
    for (name, admin) in [
        ("order sidecar", ports.order_admin),
        ("log-v1 sidecar", ports.v1_admin),
        ("log-v2 sidecar", ports.v2_admin),
    ] {
        let v: serde_json::Value =
            serde_json::from_str(&admin_text(client, admin, "/identity").await).unwrap_or_default();
        println!(
            "  {name:<15} /identity: mtls {}, {} (certificate until {})",
            v["mtls"],
            v["spiffe_id"].as_str().unwrap_or("?"),
            v["not_after"].as_str().unwrap_or("?")
        );
    }
    let metrics = admin_text(client, ports.v1_admin, "/metrics").await;
    let peers: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("sluice_requests_total{") && l.contains("direction=\"inbound\""))
        .filter_map(|l| l.split("peer_identity=\"").nth(1)?.split('"').next())
        .filter(|id| !id.is_empty())
        .collect();
    if peers.is_empty() {
        println!("  log-v1 sidecar saw no authenticated caller yet");
    } else {
        for peer in peers {
            println!(
                "  log-v1 sidecar /metrics: inbound requests over mTLS from peer_identity=\"{peer}\""
            );
        }
    }
    println!();
}

/// A few orders, plain and canary, and what each was answered.
async fn send_sample_traffic(client: &Client<HttpConnector, Full<Bytes>>, ports: Ports) {
    println!("Sample traffic (order-service → its sidecar → log sidecars → log-v1/v2):");
    let url = format!("http://127.0.0.1:{}/orders", ports.order_app);
    let mut cases: Vec<(String, Vec<(&str, String)>)> = (1..=6)
        .map(|i| {
            (
                format!("x-user-id: user-{i}"),
                vec![("x-user-id", format!("user-{i}"))],
            )
        })
        .collect();
    for i in 1..=3 {
        cases.push((
            format!("x-user-id: user-{i}, x-canary: true"),
            vec![
                ("x-user-id", format!("user-{i}")),
                ("x-canary", "true".into()),
            ],
        ));
    }
    for (label, headers) in cases {
        let mut req = Request::builder().method(Method::POST).uri(&url);
        for (k, v) in &headers {
            req = req.header(*k, v.as_str());
        }
        let Ok(req) = req.body(Full::new(Bytes::from_static(b"{\"item\":\"book\"}"))) else {
            continue;
        };
        match client.request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_default();
                println!(
                    "  POST /orders ({label:<34}) → {} {}",
                    status.as_u16(),
                    body.trim()
                );
            }
            Err(e) => println!("  POST /orders ({label:<34}) → failed: {e}"),
        }
    }
    for (name, port) in [("log-v1", ports.v1_app), ("log-v2", ports.v2_app)] {
        let Ok(req) =
            Request::get(format!("http://127.0.0.1:{port}/logs/stats")).body(Full::default())
        else {
            continue;
        };
        if let Ok(resp) = client.request(req).await
            && let Ok(body) = resp.into_body().collect().await
        {
            println!(
                "  {name} stats: {}",
                String::from_utf8_lossy(&body.to_bytes()).trim()
            );
        }
    }
    println!();
}

fn print_try(ports: Ports, policy: &Path) {
    let o = ports.order_app;
    let out = ports.order_outbound;
    let a = ports.order_admin;
    println!("Try:");
    println!("  curl -si -X POST http://127.0.0.1:{o}/orders -H 'x-user-id: alice'");
    println!(
        "  curl -si -X POST http://127.0.0.1:{o}/orders -H 'x-canary: true'          # always log-v2"
    );
    println!(
        "  curl -si -X POST http://127.0.0.1:{out}/logs -H 'Host: log-service' -d hi  # straight into the order sidecar"
    );
    println!(
        "  curl -si http://127.0.0.1:{out}/ -H 'Host: nowhere'                     # 404, x-sluice-reason: no-route"
    );
    println!(
        "  for i in $(seq 100); do curl -s -o /dev/null -w '%{{http_code}} ' -X POST http://127.0.0.1:{out}/logs -H 'Host: log-service' -H 'x-tenant-id: t1'; done; echo   # rate limit (429)"
    );
    println!();
    println!(
        "Admin (order sidecar; log sidecars on :{} and :{}):",
        ports.v1_admin, ports.v2_admin
    );
    println!("  curl -s http://127.0.0.1:{a}/config");
    println!("  curl -s http://127.0.0.1:{a}/metrics | grep sluice_requests_total");
    println!("  curl -s http://127.0.0.1:{a}/ready");
    println!("  curl -s http://127.0.0.1:{a}/identity   # its SPIFFE ID and certificate expiry");
    println!("  curl -s -X PUT http://127.0.0.1:{a}/log-level -d debug");
    println!(
        "  curl -s http://127.0.0.1:{}/metrics | grep -E 'sluice_concurrency|sluice_overload'   # log-v1's learned limit, refusals by priority",
        ports.v1_admin
    );
    println!();
    let cp = ports.cp_admin;
    println!(
        "Edit the policy live (the control plane validates it and pushes it to every sidecar):"
    );
    println!("  $EDITOR {}", policy.display());
    println!(
        "  e.g. set weights to {{ log-v1: 50, log-v2: 50 }}, then watch the new version acked everywhere:"
    );
    println!("  curl -s http://127.0.0.1:{cp}/proxies   # acked_version per sidecar");
    println!("  curl -s http://127.0.0.1:{cp}/policies  # each file's version, or its error");
    println!(
        "  break it (weights summing to 90): /policies shows the error with file:line:column, and"
    );
    println!("  no sidecar receives it; the last good version keeps serving.");
    println!();
    println!(
        "Restart with --log-v2-fail-rate 0.5 or --log-v2-delay 800ms to watch retries, timeouts and the breaker."
    );
    println!("Ctrl-C to stop.");
}

/// Where the rollout scene writes its route: the demo's policy file and its text.
struct RolloutFiles<'a> {
    path: &'a Path,
    policy: &'a str,
}

impl RolloutFiles<'_> {
    /// Writes the policy with the rollout route, stepping through `steps`.
    fn write(&self, steps: &str) -> anyhow::Result<()> {
        let route = ROLLOUT_ROUTE.replace("{STEPS}", steps);
        let text = self.policy.replacen(
            "    - name: ingest\n",
            &format!("{route}    - name: ingest\n"),
            1,
        );
        std::fs::write(self.path, text).context("writing the rollout into the demo policy")
    }

    /// Writes the policy back as it was, without the rollout route.
    fn restore(&self) -> anyhow::Result<()> {
        std::fs::write(self.path, self.policy).context("restoring the demo policy")
    }
}

/// What the rollout scene's load was answered.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    failed: u64,
    by_v2: u64,
    first_failure: Option<Instant>,
    last_by_v2: Option<Instant>,
}

/// Ingests on the rollout route at [`ROLLOUT_RATE`] a second until the task is aborted.
fn start_rollout_load(
    client: &Client<HttpConnector, Full<Bytes>>,
    ports: Ports,
) -> (tokio::task::JoinHandle<()>, Arc<std::sync::Mutex<Tally>>) {
    let tally: Arc<std::sync::Mutex<Tally>> = Arc::default();
    let (client, shared) = (client.clone(), tally.clone());
    let task = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_secs(1) / ROLLOUT_RATE);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            pace.tick().await;
            let (client, shared) = (client.clone(), shared.clone());
            tokio::spawn(async move {
                let answer = ingest(&client, ports, &[("x-demo", "rollout")]).await;
                let now = Instant::now();
                let mut t = shared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                t.sent += 1;
                let failed = answer.as_ref().is_none_or(|(status, _, _)| *status >= 500);
                if failed {
                    t.failed += 1;
                    t.first_failure.get_or_insert(now);
                }
                if answer.is_some_and(|(_, _, body)| body.contains("\"log-v2\"")) {
                    t.by_v2 += 1;
                    t.last_by_v2 = Some(now);
                }
            });
        }
    });
    (task, tally)
}

/// The rollout scene's entry in the control plane's `/rollouts`, or `Null`.
async fn scene_rollout(
    client: &Client<HttpConnector, Full<Bytes>>,
    ports: Ports,
) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&admin_text(client, ports.cp_admin, "/rollouts").await)
            .unwrap_or_default();
    v["rollouts"]
        .as_array()
        .and_then(|l| l.iter().find(|r| r["route"] == "rollout").cloned())
        .unwrap_or_default()
}

/// The weight the order sidecar gives log-v2 on the rollout route right now.
fn order_v2_weight(order: &sluice_proxy::RunningProxy) -> Option<u32> {
    let snapshot = order.policy_store().current();
    let policy = snapshot
        .policy_set()?
        .policies()
        .iter()
        .find(|p| p.metadata.name == "log-service")?
        .clone();
    let route = policy.spec.routes.iter().find(|r| r.name == "rollout")?;
    route
        .split
        .iter()
        .find_map(|rule| rule.weights.as_ref()?.get("log-v2").copied())
}

/// Prints each step of a rollout as the control plane decides it and as the order
/// sidecar enforces it, remembering what it printed across calls.
struct Follower<'a> {
    client: &'a Client<HttpConnector, Full<Bytes>>,
    ports: Ports,
    order: &'a sluice_proxy::RunningProxy,
    since: Instant,
    /// The block of an earlier rollout, whose entry is ignored until the new one shows.
    old_block: Option<String>,
    printed: usize,
    enforced: Option<u32>,
}

impl Follower<'_> {
    /// Prints until `done` holds or `limit` has passed since the start; returns the rollout.
    async fn until(
        &mut self,
        limit: Duration,
        done: impl Fn(&serde_json::Value, Option<u32>) -> bool,
    ) -> serde_json::Value {
        loop {
            let mut r = scene_rollout(self.client, self.ports).await;
            if self.old_block.is_some() && r["block"].as_str() == self.old_block.as_deref() {
                r = serde_json::Value::Null;
            }
            let history = r["history"].as_array().cloned().unwrap_or_default();
            for t in history.iter().skip(self.printed) {
                let result = t["result"].as_str().unwrap_or("?");
                // Windows without enough requests yet are many and say nothing new.
                if result != "inconclusive" {
                    println!(
                        "  {:>5.1} s  /rollouts: {result:<11} step {}, log-v2 at {:>3} %  ({})",
                        self.since.elapsed().as_secs_f64(),
                        t["step"],
                        t["canaryWeight"],
                        t["reason"].as_str().unwrap_or("")
                    );
                }
            }
            self.printed = self.printed.max(history.len());
            let weight = order_v2_weight(self.order);
            if weight != self.enforced {
                if let Some(w) = weight {
                    println!(
                        "  {:>5.1} s  order sidecar now sends log-v2 {w:>3} % of the route",
                        self.since.elapsed().as_secs_f64()
                    );
                }
                self.enforced = weight;
            }
            if done(&r, weight) || self.since.elapsed() > limit {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The last judged window of a rollout: its decision, why, and each check.
fn print_last_window(r: &serde_json::Value) {
    let w = &r["lastWindow"];
    println!(
        "  /rollouts: phase {}, last window {}: {}",
        r["phase"].as_str().unwrap_or("?"),
        w["decision"].as_str().unwrap_or("?"),
        w["reason"].as_str().unwrap_or("?")
    );
    for c in w["checks"].as_array().into_iter().flatten() {
        println!(
            "    check {:<16} value {:<10} threshold {:<8} samples {:<5} {}",
            c["name"].as_str().unwrap_or("?"),
            c["value"]
                .as_f64()
                .map_or_else(|| "-".into(), |v| format!("{v:.4}")),
            c["threshold"],
            c["samples"],
            c["verdict"].as_str().unwrap_or("?")
        );
    }
}

/// Canary rollouts, shown: the control plane moves log-v2 into a route step by step,
/// judged from the sidecars' own reports, and promotes it; then a bad log-v2 (failing
/// half its ingests) is rolled back at the first report that shows it. Bounded: about
/// 10 s on a quiet machine, 60 s at most.
async fn rollout_scene(
    client: &Client<HttpConnector, Full<Bytes>>,
    ports: Ports,
    order: &sluice_proxy::RunningProxy,
    files: RolloutFiles<'_>,
    log_v2: RunningService,
    args: &Args,
) -> anyhow::Result<RunningService> {
    println!(
        "Canary rollout (route `rollout`, x-demo: rollout; {ROLLOUT_RATE} ingests/s through the order sidecar;"
    );
    println!(
        "  steps of 1 s judged on at least 20 log-v2 requests: error rate ≤ 1 %, p99 ≤ 1 s, and no worse than log-v1;"
    );
    println!(
        "  every sidecar reports its traffic every {} ms):",
        REPORT_INTERVAL.as_millis()
    );
    files.write("[10, 50, 100]")?;
    let since = Instant::now();
    let (load, tally) = start_rollout_load(client, ports);
    let mut follow = Follower {
        client,
        ports,
        order,
        since,
        old_block: None,
        printed: 0,
        enforced: None,
    };
    let r = follow
        .until(Duration::from_secs(30), |r, w| {
            r["phase"] == "promoted" && w == Some(100)
        })
        .await;
    load.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    {
        let t = tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        println!(
            "  {} ingests: {} answered by log-v2, {} failed",
            t.sent, t.by_v2, t.failed
        );
    }
    print_last_window(&r);
    println!();

    println!(
        "A bad log-v2 (fails {:.0} % of its ingests), rolled out again with steps [10, 25, 50, 100]:",
        BAD_FAIL_RATE * 100.0
    );
    RunningService::shutdown(log_v2).await;
    let bad = log_service::start(
        local(ports.v2_app),
        LogServiceConfig {
            fail_rate: BAD_FAIL_RATE,
            ..log_v2_config(args)
        },
    )
    .await
    .context("starting the bad log-v2")?;
    // A changed rollout block is a new rollout: log-v2 starts again at its first step.
    files.write("[10, 25, 50, 100]")?;
    let mut follow = Follower {
        since: Instant::now(),
        old_block: r["block"].as_str().map(str::to_string),
        printed: 0,
        ..follow
    };
    follow
        .until(Duration::from_secs(15), |r, w| {
            !r.is_null() && w == Some(10)
        })
        .await;
    let (load, tally) = start_rollout_load(client, ports);
    let r = follow
        .until(Duration::from_secs(30), |r, w| {
            r["phase"] == "rolled-back" && w == Some(0)
        })
        .await;
    let enforced = Instant::now();
    let v2_at_rollback = tally
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .by_v2;
    // A second more, to show what log-v2 gets once it is rolled back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    {
        let t = tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        println!(
            "  {} ingests: {} answered by log-v2, {} failed (5xx)",
            t.sent, t.by_v2, t.failed
        );
        if let Some(first) = t.first_failure {
            if r["phase"] == "rolled-back" {
                println!(
                    "  time to rollback: {:.2} s from the first failed ingest to log-v2 at 0 % in the order sidecar",
                    enforced.saturating_duration_since(first).as_secs_f64()
                );
            } else {
                println!("  not rolled back yet: see /rollouts");
            }
            if let Some(last) = t.last_by_v2 {
                println!(
                    "  log-v2 answered its last ingest {:.2} s after the first failure, {} of them in the second after the rollback",
                    last.saturating_duration_since(first).as_secs_f64(),
                    t.by_v2 - v2_at_rollback
                );
            }
        }
    }
    print_last_window(&r);
    println!(
        "  (a rolled-back rollout holds at 0 until its block changes: curl -s http://127.0.0.1:{}/rollouts)",
        ports.cp_admin
    );
    println!();

    // Back to the demo's own policy and a healthy log-v2 for what follows.
    files.restore()?;
    RunningService::shutdown(bad).await;
    log_service::start(local(ports.v2_app), log_v2_config(args))
        .await
        .context("restarting log-v2")
}
