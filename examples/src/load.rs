//! Open-loop load for the log service: a fixed rate of ingests that do not wait for each
//! other's answers, in a mix of priorities, and what came back per priority.
//!
//! The demo's overload scene and the overload benchmark (the `log-load` binary) send it.
//! Requests go over a few HTTP/2 (prior knowledge) connections; priorities are interleaved
//! by smooth weighted round robin, so every stretch of the run carries the same mix. A
//! request's latency runs from the moment it was due, not from when it was sent, so a
//! sender that falls behind cannot hide queueing (no coordinated omission).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

/// What to send, where, how fast and for how long.
#[derive(Clone, Debug)]
pub struct Load {
    /// The listener to connect to (a sidecar, or the app itself).
    pub target: SocketAddr,
    /// `:authority` of every request (the host a policy is for).
    pub host: String,
    /// Path of every `POST`.
    pub path: String,
    /// Requests per second.
    pub rate: f64,
    /// How long to send; answers still due after it are awaited up to `timeout`.
    pub duration: Duration,
    /// Body of every request.
    pub body: Bytes,
    /// Extra headers on every request.
    pub headers: Vec<(String, String)>,
    /// Header carrying a request's priority level.
    pub priority_header: String,
    /// Priority levels with their weights; an empty level name sends no priority header.
    pub mix: Vec<(String, u32)>,
    /// A request unanswered this long after it was due counts as timed out.
    pub timeout: Duration,
    /// HTTP/2 connections the requests are spread over.
    pub connections: usize,
}

/// What the requests of one priority level got back.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Requests sent.
    pub sent: u64,
    /// 2xx answers in time.
    pub ok: u64,
    /// 503 answers (refused, by whichever proxy or the app).
    pub refused: u64,
    /// Of `refused`, those marked `x-sluice-reason: overloaded` with `retry-after`.
    pub overloaded: u64,
    /// Any other status.
    pub other: u64,
    /// No answer within the timeout.
    pub timed_out: u64,
    /// Connection or protocol errors.
    pub failed: u64,
    /// Latency of each 2xx answer, from the moment it was due; sorted once the run ends.
    pub ok_latency: Vec<Duration>,
}

impl Outcome {
    /// The `q` quantile (0.0..=1.0) of the 2xx latencies; `None` without any.
    pub fn ok_percentile(&self, q: f64) -> Option<Duration> {
        percentile(&self.ok_latency, q)
    }

    fn add(&mut self, other: &Outcome) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.refused += other.refused;
        self.overloaded += other.overloaded;
        self.other += other.other;
        self.timed_out += other.timed_out;
        self.failed += other.failed;
        self.ok_latency.extend_from_slice(&other.ok_latency);
    }
}

/// The `q` quantile (nearest rank) of sorted durations.
fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The outcomes of a run per priority level, and all levels together.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Per level name (empty: requests without the priority header).
    pub levels: BTreeMap<String, Outcome>,
}

impl Report {
    /// All levels together (latencies sorted).
    pub fn total(&self) -> Outcome {
        let mut all = Outcome::default();
        for o in self.levels.values() {
            all.add(o);
        }
        all.ok_latency.sort_unstable();
        all
    }
}

enum Answer {
    Ok(Duration),
    Refused { overloaded: bool },
    Other,
    TimedOut,
    Failed,
}

/// Sends `load` and returns what came back once every request is answered or timed out.
pub async fn run(load: &Load) -> io::Result<Report> {
    if load.mix.is_empty() || load.mix.iter().all(|(_, w)| *w == 0) {
        return Err(io::Error::other(
            "a load needs a level with a weight above 0",
        ));
    }
    if load.rate.is_nan() || load.rate <= 0.0 {
        return Err(io::Error::other("a load needs a rate above 0"));
    }
    let mut senders = Vec::new();
    for _ in 0..load.connections.max(1) {
        senders.push(connect(load.target).await?);
    }
    let uri = format!("http://{}{}", load.host, load.path);
    let total = (load.rate * load.duration.as_secs_f64()).round() as u64;
    let mut credit = vec![0i64; load.mix.len()];
    let weight_sum: i64 = load.mix.iter().map(|(_, w)| i64::from(*w)).sum();
    let mut sent_per_level = vec![0u64; load.mix.len()];
    let mut answers: Vec<Outcome> = vec![Outcome::default(); load.mix.len()];
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        let due_now = ((start.elapsed().as_secs_f64() * load.rate) as u64 + 1).min(total);
        while sent < due_now {
            // Smooth weighted round robin: the level furthest behind its share goes next.
            for (c, (_, w)) in credit.iter_mut().zip(&load.mix) {
                *c += i64::from(*w);
            }
            let level = (0..credit.len())
                .max_by_key(|&i| (credit[i], std::cmp::Reverse(i)))
                .unwrap_or(0);
            credit[level] -= weight_sum;
            sent_per_level[level] += 1;

            let due = start + Duration::from_secs_f64(sent as f64 / load.rate);
            let mut req = Request::builder().method(Method::POST).uri(&uri);
            for (k, v) in &load.headers {
                req = req.header(k, v);
            }
            let name = &load.mix[level].0;
            if !name.is_empty() {
                req = req.header(&load.priority_header, name);
            }
            let req = req
                .body(Full::new(load.body.clone()))
                .map_err(io::Error::other)?;
            // A server may close a connection (a GOAWAY, e.g. after many streams the
            // client gave up on): the next request goes over a new one, as a client's pool
            // would do.
            let slot = sent as usize % senders.len();
            if senders[slot].is_closed() {
                match connect(load.target).await {
                    Ok(fresh) => senders[slot] = fresh,
                    Err(e) => tracing::debug!(error = %e, "reconnecting for load"),
                }
            }
            let mut sender = senders[slot].clone();
            let deadline = due + load.timeout;
            tasks.spawn(async move {
                let answer = tokio::time::timeout_at(deadline, async move {
                    if sender.ready().await.is_err() {
                        return Answer::Failed;
                    }
                    let Ok(resp) = sender.send_request(req).await else {
                        return Answer::Failed;
                    };
                    let status = resp.status();
                    let overloaded = resp
                        .headers()
                        .get("x-sluice-reason")
                        .is_some_and(|v| v == "overloaded")
                        && resp.headers().contains_key(hyper::header::RETRY_AFTER);
                    if resp.into_body().collect().await.is_err() {
                        return Answer::Failed;
                    }
                    if status.is_success() {
                        Answer::Ok(due.elapsed())
                    } else if status == hyper::StatusCode::SERVICE_UNAVAILABLE {
                        Answer::Refused { overloaded }
                    } else {
                        Answer::Other
                    }
                })
                .await
                .unwrap_or(Answer::TimedOut);
                (level, answer)
            });
            sent += 1;
        }
        while let Some(done) = tasks.try_join_next() {
            record(&mut answers, done);
        }
    }
    while let Some(done) = tasks.join_next().await {
        record(&mut answers, done);
    }
    let mut report = Report::default();
    for (i, mut outcome) in answers.into_iter().enumerate() {
        outcome.sent = sent_per_level[i];
        outcome.ok_latency.sort_unstable();
        report
            .levels
            .entry(load.mix[i].0.clone())
            .or_default()
            .add(&outcome);
    }
    for o in report.levels.values_mut() {
        o.ok_latency.sort_unstable();
    }
    Ok(report)
}

/// One HTTP/2 (prior knowledge) connection, driven by a task of its own.
async fn connect(target: SocketAddr) -> io::Result<http2::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "a load connection ended");
        }
    });
    Ok(sender)
}

fn record(answers: &mut [Outcome], done: Result<(usize, Answer), tokio::task::JoinError>) {
    let Ok((level, answer)) = done else {
        return;
    };
    let o = &mut answers[level];
    match answer {
        Answer::Ok(latency) => {
            o.ok += 1;
            o.ok_latency.push(latency);
        }
        Answer::Refused { overloaded } => {
            o.refused += 1;
            o.overloaded += u64::from(overloaded);
        }
        Answer::Other => o.other += 1,
        Answer::TimedOut => o.timed_out += 1,
        Answer::Failed => o.failed += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_service::{self, LogServiceConfig};

    /// Real sockets: a log service with workers, load in a 20/50/30 mix well under its
    /// capacity. Every request is sent, answered 2xx, and the mix is exact.
    #[tokio::test]
    async fn sends_the_mix_at_the_rate_and_counts_every_answer() {
        let app = log_service::start(
            "127.0.0.1:0".parse().unwrap(),
            LogServiceConfig {
                workers: Some(4),
                work_per_kib: Duration::from_millis(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let load = Load {
            target: app.addr(),
            host: "log-service".into(),
            path: "/logs".into(),
            rate: 100.0,
            duration: Duration::from_millis(500),
            body: Bytes::from(vec![b'x'; 1024]),
            headers: Vec::new(),
            priority_header: "x-priority".into(),
            mix: vec![
                ("critical".into(), 20),
                ("default".into(), 50),
                ("sheddable".into(), 30),
            ],
            timeout: Duration::from_secs(5),
            connections: 2,
        };
        let report = run(&load).await.unwrap();
        let sent: Vec<u64> = ["critical", "default", "sheddable"]
            .iter()
            .map(|l| report.levels[*l].sent)
            .collect();
        assert_eq!(sent, vec![10, 25, 15]);
        let total = report.total();
        assert_eq!(total.ok, 50, "{total:?}");
        assert_eq!(total.ok_latency.len(), 50);
        assert!(total.ok_percentile(0.5).unwrap() >= Duration::from_millis(2));
        app.shutdown().await;
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&d, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&d, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&d, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
