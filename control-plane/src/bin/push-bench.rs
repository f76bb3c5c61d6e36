//! `push-bench`: how long from saving a policy file until every proxy has
//! acknowledged the new version, at 1, 100 and 1,000 connected proxies.
//!
//! It starts a control plane (in this process, or with `--cp-bin PATH` as a
//! child process so its memory can be read on its own), connects N light
//! simulated proxies (one tonic channel each, all in this process; they read
//! each snapshot's version only and ACK it without validating it), then
//! rewrites a policy file E times and waits each time until all N have
//! acknowledged the new version.
//!
//! Reported per N: p50/p99/max over the edits of "save → last proxy ACKed", the
//! p50/p99 of every single proxy's "save → ACK", and peak RSS (`VmHWM`) of the
//! control plane (child mode) or of this whole process (in-process mode, which
//! includes the simulated proxies).

// The report on stdout is this program's whole purpose.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use sluice_api::pb;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Parser)]
#[command(
    name = "push-bench",
    about = "Measures policy push latency to many proxies."
)]
struct Args {
    /// Numbers of simulated proxies to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    subscribers: Vec<usize>,
    /// Edits per round.
    #[arg(long, default_value_t = 20)]
    edits: usize,
    /// Other policy files in the directory (unchanged by the edits).
    #[arg(long, default_value_t = 20)]
    other_files: usize,
    /// Run the control plane as this binary (child process) instead of in process.
    #[arg(long)]
    cp_bin: Option<PathBuf>,
}

fn policy(name: &str, per_second: usize) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\n\
         kind: RoutePolicy\n\
         metadata: {{ name: {name}, namespace: bench }}\n\
         spec:\n\
         \x20 host: {name}\n\
         \x20 backends:\n\
         \x20   v1: {{ addresses: [\"127.0.0.1:9101\"] }}\n\
         \x20   v2: {{ addresses: [\"127.0.0.1:9102\"] }}\n\
         \x20 routes:\n\
         \x20   - name: all\n\
         \x20     match: {{ path: {{ prefix: / }} }}\n\
         \x20     timeout: 2s\n\
         \x20     split:\n\
         \x20       - weights: {{ v1: 90, v2: 10 }}\n\
         \x20 inbound:\n\
         \x20   rateLimit: {{ perSecond: {per_second}, burst: 10 }}\n"
    )
}

fn save(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).expect("write policy");
    std::fs::rename(&tmp, dir.join(file)).expect("rename policy");
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A control plane this bench talks to.
enum Cp {
    InProcess(sluice_control_plane::RunningControlPlane),
    Child(ChildCp),
}

/// The control plane as a child process, killed and reaped when dropped: a round that
/// fails, or a bench stopped with Ctrl-C or SIGTERM, leaves no control plane behind.
struct ChildCp(std::process::Child);

impl Drop for ChildCp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_cp(args: &Args, dir: &Path) -> anyhow::Result<(Cp, String)> {
    match &args.cp_bin {
        None => {
            let cp = sluice_control_plane::start(sluice_control_plane::ControlPlaneConfig {
                policy_dir: dir.to_path_buf(),
                ..Default::default()
            })
            .await?;
            let url = format!("http://{}", cp.grpc_addr());
            Ok((Cp::InProcess(cp), url))
        }
        Some(bin) => {
            let addr_file = dir.join(".addrs.json");
            // The simulated proxies speak plaintext gRPC, like the in-process control
            // plane without a CA; the binary serves TLS unless told otherwise.
            let child = ChildCp(
                std::process::Command::new(bin)
                    .arg("--policy-dir")
                    .arg(dir)
                    .args(["--grpc", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
                    .args(["--log-level", "warn", "--plaintext"])
                    .arg("--addr-file")
                    .arg(&addr_file)
                    .spawn()?,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            let addrs: serde_json::Value = loop {
                if let Ok(bytes) = std::fs::read(&addr_file) {
                    break serde_json::from_slice(&bytes)?;
                }
                anyhow::ensure!(Instant::now() < deadline, "control plane did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let url = format!("http://{}", addrs["grpc"].as_str().unwrap_or_default());
            Ok((Cp::Child(child), url))
        }
    }
}

/// The policy stream's gRPC path, as the generated client names it.
const STREAM_POLICIES: &str = "/sluice.v1.PolicyDiscovery/StreamPolicies";

/// What a simulated proxy reads of a `Snapshot`: its version (field 1). The fields it
/// does not name are skipped undecoded, as protobuf skips unknown fields, so a thousand
/// clients in this one process cost little beside the control plane they measure; a
/// real proxy decodes the whole snapshot on a core of its own.
#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotVersion {
    /// `Snapshot.version`: what the ACK names.
    #[prost(string, tag = "1")]
    version: String,
}

/// One simulated proxy: Hello, then ACK every snapshot and report it.
async fn proxy(
    id: usize,
    url: String,
    acks: mpsc::UnboundedSender<(usize, String, Instant)>,
    connecting: Arc<Semaphore>,
) -> anyhow::Result<()> {
    // Opening a thousand connections in the same instant overflows the accept
    // queue of a control plane sharing two cores with its clients; a fleet of
    // real proxies spreads its connects (jittered backoff, pod start times).
    let permit = connecting.acquire_owned().await?;
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::ProxyMessage {
        message: Some(pb::proxy_message::Message::Hello(pb::Hello {
            node_id: format!("bench-{id}"),
            namespace: "bench".into(),
            service: format!("svc-{id}"),
            schema_version: sluice_config::SCHEMA_VERSION,
            proxy_version: "push-bench".into(),
            last_applied_version: String::new(),
            accepted_schema_versions: sluice_config::SCHEMA_VERSIONS.to_vec(),
            accepts_route_traffic: false,
        })),
    })
    .await?;
    grpc.ready().await?;
    let mut inbound = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            http::uri::PathAndQuery::from_static(STREAM_POLICIES),
            tonic_prost::ProstCodec::<pb::ProxyMessage, SnapshotVersion>::default(),
        )
        .await?
        .into_inner();
    drop(permit);
    while let Some(s) = inbound.message().await? {
        tx.send(pb::ProxyMessage {
            message: Some(pb::proxy_message::Message::Ack(pb::Ack {
                version: s.version.clone(),
            })),
        })
        .await?;
        if acks.send((id, s.version, Instant::now())).is_err() {
            break;
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn round(args: &Args, n: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("sluice-push-bench-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for i in 0..args.other_files {
        save(
            &dir,
            &format!("svc-{i}.yaml"),
            &policy(&format!("svc-{i}"), 100),
        );
    }
    save(&dir, "edited.yaml", &policy("edited", 1));
    let (cp, url) = start_cp(args, &dir).await?;

    let (acks_tx, mut acks) = mpsc::unbounded_channel();
    let mut proxies = tokio::task::JoinSet::new();
    let connecting = Arc::new(Semaphore::new(64));
    for id in 0..n {
        let (url, acks_tx, connecting) = (url.clone(), acks_tx.clone(), connecting.clone());
        proxies.spawn(async move {
            if let Err(e) = proxy(id, url, acks_tx, connecting).await {
                eprintln!("proxy {id}: {e}");
            }
        });
    }
    drop(acks_tx);
    // Everyone has the initial version.
    let connect_start = Instant::now();
    let mut synced = 0;
    while synced < n {
        tokio::time::timeout(Duration::from_secs(60), acks.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("proxies gone"))?;
        synced += 1;
    }
    let connect_time = connect_start.elapsed();

    let mut all_acked = Vec::new();
    let mut each = Vec::new();
    for edit in 0..args.edits {
        let saved_at = Instant::now();
        save(&dir, "edited.yaml", &policy("edited", edit + 2));
        let mut version: Option<String> = None;
        let mut got = 0;
        let mut last = saved_at;
        while got < n {
            let (_, v, at) = tokio::time::timeout(Duration::from_secs(60), acks.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("proxies gone"))?;
            // Every proxy sees exactly one new version per edit.
            match &version {
                None => version = Some(v),
                Some(want) => anyhow::ensure!(*want == v, "two versions in one edit"),
            }
            got += 1;
            each.push(at - saved_at);
            last = last.max(at);
        }
        all_acked.push(last - saved_at);
    }
    all_acked.sort();
    each.sort();

    let (rss_kib, rss_of) = match &cp {
        Cp::Child(c) => (vm_hwm_kib(c.0.id()), "control plane (child)"),
        Cp::InProcess(_) => (
            vm_hwm_kib(std::process::id()),
            "whole bench process (control plane + simulated proxies)",
        ),
    };
    println!(
        "subscribers={n:>5} edits={} connect+sync={}ms | save->all ACKed p50={}ms p99={}ms max={}ms | per-proxy save->ACK p50={}ms p99={}ms | VmHWM={} MiB ({rss_of})",
        args.edits,
        ms(connect_time),
        ms(percentile(&all_acked, 0.50)),
        ms(percentile(&all_acked, 0.99)),
        ms(*all_acked.last().unwrap_or(&Duration::ZERO)),
        ms(percentile(&each, 0.50)),
        ms(percentile(&each, 0.99)),
        rss_kib.map_or_else(|| "?".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
    );

    proxies.abort_all();
    match cp {
        Cp::InProcess(cp) => cp.shutdown().await,
        Cp::Child(c) => drop(c),
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn stopped() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let rounds = async {
            for &n in &args.subscribers {
                if let Err(e) = round(&args, n).await {
                    eprintln!("round with {n} subscribers failed: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        };
        // Stopped early, the round in flight is dropped, and with it its child.
        tokio::select! {
            code = rounds => code,
            () = stopped() => {
                eprintln!("stopped");
                ExitCode::FAILURE
            }
        }
    })
}
