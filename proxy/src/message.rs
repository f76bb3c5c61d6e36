//! What the proxy reads from and fixes in HTTP messages as they pass: the authority a
//! request names, whether it is gRPC, hop-by-hop headers, and protocol upgrades with the
//! tunnels that carry them once both sides have switched.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::body::Body;

/// The authority a request names: absolute-form URI or `:authority` first, then `Host`.
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<&str> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
}

/// Whether a request is gRPC (`content-type: application/grpc…`).
pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The most a request's header section may take, as Envoy's default (60 KiB) and
/// nginx's largest buffers allow; a larger one is refused with 431 (HTTP/1.1) or a
/// stream error (HTTP/2) instead of being buffered, and an upstream's HTTP/1 response head
/// larger than this is a 502. hyper's own default is ~400 KiB.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Headers that describe one connection and never travel past a proxy (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and the ones `Connection` names, except `Host`: the
/// authority the request was routed by is never a connection's to remove
/// ([`crate::authority`]). `te: trailers` stays, since gRPC needs it end to end; with
/// `upgrade` the `Connection: upgrade` and `Upgrade` headers stay so the upstream can
/// accept the upgrade.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of these: one pass over the names, comparing without
    // hashing, spares them the lookups and removals below (twice per request).
    if !upgrade && !headers.keys().any(|n| HOP_BY_HOP.contains(n)) {
        return;
    }
    // Read before anything is removed: `Connection: te` must not lose `te: trailers`.
    let trailers = headers.get_all(header::TE).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    });
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE) && n != header::HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        if upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// A request path with its dot-segments removed (RFC 3986 §5.2.4; `%2e` counts as a
/// dot), or `None` when it has none: routes match, and the upstream receives, the path
/// the request resolves to, so `/logs/../admin` is governed as `/admin` is and not by
/// the `/logs` route its raw text starts with. Empty segments (`//`) are kept, and
/// nothing else is decoded. A path without `/.` or `%` returns after one scan.
pub fn normalize_path(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let dotted = bytes
        .windows(2)
        .any(|w| w == b"/." || (w[0] == b'/' && w[1] == b'%'));
    if !dotted || !path.starts_with('/') {
        return None;
    }
    // The validator refuses route paths by the same rule: one definition of it.
    sluice_config::resolve_dot_segments(path)
}

/// Rewrites `req`'s target to its path without dot-segments ([`normalize_path`]),
/// keeping the query; a target without any is left as it is.
pub(crate) fn normalize_target<B>(req: &mut Request<B>) {
    let Some(path) = normalize_path(req.uri().path()) else {
        return;
    };
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    // Removing segments from a valid target leaves a valid one.
    let Ok(pq) = http::uri::PathAndQuery::try_from(target) else {
        return;
    };
    parts.path_and_query = Some(pq);
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// Whether a message's `Transfer-Encoding` names a coding besides `chunked` (`gzip,
/// chunked`): hyper takes the chunked framing off and hands on the bytes under it, so
/// forwarding it without the header would pass compressed bytes as plain ones. nginx
/// and Envoy refuse such a request too (RFC 9112 §6.1 lets a server refuse a coding it
/// does not apply).
pub(crate) fn foreign_transfer_coding(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|coding| !coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// [`foreign_transfer_coding`] for a whole message, looked up only when its body may be
/// chunked: hyper reads any `Transfer-Encoding` body as chunked, which has no exact
/// length, so a message whose length is known (no body, or `Content-Length`) needs no
/// header lookup on the way.
pub(crate) fn foreign_coding_in<B: http_body::Body>(headers: &HeaderMap, body: &B) -> bool {
    body.size_hint().exact().is_none() && foreign_transfer_coding(headers)
}

/// Whether an HTTP/1 request asks to switch protocols (WebSocket and the like).
pub(crate) fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The protocol every route tunnels; a route's `upgrades` lists any others.
const WEBSOCKET: &str = "websocket";

/// Keeps in `Upgrade` only the protocols a route lets through: `websocket` and those
/// `allowed` lists (a listed `name` takes any `name/version`, `name/version` only that
/// one; letter case ignored, as RFC 9110 §7.8 compares them). Returns whether any is
/// left; if none is, the request goes on as an ordinary one and the caller strips the
/// rest of the offer with the hop-by-hop headers. This is how an `h2c` offer (and any
/// unlisted one) is refused: the connection never switches, as Envoy and nginx answer
/// it, and the client carries on over HTTP/1.1 (RFC 9110 §7.8 lets a server ignore it).
pub(crate) fn restrict_upgrade(headers: &mut HeaderMap, allowed: &[String]) -> bool {
    let offered: Vec<&str> = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    let kept: Vec<&str> = offered
        .iter()
        .copied()
        .filter(|t| upgrade_allowed(t, allowed))
        .collect();
    if kept.len() == offered.len() {
        return !kept.is_empty();
    }
    let value = (!kept.is_empty())
        .then(|| HeaderValue::from_str(&kept.join(", ")).ok())
        .flatten();
    match value {
        Some(v) => {
            headers.insert(header::UPGRADE, v);
            true
        }
        None => {
            headers.remove(header::UPGRADE);
            false
        }
    }
}

/// Whether a route with `allowed` tunnels the offered protocol `token`.
pub(crate) fn upgrade_allowed(token: &str, allowed: &[String]) -> bool {
    let name = token.split_once('/').map_or(token, |(n, _)| n);
    name.eq_ignore_ascii_case(WEBSOCKET)
        || allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(token) || a.eq_ignore_ascii_case(name))
}

/// Whether a 101 answer switches to a protocol the request (as sent upstream, `offer`
/// being its `Upgrade` value) offered: an upstream that switches to anything else is
/// not tunnelled.
pub(crate) fn switched_as_offered(resp: &Response<Body>, offer: &HeaderValue) -> bool {
    let Ok(offer) = offer.to_str() else {
        return false;
    };
    let offered = |t: &str| {
        let name = t.split_once('/').map_or(t, |(n, _)| n);
        offer
            .split(',')
            .map(str::trim)
            .any(|o| o.eq_ignore_ascii_case(t) || o.eq_ignore_ascii_case(name))
    };
    resp.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').map(str::trim).all(offered))
}

/// Once both sides have switched protocols, copies bytes both ways until either closes.
pub(crate) fn spawn_tunnel(downstream: OnUpgrade, resp: &mut Response<Body>) {
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut down = TokioIo::new(down);
        let mut up = TokioIo::new(up);
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            debug!(error = %e, "upgraded connection ended");
        }
    });
}

/// Whether a response switches protocols.
pub(crate) fn is_switching(resp: &Response<Body>) -> bool {
    resp.status() == StatusCode::SWITCHING_PROTOCOLS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = map(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn each_hop_by_hop_name_alone_is_stripped_and_other_messages_are_left_whole() {
        for name in [
            "connection",
            "proxy-connection",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
        ] {
            let mut h = map(&[("x-kept", "yes"), ("host", "orders")]);
            h.append(name, HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h, false);
            assert!(!h.contains_key(name), "{name} kept: {h:?}");
            assert_eq!(h.len(), 2, "{h:?}");
        }
        let mut h = map(&[("x-kept", "yes"), ("host", "orders"), ("accept", "*/*")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
    }

    #[test]
    fn dot_segments_are_removed_in_every_spelling() {
        for (path, want) in [
            ("/logs/a", None),
            ("/logs/.well-known/x", None),
            ("/a/b..c/d", None),
            ("/a%20b/c", None),
            ("/pkg.Service/Method", None),
            ("/logs/../admin", Some("/admin")),
            ("/logs/%2e%2e/admin", Some("/admin")),
            ("/logs/%2E./admin", Some("/admin")),
            ("/logs/.%2E/admin", Some("/admin")),
            ("/a/./b", Some("/a/b")),
            ("/a/%2e/b", Some("/a/b")),
            // Only escaped dots after every slash: no plain `/x` window to spot it by.
            ("/%2e", Some("/")),
            ("/%2E%2e/%2e", Some("/")),
            ("/a/b/..", Some("/a/")),
            ("/a/b/.", Some("/a/b/")),
            ("/..", Some("/")),
            ("/../../x", Some("/x")),
            ("/.", Some("/")),
            ("/a//../b", Some("/a/b")),
            ("/a/.../b", None),
            ("/a/%2e%2e%2e/b", None),
            ("/a/%2f../b", None),
            ("*", None),
        ] {
            assert_eq!(normalize_path(path).as_deref(), want, "{path}");
        }
    }

    /// The header is looked up only for a body of unknown length (what hyper makes of
    /// any `Transfer-Encoding`); a body of known length cannot carry a coding.
    #[test]
    fn only_a_body_of_unknown_length_is_checked_for_its_coding() {
        struct Unsized;
        impl http_body::Body for Unsized {
            type Data = bytes::Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>>
            {
                std::task::Poll::Ready(None)
            }
        }
        let gzip = map(&[("transfer-encoding", "gzip, chunked")]);
        let plain = map(&[("transfer-encoding", "chunked")]);
        assert!(foreign_coding_in(&gzip, &Unsized));
        assert!(!foreign_coding_in(&plain, &Unsized));
        let known = http_body_util::Full::new(bytes::Bytes::from_static(b"hello"));
        assert!(!foreign_coding_in(&gzip, &known));
    }

    #[test]
    fn a_coding_besides_chunked_is_foreign() {
        for (values, foreign) in [
            (&[][..], false),
            (&["chunked"][..], false),
            (&["Chunked"][..], false),
            (&["chunked, chunked"][..], false),
            (&["gzip, chunked"][..], true),
            (&["gzip", "chunked"][..], true),
            (&["chunked", "identity"][..], true),
            (&["compress,chunked"][..], true),
            (&[" chunked "][..], false),
        ] {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
            }
            assert_eq!(foreign_transfer_coding(&h), foreign, "{values:?}");
        }
    }

    #[test]
    fn keeps_te_trailers() {
        let mut h = map(&[("te", "trailers"), ("content-type", "application/grpc")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
        let mut h = map(&[("te", "gzip, Trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn keeps_upgrade_headers_on_upgrade() {
        let mut h = map(&[
            ("connection", "Upgrade, keep-alive, x-private"),
            ("upgrade", "websocket"),
            ("keep-alive", "1"),
            ("x-private", "1"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        // Only the two the upgrade needs stay: what `Connection` names and the other
        // hop-by-hop headers still go.
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn connection_cannot_remove_host() {
        let mut h = map(&[
            ("connection", "host, x-private"),
            ("host", "orders"),
            ("x-private", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["host"], "orders");
        assert!(!h.contains_key("x-private"));
        let mut h = map(&[("connection", "Host, upgrade"), ("host", "orders")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["host"], "orders");
    }

    #[test]
    fn only_websocket_and_listed_upgrades_are_offered_on() {
        let none: &[String] = &[];
        let h2c = ["h2c".to_string()];
        let versioned = ["proto/2".to_string()];
        let mut h = map(&[("upgrade", "h2c")]);
        assert!(!restrict_upgrade(&mut h, none));
        assert!(!h.contains_key("upgrade"));
        let mut h = map(&[("upgrade", "h2c")]);
        assert!(restrict_upgrade(&mut h, &h2c));
        assert_eq!(h["upgrade"], "h2c");
        let mut h = map(&[("upgrade", "h2c, WebSocket")]);
        assert!(restrict_upgrade(&mut h, none));
        assert_eq!(h["upgrade"], "WebSocket");
        let mut h = map(&[("upgrade", "proto/2"), ("upgrade", "proto/3")]);
        assert!(restrict_upgrade(&mut h, &versioned));
        assert_eq!(h["upgrade"], "proto/2");
        assert!(upgrade_allowed("proto/7", &["proto".to_string()]));
        assert!(!upgrade_allowed("proto", &versioned));
        assert!(!upgrade_allowed("websocketx", none));
    }

    #[test]
    fn a_switch_must_be_to_what_was_offered() {
        let switched = |to: &str| {
            let mut r = Response::new(crate::body::full(""));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("upgrade", to.parse().unwrap());
            r
        };
        let offer = HeaderValue::from_static("websocket");
        assert!(switched_as_offered(&switched("WebSocket"), &offer));
        assert!(!switched_as_offered(&switched("h2c"), &offer));
        let offer = HeaderValue::from_static("h2c, websocket");
        assert!(switched_as_offered(&switched("h2c"), &offer));
        // A protocol offered without a version takes any of its versions; one offered
        // with a version, only that one.
        let offer = HeaderValue::from_static("proto");
        assert!(switched_as_offered(&switched("proto/2"), &offer));
        let offer = HeaderValue::from_static("proto/1");
        assert!(!switched_as_offered(&switched("proto/2"), &offer));
        assert!(switched_as_offered(&switched("proto/1"), &offer));
    }

    #[test]
    fn detects_upgrades() {
        let req = Request::builder()
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade_request(&req));
        let req = Request::builder()
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(!is_upgrade_request(&req));
    }

    #[test]
    fn host_from_authority_or_header() {
        let req = Request::builder()
            .uri("http://a:1/x")
            .header("host", "b")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), Some("a:1"));
        let req = Request::builder()
            .uri("/x")
            .header("host", "b:2")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), Some("b:2"));
        let req = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(request_host(&req), None);
    }
}
