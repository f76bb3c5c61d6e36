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
