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
    fn prefix_respects_segments() {
        assert!(prefix_matches("/logs", "/logs"));
        assert!(prefix_matches("/logs", "/logs/a"));
        assert!(!prefix_matches("/logs", "/logsx"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/logs/", "/logs/a"));
        assert!(!prefix_matches("/logs/", "/logs"));
    }
}
