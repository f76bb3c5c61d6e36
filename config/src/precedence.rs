//! Route precedence, as Gateway API orders routes of one host.
//!
//! Exact path before longer prefix before shorter prefix before no path; then a
//! route with a method before one without; then more header matches before fewer;
//! ties keep file order. The proxy's route table and the validator's
//! "unreachable route" check both use this one definition.

use std::cmp::Ordering;

use crate::{PathMatch, Route, RouteMatch};

impl PathMatch {
    /// Whether `path` (without query) satisfies this match. A prefix matches on a
    /// segment boundary: `/logs` takes `/logs` and `/logs/a`, not `/logsx`.
    pub fn matches(&self, path: &str) -> bool {
        if let Some(exact) = &self.exact {
            return path == exact;
        }
        match &self.prefix {
            Some(prefix) => prefix_matches(prefix, path),
            None => true,
        }
    }
}

/// Segment-boundary prefix match; a prefix of `/` or one ending in `/` matches plainly.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// Sort key: smaller sorts first (higher precedence).
fn rank(m: &RouteMatch) -> (u8, std::cmp::Reverse<usize>, u8, std::cmp::Reverse<usize>) {
    let (kind, len) = match &m.path {
        Some(PathMatch { exact: Some(e), .. }) => (0, e.len()),
        Some(PathMatch {
            prefix: Some(p), ..
        }) => (1, p.len()),
        _ => (2, 0),
    };
    (
        kind,
        std::cmp::Reverse(len),
        u8::from(m.method.is_none()),
        std::cmp::Reverse(m.headers.len()),
    )
}

/// Compares two matches by precedence (`Less` = tried first).
pub fn compare_matches(a: &RouteMatch, b: &RouteMatch) -> Ordering {
    rank(a).cmp(&rank(b))
}

/// Which step of the precedence order puts one match before another: what an operator
/// is told when a route that also matches a request loses to the chosen one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecedenceRule {
    /// An exact path goes before a prefix or no path.
    ExactPath,
    /// A path prefix goes before no path.
    HasPath,
    /// Between two exact paths or two prefixes, the longer goes first.
    LongerPath,
    /// A route naming a method goes before one that does not.
    Method,
    /// More header matches go before fewer.
    MoreHeaders,
    /// Every rule ties: the one written first in the file goes first.
    FileOrder,
}

impl PrecedenceRule {
    /// The rule in words, as `sluicectl explain` prints it.
    pub fn describe(self) -> &'static str {
        match self {
            PrecedenceRule::ExactPath => "an exact path goes before a prefix",
            PrecedenceRule::HasPath => "a path match goes before none",
            PrecedenceRule::LongerPath => "a longer path goes first",
            PrecedenceRule::Method => "a method match goes before none",
            PrecedenceRule::MoreHeaders => "more header matches go first",
            PrecedenceRule::FileOrder => "a tie: the route written first goes first",
        }
    }
}

/// The rule by which `first` precedes `second` (or `FileOrder` when they tie), given
/// that `first` is tried first.
pub fn precedence_rule(first: &RouteMatch, second: &RouteMatch) -> PrecedenceRule {
    let (a, b) = (rank(first), rank(second));
    if a.0 != b.0 {
        return if a.0 == 0 {
            PrecedenceRule::ExactPath
        } else {
            PrecedenceRule::HasPath
        };
    }
    if a.1 != b.1 {
        PrecedenceRule::LongerPath
    } else if a.2 != b.2 {
        PrecedenceRule::Method
    } else if a.3 != b.3 {
        PrecedenceRule::MoreHeaders
    } else {
        PrecedenceRule::FileOrder
    }
}

/// Indices of `routes` in the order they are tried (stable: ties keep file order).
pub fn precedence_order(routes: &[Route]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..routes.len()).collect();
    idx.sort_by(|&a, &b| compare_matches(&routes[a].matches, &routes[b].matches));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(
        name: &str,
        path: Option<PathMatch>,
        method: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Route {
        Route {
            name: name.into(),
            matches: RouteMatch {
                path,
                method: method.map(Into::into),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
            ..Default::default()
        }
    }

    fn prefix(p: &str) -> Option<PathMatch> {
        Some(PathMatch {
            prefix: Some(p.into()),
            exact: None,
        })
    }

    fn exact(p: &str) -> Option<PathMatch> {
        Some(PathMatch {
            exact: Some(p.into()),
            prefix: None,
        })
    }

    #[test]
    fn orders_as_gateway_api() {
        let routes = vec![
            route("catch-all", None, None, &[]),
            route("short", prefix("/a"), None, &[]),
            route("long", prefix("/a/b"), None, &[]),
            route("exact", exact("/a/b"), None, &[]),
            route("short-post", prefix("/a"), Some("POST"), &[]),
            route("short-post-hdr", prefix("/a"), Some("POST"), &[("x", "1")]),
            route("short-2", prefix("/a"), None, &[]),
        ];
        let names: Vec<_> = precedence_order(&routes)
            .into_iter()
            .map(|i| routes[i].name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "exact",
                "long",
                "short-post-hdr",
                "short-post",
                "short",
                "short-2",
                "catch-all"
            ]
        );
    }

    #[test]
    fn names_the_rule_that_orders_two_routes() {
        let m = |path, method: Option<&str>, headers: &[(&str, &str)]| {
            route("r", path, method, headers).matches
        };
        let cases = [
            (
                m(exact("/a"), None, &[]),
                m(prefix("/a"), Some("GET"), &[]),
                PrecedenceRule::ExactPath,
            ),
            (
                m(prefix("/a"), None, &[]),
                m(None, Some("GET"), &[]),
                PrecedenceRule::HasPath,
            ),
            (
                m(prefix("/a/b"), None, &[]),
                m(prefix("/a"), Some("GET"), &[]),
                PrecedenceRule::LongerPath,
            ),
            (
                m(prefix("/a"), Some("GET"), &[]),
                m(prefix("/a"), None, &[("x", "1")]),
                PrecedenceRule::Method,
            ),
            (
                m(None, None, &[("x", "1")]),
                m(None, None, &[]),
                PrecedenceRule::MoreHeaders,
            ),
            (
                m(prefix("/a"), None, &[]),
                m(prefix("/b"), None, &[]),
                PrecedenceRule::FileOrder,
            ),
        ];
        for (first, second, rule) in cases {
            assert_ne!(compare_matches(&first, &second), Ordering::Greater);
            assert_eq!(
                precedence_rule(&first, &second),
                rule,
                "{first:?} before {second:?}"
            );
        }
    }

    #[test]
    fn a_path_match_takes_its_exact_path_its_prefix_or_any() {
        let exact = exact("/a").unwrap();
        assert!(exact.matches("/a"));
        assert!(!exact.matches("/a/b"));
        let prefix = prefix("/a").unwrap();
        assert!(prefix.matches("/a/b"));
        assert!(!prefix.matches("/b"));
        assert!(PathMatch::default().matches("/anything"));
    }

    #[test]
    fn prefix_respects_segments() {
        assert!(prefix_matches("/logs", "/logs"));
        assert!(prefix_matches("/logs", "/logs/a"));
        assert!(!prefix_matches("/logs", "/logsx"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/logs/", "/logs/a"));
        assert!(!prefix_matches("/logs/", "/logs"));
    }
}
