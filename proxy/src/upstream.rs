//! The upstream client, the connection end of every stack: pooled HTTP/1 and HTTP/2
//! clients (plaintext, or mTLS per backend identity) that send a request to the
//! [`Endpoint`] the balancer chose.
//!
//! HTTP/1 goes over `H1Pool`: connections on hyper's connection-level API, kept idle
//! per worker thread, so a request takes no lock, hashes its endpoint once and spawns
//! nothing; a connection goes back to its thread's pool when the response body ends.
//! HTTP/2 goes over `H2Pool`, the same per-worker design on hyper's HTTP/2 connections:
//! one multiplexed connection per endpoint per worker thread, replaced when it closes
//! (GOAWAY, an error, idleness).
//!
//! Both pools key connections by the endpoint dialled (and by pool, so by the mesh
//! identity expected), never by the request's authority: the request keeps the authority
//! the client called (`Host`, `:authority`), as Envoy and Linkerd forward it, so
//! virtual-hosted and gRPC upstreams see the name they serve, not an address.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, Uri, Version, header};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sluice_filters::extensions::{Endpoint, Routing, SelectedBackend};
use sluice_filters::{UpstreamError, UpstreamErrorKind};

use crate::ProxyError;
use crate::body::{Body, BoxError, boxed};
use crate::message::MAX_HEADER_BYTES;
use crate::route::BackendParams;
use crate::tls::{MeshConnector, TlsStore};

/// Pooled clients to upstreams, one per protocol; the downstream protocol picks one.
///
/// With mTLS on, a backend that names an `identity` is dialed through a
/// [`MeshConnector`] expecting that SPIFFE ID: one pair of pooled clients per
/// identity, shared by every route. [`Upstream::for_backends`] resolves them per
/// route once per policy swap, so a request picks its client by backend index.
// Every request clones its route's stack (and retry clones its inner service), so the
// clients sit behind one `Arc`: a clone is one counter, not all the clients' fields.
#[derive(Clone, Debug)]
pub struct Upstream {
    clients: Arc<Clients>,
}

#[derive(Debug)]
struct Clients {
    http1: Arc<H1Pool<HttpConnector>>,
    http2: Arc<H2Pool<HttpConnector>>,
    mesh: Option<Arc<MeshPools>>,
    /// The mesh clients of this route's backends, by backend index.
    by_backend: Option<Arc<[Option<MeshClients>]>>,
}

/// ALPN of the HTTP/1 mesh client: the upstream protocol follows the downstream one.
const ALPN_H1: &[&[u8]] = &[b"http/1.1"];
/// ALPN of the HTTP/2 mesh client.
const ALPN_H2: &[&[u8]] = &[b"h2"];

/// How long a connection may sit unused in a pool before it is closed (between one and
/// two of these in practice: its task looks once per period).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Mesh clients per expected identity.
#[derive(Debug)]
struct MeshPools {
    tls: Arc<TlsStore>,
    connector: HttpConnector,
    // Touched only when a policy swap compiles stacks, never per request.
    clients: Mutex<HashMap<Arc<str>, MeshClients>>,
}

/// The pooled HTTP/1 and HTTP/2 clients to peers of one identity.
#[derive(Clone, Debug)]
struct MeshClients {
    http1: Arc<H1Pool<MeshConnector>>,
    http2: Arc<H2Pool<MeshConnector>>,
}

impl Upstream {
    /// Creates the clients. Connections are kept idle for 90 s.
    pub fn new() -> Self {
        let connector = tcp_connector();
        let http1 = Arc::new(H1Pool::new(connector.clone()));
        let http2 = Arc::new(H2Pool::new(connector));
        Self {
            clients: Arc::new(Clients {
                http1,
                http2,
                mesh: None,
                by_backend: None,
            }),
        }
    }

    /// Clients that dial backends naming an `identity` with mTLS, presenting the
    /// certificate `tls` holds.
    pub fn with_mesh(tls: Arc<TlsStore>) -> Self {
        let plain = Self::new();
        Self {
            clients: Arc::new(Clients {
                http1: plain.clients.http1.clone(),
                http2: plain.clients.http2.clone(),
                mesh: Some(Arc::new(MeshPools {
                    tls,
                    connector: tcp_connector(),
                    clients: Mutex::new(HashMap::new()),
                })),
                by_backend: None,
            }),
        }
    }

    /// This upstream for one route: backends with an `identity` get the mesh
    /// clients expecting it (when mTLS is on), the others plaintext.
    pub fn for_backends(&self, backends: &[Arc<BackendParams>]) -> Self {
        let Some(mesh) = &self.clients.mesh else {
            return self.clone();
        };
        let mut pools = mesh.clients.lock().unwrap_or_else(|e| e.into_inner());
        let by_backend: Arc<[Option<MeshClients>]> = backends
            .iter()
            .map(|b| {
                let id = b.identity.as_ref()?;
                let clients = pools.entry(id.clone()).or_insert_with(|| {
                    let mk = |alpn| {
                        MeshConnector::new(
                            mesh.connector.clone(),
                            mesh.tls.clone(),
                            Some(id.clone()),
                            alpn,
                        )
                    };
                    MeshClients {
                        http1: Arc::new(H1Pool::new(mk(ALPN_H1))),
                        http2: Arc::new(H2Pool::new(mk(ALPN_H2))),
                    }
                });
                Some(clients.clone())
            })
            .collect();
        Self {
            clients: Arc::new(Clients {
                http1: self.clients.http1.clone(),
                http2: self.clients.http2.clone(),
                mesh: self.clients.mesh.clone(),
                by_backend: Some(by_backend),
            }),
        }
    }
}

fn tcp_connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    // Nagle plus delayed ACKs costs milliseconds at p99 on loopback.
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl tower::Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let (backend, endpoint) = match req.extensions_mut().get_mut::<Routing>() {
            Some(r) => (r.backend.take(), r.endpoint.take()),
            None => (None, None),
        };
        let Some(Endpoint(endpoint)) = endpoint else {
            let err = ProxyError::NoEndpoint(backend_name(backend.as_ref()));
            return Box::pin(std::future::ready(Err(err.into())));
        };
        let mesh = match (&self.clients.by_backend, &backend) {
            (Some(by), Some(b)) => by.get(b.index).and_then(Option::as_ref),
            _ => None,
        };
        if req.version() != Version::HTTP_2 {
            *req.version_mut() = Version::HTTP_11;
            return match mesh {
                Some(m) => Box::pin(send_h1(m.http1.clone(), endpoint, req, backend)),
                None => Box::pin(send_h1(self.clients.http1.clone(), endpoint, req, backend)),
            };
        }
        match mesh {
            Some(m) => Box::pin(send_h2(m.http2.clone(), endpoint, req, backend)),
            None => Box::pin(send_h2(self.clients.http2.clone(), endpoint, req, backend)),
        }
    }
}

/// Sends an HTTP/2 request over `pool` to `endpoint`. The URI goes absolute with the
/// authority the client called (the endpoint's only when the request names none, as a
/// transparent request to its original destination may not); a request a reused
/// connection closed before taking it (GOAWAY, idle close) is sent again on a new one.
async fn send_h2<C>(
    pool: Arc<H2Pool<C>>,
    endpoint: Arc<str>,
    mut req: Request<Body>,
    backend: Option<SelectedBackend>,
) -> Result<Response<Body>, BoxError>
where
    C: Connect,
{
    let failed = |kind, e: BoxError| ProxyError::Upstream {
        backend: backend_name(backend.as_ref()),
        source: UpstreamError::new(kind, e),
    };
    *req.uri_mut() = upstream_uri(&endpoint, req.uri())?;
    let lost = |e: hyper::Error| {
        let kind = if refused(&e) {
            UpstreamErrorKind::RefusedStream
        } else {
            UpstreamErrorKind::Reset
        };
        failed(kind, e.into())
    };
    if let Some(mut conn) = pool.checkout(&endpoint) {
        let in_flight = InFlight::new(&conn.state);
        match conn.sender.try_send_request(req).await {
            Ok(resp) => return Ok(answer_h2(resp, in_flight, backend)),
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(lost(e.into_error()).into()),
            },
        }
    }
    let mut conn = pool
        .connect(&endpoint)
        .await
        .map_err(|e| failed(connect_failure(&*e), e))?;
    let in_flight = InFlight::new(&conn.state);
    match conn.sender.try_send_request(req).await {
        Ok(resp) => Ok(answer_h2(resp, in_flight, backend)),
        Err(e) => Err(lost(e.into_error()).into()),
    }
}

/// The kind of a failed connect: `Unready` when this proxy had no certificate to dial
/// with (no endpoint is at fault, so none is ejected), else a connect failure.
fn connect_failure(e: &(dyn std::error::Error + 'static)) -> UpstreamErrorKind {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if matches!(
            err.downcast_ref::<ProxyError>(),
            Some(ProxyError::NoWorkloadCertificate)
        ) {
            return UpstreamErrorKind::Unready;
        }
        cur = err.source();
    }
    UpstreamErrorKind::ConnectFailure
}

/// Whether the upstream said it did not process the request, which a retry on
/// `refused-stream` may then send again: it reset the stream with `REFUSED_STREAM`
/// (RFC 9113 §8.7), or its GOAWAY named a last stream below this one (§6.8), as when
/// a stream opened while the upstream was going away (a stream cap's rotation, a
/// drain) crossed its final GOAWAY.
fn refused(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            // h2 fails a stream with the peer's GOAWAY only when the stream is above
            // the last one it names.
            return h2.is_remote()
                && (h2.is_go_away()
                    || h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        cur = err.source();
    }
    false
}

/// The response, its body counting as a stream in flight on its connection until it is
/// dropped, so that the idle check never closes a connection under a long stream.
fn answer_h2(
    resp: Response<Incoming>,
    in_flight: InFlight,
    backend: Option<SelectedBackend>,
) -> Response<Body> {
    let mut resp = resp.map(|body| {
        boxed(H2Body {
            body,
            _in_flight: in_flight,
        })
    });
    if let Some(b) = backend {
        Routing::of_mut(resp.extensions_mut()).backend = Some(b);
    }
    resp
}

/// Sends an HTTP/1 request over `pool` to `endpoint`, as hyper-util's client did: origin
/// form, a `Host` header from the endpoint when the request has none, and a request that
/// a reused connection closed before taking it sent again on a new one.
async fn send_h1<C>(
    pool: Arc<H1Pool<C>>,
    endpoint: Arc<str>,
    mut req: Request<Body>,
    backend: Option<SelectedBackend>,
) -> Result<Response<Body>, BoxError>
where
    C: Connect,
{
    to_origin_form(&mut req, &endpoint)?;
    // hyper's HTTP/1 client reads none of the request's extensions (the upgrade was
    // taken at the edge); their map, emptied, carries the response's, where a new one
    // would cost two allocations per request.
    let ext = std::mem::take(req.extensions_mut());
    let given = Answer { backend, ext };
    let failed = |kind, e: BoxError| ProxyError::Upstream {
        backend: backend_name(given.backend.as_ref()),
        source: UpstreamError::new(kind, e),
    };
    if let Some(mut conn) = pool.checkout(&endpoint) {
        match conn.sender.try_send_request(req).await {
            Ok(resp) => return Ok(answer(pool, endpoint, conn, resp, given)),
            Err(mut e) => match e.take_message() {
                // Closed while idle (the upstream's own idle timeout): not a failure of
                // the request, which was never written.
                Some(unsent) => req = unsent,
                None => return Err(failed(UpstreamErrorKind::Reset, e.into_error().into()).into()),
            },
        }
    }
    let mut conn = pool
        .connect(&endpoint)
        .await
        .map_err(|e| failed(connect_failure(&*e), e))?;
    match conn.sender.try_send_request(req).await {
        Ok(resp) => Ok(answer(pool, endpoint, conn, resp, given)),
        Err(e) => Err(failed(UpstreamErrorKind::Reset, e.into_error().into()).into()),
    }
}

/// What an HTTP/1 response is given besides its body: the backend that answered and
/// the request's extension map to hold it.
struct Answer {
    backend: Option<SelectedBackend>,
    ext: http::Extensions,
}

/// The response, its body handing the connection back to the pool when it ends.
fn answer<C>(
    pool: Arc<H1Pool<C>>,
    endpoint: Arc<str>,
    conn: H1Conn,
    resp: Response<Incoming>,
    Answer { backend, mut ext }: Answer,
) -> Response<Body> {
    // An upgraded connection belongs to the tunnel now.
    let back = (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| Return {
        pool: pool.id,
        endpoint,
        conn,
    });
    let mut resp = resp.map(|body| {
        let mut body = PooledBody { body, back };
        if body.body.is_end_stream() {
            body.give_back();
        }
        boxed(body)
    });
    if let Some(b) = backend {
        // A map holding only the request's routing keeps that entry to carry the
        // backend back up (no allocation); anything else of the request's goes.
        if ext.len() > 1 || Routing::of(&ext).is_none() {
            ext.clear();
        }
        // What hyper put there (an upgrade, a reason phrase) stays.
        ext.extend(std::mem::take(resp.extensions_mut()));
        *Routing::of_mut(&mut ext) = Routing {
            backend: Some(b),
            ..Routing::default()
        };
        *resp.extensions_mut() = ext;
    }
    resp
}

/// Rewrites an HTTP/1 request for a direct connection to `endpoint`: the target in
/// origin form (authority form for `CONNECT`), `Host` set if missing.
fn to_origin_form(req: &mut Request<Body>, endpoint: &str) -> Result<(), BoxError> {
    if !req.headers().contains_key(header::HOST) {
        // As hyper-util's client: the default port is left out.
        let host = endpoint.strip_suffix(":80").unwrap_or(endpoint);
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_str(host)?);
    }
    let target = if req.method() == Method::CONNECT {
        Uri::try_from(endpoint)?
    } else {
        match req.uri().path_and_query() {
            Some(_) if req.uri().scheme().is_none() && req.uri().authority().is_none() => {
                return Ok(());
            }
            Some(pq) => Uri::from(pq.clone()),
            None => Uri::from_static("/"),
        }
    };
    *req.uri_mut() = target;
    Ok(())
}

/// What [`H1Pool`] dials with: hyper-util's TCP connector, or the mesh's TLS connector.
trait Connect:
    tower::Service<
        Uri,
        Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        Future: Send,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<C> Connect for C where
    C: tower::Service<
            Uri,
            Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
            Future: Send,
            Error: Into<BoxError>,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Idle HTTP/1 connections of every pool, by pool and endpoint, for the thread running
/// the request: a worker takes and returns connections without a lock. A connection
/// handed back on another thread (the request's task moved between workers) goes home
/// through its thread's [`Inbox`].
type IdleMap = HashMap<(u64, Arc<str>), Vec<H1Conn>, foldhash::fast::RandomState>;

thread_local! {
    static IDLE: RefCell<IdleMap> = RefCell::new(HashMap::default());
    static INBOX: Arc<Inbox> = Arc::new(Inbox::default());
}

/// Connections handed back on another thread than the one that dialed them, waiting
/// for their own thread's next checkout.
///
/// Without it, with several workers, connections piled up in the pools of the threads
/// where responses happened to end while the others dialed new ones (about 300
/// upstream connections for 16 clients at 5,000 req/s on two workers). The lock is
/// taken only for such a return and to collect it; a checkout finds the inbox empty
/// with one atomic load.
#[derive(Default)]
struct Inbox {
    waiting: AtomicBool,
    returns: Mutex<Vec<Return>>,
}

impl Inbox {
    /// Moves what came back from other threads into this thread's idle lists.
    fn collect(&self, idle: &mut IdleMap) {
        if !self.waiting.load(Ordering::Acquire) {
            return;
        }
        let returns = {
            let mut held = self.returns.lock().unwrap_or_else(|e| e.into_inner());
            self.waiting.store(false, Ordering::Release);
            std::mem::take(&mut *held)
        };
        for r in returns {
            r.put_into(idle);
        }
    }
}

/// Pools have an id so that one thread-local map serves them all.
static NEXT_POOL: AtomicU64 = AtomicU64::new(0);

/// HTTP/1 connections to upstreams, dialed with `C`, kept idle per worker thread.
struct H1Pool<C> {
    id: u64,
    connector: C,
}

impl<C> std::fmt::Debug for H1Pool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// One HTTP/1 connection: the sending half, what its task reads to close it idle, and
/// the inbox of the thread that dialed it.
struct H1Conn {
    sender: http1::SendRequest<Body>,
    state: Arc<ConnState>,
    home: Weak<Inbox>,
}

#[derive(Default)]
struct ConnState {
    /// Requests sent so far: unchanged over a whole idle period means unused.
    uses: AtomicU64,
    /// In a request's hands (not idle in a pool).
    busy: AtomicBool,
}

impl<C: Connect> H1Pool<C> {
    fn new(connector: C) -> Self {
        Self {
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
            connector,
        }
    }

    /// The most recently returned idle connection to `endpoint` that can take a request
    /// now; closed ones are dropped on the way, busy ones (still finishing the last
    /// exchange) stay.
    fn checkout(&self, endpoint: &Arc<str>) -> Option<H1Conn> {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            INBOX.with(|inbox| inbox.collect(&mut idle));
            let list = idle.get_mut(&(self.id, endpoint.clone()))?;
            let mut i = list.len();
            while i > 0 {
                i -= 1;
                if list[i].sender.is_closed() {
                    list.remove(i);
                } else if list[i].sender.is_ready() {
                    let conn = list.remove(i);
                    conn.state.uses.fetch_add(1, Ordering::Relaxed);
                    conn.state.busy.store(true, Ordering::Relaxed);
                    return Some(conn);
                }
            }
            None
        })
    }

    /// Dials `endpoint` and starts the connection's task (upgrades allowed; closed after
    /// [`IDLE_TIMEOUT`] unused in a pool).
    async fn connect(&self, endpoint: &str) -> Result<H1Conn, BoxError> {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(endpoint)
            .path_and_query("/")
            .build()?;
        let io = tower::ServiceExt::oneshot(self.connector.clone(), uri)
            .await
            .map_err(Into::into)?;
        // Request bodies queued, not copied into one growing buffer, as on the serving
        // side (`server::serve`), and the read buffer bounded: hyper's default
        // (~400 KiB) would let one large response leave that much behind on every
        // pooled connection. A response head is held to the serving side's limit for
        // request heads; a larger one is a 502.
        let (sender, conn) = http1::Builder::new()
            .writev(true)
            .max_buf_size(MAX_HEADER_BYTES)
            .max_header_size(MAX_HEADER_BYTES)
            .handshake(io)
            .await?;
        let state = Arc::new(ConnState {
            uses: AtomicU64::new(1),
            busy: AtomicBool::new(true),
        });
        let conn = tokio::spawn(async move {
            // Closed idle or by the upstream: its buffers go back on this worker.
            let _release = crate::memory::ReleaseOnDrop;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        // A task of its own, so that the connection's task polls no timer per request.
        let watched = state.clone();
        tokio::spawn(async move {
            let mut seen = watched.uses.load(Ordering::Relaxed);
            loop {
                tokio::time::sleep(IDLE_TIMEOUT).await;
                if conn.is_finished() {
                    return;
                }
                let uses = watched.uses.load(Ordering::Relaxed);
                if uses == seen && !watched.busy.load(Ordering::Relaxed) {
                    // Dropping the connection closes it; its sender, idle in a pool,
                    // reads as closed from now on.
                    conn.abort();
                    return;
                }
                seen = uses;
            }
        });
        let home = INBOX.with(Arc::downgrade);
        Ok(H1Conn {
            sender,
            state,
            home,
        })
    }
}

/// The live HTTP/2 connection of every pool, by pool and endpoint, for the thread running
/// the request: requests on one worker share it without a lock.
type LiveMap = HashMap<(u64, Arc<str>), H2Conn, foldhash::fast::RandomState>;

thread_local! {
    static LIVE: RefCell<LiveMap> = RefCell::new(HashMap::default());
}

/// HTTP/2 connections to upstreams, dialed with `C`: one per endpoint per worker thread,
/// multiplexing that thread's requests.
struct H2Pool<C> {
    id: u64,
    connector: C,
    builder: http2::Builder<TokioExecutor>,
}

impl<C> std::fmt::Debug for H2Pool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Pool")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// One HTTP/2 connection: a sending half (each request uses a clone), and what its task
/// reads to close it idle.
#[derive(Clone)]
struct H2Conn {
    sender: http2::SendRequest<Body>,
    state: Arc<H2State>,
}

struct H2State {
    /// Requests sent so far: unchanged over a whole idle period means unused.
    uses: AtomicU64,
    /// Responses whose bodies are still held.
    in_flight: AtomicU64,
}

/// One stream in flight on a connection, for as long as it lives.
struct InFlight(Arc<H2State>);

impl InFlight {
    fn new(state: &Arc<H2State>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<C: Connect> H2Pool<C> {
    fn new(connector: C) -> Self {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        // As hyper-util's client had it: a timer for hyper's HTTP/2 timeouts, the
        // protocol's settings left at hyper's defaults but one: response heads up to
        // the 64 KiB the HTTP/1 client and both servers take (hyper's 16 KiB default
        // made a larger head a 502 on HTTP/2 only).
        builder.timer(TokioTimer::new());
        builder.max_header_list_size(MAX_HEADER_BYTES as u32);
        Self {
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
            connector,
            builder,
        }
    }

    /// This thread's connection to `endpoint` when it can take a request now; a closed
    /// one is forgotten, so the caller dials a new one.
    fn checkout(&self, endpoint: &Arc<str>) -> Option<H2Conn> {
        LIVE.with(|live| {
            let mut live = live.borrow_mut();
            let key = (self.id, endpoint.clone());
            let conn = live.get(&key)?;
            if !conn.sender.is_closed() && conn.sender.is_ready() {
                conn.state.uses.fetch_add(1, Ordering::Relaxed);
                return Some(conn.clone());
            }
            live.remove(&key);
            None
        })
    }

    /// Dials `endpoint`, starts the connection's task (closed after [`IDLE_TIMEOUT`]
    /// without a request or a stream in flight) and makes it this thread's connection to
    /// `endpoint` unless another request got a live one there first (this one then
    /// serves its request only, and closes when the request is done).
    async fn connect(&self, endpoint: &Arc<str>) -> Result<H2Conn, BoxError> {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(&**endpoint)
            .path_and_query("/")
            .build()?;
        let io = tower::ServiceExt::oneshot(self.connector.clone(), uri)
            .await
            .map_err(Into::into)?;
        let (mut sender, conn) = self.builder.handshake(io).await?;
        let state = Arc::new(H2State {
            uses: AtomicU64::new(1),
            in_flight: AtomicU64::new(0),
        });
        let conn = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        let watched = state.clone();
        tokio::spawn(async move {
            let mut seen = watched.uses.load(Ordering::Relaxed);
            loop {
                tokio::time::sleep(IDLE_TIMEOUT).await;
                if conn.is_finished() {
                    return;
                }
                let uses = watched.uses.load(Ordering::Relaxed);
                if uses == seen && watched.in_flight.load(Ordering::Relaxed) == 0 {
                    // Dropping the connection's task shuts the connection down; its
                    // sender reads as closed from then on.
                    conn.abort();
                    return;
                }
                seen = uses;
            }
        });
        // As hyper-util's client: usable once its task has it ready.
        sender.ready().await?;
        let conn = H2Conn { sender, state };
        // A thread being torn down keeps nothing: the connection serves this request.
        let _ = LIVE.try_with(|live| {
            let mut live = live.borrow_mut();
            let kept = live
                .entry((self.id, endpoint.clone()))
                .or_insert_with(|| conn.clone());
            if kept.sender.is_closed() || !kept.sender.is_ready() {
                *kept = conn.clone();
            }
        });
        Ok(conn)
    }
}

/// An upstream HTTP/2 response body, holding its stream's place in its connection's
/// in-flight count until dropped.
struct H2Body {
    body: Incoming,
    _in_flight: InFlight,
}

impl http_body::Body for H2Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // `Incoming` is `Unpin`, and so is this body.
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where a connection goes back to when its response body has ended.
struct Return {
    pool: u64,
    endpoint: Arc<str>,
    conn: H1Conn,
}

impl Return {
    /// Back into the pool of the thread that dialed the connection: this thread's idle
    /// list, or that thread's inbox.
    fn put(self) {
        self.conn.state.busy.store(false, Ordering::Relaxed);
        let at_home = INBOX
            .try_with(|inbox| std::ptr::eq(Arc::as_ptr(inbox), self.conn.home.as_ptr()))
            .unwrap_or(false);
        if at_home {
            let _ = IDLE.try_with(|idle| self.put_into(&mut idle.borrow_mut()));
            return;
        }
        // A home thread that has ended has no pool left: the connection just closes.
        if let Some(home) = self.conn.home.upgrade() {
            let mut held = home.returns.lock().unwrap_or_else(|e| e.into_inner());
            held.push(self);
            home.waiting.store(true, Ordering::Release);
        }
    }

    fn put_into(self, idle: &mut IdleMap) {
        let list = idle.entry((self.pool, self.endpoint)).or_default();
        // Connections closed while idle sink to the bottom: drop one per return.
        if list.first().is_some_and(|c| c.sender.is_closed()) {
            list.remove(0);
        }
        list.push(self.conn);
    }
}

/// An upstream response body that returns its connection to the pool once it has
/// ended. Dropped before its end, it drops the connection (hyper closes it).
struct PooledBody {
    body: Incoming,
    back: Option<Return>,
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // The server stops polling once a body says it has ended.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some(back) = self.back.take() {
            back.put();
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // `Incoming` is `Unpin`, and so is this body.
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => this.give_back(),
            Some(Ok(_)) if this.body.is_end_stream() => this.give_back(),
            // An error ends the connection's usefulness: it is dropped with the body.
            Some(Err(_)) => this.back = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn backend_name(backend: Option<&SelectedBackend>) -> Arc<str> {
    backend.map_or_else(|| Arc::from(""), |b| b.name.clone())
}

/// The URI an HTTP/2 request goes upstream with: scheme `http` (TLS, when the mesh dials,
/// is the connection's business), the authority the request names (the endpoint's when
/// it names none), its path and query.
fn upstream_uri(endpoint: &str, uri: &Uri) -> Result<Uri, BoxError> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(match uri.authority() {
        Some(a) => a.clone(),
        None => Authority::try_from(endpoint)?,
    });
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Ok(Uri::from_parts(parts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_without_a_certificate_yet_is_unready_not_a_connect_failure() {
        let err: BoxError = Box::new(ProxyError::NoWorkloadCertificate);
        assert_eq!(connect_failure(&*err), UpstreamErrorKind::Unready);
        let err: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(connect_failure(&*err), UpstreamErrorKind::ConnectFailure);
    }
    use http_body_util::BodyExt;
    use tokio::task::JoinHandle;

    /// An HTTP/2 server on 127.0.0.1 answering with the `:authority` it saw and whether a
    /// `Host` came beside it; the tasks of its connections, so that a test can cut them.
    struct H2Server {
        addr: Arc<str>,
        conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    }

    impl H2Server {
        async fn start() -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr: Arc<str> = listener.local_addr().unwrap().to_string().into();
            let conns = Arc::new(Mutex::new(Vec::new()));
            let kept = conns.clone();
            tokio::spawn(async move {
                while let Ok((io, _)) = listener.accept().await {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let seen = req.uri().authority().map(ToString::to_string);
                        let host = req.headers().contains_key(header::HOST);
                        let text = format!("{} host={host}", seen.unwrap_or_default());
                        Ok::<_, std::convert::Infallible>(Response::new(crate::body::full(text)))
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
                    let task = tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    kept.lock().unwrap().push(task);
                }
            });
            Self { addr, conns }
        }

        fn connections(&self) -> usize {
            self.conns.lock().unwrap().len()
        }

        fn cut(&self) {
            for conn in self.conns.lock().unwrap().iter() {
                conn.abort();
            }
        }
    }

    async fn send(
        up: &Upstream,
        endpoint: &Arc<str>,
        uri: &str,
    ) -> Result<Response<Body>, BoxError> {
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri(uri)
            .body(crate::body::empty())
            .unwrap();
        Routing::of_mut(req.extensions_mut()).endpoint = Some(Endpoint(endpoint.clone()));
        tower::ServiceExt::oneshot(up.clone(), req).await
    }

    async fn text(resp: Response<Body>) -> String {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Whether this thread's pooled connection of `up` to `endpoint` reads as closed.
    fn closed(up: &Upstream, endpoint: &Arc<str>) -> Option<bool> {
        let key = (up.clients.http2.id, endpoint.clone());
        LIVE.with(|live| live.borrow().get(&key).map(|c| c.sender.is_closed()))
    }

    /// An HTTP/1 upstream on its own runtime, counting the connections it accepts; each
    /// response's body ends only once `release` is notified.
    fn h1_server_with_held_bodies(
        rt: &tokio::runtime::Runtime,
        release: Arc<tokio::sync::Notify>,
    ) -> (Arc<str>, Arc<AtomicU64>) {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr: Arc<str> = listener.local_addr().unwrap().to_string().into();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        rt.spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let release = release.clone();
                let svc = hyper::service::service_fn(move |_: Request<Incoming>| {
                    let release = release.clone();
                    async move {
                        let frames = futures_util::stream::unfold(0, move |n| {
                            let release = release.clone();
                            async move {
                                match n {
                                    0 => Some((Ok(Frame::data(Bytes::from_static(b"a"))), 1)),
                                    1 => {
                                        release.notified().await;
                                        Some((Ok(Frame::data(Bytes::from_static(b"b"))), 2))
                                    }
                                    _ => None,
                                }
                            }
                        });
                        let body = http_body_util::StreamBody::new(frames);
                        Ok::<_, std::convert::Infallible>(Response::new(crate::body::boxed(
                            body.map_err(|e: std::convert::Infallible| match e {}),
                        )))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    #[test]
    fn an_http1_connection_handed_back_on_another_thread_goes_home() {
        let server_rt = tokio::runtime::Runtime::new().unwrap();
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, accepted) = h1_server_with_held_bodies(&server_rt, release.clone());
        let get = |up: &Upstream| h1_get(up, &addr);

        // Thread B: reads a response body to its end, which hands the connection back
        // there; then says whether B's own pool kept anything.
        let (to_b, at_b) =
            std::sync::mpsc::channel::<(Response<Body>, tokio::sync::oneshot::Sender<bool>)>();
        let release_b = release.clone();
        let b = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            for (resp, done) in at_b {
                rt.block_on(async {
                    release_b.notify_one();
                    assert_eq!(text(resp).await, "ab");
                });
                let kept = IDLE.with(|idle| idle.borrow().values().any(|l| !l.is_empty()));
                done.send(kept).unwrap();
            }
        });

        // Thread A dials, hands the response to B, and keeps its connection's task running
        // until B is done; its next request finds the connection back home.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let up = Upstream::new();
        rt.block_on(async {
            for round in 0..3 {
                let resp = get(&up).await.unwrap();
                let (done, finished) = tokio::sync::oneshot::channel();
                to_b.send((resp, done)).unwrap();
                let kept_at_b = finished.await.unwrap();
                assert!(!kept_at_b, "round {round}: B's pool kept A's connection");
            }
        });
        drop(to_b);
        b.join().unwrap();
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "every request went over the one connection A dialed"
        );
    }

    #[tokio::test]
    async fn h2_keeps_the_called_authority_over_one_connection() {
        let server = H2Server::start().await;
        let up = Upstream::new();
        let first = send(&up, &server.addr, "http://orders/x").await.unwrap();
        assert_eq!(text(first).await, "orders host=false");
        let port = send(&up, &server.addr, "http://orders:8080/x?q")
            .await
            .unwrap();
        assert_eq!(text(port).await, "orders:8080 host=false");
        // A request naming no authority (transparent, original destination) names the
        // endpoint.
        let none = send(&up, &server.addr, "/x").await.unwrap();
        assert_eq!(text(none).await, format!("{} host=false", server.addr));
        assert_eq!(server.connections(), 1, "one multiplexed connection");
    }

    #[tokio::test]
    async fn h2_replaces_a_closed_connection() {
        let server = H2Server::start().await;
        let up = Upstream::new();
        let resp = send(&up, &server.addr, "http://orders/x").await.unwrap();
        assert_eq!(text(resp).await, "orders host=false");
        server.cut();
        // Wait until the client has seen the close, so that the next request meets a
        // closed connection rather than racing the close.
        tokio::time::timeout(Duration::from_secs(30), async {
            while closed(&up, &server.addr) != Some(true) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the cut connection reads as closed");
        let resp = send(&up, &server.addr, "http://orders/x").await.unwrap();
        assert_eq!(text(resp).await, "orders host=false");
        assert_eq!(server.connections(), 2);
        assert_eq!(
            closed(&up, &server.addr),
            Some(false),
            "the new one is pooled"
        );
    }

    #[tokio::test]
    async fn h2_connect_failure_is_typed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: Arc<str> = listener.local_addr().unwrap().to_string().into();
        drop(listener);
        let err = send(&Upstream::new(), &addr, "http://orders/x")
            .await
            .expect_err("nothing listens");
        match err.downcast_ref::<ProxyError>() {
            Some(ProxyError::Upstream { source, .. }) => {
                assert_eq!(source.kind, UpstreamErrorKind::ConnectFailure, "{err}");
            }
            _ => panic!("not an upstream error: {err}"),
        }
    }

    #[tokio::test]
    async fn h2_idle_connection_closes_but_not_under_a_stream() {
        let server = H2Server::start().await;
        let up = Upstream::new();
        let held = send(&up, &server.addr, "http://orders/x").await.unwrap();
        tokio::time::pause();
        // A response body still held is a stream in flight: two idle periods pass, each
        // looked at, and the connection stays.
        for _ in 0..2 {
            advance_and_settle(IDLE_TIMEOUT + Duration::from_secs(1)).await;
        }
        assert_eq!(closed(&up, &server.addr), Some(false));
        assert_eq!(text(held).await, "orders host=false");
        advance_and_settle(IDLE_TIMEOUT + Duration::from_secs(1)).await;
        assert_eq!(closed(&up, &server.addr), Some(true), "closed once idle");
    }

    /// An HTTP/1 upstream answering "ok": its address, a permit per connection that
    /// ended, and its connections' tasks, so that a test can cut them.
    async fn h1_server() -> (
        Arc<str>,
        Arc<tokio::sync::Semaphore>,
        Arc<Mutex<Vec<JoinHandle<()>>>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: Arc<str> = listener.local_addr().unwrap().to_string().into();
        let ended = Arc::new(tokio::sync::Semaphore::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (count, kept) = (ended.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(|_: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(crate::body::full("ok")))
                });
                let count = count.clone();
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
                kept.lock().unwrap().push(tokio::spawn(async move {
                    let _ = conn.await;
                    count.add_permits(1);
                }));
            }
        });
        (addr, ended, conns)
    }

    /// Moves paused time on by `by` and lets the tasks it woke (idle watchers) run.
    async fn advance_and_settle(by: Duration) {
        tokio::time::advance(by).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    /// An HTTP/1.1 GET of `http://orders/x` through `up` to `endpoint`.
    fn h1_get(up: &Upstream, endpoint: &Arc<str>) -> tower::util::Oneshot<Upstream, Request<Body>> {
        let mut req = Request::builder()
            .uri("http://orders/x")
            .body(crate::body::empty())
            .unwrap();
        Routing::of_mut(req.extensions_mut()).endpoint = Some(Endpoint(endpoint.clone()));
        tower::ServiceExt::oneshot(up.clone(), req)
    }

    /// This thread's idle HTTP/1 connections of `up` to `endpoint` that are open.
    fn idle_h1(up: &Upstream, endpoint: &Arc<str>) -> usize {
        let key = (up.clients.http1.id, endpoint.clone());
        IDLE.with(|idle| {
            idle.borrow()
                .get(&key)
                .map_or(0, |l| l.iter().filter(|c| !c.sender.is_closed()).count())
        })
    }

    #[tokio::test]
    async fn h1_idle_connection_closes_but_not_under_a_body() {
        let (addr, ended, _) = h1_server().await;
        let up = Upstream::new();
        let get = || h1_get(&up, &addr);
        // Two exchanges over one connection, which the second's body, read to its end,
        // hands back to the pool.
        assert_eq!(text(get().await.unwrap()).await, "ok");
        let held = get().await.unwrap();
        assert_eq!(
            idle_h1(&up, &addr),
            0,
            "the connection is in the response's hands"
        );
        tokio::time::pause();
        // A body still held keeps its connection through two idle periods, each looked
        // at (one advance over both would wake the watcher once).
        for _ in 0..2 {
            advance_and_settle(IDLE_TIMEOUT + Duration::from_secs(1)).await;
        }
        assert_eq!(ended.available_permits(), 0);
        assert_eq!(text(held).await, "ok");
        assert_eq!(
            idle_h1(&up, &addr),
            1,
            "back in the pool once its body ended"
        );
        advance_and_settle(IDLE_TIMEOUT + Duration::from_secs(1)).await;
        assert_eq!(idle_h1(&up, &addr), 0, "closed once idle");
        // The upstream sees the connection end.
        let _ = ended.acquire().await.unwrap();
    }

    /// A response body read in part is still in the request's hands: its connection is
    /// neither handed back nor closed as idle, however many idle periods pass, and goes
    /// back to the pool once the body has ended.
    #[test]
    fn h1_a_body_read_in_part_keeps_its_connection_through_idle_periods() {
        let server_rt = tokio::runtime::Runtime::new().unwrap();
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, accepted) = h1_server_with_held_bodies(&server_rt, release.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let up = Upstream::new();
            // The second exchange goes over the pooled connection of the first.
            release.notify_one();
            assert_eq!(text(h1_get(&up, &addr).await.unwrap()).await, "ab");
            let mut held = h1_get(&up, &addr).await.unwrap().into_body();
            let first = held.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(&first[..], b"a");
            assert_eq!(idle_h1(&up, &addr), 0, "not handed back mid-body");
            tokio::time::pause();
            for _ in 0..3 {
                advance_and_settle(IDLE_TIMEOUT + Duration::from_secs(1)).await;
            }
            release.notify_one();
            let rest = held
                .collect()
                .await
                .expect("the body is not cut")
                .to_bytes();
            assert_eq!(&rest[..], b"b");
            assert_eq!(idle_h1(&up, &addr), 1, "back in the pool once ended");
        });
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection");
    }

    /// The HTTP/1 response names the backend the split chose, and carries none of the
    /// request's own extensions (their map is the response's now: its routing entry
    /// reused when it is alone, the map emptied first when it is not).
    #[tokio::test]
    async fn h1_response_names_its_backend_and_nothing_of_the_request() {
        let (addr, _, _) = h1_server().await;
        for with_peer in [false, true] {
            let mut req = Request::builder()
                .uri("http://orders/x")
                .body(crate::body::empty())
                .unwrap();
            *Routing::of_mut(req.extensions_mut()) = Routing {
                backend: Some(SelectedBackend {
                    name: "canary".into(),
                    index: 1,
                }),
                deadline: Some(sluice_filters::extensions::Deadline(
                    tokio::time::Instant::now() + Duration::from_secs(5),
                )),
                endpoint: Some(Endpoint(addr.clone())),
                body: None,
            };
            if with_peer {
                req.extensions_mut()
                    .insert(sluice_filters::extensions::PeerIdentity(
                        "spiffe://a/b".into(),
                    ));
            }
            let resp = tower::ServiceExt::oneshot(Upstream::new(), req)
                .await
                .unwrap();
            let routing = Routing::of(resp.extensions()).unwrap();
            let backend = routing.backend.as_ref().unwrap();
            assert_eq!((&*backend.name, backend.index), ("canary", 1));
            assert_eq!((routing.deadline, &routing.endpoint), (None, &None));
            assert_eq!(resp.extensions().len(), 1, "only the backend");
            assert_eq!(text(resp).await, "ok");
        }
    }

    #[tokio::test]
    async fn h1_connection_the_upstream_closed_while_idle_is_replaced() {
        let (addr, _, conns) = h1_server().await;
        let up = Upstream::new();
        let get = || h1_get(&up, &addr);
        assert_eq!(text(get().await.unwrap()).await, "ok");
        assert_eq!(idle_h1(&up, &addr), 1);
        // The upstream closes the idle connection (as its own idle timeout would): the
        // next request does not fail but goes over a new connection.
        let first = conns.lock().unwrap().pop().unwrap();
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(text(get().await.unwrap()).await, "ok");
        assert_eq!(
            conns.lock().unwrap().len(),
            1,
            "a second connection was dialed"
        );
        assert_eq!(
            idle_h1(&up, &addr),
            1,
            "the closed one is gone from the pool"
        );
    }

    #[test]
    fn keeps_the_called_authority() {
        let uri: Uri = "https://orders:80/a/b?x=1".parse().unwrap();
        let up = upstream_uri("127.0.0.1:9000", &uri).unwrap();
        assert_eq!(up, "http://orders:80/a/b?x=1");
        let uri: Uri = "http://orders".parse().unwrap();
        let up = upstream_uri("127.0.0.1:9000", &uri).unwrap();
        assert_eq!(up, "http://orders/");
    }

    #[test]
    fn falls_back_to_the_endpoint_without_an_authority() {
        let uri: Uri = "/p?q".parse().unwrap();
        let up = upstream_uri("h:1", &uri).unwrap();
        assert_eq!(up, "http://h:1/p?q");
    }
}
