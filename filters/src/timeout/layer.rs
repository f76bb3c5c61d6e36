use std::time::Duration;

use tower_layer::Layer;

use super::Timeout;

/// Fails requests that get no response within a duration; `None` passes everything through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeoutLayer {
    timeout: Option<Duration>,
}

impl TimeoutLayer {
    /// A layer allowing `timeout` per request (`None`: no limit).
    pub fn new(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::new(inner, self.timeout)
    }
}
