//! `validate`: the verdict the control plane and the proxies give on policy files.

use crate::args::ValidateArgs;
use crate::error::CliError;
use crate::policies;
use crate::{Ctx, Verdict};

/// Runs `validate`.
pub async fn run(ctx: &mut Ctx<'_>, args: ValidateArgs) -> Result<Verdict, CliError> {
    let loaded = policies::load(&args.files)?;
    let ok = loaded.set.is_some();
    if ctx.json() {
        let files: Vec<_> = loaded
            .files
            .iter()
            .map(|f| {
                serde_json::json!({
                    "file": f.file,
                    "ok": f.diagnostics.is_empty(),
                    "policies": f.policies,
                })
            })
            .collect();
        let errors: Vec<_> = loaded
            .diagnostics()
            .map(|d| {
                serde_json::json!({
                    "file": d.file, "line": d.line, "column": d.column,
                    "field": d.path, "message": d.message,
                })
            })
            .collect();
        ctx.print_json(&serde_json::json!({
            "ok": ok,
            "hash": loaded.set.as_ref().map(|s| s.hash()),
            "files": files,
            "errors": errors,
        }))?;
    } else {
        let mut text = String::new();
        for f in &loaded.files {
            if f.diagnostics.is_empty() {
                text.push_str(&format!("ok  {} ({})\n", f.file, policies(f.policies)));
            }
        }
        for d in loaded.diagnostics() {
            text.push_str(&format!("{d}\n"));
        }
        if let Some(set) = &loaded.set {
            text.push_str(&format!(
                "valid: {}, version {}\n",
                policies(set.policies().len()),
                set.hash()
            ));
        }
        ctx.print(&text)?;
    }
    Ok(if ok { Verdict::Ok } else { Verdict::Failing })
}

/// `1 policy`, `2 policies`.
fn policies(n: usize) -> String {
    if n == 1 {
        "1 policy".into()
    } else {
        format!("{n} policies")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_policies_in_words() {
        assert_eq!(super::policies(0), "0 policies");
        assert_eq!(super::policies(1), "1 policy");
        assert_eq!(super::policies(2), "2 policies");
    }
}
