//! Transparent mode's building blocks: the original destination of a redirected
//! connection, a first-bytes protocol sniff, and opaque TCP passthrough.
//!
//! After the `init` redirect, an accepted connection's local address is the proxy's
//! port; [`original_dst`] reads where the application meant to go (`SO_ORIGINAL_DST`,
//! kept by conntrack). [`sniff`] reads just enough of the client's first bytes to tell
//! HTTP/1, the HTTP/2 preface or anything else apart; a protocol in which the server
//! speaks first (MySQL, SMTP) sends nothing, so the sniff gives up after a timeout and
//! calls it opaque. [`passthrough`] replays the sniffed bytes to the destination and
//! copies both ways untouched. Wiring these into the outbound listener is not done yet.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// HTTP/1 request methods recognised as the first bytes of a connection.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

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
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    let longest = |a: &[u8], b: &[u8]| a.len().min(b.len());
    let mut undecided = false;
    for candidate in std::iter::once(H2_PREFACE).chain(METHODS) {
        let n = longest(prefix, candidate);
        if prefix[..n] == candidate[..n] {
            if n == candidate.len() {
                return Some(if candidate == H2_PREFACE {
                    Protocol::Http2
                } else {
                    Protocol::Http1
                });
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Protocol::Opaque)
    }
}

/// Reads the client's first bytes until [`classify`] decides, the client stops sending
/// for `wait`, or it closes; returns the verdict and the bytes read, which the caller
/// must send on first.
pub async fn sniff(stream: &mut TcpStream, wait: Duration) -> io::Result<(Protocol, Vec<u8>)> {
    let mut prefix = Vec::with_capacity(H2_PREFACE.len());
    let mut buf = [0u8; 64];
    loop {
        if let Some(p) = classify(&prefix)
            && !prefix.is_empty()
        {
            return Ok((p, prefix));
        }
        let n = match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(r) => r?,
            // Server-first protocols: the client waits for the server to speak.
            Err(_) => return Ok((Protocol::Opaque, prefix)),
        };
        if n == 0 {
            return Ok((Protocol::Opaque, prefix));
        }
        prefix.extend_from_slice(&buf[..n]);
    }
}

/// Connects to `dst`, sends `prefix`, then copies both ways until both sides close;
/// returns the bytes sent each way after the prefix (client → server, server → client).
pub async fn passthrough(
    mut client: TcpStream,
    prefix: &[u8],
    dst: SocketAddr,
) -> io::Result<(u64, u64)> {
    let mut upstream = TcpStream::connect(dst).await?;
    let _ = upstream.set_nodelay(true);
    upstream.write_all(prefix).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST "), Some(Protocol::Http1));
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
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
    }
}
