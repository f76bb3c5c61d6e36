use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::BoxError;

use super::BalanceParams;
use super::ConnectFailureClassifier;
use super::endpoint::{EndpointState, Pick};
use crate::{ErrorChain, FilterError};

/// Accounts one request to its endpoint: in flight until dropped, then latency or ejection.
pub(crate) struct Outcome {
    endpoint: Arc<EndpointState>,
    probe: bool,
    settled: bool,
    started: Instant,
    decay: Duration,
    eject_base: Duration,
    eject_max: Duration,
    classify: ConnectFailureClassifier,
}

impl Outcome {
    pub(crate) fn new(
        pick: Pick,
        params: &BalanceParams,
        classify: ConnectFailureClassifier,
    ) -> Self {
        pick.endpoint.start();
        Self {
            endpoint: pick.endpoint,
            probe: pick.probe,
            settled: false,
            started: pick.at,
            decay: params.decay,
            eject_base: params.eject_base,
            eject_max: params.eject_max,
            classify,
        }
    }

    fn settle<T>(&mut self, result: &Result<T, BoxError>) {
        self.settled = true;
        let now = crate::clock::now();
        match result {
            Err(e) if (self.classify)(&**e) => {
                let ejected = self
                    .endpoint
                    .eject(now, self.probe, self.eject_base, self.eject_max);
                let addr = self.endpoint.endpoint();
                match ejected {
                    // Once per outage: the operator's first sight of an address that does
                    // not resolve or refuses, with why.
                    Some(len) => tracing::warn!(
                        endpoint = %addr.0,
                        error = %ErrorChain(&**e),
                        ejected_for = ?len,
                        "endpoint ejected: cannot connect"
                    ),
                    None => tracing::debug!(
                        endpoint = %addr.0,
                        error = %ErrorChain(&**e),
                        "endpoint still unreachable"
                    ),
                }
            }
            Ok(_) => {
                self.endpoint
                    .observe_rtt(now, now - self.started, self.decay);
                if self.probe {
                    self.restore();
                }
            }
            // Any other failure still proves the endpoint accepts connections.
            Err(_) => {
                self.endpoint.heard();
                if self.probe {
                    self.restore();
                }
            }
        }
    }
}

impl Outcome {
    /// The probe got through: back in rotation, said once, as its ejection was.
    fn restore(&self) {
        self.endpoint.restore();
        tracing::info!(endpoint = %self.endpoint.endpoint().0, "endpoint back in rotation");
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.endpoint.finish();
        if self.probe && !self.settled {
            self.endpoint.release_probe();
        }
    }
}

pin_project! {
    /// Response future of [`Balance`](super::Balance).
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called {
            #[pin]
            fut: F,
            outcome: Option<Outcome>,
        },
        Failed {
            err: Option<FilterError>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(fut: F, outcome: Outcome) -> Self {
        Self {
            kind: Kind::Called {
                fut,
                outcome: Some(outcome),
            },
        }
    }

    pub(crate) fn failed(err: FilterError) -> Self {
        Self {
            kind: Kind::Failed { err: Some(err) },
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
        match self.project().kind.project() {
            KindProj::Called { fut, outcome } => {
                let result = ready!(fut.poll(cx)).map_err(Into::into);
                if let Some(mut o) = outcome.take() {
                    o.settle(&result);
                }
                Poll::Ready(result)
            }
            KindProj::Failed { err } => Poll::Ready(Err(err
                .take()
                .expect("ResponseFuture polled after completion")
                .into())),
        }
    }
}
