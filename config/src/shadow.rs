//! Which routes of a host can never be chosen, found without comparing every pair.
//!
//! A route is never used when a route tried before it matches every request it
//! matches. Comparing each route with all routes before it costs n²/2 comparisons
//! (100,000 routes took 95 s), so the earlier routes are indexed by what a covering
//! route must have in common with a later one: its path is absent, `/`, the same
//! exact path, or a segment prefix of the later path; its method is absent or the
//! same; and one of its headers (the rarest) is among the later route's headers, or
//! it has none. Only routes found that way are compared, with the validator's own
//! `covers`, which stays the one definition of coverage. A route that is itself never
//! used is not indexed: whatever it covers, the route covering it covers too, earlier.

use std::collections::HashMap;

use crate::{PathMatch, Route};

/// Where an indexed route's path puts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PathKey {
    /// No path, or the prefix `/`: every request path.
    Any,
    /// An exact path, by its hash and length.
    Exact(u64, usize),
    /// A prefix, by its hash and length.
    Prefix(u64, usize),
}

type Key<'a> = (PathKey, Option<&'a str>, Option<(&'a str, &'a str)>);

/// Polynomial hashes of every prefix of a string, modulo the Mersenne prime 2⁶¹−1,
/// so that each prefix can be looked up in constant time. A collision only adds a
/// comparison: `covers` decides.
fn prefix_hashes(s: &str) -> Vec<u64> {
    const P: u128 = (1 << 61) - 1;
    const BASE: u128 = 1_000_003;
    let mut out = Vec::with_capacity(s.len() + 1);
    let mut h: u128 = 0;
    out.push(0);
    for &b in s.as_bytes() {
        h = (h * BASE + u128::from(b) + 1) % P;
        out.push(h as u64);
    }
    out
}

/// The byte lengths of `s`'s prefixes that match it on a segment boundary (the
/// prefixes `prefix_matches` accepts for `s`).
fn boundaries(s: &str) -> impl Iterator<Item = usize> + '_ {
    let b = s.as_bytes();
    (0..=b.len()).filter(move |&i| {
        s.is_char_boundary(i) && (i == b.len() || b[i] == b'/' || (i > 0 && b[i - 1] == b'/'))
    })
}

/// The routes that are never used, each with the first route (in precedence order)
/// that takes all its requests, in the precedence order of the unused ones; and how
/// many pairs were compared.
///
/// `order` is the precedence order, `usable` says whether a route's match is well
/// formed enough to judge, and `covers(a, b)` whether route `a` takes every request
/// route `b` does.
pub(crate) fn never_used(
    routes: &[Route],
    order: &[usize],
    usable: impl Fn(usize) -> bool,
    covers: impl Fn(usize, usize) -> bool,
) -> (Vec<(usize, usize)>, usize) {
    let mut position = vec![0; routes.len()];
    for (pos, &r) in order.iter().enumerate() {
        position[r] = pos;
    }
    // The rarest header of a route is its anchor: few other routes share it.
    let mut frequency: HashMap<(&str, &str), usize> = HashMap::new();
    for r in routes {
        for (k, v) in &r.matches.headers {
            *frequency.entry((k.as_str(), v.as_str())).or_default() += 1;
        }
    }
    let mut index: HashMap<Key<'_>, Vec<usize>> = HashMap::new();
    let mut found = Vec::new();
    let mut comparisons = 0;
    let mut candidates: Vec<PathKey> = Vec::new();
    for &later in order {
        if !usable(later) {
            continue;
        }
        let m = &routes[later].matches;
        candidates.clear();
        candidates.push(PathKey::Any);
        let own = match &m.path {
            Some(PathMatch {
                exact: Some(e),
                prefix: None,
            }) => {
                let h = prefix_hashes(e);
                candidates.push(PathKey::Exact(h[e.len()], e.len()));
                candidates.extend(boundaries(e).map(|i| PathKey::Prefix(h[i], i)));
                PathKey::Exact(h[e.len()], e.len())
            }
            Some(PathMatch {
                exact: None,
                prefix: Some(p),
            }) => {
                let h = prefix_hashes(p);
                candidates.extend(boundaries(p).map(|i| PathKey::Prefix(h[i], i)));
                if p == "/" {
                    PathKey::Any
                } else {
                    PathKey::Prefix(h[p.len()], p.len())
                }
            }
            _ => PathKey::Any,
        };
        let methods = [None, m.method.as_deref()];
        let methods = if m.method.is_some() {
            &methods[..]
        } else {
            &methods[..1]
        };
        let anchors = std::iter::once(None).chain(
            m.headers
                .iter()
                .map(|(k, v)| Some((k.as_str(), v.as_str()))),
        );
        let mut first: Option<usize> = None;
        for anchor in anchors {
            for &method in methods {
                for &path in &candidates {
                    let Some(earlier) = index.get(&(path, method, anchor)) else {
                        continue;
                    };
                    for &e in earlier {
                        if first.is_some_and(|f| position[f] < position[e]) {
                            // Entries are in precedence order: none after this wins.
                            break;
                        }
                        comparisons += 1;
                        if covers(e, later) {
                            first = Some(e);
                            break;
                        }
                    }
                }
            }
        }
        match first {
            Some(earlier) => found.push((later, earlier)),
            None => {
                let anchor = m
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .min_by_key(|h| frequency.get(h).copied().unwrap_or(0));
                let method = m.method.as_deref();
                index.entry((own, method, anchor)).or_default().push(later);
            }
        }
    }
    (found, comparisons)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::route_covers;
    use crate::{RouteMatch, precedence_order};

    fn route(path: Option<(&str, &str)>, method: Option<&str>, headers: &[(&str, &str)]) -> Route {
        Route {
            name: "r".into(),
            matches: RouteMatch {
                path: path.map(|(kind, p)| PathMatch {
                    exact: (kind == "exact").then(|| p.to_string()),
                    prefix: (kind == "prefix").then(|| p.to_string()),
                }),
                method: method.map(Into::into),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
            ..Default::default()
        }
    }

    fn indexed(routes: &[Route]) -> (Vec<(usize, usize)>, usize) {
        indexed_in(routes, &precedence_order(routes))
    }

    fn indexed_in(routes: &[Route], order: &[usize]) -> (Vec<(usize, usize)>, usize) {
        never_used(
            routes,
            order,
            |_| true,
            |a, b| route_covers(&routes[a], &routes[b]),
        )
    }

    /// Every pair, as the check was first written.
    fn pairwise(routes: &[Route]) -> Vec<(usize, usize)> {
        pairwise_in(routes, &precedence_order(routes))
    }

    fn pairwise_in(routes: &[Route], order: &[usize]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (pos, &later) in order.iter().enumerate() {
            if let Some(&e) = order[..pos]
                .iter()
                .find(|&&e| route_covers(&routes[e], &routes[later]))
            {
                out.push((later, e));
            }
        }
        out
    }

    #[test]
    fn finds_what_comparing_every_pair_finds() {
        let paths = [
            None,
            Some(("prefix", "/")),
            Some(("prefix", "/a")),
            Some(("prefix", "/a/")),
            Some(("prefix", "/a/b")),
            Some(("prefix", "/ab")),
            Some(("exact", "/a")),
            Some(("exact", "/a/b")),
            Some(("exact", "/a/b/c")),
            Some(("prefix", "")),
        ];
        let methods = [None, Some("GET"), Some("POST")];
        let headers: [&[(&str, &str)]; 4] =
            [&[], &[("x", "1")], &[("x", "1"), ("y", "2")], &[("y", "2")]];
        // Every combination, in several file orders: a small deterministic shuffle.
        let mut all = Vec::new();
        for p in paths {
            for m in methods {
                for h in headers {
                    all.push(route(p, m, h));
                }
            }
        }
        for step in [1, 7, 13, 31] {
            let n = all.len();
            let routes: Vec<Route> = (0..n).map(|i| all[(i * step) % n].clone()).collect();
            assert_eq!(indexed(&routes).0, pairwise(&routes), "step {step}");
            for window in routes.chunks(17) {
                assert_eq!(indexed(window).0, pairwise(window));
            }
        }
    }

    #[test]
    fn finds_what_comparing_every_pair_finds_in_any_order() {
        // Precedence puts a shorter prefix after every longer path it covers; the index
        // does not rely on that: in file order a covering prefix may come first.
        let routes: Vec<Route> = [
            (Some(("prefix", "/a")), None, &[][..]),
            (Some(("prefix", "/a/")), Some("GET"), &[]),
            (Some(("exact", "/a/b")), None, &[("x", "1")]),
            (Some(("prefix", "/a/b/c")), Some("GET"), &[]),
            (Some(("exact", "/a//b")), None, &[]),
            (Some(("prefix", "/ab")), None, &[]),
            (Some(("exact", "/a")), Some("POST"), &[]),
            (Some(("prefix", "/b/é")), None, &[]),
            (Some(("exact", "/b/é/c")), None, &[]),
            (None, None, &[("x", "1")]),
            (Some(("prefix", "/x")), None, &[("x", "1")]),
            (Some(("prefix", "/c/")), None, &[]),
            (Some(("exact", "/c/d")), None, &[]),
        ]
        .into_iter()
        .map(|(p, m, h)| route(p, m, h))
        .collect();
        let file_order: Vec<usize> = (0..routes.len()).collect();
        let (found, compared) = indexed_in(&routes, &file_order);
        assert_eq!(found, pairwise_in(&routes, &file_order));
        // Every route found was compared with the one covering it, and no pair twice.
        assert!(compared >= found.len(), "{compared}");
        assert!(
            compared <= routes.len() * (routes.len() - 1) / 2,
            "{compared}"
        );
        // Each covered route is found at its first covering route: the prefixes /a, /b/é
        // and /c/ cover paths below them on a segment boundary, never /ab.
        assert_eq!(
            found,
            [
                (1, 0),
                (2, 0),
                (3, 0),
                (4, 0),
                (6, 0),
                (8, 7),
                (10, 9),
                (12, 11)
            ]
        );
        let reversed: Vec<usize> = file_order.iter().rev().copied().collect();
        assert_eq!(
            indexed_in(&routes, &reversed).0,
            pairwise_in(&routes, &reversed)
        );
    }

    /// Comparisons for `n` routes of each shape a large policy takes.
    fn comparisons(n: usize) -> [usize; 4] {
        let distinct: Vec<Route> = (0..n)
            .map(|i| route(Some(("prefix", &format!("/api/v1/r{i}"))), None, &[]))
            .collect();
        let headers: Vec<Route> = (0..n)
            .map(|i| {
                route(
                    Some(("prefix", "/api")),
                    Some("GET"),
                    &[("x-tenant", &i.to_string())],
                )
            })
            .collect();
        let copies: Vec<Route> = (0..n)
            .map(|_| route(Some(("exact", "/a")), None, &[]))
            .collect();
        let nested: Vec<Route> = (0..n)
            .map(|i| {
                route(
                    Some(("prefix", &"/a".repeat(i % 50 + 1))),
                    None,
                    &[("t", &(i / 50).to_string())],
                )
            })
            .collect();
        [&distinct, &headers, &copies, &nested].map(|r| indexed(r).1)
    }

    #[test]
    fn comparisons_grow_linearly_with_routes() {
        let small = comparisons(1_000);
        let large = comparisons(10_000);
        for (s, l) in small.iter().zip(&large) {
            // Pairwise would be 50 million for 10,000 routes and grow 100-fold.
            assert!(*l <= 60 * 10_000, "{small:?} -> {large:?}");
            assert!(*l <= 12 * s.max(&1000), "{small:?} -> {large:?}");
        }
    }
}
