//! A follower's road for the proxies' traffic reports to the lease holder.
//!
//! With several replicas, only the lease holder judges rollouts, but a proxy reports
//! on its own stream to whichever replica it is connected to. A follower therefore
//! relays each well-formed report, as received, to the holder's admin port
//! (`POST /rollouts/reports`, the report's protobuf bytes, the proxy's node id in
//! [`NODE_HEADER`], the admin token when there is one), whose address the holder
//! writes into the Lease. Push rather than pull: a report reaches the holder at the
//! moment it arrives, so a gross breach seen by a follower's proxies rolls back as
//! fast as one seen by the holder's own, and the holder keeps no per-follower state.
//! HTTP on the admin port rather than the policy stream: the stream's peer is a proxy
//! that acks versions, and a relay counted as a connected proxy would hold every
//! step's interval back.
//!
//! Bounded: reports wait in a queue of [`QUEUE`], sent one at a time; a full queue,
//! an unknown holder or a failed send drops the report and counts it in
//! `sluice_cp_reports_total{result="forward_dropped"}`. Proxies keep serving whatever
//! happens here.
//!
//! The holder also needs the follower's proxies' acks: a step's interval starts once
//! every connected proxy, wherever it is connected, acked the step's weights. Every
//! [`ACKS_EVERY`] the follower sends the holder the versions its connected proxies
//! acked and refused (`POST /rollouts/proxies`, JSON, the replica's name in
//! [`REPLICA_HEADER`]); the holder counts a replica's list while it is fresher than
//! [`REMOTE_FRESH`].
//!
//! Commands by hand (`POST /rollouts/<ns>/<policy>/<route>/<command>`) sent to a
//! follower go the same road ([`ReportForwarder::relay_command`]): the follower
//! passes the request to the holder, with its own admin token and the
//! [`RELAYED_HEADER`] (so a replica that does not hold the lease either answers 409
//! instead of passing it on), and returns the holder's answer.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::IntCounterVec;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use sluice_api::pb;
use tokio::sync::{mpsc, watch};

/// Reports waiting to be relayed, at most.
pub const QUEUE: usize = 256;

/// The header naming the proxy a relayed report came from.
pub const NODE_HEADER: &str = "x-sluice-node";

/// The header naming the replica a list of proxies comes from.
pub const REPLICA_HEADER: &str = "x-sluice-replica";

/// The header naming the replica that relayed a command by hand.
pub const RELAYED_HEADER: &str = "x-sluice-relayed-by";

/// How often a follower sends the holder its proxies' acks.
pub const ACKS_EVERY: Duration = Duration::from_secs(1);

/// How long the holder counts a follower's list of proxies after receiving it.
pub const REMOTE_FRESH: Duration = Duration::from_secs(5);

/// How long one relay may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a relayed command may take (the holder answers once it applied it).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A proxy connected to a follower, as the holder counts its acks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteProxy {
    /// Its node id.
    pub node_id: String,
    /// The last version it acked.
    pub acked_version: Option<String>,
    /// The last version it refused.
    pub nacked_version: Option<String>,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The follower's side: a bounded queue of reports for the holder.
#[derive(Debug)]
pub struct ReportForwarder {
    tx: mpsc::Sender<(String, pb::Report)>,
    rx: Mutex<Option<mpsc::Receiver<(String, pb::Report)>>>,
    counter: IntCounterVec,
    /// Where the holder is and how to reach it, once [`Self::run`] started.
    road: OnceLock<Road>,
}

/// The holder's admin URL as the Lease names it, and what a relay sends with it.
#[derive(Debug)]
struct Road {
    holder: watch::Receiver<Option<String>>,
    token: Option<Arc<str>>,
    replica: String,
}

/// Why a command could not be relayed to the holder.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelayError {
    /// No replica is known to hold the lease (or it names no admin URL).
    #[error(
        "no control-plane replica is known to hold the lease yet, and only the holder drives rollouts; try again in a few seconds"
    )]
    NoHolder,
    /// The holder did not answer.
    #[error("the lease holder at {url} did not answer: {why}")]
    Unreachable {
        /// Its admin URL.
        url: String,
        /// What failed.
        why: String,
    },
}

/// The holder's answer to a relayed command.
#[derive(Debug)]
pub struct Relayed {
    /// Its status.
    pub status: hyper::StatusCode,
    /// Its content type, if it named one.
    pub content_type: Option<hyper::header::HeaderValue>,
    /// Its body.
    pub body: Bytes,
}

#[cfg(test)]
impl ReportForwarder {
    /// The lease holder's admin URL as this follower knows it, once [`Self::run`] started.
    pub(crate) fn holder(&self) -> Option<watch::Receiver<Option<String>>> {
        self.road.get().map(|r| r.holder.clone())
    }
}

impl ReportForwarder {
    /// An empty queue counting into `counter{result}`.
    pub fn new(counter: IntCounterVec) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            counter,
            road: OnceLock::new(),
        }
    }

    /// Relays a command by hand (`path`, e.g. `/rollouts/ns/policy/route/pause`) to
    /// the holder and returns its answer. Only once `run` started (in a
    /// cluster); before, or while no holder is known, [`RelayError::NoHolder`].
    pub async fn relay_command(&self, path: &str) -> Result<Relayed, RelayError> {
        let road = self.road.get().ok_or(RelayError::NoHolder)?;
        let url = road.holder.borrow().clone().ok_or(RelayError::NoHolder)?;
        let unreachable = |why: String| RelayError::Unreachable {
            url: url.clone(),
            why,
        };
        let mut req = hyper::Request::post(format!("{}{path}", url.trim_end_matches('/')))
            .header(RELAYED_HEADER, &road.replica);
        if let Some(token) = &road.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::default())
            .map_err(|e| unreachable(e.to_string()))?;
        let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let answer = async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let content_type = resp.headers().get(hyper::header::CONTENT_TYPE).cloned();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(Relayed {
                status,
                content_type,
                body,
            })
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, answer).await {
            Ok(Ok(relayed)) => Ok(relayed),
            Ok(Err(why)) => Err(unreachable(why)),
            Err(_) => Err(unreachable(format!("no answer within {COMMAND_TIMEOUT:?}"))),
        }
    }

    /// Queues `report` from proxy `node` for the holder; drops and counts it when the
    /// queue is full. Never waits.
    pub fn forward(&self, node: &str, report: pb::Report) {
        if self.tx.try_send((node.to_string(), report)).is_err() {
            self.counter.with_label_values(&["forward_dropped"]).inc();
        }
    }

    /// Relays queued reports, and every [`ACKS_EVERY`] the proxies `acks` lists, to
    /// the holder named by `holder`, as replica `replica`, until `shutdown`; runs
    /// once (a second call returns at once).
    pub(crate) async fn run(
        &self,
        holder: watch::Receiver<Option<String>>,
        token: Option<Arc<str>>,
        replica: String,
        acks: impl Fn() -> Vec<RemoteProxy>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let _ = self.road.set(Road {
            holder: holder.clone(),
            token: token.clone(),
            replica: replica.clone(),
        });
        let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let mut every = tokio::time::interval(ACKS_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (node, report) = tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
                _ = every.tick() => {
                    let url = holder.borrow().clone();
                    if let Some(url) = url {
                        let body = serde_json::to_vec(&acks()).unwrap_or_default();
                        let send = Post {
                            path: "/rollouts/proxies",
                            content_type: "application/json",
                            header: (REPLICA_HEADER, &replica),
                            token: token.as_deref(),
                        }
                        .send(&client, &url, body);
                        if let Ok(Err(why)) = tokio::time::timeout(SEND_TIMEOUT, send).await {
                            tracing::debug!(%url, %why, "cannot send the proxies' acks to the lease holder");
                        }
                    }
                    continue;
                }
                _ = shutdown.changed() => return,
            };
            let url = holder.borrow().clone();
            let sent = match url {
                Some(url) => {
                    let send = Post {
                        path: "/rollouts/reports",
                        content_type: "application/x-protobuf",
                        header: (NODE_HEADER, &node),
                        token: token.as_deref(),
                    }
                    .send(&client, &url, report.encode_to_vec());
                    match tokio::time::timeout(SEND_TIMEOUT, send).await {
                        Ok(Ok(())) => true,
                        Ok(Err(why)) => {
                            tracing::debug!(%url, %why, "cannot relay a traffic report to the lease holder");
                            false
                        }
                        Err(_) => false,
                    }
                }
                None => false,
            };
            let result = if sent { "forwarded" } else { "forward_dropped" };
            self.counter.with_label_values(&[result]).inc();
        }
    }
}

/// One POST to the holder's admin port.
struct Post<'a> {
    path: &'a str,
    content_type: &'a str,
    header: (&'a str, &'a str),
    token: Option<&'a str>,
}

impl Post<'_> {
    async fn send(self, client: &HttpClient, base: &str, body: Vec<u8>) -> Result<(), String> {
        let mut req = hyper::Request::post(format!("{}{}", base.trim_end_matches('/'), self.path))
            .header(hyper::header::CONTENT_TYPE, self.content_type)
            .header(self.header.0, self.header.1);
        if let Some(token) = self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    }
}
