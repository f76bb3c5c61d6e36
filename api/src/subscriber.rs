//! The proxy's side of the policy stream.
//!
//! A [`Subscriber`] owns one background task that keeps a stream open to the
//! control plane. For every [`pb::Snapshot`] it:
//!
//! 1. re-validates the canonical bytes with [`PolicySet::from_canonical`], so a
//!    field this proxy does not know is refused with the validator's message
//!    rather than silently dropped;
//! 2. hands the set to the [`SnapshotSink`] (the proxy swaps its snapshot);
//! 3. persists it in the state directory (when one is configured);
//! 4. answers [`pb::Ack`], or [`pb::Nack`] with the reason.
//!
//! When the stream breaks the sink keeps what it has, and the task reconnects
//! after a jittered exponential [`Backoff`]. Dropping the [`Subscriber`] (or
//! calling [`Subscriber::shutdown`]) ends the task.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_config::{PolicySet, SCHEMA_VERSIONS};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::Error;
use crate::pb;
use crate::pb::policy_discovery_client::PolicyDiscoveryClient;
use crate::report::{MAX_REPORT_ENTRIES, ReportSource, RouteTraffic};

/// Where the subscriber puts validated policy sets: the proxy's snapshot holder.
///
/// Called from the subscriber task; implementations should only swap a pointer
/// (e.g. `ArcSwap::store`) and return quickly.
///
/// How a proxy wires it up: start from the saved snapshot, then follow the
/// control plane for as long as the [`Subscriber`] handle lives.
///
/// ```no_run
/// use std::sync::{Arc, Mutex};
/// use sluice_api::{SnapshotSink, Subscriber, SubscriberConfig};
/// use sluice_config::PolicySet;
///
/// #[derive(Default)]
/// struct Current(Mutex<Option<PolicySet>>);
///
/// impl SnapshotSink for Current {
///     fn apply(&self, set: PolicySet) -> Result<bool, String> {
///         // A proxy builds its routing snapshot here; an error becomes the NACK.
///         let mut cur = self.0.lock().unwrap();
///         let changed = cur.as_ref().map(|c| c.hash()) != Some(set.hash());
///         *cur = Some(set);
///         Ok(changed)
///     }
///     fn current_version(&self) -> Option<String> {
///         self.0.lock().unwrap().as_ref().map(|s| s.hash().to_string())
///     }
/// }
///
/// # async fn run() -> Result<(), sluice_api::Error> {
/// let state_dir = std::path::PathBuf::from("/var/lib/sluice");
/// let sink = Arc::new(Current::default());
/// if let Some(saved) = sluice_api::load_saved(&state_dir) {
///     let _ = sink.apply(saved);
/// }
/// let mut cfg = SubscriberConfig::new("http://sluice-control-plane:15010", "order-7d9f-abc");
/// cfg.namespace = "shop".into();
/// cfg.service = "order".into();
/// cfg.state_dir = Some(state_dir);
/// let subscriber = Subscriber::spawn(cfg, sink.clone())?;
/// // ... serve; `subscriber.status()` feeds /ready and /config ...
/// subscriber.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub trait SnapshotSink: Send + Sync + 'static {
    /// Puts `set` in force. `Ok(true)` if it differs from the set in force,
    /// `Ok(false)` if it is the same; `Err(reason)` refuses it (sent as NACK) and
    /// the previous set stays in force.
    fn apply(&self, set: PolicySet) -> Result<bool, String>;

    /// Version (content hash) of the set in force, if any; sent in `Hello` so the
    /// control plane does not send it again.
    fn current_version(&self) -> Option<String>;

    /// Told when a snapshot was refused before reaching [`apply`](Self::apply)
    /// (it failed re-validation or has another schema version), so the proxy can
    /// show it as its last rejected update. Refusals from `apply` itself are not
    /// repeated here.
    fn rejected(&self, version: &str, error: &str) {
        let _ = (version, error);
    }
}

impl<S: SnapshotSink + ?Sized> SnapshotSink for Arc<S> {
    fn apply(&self, set: PolicySet) -> Result<bool, String> {
        (**self).apply(set)
    }

    fn current_version(&self) -> Option<String> {
        (**self).current_version()
    }

    fn rejected(&self, version: &str, error: &str) {
        (**self).rejected(version, error)
    }
}

/// Reconnect delays: exponential from `min` to `max`, optionally jittered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first reconnect.
    pub min: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
    /// Spread each delay uniformly over `[d/2, d]` so that many proxies losing
    /// the same control plane do not reconnect in lockstep. Off in tests.
    pub jitter: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
            jitter: true,
        }
    }
}

impl Backoff {
    /// The delay before reconnect number `attempt` (0-based) since the last
    /// successful stream.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        let base = self.min.saturating_mul(factor).min(self.max);
        if !self.jitter {
            return base;
        }
        let half = base / 2;
        let spread = (base - half).as_nanos() as u64;
        let extra = if spread == 0 {
            0
        } else {
            rand::random_range(0..=spread)
        };
        half + Duration::from_nanos(extra)
    }
}

/// Schedule state: which attempt comes next.
#[derive(Debug)]
struct Retry {
    backoff: Backoff,
    attempt: u32,
}

impl Retry {
    fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            attempt: 0,
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    async fn wait(&mut self) {
        let d = self.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        tokio::time::sleep(d).await;
    }
}

/// How a subscriber reaches and introduces itself to the control plane.
#[derive(Clone, Debug)]
pub struct SubscriberConfig {
    /// Control-plane URL, e.g. `http://127.0.0.1:15010`.
    pub control_plane: String,
    /// Unique id of this proxy (pod name in a cluster).
    pub node_id: String,
    /// Namespace of the proxy's workload.
    pub namespace: String,
    /// The service the proxy fronts (`--service`).
    pub service: String,
    /// Version of the proxy binary, for the control plane's records.
    pub proxy_version: String,
    /// Where the last applied snapshot is saved; `None` saves nothing.
    pub state_dir: Option<PathBuf>,
    /// Reconnect schedule.
    pub backoff: Backoff,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// The mesh root (PEM) an `https://` control plane's certificate must chain to.
    pub trust_root: Option<Vec<u8>>,
    /// The policy schema versions this proxy accepts (default: every version this
    /// build reads). A snapshot in another version, or whose policies need a newer
    /// one than it says, is refused.
    pub schema_versions: Vec<u32>,
    /// Bounds on a snapshot's policies (held to [`sluice_config::Limits::for_whole_set`]).
    pub limits: sluice_config::Limits,
    /// Where traffic reports come from; `None` sends none.
    pub reports: Option<Arc<dyn ReportSource>>,
    /// How often a report is sent while the stream is open (`--report-interval`).
    pub report_interval: Duration,
    /// Where the control plane's per-route proxy counts go; `None` does not ask for them.
    pub route_traffic: Option<Arc<RouteTraffic>>,
}

impl SubscriberConfig {
    /// A configuration with default backoff and no state directory.
    pub fn new(control_plane: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            control_plane: control_plane.into(),
            node_id: node_id.into(),
            namespace: String::new(),
            service: String::new(),
            proxy_version: String::new(),
            state_dir: None,
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(5),
            trust_root: None,
            schema_versions: SCHEMA_VERSIONS.to_vec(),
            limits: sluice_config::Limits::default(),
            reports: None,
            report_interval: DEFAULT_REPORT_INTERVAL,
            route_traffic: None,
        }
    }
}

/// How often a proxy reports its traffic by default.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// A snapshot this proxy refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The refused version.
    pub version: String,
    /// Why (sent to the control plane as the NACK's error).
    pub error: String,
}

/// What the subscriber is doing, for the proxy's `/ready` and `/config`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriberStatus {
    /// A stream to the control plane is open.
    pub connected: bool,
    /// Streams opened so far.
    pub connects: u64,
    /// The last version applied and acknowledged.
    pub last_applied: Option<String>,
    /// The last version refused, with the reason.
    pub last_rejected: Option<Rejected>,
    /// Why the last stream ended or failed to open.
    pub last_error: Option<String>,
}

/// Handle to the subscriber task; dropping it ends the task.
#[derive(Debug)]
pub struct Subscriber {
    /// Dropped (with the handle, or by [`Self::shutdown`]), it wakes the task, which
    /// then returns.
    shutdown: Option<oneshot::Sender<()>>,
    status: watch::Receiver<SubscriberStatus>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Subscriber {
    /// Starts the subscriber task on the current tokio runtime.
    ///
    /// Fails only if `cfg.control_plane` is not a usable URL; an unreachable
    /// control plane is retried forever.
    pub fn spawn<S: SnapshotSink>(cfg: SubscriberConfig, sink: S) -> Result<Self, Error> {
        let endpoint = endpoint(&cfg)?;
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let (status_tx, status_rx) = watch::channel(SubscriberStatus::default());
        let task = tokio::spawn(run(
            Arc::new(cfg),
            endpoint,
            Arc::new(sink),
            shutdown_rx,
            status_tx,
        ));
        Ok(Self {
            shutdown: Some(shutdown_tx),
            status: status_rx,
            task: Some(task),
        })
    }

    /// A receiver of the subscriber's status, updated on every change.
    pub fn status(&self) -> watch::Receiver<SubscriberStatus> {
        self.status.clone()
    }

    /// Ends the task and waits for it to finish.
    pub async fn shutdown(mut self) {
        drop(self.shutdown.take());
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn endpoint(cfg: &SubscriberConfig) -> Result<Endpoint, Error> {
    control_plane_endpoint(&cfg.control_plane, cfg.trust_root.as_deref())
        .map(|ep| ep.connect_timeout(cfg.connect_timeout))
}

/// A gRPC endpoint for the control plane at `url`: TLS verified against
/// `trust_root` (PEM) when the URL is `https://`, plaintext for `http://`.
/// Shared by the policy stream and the proxy's identity client.
pub fn control_plane_endpoint(url: &str, trust_root: Option<&[u8]>) -> Result<Endpoint, Error> {
    let invalid = |reason: String| Error::InvalidEndpoint {
        url: url.to_string(),
        reason,
    };
    let mut ep = Endpoint::from_shared(url.to_string()).map_err(|e| invalid(e.to_string()))?;
    if ep.uri().scheme_str() == Some("https") {
        let root = trust_root.ok_or_else(|| {
            invalid("an https:// control plane needs the mesh root (--trust-root)".into())
        })?;
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root));
        ep = ep.tls_config(tls).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(ep
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // Keepalives notice a control plane that vanished without closing the
        // connection (node loss, partition), so the reconnect loop can start.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

async fn run<S: SnapshotSink>(
    cfg: Arc<SubscriberConfig>,
    endpoint: Endpoint,
    sink: Arc<S>,
    mut shutdown: oneshot::Receiver<()>,
    status: watch::Sender<SubscriberStatus>,
) {
    let mut retry = Retry::new(cfg.backoff.clone());
    loop {
        let mut outcome = tokio::select! {
            _ = &mut shutdown => return,
            o = session(&cfg, &endpoint, &sink, &status) => o,
        };
        if outcome.established {
            retry.reset();
            // A stream that was open ending is routine (a control plane restarting).
            tracing::info!(control_plane = %cfg.control_plane, error = %outcome.error, "policy stream ended; reconnecting");
        } else {
            // Never connected: a wrong URL, an untrusted certificate, a control plane
            // down. The operator has to see this one, with the likely fix when the
            // two ends disagree on TLS.
            if let Some(hint) = tls_mismatch_hint(&cfg.control_plane, &outcome.error) {
                outcome.error = format!("{} (hint: {hint})", outcome.error);
            }
            tracing::warn!(control_plane = %cfg.control_plane, error = %outcome.error, "cannot reach the control plane; retrying");
        }
        status.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(outcome.error);
        });
        tokio::select! {
            _ = &mut shutdown => return,
            _ = retry.wait() => {}
        }
    }
}

struct SessionEnd {
    established: bool,
    error: String,
}

async fn session<S: SnapshotSink>(
    cfg: &Arc<SubscriberConfig>,
    endpoint: &Endpoint,
    sink: &Arc<S>,
    status: &watch::Sender<SubscriberStatus>,
) -> SessionEnd {
    let fail = |established: bool, error: String| SessionEnd { established, error };
    let channel: Channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return fail(false, format!("connect: {}", error_chain(&e))),
    };
    let mut client = PolicyDiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::ProxyMessage>(8);
    let hello = pb::Hello {
        node_id: cfg.node_id.clone(),
        namespace: cfg.namespace.clone(),
        service: cfg.service.clone(),
        schema_version: cfg.schema_versions.iter().copied().max().unwrap_or(0),
        proxy_version: cfg.proxy_version.clone(),
        last_applied_version: sink.current_version().unwrap_or_default(),
        accepted_schema_versions: cfg.schema_versions.clone(),
        accepts_route_traffic: cfg.route_traffic.is_some(),
    };
    let _ = tx
        .send(pb::ProxyMessage {
            message: Some(pb::proxy_message::Message::Hello(hello)),
        })
        .await;
    let mut inbound = match client.stream_policies(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return fail(false, format!("open stream: {status}")),
    };
    tracing::info!(control_plane = %cfg.control_plane, "policy stream open");
    status.send_modify(|s| {
        s.connected = true;
        s.connects += 1;
        s.last_error = None;
    });
    let mut reporter = cfg.reports.as_ref().map(|source| {
        // Counts from before this stream were either sent on the last one or are
        // stale: the first report covers this stream only.
        let _ = source.deltas(usize::MAX);
        Reporter::new(source.clone(), cfg.report_interval)
    });
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = tick(&mut reporter) => {
                if let Some(r) = &mut reporter {
                    r.send(&tx);
                }
                continue;
            }
        };
        let snapshot = match next {
            Ok(Some(s)) => s,
            Ok(None) => return fail(true, "control plane closed the stream".into()),
            Err(e) => return fail(true, format!("stream: {e}")),
        };
        if snapshot.version.is_empty() && snapshot.canonical.is_empty() {
            // Not a policy: the control plane's per-route proxy counts, never acknowledged.
            if let (Some(table), Some(msg)) = (&cfg.route_traffic, &snapshot.route_traffic) {
                table.replace(msg);
            }
            continue;
        }
        // Validating and compiling a whole set takes up to a few hundred milliseconds
        // for a large mesh (0.4 s for 10,000 routes, BENCHMARKS.md): off the runtime's threads, so that with one worker (which also serves
        // every connection) a push does not hold requests up meanwhile.
        let reply = {
            let (cfg, sink, status) = (cfg.clone(), sink.clone(), status.clone());
            tokio::task::spawn_blocking(move || handle_snapshot(&cfg, &*sink, snapshot, &status))
                .await
        };
        // It fails only with the runtime shutting down (a panic in it is a NACK).
        let Ok(reply) = reply else {
            return fail(true, "the runtime is shutting down".into());
        };
        if tx.send(reply).await.is_err() {
            return fail(true, "request stream closed".into());
        }
    }
}

/// Waits for the next report, or forever without a reporter.
async fn tick(reporter: &mut Option<Reporter>) {
    match reporter {
        Some(r) => {
            r.interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Numbers reports and queues them without waiting.
struct Reporter {
    source: Arc<dyn ReportSource>,
    interval: tokio::time::Interval,
    seq: u64,
    dropped: u64,
    last: tokio::time::Instant,
}

impl Reporter {
    fn new(source: Arc<dyn ReportSource>, every: Duration) -> Self {
        let every = every.max(Duration::from_millis(10));
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // A report covers whatever time passed; a late tick is not made up for.
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            source,
            interval,
            seq: 0,
            dropped: 0,
            last: tokio::time::Instant::now(),
        }
    }

    /// Sends the deltas since the last report, or drops them if the queue is full.
    fn send(&mut self, tx: &mpsc::Sender<pb::ProxyMessage>) {
        let deltas = self.source.deltas(MAX_REPORT_ENTRIES);
        let now = tokio::time::Instant::now();
        let interval_ms =
            u32::try_from(now.duration_since(self.last).as_millis()).unwrap_or(u32::MAX);
        self.last = now;
        self.seq += 1;
        let report = pb::Report {
            seq: self.seq,
            interval_ms,
            bucket_bounds: deltas.bucket_bounds,
            entries: deltas.entries,
            dropped: self.dropped,
            deferred: deltas.deferred,
        };
        let msg = pb::ProxyMessage {
            message: Some(pb::proxy_message::Message::Report(report)),
        };
        match tx.try_send(msg) {
            Ok(()) => self.dropped = 0,
            Err(_) => {
                self.dropped += 1;
                self.source.dropped();
                tracing::debug!(
                    seq = self.seq,
                    "traffic report dropped: the stream's queue is full"
                );
            }
        }
    }
}

fn handle_snapshot<S: SnapshotSink>(
    cfg: &SubscriberConfig,
    sink: &S,
    snapshot: pb::Snapshot,
    status: &watch::Sender<SubscriberStatus>,
) -> pb::ProxyMessage {
    let version = snapshot.version.clone();
    // A panic in validating or compiling one snapshot (a bug of ours) must cost that
    // snapshot, not the stream: without this the task ends and the proxy stays on its
    // policy, deaf to every later push, until restarted.
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_and_apply(cfg, sink, snapshot)
    }))
    .unwrap_or_else(|panic| {
        let error = format!(
            "snapshot {version}: the proxy failed while taking this content ({}); the policy in force keeps serving",
            sluice_config::panic_message(panic.as_ref())
        );
        sink.rejected(&version, &error);
        Err(error)
    });
    match checked {
        Ok(changed) => {
            tracing::info!(%version, changed, "policy snapshot applied");
            status.send_modify(|s| s.last_applied = Some(version.clone()));
            pb::ProxyMessage {
                message: Some(pb::proxy_message::Message::Ack(pb::Ack { version })),
            }
        }
        Err(error) => {
            tracing::warn!(%version, %error, "policy snapshot refused");
            status.send_modify(|s| {
                s.last_rejected = Some(Rejected {
                    version: version.clone(),
                    error: error.clone(),
                })
            });
            pb::ProxyMessage {
                message: Some(pb::proxy_message::Message::Nack(pb::Nack {
                    version,
                    error,
                })),
            }
        }
    }
}

fn check_and_apply<S: SnapshotSink>(
    cfg: &SubscriberConfig,
    sink: &S,
    snapshot: pb::Snapshot,
) -> Result<bool, String> {
    if !cfg.schema_versions.contains(&snapshot.schema_version) {
        let error = format!(
            "snapshot schema version {} is not supported (this proxy understands {:?})",
            snapshot.schema_version, cfg.schema_versions
        );
        sink.rejected(&snapshot.version, &error);
        return Err(error);
    }
    let source = format!("snapshot {}", snapshot.version);
    let set =
        PolicySet::from_canonical_with(&source, &snapshot.canonical, &cfg.limits).map_err(|e| {
            let error = e.to_string();
            sink.rejected(&snapshot.version, &error);
            error
        })?;
    if set.schema_version() > snapshot.schema_version {
        // What a proxy of that version would do: its validator does not know the
        // newer fields.
        let error = format!(
            "snapshot says schema version {} but its policies need {}",
            snapshot.schema_version,
            set.schema_version()
        );
        sink.rejected(&snapshot.version, &error);
        return Err(error);
    }
    if set.hash() != snapshot.version {
        // Same policies, different serialisation (e.g. proxy and control plane
        // built from different sluice-config releases): the content is what was
        // validated, so it is applied; the version stays the control plane's.
        tracing::debug!(
            version = %snapshot.version,
            local = %set.hash(),
            "snapshot re-serialises to a different hash"
        );
    }
    let saved = set.clone();
    let changed = sink.apply(set)?;
    if let Some(dir) = &cfg.state_dir
        && let Err(e) = crate::save_snapshot(dir, &saved)
    {
        // The policy is in force; only a restart before the control plane
        // answers would miss it, so this is not a reason to NACK.
        tracing::warn!(error = %e, "cannot save policy snapshot");
    }
    Ok(changed)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        // Wrappers that print their source's text would say everything twice.
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// The likely fix when a failure to reach the control plane at `url` reads as
/// the two ends disagreeing on TLS, else `None`; `error` is the failure's whole
/// text (its source chain included).
///
/// The signatures are what the other end's first bytes do to this one. A TLS
/// server's alert record, read as an HTTP/2 frame header, announces a frame of
/// over a megabyte (`FRAME_SIZE_ERROR`), or the server has already hung up on the
/// rest of our preface (a broken pipe, a reset, the request canceled by the
/// connection closing under it). A plaintext server's HTTP/2
/// frames, read as a TLS record, carry no known record type (`InvalidContentType`).
pub fn tls_mismatch_hint(url: &str, error: &str) -> Option<&'static str> {
    let https = url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    let closed = [
        "FRAME_SIZE_ERROR",
        "BrokenPipe",
        "ConnectionReset",
        "Canceled",
    ];
    if https && error.contains("InvalidContentType") {
        Some(
            "the control plane answers in plaintext (started with --plaintext?): use an http:// URL",
        )
    } else if !https && closed.iter().any(|c| error.contains(c)) {
        Some(
            "if the control plane serves TLS (its default), use an https:// URL with --trust-root, \
             or start it with --plaintext",
        )
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each signature of a scheme mismatch gets its hint only on the side it can
    /// happen on; other failures and a right-scheme failure get none.
    #[test]
    fn a_scheme_mismatch_is_hinted_from_its_signature() {
        let tls = Some(
            "if the control plane serves TLS (its default), use an https:// URL with --trust-root, \
             or start it with --plaintext",
        );
        let plain = Some(
            "the control plane answers in plaintext (started with --plaintext?): use an http:// URL",
        );
        for (url, error, want) in [
            (
                "http://cp:15010",
                "GoAway(b\"\", FRAME_SIZE_ERROR, Library)",
                tls,
            ),
            (
                "http://cp:15010",
                "Io, Custom { kind: BrokenPipe, .. }",
                tls,
            ),
            (
                "http://cp:15010",
                "Io, Os { kind: ConnectionReset, .. }",
                tls,
            ),
            (
                "http://cp:15010",
                "received corrupt message of type InvalidContentType",
                None,
            ),
            ("http://cp:15010", "Connection refused (os error 111)", None),
            (
                "https://cp:15010",
                "received corrupt message of type InvalidContentType",
                plain,
            ),
            (
                "HTTPS://cp:15010",
                "received corrupt message of type InvalidContentType",
                plain,
            ),
            (
                "https://cp:15010",
                "GoAway(b\"\", FRAME_SIZE_ERROR, Library)",
                None,
            ),
            (
                "https://cp:15010",
                "invalid peer certificate: UnknownIssuer",
                None,
            ),
            ("https", "InvalidContentType", None),
        ] {
            assert_eq!(tls_mismatch_hint(url, error), want, "{url} {error}");
        }
    }

    /// A cause is said once even when a wrapper prints its source's text too.
    #[test]
    fn an_error_chain_says_each_cause_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "transport error",
            Some(Box::new(E(
                "corrupt",
                Some(Box::new(E("corrupt", Some(Box::new(E("eof", None)))))),
            ))),
        );
        assert_eq!(error_chain(&e), "transport error: corrupt: eof");
    }

    fn fixed() -> Backoff {
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
            jitter: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_from_min_to_max() {
        let mut retry = Retry::new(fixed());
        let expected_ms = [100u64, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000];
        for ms in expected_ms {
            let start = tokio::time::Instant::now();
            retry.wait().await;
            assert_eq!(start.elapsed(), Duration::from_millis(ms));
        }
        retry.reset();
        let start = tokio::time::Instant::now();
        retry.wait().await;
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_within_half_and_full_delay() {
        let b = Backoff::default();
        for attempt in 0..40 {
            let full = fixed().delay(attempt);
            let d = b.delay(attempt);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} vs {full:?}"
            );
        }
    }

    /// Counts its calls; every report carries one entry.
    #[derive(Debug, Default)]
    struct Counting {
        dropped: std::sync::atomic::AtomicU64,
    }

    impl ReportSource for Counting {
        fn deltas(&self, _: usize) -> crate::Deltas {
            crate::Deltas {
                bucket_bounds: vec![0.1],
                entries: vec![pb::BackendCounts {
                    route: "r".into(),
                    backend: "b".into(),
                    requests: 1,
                    ..Default::default()
                }],
                deferred: 0,
            }
        }

        fn dropped(&self) {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_that_finds_the_queue_full_is_dropped_and_counted() {
        let source = Arc::new(Counting::default());
        let mut reporter = Reporter::new(source.clone(), Duration::from_secs(2));
        let (tx, mut rx) = mpsc::channel(1);
        tokio::time::advance(Duration::from_secs(2)).await;
        reporter.send(&tx);
        reporter.send(&tx);
        reporter.send(&tx);
        assert_eq!(source.dropped.load(std::sync::atomic::Ordering::Relaxed), 2);
        let first = match rx.recv().await.unwrap().message {
            Some(pb::proxy_message::Message::Report(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!((first.seq, first.dropped, first.interval_ms), (1, 0, 2000));
        // The next one that goes out says how many were lost, and its number shows the gap.
        reporter.send(&tx);
        let next = match rx.recv().await.unwrap().message {
            Some(pb::proxy_message::Message::Report(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!((next.seq, next.dropped), (4, 2));
        assert_eq!(next.entries.len(), 1);
    }

    #[test]
    fn bad_url_is_refused_up_front() {
        let cfg = SubscriberConfig::new("not a url\n", "n1");
        assert!(matches!(endpoint(&cfg), Err(Error::InvalidEndpoint { .. })));
    }

    #[test]
    fn https_needs_a_trust_root() {
        let cfg = SubscriberConfig::new("https://127.0.0.1:15010", "n1");
        let err = endpoint(&cfg).unwrap_err();
        assert!(err.to_string().contains("--trust-root"), "{err}");
    }
}
