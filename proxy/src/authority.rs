//! The one rule for the authority a request names, the same for HTTP/1 `Host` and
//! HTTP/2 `:authority`, and the request targets the proxy refuses.
//!
//! The authority decides the route, so a request must name exactly one, and only that
//! one may travel on (RFC 9112 §3.2, RFC 9113 §8.3.1). [`settle`] applies the rule to
//! both protocols alike:
//!
//! 1. At most one `Host` header line: several are refused (400 `bad-request`), even when
//!    they agree and even beside an authority in the target.
//! 2. The authority is the request target's when it has one (HTTP/1 absolute-form or
//!    CONNECT's authority-form, HTTP/2 `:authority`), else the `Host` value. Either must
//!    be `host[:port]` without userinfo; a `Host` value that is not is refused (400) even
//!    when the target wins.
//! 3. Neither: the request names no authority ([`Named::Nothing`]); the edge refuses it
//!    (400 `bad-request`), except transparent mode, which passes it to its original
//!    destination like any host the mesh does not govern. An HTTP/1.1 request without a
//!    `Host` line is refused even with an absolute-form target (RFC 9112 §3.2).
//! 4. The request is rewritten so that only the authority goes on: HTTP/1 keeps exactly one
//!    `Host` carrying it (a differing `Host` is replaced, never forwarded); HTTP/2 carries
//!    it as `:authority` and drops any `Host` header (the target wins over `Host`, as RFC
//!    9112 says for absolute-form and as Envoy does for HTTP/2). Hop-by-hop stripping
//!    never removes `Host` ([`crate::message::strip_hop_by_hop`]), and the upstream
//!    clients dial the endpoint without replacing it ([`crate::upstream`]).
//!
//! [`check_target`] then refuses targets a governed host never takes: `CONNECT` (405
//! `method-not-allowed`: a governed host is served per request, never as a raw tunnel)
//! and the asterisk-form `*` (400: it names no resource a route could govern). `*` with
//! any method but `OPTIONS` is malformed (RFC 9112 §3.2.4) and refused for every host;
//! `OPTIONS *` to a host no policy claims is left to the original destination in
//! transparent mode (404 `no-route` in explicit mode, as any unknown host).

use std::cell::RefCell;

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Uri, Version};
use sluice_filters::reason::Reason;

/// Why a request is refused before any route sees it: the reason and a short text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The answer's reason (and so its status).
    pub(crate) reason: Reason,
    /// The answer's text.
    pub(crate) detail: &'static str,
}

const fn bad(detail: &'static str) -> Refusal {
    Refusal {
        reason: Reason::BadRequest,
        detail,
    }
}

/// Several `Host` lines.
pub(crate) const SEVERAL_HOSTS: Refusal = bad("several Host headers");
/// A `Host` value that is not `host[:port]`.
pub(crate) const INVALID_HOST: Refusal = bad("Host is not host[:port]");
/// A target authority that is not `host[:port]` (userinfo, a port that is no number).
pub(crate) const BAD_TARGET: Refusal = bad("the target's authority is not host[:port]");
/// An HTTP/1.1 request without `Host`.
pub(crate) const NO_HOST: Refusal = bad("no Host header");
/// No authority anywhere (HTTP/1.0 or HTTP/2 without one).
pub(crate) const NO_AUTHORITY: Refusal = bad("no Host or :authority");
/// An authority-form target (`GET svc HTTP/1.1`) with a method other than `CONNECT`
/// (RFC 9112 §3.2.3): it would be read as a host with path `/`, `GET logs` as host `logs`.
pub(crate) const AUTHORITY_FORM: Refusal = bad("an authority-form target is for CONNECT only");
/// `*` with a method other than `OPTIONS`.
pub(crate) const ASTERISK_NOT_OPTIONS: Refusal = bad("the * target is for OPTIONS only");
/// `OPTIONS *` to a governed host.
pub(crate) const ASTERISK: Refusal = bad("the * target names no route");
/// A `Transfer-Encoding` naming a coding besides `chunked`
/// ([`crate::message::foreign_transfer_coding`]).
pub(crate) const TRANSFER_CODING: Refusal = bad("a transfer coding other than chunked");
/// `CONNECT` to a governed host.
pub(crate) const CONNECT: Refusal = Refusal {
    reason: Reason::MethodNotAllowed,
    detail: "CONNECT is not allowed to a governed host",
};

/// What [`settle`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Named {
    /// One authority, now the only one the request carries
    /// ([`crate::message::request_host`] reads it).
    One,
    /// No authority at all.
    Nothing,
}

/// Applies the rule (module docs) to `req`: refuses it, or rewrites it so that its one
/// authority is the only one it carries.
pub(crate) fn settle<B>(req: &mut Request<B>) -> Result<Named, Refusal> {
    // HTTP/2 targets always carry a scheme; an HTTP/1 one without a scheme but with an
    // authority was written in authority form.
    if req.version() < Version::HTTP_2
        && req.uri().scheme().is_none()
        && req.uri().authority().is_some()
        && req.method() != Method::CONNECT
    {
        return Err(AUTHORITY_FORM);
    }
    let mut lines = req.headers().get_all(header::HOST).iter();
    let host = lines.next();
    if lines.next().is_some() {
        return Err(SEVERAL_HOSTS);
    }
    let had_host_line = host.is_some();
    // An empty `Host` says the target has no authority (RFC 9112 §3.2).
    let host = host.filter(|v| !v.is_empty());
    if host.is_some_and(|v| !valid_host(v)) {
        return Err(INVALID_HOST);
    }
    let target = req.uri().authority();
    if target.is_some_and(|a| !valid_target(a)) {
        return Err(BAD_TARGET);
    }
    if target.is_none() && host.is_none() {
        return Ok(Named::Nothing);
    }
    if req.version() == Version::HTTP_11 && !had_host_line {
        return Err(NO_HOST);
    }
    if req.version() < Version::HTTP_2 {
        // Only an absolute-form (or CONNECT) target can differ from `Host`.
        let replace = match (target, host) {
            (Some(t), Some(h)) if h.as_bytes() == t.as_str().as_bytes() => None,
            (Some(t), _) => Some(HeaderValue::from_str(t.as_str()).map_err(|_| BAD_TARGET)?),
            (None, _) => None,
        };
        if let Some(v) = replace {
            req.headers_mut().insert(header::HOST, v);
        }
    } else {
        if target.is_none()
            && let Some(v) = host
        {
            let a = parse(v.as_bytes()).ok_or(INVALID_HOST)?;
            let uri = with_authority(req.uri(), a).ok_or(INVALID_HOST)?;
            *req.uri_mut() = uri;
        }
        req.headers_mut().remove(header::HOST);
    }
    Ok(Named::One)
}

/// Refuses a target that a governed host never takes (module docs); `governed` says
/// whether the request's host has a policy, and is asked only when it matters.
pub(crate) fn check_target<B>(
    req: &Request<B>,
    governed: impl FnOnce() -> bool,
) -> Result<(), Refusal> {
    let asterisk = req.uri().path() == "*";
    if asterisk && req.method() != Method::OPTIONS {
        return Err(ASTERISK_NOT_OPTIONS);
    }
    if !asterisk && req.method() != Method::CONNECT {
        return Ok(());
    }
    if !governed() {
        return Ok(());
    }
    Err(if asterisk { ASTERISK } else { CONNECT })
}

thread_local! {
    /// The authority (`Host` or target) this thread last found valid. A connection's
    /// requests, and most of a sidecar's, name one: checking it (for `Host` a copy and
    /// http's authority parser, about 3 % of a proxied request's instructions) is paid
    /// when it changes.
    static LAST_VALID_HOST: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Longest `Host` value remembered as valid: a DNS name (253) and a port.
const REMEMBERED_HOST_MAX: usize = 259;

/// Whether a non-empty `Host` value is `host[:port]`; the same bytes as the last valid
/// authority on this thread are known to be.
fn valid_host(v: &HeaderValue) -> bool {
    remembered_or(v.as_bytes(), || parse(v.as_bytes()).is_some())
}

/// Whether a target's authority (HTTP/2 `:authority`, an absolute-form target) is
/// `host[:port]`, remembered as [`valid_host`] does: `Host` and `:authority` values
/// follow the same rule, so either kind of request finds the other's remembered.
fn valid_target(a: &Authority) -> bool {
    remembered_or(a.as_str().as_bytes(), || is_host_port(a))
}

/// `true` for the bytes this thread last found valid, else `check()`, remembering
/// bytes it passes.
fn remembered_or(v: &[u8], check: impl FnOnce() -> bool) -> bool {
    let remembered = LAST_VALID_HOST
        .try_with(|last| !v.is_empty() && *last.borrow() == v)
        .unwrap_or(false);
    if remembered {
        return true;
    }
    let valid = check();
    if valid && v.len() <= REMEMBERED_HOST_MAX {
        let _ = LAST_VALID_HOST.try_with(|last| {
            let mut last = last.borrow_mut();
            last.clear();
            last.extend_from_slice(v);
        });
    }
    valid
}

fn parse(bytes: &[u8]) -> Option<Authority> {
    Authority::try_from(bytes).ok().filter(is_host_port)
}

/// Whether `a` is `host[:port]`: no userinfo, and a port (if any) that is a number, which
/// `Authority` itself does not check.
fn is_host_port(a: &Authority) -> bool {
    match a.as_str().strip_prefix(a.host()) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix(':')
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()),
        // The host is not where the authority starts: userinfo precedes it.
        None => false,
    }
}

/// `uri` in absolute form with `authority` (HTTP/2 requests that named theirs in `Host`).
fn with_authority(uri: &Uri, authority: Authority) -> Option<Uri> {
    let mut parts = uri.clone().into_parts();
    if parts.scheme.is_none() {
        parts.scheme = Some(Scheme::HTTP);
    }
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::request_host;

    fn h1(target: &str, hosts: &[&str]) -> Request<()> {
        version(Version::HTTP_11, target, hosts)
    }

    fn version(v: Version, target: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(v).uri(target);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    fn hosts(req: &Request<()>) -> Vec<&str> {
        req.headers()
            .get_all(header::HOST)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn http1_origin_form_takes_its_one_host() {
        let mut req = h1("/x", &["orders:8080"]);
        assert_eq!(settle(&mut req), Ok(Named::One));
        assert_eq!(request_host(&req), Some("orders:8080"));
        assert_eq!(hosts(&req), ["orders:8080"]);
        for ok in ["[::1]:8080", "[::1]", "10.0.0.1:80", "Orders"] {
            assert_eq!(settle(&mut h1("/x", &[ok])), Ok(Named::One), "{ok}");
        }
    }

    #[test]
    fn several_hosts_are_refused_even_when_they_agree_or_the_target_wins() {
        for req in [
            h1("/x", &["a", "b"]),
            h1("/x", &["a", "a"]),
            h1("http://a/x", &["a", "b"]),
            version(Version::HTTP_2, "http://a/x", &["a", "a"]),
        ] {
            let mut req = req;
            assert_eq!(settle(&mut req), Err(SEVERAL_HOSTS), "{req:?}");
        }
    }

    #[test]
    fn no_host_is_refused_or_named_nothing() {
        assert_eq!(settle(&mut h1("/x", &[])), Ok(Named::Nothing));
        assert_eq!(settle(&mut h1("/x", &[""])), Ok(Named::Nothing));
        assert_eq!(
            settle(&mut version(Version::HTTP_2, "/x", &[])),
            Ok(Named::Nothing)
        );
        // HTTP/1.1 must carry Host even when the target names the authority.
        assert_eq!(settle(&mut h1("http://a/x", &[])), Err(NO_HOST));
        // HTTP/1.0 need not.
        let mut req = version(Version::HTTP_10, "http://a/x", &[]);
        assert_eq!(settle(&mut req), Ok(Named::One));
        assert_eq!(hosts(&req), ["a"]);
    }

    #[test]
    fn absolute_form_replaces_a_differing_host() {
        let mut req = h1("http://orders:80/x", &["evil"]);
        assert_eq!(settle(&mut req), Ok(Named::One));
        assert_eq!(request_host(&req), Some("orders:80"));
        assert_eq!(hosts(&req), ["orders:80"]);
        let mut req = h1("http://orders/x", &["orders"]);
        assert_eq!(settle(&mut req), Ok(Named::One));
        assert_eq!(hosts(&req), ["orders"]);
    }

    #[test]
    fn invalid_hosts_and_userinfo_are_refused() {
        for bad in ["a b", "a/b", "user@a", "a:port", "a:", "a:99999"] {
            assert_eq!(settle(&mut h1("/x", &[bad])), Err(INVALID_HOST), "{bad}");
        }
        // An invalid Host is refused even when the target's authority wins.
        assert_eq!(settle(&mut h1("http://a/x", &["a b"])), Err(INVALID_HOST));
        assert_eq!(settle(&mut h1("http://u@a/x", &["a"])), Err(BAD_TARGET));
    }

    #[test]
    fn a_remembered_valid_host_passes_only_byte_for_byte() {
        // Each alternation: a valid host is remembered, then values that differ from it
        // by a byte, a prefix or a suffix are still parsed and refused, and the
        // remembered one still passes after them.
        let long = format!("{}:80", "a".repeat(REMEMBERED_HOST_MAX));
        for (good, bads) in [
            (
                "orders:8080",
                ["orders:8080 ", "orders:808x", "u@orders:8080"],
            ),
            ("a", ["a:", "a b", "a:99999"]),
            (long.as_str(), ["a a", "@", "[::1"]),
        ] {
            for _ in 0..2 {
                assert_eq!(settle(&mut h1("/x", &[good])), Ok(Named::One), "{good}");
                for bad in bads {
                    assert_eq!(settle(&mut h1("/x", &[bad])), Err(INVALID_HOST), "{bad}");
                }
            }
        }
        // Over the length remembered: checked each time, never kept.
        let v = HeaderValue::from_str(&long).unwrap();
        assert!(valid_host(&v));
        assert!(LAST_VALID_HOST.with(|l| *l.borrow() != long.as_bytes()));
        // HTTP/2 targets share the memory: a remembered `:authority` passes, one that
        // differs is still checked, and Host and target values pass each other's.
        for _ in 0..2 {
            let mut req = version(Version::HTTP_2, "http://orders:8080/x", &[]);
            assert_eq!(settle(&mut req), Ok(Named::One));
            let mut req = version(Version::HTTP_2, "http://u@orders:8080/x", &[]);
            assert_eq!(settle(&mut req), Err(BAD_TARGET));
            let mut req = version(Version::HTTP_2, "http://orders:x/x", &[]);
            assert_eq!(settle(&mut req), Err(BAD_TARGET));
            assert_eq!(settle(&mut h1("/x", &["orders:8080"])), Ok(Named::One));
            assert_eq!(settle(&mut h1("/x", &["orders:8080@"])), Err(INVALID_HOST));
        }
        // An HTTP/2 request naming its authority only in Host still gets it as :authority.
        let mut req = version(Version::HTTP_2, "/x", &["orders:8080"]);
        assert_eq!(settle(&mut req), Ok(Named::One));
        assert_eq!(
            req.uri().authority().map(|a| a.as_str()),
            Some("orders:8080")
        );
    }

    #[test]
    fn http2_authority_wins_and_host_is_dropped() {
        let mut req = version(Version::HTTP_2, "http://orders/x", &["other"]);
        assert_eq!(settle(&mut req), Ok(Named::One));
        assert_eq!(request_host(&req), Some("orders"));
        assert!(hosts(&req).is_empty());
        // Host alone becomes the :authority.
        let mut req = version(Version::HTTP_2, "/x?q=1", &["orders:81"]);
        assert_eq!(settle(&mut req), Ok(Named::One));
        assert_eq!(req.uri(), "http://orders:81/x?q=1");
        assert!(hosts(&req).is_empty());
    }

    #[test]
    fn connect_and_asterisk_refused_for_governed_hosts() {
        let req = |m: Method, t: &str| Request::builder().method(m).uri(t).body(()).unwrap();
        let connect = req(Method::CONNECT, "orders:443");
        assert_eq!(check_target(&connect, || true), Err(CONNECT));
        assert_eq!(check_target(&connect, || false), Ok(()));
        let options = req(Method::OPTIONS, "*");
        assert_eq!(check_target(&options, || true), Err(ASTERISK));
        assert_eq!(check_target(&options, || false), Ok(()));
        let get = req(Method::GET, "*");
        assert_eq!(
            check_target(&get, || unreachable!("refused for every host")),
            Err(ASTERISK_NOT_OPTIONS)
        );
        let plain = req(Method::OPTIONS, "/x");
        assert_eq!(check_target(&plain, || unreachable!("not asked")), Ok(()));
    }
}
