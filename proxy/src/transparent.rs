//! Transparent mode: connections the `init` redirect sent to the proxy, taken apart per
//! connection before any HTTP is served.
//!
//! After the redirect, an accepted connection's local address is the proxy's port;
//! [`original_dst`] reads where the application meant to go (`SO_ORIGINAL_DST`, kept by
//! conntrack). A connection made to the listener itself (explicit mode) has no original
//! destination, or has the listener's own address, and is served exactly as before.
//!
//! Outbound (`Intercept::Outbound`), a redirected connection is sniffed once:
//! [`sniff`] reads just enough of the client's first bytes to tell HTTP/1, the HTTP/2
//! preface or anything else apart; a protocol in which the server speaks first (MySQL,
//! SMTP) sends nothing, so the sniff gives up after [`SNIFF_WAIT`] and calls it opaque.
//! A client that has begun sending is a client-first protocol, so a pause inside its
//! first bytes (`GE`, then `T / ...`) is waited out for up to 10 s (`HEAD_WAIT`): taking
//! that pause for a server-first protocol would pass an HTTP request through ungoverned.
//!
//! - Not HTTP: [`passthrough`] replays the sniffed bytes to the original destination and
//!   copies both ways untouched.
//! - HTTP/1: the first request head is read (with `httparse`, hyper's own parser) to learn
//!   its authority, by the edge's rule (`authority.rs`): the target's, else `Host`; a
//!   head with several `Host` lines goes to the edge, which refuses it. A host no policy
//!   claims is passed through as opaque TCP, byte for byte, for the whole connection
//!   (Upgrade and CONNECT included); a governed host hands the connection, its read
//!   bytes replayed (`Prefixed`), to hyper and the route stacks. Should a later request on that keep-alive connection name a host no policy
//!   claims, it is forwarded to the original destination without governance.
//! - HTTP/2: the authority sits in HPACK-compressed frames, so the connection goes to
//!   hyper and each request is decided alone: governed hosts through their stacks, the
//!   rest to the original destination without governance.
//!
//! Inbound (`Intercept::Inbound`), a redirected connection to the application's port
//! (`--app`) is served as HTTP through the inbound stack to `--app`; a connection to any
//! other port of the pod passes through untouched to the pod address it was sent to,
//! never to `127.0.0.1`: a server bound to loopback inside the pod stays private, as it
//! would be without the mesh. A connection whose original destination is one of the
//! proxy's own ports (its outbound listener would otherwise make the pod an egress for
//! any peer) or a loopback address is closed at once and counted as `refused`.
//!
//! The cost is one `getsockopt` per connection, plus the sniff for redirected ones; a
//! request on an established connection pays nothing more than in explicit mode.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use sluice_filters::extensions::Endpoint;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::metrics::TcpMetrics;
use crate::policy::PolicyStore;

/// How long a redirected connection may stay silent before it is taken for a
/// server-first protocol and passed through.
pub const SNIFF_WAIT: Duration = Duration::from_millis(200);
/// How long the first HTTP/1 request head may take to arrive once it has begun.
const HEAD_WAIT: Duration = Duration::from_secs(10);
/// Largest first request head read to learn its authority; a longer one goes to hyper,
/// which decides per request.
const MAX_HEAD: usize = 64 * 1024;
/// Headers `httparse` may see in the first request head.
const MAX_HEADERS: usize = 100;

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token taken as the start of an HTTP/1 request line: the registered
/// methods are at most 17 bytes (`BASELINE-CONTROL`), and a longer token is not HTTP.
const MAX_METHOD: usize = 24;

/// What the first bytes of a connection look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 client preface.
    Http2,
    /// Anything else, passed through as TCP.
    Opaque,
}

/// The address the client connected to before the iptables redirect (IPv4).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    socket2::SockRef::from(stream)
        .original_dst_v4()?
        .as_socket()
        .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST is not an IP address"))
}

/// Classifies a prefix; `None` while more bytes could still change the answer.
///
/// An HTTP/1 request line is any method token (not only the common methods: `PURGE`,
/// WebDAV's `PROPFIND` and `REPORT` go to governed hosts too, and passing them through
/// would skip every policy), a space, and a target in one of the request forms: origin
/// (`/`), asterisk (`*`), absolute (`http://`, `https://`), or authority for `CONNECT`.
/// Text protocols whose first word is followed by something else (`INVITE sip:`,
/// `DESCRIBE rtsp:`) stay opaque.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let Some(space) = prefix.iter().position(|&b| !is_tchar(b)) else {
        // Still one token: a method if a space comes in time.
        return if prefix.len() <= MAX_METHOD {
            None
        } else {
            Some(Protocol::Opaque)
        };
    };
    if space == 0 || space > MAX_METHOD || prefix[space] != b' ' {
        return Some(Protocol::Opaque);
    }
    let (method, target) = (&prefix[..space], &prefix[space + 1..]);
    if method == b"CONNECT" {
        return Some(Protocol::Http1);
    }
    match target.first() {
        None => None,
        Some(b'/' | b'*') => Some(Protocol::Http1),
        Some(_) => {
            // Absolute form, in either case of the scheme: whole, still possible, or not.
            let seen = |scheme: &[u8]| {
                let k = target.len().min(scheme.len());
                target[..k]
                    .eq_ignore_ascii_case(&scheme[..k])
                    .then_some(k == scheme.len())
            };
            match (seen(b"http://"), seen(b"https://")) {
                (Some(true), _) | (_, Some(true)) => Some(Protocol::Http1),
                (None, None) => Some(Protocol::Opaque),
                _ => None,
            }
        }
    }
}

/// An RFC 9110 token character (what a method is made of).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads the client's first bytes until [`classify`] decides, the client sends nothing
/// for `wait`, it closes, or 10 s (`HEAD_WAIT`) after its first byte the prefix is still
/// undecided; returns the verdict and the bytes read, which the caller must send on
/// first.
pub async fn sniff(stream: &mut TcpStream, wait: Duration) -> io::Result<(Protocol, Vec<u8>)> {
    let mut prefix = Vec::with_capacity(H2_PREFACE.len());
    let mut buf = [0u8; 64];
    let mut deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(p) = classify(&prefix)
            && !prefix.is_empty()
        {
            return Ok((p, prefix));
        }
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(r) => r?,
            // Silent: a server-first protocol, the client waiting for the server to
            // speak. Begun and stalled past HEAD_WAIT: nothing HTTP would do that, and
            // Linkerd's detection gives up the same way.
            Err(_) => return Ok((Protocol::Opaque, prefix)),
        };
        if n == 0 {
            return Ok((Protocol::Opaque, prefix));
        }
        if prefix.is_empty() {
            deadline = tokio::time::Instant::now() + HEAD_WAIT;
        }
        prefix.extend_from_slice(&buf[..n]);
    }
}

/// Connects to `dst`, sends `prefix`, then copies both ways until both sides close;
/// returns the bytes sent each way after the prefix (client → server, server → client).
/// The connection counts into `tcp`: open while it lasts, its bytes as they flow
/// (the prefix once sent on), its outcome when it ends.
pub async fn passthrough(
    client: TcpStream,
    prefix: &[u8],
    dst: SocketAddr,
    tcp: &TcpMetrics,
) -> io::Result<(u64, u64)> {
    let open = Open::new(tcp);
    let mut upstream = match TcpStream::connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            open.end(&tcp.connect_error);
            return Err(e);
        }
    };
    let _ = upstream.set_nodelay(true);
    let copied = async {
        upstream.write_all(prefix).await?;
        tcp.sent.inc_by(prefix.len() as u64);
        let mut client = Counted::new(client, &tcp.sent);
        let mut upstream = Counted::new(upstream, &tcp.received);
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
    }
    .await;
    open.end(match copied {
        Ok(_) => &tcp.passthrough,
        Err(_) => &tcp.error,
    });
    copied
}

/// One passed-through connection in `sluice_tcp_open_connections`; a connection dropped
/// before it ended (cut at shutdown) counts as an `error`.
struct Open<'a> {
    tcp: &'a TcpMetrics,
    ended: bool,
}

impl<'a> Open<'a> {
    fn new(tcp: &'a TcpMetrics) -> Self {
        tcp.open.inc();
        Self { tcp, ended: false }
    }

    fn end(mut self, outcome: &IntCounter) {
        outcome.inc();
        self.ended = true;
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.tcp.open.dec();
        if !self.ended {
            self.tcp.error.inc();
        }
    }
}

/// A stream that adds every byte read from it to a counter, so a long-lived
/// connection's bytes show up while it lasts, not only when it closes.
struct Counted<'a, S> {
    inner: S,
    read: &'a IntCounter,
}

impl<'a, S> Counted<'a, S> {
    fn new(inner: S, read: &'a IntCounter) -> Self {
        Self { inner, read }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read.inc_by(n as u64);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The original destination of a redirected connection, carried in every request's
/// extensions so the edge can send ungoverned requests there.
#[derive(Clone, Debug)]
pub(crate) struct OriginalDst {
    /// Where the application meant to go.
    pub(crate) addr: SocketAddr,
    /// The same, as the connector's endpoint (built once per connection).
    pub(crate) endpoint: Endpoint,
}

impl OriginalDst {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            endpoint: Endpoint(Arc::from(addr.to_string())),
        }
    }
}

/// What a listener does with a connection before HTTP is served on it.
#[derive(Clone, Debug)]
pub(crate) enum Intercept {
    /// The outbound listener: redirected connections are sniffed and passed through
    /// unless HTTP to a governed host.
    Outbound {
        /// Which hosts are governed.
        store: PolicyStore,
        /// The series passed-through connections count into.
        tcp: Arc<TcpMetrics>,
    },
    /// The inbound listener: redirected connections to ports other than the
    /// application's pass through to the address they were sent to.
    Inbound {
        /// The `--app` port.
        app_port: u16,
        /// The proxy's own listener ports, never reached from the network this way.
        proxy_ports: Arc<[u16]>,
        /// The series passed-through connections count into.
        tcp: Arc<TcpMetrics>,
    },
}

impl Intercept {
    /// Serves `stream` as opaque TCP itself and returns `None`, or returns it (with any
    /// bytes already read) for hyper, with the original destination when redirected.
    pub(crate) async fn accept(
        &self,
        mut stream: TcpStream,
    ) -> Option<(Prefixed<TcpStream>, Option<OriginalDst>)> {
        let Some(dst) = redirected(&stream) else {
            return Some((Prefixed::new(stream, Vec::new()), None));
        };
        match self {
            Intercept::Inbound {
                app_port,
                proxy_ports,
                tcp,
            } => match inbound_verdict(dst, *app_port, proxy_ports) {
                InboundVerdict::App => Some((Prefixed::new(stream, Vec::new()), None)),
                InboundVerdict::Relay => {
                    relay(stream, Vec::new(), dst, tcp).await;
                    None
                }
                InboundVerdict::Refuse => {
                    debug!(%dst, "inbound connection to a proxy port or loopback refused");
                    tcp.refused.inc();
                    None
                }
            },
            Intercept::Outbound { store, tcp } => {
                let (protocol, mut prefix) = match sniff(&mut stream, SNIFF_WAIT).await {
                    Ok(p) => p,
                    Err(e) => {
                        debug!(%dst, error = %e, "connection ended before its first bytes");
                        tcp.error.inc();
                        return None;
                    }
                };
                let governed = match protocol {
                    Protocol::Opaque => false,
                    Protocol::Http2 => true,
                    Protocol::Http1 => match read_head(&mut stream, &mut prefix).await {
                        Head::Authority(host) => store.current().has_host(&host),
                        Head::NotHttp => false,
                        // Too long or too slow to tell here: hyper decides per request.
                        Head::Undecided => true,
                    },
                };
                if governed {
                    Some((Prefixed::new(stream, prefix), Some(OriginalDst::new(dst))))
                } else {
                    relay(stream, prefix, dst, tcp).await;
                    None
                }
            }
        }
    }
}

/// What the inbound listener does with a redirected connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InboundVerdict {
    /// HTTP through the inbound stack to `--app`.
    App,
    /// Opaque TCP to the original destination, the pod address.
    Relay,
    /// Closed: a proxy port or a loopback destination.
    Refuse,
}

fn inbound_verdict(dst: SocketAddr, app_port: u16, proxy_ports: &[u16]) -> InboundVerdict {
    if dst.ip().is_loopback() || dst.ip().is_unspecified() || proxy_ports.contains(&dst.port()) {
        InboundVerdict::Refuse
    } else if dst.port() == app_port {
        InboundVerdict::App
    } else {
        InboundVerdict::Relay
    }
}

/// The original destination, unless the connection was made to the listener itself.
fn redirected(stream: &TcpStream) -> Option<SocketAddr> {
    let dst = original_dst(stream).ok()?;
    (Some(dst) != stream.local_addr().ok()).then_some(dst)
}

async fn relay(client: TcpStream, prefix: Vec<u8>, dst: SocketAddr, tcp: &TcpMetrics) {
    match passthrough(client, &prefix, dst, tcp).await {
        Ok((up, down)) => {
            debug!(%dst, up = up + prefix.len() as u64, down, "opaque connection closed")
        }
        Err(e) => debug!(%dst, error = %e, "opaque connection ended with an error"),
    }
}

/// What the first HTTP/1 request head says.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// The authority it names: absolute-form or CONNECT target first, then `Host`.
    Authority(String),
    /// Its bytes are not an HTTP/1 request.
    NotHttp,
    /// Complete head not seen within [`MAX_HEAD`] bytes or [`HEAD_WAIT`].
    Undecided,
}

/// Reads on until the first request head is complete; every byte read is left in `prefix`.
async fn read_head(stream: &mut TcpStream, prefix: &mut Vec<u8>) -> Head {
    let deadline = tokio::time::Instant::now() + HEAD_WAIT;
    loop {
        match parse_head(prefix) {
            Some(head) => return head,
            None if prefix.len() >= MAX_HEAD => return Head::Undecided,
            None => {}
        }
        prefix.reserve(4096);
        match tokio::time::timeout_at(deadline, stream.read_buf(prefix)).await {
            Ok(Ok(n)) if n > 0 => {}
            // Closed, failed or slow: hyper will tell the client what went wrong.
            _ => return Head::Undecided,
        }
    }
}

/// The head's authority, `None` while incomplete.
fn parse_head(bytes: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Partial) => None,
        Ok(httparse::Status::Complete(_)) => {
            let mut hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"));
            let first = hosts.next();
            if hosts.next().is_some() {
                // Ambiguous: the edge refuses it (`authority.rs`), never passes it on.
                return Some(Head::Undecided);
            }
            let target = req
                .path
                .and_then(|p| p.parse::<http::Uri>().ok())
                .and_then(|u| u.authority().map(|a| a.as_str().to_owned()));
            let host = target.or_else(|| {
                first
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(|h| h.trim().to_owned())
            });
            Some(host.map_or(Head::Undecided, Head::Authority))
        }
        Err(httparse::Error::TooManyHeaders) => Some(Head::Undecided),
        Err(_) => Some(Head::NotHttp),
    }
}

/// A stream that yields `prefix` before reading on from `inner`: the bytes the sniff
/// consumed, given back to hyper.
#[derive(Debug)]
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(inner: S, prefix: Vec<u8>) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }

    /// The wrapped stream; its next bytes follow whatever prefix is still unread.
    pub(crate) fn inner(&self) -> &S {
        &self.inner
    }

    /// Whether bytes read ahead are still to be replayed.
    pub(crate) fn has_prefix(&self) -> bool {
        self.pos < self.prefix.len()
    }

    /// Puts `bytes` back in front of whatever is still to be replayed.
    pub(crate) fn replay(&mut self, bytes: &[u8]) {
        if bytes.is_empty() && self.has_prefix() {
            return;
        }
        // Otherwise a new buffer, also when there is nothing to replay: the old one,
        // read through, is freed.
        let mut prefix = bytes.to_vec();
        prefix.extend_from_slice(&self.prefix[self.pos..]);
        self.prefix = prefix;
        self.pos = 0;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use futures_util::FutureExt;
    use tokio::net::TcpListener;

    /// A client connected to a listener standing for the proxy's, and the proxy's end.
    async fn accepted() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    /// An upstream on loopback that echoes one connection, then (with `reset`) aborts it.
    async fn echo_once(reset: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            if reset {
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).await.unwrap();
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                return;
            }
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        addr
    }

    fn relay_in_task(
        proxy_end: TcpStream,
        prefix: &'static [u8],
        dst: SocketAddr,
        tcp: &Arc<TcpMetrics>,
    ) -> tokio::task::JoinHandle<io::Result<(u64, u64)>> {
        let tcp = tcp.clone();
        tokio::spawn(async move { passthrough(proxy_end, prefix, dst, &tcp).await })
    }

    #[tokio::test]
    async fn passthrough_counts_connections_and_bytes_as_they_flow() {
        let metrics = Metrics::new().unwrap();
        let tcp = Arc::new(metrics.tcp("outbound"));
        let dst = echo_once(false).await;
        let (mut client, proxy_end) = accepted().await;
        let relay = relay_in_task(proxy_end, b"hello ", dst, &tcp);
        client.write_all(b"world").await.unwrap();
        let mut back = [0u8; 11];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello world");
        // Counted while the connection is still open.
        assert_eq!(
            (tcp.open.get(), tcp.sent.get(), tcp.received.get()),
            (1, 11, 11)
        );
        assert_eq!(tcp.passthrough.get(), 0);

        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(relay.await.unwrap().unwrap(), (5, 11));
        let text = metrics.encode();
        for series in [
            r#"sluice_tcp_connections_total{direction="outbound",outcome="passthrough"} 1"#,
            r#"sluice_tcp_connections_total{direction="outbound",outcome="connect_error"} 0"#,
            r#"sluice_tcp_connections_total{direction="outbound",outcome="error"} 0"#,
            r#"sluice_tcp_bytes_total{direction="outbound",flow="sent"} 11"#,
            r#"sluice_tcp_bytes_total{direction="outbound",flow="received"} 11"#,
            r#"sluice_tcp_open_connections{direction="outbound"} 0"#,
        ] {
            assert!(text.contains(series), "{series} in:\n{text}");
        }
    }

    #[tokio::test]
    async fn unreachable_reset_and_cut_connections_count_as_errors() {
        let metrics = Metrics::new().unwrap();
        let tcp = Arc::new(metrics.tcp("inbound"));

        // Nothing listens at the destination.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = closed.local_addr().unwrap();
        drop(closed);
        let (_client, proxy_end) = accepted().await;
        assert!(passthrough(proxy_end, b"", dst, &tcp).await.is_err());
        assert_eq!((tcp.connect_error.get(), tcp.open.get()), (1, 0));

        // The destination resets the connection.
        let dst = echo_once(true).await;
        let (mut client, proxy_end) = accepted().await;
        client.write_all(b"hello").await.unwrap();
        assert!(passthrough(proxy_end, b"", dst, &tcp).await.is_err());
        assert_eq!((tcp.error.get(), tcp.open.get()), (1, 0));

        // Cut while open (as at the end of a drain): no longer open, and an error.
        let dst = echo_once(false).await;
        let (mut client, proxy_end) = accepted().await;
        let relay = relay_in_task(proxy_end, b"", dst, &tcp);
        client.write_all(b"x").await.unwrap();
        client.read_exact(&mut [0u8; 1]).await.unwrap();
        assert_eq!(tcp.open.get(), 1);
        relay.abort();
        assert!(relay.await.unwrap_err().is_cancelled());
        assert_eq!((tcp.error.get(), tcp.open.get()), (2, 0));
        assert_eq!(tcp.passthrough.get(), 0);
        let text = metrics.encode();
        assert!(
            text.contains(r#"sluice_tcp_connections_total{direction="inbound",outcome="error"} 2"#),
            "{text}"
        );
        assert!(text.contains(
            r#"sluice_tcp_connections_total{direction="inbound",outcome="connect_error"} 1"#
        ));
    }

    #[test]
    fn inbound_goes_to_the_pod_address_and_never_to_proxy_ports_or_loopback() {
        let ports = [15000, 15001, 15006];
        let at = |a: &str| inbound_verdict(a.parse().unwrap(), 8080, &ports);
        assert_eq!(at("10.1.2.3:8080"), InboundVerdict::App);
        assert_eq!(at("10.1.2.3:9090"), InboundVerdict::Relay);
        assert_eq!(at("10.1.2.3:15001"), InboundVerdict::Refuse);
        assert_eq!(at("10.1.2.3:15000"), InboundVerdict::Refuse);
        assert_eq!(at("127.0.0.1:9090"), InboundVerdict::Refuse);
        assert_eq!(at("0.0.0.0:9090"), InboundVerdict::Refuse);
    }

    #[test]
    fn reads_the_authority_of_the_first_head() {
        let head = |b: &[u8]| parse_head(b);
        assert_eq!(
            head(b"GET /x HTTP/1.1\r\nHost: Orders:8080\r\n\r\n"),
            Some(Head::Authority("Orders:8080".into()))
        );
        assert_eq!(
            head(b"GET http://log:80/x HTTP/1.1\r\nhost: other\r\n\r\n"),
            Some(Head::Authority("log:80".into())),
            "absolute form wins, as in the edge"
        );
        assert_eq!(
            head(b"CONNECT db:5432 HTTP/1.1\r\n\r\n"),
            Some(Head::Authority("db:5432".into()))
        );
        assert_eq!(head(b"GET /x HTTP/1.1\r\nhost: a"), None, "incomplete");
        assert_eq!(
            head(b"GET /x HTTP/1.1\r\nhost: a\r\nHost: b\r\n\r\n"),
            Some(Head::Undecided),
            "several Hosts: the edge refuses them"
        );
        assert_eq!(
            head(b"GET /x HTTP/1.0\r\n\r\n"),
            Some(Head::Undecided),
            "no authority: per request"
        );
        assert_eq!(head(b"GET \x00\x01 HTTP/1.1\r\n\r\n"), Some(Head::NotHttp));
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b, b"hello ".to_vec());
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    /// Reads `p` in reads of at most `chunk` bytes until it ends.
    async fn read_in_chunks<S: AsyncRead + Unpin>(p: &mut S, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = p.read(&mut buf).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn prefixed_replays_across_small_reads_and_says_when_it_is_through() {
        let (mut a, b) = tokio::io::duplex(64);
        // Written and closed first, so a read that skips the prefix fails, never waits.
        a.write_all(b"-rest").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b, b"0123456789".to_vec());
        assert!(p.has_prefix());
        let mut three = [0u8; 3];
        assert_eq!(p.read(&mut three).await.unwrap(), 3);
        assert_eq!(&three, b"012");
        assert!(p.has_prefix(), "seven bytes still to replay");

        // Put back in front of what is left, as hyper hands back what it read ahead.
        p.replay(b"ab");
        // Nothing to put back while bytes are still to replay: nothing changes.
        p.replay(b"");
        assert_eq!(read_in_chunks(&mut p, 4).await, b"ab3456789-rest");
        assert!(!p.has_prefix());

        // Read through, bytes given back are replayed again before the stream.
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"then on").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b, Vec::new());
        assert!(!p.has_prefix(), "an empty prefix has nothing to replay");
        p.replay(b"again ");
        assert!(p.has_prefix());
        assert_eq!(read_in_chunks(&mut p, 4).await, b"again then on");
    }

    #[tokio::test]
    async fn prefixed_writes_flushes_and_shuts_down_the_stream_it_wraps() {
        let (client, server) = accepted().await;
        let mut p = Prefixed::new(client, b"unread".to_vec());
        assert!(p.is_write_vectored(), "as the TCP stream it wraps");
        let (_a, b) = tokio::io::duplex(8);
        assert_eq!(
            Prefixed::new(b, Vec::new()).is_write_vectored(),
            tokio::io::duplex(8).0.is_write_vectored()
        );

        p.write_all(b"one ").await.unwrap();
        let parts = [io::IoSlice::new(b"two "), io::IoSlice::new(b"three")];
        let n = p.write_vectored(&parts).await.unwrap();
        assert!(n > 0, "a vectored write goes through");
        p.shutdown().await.unwrap();
        let mut server = server;
        let mut got = Vec::new();
        // Bounded so that a shutdown that never reaches the socket fails the test.
        tokio::time::timeout(Duration::from_secs(30), server.read_to_end(&mut got))
            .await
            .expect("the shutdown reaches the peer")
            .unwrap();
        let mut want = b"one ".to_vec();
        want.extend_from_slice(&b"two three"[..n]);
        assert_eq!(got, want, "written through, then closed by the shutdown");

        // A flush reaches a buffered stream underneath.
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = Prefixed::new(tokio::io::BufWriter::new(a), Vec::new());
        p.write_all(b"held").await.unwrap();
        p.flush().await.unwrap();
        // Dropped unflushed, a BufWriter loses what it holds.
        drop(p);
        let mut held = Vec::new();
        b.read_to_end(&mut held).await.unwrap();
        assert_eq!(held, b"held");
    }

    #[tokio::test]
    async fn counted_adds_only_the_bytes_each_read_brings() {
        let metrics = Metrics::new().unwrap();
        let tcp = metrics.tcp("outbound");
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"abcd").await.unwrap();
        let mut counted = Counted::new(b, &tcp.sent);
        let mut storage = [0u8; 16];
        let mut buf = ReadBuf::new(&mut storage);
        buf.put_slice(b"already");
        std::future::poll_fn(|cx| Pin::new(&mut counted).poll_read(cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(buf.filled(), b"alreadyabcd");
        assert_eq!(
            tcp.sent.get(),
            4,
            "the bytes already in the buffer are not counted"
        );

        // Writes and flushes reach the stream underneath.
        let (a, mut b) = tokio::io::duplex(64);
        let mut counted = Counted::new(tokio::io::BufWriter::new(a), &tcp.received);
        counted.write_all(b"out").await.unwrap();
        counted.flush().await.unwrap();
        drop(counted);
        let mut out = Vec::new();
        b.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"out");
        assert_eq!(
            tcp.received.get(),
            0,
            "written bytes count on the other side"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sniff_decides_as_soon_as_it_can_and_keeps_every_byte() {
        // The preface in two writes: undecided on the first, both returned.
        let (mut client, mut proxy_end) = accepted().await;
        client.write_all(&H2_PREFACE[..5]).await.unwrap();
        let mut sniffing = std::pin::pin!(sniff(&mut proxy_end, SNIFF_WAIT));
        assert!(
            sniffing.as_mut().now_or_never().is_none(),
            "five bytes decide nothing"
        );
        client.write_all(&H2_PREFACE[5..]).await.unwrap();
        assert_eq!(
            sniffing.await.unwrap(),
            (Protocol::Http2, H2_PREFACE.to_vec())
        );

        // A request line, the client then waiting for an answer: decided without waiting.
        let (mut client, mut proxy_end) = accepted().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(
            sniff(&mut proxy_end, SNIFF_WAIT).await.unwrap(),
            (Protocol::Http1, b"GET / HTTP/1.1\r\n".to_vec())
        );
        assert!(
            started.elapsed() < SNIFF_WAIT,
            "decided on the bytes, not the wait"
        );

        // A server-first protocol: the client sends nothing, opaque after the wait.
        let (_client, mut proxy_end) = accepted().await;
        let started = tokio::time::Instant::now();
        assert_eq!(
            sniff(&mut proxy_end, SNIFF_WAIT).await.unwrap(),
            (Protocol::Opaque, Vec::new())
        );
        assert!(started.elapsed() >= SNIFF_WAIT);

        // The start of a method, a pause past the silent wait, then the rest: still HTTP.
        let (mut client, mut proxy_end) = accepted().await;
        client.write_all(b"GE").await.unwrap();
        let mut sniffing = std::pin::pin!(sniff(&mut proxy_end, SNIFF_WAIT));
        assert!(sniffing.as_mut().now_or_never().is_none());
        tokio::time::advance(SNIFF_WAIT * 5).await;
        assert!(
            sniffing.as_mut().now_or_never().is_none(),
            "a begun request is waited for"
        );
        client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(
            sniffing.await.unwrap(),
            (Protocol::Http1, b"GET / HTTP/1.1\r\n".to_vec())
        );

        // Begun and stalled past the head's wait, counted from the first byte (later
        // bytes that still decide nothing do not extend it): opaque, bytes kept.
        let (mut client, mut proxy_end) = accepted().await;
        client.write_all(b"HEL").await.unwrap();
        let started = tokio::time::Instant::now();
        let mut sniffing = std::pin::pin!(sniff(&mut proxy_end, SNIFF_WAIT));
        assert!(sniffing.as_mut().now_or_never().is_none());
        tokio::time::advance(HEAD_WAIT / 2).await;
        client.write_all(b"LO").await.unwrap();
        assert_eq!(
            sniffing.await.unwrap(),
            (Protocol::Opaque, b"HELLO".to_vec())
        );
        assert_eq!(started.elapsed(), HEAD_WAIT);

        // A client that sends the start of a method and closes: opaque, bytes kept.
        let (mut client, mut proxy_end) = accepted().await;
        client.write_all(b"PO").await.unwrap();
        client.shutdown().await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(
            sniff(&mut proxy_end, SNIFF_WAIT).await.unwrap(),
            (Protocol::Opaque, b"PO".to_vec())
        );
        assert!(
            started.elapsed() < SNIFF_WAIT,
            "the close decides, not the wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn read_head_waits_for_the_whole_head_within_its_limits() {
        // The head's end arrives after the sniffed start: the read waits for it.
        let (mut client, mut proxy_end) = accepted().await;
        let mut prefix = b"GET / HTTP/1.1\r\n".to_vec();
        let head = {
            let mut reading = std::pin::pin!(read_head(&mut proxy_end, &mut prefix));
            assert!(
                reading.as_mut().now_or_never().is_none(),
                "the head is not whole yet"
            );
            client.write_all(b"Host: orders\r\n\r\n").await.unwrap();
            reading.await
        };
        assert_eq!(head, Head::Authority("orders".into()));
        assert_eq!(prefix, b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n");

        // A head longer than a few kilobytes is still read to its end.
        let (mut client, mut proxy_end) = accepted().await;
        let mut prefix = b"GET ".to_vec();
        let pad = "x".repeat(10_000);
        let head = format!("/ HTTP/1.1\r\nX-Pad: {pad}\r\nHost: orders\r\n\r\n");
        client.write_all(head.as_bytes()).await.unwrap();
        assert_eq!(
            read_head(&mut proxy_end, &mut prefix).await,
            Head::Authority("orders".into())
        );

        // Past MAX_HEAD with no end in sight: hyper decides, at once.
        let (mut client, mut proxy_end) = accepted().await;
        let mut prefix = b"GET ".to_vec();
        let pad = "x".repeat(MAX_HEAD + 16 * 1024);
        let head = format!("/ HTTP/1.1\r\nHost: orders\r\nX-Pad: {pad}");
        let writer = tokio::spawn(async move {
            client.write_all(head.as_bytes()).await.unwrap();
            client
        });
        let started = tokio::time::Instant::now();
        assert_eq!(
            read_head(&mut proxy_end, &mut prefix).await,
            Head::Undecided
        );
        assert!(
            started.elapsed() < HEAD_WAIT,
            "decided on the length, not the wait"
        );
        assert!(prefix.len() >= MAX_HEAD);
        drop(proxy_end);
        writer.abort();

        // Too slow: undecided once the wait is over.
        let (mut client, mut proxy_end) = accepted().await;
        let mut prefix = b"GET / HTTP/1.1\r\n".to_vec();
        client.write_all(b"Host: ord").await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(
            read_head(&mut proxy_end, &mut prefix).await,
            Head::Undecided
        );
        assert_eq!(started.elapsed(), HEAD_WAIT);
        assert_eq!(
            prefix, b"GET / HTTP/1.1\r\nHost: ord",
            "what was read is kept"
        );

        // Closed halfway: undecided at once, what was read kept for hyper's answer.
        let (mut client, mut proxy_end) = accepted().await;
        let mut prefix = b"GET / HTTP/1.1\r\n".to_vec();
        client.write_all(b"Host: ord").await.unwrap();
        client.shutdown().await.unwrap();
        let started = tokio::time::Instant::now();
        let head = tokio::time::timeout(HEAD_WAIT * 2, read_head(&mut proxy_end, &mut prefix));
        assert_eq!(head.await.unwrap(), Head::Undecided);
        assert!(started.elapsed() < HEAD_WAIT);
        assert_eq!(prefix, b"GET / HTTP/1.1\r\nHost: ord");
    }

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(
            classify(b"PRI * HTTP/2"),
            None,
            "could still be the preface"
        );
        assert_eq!(classify(b"P"), None);
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            Some(Protocol::Opaque),
            "TLS"
        );
        assert_eq!(
            classify(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Some(Protocol::Opaque)
        );
        // Any method token, then a target in a request form.
        for line in [
            &b"PURGE /cache HTTP/1.1\r\n"[..],
            b"PROPFIND /dav",
            b"REPORT *",
            b"GET http://svc/x",
            b"GET HTTPS://svc/x",
            b"CONNECT svc:443",
        ] {
            assert_eq!(classify(line), Some(Protocol::Http1), "{line:?}");
        }
        for undecided in [&b"GETX"[..], b"PURGE", b"PURGE ", b"GET htt"] {
            assert_eq!(classify(undecided), None, "{undecided:?}");
        }
        // Text protocols that are not HTTP, and a token too long to be a method.
        for opaque in [
            &b"GETX\r\n"[..],
            b"INVITE sip:bob@example.com SIP/2.0",
            b"DESCRIBE rtsp://cam/1 RTSP/1.0",
            b"get key\r\n",
            b"PING\r\n",
            b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            b" / HTTP/1.1",
            b"GET\t/ HTTP/1.1\r\n",
            b"GET//x",
        ] {
            assert_eq!(classify(opaque), Some(Protocol::Opaque), "{opaque:?}");
        }
        // The longest method token taken, and one byte longer.
        let line = |len: usize| format!("{} / HTTP/1.1", "M".repeat(len));
        assert_eq!(classify(line(MAX_METHOD).as_bytes()), Some(Protocol::Http1));
        assert_eq!(
            classify(line(MAX_METHOD + 1).as_bytes()),
            Some(Protocol::Opaque)
        );
    }
}
