use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::BoxError;

use crate::FilterError;

pin_project! {
    /// The inner service's response, or the refusal.
    #[project = Proj]
    #[derive(Debug)]
    pub enum ResponseFuture<F> {
        /// The request was allowed.
        Inner { #[pin] fut: F },
        /// The request was refused; taken on first poll.
        Refused { err: Option<FilterError> },
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn inner(fut: F) -> Self {
        Self::Inner { fut }
    }

    pub(super) fn refused(err: FilterError) -> Self {
        Self::Refused { err: Some(err) }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Inner { fut } => fut.poll(cx).map_err(Into::into),
            Proj::Refused { err } => Poll::Ready(Err(err
                .take()
                .expect("ResponseFuture polled after completion")
                .into())),
        }
    }
}
