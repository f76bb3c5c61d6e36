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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::translate::ParentVerdict;

    fn problem(message: &str) -> Problem {
        Problem {
            condition: Condition::Accepted,
            reason: "UnsupportedValue",
            path: "p".into(),
            message: message.into(),
        }
    }

    /// Problems are joined with "; " and cut to the schema's bound, on a character
    /// boundary, with "..." saying so.
    #[test]
    fn condition_messages_stay_within_the_schemas_bound() {
        let (a, b) = (problem("one"), problem("two"));
        assert_eq!(joined(&[&a, &b]), "p: one; p: two");
        assert_eq!(joined(&[]), "");
        // "p: " and the message: exactly the bound is kept whole.
        let whole = problem(&"x".repeat(MAX_MESSAGE - 3));
        assert_eq!(joined(&[&whole]).len(), MAX_MESSAGE);
        assert!(!joined(&[&whole]).ends_with("..."));
        let over = problem(&"x".repeat(MAX_MESSAGE - 2));
        let text = joined(&[&over]);
        assert_eq!(text.len(), MAX_MESSAGE);
        assert!(text.ends_with("x..."), "{}", &text[text.len() - 8..]);
        // A two-byte character across the cut is left out whole.
        let wide = problem(&format!(
            "{}é{}",
            "x".repeat(MAX_MESSAGE - 7),
            "y".repeat(10)
        ));
        let text = joined(&[&wide]);
        assert_eq!(text.len(), MAX_MESSAGE - 1);
        assert!(text.ends_with("x..."), "{}", &text[text.len() - 8..]);
    }

    /// A backend that does not resolve: ResolvedRefs says which, and Accepted says
    /// the route is not in force (and which generation stays); an Accepted problem
    /// alone leaves ResolvedRefs true.
    #[test]
    fn each_problem_sets_its_own_condition() {
        let refs = Problem {
            condition: Condition::ResolvedRefs,
            reason: "BackendNotFound",
            path: "spec.rules[0].backendRefs[0]".into(),
            message: "no Service echo-v3".into(),
        };
        let [accepted, resolved] = conditions(std::slice::from_ref(&refs), None, Some(3));
        assert_eq!(
            (accepted.1, accepted.2.as_str()),
            (false, "UnsupportedValue")
        );
        assert!(
            accepted
                .3
                .starts_with("not in force until every backend resolves")
        );
        assert!(
            accepted.3.ends_with("(generation 3 stays in force)"),
            "{}",
            accepted.3
        );
        assert_eq!(
            resolved,
            (
                "ResolvedRefs",
                false,
                "BackendNotFound".to_string(),
                "spec.rules[0].backendRefs[0]: no Service echo-v3".to_string()
            )
        );
        let [accepted, resolved] = conditions(&[problem("no")], Some("shop/echo"), None);
        assert_eq!(
            (accepted.1, accepted.2.as_str(), accepted.3.as_str()),
            (false, "UnsupportedValue", "p: no")
        );
        assert_eq!((resolved.1, resolved.2.as_str()), (true, "ResolvedRefs"));
        let [accepted, _] = conditions(&[], Some("shop/echo"), None);
        assert_eq!(accepted.3, "in force as RoutePolicy shop/echo");
    }

    /// A condition keeps its time while its status stays; one that changes takes now.
    #[test]
    fn a_changed_condition_takes_the_new_time() {
        let parent = ParentVerdict {
            index: 0,
            parent_ref: Default::default(),
            service: ("shop".into(), "echo".into()),
            problems: Vec::new(),
        };
        let fine = RouteVerdict {
            parents: vec![parent.clone()],
            ..Default::default()
        };
        let refused = RouteVerdict {
            parents: vec![ParentVerdict {
                problems: vec![problem("no")],
                ..parent
            }],
            ..Default::default()
        };
        let times = |v: &Value| -> Vec<String> {
            v[0]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["lastTransitionTime"].as_str().unwrap().to_string())
                .collect()
        };
        let first = merged_parents(&Value::Null, &fine, |_| None, "T1");
        let second = merged_parents(&first, &refused, |_| None, "T2");
        // Accepted went false; ResolvedRefs stayed true.
        assert_eq!(times(&second), ["T2", "T1"]);
        let unresolved = RouteVerdict {
            parents: vec![ParentVerdict {
                problems: vec![Problem {
                    condition: Condition::ResolvedRefs,
                    ..problem("gone")
                }],
                ..refused.parents[0].clone()
            }],
            ..Default::default()
        };
        // Accepted stayed false; ResolvedRefs went false.
        assert_eq!(
            times(&merged_parents(&second, &unresolved, |_| None, "T3")),
            ["T2", "T3"]
        );
    }
}
