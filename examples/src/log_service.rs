//! The log-ingest service: `POST /logs`, `GET /logs/stats`, `GET /health`.
//!
//! `POST /logs` reads the whole body as it streams in (counting bytes, keeping none),
//! waits the configured delay, then answers `202 Accepted` with a JSON body naming
//! this instance's version (`{"accepted":true,"version":"log-v1","bytes":42}`) and the
//! same name in `x-log-version`. With a fail rate above zero, that share of ingests is
//! answered `503` instead, so a sidecar's retries and breakers have something to do.
//!
//! With `workers` set the service has a capacity, like an app with a thread pool: an
//! ingest holds one of `workers` workers for `work_per_kib` per whole KiB of its body
//! (a one-line ingest costs nothing, a 4 KiB batch four times `work_per_kib`). Up to
//! `workers` batches in flight are answered in their work time; past that knee they wait
//! for a worker and latency grows with concurrency, which is what a sidecar's adaptive
//! concurrency limit learns from. `GET /logs/stats` reports the ingests in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use std::{fmt, io};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::RunningService;
use crate::server::{self, text};

/// How a log-service instance behaves.
#[derive(Clone, Debug)]
pub struct LogServiceConfig {
    /// The version name it reports (`log-v1`, `log-v2`).
    pub name: String,
    /// Share of ingests answered with `503`, from 0.0 (never) to 1.0 (always).
    pub fail_rate: f64,
    /// Time to wait before answering an ingest.
    pub delay: Duration,
    /// Workers that ingests share; `None`: as many as there are ingests.
    pub workers: Option<usize>,
    /// Work time on a worker per whole KiB of an ingest's body.
    pub work_per_kib: Duration,
}

impl Default for LogServiceConfig {
    fn default() -> Self {
        Self {
            name: "log-v1".to_string(),
            fail_rate: 0.0,
            delay: Duration::ZERO,
            workers: None,
            work_per_kib: Duration::ZERO,
        }
    }
}

/// Counters of one instance, as `GET /logs/stats` reports them.
#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    in_flight: AtomicU64,
}

/// One instance: its settings, counters and workers.
struct State {
    config: LogServiceConfig,
    stats: Stats,
    workers: Option<Semaphore>,
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stats")
            .field("accepted", &self.accepted.load(Ordering::Relaxed))
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish()
    }
}

/// Binds `addr` and serves the log service until the returned handle is shut down.
pub async fn start(addr: SocketAddr, config: LogServiceConfig) -> io::Result<RunningService> {
    let workers = config.workers.map(|n| Semaphore::new(n.max(1)));
    let state = Arc::new(State {
        config,
        stats: Stats::default(),
        workers,
    });
    server::serve(addr, move |req| handle(state.clone(), req)).await
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let State { config, stats, .. } = &*state;
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/logs") => {
            let _counted = InFlight::enter(&stats.in_flight);
            ingest(&state, req.into_body()).await
        }
        (&Method::GET, "/logs/stats") => server::json(
            StatusCode::OK,
            &json!({
                "version": config.name,
                "accepted": stats.accepted.load(Ordering::Relaxed),
                "failed": stats.failed.load(Ordering::Relaxed),
                "bytes": stats.bytes.load(Ordering::Relaxed),
                "in_flight": stats.in_flight.load(Ordering::Relaxed),
                "workers": config.workers,
            }),
        ),
        (&Method::GET, "/health") => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Counts an ingest in flight until dropped, also when its caller goes away mid-way.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn ingest(state: &State, mut body: Incoming) -> Response<Full<Bytes>> {
    let State {
        config,
        stats,
        workers,
    } = state;
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    bytes += data.len() as u64;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "request body broke off");
                return text(StatusCode::BAD_REQUEST, "request body broke off\n");
            }
        }
    }
    let work = config.work_per_kib * u32::try_from(bytes / 1024).unwrap_or(u32::MAX);
    if let Some(workers) = workers
        && !work.is_zero()
    {
        // Never closed, so acquiring only waits.
        if let Ok(_worker) = workers.acquire().await {
            tokio::time::sleep(work).await;
        }
    }
    if !config.delay.is_zero() {
        tokio::time::sleep(config.delay).await;
    }
    let mut resp = if config.fail_rate > 0.0 && rand::random::<f64>() < config.fail_rate {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        server::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "accepted": false, "version": config.name, "error": "injected failure" }),
        )
    } else {
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        server::json(
            StatusCode::ACCEPTED,
            &json!({ "accepted": true, "version": config.name, "bytes": bytes }),
        )
    };
    if let Ok(v) = hyper::header::HeaderValue::from_str(&config.name) {
        resp.headers_mut().insert("x-log-version", v);
    }
    resp
}
