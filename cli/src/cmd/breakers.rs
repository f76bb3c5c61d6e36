//! `breakers`: every circuit breaker (route × backend) of each proxy, and opening or
//! resetting one by hand (`POST /breakers/<route>/<backend>/{open,reset}`).

use serde::{Deserialize, Serialize};

use crate::args::{BreakerAction, BreakerRef, BreakersArgs};
use crate::error::CliError;
use crate::table::{Table, now_ms, span, utc};
use crate::{Ctx, Verdict};

/// One breaker as a proxy's `GET /breakers` shows it (the fields this command uses).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Breaker {
    /// The namespace of the route's policy (empty from a proxy that does not say).
    #[serde(default)]
    pub namespace: String,
    /// Route, `<policy>.<route>`.
    pub route: String,
    /// Backend name.
    pub backend: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Results counted as successes.
    #[serde(default)]
    pub successes: u64,
    /// Results counted as failures.
    #[serde(default)]
    pub failures: u64,
    /// Failures in a row now.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Requests refused while open or half-open.
    #[serde(default)]
    pub rejected: u64,
    /// When it last opened (ms since the Unix epoch).
    #[serde(default)]
    pub opened_at: Option<u64>,
    /// When it next lets a probe through (ms since the Unix epoch).
    #[serde(default)]
    pub next_probe_at: Option<u64>,
    /// The last transitions, oldest first.
    #[serde(default)]
    pub recent_transitions: Vec<Transition>,
}

/// One remembered breaker transition.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Transition {
    /// When (ms since the Unix epoch).
    pub at: u64,
    /// State before.
    pub from: String,
    /// State after.
    pub to: String,
    /// Why.
    pub reason: String,
}

/// A proxy's `GET /routes` (the fields used to say why it has no breaker).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RoutesAnswer {
    /// The version in force; `None` before any policy was loaded.
    pub version: Option<String>,
    /// The routes in force.
    pub routes: Vec<RouteBrief>,
}

/// One route as `/routes` shows it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RouteBrief {
    /// Route key, `<policy>.<route>`.
    pub route: String,
    /// Its governance in brief (`breaker` when it sets `circuitBreaker`).
    pub governance: Vec<String>,
}

/// Why a proxy whose policy is `routes` lists no breaker.
pub fn why_none(routes: &RoutesAnswer) -> String {
    let with_breaker: Vec<&str> = routes
        .routes
        .iter()
        .filter(|r| r.governance.iter().any(|g| g == "breaker"))
        .map(|r| r.route.as_str())
        .collect();
    match (&routes.version, routes.routes.len()) {
        (None, _) => "no policy loaded yet".into(),
        (Some(_), 0) => "the policies in force have no routes".into(),
        (Some(_), n) if with_breaker.is_empty() => format!(
            "no route sets circuitBreaker ({n} route{} in force)",
            if n == 1 { "" } else { "s" }
        ),
        // Breakers are made when a policy is swapped in: only a proxy mid-swap, or
        // one older than this command, would say this.
        (Some(_), _) => format!(
            "none listed, though {} set circuitBreaker",
            with_breaker.join(", ")
        ),
    }
}

/// Runs `breakers`.
pub async fn run(ctx: &mut Ctx<'_>, args: BreakersArgs) -> Result<Verdict, CliError> {
    match args.action.unwrap_or(BreakerAction::List) {
        BreakerAction::List => list(ctx).await,
        BreakerAction::Open(b) => act(ctx, &b, "open").await,
        BreakerAction::Reset(b) => act(ctx, &b, "reset").await,
    }
}

async fn list(ctx: &mut Ctx<'_>) -> Result<Verdict, CliError> {
    let proxies = ctx.proxies()?;
    let mut all = Vec::new();
    for p in &proxies {
        let breakers: Vec<Breaker> = p.get_json("/breakers").await?;
        all.push((p.url().to_string(), breakers));
    }
    if ctx.json() {
        let v: Vec<_> = all
            .iter()
            .map(|(proxy, b)| serde_json::json!({ "proxy": proxy, "breakers": b }))
            .collect();
        ctx.print_json(&serde_json::json!({ "proxies": v }))?;
        return Ok(Verdict::Ok);
    }
    let now = now_ms();
    let mut t = Table::new([
        "PROXY",
        "ROUTE",
        "BACKEND",
        "STATE",
        "IN-A-ROW",
        "OK",
        "FAILED",
        "REJECTED",
        "SINCE",
        "LAST CHANGE",
    ]);
    for (proxy, breakers) in &all {
        for b in breakers {
            let since = since_text(&b.state, b.opened_at, b.next_probe_at, now);
            let last = b
                .recent_transitions
                .last()
                .map(|t| format!("{} → {} at {}: {}", t.from, t.to, utc(t.at), t.reason))
                .unwrap_or_else(|| "-".into());
            t.row([
                proxy.clone(),
                // Policy names repeat across namespaces: `<namespace>/<policy>.<route>`.
                if b.namespace.is_empty() {
                    b.route.clone()
                } else {
                    format!("{}/{}", b.namespace, b.route)
                },
                b.backend.clone(),
                b.state.clone(),
                b.consecutive_failures.to_string(),
                b.successes.to_string(),
                b.failures.to_string(),
                b.rejected.to_string(),
                since,
                last,
            ]);
        }
    }
    if !t.is_empty() {
        ctx.print(&t.render())?;
    }
    for (p, (proxy, breakers)) in proxies.iter().zip(&all) {
        if breakers.is_empty() {
            // Only to say why: the list itself was answered.
            let why = match p.get_json::<RoutesAnswer>("/routes").await {
                Ok(routes) => why_none(&routes),
                Err(e) => format!("its routes could not be read: {e}"),
            };
            ctx.print(&format!("{proxy}: no breakers: {why}\n"))?;
        }
    }
    Ok(Verdict::Ok)
}

fn ms(ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(ms)
}

/// The SINCE column at `now` (ms): how long a breaker has been open and when it
/// probes next, or `held` when it was opened by hand; `-` for a closed one.
fn since_text(state: &str, opened_at: Option<u64>, next_probe_at: Option<u64>, now: u64) -> String {
    match (state, opened_at, next_probe_at) {
        ("closed", ..) => "-".to_string(),
        (_, Some(at), Some(probe)) => format!(
            "{} ago, probe in {}",
            span(ms(now.saturating_sub(at))),
            span(ms(probe.saturating_sub(now)))
        ),
        (_, Some(at), None) => format!("{} ago, held", span(ms(now.saturating_sub(at)))),
        _ => "-".to_string(),
    }
}

async fn act(ctx: &mut Ctx<'_>, b: &BreakerRef, action: &str) -> Result<Verdict, CliError> {
    let mut path = format!("/breakers/{}/{}/{action}", b.route, b.backend);
    if let Some(ns) = &b.namespace {
        path.push_str("?namespace=");
        path.extend(percent_encoding::utf8_percent_encode(
            ns,
            percent_encoding::NON_ALPHANUMERIC,
        ));
    }
    let mut results = Vec::new();
    for p in ctx.proxies()? {
        let done = match p.post(&path).await {
            Ok(_) => true,
            Err(CliError::Status { status: 404, .. }) => false,
            Err(CliError::Status {
                status: 409, body, ..
            }) => {
                let what = body.split(": name one").next().unwrap_or(&body);
                return Err(CliError::Usage(format!("{what}: pass --namespace NS")));
            }
            Err(e) => return Err(e),
        };
        results.push((p.url().to_string(), done));
    }
    let found = results.iter().any(|(_, d)| *d);
    if ctx.json() {
        let v: Vec<_> = results
            .iter()
            .map(|(proxy, done)| serde_json::json!({ "proxy": proxy, "found": done }))
            .collect();
        ctx.print_json(&serde_json::json!({
            "namespace": b.namespace, "route": b.route, "backend": b.backend,
            "action": action, "proxies": v,
        }))?;
    } else {
        for (proxy, done) in &results {
            let what = if *done {
                format!("{action} done")
            } else {
                "no such breaker".into()
            };
            ctx.print(&format!("{proxy}: {}/{}: {what}\n", b.route, b.backend))?;
        }
    }
    Ok(if found { Verdict::Ok } else { Verdict::Failing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_says_how_long_open_and_when_it_probes() {
        let now = 1_000_000;
        assert_eq!(
            since_text("open", Some(now - 90_000), Some(now + 5_000), now),
            "1m ago, probe in 5s"
        );
        assert_eq!(
            since_text("half-open", Some(now - 3_000), None, now),
            "3s ago, held"
        );
        // A closed breaker keeps when it last opened; the column says nothing of it.
        assert_eq!(since_text("closed", Some(now - 3_000), None, now), "-");
        assert_eq!(since_text("open", None, None, now), "-");
    }

    /// Says which of its reasons a proxy has for listing no breaker.
    #[test]
    fn says_why_a_proxy_has_no_breaker() {
        let answer = |json: &str| serde_json::from_str::<RoutesAnswer>(json).unwrap();
        assert_eq!(
            why_none(&answer(r#"{"version":null,"routes":[]}"#)),
            "no policy loaded yet"
        );
        assert_eq!(
            why_none(&answer(r#"{"version":"ab","routes":[]}"#)),
            "the policies in force have no routes"
        );
        let two = r#"{"version":"ab","routes":[
            {"route":"a.x","governance":["timeout 2s"]},{"route":"a.y","governance":[]}]}"#;
        assert_eq!(
            why_none(&answer(two)),
            "no route sets circuitBreaker (2 routes in force)"
        );
        let one = r#"{"version":"ab","routes":[{"route":"a.x","governance":["breaker"]}]}"#;
        assert_eq!(
            why_none(&answer(one)),
            "none listed, though a.x set circuitBreaker"
        );
    }
}
