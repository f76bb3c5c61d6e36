use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::BoxError;

use crate::FilterError;

pin_project! {
    /// The inner service's response, or the refusal.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        // `None` when refused: the inner service was never called.
        #[pin]
        inner: Option<F>,
        refused: Option<FilterError>,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn inner(fut: F) -> Self {
        Self {
            inner: Some(fut),
            refused: None,
        }
    }

    pub(super) fn refused(err: FilterError) -> Self {
        Self {
            inner: None,
            refused: Some(err),
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.as_pin_mut() {
            Some(fut) => fut.poll(cx).map_err(Into::into),
            None => Poll::Ready(Err(this
                .refused
                .take()
                .expect("ResponseFuture polled after completion")
                .into())),
        }
    }
}
