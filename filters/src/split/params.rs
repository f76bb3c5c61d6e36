use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Request};

use sluice_config::{StickyHash, rendezvous_backend};

use super::{POINTS, sticky_point};
use crate::random::RandomSource;

/// Why a route's `split` could not be turned into [`SplitParams`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SplitConfigError {
    /// A rule names a backend the policy does not define.
    #[error("split names unknown backend {0:?}")]
    UnknownBackend(String),
    /// A header name or value in `when` or `stickyBy` is not valid HTTP.
    #[error("split header {0:?} is not valid")]
    BadHeader(String),
    /// A weighted rule has no weight above zero.
    #[error("split weights sum to zero")]
    ZeroWeights,
    /// The policy has no backend at all.
    #[error("policy has no backends")]
    NoBackends,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Backend(usize),
    Weighted {
        /// Running sum of the weights (exclusive upper bound) and backend index, in
        /// file order, zero weights left out.
        bounds: Box<[(u64, usize)]>,
        /// Sum of the weights: any total above zero.
        total: u64,
        sticky: Option<(HeaderName, StickyHash)>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    /// Position in the route's `split`, as written.
    source: usize,
    when: Box<[(HeaderName, HeaderValue)]>,
    target: Target,
}

/// How the split decides a request, before any random draw: what
/// [`SplitParams::decide`] acts on, and what `sluicectl explain` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitChoice {
    /// No rule takes the request: the route's primary backend (its first that is not
    /// the fallback).
    Primary {
        /// The backend's index in the policy's `backends`.
        backend: usize,
    },
    /// A rule that names one backend takes it.
    Fixed {
        /// The rule's position in the route's `split`.
        rule: usize,
        /// The backend's index in the policy's `backends`.
        backend: usize,
    },
    /// A sticky weighted rule takes it, and the sticky header's value decides.
    Sticky {
        /// The rule's position in the route's `split`.
        rule: usize,
        /// The backend's index in the policy's `backends`.
        backend: usize,
        /// How the value was hashed.
        hash: StickyHash,
    },
    /// A weighted rule takes it and a random draw decides (no `stickyBy`, or the
    /// request lacks the sticky header).
    Random {
        /// The rule's position in the route's `split`.
        rule: usize,
    },
}

/// What the first rule that takes a request leaves to do.
enum Pick<'a> {
    Decided(SplitChoice),
    Draw {
        source: usize,
        bounds: &'a [(u64, usize)],
        total: u64,
    },
}

/// The split of one route, built from the policy once per swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitParams {
    backends: Arc<[Arc<str>]>,
    rules: Box<[Rule]>,
    /// Where a request no rule takes goes: the first backend that is not the route's
    /// fallback.
    primary: usize,
}

impl SplitParams {
    /// Builds the split of `route`; `backends` are the policy's backend names in file order
    /// (`spec.backends.keys()`), which fixes each backend's [`index`](crate::extensions::SelectedBackend::index).
    ///
    /// A route without `split` sends everything to the first backend that is not its
    /// `fallback.backend` (a backend named only as a fallback is never a primary); so
    /// does a request that matches no rule.
    pub fn from_config<'a>(
        route: &sluice_config::Route,
        backends: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, SplitConfigError> {
        let backends: Arc<[Arc<str>]> = backends.into_iter().map(Arc::from).collect();
        if backends.is_empty() {
            return Err(SplitConfigError::NoBackends);
        }
        let index = |name: &str| {
            backends
                .iter()
                .position(|b| &**b == name)
                .ok_or_else(|| SplitConfigError::UnknownBackend(name.to_string()))
        };
        let header = |name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| SplitConfigError::BadHeader(name.to_string()))
        };
        let mut rules = Vec::with_capacity(route.split.len());
        for (source, rule) in route.split.iter().enumerate() {
            let mut when = Vec::new();
            if let Some(w) = &rule.when {
                for (name, value) in &w.headers {
                    let v = HeaderValue::from_str(value)
                        .map_err(|_| SplitConfigError::BadHeader(name.clone()))?;
                    when.push((header(name)?, v));
                }
            }
            let target = if let Some(weights) = &rule.weights {
                let total: u64 = weights.values().map(|w| u64::from(*w)).sum();
                if total == 0 {
                    return Err(SplitConfigError::ZeroWeights);
                }
                let mut acc = 0u64;
                let mut bounds = Vec::with_capacity(weights.len());
                for (name, w) in weights {
                    let i = index(name)?;
                    if *w == 0 {
                        continue;
                    }
                    acc += u64::from(*w);
                    bounds.push((acc, i));
                }
                Target::Weighted {
                    bounds: bounds.into(),
                    total,
                    sticky: rule
                        .sticky_by
                        .as_ref()
                        .map(|s| header(&s.header).map(|h| (h, s.hash)))
                        .transpose()?,
                }
            } else if let Some(b) = &rule.backend {
                Target::Backend(index(b)?)
            } else {
                continue;
            };
            rules.push(Rule {
                source,
                when: when.into(),
                target,
            });
        }
        let fallback = route.fallback.as_ref().and_then(|f| f.backend.as_deref());
        let primary = backends
            .iter()
            .position(|b| Some(&**b) != fallback)
            .unwrap_or(0);
        Ok(Self {
            backends,
            rules: rules.into(),
            primary,
        })
    }

    /// Backend names in file order.
    pub fn backends(&self) -> &[Arc<str>] {
        &self.backends
    }

    /// The index of the backend `req` goes to.
    pub fn decide<B>(&self, req: &Request<B>, rng: &RandomSource) -> usize {
        match self.pick(req.headers()) {
            Pick::Decided(
                SplitChoice::Primary { backend }
                | SplitChoice::Fixed { backend, .. }
                | SplitChoice::Sticky { backend, .. },
            ) => backend,
            // `pick` leaves every random rule to a draw.
            Pick::Decided(SplitChoice::Random { .. }) => self.primary,
            // Without the header there is no user to keep on one side: a uniform draw
            // in [0, total) keeps the proportions exactly.
            Pick::Draw { bounds, total, .. } => {
                let draw = ((u128::from(rng.next_u64()) * u128::from(total)) >> 64) as u64;
                walk(bounds, |bound| draw < bound)
            }
        }
    }

    /// How a request with these headers is decided: the rule that takes it and, unless
    /// a random draw is left to make, the backend.
    pub fn choose(&self, headers: &HeaderMap) -> SplitChoice {
        match self.pick(headers) {
            Pick::Decided(choice) => choice,
            Pick::Draw { source, .. } => SplitChoice::Random { rule: source },
        }
    }

    fn pick(&self, headers: &HeaderMap) -> Pick<'_> {
        for rule in &self.rules {
            // As a route's header match: a repeated request header matches when any of
            // its values does, so the route and its split read the same request alike.
            if !rule
                .when
                .iter()
                .all(|(n, v)| headers.get_all(n).iter().any(|h| h == v))
            {
                continue;
            }
            let source = rule.source;
            return match &rule.target {
                Target::Backend(i) => Pick::Decided(SplitChoice::Fixed {
                    rule: source,
                    backend: *i,
                }),
                Target::Weighted {
                    bounds,
                    total,
                    sticky,
                } => match sticky
                    .as_ref()
                    .and_then(|(h, how)| Some((headers.get(h)?, *how)))
                {
                    Some((v, hash)) => {
                        let backend = match hash {
                            StickyHash::Ordered => {
                                // Backend i owns the points p with p × total < bound ×
                                // POINTS: with weights summing to 100, exactly
                                // weight × 100 points.
                                let p = u64::from(sticky_point(v.as_bytes())) * total;
                                walk(bounds, |bound| p < bound * u64::from(POINTS))
                            }
                            StickyHash::Rendezvous => {
                                let mut prev = 0;
                                let candidates = bounds.iter().map(|(bound, i)| {
                                    let w = bound - std::mem::replace(&mut prev, *bound);
                                    (&*self.backends[*i], u32::try_from(w).unwrap_or(u32::MAX))
                                });
                                rendezvous_backend(v.as_bytes(), candidates)
                                    .map_or(0, |k| bounds[k].1)
                            }
                        };
                        Pick::Decided(SplitChoice::Sticky {
                            rule: source,
                            backend,
                            hash,
                        })
                    }
                    None => Pick::Draw {
                        source,
                        bounds,
                        total: *total,
                    },
                },
            };
        }
        Pick::Decided(SplitChoice::Primary {
            backend: self.primary,
        })
    }
}

/// The first backend whose bound `below` accepts, in file order.
fn walk(bounds: &[(u64, usize)], below: impl Fn(u64) -> bool) -> usize {
    bounds
        .iter()
        .find(|(upper, _)| below(*upper))
        .or(bounds.last())
        .map_or(0, |(_, i)| *i)
}
