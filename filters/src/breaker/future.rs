use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;

use super::circuit::Permit;
use crate::FilterError;
use crate::classify::{classify_error, is_grpc};

pin_project! {
    /// Response future of [`Breaker`](super::Breaker).
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Rejected { error: Option<FilterError> },
        Called { #[pin] fut: F, permit: Option<Permit> },
        Unguarded { #[pin] fut: F },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn called(fut: F, permit: Option<Permit>) -> Self {
        Self {
            state: State::Called { fut, permit },
        }
    }

    pub(crate) fn unguarded(fut: F) -> Self {
        Self {
            state: State::Unguarded { fut },
        }
    }

    pub(crate) fn rejected(error: FilterError) -> Self {
        Self {
            state: State::Rejected { error: Some(error) },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Rejected { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion").into()))
            }
            StateProj::Unguarded { fut } => Poll::Ready(
                ready!(fut.poll(cx))
                    .map(|rsp| rsp.map(ResponseBody::passthrough))
                    .map_err(Into::into),
            ),
            StateProj::Called { fut, permit } => {
                let res = ready!(fut.poll(cx));
                let permit = permit.take().expect("polled after completion");
                match res {
                    Ok(rsp) => Poll::Ready(Ok(judge_response(rsp, permit))),
                    Err(e) => {
                        let e: BoxError = e.into();
                        if permit.client_failed() {
                            // The client's body broke off (or stalled past its timeout):
                            // the upstream is not at fault.
                            permit.cancel();
                            return Poll::Ready(Err(e));
                        }
                        let class = classify_error(&*e);
                        if permit.params().is_failure_error(class) {
                            permit.failure(class_name(class));
                        }
                        Poll::Ready(Err(e))
                    }
                }
            }
        }
    }
}

fn class_name(c: crate::classify::ErrorClass) -> &'static str {
    use crate::classify::ErrorClass::*;
    match c {
        Timeout => "timeout",
        ConnectFailure | Unready => "connect-failure",
        RefusedStream => "refused-stream",
        Reset => "reset",
        BreakerOpen => "breaker-open",
        Other => "error",
    }
}

/// Counts a response head at once, or hands the permit to the body when the verdict
/// waits for gRPC trailers.
fn judge_response<B>(rsp: Response<B>, permit: Permit) -> Response<ResponseBody<B>> {
    let params = permit.params();
    if params.is_failure_status(rsp.status()) {
        permit.failure("5xx");
        return rsp.map(ResponseBody::passthrough);
    }
    if is_grpc(rsp.headers()) {
        match params.is_failure_grpc(rsp.headers()) {
            Some(true) => permit.failure("grpc-status"),
            Some(false) => permit.success(),
            None => return rsp.map(|b| ResponseBody::tracked(b, permit)),
        }
    } else {
        permit.success();
    }
    rsp.map(ResponseBody::passthrough)
}

pin_project! {
    /// Response body of [`Breaker`](super::Breaker): the upstream body unchanged.
    /// For a gRPC response without a status in its headers it watches the frames go
    /// by (nothing is buffered) and counts the `grpc-status` of the trailers.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        permit: Option<Permit>,
    }
}

impl<B> ResponseBody<B> {
    fn passthrough(inner: B) -> Self {
        Self {
            inner,
            permit: None,
        }
    }

    fn tracked(inner: B, permit: Permit) -> Self {
        Self {
            inner,
            permit: Some(permit),
        }
    }

    /// The upstream body.
    pub fn into_inner(self) -> B {
        self.inner
    }

    /// The upstream body when nothing is left to watch in it (every response but a
    /// gRPC one whose status waits for the trailers), else the body as it is.
    pub fn into_untracked(self) -> Result<B, Self> {
        match self.permit {
            None => Ok(self.inner),
            Some(_) => Err(self),
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("tracked", &self.permit.is_some())
            .finish()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(permit) = this.permit.take() {
            match &frame {
                Some(Ok(f)) => match f.trailers_ref() {
                    Some(trailers) => match permit.params().is_failure_grpc(trailers) {
                        Some(true) => permit.failure("grpc-status"),
                        _ => permit.success(),
                    },
                    None => *this.permit = Some(permit),
                },
                Some(Err(_)) => {
                    if permit
                        .params()
                        .is_failure_error(crate::classify::ErrorClass::Reset)
                    {
                        permit.failure("reset");
                    }
                }
                None => permit.success(),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
