use std::num::NonZeroU32;
use std::sync::Arc;

use http::HeaderName;

/// What a rate limit's buckets are keyed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyBy {
    /// One bucket for every request.
    None,
    /// One bucket per value of this header; requests without it share one bucket.
    Header(HeaderName),
    /// One bucket per request path.
    Path,
    /// One bucket per [`PeerIdentity`](crate::extensions::PeerIdentity); unauthenticated requests share one.
    PeerIdentity,
}

/// Why a `rateLimit` section could not be turned into [`RateLimitParams`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitConfigError {
    /// `perSecond` or `burst` is zero.
    #[error("rateLimit.perSecond and rateLimit.burst must be at least 1")]
    Zero,
    /// `key.header` is not a valid header name.
    #[error("rateLimit.key.header {0:?} is not a valid header name")]
    BadHeader(String),
}

/// Settings of one rate limit, built from the policy once per swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitParams {
    /// Name used in the `RateLimit-Policy` / `RateLimit` headers and reported to observers.
    pub name: Arc<str>,
    /// Sustained rate per key.
    pub per_second: NonZeroU32,
    /// Requests a fresh (or fully rested) key may send at once.
    pub burst: NonZeroU32,
    /// What the buckets are keyed by.
    pub key: KeyBy,
    /// Count what would be limited without refusing it.
    pub shadow: bool,
    /// `scope: fleet`: one quota for every caller of the route, counted in Redis.
    pub fleet: bool,
}

impl RateLimitParams {
    /// Builds params from a policy's `rateLimit` section, named `default`.
    ///
    /// `burst` defaults to `perSecond`. Use [`named`](Self::named) to name the limit after
    /// its route (the name shows in the response headers).
    pub fn from_config(cfg: &sluice_config::RateLimit) -> Result<Self, RateLimitConfigError> {
        let per_second = NonZeroU32::new(cfg.per_second).ok_or(RateLimitConfigError::Zero)?;
        let burst = match cfg.burst {
            Some(b) => NonZeroU32::new(b).ok_or(RateLimitConfigError::Zero)?,
            None => per_second,
        };
        let key = match &cfg.key {
            None => KeyBy::None,
            Some(k) => {
                if let Some(h) = &k.header {
                    KeyBy::Header(
                        HeaderName::from_bytes(h.as_bytes())
                            .map_err(|_| RateLimitConfigError::BadHeader(h.clone()))?,
                    )
                } else if k.path == Some(true) {
                    KeyBy::Path
                } else if k.peer_identity == Some(true) {
                    KeyBy::PeerIdentity
                } else {
                    KeyBy::None
                }
            }
        };
        Ok(Self {
            name: Arc::from("default"),
            per_second,
            burst,
            key,
            shadow: cfg.shadow,
            fleet: cfg.scope == sluice_config::RateLimitScope::Fleet,
        })
    }

    /// Sets the name shown in the `RateLimit-Policy` and `RateLimit` headers.
    pub fn named(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// True when `other` needs the same buckets (rate, burst, key and scope), so state may be kept.
    pub fn same_buckets(&self, other: &Self) -> bool {
        self.per_second == other.per_second
            && self.burst == other.burst
            && self.key == other.key
            && self.fleet == other.fleet
    }

    /// The `w` of `RateLimit-Policy`: whole seconds a drained bucket takes to refill, at least 1.
    pub fn window_secs(&self) -> u64 {
        u64::from(self.burst.get())
            .div_ceil(u64::from(self.per_second.get()))
            .max(1)
    }
}
