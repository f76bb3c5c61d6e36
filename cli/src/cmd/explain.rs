//! `explain`: the route, backend and governance a request gets, offline from policy
//! files ([`crate::explain`]).

use crate::args::ExplainArgs;
use crate::error::CliError;
use crate::explain::{Explainer, Probe};
use crate::policies;
use crate::table::Table;
use crate::{Ctx, Verdict};

/// Runs `explain`.
pub async fn run(ctx: &mut Ctx<'_>, args: ExplainArgs) -> Result<Verdict, CliError> {
    let probe = Probe::parse(&args.host, &args.method, &args.path, &args.headers)?;
    let loaded = policies::load(&args.files)?;
    let Some(set) = &loaded.set else {
        let mut text = String::from("the policy files are refused; nothing to explain:\n");
        for d in loaded.diagnostics() {
            text.push_str(&format!("{d}\n"));
        }
        ctx.print(&text)?;
        return Ok(Verdict::Failing);
    };
    let e = Explainer::new(set)?.explain(&probe);
    if ctx.json() {
        ctx.print_json(&serde_json::to_value(&e).unwrap_or_default())?;
        return Ok(Verdict::Ok);
    }
    let mut text = String::new();
    let headers: Vec<String> = probe
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    text.push_str(&format!(
        "request   {} {} {}{}\n",
        e.method,
        e.host,
        e.path,
        if headers.is_empty() {
            String::new()
        } else {
            format!("  [{}]", headers.join("; "))
        }
    ));
    let Some(policy) = &e.policy else {
        text.push_str("policy    none claims this host: 404 no-route (explicit mode), or passed through untouched (transparent mode)\n");
        ctx.print(&text)?;
        return Ok(Verdict::Ok);
    };
    text.push_str(&format!("policy    {policy}\n"));
    match &e.route {
        Some(r) => text.push_str(&format!("route     {r}\n")),
        None => text.push_str("route     none takes it: 404 no-route\n"),
    }
    text.push_str("\nroutes of this host, in the order they are tried:\n");
    let mut t = Table::new(["", "ROUTE", "MATCHES", "VERDICT"]);
    for (i, r) in e.routes.iter().enumerate() {
        let verdict = match r.verdict {
            "chosen" => "chosen".to_string(),
            "precedence" => format!("lost on precedence: {}", r.why),
            _ => format!("mismatch: {}", r.why),
        };
        t.row([
            format!("{}.", i + 1),
            r.route.clone(),
            r.matches.clone(),
            verdict,
        ]);
    }
    for line in t.render().lines() {
        text.push_str(&format!("  {line}\n"));
    }
    if let Some(b) = &e.backend {
        text.push_str(&format!(
            "\nbackend   {}\n          {}\n",
            b.backend.as_deref().unwrap_or("(drawn at random)"),
            b.why
        ));
    }
    if let Some(g) = &e.governance {
        let none = || "none".to_string();
        text.push_str(&format!(
            "\nrate limit  {}\ntimeout     {}\nretry       {}\nbreaker     {}\nfallback    {}\n",
            g.rate_limit.clone().unwrap_or_else(none),
            g.timeout.clone().unwrap_or_else(none),
            g.retry.clone().unwrap_or_else(none),
            g.breaker.clone().unwrap_or_else(none),
            g.fallback.clone().unwrap_or_else(none),
        ));
    }
    for w in &e.warnings {
        text.push_str(&format!("warning: {w}\n"));
    }
    ctx.print(&text)?;
    Ok(Verdict::Ok)
}
