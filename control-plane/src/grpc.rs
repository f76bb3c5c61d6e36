//! The `StreamPolicies` service: one task per proxy stream.
//!
//! Like tonic-health's watch, every stream task holds a receiver of the one
//! `watch` channel carrying the published snapshot. The task sends a version
//! only if it differs from what the proxy will have once everything already
//! sent is processed (its `Hello` version, then whatever was last sent), so the
//! proxy never receives a version it already has.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_api::pb;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, WatchStream};
use tonic::{Request, Response, Status, Streaming};

use std::net::SocketAddr;

use tokio_rustls::TlsAcceptor;

use crate::identity::IdentityService;
use crate::proxies::StreamGuard;
use crate::push::{Outgoing, PolicyServer};
use crate::serving_cert::ServingCert;
use crate::state::Shared;
use crate::{Error, IdentityConfig};

/// How long a new stream may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The tonic service behind `sluice.v1.PolicyDiscovery`.
#[derive(Debug, Clone)]
pub(crate) struct PolicyService {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
}

/// What the gRPC port adds when the CA is on: TLS and the Identity service.
pub(crate) struct GrpcTls {
    cert: Arc<ServingCert>,
    identity: IdentityService,
}

/// Issues the gRPC serving certificate: DNS and IP SANs from `id.server_names`,
/// plus the bound address when it is a specific IP. It is renewed while served.
pub(crate) fn tls(
    id: &IdentityConfig,
    bound: SocketAddr,
    renewals: prometheus::IntCounter,
) -> Result<GrpcTls, Error> {
    let mut names = id.server_names.clone();
    let ip = bound.ip().to_string();
    if !bound.ip().is_unspecified() && !names.contains(&ip) {
        names.push(ip);
    }
    Ok(GrpcTls {
        cert: ServingCert::issue(
            "gRPC",
            id.ca.clone(),
            names,
            id.server_cert_lifetime,
            renewals,
        )?,
        identity: IdentityService::new(id.ca.clone(), id.verifier.clone()),
    })
}

/// Serves the policy stream (and the Identity service when the CA is on) until shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<GrpcTls>,
    mut shutdown: watch::Receiver<bool>,
) {
    let svc = PolicyService {
        shared,
        shutdown: shutdown.clone(),
    };
    let mut builder = tonic::transport::Server::builder()
        // Notices proxies that vanished without closing their connection.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    let (cert, identity) = match tls {
        Some(t) => (Some(t.cert), Some(t.identity.into_server())),
        None => (None, None),
    };
    let router = builder
        .add_service(PolicyServer::new(svc))
        .add_optional_service(identity);
    let stop = shutdown.clone();
    let signal = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let res = match cert {
        Some(cert) => {
            let config = match cert.server_config() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "gRPC TLS configuration refused");
                    return;
                }
            };
            tokio::spawn(cert.keep_renewed(stop.clone()));
            let incoming =
                crate::serve::tls_incoming(listener, "gRPC", TlsAcceptor::from(config), stop);
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
        None => {
            let incoming = TcpListenerStream::new(listener).map(|conn| {
                conn.inspect(|s| {
                    // Snapshots are small writes that must leave at once.
                    let _ = s.set_nodelay(true);
                })
            });
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
    };
    if let Err(e) = res {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

impl tonic::server::StreamingService<pb::ProxyMessage> for PolicyService {
    type Response = Outgoing;
    type ResponseStream = ReceiverStream<Result<Outgoing, Status>>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<pb::ProxyMessage>>) -> Self::Future {
        Box::pin(self.clone().stream_policies(request))
    }
}

impl PolicyService {
    /// `StreamPolicies`: waits for the proxy's `Hello`, then hands the stream to its task.
    async fn stream_policies(
        self,
        request: Request<Streaming<pb::ProxyMessage>>,
    ) -> Result<Response<ReceiverStream<Result<Outgoing, Status>>>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??;
        let hello = match first.and_then(|m| m.message) {
            Some(pb::proxy_message::Message::Hello(h)) if !h.node_id.is_empty() => h,
            Some(pb::proxy_message::Message::Hello(_)) => {
                return Err(Status::invalid_argument("Hello.node_id is empty"));
            }
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        tracing::info!(node_id = %hello.node_id, service = %hello.service, has = %hello.last_applied_version, "proxy connected");
        let accepted = crate::views::accepted(&hello);
        if !sluice_config::SCHEMA_VERSIONS
            .iter()
            .any(|v| accepted.contains(v))
        {
            // Sent anyway: the proxy's own validation decides, and its NACK
            // shows up in /proxies with the reason.
            tracing::warn!(node_id = %hello.node_id, proxy = ?accepted, ours = ?sluice_config::SCHEMA_VERSIONS, "proxy accepts none of our policy schema versions");
        }
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(stream_task(
            self.shared.clone(),
            hello,
            inbound,
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A version sent on this stream and not yet answered.
struct InFlight {
    version: String,
    /// Push latency is measured from here.
    since: Instant,
}

async fn stream_task(
    shared: Arc<Shared>,
    hello: pb::Hello,
    mut inbound: Streaming<pb::ProxyMessage>,
    tx: mpsc::Sender<Result<Outgoing, Status>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let node = hello.node_id.clone();
    let accepted = crate::views::accepted(&hello);
    let record = shared.proxies.connect(&hello);
    shared.metrics.streams_opened.inc();
    let connected_at = Instant::now();
    let mut snapshots = shared.snapshots.subscribe();
    // Only a new publication can call for a send: the proxy's answers confirm or
    // refuse what was already sent.
    let mut next = snapshots.borrow_and_update().clone();
    // Waits that live across the loop's turns: a proxy's every answer turns the loop,
    // and a wait made afresh each turn joins and leaves the channel's waiter list,
    // under its lock, beside a thousand other streams' doing the same.
    let mut published = WatchStream::from_changes(snapshots);
    let stopped = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopped);
    let mut proxy_has =
        (!hello.last_applied_version.is_empty()).then_some(hello.last_applied_version);
    let mut in_flight: Option<InFlight> = None;
    let mut refused: Option<String> = None;
    // Only a proxy that says it takes them is sent the per-route proxy counts.
    let mut traffic = hello
        .accepts_route_traffic
        .then(|| shared.reports.watch_traffic());
    if let Some(t) = &mut traffic {
        // The first table goes out once there is one.
        if t.borrow().routes.is_empty() {
            t.mark_unchanged();
        } else {
            t.mark_changed();
        }
    }
    loop {
        let current = next.take();
        let view = current
            .as_ref()
            .and_then(|p| crate::views::view_for(&p.views, &accepted));
        if let (Some(published), Some(view)) = (&current, view) {
            let version = &view.snapshot.version;
            let expected = in_flight
                .as_ref()
                .map(|f| &f.version)
                .or(proxy_has.as_ref());
            // A refused version is not offered again on this stream; the next
            // change (or a new stream) is.
            if expected != Some(version) && refused.as_ref() != Some(version) {
                let snapshot = Outgoing::Snapshot {
                    schema_version: shared
                        .stamp_schema_version
                        .unwrap_or_else(|| crate::views::label_for(view, &accepted)),
                    encoded: view.encoded.clone(),
                };
                let send = tx.send(Ok(snapshot));
                let sent = tokio::select! {
                    r = send => r.is_ok(),
                    () = &mut stopped => false,
                };
                if !sent {
                    break;
                }
                shared.metrics.pushes.inc();
                record.sent(version);
                for h in &view.held_back {
                    tracing::warn!(node_id = %node, policy = %h.policy, needs = h.needs, state = h.state, accepted = ?accepted, "this proxy's schema cannot express a policy; it gets the last form it can take");
                }
                tracing::debug!(node_id = %node, %version, "snapshot sent");
                in_flight = Some(InFlight {
                    version: version.clone(),
                    since: published.changed_at.max(connected_at),
                });
            }
        }
        tokio::select! {
            changed = published.next() => match changed {
                Some(p) => next = p,
                None => break,
            },
            Some(table) = next_traffic(&mut traffic) => {
                let msg = pb::Snapshot {
                    route_traffic: Some((*table).clone()),
                    ..Default::default()
                };
                // Never waits behind a slow proxy: the next change carries the whole table.
                if let Err(mpsc::error::TrySendError::Closed(_)) =
                    tx.try_send(Ok(Outgoing::Message(msg)))
                {
                    break;
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(pb::ProxyMessage { message: Some(m) })) => {
                    on_answer(&shared, &record, &node, m, &mut proxy_has, &mut in_flight, &mut refused);
                }
                Ok(Some(pb::ProxyMessage { message: None })) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(node_id = %node, error = %e, "proxy stream failed");
                    break;
                }
            },
            () = &mut stopped => break,
        }
    }
    tracing::info!(node_id = %node, "proxy disconnected");
}

/// The next per-route proxy count table, or never when this proxy takes none.
async fn next_traffic(
    traffic: &mut Option<watch::Receiver<Arc<pb::RouteTraffic>>>,
) -> Option<Arc<pb::RouteTraffic>> {
    let Some(rx) = traffic else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        return std::future::pending().await;
    }
    Some(rx.borrow_and_update().clone())
}

fn on_answer(
    shared: &Shared,
    record: &StreamGuard<'_>,
    node: &str,
    msg: pb::proxy_message::Message,
    proxy_has: &mut Option<String>,
    in_flight: &mut Option<InFlight>,
    refused: &mut Option<String>,
) {
    use pb::proxy_message::Message;
    match msg {
        Message::Ack(ack) => {
            shared.metrics.acks.with_label_values(&["ack"]).inc();
            record.acked(&ack.version);
            if let Some(f) = in_flight.take_if(|f| f.version == ack.version) {
                shared
                    .metrics
                    .push_latency
                    .observe(f.since.elapsed().as_secs_f64());
            }
            tracing::debug!(node_id = %node, version = %ack.version, "ACK");
            *proxy_has = Some(ack.version);
        }
        Message::Nack(nack) => {
            shared.metrics.acks.with_label_values(&["nack"]).inc();
            record.nacked(&nack.version, &nack.error);
            in_flight.take_if(|f| f.version == nack.version);
            *refused = Some(nack.version.clone());
            tracing::warn!(node_id = %node, version = %nack.version, error = %nack.error, "proxy refused policy snapshot");
        }
        Message::Hello(_) => {
            tracing::debug!(node_id = %node, "ignoring a second Hello");
        }
        Message::Report(report) => match shared.reports.ingest(node, &report, Instant::now()) {
            Ok(()) => shared.on_report(node, report),
            Err(e) => {
                tracing::debug!(node_id = %node, error = %e, "malformed traffic report dropped")
            }
        },
    }
}
