use std::fmt;
use std::sync::Arc;

use governor::clock::Clock;
use tower_layer::Layer;

use super::fleet::FleetLimiter;
use super::{KeyedLimiter, Limiter, NoopObserver, RateLimit, RateLimitObserver};
use crate::clock::PollClock;

/// Applies one [`KeyedLimiter`] (or one [`FleetLimiter`]) to the wrapped service.
pub struct RateLimitLayer<C: Clock = PollClock> {
    limiter: Limiter<C>,
    observer: Arc<dyn RateLimitObserver>,
    headers_on_allowed: bool,
}

impl<C: Clock> RateLimitLayer<C> {
    /// A layer enforcing `limiter` (from [`RateLimitRegistry::get_or_rebuild`](super::RateLimitRegistry::get_or_rebuild)).
    pub fn new(limiter: Arc<KeyedLimiter<C>>) -> Self {
        Self {
            limiter: Limiter::Local(limiter),
            observer: Arc::new(NoopObserver),
            headers_on_allowed: true,
        }
    }

    /// A layer enforcing a fleet-wide limit (from
    /// [`FleetRegistry::get_or_rebuild`](super::fleet::FleetRegistry::get_or_rebuild)).
    pub fn fleet(limiter: Arc<FleetLimiter>) -> Self {
        Self {
            limiter: Limiter::Fleet(limiter),
            observer: Arc::new(NoopObserver),
            headers_on_allowed: true,
        }
    }

    /// Reports every decision to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn RateLimitObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// Whether allowed responses carry `RateLimit-Policy` / `RateLimit` (default true).
    pub fn headers_on_allowed(mut self, on: bool) -> Self {
        self.headers_on_allowed = on;
        self
    }
}

impl<C: Clock> Clone for RateLimitLayer<C> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            observer: self.observer.clone(),
            headers_on_allowed: self.headers_on_allowed,
        }
    }
}

impl<C: Clock> fmt::Debug for RateLimitLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .finish()
    }
}

impl<S, C: Clock> Layer<S> for RateLimitLayer<C> {
    type Service = RateLimit<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::with_limiter(
            inner,
            self.limiter.clone(),
            self.observer.clone(),
            self.headers_on_allowed,
        )
    }
}
