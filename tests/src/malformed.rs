//! Malformed HTTP written by hand over raw TCP: what a broken or hostile client sends.
//!
//! Every [`Attack`] is bytes on a fresh connection, and the proxy must either refuse
//! it (a 4xx, or for HTTP/2 a `GOAWAY`/`RST_STREAM` with an error code) or close the
//! connection; it must never hang on it, crash, or answer it as if it were fine. The
//! HTTP/2 frames are built here byte by byte because no client library will send a
//! frame that breaks the protocol.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the proxy gets to refuse or close.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The HTTP/2 connection preface.
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which refusals an attack accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// HTTP/1.1: a 4xx, or the connection closed without an answer.
    Refused,
    /// HTTP/1.1 with both `Content-Length` and `Transfer-Encoding`: a 4xx, or an answer
    /// after which the connection is closed (RFC 9112 §6.1), so that nothing after the
    /// body can be read as a request of its own.
    RefusedOrClosedAfter,
    /// HTTP/2: a `GOAWAY` or `RST_STREAM` with an error, or the connection closed.
    H2Error,
    /// Anything but a crash or a hang (e.g. a body cut short by the client).
    NoCrash,
}

/// One malformed input.
#[derive(Clone, Debug)]
pub struct Attack {
    /// What it is.
    pub name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
    /// Close our side after writing (the client goes away mid-message).
    hang_up: bool,
}

/// What the proxy did with one attack.
#[derive(Clone, Debug)]
pub struct AttackOutcome {
    /// The attack's name.
    pub name: &'static str,
    /// What came back, in a few words.
    pub seen: String,
    /// Whether that is an acceptable answer.
    pub ok: bool,
}

fn h1(name: &'static str, text: &str, expect: Expect) -> Attack {
    Attack {
        name,
        bytes: text.as_bytes().to_vec(),
        expect,
        hang_up: false,
    }
}

fn h2(name: &'static str, frames: &[Vec<u8>]) -> Attack {
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // an empty SETTINGS, as a client opens
    for f in frames {
        bytes.extend_from_slice(f);
    }
    Attack {
        name,
        bytes,
        expect: Expect::H2Error,
        hang_up: false,
    }
}

/// An HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload.
pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A valid HPACK header block for `GET http://<host>/` (static-table indexes and
/// literals without indexing).
fn hpack_get(host: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84]; // :method GET, :scheme http, :path /
    b.push(0x01); // literal without indexing, name = static index 1 (:authority)
    b.push(host.len() as u8);
    b.extend_from_slice(host.as_bytes());
    b
}

/// An HPACK integer with an `n`-bit prefix, the prefix byte's other bits `flags`.
fn hpack_int(flags: u8, n: u32, mut value: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if value < max {
        return vec![flags | value as u8];
    }
    let mut out = vec![flags | max as u8];
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
    out
}

/// A literal header field without indexing, with a new name.
fn hpack_literal(name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![0x00];
    b.extend(hpack_int(0, 7, name.len()));
    b.extend_from_slice(name.as_bytes());
    b.extend(hpack_int(0, 7, value.len()));
    b.extend_from_slice(value.as_bytes());
    b
}

/// HTTP/2 abuse at the frame level, each valid frame by frame but hostile in bulk:
/// CONTINUATION flood, HPACK bomb, SETTINGS and PING floods, unpaced rapid reset.
fn h2_floods(host: &str) -> Vec<Attack> {
    const END_HEADERS: u8 = 0x4;
    const END_STREAM: u8 = 0x1;
    // HEADERS without END_HEADERS, then CONTINUATION frames that never end the block.
    let filler = "a".repeat(100);
    let mut continuation = vec![frame(0x1, END_STREAM, 1, &hpack_get(host))];
    for i in 0..10_000 {
        let field = hpack_literal(&format!("x-c{}", i % 10), &filler);
        continuation.push(frame(0x9, 0, 1, &field));
    }
    // One 4,000-byte header put in the dynamic table, then referenced 12,000 times
    // (one byte each): a 16 KiB frame that decodes to ~48 MB of headers.
    let mut bomb = hpack_get(host);
    bomb.push(0x40); // literal with incremental indexing, new name
    bomb.extend(hpack_int(0, 7, 6));
    bomb.extend_from_slice(b"x-bomb");
    bomb.extend(hpack_int(0, 7, 4_000));
    bomb.extend(std::iter::repeat_n(b'b', 4_000));
    bomb.extend(std::iter::repeat_n(0xbe, 12_000)); // indexed: dynamic entry 62
    let settings: Vec<Vec<u8>> = (0..10_000).map(|_| frame(0x4, 0, 0, &[])).collect();
    let pings: Vec<Vec<u8>> = (0..10_000u64)
        .map(|i| frame(0x6, 0, 0, &i.to_be_bytes()))
        .collect();
    let mut rapid_reset = Vec::new();
    for i in 0..2_000u32 {
        let id = 2 * i + 1;
        rapid_reset.push(frame(0x1, END_HEADERS | END_STREAM, id, &hpack_get(host)));
        rapid_reset.push(frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    vec![
        h2(
            "HTTP/2 CONTINUATION flood: 10,000 frames (1 MB) without END_HEADERS",
            &continuation,
        ),
        h2(
            "HTTP/2 HPACK bomb: one 4 KB dynamic entry referenced 12,000 times",
            &[frame(0x1, END_HEADERS | END_STREAM, 1, &bomb)],
        ),
        Attack {
            expect: Expect::NoCrash,
            ..h2("HTTP/2 SETTINGS flood: 10,000 frames", &settings)
        },
        Attack {
            expect: Expect::NoCrash,
            ..h2("HTTP/2 PING flood: 10,000 frames", &pings)
        },
        Attack {
            expect: Expect::NoCrash,
            ..h2(
                "HTTP/2 rapid reset: 2,000 streams opened and cancelled",
                &rapid_reset,
            )
        },
    ]
}

/// Every malformed input the suite sends; `host` is a host the proxy routes.
pub fn attacks(host: &str) -> Vec<Attack> {
    use Expect::*;
    const END_HEADERS: u8 = 0x4;
    const END_STREAM: u8 = 0x1;
    let big = "a".repeat(128 * 1024);
    let many: String = (0..500).map(|i| format!("x-h{i}: v\r\n")).collect();
    let mut cut_short = h1(
        "body shorter than its Content-Length, then the client hangs up",
        &format!("POST /sink HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\n\r\nonly this"),
        NoCrash,
    );
    cut_short.hang_up = true;

    vec![
        h1(
            "space in a header name",
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nBad Header: x\r\n\r\n"),
            Refused,
        ),
        h1(
            "header line without a colon",
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nNoColonHere\r\n\r\n"),
            Refused,
        ),
        h1(
            "control character in a header name",
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nx-\u{1}a: b\r\n\r\n"),
            Refused,
        ),
        h1(
            "128 KiB header value",
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nx-big: {big}\r\n\r\n"),
            Refused,
        ),
        h1(
            "500 headers",
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\n{many}\r\n"),
            Refused,
        ),
        h1("garbage request line", "FOO BAR BAZ QUX\r\n\r\n", Refused),
        h1(
            "control character in the path",
            &format!("GET /a\u{1}b HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            Refused,
        ),
        h1(
            "Content-Length and Transfer-Encoding: chunked together",
            &format!(
                "POST /sink HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
            ),
            RefusedOrClosedAfter,
        ),
        h1(
            "two different Content-Lengths",
            &format!(
                "POST /sink HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
            ),
            Refused,
        ),
        h1(
            "negative Content-Length",
            &format!("POST /sink HTTP/1.1\r\nHost: {host}\r\nContent-Length: -1\r\n\r\n"),
            Refused,
        ),
        h1(
            "chunked not last in Transfer-Encoding",
            &format!(
                "POST /sink HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
            Refused,
        ),
        h1(
            "a transfer coding besides chunked (gzip, chunked)",
            &format!(
                "POST /sink HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
            Refused,
        ),
        h1(
            "chunk size that is not hex",
            &format!(
                "POST /sink HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
            ),
            Refused,
        ),
        h1(
            "chunk size that overflows 64 bits",
            &format!(
                "POST /sink HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"
            ),
            Refused,
        ),
        h1(
            "chunk longer than its size",
            &format!(
                "POST /sink HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n"
            ),
            Refused,
        ),
        cut_short,
        h1(
            "two Host headers naming different hosts",
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nHost: elsewhere\r\n\r\n"),
            Refused,
        ),
        h1("HTTP/1.1 request without Host", "GET / HTTP/1.1\r\n\r\n", Refused),
        h1(
            "absolute-form target with userinfo",
            &format!("GET http://user:pw@{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            Refused,
        ),
        h1(
            "CONNECT to a governed host",
            &format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n"),
            Refused,
        ),
        h1(
            "asterisk-form target to a governed host",
            &format!("OPTIONS * HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            Refused,
        ),
        Attack {
            name: "HTTP/2 preface with a wrong ending",
            bytes: b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n".to_vec(),
            expect: Refused,
            hang_up: false,
        },
        h2(
            "HTTP/2 HEADERS on stream 0",
            &[frame(0x1, END_HEADERS | END_STREAM, 0, &hpack_get(host))],
        ),
        h2(
            "HTTP/2 DATA on stream 0",
            &[frame(0x0, END_STREAM, 0, b"hello")],
        ),
        h2(
            "HTTP/2 frame larger than SETTINGS_MAX_FRAME_SIZE",
            &[
                frame(0x1, END_HEADERS, 1, &hpack_get(host)),
                frame(0x0, END_STREAM, 1, &vec![b'a'; 20_000]),
            ],
        ),
        h2(
            "HTTP/2 HEADERS with an HPACK index past the tables",
            &[frame(
                0x1,
                END_HEADERS | END_STREAM,
                1,
                &[0xff, 0xff, 0xff, 0x0f],
            )],
        ),
        h2(
            "HTTP/2 HEADERS with a truncated HPACK literal",
            &[frame(0x1, END_HEADERS | END_STREAM, 1, &[0x82, 0x01, 0x7f])],
        ),
        h2(
            "HTTP/2 SETTINGS whose length is not a multiple of 6",
            &[frame(0x4, 0, 0, &[0, 1, 0, 0, 0])],
        ),
        h2(
            "HTTP/2 WINDOW_UPDATE of 0 on the connection",
            &[frame(0x8, 0, 0, &0u32.to_be_bytes())],
        ),
        h2(
            "HTTP/2 HEADERS on an even (server) stream id",
            &[frame(0x1, END_HEADERS | END_STREAM, 2, &hpack_get(host))],
        ),
        h2(
            "HTTP/2 CONTINUATION without HEADERS",
            &[frame(0x9, END_HEADERS, 1, &hpack_get(host))],
        ),
    ]
    .into_iter()
    .chain(h2_floods(host))
    .collect()
}

/// Sends one attack on a fresh connection to `addr` and judges what comes back.
pub async fn send(addr: SocketAddr, attack: &Attack) -> AttackOutcome {
    let (seen, ok) = match tokio::time::timeout(ANSWER_WITHIN, exchange(addr, attack)).await {
        Ok(Ok(got)) => judge(attack.expect, &got),
        Ok(Err(e)) => (format!("i/o error: {e}"), false),
        Err(_) => (
            format!("no answer and no close within {ANSWER_WITHIN:?}"),
            false,
        ),
    };
    AttackOutcome {
        name: attack.name,
        seen,
        ok,
    }
}

/// What came back before the connection closed (or before a reset).
struct Got {
    bytes: Vec<u8>,
    reset: bool,
}

async fn exchange(addr: SocketAddr, attack: &Attack) -> std::io::Result<Got> {
    let mut s = TcpStream::connect(addr).await?;
    // The proxy may refuse before it has read everything: a failed write is an answer.
    let write = s.write_all(&attack.bytes).await;
    if attack.hang_up {
        drop(s);
        return Ok(Got {
            bytes: Vec::new(),
            reset: false,
        });
    }
    if write.is_ok() {
        let _ = s.flush().await;
    }
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let read = if attack.expect == Expect::NoCrash {
            // Nothing is owed here: a quiet connection is as good as a closed one.
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    return Ok(Got {
                        bytes,
                        reset: false,
                    });
                }
            }
        } else {
            s.read(&mut buf).await
        };
        match read {
            Ok(0) => {
                return Ok(Got {
                    bytes,
                    reset: false,
                });
            }
            Ok(n) => {
                bytes.extend_from_slice(&buf[..n]);
                if attack.expect != Expect::RefusedOrClosedAfter
                    && attack.expect != Expect::NoCrash
                    && is_answer(&bytes)
                {
                    return Ok(Got {
                        bytes,
                        reset: false,
                    });
                }
            }
            Err(_) => return Ok(Got { bytes, reset: true }),
        }
    }
}

/// Enough to judge: an HTTP/1.1 status line, or an HTTP/2 GOAWAY or RST_STREAM.
fn is_answer(bytes: &[u8]) -> bool {
    if bytes.starts_with(b"HTTP/1.") {
        return bytes.windows(2).any(|w| w == b"\r\n");
    }
    h2_frames(bytes).iter().any(|(t, _)| *t == 0x7 || *t == 0x3)
}

/// The (type, error code) of every whole frame in `bytes` from the server (error code
/// is meaningful for GOAWAY and RST_STREAM only).
fn h2_frames(bytes: &[u8]) -> Vec<(u8, u32)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        let kind = rest[3];
        if rest.len() < 9 + len {
            break;
        }
        let payload = &rest[9..9 + len];
        let code = match kind {
            0x7 if len >= 8 => u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
            0x3 if len >= 4 => u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
            _ => 0,
        };
        out.push((kind, code));
        rest = &rest[9 + len..];
    }
    out
}

fn status_of(bytes: &[u8]) -> Option<u16> {
    let line = bytes.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

fn judge(expect: Expect, got: &Got) -> (String, bool) {
    let closed = if got.reset {
        "connection reset"
    } else {
        "connection closed"
    };
    match expect {
        Expect::Refused => match status_of(&got.bytes) {
            // 505: a version the server does not speak is refused as such.
            Some(s) => (format!("{s}"), (400..500).contains(&s) || s == 505),
            None if got.bytes.is_empty() => (closed.to_string(), true),
            None => (
                format!("{closed} after {} unexpected bytes", got.bytes.len()),
                false,
            ),
        },
        Expect::RefusedOrClosedAfter => {
            // Status lines start the reply or follow a blank line.
            let statuses = usize::from(got.bytes.starts_with(b"HTTP/1."))
                + got
                    .bytes
                    .windows(11)
                    .filter(|w| w.starts_with(b"\r\n\r\nHTTP/1."))
                    .count();
            match status_of(&got.bytes) {
                Some(s) if (400..500).contains(&s) => (format!("{s}"), true),
                Some(s) => (
                    format!("{s}, {statuses} answer(s), then {closed}"),
                    statuses == 1,
                ),
                None => (closed.to_string(), got.bytes.is_empty()),
            }
        }
        Expect::H2Error => {
            let frames = h2_frames(&got.bytes);
            if let Some((kind, code)) = frames.iter().find(|(t, _)| *t == 0x7 || *t == 0x3) {
                let what = if *kind == 0x7 { "GOAWAY" } else { "RST_STREAM" };
                (format!("{what} error {code:#x}"), *code != 0)
            } else if let Some(s) = status_of(&got.bytes) {
                (format!("{s}"), (400..500).contains(&s))
            } else {
                (closed.to_string(), true)
            }
        }
        Expect::NoCrash => {
            let frames = h2_frames(&got.bytes);
            let goaway = frames.iter().find(|(t, _)| *t == 0x7);
            match (status_of(&got.bytes), goaway) {
                (Some(s), _) => (format!("{s}"), true),
                (None, Some((_, code))) => (format!("GOAWAY error {code:#x}"), true),
                _ => (closed.to_string(), true),
            }
        }
    }
}
