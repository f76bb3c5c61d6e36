//! An upstream with a fixed number of workers, and open-loop load to send it.
//!
//! [`WorkerUpstream`] answers every request after `service_time` on one of `workers`
//! workers: up to `workers` requests in flight its latency is `service_time`, past that
//! knee requests queue for a worker and latency grows with concurrency, as in a real app
//! with a thread pool. It counts what it saw: requests in flight (received, not yet
//! answered), the most at once, and requests by `x-priority`. [`open_loop`] sends a fixed
//! rate of requests that do not wait for each other's answers and tallies the outcomes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;

use crate::HttpConn;

#[derive(Debug)]
struct Pool {
    workers: Semaphore,
    worker_count: AtomicUsize,
    service_time: Duration,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    served: AtomicU64,
}

/// A running upstream with `workers` workers (see the module docs).
#[derive(Debug)]
pub struct WorkerUpstream {
    addr: SocketAddr,
    pool: Arc<Pool>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl WorkerUpstream {
    /// Starts on an ephemeral port of 127.0.0.1 (HTTP/1.1 and h2c).
    pub async fn start(workers: usize, service_time: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a worker upstream");
        let addr = listener.local_addr().expect("worker upstream address");
        let pool = Arc::new(Pool {
            workers: Semaphore::new(workers),
            worker_count: AtomicUsize::new(workers),
            service_time,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
        });
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let p = pool.clone();
        let task = tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let stream = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                    _ = &mut stop_rx => break,
                };
                let _ = stream.set_nodelay(true);
                let p = p.clone();
                let svc = service_fn(move |req| serve(p.clone(), req));
                let builder = builder.clone();
                conns.spawn(async move {
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            conns.abort_all();
        });
        Self {
            addr,
            pool,
            stop: Some(stop_tx),
            task,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests it can answer per second with all workers busy.
    pub fn capacity(&self) -> f64 {
        self.pool.worker_count.load(Ordering::Relaxed) as f64 / self.pool.service_time.as_secs_f64()
    }

    /// Changes the number of workers (a worker busy now finishes its request first).
    pub async fn set_workers(&self, n: usize) {
        let cur = self.pool.worker_count.swap(n, Ordering::SeqCst);
        if n > cur {
            self.pool.workers.add_permits(n - cur);
        } else if n < cur {
            let gone = self
                .pool
                .workers
                .acquire_many(u32::try_from(cur - n).expect("few workers"))
                .await
                .expect("never closed");
            gone.forget();
        }
    }

    /// Requests in flight at the upstream now (received, not yet answered).
    pub fn in_flight(&self) -> usize {
        self.pool.in_flight.load(Ordering::Relaxed)
    }

    /// The most requests in flight at once since the last call.
    pub fn take_max_in_flight(&self) -> usize {
        self.pool.max_in_flight.swap(0, Ordering::Relaxed)
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.pool.served.load(Ordering::Relaxed)
    }

    /// Stops accepting and drops open connections.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for WorkerUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    pool: Arc<Pool>,
    _req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = pool.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    pool.max_in_flight.fetch_max(n, Ordering::SeqCst);
    {
        let _worker = pool.workers.acquire().await.expect("never closed");
        tokio::time::sleep(pool.service_time).await;
    }
    pool.in_flight.fetch_sub(1, Ordering::SeqCst);
    pool.served.fetch_add(1, Ordering::Relaxed);
    Ok(Response::new(Full::new(Bytes::from_static(b"done"))))
}

/// What one level of an [`open_loop`] run got back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Requests sent.
    pub sent: u64,
    /// 200 answers.
    pub ok: u64,
    /// 503 `overloaded` answers carrying `retry-after`.
    pub overloaded: u64,
    /// Anything else (other statuses, `overloaded` without `retry-after`, transport errors).
    pub other: u64,
}

impl Tally {
    /// Share of the sent requests refused `overloaded`.
    pub fn refused_share(&self) -> f64 {
        self.overloaded as f64 / self.sent.max(1) as f64
    }
}

/// Sends `rate` requests a second to `GET http://host/` through `addr` (h2c, a few
/// connections) for `duration`, without waiting for answers before sending the next;
/// request `i` carries `x-priority: level(i)` unless that is empty. Returns the outcomes
/// per level once every request is answered.
pub async fn open_loop(
    addr: SocketAddr,
    host: &str,
    rate: f64,
    duration: Duration,
    level: impl Fn(u64) -> &'static str,
) -> BTreeMap<&'static str, Tally> {
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(HttpConn::h2(addr).await.expect("connect for load"));
    }
    let tallies: Arc<Mutex<BTreeMap<&'static str, Tally>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    let total = (rate * duration.as_secs_f64()) as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        while sent < due {
            let lvl = level(sent);
            let mut conn = conns[sent as usize % conns.len()]
                .try_clone()
                .expect("an h2 connection clones");
            let host = host.to_string();
            let tallies = tallies.clone();
            tasks.spawn(async move {
                let headers: &[(&str, &str)] = if lvl.is_empty() {
                    &[]
                } else {
                    &[("x-priority", lvl)]
                };
                let res = conn.request(Method::GET, &host, "/", headers).await;
                let mut t = tallies.lock().expect("tallies");
                let t = t.entry(lvl).or_default();
                match res {
                    Ok(r) if r.status == 200 => t.ok += 1,
                    Ok(r)
                        if r.status == 503
                            && r.header("x-sluice-reason") == "overloaded"
                            && !r.header("retry-after").is_empty() =>
                    {
                        t.overloaded += 1
                    }
                    _ => t.other += 1,
                }
            });
            sent += 1;
        }
    }
    while tasks.join_next().await.is_some() {}
    let mut out = Arc::try_unwrap(tallies)
        .expect("every request answered")
        .into_inner()
        .expect("tallies");
    for t in out.values_mut() {
        t.sent = t.ok + t.overloaded + t.other;
    }
    out
}
