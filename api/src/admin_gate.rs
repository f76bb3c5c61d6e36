//! Who may read an admin port's protected routes: the rule the proxy's and the control
//! plane's admin servers share.
//!
//! An admin port bound to loopback is reachable only from inside its host or pod, so
//! every route answers there. Bound beyond loopback (the proxy's `0.0.0.0:15000` in a
//! pod, the control plane's `0.0.0.0:15014`), only the routes the kubelet and
//! Prometheus need (`/live`, `/ready`, `/metrics`, the proxy's app probes) answer
//! without `Authorization: Bearer <token>`; without a configured token the others are
//! closed. The peer's address plays no part: a relay inside the pod would make any
//! peer look local.
//!
//! The token is taken as `Authorization: Bearer <token>` (`sluicectl`, scripts) or as
//! the password of HTTP Basic (`Authorization: Basic base64(any-user:token)`), which is
//! what a browser sends for the admin page after its own login prompt
//! ([`BASIC_CHALLENGE`]) and then on every call the page makes.
//!
//! A token given as a file ([`AdminGate::with_token_file`]) follows the file: it may
//! appear after start (an optional Secret volume created later), change (the kubelet
//! swaps a Secret volume's files when the Secret is rotated) or vanish, and each
//! protected request answers by the file as it is then, with no restart. While the file
//! is missing, empty or unreadable no token opens the protected routes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;

/// The admin token rule of one admin listener.
#[derive(Clone, Debug)]
pub struct AdminGate {
    token: Token,
    open: bool,
}

/// Where the gate's token comes from.
#[derive(Clone, Debug)]
enum Token {
    None,
    Fixed(Arc<str>),
    File(Arc<TokenFile>),
}

/// Why a protected admin route refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token is configured: the route is closed on a port bound beyond loopback.
    NoTokenConfigured,
    /// The request carried no token or the wrong one.
    BadToken,
    /// A token file is configured but holds no token now (missing, empty or
    /// unreadable): the route is closed until it does.
    TokenFileUnusable,
}

/// The `WWW-Authenticate` challenge sent with a 401.
pub const CHALLENGE: &str = "Bearer realm=\"sluice-admin\"";

/// The second challenge sent with a 401, which makes a browser ask for the token
/// (as the password) on the admin page.
pub const BASIC_CHALLENGE: &str = "Basic realm=\"sluice-admin\", charset=\"UTF-8\"";

impl Refusal {
    /// The status it answers with: 401 (send the token, with [`CHALLENGE`]) or 403
    /// (no token would help).
    pub fn status(self) -> u16 {
        match self {
            Refusal::NoTokenConfigured | Refusal::TokenFileUnusable => 403,
            Refusal::BadToken => 401,
        }
    }

    /// The `WWW-Authenticate` challenges it answers with: on a 401 the Bearer one (for
    /// tools) and the Basic one (so a browser asks for the token, whichever admin route
    /// it opened first); none on a 403.
    pub fn challenges(self) -> &'static [&'static str] {
        match self {
            Refusal::BadToken => &[CHALLENGE, BASIC_CHALLENGE],
            Refusal::NoTokenConfigured | Refusal::TokenFileUnusable => &[],
        }
    }

    /// The text the refusal answers with.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::NoTokenConfigured => {
                "forbidden: this admin port is bound beyond loopback and no admin token is \
                 configured (--admin-token-file)\n"
            }
            Refusal::BadToken => "unauthorized: send Authorization: Bearer <admin token>\n",
            Refusal::TokenFileUnusable => {
                "forbidden: this admin port is bound beyond loopback and its admin token file \
                 (--admin-token-file) is missing or empty; in a pod, create the Secret the \
                 injector mounts (key `token`) and retry, no restart needed\n"
            }
        }
    }
}

impl AdminGate {
    /// The gate of a listener bound at `bound`, with `token` if one is configured.
    pub fn new(bound: SocketAddr, token: Option<Arc<str>>) -> Self {
        Self {
            token: token.map_or(Token::None, Token::Fixed),
            open: is_loopback(bound),
        }
    }

    /// The gate of a listener bound at `bound` whose token is the content of `path`,
    /// read now and again whenever the file changes. A missing or empty file is not an
    /// error: it is logged, and the protected routes stay closed until it holds a token.
    pub fn with_token_file(bound: SocketAddr, path: PathBuf) -> Self {
        Self {
            token: Token::File(Arc::new(TokenFile::open(path))),
            open: is_loopback(bound),
        }
    }

    /// Reads a token file: its content, surrounding whitespace trimmed; an empty file is
    /// refused (it would match an empty bearer).
    pub fn read_token(path: &Path) -> std::io::Result<Arc<str>> {
        let text = std::fs::read_to_string(path)?;
        let token = text.trim();
        if token.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the admin token file is empty",
            ));
        }
        Ok(Arc::from(token))
    }

    /// Whether every route answers without a token (bound to loopback).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Checks a protected route's request, given its `Authorization` header value.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        if self.open {
            return Ok(());
        }
        let token = match &self.token {
            Token::None => return Err(Refusal::NoTokenConfigured),
            Token::Fixed(t) => t.clone(),
            Token::File(f) => f.current().ok_or(Refusal::TokenFileUnusable)?,
        };
        let given = authorization.and_then(|v| {
            if let Some(bearer) = v.strip_prefix(b"Bearer ") {
                return Some(bearer.trim_ascii().to_vec());
            }
            let basic = v.strip_prefix(b"Basic ")?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(basic.trim_ascii())
                .ok()?;
            // The user name is anything; the password is the token.
            let colon = decoded.iter().position(|b| *b == b':')?;
            Some(decoded[colon + 1..].to_vec())
        });
        match given {
            Some(g) if constant_time_eq(&g, token.as_bytes()) => Ok(()),
            _ => Err(Refusal::BadToken),
        }
    }
}

fn is_loopback(bound: SocketAddr) -> bool {
    bound.ip().to_canonical().is_loopback()
}

/// A token file, read on each request that needs its token. Those are an operator's
/// requests, not traffic, and a read of a few bytes costs about what a `stat` would,
/// without the blind spot of metadata (a file replaced within one timestamp tick by one
/// of the same length and a recycled inode number would look unchanged). The last
/// outcome is kept, lock-free, only so the log says each change once.
#[derive(Debug)]
struct TokenFile {
    path: PathBuf,
    last: ArcSwap<Result<Arc<str>, String>>,
}

impl TokenFile {
    fn open(path: PathBuf) -> Self {
        let first = AdminGate::read_token(&path).map_err(|e| e.to_string());
        log_change(&path, None, &first);
        Self {
            path,
            last: ArcSwap::from_pointee(first),
        }
    }

    /// The token the file holds now.
    fn current(&self) -> Option<Arc<str>> {
        let now = AdminGate::read_token(&self.path).map_err(|e| e.to_string());
        let last = self.last.load();
        if now != **last {
            log_change(&self.path, Some(&last), &now);
            self.last.store(Arc::new(now.clone()));
        }
        now.ok()
    }
}

/// Says in the log how the token file's outcome changed from `before` (`None`: at start).
fn log_change(
    path: &Path,
    before: Option<&Result<Arc<str>, String>>,
    now: &Result<Arc<str>, String>,
) {
    match (before, now) {
        (None | Some(Err(_)), Ok(_)) => {
            tracing::info!(path = %path.display(), "admin token loaded")
        }
        (Some(Ok(_)), Ok(_)) => tracing::info!(
            path = %path.display(),
            "admin token changed; the previous one no longer opens"
        ),
        (_, Err(e)) => tracing::warn!(
            path = %path.display(),
            error = %e,
            "admin token file unusable: beyond loopback, only /live, /ready, /metrics and \
             the app probes answer until it holds a token"
        ),
    }
}

/// Compares without returning early, so the time taken says nothing of where the
/// first difference lies.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_401_carries_challenges_and_it_carries_both() {
        assert_eq!(Refusal::BadToken.status(), 401);
        assert_eq!(Refusal::BadToken.challenges(), [CHALLENGE, BASIC_CHALLENGE]);
        for closed in [Refusal::NoTokenConfigured, Refusal::TokenFileUnusable] {
            assert_eq!(closed.status(), 403);
            assert!(closed.challenges().is_empty(), "{closed:?}");
        }
    }

    #[test]
    fn loopback_is_open_and_beyond_needs_the_token() {
        let local = AdminGate::new("127.0.0.1:15000".parse().unwrap(), None);
        assert!(local.is_open());
        assert_eq!(local.check(None), Ok(()));
        let mapped = AdminGate::new("[::ffff:127.0.0.1]:15000".parse().unwrap(), None);
        assert!(mapped.is_open());

        let wide = AdminGate::new("0.0.0.0:15000".parse().unwrap(), Some("s3cret".into()));
        assert!(!wide.is_open());
        assert_eq!(wide.check(None), Err(Refusal::BadToken));
        assert_eq!(wide.check(Some(b"Bearer wrong")), Err(Refusal::BadToken));
        assert_eq!(wide.check(Some(b"Basic s3cret")), Err(Refusal::BadToken));
        assert_eq!(wide.check(Some(b"Bearer s3cret")), Ok(()));
        assert_eq!(wide.check(Some(b"Bearer s3cret ")), Ok(()));
        // A browser's Basic login: any user, the token as the password.
        assert_eq!(wide.check(Some(b"Basic YWRtaW46czNjcmV0")), Ok(())); // admin:s3cret
        assert_eq!(wide.check(Some(b"Basic OnMzY3JldA==")), Ok(())); // :s3cret
        assert_eq!(
            wide.check(Some(b"Basic YWRtaW46d3Jvbmc=")), // admin:wrong
            Err(Refusal::BadToken)
        );
        assert_eq!(wide.check(Some(b"Basic czNjcmV0")), Err(Refusal::BadToken)); // no colon
        assert_eq!(wide.check(Some(b"Basic !!!")), Err(Refusal::BadToken));

        let closed = AdminGate::new("10.0.0.7:15000".parse().unwrap(), None);
        assert_eq!(
            closed.check(Some(b"Bearer ")),
            Err(Refusal::NoTokenConfigured)
        );
    }

    /// Only the whole token opens: not a prefix of it, not a longer string starting
    /// with it, and not a token of the same length differing in places.
    #[test]
    fn only_the_exact_token_opens() {
        let wide = AdminGate::new("0.0.0.0:15000".parse().unwrap(), Some("s3cret".into()));
        for wrong in [
            &b"Bearer s3cre"[..],
            b"Bearer s3crets",
            b"Bearer ",
            b"Bearer s3creu",
            // Two differences of the same bits ('r' ^ 's' == '2' ^ '3').
            b"Bearer r2cret",
        ] {
            assert_eq!(
                wide.check(Some(wrong)),
                Err(Refusal::BadToken),
                "{}",
                String::from_utf8_lossy(wrong)
            );
        }
    }

    #[test]
    fn refusals_answer_401_or_403_and_say_what_to_do() {
        assert_eq!(Refusal::BadToken.status(), 401);
        assert!(Refusal::BadToken.message().contains("Bearer <admin token>"));
        assert_eq!(Refusal::NoTokenConfigured.status(), 403);
        assert!(
            Refusal::NoTokenConfigured
                .message()
                .contains("--admin-token-file")
        );
    }

    /// Replaces `path` as the kubelet replaces a Secret volume's file: a new file
    /// renamed over the name, so readers see the old content or the new, never half.
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// A token file followed by the gate: missing at start (an optional Secret not
    /// created yet) closes the routes without failing; created, it opens them; rotated,
    /// only the new token opens; removed or emptied, none does.
    #[test]
    fn a_token_file_is_followed_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let wide = AdminGate::with_token_file("0.0.0.0:15000".parse().unwrap(), path.clone());
        assert_eq!(
            wide.check(Some(b"Bearer first")),
            Err(Refusal::TokenFileUnusable)
        );
        assert_eq!(Refusal::TokenFileUnusable.status(), 403);

        replace(&path, "first\n");
        assert_eq!(wide.check(Some(b"Bearer first")), Ok(()));
        assert_eq!(wide.check(Some(b"Bearer other")), Err(Refusal::BadToken));
        // Clones (one per connection) share what was read.
        assert_eq!(wide.clone().check(Some(b"Bearer first")), Ok(()));

        // Rotated to a token of the same length.
        replace(&path, "secnd\n");
        assert_eq!(wide.check(Some(b"Bearer first")), Err(Refusal::BadToken));
        assert_eq!(wide.check(Some(b"Bearer secnd")), Ok(()));

        replace(&path, "\n");
        assert_eq!(
            wide.check(Some(b"Bearer secnd")),
            Err(Refusal::TokenFileUnusable)
        );
        replace(&path, "third");
        assert_eq!(wide.check(Some(b"Bearer third")), Ok(()));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            wide.check(Some(b"Bearer third")),
            Err(Refusal::TokenFileUnusable)
        );

        // On loopback the file plays no part.
        let local = AdminGate::with_token_file("127.0.0.1:15000".parse().unwrap(), path);
        assert_eq!(local.check(None), Ok(()));
    }

    #[test]
    fn empty_token_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  \n").unwrap();
        assert!(AdminGate::read_token(&path).is_err());
        std::fs::write(&path, "abc\n").unwrap();
        assert_eq!(&*AdminGate::read_token(&path).unwrap(), "abc");
    }
}
