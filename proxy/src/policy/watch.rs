//! The local-file policy source (`--policy FILE`).
//!
//! The parent directory is watched, not the file: editors replace files by rename and
//! Kubernetes swaps ConfigMap contents through a `..data` symlink, neither of which a
//! watch on the file itself survives. Any event re-reads the file through its path
//! after a short debounce; content already seen is skipped.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use sluice_config::{Limits, PolicySet, parse_policy_bytes};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::trace;

use super::{ApplyOutcome, PolicyStore};
use crate::ProxyError;

/// Events closer together than this are handled as one.
const DEBOUNCE: Duration = Duration::from_millis(75);

/// What one look at the file led to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reload {
    /// Same bytes as last time: nothing done.
    Skipped,
    /// Swapped in (or already in force).
    Applied,
    /// Refused; the old policy keeps serving.
    Rejected,
}

/// Reads the file and feeds the store, remembering the last content it saw.
#[derive(Debug)]
pub(crate) struct FileSource {
    path: PathBuf,
    label: String,
    last: Option<u64>,
    limits: Limits,
    /// The policy this source put in force has at least one policy in it.
    in_force: bool,
}

impl FileSource {
    pub(crate) fn new(path: PathBuf, limits: Limits) -> Self {
        let label = path.display().to_string();
        Self {
            path,
            label,
            last: None,
            limits,
            in_force: false,
        }
    }

    /// [`FileSource::reload`], with a panic in it taken as a refusal of the content
    /// ([`PolicyStore::refusing_panics`]); the source has already noted the content as
    /// seen, so the same bytes are not tried again.
    fn reload_guarded(&mut self, store: &PolicyStore) -> Reload {
        let label = self.label.clone();
        store.refusing_panics(&label, Reload::Rejected, || self.reload(store))
    }

    /// Re-reads the file; applies it if its content changed since the last look.
    pub(crate) fn reload(&mut self, store: &PolicyStore) -> Reload {
        let read = sluice_api::read_policy_file(&self.path, self.limits.max_file_bytes);
        let digest = {
            let mut h = std::hash::DefaultHasher::new();
            match &read {
                Ok(bytes) => bytes.hash(&mut h),
                Err(e) => e.kind().hash(&mut h),
            }
            h.finish()
        };
        if self.last == Some(digest) {
            return Reload::Skipped;
        }
        self.last = Some(digest);
        let parsed = match read {
            Err(e) => Err(format!("{}: {e}", self.label)),
            Ok(bytes) => parse_policy_bytes(&self.label, &bytes, &self.limits)
                .and_then(|p| PolicySet::new_with(p, &self.limits))
                .map_err(|e| e.to_string()),
        };
        let parsed = match parsed {
            // What a failed or cut-short save leaves (a full disk) must not take every
            // route away; starting on an empty file is still allowed.
            Ok(set) if set.policies().is_empty() && self.in_force => Err(format!(
                "{}:1:1: the file no longer holds any RoutePolicy; an emptied file is refused while its policies are in force",
                self.label
            )),
            parsed => parsed,
        };
        match parsed {
            Ok(set) => {
                let holds = !set.policies().is_empty();
                match store.apply(&self.label, set) {
                    Ok(ApplyOutcome::Applied { .. } | ApplyOutcome::Unchanged) => {
                        self.in_force = holds;
                        Reload::Applied
                    }
                    Err(_) => Reload::Rejected,
                }
            }
            Err(error) => {
                store.reject(&self.label, error);
                Reload::Rejected
            }
        }
    }
}

/// Whether a directory event may have changed the policy file: it names the file, or a
/// `..`-prefixed entry (Kubernetes' `..data` symlink swap), or nothing in particular.
/// Other files in the directory (a log file beside the policy, say) are ignored, so
/// writing them cannot keep the watcher busy. Opening or reading a file changes
/// nothing: every re-read opens the file itself, and counting those re-read it in a
/// loop for as long as the proxy ran.
fn concerns(event: &notify::Event, name: Option<&std::ffi::OsStr>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    if matches!(event.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) {
        return false;
    }
    event.paths.is_empty()
        || event.paths.iter().any(|p| match p.file_name() {
            Some(f) => Some(f) == name || f.as_encoded_bytes().starts_with(b".."),
            None => true,
        })
}

/// The directory to watch for `path`: its parent, or the working directory for a bare
/// file name (`--policy policy.yaml`), whose parent is empty and cannot be watched.
fn watched_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Loads the file now and on every change until `shutdown` flips.
pub(crate) fn spawn(
    path: PathBuf,
    limits: Limits,
    store: PolicyStore,
    mut shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ProxyError> {
    let dir = watched_dir(&path);
    let changed = Arc::new(Notify::new());
    let notify_changed = changed.clone();
    let name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = RecommendedWatcher::new(
        move |event: notify::Result<notify::Event>| {
            let relevant = match &event {
                Ok(e) => concerns(e, name.as_deref()),
                Err(_) => true,
            };
            trace!(?event, relevant, "policy directory event");
            if relevant {
                notify_changed.notify_one();
            }
        },
        notify::Config::default(),
    )
    .map_err(|source| ProxyError::Watch {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| ProxyError::Watch {
            path: dir.clone(),
            source,
        })?;
    // Watch first, then read: a write between the two is still seen.
    let mut source = FileSource::new(path, limits);
    source.reload_guarded(&store);
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = changed.notified() => {}
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(DEBOUNCE) => {}
                _ = shutdown.changed() => return,
            }
            // Re-reading and parsing is blocking file work: keep it off the runtime threads.
            let store = store.clone();
            source = match tokio::task::spawn_blocking(move || {
                let mut source = source;
                source.reload_guarded(&store);
                source
            })
            .await
            {
                Ok(s) => s,
                Err(_) => return,
            };
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::store_for_tests as store;

    fn policy(host: &str) -> String {
        format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: p }}\nspec:\n  host: {host}\n  backends:\n    b: {{ addresses: [\"127.0.0.1:1\"] }}\n  routes:\n    - name: r\n"
        )
    }

    #[test]
    fn a_panic_while_taking_the_file_refuses_it_and_the_policy_in_force_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        let store = store();
        let mut src = FileSource::new(path.clone(), Limits::default());
        std::fs::write(&path, policy("a")).unwrap();
        assert_eq!(src.reload_guarded(&store), Reload::Applied);
        let good = store.current().hash().unwrap().to_string();
        let label = path.display().to_string();
        let outcome = store.refusing_panics(&label, Reload::Rejected, || {
            panic!("a bug in {}", "compiling")
        });
        assert_eq!(outcome, Reload::Rejected);
        assert_eq!(store.current().hash(), Some(good.as_str()));
        assert_eq!(
            store.last_rejected().unwrap().error,
            format!(
                "{label}: the proxy failed while taking this content (a bug in compiling); the policy in force keeps serving"
            )
        );
        std::fs::write(&path, policy("b")).unwrap();
        assert_eq!(src.reload_guarded(&store), Reload::Applied);
        assert_ne!(store.current().hash(), Some(good.as_str()));
    }

    #[test]
    fn a_bare_file_name_is_watched_in_the_working_directory() {
        assert_eq!(watched_dir(Path::new("policy.yaml")), Path::new("."));
        assert_eq!(watched_dir(Path::new("conf/p.yaml")), Path::new("conf"));
        assert_eq!(
            watched_dir(Path::new("/etc/sluice/p.yaml")),
            Path::new("/etc/sluice")
        );
    }

    #[test]
    fn opening_or_reading_the_file_is_no_change() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind,
        };
        let name = Some(std::ffi::OsStr::new("p.yaml"));
        let on = |kind| notify::Event::new(kind).add_path(PathBuf::from("/d/p.yaml"));
        for quiet in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
        ] {
            assert!(!concerns(&on(quiet), name), "{quiet:?}");
        }
        for change in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Create(CreateKind::File),
        ] {
            assert!(concerns(&on(change), name), "{change:?}");
        }
        let other = notify::Event::new(EventKind::Modify(ModifyKind::Data(DataChange::Any)))
            .add_path(PathBuf::from("/d/app.log"));
        assert!(!concerns(&other, name));
    }

    #[test]
    fn skips_content_already_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        let store = store();
        let mut src = FileSource::new(path.clone(), Limits::default());
        std::fs::write(&path, policy("a")).unwrap();
        assert_eq!(src.reload(&store), Reload::Applied);
        let first = store.current().hash().unwrap().to_string();
        assert_eq!(src.reload(&store), Reload::Skipped);
        std::fs::write(&path, policy("b")).unwrap();
        assert_eq!(src.reload(&store), Reload::Applied);
        assert_ne!(store.current().hash().unwrap(), first);
    }

    #[test]
    fn broken_file_is_refused_once_and_old_policy_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        let store = store();
        let mut src = FileSource::new(path.clone(), Limits::default());
        std::fs::write(&path, policy("a")).unwrap();
        assert_eq!(src.reload(&store), Reload::Applied);
        let good = store.current().hash().unwrap().to_string();
        std::fs::write(&path, "apiVersion: [\n").unwrap();
        assert_eq!(src.reload(&store), Reload::Rejected);
        assert_eq!(src.reload(&store), Reload::Skipped);
        assert_eq!(store.current().hash(), Some(good.as_str()));
        let rejected = store.last_rejected().unwrap();
        assert!(rejected.error.contains("p.yaml:"), "{}", rejected.error);
    }

    /// Emptying the file (a failed save looks the same) is refused while its policies
    /// are in force; starting on an empty file is not an error.
    #[test]
    fn an_emptied_file_is_refused_while_its_policies_are_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        let store = store();
        let mut src = FileSource::new(path.clone(), Limits::default());
        std::fs::write(&path, "").unwrap();
        assert_eq!(src.reload(&store), Reload::Applied);
        std::fs::write(&path, policy("a")).unwrap();
        assert_eq!(src.reload(&store), Reload::Applied);
        let good = store.current().hash().unwrap().to_string();
        for emptied in ["", "# nothing\n---\n"] {
            std::fs::write(&path, emptied).unwrap();
            assert_eq!(src.reload(&store), Reload::Rejected, "{emptied:?}");
            assert_eq!(store.current().hash(), Some(good.as_str()));
            let rejected = store.last_rejected().unwrap();
            assert!(
                rejected.error.ends_with(
                    "p.yaml:1:1: the file no longer holds any RoutePolicy; an emptied file is refused while its policies are in force"
                ),
                "{}",
                rejected.error
            );
        }
        std::fs::write(&path, policy("b")).unwrap();
        assert_eq!(src.reload(&store), Reload::Applied);
    }

    #[test]
    fn only_events_about_the_file_or_configmap_swaps_count() {
        use notify::event::{CreateKind, EventKind};
        let ev = |p: &str| {
            notify::Event::new(EventKind::Create(CreateKind::File)).add_path(PathBuf::from(p))
        };
        let name = Some(std::ffi::OsStr::new("p.yaml"));
        assert!(concerns(&ev("/etc/sluice/p.yaml"), name));
        assert!(concerns(&ev("/etc/sluice/..data"), name));
        assert!(concerns(&ev("/etc/sluice/..2026_11_23"), name));
        assert!(!concerns(&ev("/etc/sluice/proxy.log"), name));
        assert!(!concerns(&ev("/etc/sluice/.p.yaml.swp"), name));
        assert!(concerns(&notify::Event::new(EventKind::Any), name));
    }

    #[test]
    fn missing_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = store();
        let mut src = FileSource::new(dir.path().join("absent.yaml"), Limits::default());
        assert_eq!(src.reload(&store), Reload::Rejected);
        assert!(!store.is_ready());
    }
}
