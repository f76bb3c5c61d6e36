//! `tap`: recent requests from each proxy's ring (`GET /recent`), filtered by the
//! proxy after the response (status or class, `x-sluice-reason`, route, backend,
//! latency); with `--follow`, new ones as they come. Secret headers stay redacted
//! unless `--show-secrets` asks a proxy that kept them.

use std::time::Duration;

use serde::Deserialize;

use crate::args::TapArgs;
use crate::client::AdminClient;
use crate::error::CliError;
use crate::table::{Table, utc};
use crate::{Ctx, Verdict};

/// `GET /recent` of a proxy (the fields used here).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RecentAnswer {
    /// Whether the proxy keeps a ring at all.
    pub enabled: bool,
    /// The entries the filters let through, oldest first.
    pub requests: Vec<Entry>,
}

/// One request as `/recent` shows it.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Entry {
    /// Order in which requests finished.
    pub seq: u64,
    /// When (ms since the Unix epoch).
    pub at: u64,
    /// `outbound` or `inbound`.
    pub direction: String,
    /// Method.
    pub method: String,
    /// Host.
    pub host: Option<String>,
    /// Path, without query.
    pub path: String,
    /// The namespace of the route's policy.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Route, `<policy>.<route>`.
    pub route: Option<String>,
    /// Backend.
    pub backend: Option<String>,
    /// Status.
    pub status: u16,
    /// `x-sluice-reason`.
    pub reason: Option<String>,
    /// `x-sluice-degraded`.
    pub degraded: Option<String>,
    /// Time to response headers, ms.
    pub duration_ms: f64,
    /// Request headers, each name with its values.
    pub request_headers: serde_json::Map<String, serde_json::Value>,
    /// Response headers.
    pub response_headers: serde_json::Map<String, serde_json::Value>,
}

/// The `/recent` query for these filters, after `since` when following. Following, a
/// poll asks for every request after `since` (the proxy's ring bounds them): `limit`
/// keeps the newest, and a burst between two polls larger than it would be skipped.
pub fn query(args: &TapArgs, since: Option<u64>) -> String {
    // RFC 3986's unreserved characters stay as they are; everything else is escaped.
    const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let enc = |v: &str| percent_encoding::utf8_percent_encode(v, ESCAPED).to_string();
    let mut q = Vec::new();
    if since.is_none() {
        q.push(format!("limit={}", args.limit));
    }
    for (k, v) in [
        ("status", &args.status),
        ("reason", &args.reason),
        ("route", &args.route),
        ("namespace", &args.namespace),
        ("backend", &args.backend),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", enc(v)));
        }
    }
    if let Some(d) = args.min_latency {
        q.push(format!("min_ms={}", d.get().as_millis()));
    }
    if let Some(s) = since {
        q.push(format!("since={s}"));
    }
    if args.show_secrets {
        q.push("secrets=true".into());
    }
    format!("/recent?{}", q.join("&"))
}

fn row(proxy: &str, e: &Entry) -> Vec<String> {
    let dash = || "-".to_string();
    vec![
        utc(e.at),
        proxy.to_string(),
        e.direction.clone(),
        e.method.clone(),
        e.host.clone().unwrap_or_else(dash),
        e.path.clone(),
        match (&e.namespace, &e.route) {
            (Some(ns), Some(r)) if !ns.is_empty() => format!("{ns}/{r}"),
            (_, r) => r.clone().unwrap_or_else(dash),
        },
        e.backend.clone().unwrap_or_else(dash),
        e.status.to_string(),
        e.reason
            .clone()
            .or_else(|| e.degraded.clone().map(|d| format!("degraded: {d}")))
            .unwrap_or_else(dash),
        format!("{:.1}ms", e.duration_ms),
    ]
}

const HEADER: [&str; 11] = [
    "TIME", "PROXY", "DIR", "METHOD", "HOST", "PATH", "ROUTE", "BACKEND", "STATUS", "REASON",
    "LATENCY",
];

fn headers_text(e: &Entry) -> String {
    let mut text = String::new();
    for (side, map) in [(">", &e.request_headers), ("<", &e.response_headers)] {
        for (name, values) in map {
            for v in values.as_array().into_iter().flatten() {
                text.push_str(&format!(
                    "    {side} {name}: {}\n",
                    v.as_str().unwrap_or("")
                ));
            }
        }
    }
    text
}

async fn fetch(
    proxies: &[AdminClient],
    args: &TapArgs,
    since: &[Option<u64>],
) -> Result<Vec<RecentAnswer>, CliError> {
    let mut out = Vec::with_capacity(proxies.len());
    for (p, since) in proxies.iter().zip(since) {
        out.push(p.get_json(&query(args, *since)).await?);
    }
    Ok(out)
}

/// Checks `--status` as the proxy's `/recent` does (a code `100`–`599`, or a class
/// `1xx`–`5xx`), so a bad one is a bad flag rather than a refusal by every proxy.
pub fn check_status(status: &str) -> Result<(), CliError> {
    let b = status.as_bytes();
    let ok = b.len() == 3
        && (b'1'..=b'5').contains(&b[0])
        && ((b[1].is_ascii_digit() && b[2].is_ascii_digit())
            || (b[1].eq_ignore_ascii_case(&b'x') && b[2].eq_ignore_ascii_case(&b'x')));
    if ok {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "--status {status:?}: expected a status code from 100 to 599 (503) or a class from 1xx to 5xx (5xx)"
        )))
    }
}

/// Runs `tap`.
pub async fn run(ctx: &mut Ctx<'_>, args: TapArgs) -> Result<Verdict, CliError> {
    if let Some(status) = &args.status {
        check_status(status)?;
    }
    let proxies = ctx.proxies()?;
    let mut since: Vec<Option<u64>> = vec![None; proxies.len()];
    let answers = fetch(&proxies, &args, &since).await?;
    let off: Vec<&str> = proxies
        .iter()
        .zip(&answers)
        .filter(|(_, a)| !a.enabled)
        .map(|(p, _)| p.url())
        .collect();
    if !off.is_empty() && !ctx.json() {
        for p in &off {
            ctx.print(&format!(
                "{p}: recent requests are off (start the proxy with --recent-requests N)\n"
            ))?;
        }
    }
    let all_off = off.len() == proxies.len();
    if ctx.json() && !args.follow {
        let v: Vec<_> = proxies
            .iter()
            .zip(&answers)
            .map(|(p, a)| {
                serde_json::json!({ "proxy": p.url(), "enabled": a.enabled, "requests": a.requests })
            })
            .collect();
        ctx.print_json(&serde_json::json!({ "proxies": v }))?;
        return Ok(if all_off {
            Verdict::Failing
        } else {
            Verdict::Ok
        });
    }
    if all_off {
        return Ok(Verdict::Failing);
    }
    let mut answers = answers;
    let mut first = true;
    loop {
        let mut t = Table::new(HEADER);
        let mut lines = Vec::new();
        let mut entries: Vec<(&str, &Entry)> = proxies
            .iter()
            .zip(&answers)
            .flat_map(|(p, a)| a.requests.iter().map(move |e| (p.url(), e)))
            .collect();
        entries.sort_by_key(|(_, e)| e.at);
        for (proxy, e) in &entries {
            if ctx.json() {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                v["proxy"] = (*proxy).into();
                lines.push(format!("{v}\n"));
            } else if args.headers {
                let mut one = Table::new(HEADER);
                one.row(row(proxy, e));
                let rendered = one.render();
                let body = rendered.lines().nth(1).unwrap_or("");
                lines.push(format!("{body}\n{}", headers_text(e)));
            } else {
                t.row(row(proxy, e));
            }
        }
        if !ctx.json() && !args.headers {
            if !t.is_empty() {
                let rendered = t.render();
                // Following, the column titles are printed once.
                let skip = usize::from(!first);
                lines.extend(rendered.lines().skip(skip).map(|l| format!("{l}\n")));
            } else if first && !args.follow {
                lines.push("no request matches\n".into());
            }
        }
        for l in lines {
            ctx.print(&l)?;
        }
        ctx.out
            .flush()
            .map_err(|e| CliError::Usage(format!("cannot write the answer: {e}")))?;
        if !args.follow {
            return Ok(Verdict::Ok);
        }
        for (s, a) in since.iter_mut().zip(&answers) {
            if let Some(last) = a.requests.last() {
                *s = Some(last.seq);
            }
        }
        first = first && entries.is_empty();
        tokio::time::sleep(args.interval.get().max(Duration::from_millis(100))).await;
        answers = fetch(&proxies, &args, &since).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn builds_the_recent_query_from_the_filters() {
        let cli = crate::args::Cli::try_parse_from([
            "sluicectl",
            "tap",
            "--status",
            "5xx",
            "--reason",
            "breaker-open",
            "--route",
            "shop.api",
            "-n",
            "prod east",
            "--min-latency",
            "250ms",
            "--show-secrets",
        ])
        .unwrap();
        let crate::args::Command::Tap(args) = cli.command else {
            panic!("tap");
        };
        assert_eq!(
            query(&args, Some(7)),
            "/recent?status=5xx&reason=breaker-open&route=shop.api&namespace=prod%20east&min_ms=250&since=7&secrets=true"
        );
        // The first page is the newest `--limit`; a follow-up poll takes all that is new.
        assert!(query(&args, None).starts_with("/recent?limit=50&status=5xx"));
    }

    /// What the proxy's `/recent` accepts, and nothing else (its own test lists the
    /// same refusals).
    #[test]
    fn checks_the_status_filter_as_the_proxy_does() {
        for good in ["503", "200", "100", "599", "5xx", "2XX", "1xx"] {
            assert!(check_status(good).is_ok(), "{good}");
        }
        for bad in ["999", "603", "099", "50x", "5x3", "x5x", "5000", "5", ""] {
            let e = check_status(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: a bad flag");
        }
    }
}
