//! A real upstream HTTP server for the tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::BoxError;

/// Which protocols an [`Upstream`] speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 with prior knowledge (h2c) only.
    Http2,
    /// Either, detected per connection.
    Auto,
}

/// How an [`Upstream`] delays every answer, to stand for a backend in trouble.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stall {
    /// Answers at once.
    #[default]
    None,
    /// Waits this long before answering.
    Delay(Duration),
    /// Never answers, until the stall is lifted.
    Hang,
}

#[derive(Debug)]
struct State {
    name: String,
    requests: AtomicU64,
    /// Connections accepted.
    connections: AtomicU64,
    held: AtomicU64,
    gate: watch::Sender<bool>,
    stall: watch::Sender<Stall>,
    /// Every this many requests one is answered 500 (0: never).
    fail_every: AtomicU64,
}

/// A running upstream server.
///
/// Every answer carries `x-upstream: <name>` and what the upstream saw:
/// `x-seen-method`, `x-seen-path`, `x-seen-host` (Host or `:authority`),
/// `x-seen-version`, `x-seen-target` (the request target as it arrived: origin form
/// over HTTP/1 unless the sender wrote absolute form; always absolute over HTTP/2), and
/// `x-seen-traceparent`, `x-seen-b3` and `x-seen-b3-parent` (`x-b3-parentspanid`) when
/// the request had them, and `x-seen-tracestate` (`[value]`, or `absent`). Paths with a
/// behaviour:
/// - `/echo…` streams the request body back as it arrives;
/// - `/sink…` reads the body as it streams, keeping none, and answers its length
///   (body and `x-body-bytes`);
/// - `/status/NNN` answers status NNN;
/// - `/head-bytes/N` answers with an `x-filler` header of N bytes (an oversized head);
/// - `/hold…` waits until [`Upstream::release_held`] is called, then answers `released`;
/// - `/refused…` over HTTP/2 is reset with `REFUSED_STREAM` (counted as a request);
/// - `/reset…` over HTTP/2 is reset with `INTERNAL_ERROR`, a stream the upstream may
///   have processed (counted as a request);
/// - `/upgrade…` with an `Upgrade` offer switches (101) to the first protocol offered,
///   whatever it is (to `NAME` for `/upgrade…/to/NAME`, whatever was offered), and
///   echoes every byte of the tunnel back; without one it answers with the upstream's
///   name;
/// - anything else answers with the upstream's name.
///
/// `x-seen-upgrade` and `x-seen-http2-settings` carry those request headers when present.
///
/// [`Upstream::set_stall`] delays every answer, or holds them all, until lifted.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// An HTTP/1.1-only upstream called `name`.
    pub async fn http1(name: &str) -> Self {
        Self::start(name, Protocol::Http1).await
    }

    /// An h2c-only upstream called `name`.
    pub async fn h2(name: &str) -> Self {
        Self::start(name, Protocol::Http2).await
    }

    /// An upstream called `name` speaking both HTTP/1.1 and h2c.
    pub async fn auto(name: &str) -> Self {
        Self::start(name, Protocol::Auto).await
    }

    /// Starts an upstream on an ephemeral port of 127.0.0.1.
    pub async fn start(name: &str, protocol: Protocol) -> Self {
        Self::start_on(name, protocol, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts an upstream on `addr`, e.g. the address of one that was shut down, to bring
    /// a backend back where it was.
    pub async fn start_on(name: &str, protocol: Protocol, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind an upstream on {addr}: {e}"));
        let addr = listener.local_addr().expect("upstream address");
        let state = Arc::new(State {
            name: name.to_string(),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            held: AtomicU64::new(0),
            gate: watch::channel(false).0,
            stall: watch::channel(Stall::None).0,
            fail_every: AtomicU64::new(0),
        });
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            match protocol {
                Protocol::Http1 => builder = builder.http1_only(),
                Protocol::Http2 => builder = builder.http2_only(),
                Protocol::Auto => {}
            }
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
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let st = st.clone();
                    async move {
                        if req.version() == hyper::Version::HTTP_2
                            && req.uri().path().starts_with("/refused")
                        {
                            st.requests.fetch_add(1, Ordering::SeqCst);
                            // hyper resets the stream with the reason of an h2 error.
                            return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
                        }
                        if req.version() == hyper::Version::HTTP_2
                            && req.uri().path().starts_with("/reset")
                        {
                            st.requests.fetch_add(1, Ordering::SeqCst);
                            return Err(h2::Error::from(h2::Reason::INTERNAL_ERROR));
                        }
                        Ok(handle(st, req).await)
                    }
                });
                let builder = builder.clone();
                conns.spawn(async move {
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
            conns.abort_all();
        });
        Self {
            addr,
            state,
            stop: Some(stop_tx),
            task,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its name, as answered in `x-upstream`.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// How many requests it has received.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// How many connections it has accepted.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// How many `/hold` requests are waiting to be released.
    pub fn held(&self) -> u64 {
        self.state.held.load(Ordering::SeqCst)
    }

    /// A client that gives up: sends `GET /hold` for `host` through `proxy` and goes
    /// away (its connection closed) once this upstream holds the request.
    pub async fn abandon_held_request(&self, proxy: SocketAddr, host: &str) {
        let held = self.held();
        let host = host.to_string();
        let client = tokio::spawn(async move {
            let mut conn = crate::HttpConn::h1(proxy).await.unwrap();
            let _ = conn.get(&host, "/hold").await;
        });
        crate::wait_until("the upstream holds the request", crate::WAIT, || async {
            self.held() > held
        })
        .await;
        client.abort();
        let _ = client.await;
    }

    /// Lets every `/hold` request, present and future, be answered.
    pub fn release_held(&self) {
        self.state.gate.send_replace(true);
    }

    /// Answers 500 to one request in every `n` from now on (0: to none).
    pub fn set_fail_every(&self, n: u64) {
        self.state.fail_every.store(n, Ordering::SeqCst);
    }

    /// Delays (or stops) every answer from now on; `Stall::None` lifts it, and answers
    /// hanging until then go out.
    pub fn set_stall(&self, stall: Stall) {
        self.state.stall.send_replace(stall);
    }

    /// Stops the server and closes its connections.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type RespBody = BoxBody<Bytes, BoxError>;

fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<RespBody> {
    let n = state.requests.fetch_add(1, Ordering::SeqCst);
    let every = state.fail_every.load(Ordering::SeqCst);
    if every > 0 && n.is_multiple_of(every) {
        let mut r = Response::new(full("failing on purpose"));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r.headers_mut()
            .insert("x-upstream", state.name.parse().expect("a header value"));
        return r;
    }
    let stall = *state.stall.borrow();
    match stall {
        Stall::None => {}
        Stall::Delay(d) => tokio::time::sleep(d).await,
        Stall::Hang => {
            let mut lifted = state.stall.subscribe();
            let _ = lifted.wait_for(|s| *s != Stall::Hang).await;
        }
    }
    let path = req.uri().path().to_string();
    let seen_host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let seen_header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let upgrade = seen_header("upgrade");
    let seen = [
        ("x-seen-upgrade", upgrade.clone()),
        ("x-seen-http2-settings", seen_header("http2-settings")),
        ("x-seen-traceparent", traceparent),
        ("x-seen-b3", seen_header("b3")),
        ("x-seen-b3-parent", seen_header("x-b3-parentspanid")),
        (
            "x-seen-tracestate",
            req.headers().get("tracestate").map_or_else(
                || "absent".to_string(),
                |v| format!("[{}]", v.to_str().unwrap_or_default()),
            ),
        ),
        ("x-upstream", state.name.clone()),
        ("x-seen-method", req.method().to_string()),
        ("x-seen-path", path.clone()),
        ("x-seen-host", seen_host),
        ("x-seen-version", format!("{:?}", req.version())),
        ("x-seen-target", req.uri().to_string()),
    ];

    let mut resp = if path.starts_with("/upgrade") && !upgrade.is_empty() {
        let mut req = req;
        let switched = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = switched.await {
                let mut io = TokioIo::new(io);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let protocol = match path.split_once("/to/") {
            Some((_, named)) => named.to_string(),
            None => upgrade
                .split(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(hyper::header::CONNECTION, "upgrade".parse().expect("token"));
        if let Ok(v) = protocol.parse() {
            r.headers_mut().insert(hyper::header::UPGRADE, v);
        }
        r
    } else if path.starts_with("/echo") {
        Response::new(req.into_body().map_err(BoxError::from).boxed())
    } else if path.starts_with("/sink") {
        let mut body = req.into_body();
        let mut n = 0u64;
        let mut broken = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        let mut r = Response::new(full(n.to_string()));
        if broken {
            *r.status_mut() = StatusCode::BAD_REQUEST;
        }
        r.headers_mut()
            .insert("x-body-bytes", n.to_string().parse().expect("digits"));
        r
    } else if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        let _ = req.into_body().collect().await;
        let mut r = Response::new(full(code.as_str().to_string()));
        *r.status_mut() = code;
        r
    } else if let Some(n) = path
        .strip_prefix("/head-bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        let _ = req.into_body().collect().await;
        let mut r = Response::new(full(state.name.clone()));
        r.headers_mut()
            .insert("x-filler", "h".repeat(n).parse().expect("letters"));
        r
    } else if path.starts_with("/hold") {
        let _ = req.into_body().collect().await;
        state.held.fetch_add(1, Ordering::SeqCst);
        let mut gate = state.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        state.held.fetch_sub(1, Ordering::SeqCst);
        Response::new(full("released"))
    } else {
        let _ = req.into_body().collect().await;
        Response::new(full(state.name.clone()))
    };
    for (k, v) in seen {
        if v.is_empty() && k != "x-seen-host" {
            continue;
        }
        if let Ok(v) = v.parse() {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

/// Serves `listener` as a TCP echo: every byte read is written back until the client
/// closes. With `banner`, it speaks first on every connection (as MySQL or SMTP
/// servers do).
pub fn tcp_echo(listener: TcpListener, banner: Option<&'static [u8]>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Some(b) = banner
                    && s.write_all(b).await.is_err()
                {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

/// Serves `listener` as a TCP sink that never answers: it reads every connection
/// until the other side closes it, and counts the connections open at the moment (an
/// upstream still waiting for a request body). Returns the count.
pub fn tcp_sink(listener: TcpListener) -> Arc<AtomicU64> {
    let open = Arc::new(AtomicU64::new(0));
    let count = open.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
                count.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    open
}

/// Serves `listener` as an HTTP/1.1 server written byte by byte, for answers hyper's
/// server would not send: `GET /gzip` gets a body coded gzip-then-chunked, any other
/// request a plain chunked one, each on a connection closed after it. Returns how many
/// request heads it read (a refused request must never arrive).
pub fn tcp_coded(listener: TcpListener) -> Arc<AtomicU64> {
    let seen = Arc::new(AtomicU64::new(0));
    let counted = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let coding = if head.starts_with(b"GET /gzip ") {
                    "gzip, chunked"
                } else {
                    "chunked"
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    seen
}
