//! A follower's road for the proxies' traffic reports to the lease holder.
//!
//! With several replicas, only the lease holder judges rollouts, but a proxy reports
//! on its own stream to whichever replica it is connected to. A follower therefore
//! relays each well-formed report, as received, to the holder's admin port
//! (`POST /rollouts/reports`, the report's protobuf bytes, the proxy's node id in
//! [`NODE_HEADER`] and its stream in [`STREAM_HEADER`], the admin token when there
//! is one), whose address the holder
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
//! [`REMOTE_FRESH`]. The list also holds the streams that closed within
//! [`crate::proxies::RECENTLY_CLOSED`], with when they opened and closed: a proxy
//! that went before acking a step is named left out by the holder as by the
//! replica it was connected to, however soon it went. The holder answers with its
//! per-route proxy counts, which take in every replica's proxies: the follower sends
//! those to its own proxies (the report book's `set_fleet`), so
//! each proxy divides a fleet limit by the fleet's size, not its replica's share of
//! it. While no holder is known (or an older one answers without them), a follower
//! counts its own proxies only.
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

/// The content type of a report, and of the holder's per-route proxy counts.
pub const PROTOBUF: &str = "application/x-protobuf";

/// Reports waiting to be relayed, at most.
pub const QUEUE: usize = 256;

/// The header naming the proxy a relayed report came from.
pub const NODE_HEADER: &str = "x-sluice-node";

/// The header naming the stream a relayed report came on: the relaying replica's
/// name and its number for the stream, `<replica>/<stream>`, so two proxies sharing
/// a node id count as two.
pub const STREAM_HEADER: &str = "x-sluice-stream";

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

/// A proxy stream open to a follower, or closed there within
/// [`crate::proxies::RECENTLY_CLOSED`], as the holder counts its acks. Fields after
/// the first three are absent from older followers' lists: such a row is an open
/// stream numbered 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteProxy {
    /// Its node id.
    pub node_id: String,
    /// The last version it acked.
    pub acked_version: Option<String>,
    /// The last version it refused.
    pub nacked_version: Option<String>,
    /// The follower's number for the stream (streams sharing a node id differ by it).
    #[serde(default)]
    pub stream: u64,
    /// The last version sent to it.
    #[serde(default)]
    pub version_sent: Option<String>,
    /// Its stream is open.
    #[serde(default = "open")]
    pub connected: bool,
    /// When its stream opened (ms since the Unix epoch).
    #[serde(default)]
    pub connected_at_unix_ms: u64,
    /// When its stream closed, once it has.
    #[serde(default)]
    pub disconnected_at_unix_ms: Option<u64>,
}

fn open() -> bool {
    true
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The follower's side: a bounded queue of reports for the holder.
#[derive(Debug)]
pub struct ReportForwarder {
    tx: mpsc::Sender<(String, u64, pb::Report)>,
    rx: Mutex<Option<mpsc::Receiver<(String, u64, pb::Report)>>>,
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
        match tokio::time::timeout(COMMAND_TIMEOUT, call(&client, req)).await {
            Ok(Ok(relayed)) => Ok(relayed),
            Ok(Err(why)) => Err(unreachable(why)),
            Err(_) => Err(unreachable(format!("no answer within {COMMAND_TIMEOUT:?}"))),
        }
    }

    /// Queues `report` from proxy `node`, received on this replica's stream number
    /// `stream`, for the holder; drops and counts it when the queue is full. Never
    /// waits.
    pub fn forward(&self, node: &str, stream: u64, report: pb::Report) {
        if self
            .tx
            .try_send((node.to_string(), stream, report))
            .is_err()
        {
            self.counter.with_label_values(&["forward_dropped"]).inc();
        }
    }

    /// Relays queued reports, and every [`ACKS_EVERY`] the proxies `acks` lists, to
    /// the holder named by `holder`, as replica `replica`, until `shutdown`; hands
    /// `fleet` the holder's per-route proxy counts each time it answers a list, and
    /// `None` while no holder is known. Runs once (a second call returns at once).
    pub(crate) async fn run(
        &self,
        holder: watch::Receiver<Option<String>>,
        token: Option<Arc<str>>,
        replica: String,
        acks: impl Fn() -> Vec<RemoteProxy>,
        fleet: impl Fn(Option<pb::RouteTraffic>),
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
            let (node, stream, report) = tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
                _ = every.tick() => {
                    let url = holder.borrow().clone();
                    let Some(url) = url else {
                        fleet(None);
                        continue;
                    };
                    let body = serde_json::to_vec(&acks()).unwrap_or_default();
                    let send = Post {
                        path: "/rollouts/proxies",
                        content_type: "application/json",
                        header: (REPLICA_HEADER, &replica),
                        stream: None,
                        token: token.as_deref(),
                    }
                    .send(&client, &url, body);
                    // A failed send keeps the last counts until they are stale.
                    match tokio::time::timeout(SEND_TIMEOUT, send).await {
                        Ok(Ok(answer)) => fleet(answer.route_traffic()),
                        Ok(Err(why)) => {
                            tracing::debug!(%url, %why, "cannot send the proxies' acks to the lease holder");
                        }
                        Err(_) => {}
                    }
                    continue;
                }
                _ = shutdown.changed() => return,
            };
            let url = holder.borrow().clone();
            let sent = match url {
                Some(url) => {
                    let conn = format!("{replica}/{stream}");
                    let send = Post {
                        path: "/rollouts/reports",
                        content_type: PROTOBUF,
                        header: (NODE_HEADER, &node),
                        stream: Some(&conn),
                        token: token.as_deref(),
                    }
                    .send(&client, &url, report.encode_to_vec());
                    match tokio::time::timeout(SEND_TIMEOUT, send).await {
                        Ok(Ok(_)) => true,
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
    /// The [`STREAM_HEADER`], for a report.
    stream: Option<&'a str>,
    token: Option<&'a str>,
}

/// The holder's answer to a POST it took.
struct Answer {
    content_type: Option<hyper::header::HeaderValue>,
    body: Bytes,
}

impl Answer {
    /// The per-route proxy counts it carries; `None` from a holder that sends none
    /// (an older build) or sent something else.
    fn route_traffic(&self) -> Option<pb::RouteTraffic> {
        let protobuf = self
            .content_type
            .as_ref()
            .is_some_and(|t| t.as_bytes() == PROTOBUF.as_bytes());
        if !protobuf {
            return None;
        }
        pb::RouteTraffic::decode(self.body.clone())
            .inspect_err(
                |e| tracing::debug!(error = %e, "the lease holder's proxy counts do not decode"),
            )
            .ok()
    }
}

impl Post<'_> {
    async fn send(self, client: &HttpClient, base: &str, body: Vec<u8>) -> Result<Answer, String> {
        let mut req = hyper::Request::post(format!("{}{}", base.trim_end_matches('/'), self.path))
            .header(hyper::header::CONTENT_TYPE, self.content_type)
            .header(self.header.0, self.header.1);
        if let Some(stream) = self.stream {
            req = req.header(STREAM_HEADER, stream);
        }
        if let Some(token) = self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let answer = call(client, req).await?;
        if answer.status.is_success() {
            Ok(Answer {
                content_type: answer.content_type,
                body: answer.body,
            })
        } else {
            Err(format!("answered {}", answer.status))
        }
    }
}

/// Sends `req` and reads its whole answer.
async fn call(client: &HttpClient, req: hyper::Request<Full<Bytes>>) -> Result<Relayed, String> {
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let content_type = resp.headers().get(hyper::header::CONTENT_TYPE).cloned();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Relayed {
        status,
        content_type,
        body,
    })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// What the holder received: path, content type, the named header, authorization.
    type Seen = (String, String, Option<String>, Option<String>, Bytes);

    /// A holder's admin port on 127.0.0.1 answering every request with `status`, and
    /// the requests it received.
    async fn holder(status: u16) -> (String, mpsc::UnboundedReceiver<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let url = format!("http://{}/", listener.local_addr().expect("an address"));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let tx = tx.clone();
                            async move {
                                let header = |name: &str| {
                                    req.headers()
                                        .get(name)
                                        .and_then(|v| v.to_str().ok())
                                        .map(str::to_string)
                                };
                                // A report's node id with its stream, or a list's replica.
                                let named = header(NODE_HEADER)
                                    .map(|n| {
                                        format!("{n} {}", header(STREAM_HEADER).unwrap_or_default())
                                    })
                                    .or_else(|| header(REPLICA_HEADER));
                                let seen = (
                                    req.uri().path().to_string(),
                                    header("content-type").unwrap_or_default(),
                                    named,
                                    header("authorization"),
                                );
                                // A holder that takes a list answers with its counts.
                                let counts = status == 200 && seen.0 == "/rollouts/proxies";
                                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                                let _ = tx.send((
                                    seen.0,
                                    seen.1,
                                    seen.2,
                                    seen.3,
                                    body.unwrap_or_default(),
                                ));
                                let mut resp = if counts {
                                    hyper::Response::builder()
                                        .header(hyper::header::CONTENT_TYPE, PROTOBUF)
                                        .body(Full::new(Bytes::from(fleet().encode_to_vec())))
                                        .expect("valid response")
                                } else {
                                    hyper::Response::new(Full::<Bytes>::default())
                                };
                                *resp.status_mut() =
                                    hyper::StatusCode::from_u16(status).expect("a status");
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (url, rx)
    }

    fn counter() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("reports", "test"), &["result"]).expect("valid")
    }

    /// The per-route proxy counts a test holder answers a list with.
    fn fleet() -> pb::RouteTraffic {
        pb::RouteTraffic {
            routes: vec![pb::RouteProxies {
                namespace: "shop".into(),
                policy: "log".into(),
                route: "ingest".into(),
                proxies: 3,
            }],
        }
    }

    fn report(n: u64) -> pb::Report {
        pb::Report {
            seq: n,
            ..pb::Report::default()
        }
    }

    /// Waits (at most 10 s, so a broken relay fails rather than hangs) for the next
    /// request the holder receives with `path`.
    async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>, path: &str) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let seen = rx.recv().await.expect("the holder runs");
                if seen.0 == path {
                    return seen;
                }
            }
        })
        .await
        .expect("the holder received it")
    }

    /// A follower relays each report as received, with its proxy's node id and stream, and the
    /// token, and its connected proxies' acks with its replica name, and takes the
    /// holder's per-route proxy counts from its answer; a report the holder refuses
    /// is counted as dropped; with no holder known, it has no counts from one.
    #[tokio::test]
    async fn reports_and_acks_reach_the_holder() {
        let (url, mut seen) = holder(200).await;
        let (counts_tx, mut counts) = watch::channel(None);
        let from_holder = move |t| {
            counts_tx.send_replace(Some(t));
        };
        let counter = counter();
        let fwd = Arc::new(ReportForwarder::new(counter.clone()));
        let (holder_tx, holder_rx) = watch::channel(Some(url));
        let (stop_tx, stop_rx) = watch::channel(false);
        let acks = || {
            vec![RemoteProxy {
                node_id: "p1".into(),
                acked_version: Some("v7".into()),
                stream: 3,
                ..Default::default()
            }]
        };
        let run = tokio::spawn({
            let fwd = fwd.clone();
            async move {
                fwd.run(
                    holder_rx,
                    Some("tok".into()),
                    "cp-b".into(),
                    acks,
                    from_holder,
                    stop_rx,
                )
                .await;
            }
        });
        let (_, ctype, replica, auth, body) = next(&mut seen, "/rollouts/proxies").await;
        assert_eq!(ctype, "application/json");
        assert_eq!(replica.as_deref(), Some("cp-b"));
        assert_eq!(auth.as_deref(), Some("Bearer tok"));
        let listed: Vec<RemoteProxy> = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(listed, acks());
        tokio::time::timeout(Duration::from_secs(10), counts.wait_for(Option::is_some))
            .await
            .expect("the holder's counts were taken")
            .unwrap();
        assert_eq!(*counts.borrow_and_update(), Some(Some(fleet())));

        fwd.forward("node-1", 7, report(42));
        let (_, ctype, node, auth, body) = next(&mut seen, "/rollouts/reports").await;
        assert_eq!(ctype, "application/x-protobuf");
        assert_eq!(
            node.as_deref(),
            Some("node-1 cp-b/7"),
            "its node id, and its stream on this replica"
        );
        assert_eq!(auth.as_deref(), Some("Bearer tok"));
        assert_eq!(pb::Report::decode(body).expect("protobuf"), report(42));
        let counted = |result: &str| counter.with_label_values(&[result]).get();
        tokio::time::timeout(Duration::from_secs(10), async {
            while counted("forwarded") < 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("counted");

        // A holder that refuses (here: every request) drops the report.
        let (refusing, mut refused) = holder(401).await;
        holder_tx.send_replace(Some(refusing));
        fwd.forward("node-1", 7, report(43));
        next(&mut refused, "/rollouts/reports").await;
        // No holder known: dropped without a request.
        holder_tx.send_replace(None);
        fwd.forward("node-1", 7, report(44));
        tokio::time::timeout(Duration::from_secs(10), async {
            while counted("forward_dropped") < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("both dropped");
        assert_eq!(counted("forwarded"), 1);
        tokio::time::timeout(
            Duration::from_secs(10),
            counts.wait_for(|c| *c == Some(None)),
        )
        .await
        .expect("no holder, no counts from one")
        .unwrap();

        // It runs once; it ends at shutdown.
        let (_, no_holder) = watch::channel(None);
        let (_, no_stop) = watch::channel(false);
        fwd.run(no_holder, None, "again".into(), Vec::new, |_| {}, no_stop)
            .await;
        stop_tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("ends at shutdown")
            .expect("does not panic");
    }

    /// Reports beyond the queue's room are dropped and counted at once; forwarding
    /// never waits.
    #[test]
    fn a_full_queue_drops_reports() {
        let counter = counter();
        let fwd = ReportForwarder::new(counter.clone());
        for i in 0..QUEUE as u64 + 3 {
            fwd.forward("node-1", 7, report(i));
        }
        assert_eq!(counter.with_label_values(&["forward_dropped"]).get(), 3);
    }
}
