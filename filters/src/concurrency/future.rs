use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::BoxError;

use super::Permit;
use crate::FilterError;

/// The boxed slow path: a request waiting in the queue, then its call.
type Queued<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

pin_project! {
    /// Response future of [`ConcurrencyLimit`](super::ConcurrencyLimit).
    pub struct ResponseFuture<F, T> {
        #[pin]
        kind: Kind<F, T>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, T> {
        Admitted {
            #[pin]
            fut: F,
            permit: Option<Permit>,
        },
        Queued {
            fut: Queued<T>,
        },
        Refused {
            err: Option<FilterError>,
        },
    }
}

impl<F, T> ResponseFuture<F, T> {
    pub(crate) fn admitted(fut: F, permit: Permit) -> Self {
        Self {
            kind: Kind::Admitted {
                fut,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn queued(fut: Queued<T>) -> Self {
        Self {
            kind: Kind::Queued { fut },
        }
    }

    pub(crate) fn refused(err: FilterError) -> Self {
        Self {
            kind: Kind::Refused { err: Some(err) },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Admitted { fut, permit } => {
                let out = ready!(fut.poll(cx));
                // Only answered requests teach the limit; a failed call just frees its slot.
                match (out.is_ok(), permit.take()) {
                    (true, Some(p)) => p.complete(),
                    (_, p) => drop(p),
                }
                Poll::Ready(out.map_err(Into::into))
            }
            KindProj::Queued { fut } => fut.as_mut().poll(cx),
            KindProj::Refused { err } => Poll::Ready(Err(err
                .take()
                .expect("ResponseFuture polled after completion")
                .into())),
        }
    }
}
