//! Dot-segments (`.` and `..`, `%2e` counted as a dot) in a path.
//!
//! The proxy routes, and forwards, a request's path with its dot-segments resolved
//! (RFC 3986 §5.2.4), so a route whose own path holds one could never match: the
//! validator refuses it and names the path to write instead. Both sides must agree
//! on what a dot-segment is, so the rule is written once, here.

/// How many dots `segment` stands for when it is `.` or `..` in any spelling (`.`,
/// `%2e`, `%2E`, `.%2e`, …); `None` for any other segment (`.well-known`, `...`).
pub fn dot_segment(segment: &str) -> Option<usize> {
    let mut rest = segment.as_bytes();
    let mut n = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
            _ => return None,
        };
        n += 1;
    }
    (1..=2).contains(&n).then_some(n)
}

/// `path` (starting with `/`) with its dot-segments resolved, as the proxy routes
/// it; `None` when it has none. A path ending in a dot-segment ends in `/`.
pub fn resolve_dot_segments(path: &str) -> Option<String> {
    let rest = path.strip_prefix('/')?;
    let mut out: Vec<&str> = Vec::new();
    let mut changed = false;
    let mut ends_in_dir = false;
    for segment in rest.split('/') {
        ends_in_dir = false;
        match dot_segment(segment) {
            Some(n) => {
                changed = true;
                if n == 2 {
                    out.pop();
                }
                ends_in_dir = true;
            }
            None => out.push(segment),
        }
    }
    if !changed {
        return None;
    }
    let mut resolved = String::with_capacity(path.len());
    for segment in &out {
        resolved.push('/');
        resolved.push_str(segment);
    }
    if ends_in_dir || resolved.is_empty() {
        resolved.push('/');
    }
    Some(resolved)
}

/// The first dot-segment of `path` as written, if it has one.
pub fn first_dot_segment(path: &str) -> Option<&str> {
    path.split('/').find(|s| dot_segment(s).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_in_every_spelling_and_nothing_else() {
        for (s, n) in [(".", 1), ("..", 2), ("%2e", 1), ("%2E%2e", 2), (".%2E", 2)] {
            assert_eq!(dot_segment(s), Some(n), "{s}");
        }
        for s in [
            "",
            "...",
            ".well-known",
            "a.",
            "%2f",
            "%2",
            "%2e%2e%2e",
            "a",
        ] {
            assert_eq!(dot_segment(s), None, "{s}");
        }
    }

    /// The same answers as the proxy's own resolution of request paths.
    #[test]
    fn resolves_as_the_proxy_routes() {
        for (path, resolved) in [
            ("/a/../b", Some("/b")),
            ("/a/./b", Some("/a/b")),
            ("/a/%2e%2E/b", Some("/b")),
            ("/a/b/..", Some("/a/")),
            ("/a/.", Some("/a/")),
            ("/..", Some("/")),
            ("/../../x", Some("/x")),
            ("/a/b", None),
            ("/.well-known/x", None),
            ("/a//b", None),
        ] {
            assert_eq!(resolve_dot_segments(path).as_deref(), resolved, "{path}");
        }
        assert_eq!(first_dot_segment("/a/%2E%2e/b/."), Some("%2E%2e"));
        assert_eq!(first_dot_segment("/a/b"), None);
    }
}
