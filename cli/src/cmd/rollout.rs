//! `rollout status|pause|resume|promote|abort`: a client of the control plane's
//! `GET /rollouts` and `POST /rollouts/<ns>/<policy>/<route>/<action>` (DESIGN.md,
//! "Rollouts"). Every field is read leniently (absent means unknown), so a control
//! plane that says more or less than this build expects still shows what it says.

use serde::Deserialize;

use crate::args::RolloutCommand;
use crate::client::AdminClient;
use crate::error::CliError;
use crate::table::{Table, utc};
use crate::{Ctx, Verdict};

/// `GET /rollouts`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RolloutsAnswer {
    /// Every rollout the control plane drives.
    pub rollouts: Vec<Rollout>,
}

/// One rollout.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Rollout {
    /// Namespace of the policy.
    pub namespace: String,
    /// Policy name.
    pub policy: String,
    /// Route name.
    pub route: String,
    /// The backend whose weight is driven.
    pub canary: String,
    /// `progressing`, `paused`, `promoted`, `rolled-back`.
    pub phase: String,
    /// Current step (0-based into `steps`).
    pub step: Option<usize>,
    /// Canary percentages, in order.
    pub steps: Vec<u32>,
    /// The canary's weight now.
    pub canary_weight: Option<u32>,
    /// The effective weights proxies receive.
    pub weights: serde_json::Value,
    /// Whether every connected proxy acked this step's weights (its interval runs).
    pub step_acked: Option<bool>,
    /// Proxies left out of the ack count (NACKed, not acked within 30 s, or
    /// disconnected before acking).
    pub proxies_left_out: serde_json::Value,
    /// Why each of them was left out, by node id.
    pub proxies_left_out_why: serde_json::Value,
    /// The connected proxies the step still waits for.
    pub proxies_awaited: serde_json::Value,
    /// The window being filled.
    pub current_window: Option<Window>,
    /// The last judged window.
    pub last_window: Option<Window>,
    /// What happened, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// A window of canary traffic and its judgement.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Window {
    /// The step it belongs to.
    pub step: Option<usize>,
    /// Canary requests.
    pub canary_requests: Option<u64>,
    /// Canary failures.
    pub canary_failures: Option<u64>,
    /// `pass`, `breach`, `inconclusive` or `open`.
    pub decision: String,
    /// Why.
    pub reason: String,
    /// Every check with its value, threshold and sample size.
    pub checks: Vec<Check>,
}

/// One check of a window.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Check {
    /// `errorRate`, `p99`, `errorRateIncrease`, `p99Ratio`, …
    pub name: String,
    /// The measured value.
    pub value: Option<f64>,
    /// The threshold.
    pub threshold: Option<f64>,
    /// The one-sided bound compared with it.
    pub bound: Option<f64>,
    /// Samples behind it.
    pub samples: Option<u64>,
    /// `pass`, `breach`, `not-judged`.
    pub verdict: String,
    /// Why it was not judged.
    pub note: Option<String>,
}

/// One entry of a rollout's history.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HistoryEntry {
    /// When (ms since the Unix epoch).
    pub at_ms: Option<u64>,
    /// `started`, `advanced`, `promoted`, `rolled-back`, `paused`, …
    pub result: String,
    /// The step after it.
    pub step: Option<usize>,
    /// The canary's weight after it.
    pub canary_weight: Option<u32>,
    /// Why.
    pub reason: String,
}

impl Rollout {
    /// `<namespace>/<policy>/<route>`, as the commands name it.
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.policy, self.route)
    }
}

/// `<ns>/<policy>/<route>` split in three, each a DNS label.
pub fn parse_id(id: &str) -> Result<(String, String, String), CliError> {
    let parts: Vec<&str> = id.split('/').collect();
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    match parts.as_slice() {
        [ns, policy, route] if ok(ns) && ok(policy) && ok(route) => {
            Ok((ns.to_string(), policy.to_string(), route.to_string()))
        }
        _ => Err(CliError::Usage(format!(
            "rollout {id:?} is not <namespace>/<policy>/<route> (e.g. shop/log-service/ingest)"
        ))),
    }
}

/// The path of a command on a rollout.
pub fn action_path(id: &str, action: &str) -> Result<String, CliError> {
    let (ns, policy, route) = parse_id(id)?;
    Ok(format!("/rollouts/{ns}/{policy}/{route}/{action}"))
}

fn weights_text(w: &serde_json::Value) -> String {
    match w.as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "-".into(),
    }
}

fn number(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

/// The STEP column: where a running rollout stands; for an ended one, that it ended
/// and at which step, since its step's percentage no longer matches the weights
/// (a promotion by hand goes straight to 100 from any step).
fn step_text(r: &Rollout) -> String {
    let ended = match r.phase.as_str() {
        "promoted" => Some("promoted"),
        "rolled-back" => Some("rolled back"),
        _ => None,
    };
    match (r.step, r.steps.is_empty(), ended) {
        (Some(s), false, Some(how)) => format!("{how} at {}/{}", s + 1, r.steps.len()),
        (Some(s), true, Some(how)) => format!("{how} at {}", s + 1),
        (None, _, Some(how)) => how.to_string(),
        (Some(s), false, None) => format!(
            "{}/{} ({}%)",
            s + 1,
            r.steps.len(),
            r.steps.get(s).copied().unwrap_or_default()
        ),
        (Some(s), true, None) => (s + 1).to_string(),
        (None, _, None) => "-".into(),
    }
}

/// The human view of rollouts: one line each, then the detail of each.
pub fn render(rollouts: &[Rollout]) -> String {
    if rollouts.is_empty() {
        return "no rollouts\n".into();
    }
    let mut t = Table::new([
        "ROLLOUT",
        "CANARY",
        "PHASE",
        "STEP",
        "WEIGHTS",
        "ACKED",
        "LAST DECISION",
    ]);
    for r in rollouts {
        let step = step_text(r);
        let decision = r
            .last_window
            .as_ref()
            .map(|w| format!("{}: {}", w.decision, w.reason))
            .unwrap_or_else(|| "-".into());
        t.row([
            r.id(),
            r.canary.clone(),
            r.phase.clone(),
            step,
            weights_text(&r.weights),
            r.step_acked.map_or("-".into(), |a| {
                if a { "yes" } else { "waiting" }.to_string()
            }),
            decision,
        ]);
    }
    let mut text = t.render();
    for r in rollouts {
        text.push_str(&format!(
            "\n{} (canary {}, {})\n",
            r.id(),
            r.canary,
            r.phase
        ));
        let name = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        if let Some(left) = r.proxies_left_out.as_array().filter(|l| !l.is_empty()) {
            let names: Vec<String> = left
                .iter()
                .map(|v| {
                    let node = name(v);
                    match r.proxies_left_out_why.get(&node).and_then(|w| w.as_str()) {
                        Some(why) => format!("{node} ({why})"),
                        None => node,
                    }
                })
                .collect();
            text.push_str(&format!(
                "  left out of the ack count: {}\n",
                names.join(", ")
            ));
        }
        if let Some(awaited) = r.proxies_awaited.as_array().filter(|l| !l.is_empty()) {
            let names: Vec<String> = awaited.iter().map(name).collect();
            text.push_str(&format!(
                "  waiting for the acks of: {}\n",
                names.join(", ")
            ));
        }
        for (label, w) in [
            ("window", &r.current_window),
            ("last judged", &r.last_window),
        ] {
            let Some(w) = w else { continue };
            text.push_str(&format!(
                "  {label}: {} canary requests, {} failures: {} ({})\n",
                w.canary_requests.map_or("-".into(), |n| n.to_string()),
                w.canary_failures.map_or("-".into(), |n| n.to_string()),
                w.decision,
                w.reason
            ));
            if !w.checks.is_empty() {
                let mut c =
                    Table::new(["CHECK", "VALUE", "BOUND", "THRESHOLD", "SAMPLES", "VERDICT"]);
                for check in &w.checks {
                    c.row([
                        check.name.clone(),
                        number(check.value),
                        number(check.bound),
                        number(check.threshold),
                        check.samples.map_or("-".into(), |n| n.to_string()),
                        match &check.note {
                            Some(n) => format!("{} ({n})", check.verdict),
                            None => check.verdict.clone(),
                        },
                    ]);
                }
                for line in c.render().lines() {
                    text.push_str(&format!("    {line}\n"));
                }
            }
        }
        for h in &r.history {
            text.push_str(&format!(
                "  {} {} → {}%: {}\n",
                h.at_ms.map_or("-".into(), utc),
                h.result,
                h.canary_weight.map_or("-".into(), |w| w.to_string()),
                h.reason
            ));
        }
    }
    text
}

async fn list(cp: &AdminClient) -> Result<Vec<Rollout>, CliError> {
    let answer: RolloutsAnswer = cp.get_json("/rollouts").await?;
    Ok(answer.rollouts)
}

/// Runs `rollout …`.
pub async fn run(ctx: &mut Ctx<'_>, command: RolloutCommand) -> Result<Verdict, CliError> {
    let cp = ctx.control_plane()?;
    let (id, action) = match command {
        RolloutCommand::Status { rollout } => {
            // A malformed name is a bad flag whether or not the control plane is up.
            if let Some(id) = &rollout {
                parse_id(id)?;
            }
            let mut all = list(&cp).await?;
            if let Some(id) = &rollout {
                all.retain(|r| r.id() == *id);
                if all.is_empty() {
                    ctx.print(&format!("no rollout {id}\n"))?;
                    return Ok(Verdict::Failing);
                }
            }
            if ctx.json() {
                ctx.print_json(&serde_json::json!({ "rollouts": all }))?;
            } else {
                ctx.print(&render(&all))?;
            }
            return Ok(Verdict::Ok);
        }
        RolloutCommand::Pause { rollout } => (rollout, "pause"),
        RolloutCommand::Resume { rollout } => (rollout, "resume"),
        RolloutCommand::Promote { rollout } => (rollout, "promote"),
        RolloutCommand::Abort { rollout } => (rollout, "abort"),
    };
    let path = action_path(&id, action)?;
    let said = match cp.post(&path).await {
        Ok(said) => said,
        // No such rollout, or a command its phase does not take: an answer of no.
        Err(CliError::Status {
            status: status @ (404 | 409),
            body,
            ..
        }) => {
            let why = if body.is_empty() {
                status.to_string()
            } else {
                body
            };
            if ctx.json() {
                ctx.print_json(&serde_json::json!({
                    "rollout": id, "action": action, "done": false,
                    "status": status, "refused": why,
                }))?;
            } else {
                ctx.print(&format!("{id}: {action} refused: {why}\n"))?;
            }
            return Ok(Verdict::Failing);
        }
        Err(e) => return Err(e),
    };
    // The control plane answers with the transition; kept as text only if it is not
    // JSON, since the command was carried out either way.
    let answer = serde_json::from_str::<serde_json::Value>(&said)
        .unwrap_or_else(|_| serde_json::Value::String(said.clone()));
    // Show where it stands now.
    let now: Vec<Rollout> = list(&cp)
        .await?
        .into_iter()
        .filter(|r| r.id() == id)
        .collect();
    if ctx.json() {
        ctx.print_json(&serde_json::json!({
            "rollout": id, "action": action, "done": true, "answer": answer, "now": now.first(),
        }))?;
    } else {
        ctx.print(&format!("{id}: {action} done{}\n", done_text(&answer)))?;
        if !now.is_empty() {
            ctx.print(&render(&now))?;
        }
    }
    Ok(Verdict::Ok)
}

/// The control plane's answer to a command in a few words: the transition it made.
fn done_text(answer: &serde_json::Value) -> String {
    match answer {
        serde_json::Value::String(s) if s.is_empty() => String::new(),
        serde_json::Value::String(s) => format!(" ({s})"),
        v => match HistoryEntry::deserialize(v) {
            Ok(t) if !t.result.is_empty() => format!(
                ": {}, canary at {}%: {}",
                t.result,
                t.canary_weight.map_or("-".into(), |w| w.to_string()),
                t.reason
            ),
            _ => format!(" ({v})"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/rollouts` answer as DESIGN.md describes it: step, effective weights, each
    /// check's value, threshold and sample size, the decision and why, history.
    const SAMPLE: &str = r#"{
      "rollouts": [{
        "namespace": "shop", "policy": "log-service", "route": "ingest",
        "canary": "log-v2", "phase": "progressing", "step": 1, "steps": [5, 25, 50, 100],
        "canaryWeight": 25, "weights": { "log-v1": 75, "log-v2": 25 },
        "stepAcked": true, "proxiesLeftOut": ["order-7", "order-9"],
        "proxiesLeftOutWhy": { "order-7": "disconnected before acking" },
        "currentWindow": { "step": 1, "canaryRequests": 40, "canaryFailures": 0,
          "decision": "open", "reason": "40 of 100 canary requests", "checks": [] },
        "lastWindow": { "step": 0, "canaryRequests": 130, "canaryFailures": 0,
          "decision": "pass", "reason": "every check passed",
          "checks": [
            { "name": "errorRate", "value": 0.0, "threshold": 0.001, "bound": 0.0,
              "samples": 130, "verdict": "pass" },
            { "name": "p99", "value": 0.012, "threshold": 0.15, "samples": 130,
              "verdict": "not-judged", "note": "no latency buckets yet" }
          ] },
        "history": [
          { "atMs": 1795425458123, "result": "started", "step": 0, "canaryWeight": 5, "reason": "new rollout block" },
          { "atMs": 1795425488123, "result": "advanced", "step": 1, "canaryWeight": 25, "reason": "window passed" }
        ],
        "someFieldFromLater": { "ignored": true }
      }]
    }"#;

    #[test]
    fn reads_and_shows_a_rollouts_answer() {
        let answer: RolloutsAnswer = serde_json::from_str(SAMPLE).unwrap();
        let r = &answer.rollouts[0];
        assert_eq!(r.id(), "shop/log-service/ingest");
        assert_eq!((r.step, r.canary_weight), (Some(1), Some(25)));
        let text = render(&answer.rollouts);
        let first = text.lines().nth(1).unwrap();
        for part in [
            "shop/log-service/ingest",
            "log-v2",
            "progressing",
            "2/4 (25%)",
            "log-v1 75, log-v2 25",
            "yes",
            "pass: every check passed",
        ] {
            assert!(first.contains(part), "{part:?} in {first}");
        }
        assert!(
            text.contains(
                "left out of the ack count: order-7 (disconnected before acking), order-9\n"
            ),
            "{text}"
        );
        assert!(!text.contains("waiting for the acks"), "{text}");
        assert!(
            text.contains("errorRate  0.0000  0.0000  0.0010     130      pass"),
            "{text}"
        );
        assert!(
            text.contains("not-judged (no latency buckets yet)"),
            "{text}"
        );
        assert!(
            text.contains("2026-11-23T09:18:08Z advanced → 25%: window passed"),
            "{text}"
        );
        // A control plane that has none yet, or says little, still reads.
        let empty: RolloutsAnswer =
            serde_json::from_str(r#"{"rollouts":[{"namespace":"a","policy":"b","route":"c"}]}"#)
                .unwrap();
        assert!(render(&empty.rollouts).contains("a/b/c"));
        assert_eq!(render(&[]), "no rollouts\n");
    }

    /// An ended rollout shows that it ended, and where, rather than its last step's
    /// percentage beside weights that no longer match it.
    #[test]
    fn an_ended_rollout_shows_how_it_ended_not_a_stale_step() {
        let at = |phase: &str| Rollout {
            phase: phase.into(),
            step: Some(0),
            steps: vec![10, 50, 100],
            ..Default::default()
        };
        assert_eq!(step_text(&at("progressing")), "1/3 (10%)");
        assert_eq!(step_text(&at("paused")), "1/3 (10%)");
        assert_eq!(step_text(&at("promoted")), "promoted at 1/3");
        assert_eq!(step_text(&at("rolled-back")), "rolled back at 1/3");
        let first = render(&[at("promoted")]);
        assert!(!first.contains("(10%)"), "{first}");
    }

    /// A command's answer is the transition the control plane made, said in words.
    #[test]
    fn says_what_a_command_did() {
        let t = serde_json::json!({ "atMs": 1, "result": "paused", "step": 0,
            "canaryWeight": 10, "reason": "paused by hand" });
        assert_eq!(done_text(&t), ": paused, canary at 10%: paused by hand");
        assert_eq!(done_text(&serde_json::json!("")), "");
        assert_eq!(done_text(&serde_json::json!("ok")), " (ok)");
        // An answer that is not a transition is shown as it came.
        assert_eq!(
            done_text(&serde_json::json!({ "other": 1 })),
            " ({\"other\":1})"
        );
    }

    /// What a sparse or later control plane's answer still shows: no weights as `-`,
    /// a step without the step list, and the proxies a step waits for.
    #[test]
    fn shows_steps_without_a_list_weights_and_the_proxies_awaited() {
        assert_eq!(weights_text(&serde_json::json!({})), "-");
        assert_eq!(weights_text(&serde_json::json!(null)), "-");
        let r = |phase: &str| Rollout {
            phase: phase.into(),
            step: Some(2),
            ..Default::default()
        };
        assert_eq!(step_text(&r("promoted")), "promoted at 3");
        assert_eq!(step_text(&r("progressing")), "3");
        let waiting = Rollout {
            proxies_awaited: serde_json::json!(["order-3", "order-4"]),
            ..r("progressing")
        };
        let text = render(&[waiting]);
        assert!(
            text.contains("  waiting for the acks of: order-3, order-4\n"),
            "{text}"
        );
        let none = Rollout {
            proxies_awaited: serde_json::json!([]),
            ..r("progressing")
        };
        assert!(!render(&[none]).contains("waiting for"));
    }

    #[test]
    fn names_commands_by_namespace_policy_and_route() {
        assert_eq!(
            action_path("shop/log-service/ingest", "pause").unwrap(),
            "/rollouts/shop/log-service/ingest/pause"
        );
        for bad in [
            "shop/log-service",
            "shop//ingest",
            "a/b/c/d",
            "Shop/a/b",
            "a/b/c?x",
        ] {
            assert!(action_path(bad, "abort").is_err(), "{bad}");
        }
    }
}
