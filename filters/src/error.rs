//! The one error type of the governance layers.
//!
//! Layers fail with a `FilterError` boxed into tower's `BoxError`; the proxy's
//! rescue at the server edge finds it with `downcast_ref` and answers with its
//! [`Reason`].

use std::time::Duration;

use crate::reason::Reason;

/// Why a governance layer refused or cut off a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A rate limit refused the request.
    #[error("rate limited; retry after {retry_after:?}")]
    RateLimited {
        /// When a token will be available again.
        retry_after: Duration,
        /// `RateLimit-Policy` header value (IETF draft), e.g. `"default";q=200;w=1`.
        policy: String,
        /// `RateLimit` header value (IETF draft), e.g. `"default";r=0;t=1`.
        state: String,
        /// Decided by a fleet limit's local fallback while Redis is unreachable.
        degraded: bool,
    },
    /// The route's total timeout or the per-try timeout elapsed.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// The circuit breaker of the chosen route × backend is open.
    #[error("circuit breaker open for {route}/{backend}")]
    BreakerOpen {
        /// Route name.
        route: String,
        /// Backend name.
        backend: String,
    },
    /// Every endpoint of the chosen backend is ejected or none is known.
    #[error("no healthy endpoint for backend {0}")]
    NoHealthyEndpoint(String),
    /// The peer identity is not in the route's `inbound.allow`.
    #[error("peer {0:?} is not allowed")]
    Forbidden(Option<String>),
    /// The inbound concurrency limit was reached and the request could not wait in its queue.
    #[error("overloaded ({priority} request shed); retry after {retry_after:?}")]
    Overloaded {
        /// When the caller may try again.
        retry_after: Duration,
        /// The priority level of the shed request.
        priority: std::sync::Arc<str>,
    },
}

impl FilterError {
    /// Why the proxy answers instead of the upstream: its `x-sluice-reason`, HTTP and
    /// gRPC status.
    pub fn reason(&self) -> Reason {
        match self {
            FilterError::RateLimited { .. } => Reason::RateLimited,
            FilterError::Timeout(_) => Reason::Timeout,
            FilterError::BreakerOpen { .. } => Reason::BreakerOpen,
            FilterError::NoHealthyEndpoint(_) => Reason::NoHealthyEndpoint,
            FilterError::Forbidden(_) => Reason::Forbidden,
            FilterError::Overloaded { .. } => Reason::Overloaded,
        }
    }
}

/// Finds a `FilterError` anywhere in a boxed error's source chain.
pub fn find_filter_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a FilterError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(f) = e.downcast_ref::<FilterError>() {
            return Some(f);
        }
        cur = e.source();
    }
    None
}

/// An error of a request that had been sent to `backend` when it failed, made by a layer
/// below the split that knows where the request went (the retry layer's timeouts), so
/// that the proxy counts it against that backend, as a canary's checks need: a canary
/// that only times out must not look clean.
#[derive(Debug)]
pub struct AtBackend {
    backend: std::sync::Arc<str>,
    source: tower::BoxError,
}

impl AtBackend {
    /// `err`, naming `backend` as where the request went.
    pub fn wrap(backend: std::sync::Arc<str>, err: impl Into<tower::BoxError>) -> tower::BoxError {
        Box::new(Self {
            backend,
            source: err.into(),
        })
    }

    /// The backend named by the first `AtBackend` in `err`'s source chain.
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a str> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(at) = e.downcast_ref::<AtBackend>() {
                return Some(&at.backend);
            }
            cur = e.source();
        }
        None
    }
}

impl std::fmt::Display for AtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backend {}", self.backend)
    }
}

impl std::error::Error for AtBackend {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A transport failure talking to an upstream, typed so that breakers and retries can
/// tell "never sent" from "sent and lost".
///
/// The proxy's client wraps its connect and stream errors in this type; the breaker
/// and retry layers find it anywhere in a `BoxError`'s source chain.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {source}")]
pub struct UpstreamError {
    /// What went wrong.
    pub kind: UpstreamErrorKind,
    /// The transport's own error.
    #[source]
    pub source: tower::BoxError,
}

/// The kinds of [`UpstreamError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamErrorKind {
    /// No connection could be made: the request was never sent.
    #[error("connect failure")]
    ConnectFailure,
    /// This proxy could not dial yet (it holds no workload certificate to present):
    /// the request was never sent, and no endpoint is at fault, so none is ejected and
    /// no breaker counts it.
    #[error("not ready to connect")]
    Unready,
    /// An HTTP/2 peer refused the stream (REFUSED_STREAM): the request was never processed.
    #[error("stream refused")]
    RefusedStream,
    /// The connection or stream was reset after the request was sent.
    #[error("connection reset")]
    Reset,
}

impl UpstreamError {
    /// Wraps a transport error with its kind.
    pub fn new(kind: UpstreamErrorKind, source: impl Into<tower::BoxError>) -> Self {
        Self {
            kind,
            source: source.into(),
        }
    }
}

/// An error and its sources, `: `-separated, each said once, for logs.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            let text = e.to_string();
            if !last.contains(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            cur = e.source();
        }
        Ok(())
    }
}
