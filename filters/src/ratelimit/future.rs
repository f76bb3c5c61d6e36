use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderName, HeaderValue, Response};
use pin_project_lite::pin_project;
use tower::BoxError;

use crate::FilterError;

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub(crate) const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub(crate) const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// Marks an answer decided by a fleet limit's local fallback while Redis is unreachable.
pub(crate) const RATELIMIT_SCOPE: HeaderName = HeaderName::from_static("x-sluice-ratelimit-scope");
/// The value of [`RATELIMIT_SCOPE`].
pub(crate) const DEGRADED_LOCAL: HeaderValue = HeaderValue::from_static("degraded-local");

pin_project! {
    /// Response future of [`RateLimit`](super::RateLimit).
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner {
            #[pin]
            fut: F,
            headers: Option<(HeaderValue, HeaderValue)>,
            degraded: bool,
        },
        Refused {
            err: Option<FilterError>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(
        fut: F,
        headers: Option<(HeaderValue, HeaderValue)>,
        degraded: bool,
    ) -> Self {
        Self {
            kind: Kind::Inner {
                fut,
                headers,
                degraded,
            },
        }
    }

    pub(crate) fn refused(err: FilterError) -> Self {
        Self {
            kind: Kind::Refused { err: Some(err) },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner {
                fut,
                headers,
                degraded,
            } => {
                let mut rsp = ready!(fut.poll(cx)).map_err(Into::into)?;
                if *degraded {
                    rsp.headers_mut().insert(RATELIMIT_SCOPE, DEGRADED_LOCAL);
                }
                if let Some((policy, state)) = headers.take() {
                    let h = rsp.headers_mut();
                    // An upstream that limits on its own knows its quota better. One
                    // lookup for the check and the insert: the name is hashed once.
                    if let http::header::Entry::Vacant(e) = h.entry(RATELIMIT) {
                        e.insert(state);
                        h.insert(RATELIMIT_POLICY, policy);
                    }
                }
                Poll::Ready(Ok(rsp))
            }
            KindProj::Refused { err } => Poll::Ready(Err(err
                .take()
                .expect("ResponseFuture polled after completion")
                .into())),
        }
    }
}
