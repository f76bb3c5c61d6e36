//! Route selection on arbitrary routes and requests: the proxy's `RouteTable` (built
//! on sluice-config's precedence) must pick exactly the route a plain reading of the
//! matching rules picks: a route that matches, and no matching route that is more
//! specific or, equally specific, earlier in the file.

#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use sluice_proxy::RouteTable;

const SEGMENTS: &[&str] = &["", "a", "b", "ab", "api", "a.b", "-", "%2F", "x y", "é"];
const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH"];
const HEADER_NAMES: &[&str] = &["x-a", "X-A", "x-b", "x-user-id", "content-type"];
const HEADER_VALUES: &[&str] = &["1", "2", "true", "True", "a b", ""];
const HOSTS: &[&str] = &[
    "svc", "SVC", "Svc:8080", "svc:80", "svc.", "other", "[::1]", "",
];

#[derive(Arbitrary, Debug)]
enum PathSpec {
    Any,
    Exact(Vec<u8>),
    Prefix(Vec<u8>, bool),
}

#[derive(Arbitrary, Debug)]
struct RouteSpec {
    path: PathSpec,
    method: Option<u8>,
    headers: Vec<(u8, u8)>,
}

#[derive(Arbitrary, Debug)]
struct Req {
    host: u8,
    method: u8,
    path: Vec<u8>,
    trailing_slash: bool,
    headers: Vec<(u8, u8)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    routes: Vec<RouteSpec>,
    requests: Vec<Req>,
}

fn pick<'a>(table: &[&'a str], i: u8) -> &'a str {
    table[usize::from(i) % table.len()]
}

fn path_of(segments: &[u8], trailing_slash: bool) -> String {
    let mut p = String::new();
    for s in segments.iter().take(4) {
        p.push('/');
        p.push_str(pick(SEGMENTS, *s));
    }
    if trailing_slash || p.is_empty() {
        p.push('/');
    }
    p
}

/// A route as the reference reads it.
#[derive(Debug)]
struct Reference {
    exact: Option<String>,
    prefix: Option<String>,
    method: Option<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
}

impl Reference {
    fn new(r: &RouteSpec) -> Self {
        let (exact, prefix) = match &r.path {
            PathSpec::Any => (None, None),
            PathSpec::Exact(s) => (Some(path_of(s, false)), None),
            PathSpec::Prefix(s, slash) => (None, Some(path_of(s, *slash))),
        };
        let mut headers: Vec<(&str, &str)> = Vec::new();
        for (n, v) in r.headers.iter().take(3) {
            let name = pick(HEADER_NAMES, *n);
            // One condition per header name (names are case-insensitive).
            if !headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(name)) {
                headers.push((name, pick(HEADER_VALUES, *v)));
            }
        }
        Self {
            exact,
            prefix,
            method: r.method.map(|m| pick(METHODS, m)),
            headers,
        }
    }

    fn yaml(&self, i: usize) -> String {
        let mut m = Vec::new();
        if let Some(e) = &self.exact {
            m.push(format!("path: {{ exact: {e:?} }}"));
        }
        if let Some(p) = &self.prefix {
            m.push(format!("path: {{ prefix: {p:?} }}"));
        }
        if let Some(method) = self.method {
            m.push(format!("method: {method}"));
        }
        if !self.headers.is_empty() {
            let h: Vec<String> = self
                .headers
                .iter()
                .map(|(k, v)| format!("{k:?}: {v:?}"))
                .collect();
            m.push(format!("headers: {{ {} }}", h.join(", ")));
        }
        let matches = if m.is_empty() {
            String::new()
        } else {
            format!("\n      match: {{ {} }}", m.join(", "))
        };
        format!("    - name: r{i}{matches}\n")
    }

    /// The matching rules as documented: exact path, or a prefix on a segment
    /// boundary; the method; every header condition against any value of that header.
    fn matches(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> bool {
        if let Some(e) = &self.exact
            && path != e
        {
            return false;
        }
        if let Some(p) = &self.prefix {
            let boundary = path.starts_with(p.as_str())
                && (path.len() == p.len() || p.ends_with('/') || path[p.len()..].starts_with('/'));
            if !boundary {
                return false;
            }
        }
        if let Some(m) = self.method
            && m != method
        {
            return false;
        }
        self.headers.iter().all(|(name, value)| {
            headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case(name) && v == value)
        })
    }

    /// Whether `self` (file position `i`) is tried before `other` (position `j`).
    fn before(&self, i: usize, other: &Reference, j: usize) -> bool {
        let kind = |r: &Reference| match (&r.exact, &r.prefix) {
            (Some(_), _) => 0,
            (None, Some(_)) => 1,
            (None, None) => 2,
        };
        let len = |r: &Reference| {
            r.exact
                .as_ref()
                .or(r.prefix.as_ref())
                .map_or(0, String::len)
        };
        if kind(self) != kind(other) {
            return kind(self) < kind(other);
        }
        if len(self) != len(other) {
            return len(self) > len(other);
        }
        if self.method.is_some() != other.method.is_some() {
            return self.method.is_some();
        }
        if self.headers.len() != other.headers.len() {
            return self.headers.len() > other.headers.len();
        }
        i < j
    }
}

fuzz_target!(|input: Input| {
    let refs: Vec<Reference> = input.routes.iter().take(8).map(Reference::new).collect();
    let mut yaml = String::from(
        "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { name: svc }\n\
         spec:\n  host: svc\n  backends:\n    b: { addresses: [\"127.0.0.1:1\"] }\n  routes:\n",
    );
    if refs.is_empty() {
        return;
    }
    for (i, r) in refs.iter().enumerate() {
        yaml.push_str(&r.yaml(i));
    }
    // The validator refuses some sets (an unreachable route, a path it does not take);
    // the proxy only ever sees accepted ones.
    let Ok(policies) = sluice_config::parse_policies("fuzz.yaml", &yaml) else {
        return;
    };
    let (table, warnings) = RouteTable::build(&policies, |_, i| Ok(i))
        .unwrap_or_else(|e| panic!("an accepted policy compiles: {e}\n{yaml}"));
    assert!(warnings.is_empty());

    for req in input.requests.iter().take(8) {
        let host = pick(HOSTS, req.host);
        let method = pick(METHODS, req.method);
        let path = path_of(&req.path, req.trailing_slash);
        let headers: Vec<(&str, &str)> = req
            .headers
            .iter()
            .take(4)
            .map(|(n, v)| (pick(HEADER_NAMES, *n), pick(HEADER_VALUES, *v)))
            .collect();
        let mut map = HeaderMap::new();
        for (n, v) in &headers {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        let m = Method::from_bytes(method.as_bytes()).expect("method");
        let got = table.select(host, &m, &path, &map).copied();

        let bare = match host.rsplit_once(':') {
            Some((h, port))
                if !host.starts_with('[') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                h
            }
            _ => host,
        };
        let ours = bare.eq_ignore_ascii_case("svc");
        let expected = ours
            .then(|| {
                let matching: Vec<usize> = (0..refs.len())
                    .filter(|&i| refs[i].matches(method, &path, &headers))
                    .collect();
                matching.iter().copied().find(|&i| {
                    matching
                        .iter()
                        .all(|&j| j == i || refs[i].before(i, &refs[j], j))
                })
            })
            .flatten();
        assert_eq!(
            got, expected,
            "host {host:?} {method} {path} {headers:?}\n{yaml}"
        );
    }
});
