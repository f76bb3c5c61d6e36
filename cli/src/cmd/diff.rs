//! `diff`: policy files against the policies the control plane serves, policy by
//! policy in canonical form, as unified diffs.
//!
//! The control plane's side is its validated set as written (`GET /served`,
//! `policies`): rollout blocks and file weights, before a rollout puts its effective
//! weights in the snapshots proxies receive. So a rollout in progress is never a
//! difference, while an edit to its block is. Policies the control plane serves that
//! the files do not hold are listed, and count as differences only with `--all` (for
//! a whole policy directory).

use serde::Deserialize;
use sluice_config::{PolicySet, RoutePolicy};

use crate::args::DiffArgs;
use crate::error::CliError;
use crate::policies;
use crate::{Ctx, Verdict};

/// `GET /served` of the control plane (the fields used here).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Served {
    hash: Option<String>,
    policies: Option<String>,
}

/// How one policy compares.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Compared {
    /// `namespace/name`.
    pub policy: String,
    /// `same`, `changed`, `only-in-files` or `only-on-control-plane`.
    pub state: &'static str,
    /// A unified diff, files (`-`) to control plane (`+`), when changed.
    pub diff: Option<String>,
}

fn key(p: &RoutePolicy) -> String {
    format!("{}/{}", p.metadata.namespace_or_default(), p.metadata.name)
}

fn canonical(p: &RoutePolicy) -> String {
    serde_yaml::to_string(p).unwrap_or_default()
}

/// Compares every policy of `files` with `served`, then lists what only `served` holds.
pub fn compare(files: &PolicySet, served: &PolicySet) -> Vec<Compared> {
    let mut out = Vec::new();
    for p in files.policies() {
        let k = key(p);
        let theirs = served.policies().iter().find(|s| key(s) == k);
        out.push(match theirs {
            None => Compared {
                policy: k,
                state: "only-in-files",
                diff: None,
            },
            Some(s) => {
                let (a, b) = (canonical(p), canonical(s));
                if a == b {
                    Compared {
                        policy: k,
                        state: "same",
                        diff: None,
                    }
                } else {
                    let diff = similar::TextDiff::from_lines(&a, &b)
                        .unified_diff()
                        .context_radius(3)
                        .header(&format!("files: {k}"), &format!("control plane: {k}"))
                        .to_string();
                    Compared {
                        policy: k,
                        state: "changed",
                        diff: Some(diff),
                    }
                }
            }
        });
    }
    for s in served.policies() {
        let k = key(s);
        if !files.policies().iter().any(|p| key(p) == k) {
            out.push(Compared {
                policy: k,
                state: "only-on-control-plane",
                diff: None,
            });
        }
    }
    out
}

/// Runs `diff`.
pub async fn run(ctx: &mut Ctx<'_>, args: DiffArgs) -> Result<Verdict, CliError> {
    let loaded = policies::load(&args.files)?;
    let Some(files) = &loaded.set else {
        let mut text = String::from("the policy files are refused; nothing to compare:\n");
        for d in loaded.diagnostics() {
            text.push_str(&format!("{d}\n"));
        }
        ctx.print(&text)?;
        return Ok(Verdict::Failing);
    };
    let cp = ctx.control_plane()?;
    let answer: Served = cp.get_json("/served").await?;
    let served = match &answer.policies {
        Some(text) => PolicySet::from_canonical("control plane", text.as_bytes())
            .map_err(|e| cp.malformed("/served", format!("its policies do not validate: {e}")))?,
        None => PolicySet::from_files([]).map_err(|e| cp.malformed("/served", e.to_string()))?,
    };
    let compared = compare(files, &served);
    let counts = |c: &Compared| match c.state {
        "same" => false,
        "only-on-control-plane" => args.all,
        _ => true,
    };
    let differ = compared.iter().any(counts);
    if ctx.json() {
        ctx.print_json(&serde_json::json!({
            "identical": !differ,
            "files_version": files.hash(),
            "served_version": answer.hash,
            "policies": compared,
        }))?;
        return Ok(if differ {
            Verdict::Failing
        } else {
            Verdict::Ok
        });
    }
    let mut text = String::new();
    for c in &compared {
        match c.state {
            "same" => text.push_str(&format!("same     {}\n", c.policy)),
            "only-in-files" => text.push_str(&format!(
                "missing  {}: in the files, not served by the control plane\n",
                c.policy
            )),
            "only-on-control-plane" => text.push_str(&format!(
                "extra    {}: served by the control plane, not in these files{}\n",
                c.policy,
                if args.all {
                    ""
                } else {
                    " (ignored without --all)"
                }
            )),
            _ => text.push_str(&format!("changed  {}\n", c.policy)),
        }
    }
    for c in compared.iter().filter(|c| c.diff.is_some()) {
        text.push('\n');
        text.push_str(c.diff.as_deref().unwrap_or(""));
    }
    text.push_str(if differ {
        "\nthe files differ from what the control plane serves\n"
    } else {
        "\nthe files match what the control plane serves\n"
    });
    ctx.print(&text)?;
    Ok(if differ {
        Verdict::Failing
    } else {
        Verdict::Ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { name: a, namespace: shop }\nspec:\n  host: a\n  backends:\n    v1: { addresses: [\"127.0.0.1:1\"] }\n  routes:\n    - name: all\n      timeout: 2s\n";

    #[test]
    fn compares_policy_by_policy() {
        let files = PolicySet::from_files([("a.yaml", A)]).unwrap();
        let same = PolicySet::from_canonical("cp", files.canonical_bytes()).unwrap();
        let c = compare(&files, &same);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].state, "same");

        let edited = A.replace("timeout: 2s", "timeout: 3s");
        let b = A
            .replace("name: a,", "name: b,")
            .replace("host: a", "host: b");
        let served =
            PolicySet::from_files([("a.yaml", edited.as_str()), ("b.yaml", b.as_str())]).unwrap();
        let c = compare(&files, &served);
        assert_eq!(c[0].state, "changed");
        let diff = c[0].diff.as_deref().unwrap();
        assert!(
            diff.contains("-    timeout: 2s") && diff.contains("+    timeout: 3s"),
            "{diff}"
        );
        assert_eq!(
            (c[1].policy.as_str(), c[1].state),
            ("shop/b", "only-on-control-plane")
        );

        let none = PolicySet::from_files([]).unwrap();
        assert_eq!(compare(&files, &none)[0].state, "only-in-files");
    }
}
