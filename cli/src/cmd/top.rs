//! `top`: rate, errors and duration (RED) per route × backend, from the counters the
//! proxies already keep (`sluice_requests_total`, `sluice_request_duration_seconds` on
//! each `/metrics`), summed over the proxies given. Rates, error share and latency
//! percentiles are over the last interval; the totals are since each proxy started.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};

use crate::args::TopArgs;
use crate::client::AdminClient;
use crate::error::CliError;
use crate::table::Table;
use crate::{Ctx, Verdict};

/// Counters of one direction × route × backend at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Requests answered.
    pub requests: f64,
    /// Of which 5xx.
    pub errors: f64,
    /// Cumulative duration buckets: (upper bound in seconds, count), ascending.
    pub buckets: Vec<(f64, f64)>,
}

/// `(direction, namespace, route, backend)`.
pub type Key = (String, String, String, String);

/// One sample of every proxy's counters.
pub type Sample = BTreeMap<Key, Counters>;

/// One row of the view.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Row {
    /// `outbound` or `inbound`.
    pub direction: String,
    /// The namespace of the route's policy (empty from a proxy that does not say).
    pub namespace: String,
    /// Route, `<policy>.<route>` (or `inbound`).
    pub route: String,
    /// Backend.
    pub backend: String,
    /// Requests per second over the interval.
    pub rps: f64,
    /// Share of 5xx over the interval (`None` without requests).
    pub error_ratio: Option<f64>,
    /// Median time to response headers over the interval, in ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile over the interval, in ms.
    pub p99_ms: Option<f64>,
    /// Requests since the proxies started.
    pub requests_total: f64,
    /// 5xx since the proxies started.
    pub errors_total: f64,
}

/// Adds one proxy's `/metrics` text to `into`.
pub fn add_scrape(into: &mut Sample, text: &str) -> Result<(), String> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .map_err(|e| format!("not the Prometheus text format: {e}"))?;
    // A proxy always exports some sluice_* gauge; anything else is not a proxy's page.
    let ours = |name: &str| name.starts_with("sluice_");
    if !scrape.docs.keys().any(|k| ours(k)) && !scrape.samples.iter().any(|s| ours(&s.metric)) {
        return Err("no sluice_* metrics in it: is this a Sluice proxy's admin port?".into());
    }
    for s in scrape.samples {
        let key = || -> Key {
            let l = |n: &str| s.labels.get(n).unwrap_or("").to_string();
            (l("direction"), l("namespace"), l("route"), l("backend"))
        };
        match (s.metric.as_str(), &s.value) {
            ("sluice_requests_total", Value::Counter(v) | Value::Untyped(v)) => {
                let c = into.entry(key()).or_default();
                c.requests += v;
                if s.labels
                    .get("code")
                    .is_some_and(|code| code.starts_with('5'))
                {
                    c.errors += v;
                }
            }
            ("sluice_request_duration_seconds", Value::Histogram(buckets)) => {
                let c = into.entry(key()).or_default();
                add_buckets(
                    &mut c.buckets,
                    buckets.iter().map(|b| (b.less_than, b.count)),
                );
            }
            _ => {}
        }
    }
    Ok(())
}

/// The view from two samples `elapsed` apart (`before` empty: totals only).
pub fn rows(before: &Sample, now: &Sample, elapsed: Duration) -> Vec<Row> {
    rows_across(
        std::slice::from_ref(before),
        std::slice::from_ref(now),
        elapsed,
    )
}

/// The view from two samples of each proxy, `before[i]` and `now[i]` of the same one,
/// `elapsed` apart. The differences are taken per proxy, then added up: a proxy whose
/// counters went down restarted in between and counted from zero since (as Prometheus'
/// `rate()` reads a reset), where a difference of the sums would have gone negative and
/// shown the whole route idle.
pub fn rows_across(before: &[Sample], now: &[Sample], elapsed: Duration) -> Vec<Row> {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let empty = Counters::default();
    let mut moved = Sample::new();
    let mut totals = Sample::new();
    for (i, proxy) in now.iter().enumerate() {
        for (key, c) in proxy {
            let was = before
                .get(i)
                .and_then(|b| b.get(key))
                .filter(|w| c.requests >= w.requests)
                .unwrap_or(&empty);
            let d = moved.entry(key.clone()).or_default();
            d.requests += c.requests - was.requests;
            d.errors += (c.errors - was.errors).max(0.0);
            add_buckets(
                &mut d.buckets,
                c.buckets.iter().map(|(le, n)| {
                    let w = was
                        .buckets
                        .iter()
                        .find(|(l, _)| l.to_bits() == le.to_bits())
                        .map_or(0.0, |(_, n)| *n);
                    (*le, (n - w).max(0.0))
                }),
            );
            let t = totals.entry(key.clone()).or_default();
            t.requests += c.requests;
            t.errors += c.errors;
        }
    }
    moved
        .into_iter()
        .map(|(key, d)| {
            let t = &totals[&key];
            let (direction, namespace, route, backend) = key;
            Row {
                rps: d.requests / secs,
                error_ratio: (d.requests > 0.0).then(|| d.errors / d.requests),
                p50_ms: quantile(&d.buckets, 0.5).map(|s| s * 1000.0),
                p99_ms: quantile(&d.buckets, 0.99).map(|s| s * 1000.0),
                requests_total: t.requests,
                errors_total: t.errors,
                direction,
                namespace,
                route,
                backend,
            }
        })
        .collect()
}

/// Adds cumulative buckets to `into`, bound by bound, keeping it ascending.
fn add_buckets(into: &mut Vec<(f64, f64)>, from: impl Iterator<Item = (f64, f64)>) {
    for (le, n) in from {
        match into.iter_mut().find(|(l, _)| l.to_bits() == le.to_bits()) {
            Some((_, c)) => *c += n,
            None => into.push((le, n)),
        }
    }
    into.sort_by(|a, b| a.0.total_cmp(&b.0));
}

/// The `q` quantile of cumulative buckets, interpolated inside its bucket as
/// Prometheus' `histogram_quantile` does; `None` without observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let share = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * share);
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

/// One sample per proxy, in the order given.
async fn sample(proxies: &[AdminClient]) -> Result<Vec<Sample>, CliError> {
    let mut out = Vec::with_capacity(proxies.len());
    for p in proxies {
        let text = p.get_text("/metrics").await?;
        let mut s = Sample::new();
        add_scrape(&mut s, &text).map_err(|e| p.malformed("/metrics", e))?;
        out.push(s);
    }
    Ok(out)
}

fn render(rows: &[Row], proxies: usize, interval: Duration) -> String {
    let mut text = format!(
        "sluicectl top: {proxies} prox{}, rates over {:.1}s\n\n",
        if proxies == 1 { "y" } else { "ies" },
        interval.as_secs_f64()
    );
    let mut t = Table::new([
        "DIRECTION",
        "ROUTE",
        "BACKEND",
        "RPS",
        "ERRORS",
        "P50",
        "P99",
        "REQUESTS",
        "5XX",
    ]);
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}ms"));
    for r in rows {
        t.row([
            r.direction.clone(),
            // Policy names repeat across namespaces: `<namespace>/<policy>.<route>`.
            if r.namespace.is_empty() {
                r.route.clone()
            } else {
                format!("{}/{}", r.namespace, r.route)
            },
            if r.backend.is_empty() {
                "-".to_string()
            } else {
                r.backend.clone()
            },
            format!("{:.1}", r.rps),
            r.error_ratio
                .map_or("-".to_string(), |e| format!("{:.1}%", e * 100.0)),
            ms(r.p50_ms),
            ms(r.p99_ms),
            format!("{}", r.requests_total),
            format!("{}", r.errors_total),
        ]);
    }
    if t.is_empty() {
        text.push_str("no requests counted yet\n");
    } else {
        text.push_str(&t.render());
    }
    text
}

/// Runs `top`.
pub async fn run(ctx: &mut Ctx<'_>, args: TopArgs) -> Result<Verdict, CliError> {
    let proxies = ctx.proxies()?;
    let interval = args.interval.get().max(Duration::from_millis(100));
    let mut before = sample(&proxies).await?;
    let mut taken = Instant::now();
    loop {
        tokio::time::sleep(interval).await;
        let now = sample(&proxies).await?;
        let elapsed = taken.elapsed();
        let rows = rows_across(&before, &now, elapsed);
        if ctx.json() {
            let v = serde_json::json!({ "interval_s": elapsed.as_secs_f64(), "rows": rows });
            if args.once {
                ctx.print_json(&v)?;
            } else {
                ctx.print(&format!("{v}\n"))?;
            }
        } else {
            let frame = render(&rows, proxies.len(), elapsed);
            if args.once {
                ctx.print(&frame)?;
            } else {
                // Home and clear, then the frame: refreshed in place.
                ctx.print(&format!("\x1b[H\x1b[2J{frame}"))?;
            }
        }
        ctx.out
            .flush()
            .map_err(|e| CliError::Usage(format!("cannot write the answer: {e}")))?;
        if args.once {
            return Ok(Verdict::Ok);
        }
        (before, taken) = (now, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"# HELP sluice_requests_total Requests handled, by outcome.
# TYPE sluice_requests_total counter
sluice_requests_total{backend="v1",code="200",direction="outbound",namespace="prod",peer_identity="",route="shop.api"} 90
sluice_requests_total{backend="v1",code="503",direction="outbound",namespace="prod",peer_identity="",route="shop.api"} 10
sluice_requests_total{backend="",code="404",direction="outbound",namespace="prod",peer_identity="",route="shop.none"} 3
# HELP sluice_request_duration_seconds Time from request to response headers.
# TYPE sluice_request_duration_seconds histogram
sluice_request_duration_seconds_bucket{backend="v1",direction="outbound",namespace="prod",peer_identity="",route="shop.api",le="0.001"} 50
sluice_request_duration_seconds_bucket{backend="v1",direction="outbound",namespace="prod",peer_identity="",route="shop.api",le="0.01"} 99
sluice_request_duration_seconds_bucket{backend="v1",direction="outbound",namespace="prod",peer_identity="",route="shop.api",le="+Inf"} 100
sluice_request_duration_seconds_sum{backend="v1",direction="outbound",namespace="prod",peer_identity="",route="shop.api"} 0.3
sluice_request_duration_seconds_count{backend="v1",direction="outbound",namespace="prod",peer_identity="",route="shop.api"} 100
"#;

    /// Policy names repeat across namespaces: one route of two namespaces is two rows,
    /// and the table tells them apart.
    #[test]
    fn the_same_route_in_two_namespaces_is_two_rows() {
        let mut now = Sample::new();
        add_scrape(&mut now, METRICS).unwrap();
        add_scrape(&mut now, &METRICS.replace("prod", "staging")).unwrap();
        let rows = rows(&Sample::new(), &now, Duration::from_secs(2));
        let api: Vec<(&str, f64)> = rows
            .iter()
            .filter(|r| r.route == "shop.api")
            .map(|r| (r.namespace.as_str(), r.requests_total))
            .collect();
        assert_eq!(api, [("prod", 100.0), ("staging", 100.0)]);
        let shown = render(&rows, 2, Duration::from_secs(2));
        assert!(shown.contains("prod/shop.api"), "{shown}");
        assert!(shown.contains("staging/shop.api"), "{shown}");
    }

    #[test]
    fn red_per_route_and_backend_from_two_samples() {
        let mut now = Sample::new();
        add_scrape(&mut now, METRICS).unwrap();
        // A second proxy with the same series adds up.
        add_scrape(&mut now, METRICS).unwrap();
        let key = (
            "outbound".to_string(),
            "prod".to_string(),
            "shop.api".to_string(),
            "v1".to_string(),
        );
        assert_eq!(now[&key].requests, 200.0);
        assert_eq!(now[&key].errors, 20.0);
        assert_eq!(
            now[&key].buckets,
            [(0.001, 100.0), (0.01, 198.0), (f64::INFINITY, 200.0)]
        );

        let rows = rows(&Sample::new(), &now, Duration::from_secs(2));
        let api = rows.iter().find(|r| r.route == "shop.api").unwrap();
        assert_eq!(api.rps, 100.0);
        assert_eq!(api.error_ratio, Some(0.1));
        assert_eq!(api.p50_ms, Some(1.0));
        let p99 = api.p99_ms.unwrap();
        assert!((p99 - 10.0).abs() < 1e-9, "{p99}");

        // Nothing new in the next interval: totals stay, rates are zero.
        let idle = super::rows(&now, &now, Duration::from_secs(2));
        let api = idle.iter().find(|r| r.route == "shop.api").unwrap();
        assert_eq!((api.rps, api.error_ratio, api.p50_ms), (0.0, None, None));
        assert_eq!(api.requests_total, 200.0);
    }

    /// A proxy restarted between two samples counted from zero since: its requests
    /// after the restart add to the other proxy's, where the difference of the sums went
    /// negative and showed the route idle.
    #[test]
    fn a_proxy_restarted_between_samples_counts_from_zero() {
        let one = |text: &str| {
            let mut s = Sample::new();
            add_scrape(&mut s, text).unwrap();
            s
        };
        let steady_before = one(METRICS);
        // 20 more answered.
        let steady_now = one(&METRICS.replace("} 90\n", "} 110\n"));
        // The restarted proxy: 100 requests before, 5 since its restart.
        let restarted_before = one(METRICS);
        let restarted_now = one(&METRICS
            .replace("} 90\n", "} 4\n")
            .replace("} 10\n", "} 1\n"));
        let rows = rows_across(
            &[steady_before, restarted_before],
            &[steady_now, restarted_now],
            Duration::from_secs(1),
        );
        let api = rows.iter().find(|r| r.route == "shop.api").unwrap();
        assert_eq!(api.rps, 25.0, "{api:?}");
        assert_eq!(api.error_ratio, Some(1.0 / 25.0), "{api:?}");
        assert_eq!(api.requests_total, 125.0);
        assert_eq!(api.errors_total, 11.0, "totals are the counters as read");
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        let b = [(0.1, 0.0), (0.2, 10.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(&b, 0.5), Some(0.15000000000000002));
        assert_eq!(quantile(&[(1.0, 0.0)], 0.5), None);
        // The 0th quantile sits at the top of an empty first bucket, not at NaN.
        assert_eq!(quantile(&b, 0.0), Some(0.1));
        assert_eq!(
            quantile(&[(0.5, 1.0), (f64::INFINITY, 4.0)], 0.99),
            Some(0.5)
        );
    }

    #[test]
    fn refuses_what_is_not_a_proxys_metrics() {
        let mut s = Sample::new();
        let err = add_scrape(&mut s, "<html>oops</html>").unwrap_err();
        assert!(err.contains("no sluice_* metrics"), "{err}");
        add_scrape(
            &mut s,
            "# TYPE sluice_concurrency_limit gauge\nsluice_concurrency_limit 0\n",
        )
        .unwrap();
        assert!(s.is_empty());
    }
}
