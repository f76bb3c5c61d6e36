//! Policy files as the offline commands read them: files or directories of
//! `*.yaml`/`*.yml`, parsed and validated by `sluice-config` within the default
//! limits, each file on its own and then all together (a host or name claimed twice).

use std::path::{Path, PathBuf};

use sluice_config::{Diagnostic, Limits, PolicySet};

use crate::error::CliError;

/// The verdict on one file.
#[derive(Clone, Debug)]
pub struct FileVerdict {
    /// The file as named on the command line (or found in a directory).
    pub file: String,
    /// Policies it holds (0 when refused).
    pub policies: usize,
    /// What is wrong with it, with line, column and field.
    pub diagnostics: Vec<Diagnostic>,
}

/// Every file read, and the set they make when all are valid.
#[derive(Debug)]
pub struct Loaded {
    /// One verdict per file, in the order read.
    pub files: Vec<FileVerdict>,
    /// Problems between files (the same host or name in two of them).
    pub across: Vec<Diagnostic>,
    /// The validated set of all files, when every file and the whole are valid.
    pub set: Option<PolicySet>,
}

impl Loaded {
    /// Every diagnostic, file by file, then those across files.
    pub fn diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        self.files
            .iter()
            .flat_map(|f| &f.diagnostics)
            .chain(&self.across)
    }
}

/// Reads and validates the files named by `paths` (a directory stands for its
/// visible `*.yaml`/`*.yml` files, sorted).
pub fn load(paths: &[PathBuf]) -> Result<Loaded, CliError> {
    let limits = Limits::default();
    let mut texts = Vec::new();
    let mut files = Vec::new();
    for path in expand(paths)? {
        let label = path.display().to_string();
        let bytes = sluice_api::read_policy_file(&path, limits.max_file_bytes).map_err(|e| {
            CliError::File {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        match sluice_config::parse_policy_bytes(&label, &bytes, &limits) {
            Ok(policies) => {
                files.push(FileVerdict {
                    file: label.clone(),
                    policies: policies.len(),
                    diagnostics: Vec::new(),
                });
                // Parsed, so UTF-8.
                texts.push((label, String::from_utf8_lossy(&bytes).into_owned()));
            }
            Err(e) => files.push(FileVerdict {
                file: label,
                policies: 0,
                diagnostics: e.diagnostics().to_vec(),
            }),
        }
    }
    if files.iter().any(|f| !f.diagnostics.is_empty()) {
        return Ok(Loaded {
            files,
            across: Vec::new(),
            set: None,
        });
    }
    match PolicySet::from_files_with(texts.iter().map(|(l, t)| (l.as_str(), t.as_str())), &limits) {
        Ok(set) => Ok(Loaded {
            files,
            across: Vec::new(),
            set: Some(set),
        }),
        Err(e) => Ok(Loaded {
            files,
            across: e.diagnostics().to_vec(),
            set: None,
        }),
    }
}

/// Files as given, and the policy files of each directory given.
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, CliError> {
    let mut out = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| CliError::File {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if !meta.is_dir() {
            out.push(path.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| CliError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_policy_file(p))
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(CliError::File {
                path: path.clone(),
                reason: "no *.yaml or *.yml files in this directory".into(),
            });
        }
        out.extend(found);
    }
    Ok(out)
}

fn is_policy_file(p: &Path) -> bool {
    let visible = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| !n.starts_with('.'));
    let yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
    visible && yaml && p.is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { name: a }\nspec:\n  host: a\n  backends:\n    v1: { addresses: [\"127.0.0.1:1\"] }\n  routes:\n    - name: all\n";

    #[test]
    fn reads_directories_and_locates_errors_across_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a policy").unwrap();
        let loaded = load(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(loaded.files.len(), 1);
        assert_eq!(loaded.set.as_ref().unwrap().policies().len(), 1);

        // The same host in a second file is refused with that file's position.
        std::fs::write(
            dir.path().join("b.yaml"),
            GOOD.replace("name: a }", "name: b }"),
        )
        .unwrap();
        let loaded = load(&[dir.path().to_path_buf()]).unwrap();
        assert!(loaded.set.is_none());
        let d: Vec<String> = loaded.diagnostics().map(ToString::to_string).collect();
        assert!(
            d.iter()
                .any(|l| l.contains("b.yaml:") && l.contains("host")),
            "{d:?}"
        );

        // A field error names file, line, column and field.
        std::fs::write(
            dir.path().join("b.yaml"),
            GOOD.replace("    - name: all\n", "    - name: all\n      retriez: 3\n"),
        )
        .unwrap();
        let loaded = load(&[dir.path().join("b.yaml")]).unwrap();
        let d: Vec<String> = loaded.diagnostics().map(ToString::to_string).collect();
        assert!(
            d[0].contains("b.yaml:10:") && d[0].contains("retriez"),
            "{d:?}"
        );

        let missing = load(&[dir.path().join("nope.yaml")]).unwrap_err();
        assert_eq!(missing.exit_code(), 2);
    }
}
