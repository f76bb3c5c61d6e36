//! The `StreamPolicies` service: each proxy stream's loop is its response body.
//!
//! Like tonic-health's watch, every stream holds a receiver of the one `watch`
//! channel carrying the published snapshot. The stream sends a version only if it
//! differs from what the proxy will have once everything already sent is processed
//! (its `Hello` version, then whatever was last sent), so the proxy never receives a
//! version it already has.
//!
//! The loop runs inside the response stream that hyper's per-stream task polls,
//! not in a task of its own handing messages over a channel: at a thousand proxies
//! every publication would otherwise wake two tasks per proxy instead of one.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_api::pb;
use tokio::net::TcpListener;

use prometheus::IntCounter;
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
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
    type ResponseStream = PolicyStream;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<pb::ProxyMessage>>) -> Self::Future {
        Box::pin(self.clone().stream_policies(request))
    }
}

impl PolicyService {
    /// `StreamPolicies`: waits for the proxy's `Hello`, then answers with its stream.
    async fn stream_policies(
        self,
        request: Request<Streaming<pb::ProxyMessage>>,
    ) -> Result<Response<PolicyStream>, Status> {
        // Tells apart proxies that say the same node id.
        let peer = request.remote_addr();
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
        tracing::info!(node_id = %hello.node_id, peer = ?peer, service = %hello.service, has = %hello.last_applied_version, "proxy connected");
        let accepted = crate::views::accepted(&hello);
        if !sluice_config::SCHEMA_VERSIONS
            .iter()
            .any(|v| accepted.contains(v))
        {
            // Sent anyway: the proxy's own validation decides, and its NACK
            // shows up in /proxies with the reason.
            tracing::warn!(node_id = %hello.node_id, proxy = ?accepted, ours = ?sluice_config::SCHEMA_VERSIONS, "proxy accepts none of our policy schema versions");
        }
        Ok(Response::new(Box::pin(policy_stream(
            self.shared.clone(),
            hello,
            peer,
            inbound,
            self.shutdown.clone(),
        ))))
    }
}

/// A proxy's policy stream as tonic encodes it.
pub(crate) type PolicyStream = Pin<Box<dyn Stream<Item = Result<Outgoing, Status>> + Send>>;

/// What wakes a stream's loop.
enum Event {
    /// A new publication, or `None` once the publisher is gone.
    Published(Option<Option<Arc<crate::state::Published>>>),
    /// A new per-route proxy count table.
    Traffic(Arc<pb::RouteTraffic>),
    /// The proxy said something, ended its stream, or its stream failed.
    Answer(Result<Option<pb::ProxyMessage>, Status>),
}

/// A version sent on this stream and not yet answered.
struct InFlight {
    version: String,
    /// Push latency is measured from here.
    since: Instant,
}

/// The messages sent to the proxy that said `hello`, answering what it sends on
/// `inbound` from `peer`, until it goes, the publisher stops, or the control plane
/// shuts down.
/// Dropped with the stream (the connection gone), it marks the proxy's stream closed.
fn policy_stream(
    shared: Arc<Shared>,
    hello: pb::Hello,
    peer: Option<SocketAddr>,
    mut inbound: Streaming<pb::ProxyMessage>,
    mut shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Result<Outgoing, Status>> + Send {
    async_stream::stream! {
        let node = hello.node_id.clone();
        let accepted = crate::views::accepted(&hello);
        let record = shared.proxies.connect(&hello, peer);
        let reporting = Reporting {
            shared: &shared,
            node: node.clone(),
            stream: record.stream(),
            conn: format!("#{}", record.stream()),
        };
        shared.metrics.streams_opened.inc();
        let acks = shared.metrics.acks.with_label_values(&["ack"]);
        let nacks = shared.metrics.acks.with_label_values(&["nack"]);
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
        let mut answers = Answers {
            proxy_has: (!hello.last_applied_version.is_empty())
                .then_some(hello.last_applied_version),
            in_flight: None,
            refused: None,
        };
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
                let expected = answers
                    .in_flight
                    .as_ref()
                    .map(|f| &f.version)
                    .or(answers.proxy_has.as_ref());
                // A refused version is not offered again on this stream; the next
                // change (or a new stream) is.
                if expected != Some(version) && answers.refused.as_ref() != Some(version) {
                    yield Ok(Outgoing::Snapshot {
                        schema_version: shared
                            .stamp_schema_version
                            .unwrap_or_else(|| crate::views::label_for(view, &accepted)),
                        encoded: view.encoded.clone(),
                    });
                    shared.metrics.pushes.inc();
                    record.sent(version);
                    for h in &view.held_back {
                        tracing::warn!(node_id = %node, policy = %h.policy, needs = h.needs, state = h.state, accepted = ?accepted, "this proxy's schema cannot express a policy; it gets the last form it can take");
                    }
                    tracing::debug!(node_id = %node, %version, "snapshot sent");
                    answers.in_flight = Some(InFlight {
                        version: version.clone(),
                        since: published.changed_at.max(connected_at),
                    });
                }
            }
            let event = tokio::select! {
                changed = published.next() => Event::Published(changed),
                Some(table) = next_traffic(&mut traffic) => Event::Traffic(table),
                msg = inbound.message() => Event::Answer(msg),
                () = &mut stopped => break,
            };
            match event {
                Event::Published(Some(p)) => next = p,
                Event::Published(None) => break,
                // The next change carries the whole table: a proxy too slow to take
                // this one holds its own stream only.
                Event::Traffic(table) => yield Ok(Outgoing::Message(pb::Snapshot {
                    route_traffic: Some((*table).clone()),
                    ..Default::default()
                })),
                Event::Answer(Ok(Some(pb::ProxyMessage { message: Some(m) }))) => {
                    record.seen();
                    answers.on(&reporting, &record, &acks, &nacks, m);
                }
                // A message of a kind this build does not know is still one from it.
                Event::Answer(Ok(Some(pb::ProxyMessage { message: None }))) => record.seen(),
                Event::Answer(Ok(None)) => break,
                Event::Answer(Err(e)) => {
                    tracing::debug!(node_id = %node, error = %e, "proxy stream failed");
                    break;
                }
            }
        }
        // `record` goes with the stream, however it ends, and says so in the log.
    }
}

/// Who a stream's traffic reports come from; when the stream goes (however it ends),
/// tells the report book, so a proxy that reconnects is not counted twice.
struct Reporting<'a> {
    shared: &'a Shared,
    node: String,
    /// This replica's number for the stream.
    stream: u64,
    /// The stream's name in the report book.
    conn: String,
}

impl Drop for Reporting<'_> {
    fn drop(&mut self) {
        let now = self.shared.clock.instant();
        self.shared.reports.closed(&self.node, &self.conn, now);
    }
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

/// What a stream knows of its proxy's answers.
struct Answers {
    /// The version the proxy has: its `Hello`'s, then the last it acknowledged.
    proxy_has: Option<String>,
    /// The version sent and not yet answered.
    in_flight: Option<InFlight>,
    /// The last version it refused; not offered again on this stream.
    refused: Option<String>,
}

impl Answers {
    /// Takes in one message from the proxy; `acks` and `nacks` are this stream's
    /// handles on the answer counter, looked up once instead of per answer.
    fn on(
        &mut self,
        from: &Reporting<'_>,
        record: &StreamGuard<'_>,
        acks: &IntCounter,
        nacks: &IntCounter,
        msg: pb::proxy_message::Message,
    ) {
        use pb::proxy_message::Message;
        let (shared, node) = (from.shared, from.node.as_str());
        match msg {
            Message::Ack(ack) => {
                acks.inc();
                record.acked(&ack.version);
                if let Some(f) = self.in_flight.take_if(|f| f.version == ack.version) {
                    shared
                        .metrics
                        .push_latency
                        .observe(f.since.elapsed().as_secs_f64());
                }
                tracing::debug!(node_id = %node, version = %ack.version, "ACK");
                self.proxy_has = Some(ack.version);
            }
            Message::Nack(nack) => {
                nacks.inc();
                record.nacked(&nack.version, &nack.error);
                self.in_flight.take_if(|f| f.version == nack.version);
                self.refused = Some(nack.version.clone());
                tracing::warn!(node_id = %node, version = %nack.version, error = %nack.error, "proxy refused policy snapshot");
            }
            Message::Hello(_) => {
                tracing::debug!(node_id = %node, "ignoring a second Hello");
            }
            Message::Report(report) => {
                match shared
                    .reports
                    .ingest(node, &from.conn, &report, shared.clock.instant())
                {
                    Ok(()) => shared.on_report(node, from.stream, report),
                    Err(e) => {
                        tracing::debug!(node_id = %node, error = %e, "malformed traffic report dropped")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};

    /// The gRPC serving certificate's SANs, with `names` configured and the port bound
    /// to `bound`.
    fn sans(names: &[&str], bound: &str) -> Vec<String> {
        let ca = crate::ca::Ca::generate("cluster.local", Duration::from_secs(600)).unwrap();
        let tokens = crate::ca::TokenFile::parse(
            std::path::Path::new("tokens"),
            r#"{"token":"t","namespace":"shop","serviceAccount":"order"}"#,
        )
        .unwrap();
        let mut id = IdentityConfig::new(Arc::new(ca), Arc::new(tokens));
        id.server_names = names.iter().map(|n| n.to_string()).collect();
        let renewals = IntCounter::new("renewals", "test").unwrap();
        let served = tls(&id, bound.parse().unwrap(), renewals).unwrap();
        let chain = served.cert.current_chain();
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) => match <[u8; 4]>::try_from(*ip) {
                    Ok(v4) => IpAddr::from(v4).to_string(),
                    Err(_) => IpAddr::from(<[u8; 16]>::try_from(*ip).unwrap()).to_string(),
                },
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_grpc_certificate_names_the_address_it_is_bound_to() {
        // Proxies given the control plane's address rather than its name verify it.
        assert_eq!(
            sans(&["sluice-control-plane.sluice"], "10.1.2.3:8443"),
            ["sluice-control-plane.sluice", "10.1.2.3"]
        );
        // Named already: not twice.
        assert_eq!(sans(&["10.1.2.3"], "10.1.2.3:8443"), ["10.1.2.3"]);
        // A wildcard bind has no address of its own to name.
        assert_eq!(
            sans(&["sluice-control-plane.sluice"], "0.0.0.0:8443"),
            ["sluice-control-plane.sluice"]
        );
    }
}
