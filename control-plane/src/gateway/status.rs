//! An HTTPRoute's `status.parents`: Sluice's entries from a verdict, merged into
//! the list other controllers share.
//!
//! Sluice owns the entries whose `controllerName` is [`CONTROLLER_NAME`] and
//! writes one per Service parentRef, with the `Accepted` and `ResolvedRefs`
//! conditions; entries of other controllers are kept as they are, in place. A
//! condition keeps its `lastTransitionTime` while its status stays the same, so an
//! unchanged verdict gives the same list back and nothing is written.

use serde_json::{Value, json};

use super::translate::{Condition, Problem, RouteVerdict};

/// The `controllerName` of Sluice's entries.
pub const CONTROLLER_NAME: &str = "sluice.dev/mesh";

/// The schema's bound on a condition message.
const MAX_MESSAGE: usize = 32768;

fn joined(problems: &[&Problem]) -> String {
    let mut text = problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    if text.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE - 3;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// `(type, status, reason, message)` of both conditions for one parent.
fn conditions(
    problems: &[Problem],
    policy: Option<&str>,
    kept: Option<i64>,
) -> [(&'static str, bool, String, String); 2] {
    let kept = |message: String| match kept {
        Some(g) => format!("{message} (generation {g} stays in force)"),
        None => message,
    };
    let accepted: Vec<&Problem> = problems
        .iter()
        .filter(|p| p.condition == Condition::Accepted)
        .collect();
    let refs: Vec<&Problem> = problems
        .iter()
        .filter(|p| p.condition == Condition::ResolvedRefs)
        .collect();
    let accepted_cond = match (accepted.first(), refs.is_empty()) {
        (Some(first), _) => (
            "Accepted",
            false,
            first.reason.to_string(),
            kept(joined(&accepted)),
        ),
        (None, false) => (
            "Accepted",
            false,
            "UnsupportedValue".to_string(),
            kept(format!(
                "not in force until every backend resolves (Sluice does not answer a share of a route with 500): {}",
                joined(&refs)
            )),
        ),
        (None, true) => (
            "Accepted",
            true,
            "Accepted".to_string(),
            match policy {
                Some(p) => format!("in force as RoutePolicy {p}"),
                None => "in force".to_string(),
            },
        ),
    };
    let refs_cond = match refs.first() {
        Some(first) => (
            "ResolvedRefs",
            false,
            first.reason.to_string(),
            joined(&refs),
        ),
        None => (
            "ResolvedRefs",
            true,
            "ResolvedRefs".to_string(),
            "every backend reference resolves".to_string(),
        ),
    };
    [accepted_cond, refs_cond]
}

/// The whole `status.parents` list once Sluice's entries say `verdict`: other
/// controllers' entries kept, Sluice's replaced. `current` is the list the object
/// carries (or null), `policy` names the generated policy of each parent's
/// Service (`namespace/name`) when it is in force, `now` is an RFC 3339 time.
pub fn merged_parents(
    current: &Value,
    verdict: &RouteVerdict,
    policy: impl Fn(usize) -> Option<String>,
    now: &str,
) -> Value {
    let existing: Vec<&Value> = current.as_array().into_iter().flatten().collect();
    let ours_before: Vec<&Value> = existing
        .iter()
        .copied()
        .filter(|e| e["controllerName"] == CONTROLLER_NAME)
        .collect();
    let mut out: Vec<Value> = existing
        .iter()
        .copied()
        .filter(|e| e["controllerName"] != CONTROLLER_NAME)
        .cloned()
        .collect();
    let mut ours = Vec::new();
    for parent in &verdict.parents {
        let parent_ref = serde_json::to_value(&parent.parent_ref).unwrap_or(Value::Null);
        let before = ours_before.iter().find(|e| e["parentRef"] == parent_ref);
        let policy_name = policy(parent.index);
        let conds: Vec<Value> = conditions(
            &parent.problems,
            policy_name.as_deref(),
            verdict.kept_generation,
        )
        .into_iter()
        .map(|(ty, ok, reason, message)| {
            let status = if ok { "True" } else { "False" };
            let since = before
                .and_then(|b| {
                    b["conditions"]
                        .as_array()?
                        .iter()
                        .find(|c| c["type"] == ty && c["status"] == status)
                })
                .and_then(|c| c["lastTransitionTime"].as_str())
                .unwrap_or(now);
            let mut c = json!({
                "type": ty,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since,
            });
            if let Some(g) = verdict.generation {
                c["observedGeneration"] = json!(g);
            }
            c
        })
        .collect();
        ours.push(json!({
            "parentRef": parent_ref,
            "controllerName": CONTROLLER_NAME,
            "conditions": conds,
        }));
    }
    // Unchanged entries stay where they are, whatever others added around them.
    if ours.iter().collect::<Vec<_>>() == ours_before {
        return current.clone();
    }
    out.extend(ours);
    Value::Array(out)
}
