use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Request};

/// What a refused caller is told to wait before trying again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How the limit on requests in flight is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitParams {
    /// Learned from the app's latency (Gradient2), kept within `min..=max`.
    Adaptive {
        /// The limit never goes below this.
        min: u32,
        /// The limit never goes above this.
        max: u32,
    },
    /// A plain cap.
    Fixed {
        /// Requests in flight at most.
        max: u32,
    },
}

/// Priority levels, most important first, and the header naming a request's level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Priorities {
    /// The request header carrying the level name; `None`: every request is `default`.
    pub header: Option<HeaderName>,
    /// Level names, most important first.
    pub levels: Arc<[Arc<str>]>,
    /// Index in `levels` of the level for requests without the header or with an unknown value.
    pub default: usize,
}

impl Default for Priorities {
    fn default() -> Self {
        Self {
            header: None,
            levels: Arc::from([Arc::from("default")]),
            default: 0,
        }
    }
}

impl Priorities {
    /// Levels read from `header`; `levels` most important first. A missing `default` level
    /// is added last.
    pub fn new(header: HeaderName, levels: impl IntoIterator<Item = impl Into<Arc<str>>>) -> Self {
        let mut levels: Vec<Arc<str>> = levels.into_iter().map(Into::into).collect();
        let default = match levels.iter().position(|l| &**l == "default") {
            Some(i) => i,
            None => {
                levels.push(Arc::from("default"));
                levels.len() - 1
            }
        };
        Self {
            header: Some(header),
            levels: levels.into(),
            default,
        }
    }

    /// The level index of a request (0 is the most important).
    pub fn level_of<B>(&self, req: &Request<B>) -> usize {
        let Some(header) = &self.header else {
            return self.default;
        };
        let Some(value) = req.headers().get(header) else {
            return self.default;
        };
        let value = value.as_bytes();
        self.levels
            .iter()
            .position(|l| l.as_bytes().eq_ignore_ascii_case(value))
            .unwrap_or(self.default)
    }

    /// The name of a level index.
    pub fn name(&self, level: usize) -> &Arc<str> {
        &self.levels[level.min(self.levels.len() - 1)]
    }
}

/// Settings of one inbound concurrency limit, built from the policy once per swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConcurrencyParams {
    /// How the limit is found.
    pub limit: LimitParams,
    /// Requests that may wait for a slot at once (0: refuse at once over the limit).
    pub queue_max: usize,
    /// Longest wait in the queue.
    pub queue_timeout: Duration,
    /// Priority levels.
    pub priorities: Priorities,
}

impl ConcurrencyParams {
    /// Adaptive bounds when the policy gives none (DESIGN: `minLimit: 4, maxLimit: 2000`).
    pub const DEFAULT_ADAPTIVE: LimitParams = LimitParams::Adaptive {
        min: sluice_config::defaults::ADAPTIVE_MIN_LIMIT,
        max: sluice_config::defaults::ADAPTIVE_MAX_LIMIT,
    };
    /// Queue wait when the policy gives no `queue.timeout`.
    pub const DEFAULT_QUEUE_TIMEOUT: Duration = sluice_config::defaults::QUEUE_TIMEOUT;

    /// A limit without queue or priorities.
    pub fn new(limit: LimitParams) -> Self {
        Self {
            limit,
            queue_max: 0,
            queue_timeout: Self::DEFAULT_QUEUE_TIMEOUT,
            priorities: Priorities::default(),
        }
    }

    /// Sets the queue bound and wait.
    pub fn with_queue(mut self, max: usize, timeout: Duration) -> Self {
        self.queue_max = max;
        self.queue_timeout = timeout;
        self
    }

    /// Sets the priority levels.
    pub fn with_priorities(mut self, priorities: Priorities) -> Self {
        self.priorities = priorities;
        self
    }
}

/// Why an `inbound.concurrency` section could not be turned into [`ConcurrencyParams`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConcurrencyConfigError {
    /// Neither `adaptive` nor `fixed` is given (the validator refuses this first).
    #[error("inbound.concurrency needs adaptive or fixed")]
    NoLimit,
    /// `priority.header` is not a valid header name.
    #[error("inbound.concurrency.priority.header {0:?} is not a valid header name")]
    BadHeader(String),
}

impl ConcurrencyParams {
    /// Builds params from a validated `inbound.concurrency` section: `adaptive` bounds
    /// default to 4..=2000; without `queue` a request over the limit is refused at once;
    /// `queue.timeout` defaults to 50ms.
    pub fn from_config(cfg: &sluice_config::Concurrency) -> Result<Self, ConcurrencyConfigError> {
        let limit = match (&cfg.adaptive, &cfg.fixed) {
            (Some(a), _) => {
                let LimitParams::Adaptive { min, max } = Self::DEFAULT_ADAPTIVE else {
                    unreachable!("the default is adaptive")
                };
                LimitParams::Adaptive {
                    min: a.min_limit.unwrap_or(min),
                    max: a.max_limit.unwrap_or(max),
                }
            }
            (None, Some(f)) => LimitParams::Fixed { max: f.max },
            (None, None) => return Err(ConcurrencyConfigError::NoLimit),
        };
        let mut params = Self::new(limit);
        if let Some(q) = &cfg.queue {
            let timeout = q
                .timeout
                .map(|d| d.get())
                .unwrap_or(Self::DEFAULT_QUEUE_TIMEOUT);
            params = params.with_queue(q.max as usize, timeout);
        }
        if let Some(p) = &cfg.priority {
            let header = HeaderName::from_bytes(p.header.as_bytes())
                .map_err(|_| ConcurrencyConfigError::BadHeader(p.header.clone()))?;
            params = params
                .with_priorities(Priorities::new(header, p.levels.iter().map(String::as_str)));
        }
        Ok(params)
    }
}
