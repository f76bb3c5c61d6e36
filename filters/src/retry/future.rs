use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::BoxError;

/// The boxed retry loop: the slow path.
pub(crate) type RetryLoop<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

pin_project! {
    /// Response future of [`Retry`](super::Retry): the inner future itself when the
    /// request cannot be retried, the boxed retry loop otherwise.
    pub struct ResponseFuture<F, R> {
        #[pin]
        kind: Kind<F, R>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, R> {
        Direct { #[pin] fut: F },
        Retrying { fut: RetryLoop<R> },
    }
}

impl<F, R> ResponseFuture<F, R> {
    pub(crate) fn direct(fut: F) -> Self {
        Self {
            kind: Kind::Direct { fut },
        }
    }

    pub(crate) fn retrying(fut: RetryLoop<R>) -> Self {
        Self {
            kind: Kind::Retrying { fut },
        }
    }
}

impl<F, R, E> Future for ResponseFuture<F, R>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Direct { fut } => Poll::Ready(ready!(fut.poll(cx)).map_err(Into::into)),
            KindProj::Retrying { fut } => fut.as_mut().poll(cx),
        }
    }
}
