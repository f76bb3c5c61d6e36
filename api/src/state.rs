//! The proxy's saved snapshot, so a restarting proxy enforces its last policy
//! before the control plane answers.

use std::io::Write;
use std::path::Path;

use sluice_config::PolicySet;

use crate::Error;

/// File name of the saved snapshot inside the state directory.
pub const SNAPSHOT_FILE: &str = "policy-snapshot.yaml";

/// Writes `bytes` to `path` so that readers see either the old or the new
/// content, never a torn file: write a temporary file beside it, sync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Syncing the directory makes the rename itself durable across a crash.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads at most `limit + 1` bytes of a policy file: enough for the parser to refuse
/// a larger file for its size ([`sluice_config::parse_policy_bytes`]) without a huge
/// file ever being held in memory.
pub fn read_policy_file(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Persists the canonical bytes of an applied policy set in `state_dir`.
pub fn save_snapshot(state_dir: &Path, set: &PolicySet) -> Result<(), Error> {
    let path = state_dir.join(SNAPSHOT_FILE);
    write_atomic(&path, set.canonical_bytes()).map_err(|source| Error::State { path, source })
}

/// Loads the last snapshot saved in `state_dir`, re-validated with this build's
/// `sluice-config`. `None` when there is none or it no longer validates (logged).
pub fn load_saved(state_dir: &Path) -> Option<PolicySet> {
    let path = state_dir.join(SNAPSHOT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read saved policy snapshot");
            return None;
        }
    };
    match PolicySet::from_canonical(&path.display().to_string(), &bytes) {
        Ok(set) => Some(set),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "saved policy snapshot no longer validates");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log }
spec:
  host: log
  backends:
    v1: { addresses: [\"127.0.0.1:1\"] }
  routes:
    - name: all
      split:
        - backend: v1
";

    /// A write lands whole, replaces what was there, creates the directory, and
    /// leaves no temporary file behind; a failed one leaves none either.
    #[test]
    fn atomic_writes_replace_the_file_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("deep/er/state.json");
        write_atomic(&path, b"first").expect("writes");
        write_atomic(&path, b"second").expect("writes again");
        assert_eq!(std::fs::read(&path).expect("reads"), b"second");
        let names = |d: &Path| -> Vec<String> {
            std::fs::read_dir(d)
                .expect("lists")
                .map(|e| {
                    e.expect("an entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        };
        assert_eq!(names(&dir.path().join("deep/er")), ["state.json"]);

        // A directory in the file's place: the rename fails, and is reported.
        let taken = dir.path().join("taken");
        std::fs::create_dir_all(taken.join("inside")).expect("a directory");
        assert!(write_atomic(&taken, b"x").is_err());
        let mut left = names(dir.path());
        left.sort();
        assert_eq!(left, ["deep", "taken"]);
    }

    /// A policy file is read up to one byte past the limit: enough to refuse it for
    /// its size, never the whole of a huge file.
    #[test]
    fn policy_files_are_read_to_one_byte_past_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, b"0123456789").expect("writes");
        assert_eq!(read_policy_file(&path, 100).expect("reads"), b"0123456789");
        assert_eq!(read_policy_file(&path, 4).expect("reads"), b"01234");
        assert_eq!(
            read_policy_file(&path, usize::MAX).expect("reads").len(),
            10
        );
        let missing = read_policy_file(&dir.path().join("nope.yaml"), 4);
        assert_eq!(
            missing.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::NotFound)
        );
    }

    /// The saved snapshot comes back as the same set; none saved, an unreadable one
    /// or one that no longer validates gives nothing (the proxy then waits for the
    /// control plane).
    #[test]
    fn a_saved_snapshot_comes_back_or_nothing_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load_saved(dir.path()).is_none());
        let set = PolicySet::new(sluice_config::parse_policies("p.yaml", POLICY).expect("parses"))
            .expect("valid");
        save_snapshot(dir.path(), &set).expect("saves");
        let back = load_saved(dir.path()).expect("loads");
        assert_eq!(back.hash(), set.hash());

        std::fs::write(dir.path().join(SNAPSHOT_FILE), "spec: [").expect("writes");
        assert!(load_saved(dir.path()).is_none());
        std::fs::remove_file(dir.path().join(SNAPSHOT_FILE)).expect("removes");
        std::fs::create_dir(dir.path().join(SNAPSHOT_FILE)).expect("a directory");
        assert!(load_saved(dir.path()).is_none());
        // Saving where a file cannot go says where.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, "x").expect("writes");
        let err = save_snapshot(&blocked, &set).expect_err("not a directory");
        assert!(matches!(err, Error::State { .. }), "{err}");
    }
}
