//! The ring of recent requests behind the admin's `GET /recent` (`sluicectl tap`).
//!
//! Off by default (`--recent-requests 0`): the proxy then holds no ring, and a request
//! pays one `Option` check. On, each finished request (forwarded, or refused before a
//! route took it) is written to the next slot of a fixed ring: one atomic increment
//! picks the slot, one `ArcSwapOption` store fills it; no lock, and readers never block
//! writers. Its entry is built after the response headers, so filters on status,
//! reason, route, backend and latency apply to what happened. Secret header values are
//! replaced before the entry is stored, unless `--recent-requests-secrets` keeps them;
//! even then `/recent` shows them only when asked (`?secrets=true`). A header is secret
//! when [`Redaction::is_secret`] says so: the standard credential headers, any name
//! that reads like one (`x-api-key`, `x-auth-token`, `x-session-id`, ...), a value
//! marked sensitive (`HeaderValue::is_sensitive`; h2 does not yet carry HPACK's
//! never-indexed flag through to it), and the names `--recent-requests-redact` adds. Over-redacting costs a debugging detail; storing a
//! credential in clear leaks it to anyone who can read the admin port.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, header};
use sluice_filters::reason;

/// Largest ring `--recent-requests` may ask for: each entry holds its headers.
pub const MAX_RECENT: usize = 100_000;

/// What a redacted header value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Headers whose values are secrets, whatever else is configured.
const SECRET_HEADERS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    header::SET_COOKIE,
];

/// Parts of a header name that mark it as carrying a credential (names are lower case).
///
/// Deliberately broad: `auth` also takes `x-authenticated-user`, a detail a tap can
/// live without, while a name like `x-myco-auth` is a credential more often than not.
const SECRET_NAME_PARTS: [&str; 11] = [
    "auth",
    "token",
    "secret",
    "passw",
    "api-key",
    "apikey",
    "api_key",
    "session",
    "cookie",
    "credential",
    "signature",
];

/// Which header values the ring must not keep in clear.
#[derive(Clone, Debug, Default)]
pub struct Redaction {
    extra: Box<[HeaderName]>,
}

impl Redaction {
    /// The built-in rule plus `extra` names (`--recent-requests-redact`).
    pub fn new(extra: Vec<HeaderName>) -> Self {
        Self {
            extra: extra.into_boxed_slice(),
        }
    }

    /// Whether `name: value` is a secret.
    pub fn is_secret(&self, name: &HeaderName, value: &HeaderValue) -> bool {
        value.is_sensitive()
            || SECRET_HEADERS.contains(name)
            || self.extra.contains(name)
            || SECRET_NAME_PARTS
                .iter()
                .any(|part| name.as_str().contains(part))
    }

    /// Replaces every secret value of `headers`.
    fn redact(&self, headers: &mut HeaderMap) {
        for (name, value) in headers.iter_mut() {
            if self.is_secret(name, value) {
                *value = HeaderValue::from_static(REDACTED);
            }
        }
    }
}

/// The `--recent-requests` flags.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RecentArgs {
    /// Keep the last N requests for the admin's /recent (`sluicectl tap`); 0 is off.
    #[arg(
        long,
        env = "SLUICE_RECENT_REQUESTS",
        value_name = "N",
        default_value_t = 0,
        value_parser = clap::value_parser!(u32).range(0..=MAX_RECENT as i64)
    )]
    pub recent_requests: u32,
    /// Keep secret header values (credentials, cookies, names like `x-api-key`) in
    /// that ring (redacted otherwise).
    #[arg(long, env = "SLUICE_RECENT_REQUESTS_SECRETS")]
    pub recent_requests_secrets: bool,
    /// More header names whose values the ring redacts, beyond the credential headers
    /// and names that read like one (repeat, or separate with commas).
    #[arg(
        long,
        env = "SLUICE_RECENT_REQUESTS_REDACT",
        value_name = "HEADER",
        value_delimiter = ',',
        value_parser = parse_header_name
    )]
    pub recent_requests_redact: Vec<HeaderName>,
}

/// A header name as a flag gives it, any case.
fn parse_header_name(s: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(s.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("{s:?} is not a header name"))
}

/// One finished request as `/recent` shows it.
#[derive(Debug)]
pub struct RecentEntry {
    /// Position in the order requests finished (starts at 0, never reused).
    pub seq: u64,
    /// When the response headers were ready, in ms since the Unix epoch.
    pub at_unix_ms: u64,
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// Request method.
    pub method: Method,
    /// Host or `:authority`, port included as sent.
    pub host: Option<String>,
    /// Path, without query (a query may carry secrets).
    pub path: String,
    /// Route (`<policy>.<route>`), when a route took it.
    pub route: Option<Arc<str>>,
    /// The namespace of that route's policy.
    pub namespace: Option<Arc<str>>,
    /// Backend that answered (or failed), when one was picked.
    pub backend: Option<Arc<str>>,
    /// Response status.
    pub status: u16,
    /// `x-sluice-reason`, when the proxy refused or failed it.
    pub reason: Option<String>,
    /// `x-sluice-degraded`, when a fallback answered.
    pub degraded: Option<String>,
    /// Time to response headers.
    pub duration: Duration,
    /// Request headers as received (secrets redacted unless kept).
    pub request_headers: HeaderMap,
    /// Response headers as sent (secrets redacted unless kept).
    pub response_headers: HeaderMap,
}

/// What a request carries into the ring, taken before it is sent on.
#[derive(Debug)]
pub struct Seen {
    method: Method,
    host: Option<String>,
    path: String,
    headers: HeaderMap,
}

impl Seen {
    /// Takes what the entry needs from a request.
    pub fn new<B>(req: &Request<B>) -> Self {
        Self {
            method: req.method().clone(),
            host: req
                .uri()
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| {
                    req.headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_owned)
                }),
            path: req.uri().path().to_owned(),
            headers: req.headers().clone(),
        }
    }
}

/// The ring: a fixed number of slots, the oldest overwritten first.
#[derive(Debug)]
pub struct RecentRequests {
    slots: Box<[ArcSwapOption<RecentEntry>]>,
    next: AtomicU64,
    keep_secrets: bool,
    redaction: Redaction,
}

/// Which entries `/recent` returns; every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecentFilter {
    /// Only entries after this sequence number.
    pub since: Option<u64>,
    /// Only this status (`503`) or class (`5xx`).
    pub status: Option<String>,
    /// Only this `x-sluice-reason`.
    pub reason: Option<String>,
    /// Only this route (`<policy>.<route>`).
    pub route: Option<String>,
    /// Only routes of policies in this namespace.
    pub namespace: Option<String>,
    /// Only this backend.
    pub backend: Option<String>,
    /// Only entries that took at least this long.
    pub min_duration: Option<Duration>,
    /// At most this many, the newest.
    pub limit: Option<usize>,
    /// Show kept secrets.
    pub secrets: bool,
}

impl RecentRequests {
    /// A ring of `capacity` slots (at least one); `keep_secrets` stores the values
    /// `redaction` calls secret as they are.
    pub fn new(capacity: usize, keep_secrets: bool, redaction: Redaction) -> Self {
        let capacity = capacity.clamp(1, MAX_RECENT);
        Self {
            slots: (0..capacity).map(|_| ArcSwapOption::empty()).collect(),
            next: AtomicU64::new(0),
            keep_secrets,
            redaction,
        }
    }

    /// How many requests it keeps.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The sequence number the next request will get (how many were recorded).
    pub fn recorded(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Records a finished request: `seen` from before it was sent, the rest from its
    /// answer.
    pub fn record<B>(
        &self,
        seen: Seen,
        direction: &'static str,
        route: Option<(&Arc<str>, &Arc<str>)>,
        backend: Option<&Arc<str>>,
        resp: &Response<B>,
        duration: Duration,
    ) {
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let mut request_headers = seen.headers;
        let mut response_headers = resp.headers().clone();
        if !self.keep_secrets {
            self.redaction.redact(&mut request_headers);
            self.redaction.redact(&mut response_headers);
        }
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = RecentEntry {
            seq,
            at_unix_ms: unix_ms(SystemTime::now()),
            direction,
            method: seen.method,
            host: seen.host,
            path: seen.path,
            route: route.map(|(_, r)| r.clone()),
            namespace: route.map(|(ns, _)| ns.clone()),
            backend: backend.cloned(),
            status: resp.status().as_u16(),
            reason: header(reason::HEADER),
            degraded: header(reason::DEGRADED_HEADER),
            duration,
            request_headers,
            response_headers,
        };
        self.put(entry);
    }

    /// Stores `entry` in its slot unless a newer one has taken it.
    fn put(&self, entry: RecentEntry) {
        let seq = entry.seq;
        let slot = (seq % self.slots.len() as u64) as usize;
        let entry = Some(Arc::new(entry));
        // A writer held up between its increment and its store must not put an older
        // entry over a newer one that took the slot meanwhile.
        self.slots[slot].rcu(|current| match current {
            Some(newer) if newer.seq > seq => Some(Arc::clone(newer)),
            _ => entry.clone(),
        });
    }

    /// The entries `filter` lets through, oldest first.
    pub fn list(&self, filter: &RecentFilter) -> Vec<Arc<RecentEntry>> {
        let mut out: Vec<Arc<RecentEntry>> = self
            .slots
            .iter()
            .filter_map(|s| s.load_full())
            .filter(|e| filter.accepts(e))
            .collect();
        out.sort_by_key(|e| e.seq);
        if let Some(limit) = filter.limit
            && out.len() > limit
        {
            out.drain(..out.len() - limit);
        }
        out
    }

    /// `/recent` as JSON.
    pub fn to_json(&self, filter: &RecentFilter) -> serde_json::Value {
        let hide = (!(filter.secrets && self.keep_secrets)).then_some(&self.redaction);
        let requests: Vec<serde_json::Value> = self
            .list(filter)
            .iter()
            .map(|e| entry_json(e, hide))
            .collect();
        serde_json::json!({
            "enabled": true,
            "capacity": self.capacity(),
            "recorded": self.recorded(),
            "secretsKept": self.keep_secrets,
            "requests": requests,
        })
    }
}

/// `/recent` when the ring is off.
pub fn disabled_json() -> serde_json::Value {
    serde_json::json!({
        "enabled": false,
        "capacity": 0,
        "recorded": 0,
        "requests": [],
        "hint": "start the proxy with --recent-requests N to keep the last N requests",
    })
}

impl RecentFilter {
    /// Reads a `/recent` query string: `since`, `status`, `reason`, `route`, `namespace`,
    /// `backend`, `min_ms`, `limit`, `secrets`.
    pub fn from_query(query: Option<&str>) -> Result<Self, String> {
        let mut f = RecentFilter::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map_err(|_| format!("{k}: not UTF-8"))?
                .into_owned();
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{k}={v:?}: expected a whole number"))
            };
            match k {
                "since" => f.since = Some(number(&v)?),
                "status" => {
                    if !status_filter_ok(&v) {
                        return Err(format!(
                            "status={v:?}: expected a code (503) or a class (5xx)"
                        ));
                    }
                    f.status = Some(v);
                }
                "reason" => f.reason = Some(v),
                "route" => f.route = Some(v),
                "namespace" => f.namespace = Some(v),
                "backend" => f.backend = Some(v),
                "min_ms" => f.min_duration = Some(Duration::from_millis(number(&v)?)),
                "limit" => f.limit = Some(number(&v)? as usize),
                "secrets" => f.secrets = v == "true" || v == "1",
                _ => return Err(format!("unknown parameter {k:?}")),
            }
        }
        Ok(f)
    }

    fn accepts(&self, e: &RecentEntry) -> bool {
        self.since.is_none_or(|s| e.seq > s)
            && self
                .status
                .as_deref()
                .is_none_or(|s| status_matches(s, e.status))
            && self
                .reason
                .as_deref()
                .is_none_or(|r| e.reason.as_deref() == Some(r))
            && self
                .route
                .as_deref()
                .is_none_or(|r| e.route.as_deref() == Some(r))
            && self
                .namespace
                .as_deref()
                .is_none_or(|n| e.namespace.as_deref() == Some(n))
            && self
                .backend
                .as_deref()
                .is_none_or(|b| e.backend.as_deref() == Some(b))
            && self.min_duration.is_none_or(|d| e.duration >= d)
    }
}

/// `503` or `5xx`.
fn status_filter_ok(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 3
        && (b'1'..=b'5').contains(&b[0])
        && ((b[1].is_ascii_digit() && b[2].is_ascii_digit())
            || (b[1].eq_ignore_ascii_case(&b'x') && b[2].eq_ignore_ascii_case(&b'x')))
}

fn status_matches(filter: &str, status: u16) -> bool {
    let b = filter.as_bytes();
    if b[1].eq_ignore_ascii_case(&b'x') {
        status / 100 == u16::from(b[0] - b'0')
    } else {
        filter.parse::<u16>().is_ok_and(|s| s == status)
    }
}

/// `hide`: the rule to hide kept secrets by, unless they are to be shown.
fn headers_json(headers: &HeaderMap, hide: Option<&Redaction>) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let text = if hide.is_some_and(|r| r.is_secret(name, value)) {
            REDACTED.to_string()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        match map
            .entry(name.as_str())
            .or_insert_with(|| serde_json::Value::Array(Vec::new()))
        {
            serde_json::Value::Array(values) => values.push(text.into()),
            _ => unreachable!("every entry is an array"),
        }
    }
    serde_json::Value::Object(map)
}

fn entry_json(e: &RecentEntry, hide: Option<&Redaction>) -> serde_json::Value {
    serde_json::json!({
        "seq": e.seq,
        "at": e.at_unix_ms,
        "direction": e.direction,
        "method": e.method.as_str(),
        "host": e.host,
        "path": e.path,
        "namespace": e.namespace.as_deref(),
        "route": e.route.as_deref(),
        "backend": e.backend.as_deref(),
        "status": e.status,
        "reason": e.reason,
        "degraded": e.degraded,
        "durationMs": e.duration.as_secs_f64() * 1000.0,
        "requestHeaders": headers_json(&e.request_headers, hide),
        "responseHeaders": headers_json(&e.response_headers, hide),
    })
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str, auth: &str) -> Request<()> {
        Request::builder()
            .uri(format!("http://log-service{path}?token=x"))
            .header("authorization", auth)
            .header("cookie", "a=b")
            .header("x-user-id", "alice")
            .body(())
            .unwrap()
    }

    fn resp(status: u16, reason: Option<&str>) -> Response<()> {
        let mut b = Response::builder()
            .status(status)
            .header("set-cookie", "s=1");
        if let Some(r) = reason {
            b = b.header("x-sluice-reason", r);
        }
        b.body(()).unwrap()
    }

    fn fill(ring: &RecentRequests, n: u64) {
        let route: Arc<str> = "log-service.ingest".into();
        let shop: Arc<str> = "shop".into();
        let v1: Arc<str> = "log-v1".into();
        for i in 0..n {
            let (status, reason) = if i % 4 == 0 {
                (503, Some("breaker-open"))
            } else {
                (200, None)
            };
            ring.record(
                Seen::new(&req(&format!("/logs/{i}"), "Bearer s3cret")),
                "outbound",
                Some((&shop, &route)),
                Some(&v1),
                &resp(status, reason),
                Duration::from_millis(i),
            );
        }
    }

    #[test]
    fn keeps_the_newest_in_order_and_filters_after_the_response() {
        let ring = RecentRequests::new(8, false, Redaction::default());
        fill(&ring, 20);
        assert_eq!(ring.recorded(), 20);
        let all = ring.list(&RecentFilter::default());
        let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (12..20).collect::<Vec<_>>());
        assert_eq!(all[0].path, "/logs/12", "no query kept");

        let failing = RecentFilter::from_query(Some("status=5xx&reason=breaker-open")).unwrap();
        let seqs: Vec<u64> = ring.list(&failing).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [12, 16]);
        let slow = RecentFilter::from_query(Some("min_ms=18&route=log-service.ingest")).unwrap();
        assert_eq!(ring.list(&slow).len(), 2);
        let here = RecentFilter::from_query(Some("min_ms=18&namespace=shop")).unwrap();
        assert_eq!(ring.list(&here).len(), 2);
        let elsewhere = RecentFilter::from_query(Some("namespace=staging")).unwrap();
        assert!(ring.list(&elsewhere).is_empty());
        let newest = RecentFilter::from_query(Some("since=13&limit=2&backend=log-v1")).unwrap();
        let seqs: Vec<u64> = ring.list(&newest).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [18, 19]);
        assert!(
            ring.list(&RecentFilter::from_query(Some("backend=log-v2")).unwrap())
                .is_empty()
        );

        assert!(RecentFilter::from_query(Some("status=5")).is_err());
        assert!(RecentFilter::from_query(Some("nope=1")).is_err());
        assert!(RecentFilter::from_query(Some("min_ms=fast")).is_err());
    }

    #[test]
    fn secrets_are_redacted_unless_kept_and_asked_for() {
        let redacting = RecentRequests::new(4, false, Redaction::default());
        fill(&redacting, 1);
        let asked = RecentFilter {
            secrets: true,
            ..Default::default()
        };
        let v = redacting.to_json(&asked);
        let e = &v["requests"][0];
        assert_eq!(e["requestHeaders"]["authorization"][0], REDACTED);
        assert_eq!(e["requestHeaders"]["cookie"][0], REDACTED);
        assert_eq!(e["responseHeaders"]["set-cookie"][0], REDACTED);
        assert_eq!(e["requestHeaders"]["x-user-id"][0], "alice");
        // Not even kept in memory.
        let stored = redacting.list(&RecentFilter::default());
        assert_eq!(stored[0].request_headers["authorization"], REDACTED);

        let keeping = RecentRequests::new(4, true, Redaction::default());
        fill(&keeping, 1);
        let hidden = keeping.to_json(&RecentFilter::default());
        assert_eq!(
            hidden["requests"][0]["requestHeaders"]["authorization"][0],
            REDACTED
        );
        let shown = keeping.to_json(&asked);
        assert_eq!(
            shown["requests"][0]["requestHeaders"]["authorization"][0],
            "Bearer s3cret"
        );
        assert_eq!(
            shown["requests"][0]["responseHeaders"]["set-cookie"][0],
            "s=1"
        );
    }

    #[test]
    fn names_that_read_like_credentials_sensitive_values_and_configured_names_are_secret() {
        let rule = Redaction::new(vec![parse_header_name("X-Tenant-Pin").unwrap()]);
        let plain = HeaderValue::from_static("v");
        let secret = |name: &'static str| rule.is_secret(&HeaderName::from_static(name), &plain);
        for name in [
            "authorization",
            "proxy-authorization",
            "cookie",
            "set-cookie",
            "x-api-key",
            "x-auth-token",
            "x-amz-security-token",
            "x-csrf-token",
            "x-session-id",
            "x-client-secret",
            "x-db-password",
            "apikey",
            "x-goog-api_key",
            "x-hub-signature-256",
            "x-aws-credentials",
            "x-tenant-pin",
        ] {
            assert!(secret(name), "{name} is secret");
        }
        for name in [
            "x-user-id",
            "content-type",
            "x-request-id",
            "traceparent",
            "host",
        ] {
            assert!(!secret(name), "{name} is not secret");
        }
        let mut marked = HeaderValue::from_static("opaque");
        marked.set_sensitive(true);
        assert!(rule.is_secret(&HeaderName::from_static("x-opaque"), &marked));
        assert!(parse_header_name("bad header").is_err());
    }

    #[test]
    fn kept_secrets_are_hidden_by_the_same_rule_when_not_asked_for() {
        let rule = || Redaction::new(vec![HeaderName::from_static("x-tenant-pin")]);
        let request = Request::builder()
            .uri("http://log-service/")
            .header("x-api-key", "k-123")
            .header("x-tenant-pin", "4242")
            .header("x-user-id", "alice")
            .body(())
            .unwrap();
        for keep in [false, true] {
            let ring = RecentRequests::new(2, keep, rule());
            ring.record(
                Seen::new(&request),
                "outbound",
                None,
                None,
                &resp(200, None),
                Duration::ZERO,
            );
            let stored = &ring.list(&RecentFilter::default())[0].request_headers;
            let expect = |clear: &str| {
                if keep {
                    clear.to_owned()
                } else {
                    REDACTED.to_owned()
                }
            };
            assert_eq!(stored["x-api-key"], expect("k-123").as_str());
            assert_eq!(stored["x-tenant-pin"], expect("4242").as_str());
            let hidden = ring.to_json(&RecentFilter::default());
            let headers = &hidden["requests"][0]["requestHeaders"];
            assert_eq!(headers["x-api-key"][0], REDACTED);
            assert_eq!(headers["x-tenant-pin"][0], REDACTED);
            assert_eq!(headers["x-user-id"][0], "alice");
            let asked = RecentFilter {
                secrets: true,
                ..Default::default()
            };
            let shown = ring.to_json(&asked);
            assert_eq!(
                shown["requests"][0]["requestHeaders"]["x-api-key"][0],
                expect("k-123").as_str()
            );
        }
    }

    #[test]
    fn a_writer_held_up_never_overwrites_a_newer_entry() {
        let ring = RecentRequests::new(1, false, Redaction::default());
        fill(&ring, 2);
        let newest = ring.list(&RecentFilter::default());
        assert_eq!(newest.iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
        // The entry of request 0, stored late: the slot keeps request 1's.
        let late = RecentRequests::new(1, false, Redaction::default());
        fill(&late, 1);
        let stale = late.list(&RecentFilter::default()).remove(0);
        drop(late);
        let stale = Arc::try_unwrap(stale).unwrap();
        assert_eq!(stale.seq, 0);
        ring.put(stale);
        let kept = ring.list(&RecentFilter::default());
        assert_eq!(kept.iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
        assert_eq!(kept[0].path, "/logs/1");
    }

    #[test]
    fn the_query_is_read_strictly_and_each_filter_holds() {
        let ring = RecentRequests::new(8, false, Redaction::default());
        let now = || {
            let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            u64::try_from(since.as_millis()).unwrap()
        };
        let before = now();
        fill(&ring, 8);
        let after = now();
        assert!(
            ring.list(&RecentFilter::default())
                .iter()
                .all(|e| (before..=after).contains(&e.at_unix_ms)),
            "stamped with the time it finished"
        );
        let seqs = |q: &str| -> Vec<u64> {
            let f = RecentFilter::from_query(Some(q)).unwrap();
            ring.list(&f).iter().map(|e| e.seq).collect()
        };
        assert_eq!(seqs("status=503"), [0, 4]);
        assert_eq!(seqs("status=200"), [1, 2, 3, 5, 6, 7]);
        assert_eq!(seqs("status=500"), Vec::<u64>::new(), "a code is exact");
        assert_eq!(seqs("status=2XX"), [1, 2, 3, 5, 6, 7]);
        assert_eq!(seqs("since=6"), [7], "strictly after");
        assert_eq!(seqs("limit=3"), [5, 6, 7]);
        assert_eq!(seqs("limit=8"), (0..8).collect::<Vec<_>>());

        for bad in ["50x", "5x3", "603", "5000", "x5x", ""] {
            assert!(
                RecentFilter::from_query(Some(&format!("status={bad}"))).is_err(),
                "status={bad}"
            );
        }
        let secrets = |q: &str| RecentFilter::from_query(Some(q)).unwrap().secrets;
        assert!(secrets("secrets=true"));
        assert!(secrets("secrets=1"));
        assert!(!secrets("secrets=yes"));
        assert!(!secrets("secrets"));
        assert!(!secrets("limit=1"));

        let json = ring.to_json(&RecentFilter::default());
        assert_eq!(
            (&json["enabled"], &json["capacity"], &json["recorded"]),
            (&true.into(), &8.into(), &8.into())
        );
        assert_eq!(json["requests"].as_array().unwrap().len(), 8);
        let off = disabled_json();
        assert_eq!(
            (&off["enabled"], &off["capacity"]),
            (&false.into(), &0.into())
        );
        assert!(off["hint"].as_str().unwrap().contains("--recent-requests"));
    }

    #[test]
    fn concurrent_writers_lose_nothing_but_the_oldest() {
        let ring = Arc::new(RecentRequests::new(64, false, Redaction::default()));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let ring = ring.clone();
                std::thread::spawn(move || fill(&ring, 100))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ring.recorded(), 400);
        let seqs: Vec<u64> = ring
            .list(&RecentFilter::default())
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, (336..400).collect::<Vec<_>>());
    }
}
