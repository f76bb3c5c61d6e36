//! The policy directory: per-file validation with last-good fallback, persisted
//! state, and the watcher that re-reads the directory on change.
//!
//! Every regular `*.yaml`/`*.yml` file in the directory (symlinks followed, so
//! a Kubernetes ConfigMap mount's `name.yaml -> ..data/name.yaml` works) is one
//! unit: it is accepted or refused whole. Hidden entries (`.swp` files, the
//! ConfigMap's `..data` and `..2024_…` directories) are skipped themselves; their
//! content is reached through the visible symlinks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime};

use notify::Watcher;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sluice_api::pb;
use sluice_config::{Limits, PolicySet, RoutePolicy};

use crate::Error;

/// Subdirectory of the state directory holding the policy files in force.
const STATE_SUBDIR: &str = "policies";

/// What is known about one policy file.
#[derive(Clone, Debug, Default)]
struct FileState {
    /// The last version that validated.
    good: Option<GoodFile>,
    /// The version in the last published set: `good`, or an earlier version while
    /// `good` clashes with another file; `None` when the file is left out.
    served: Option<GoodFile>,
    /// Why the current content on disk is refused, if it is.
    error: Option<String>,
    /// When `error` was recorded.
    error_at: Option<SystemTime>,
    /// Hash of the bytes last read, so unchanged files are not re-parsed.
    seen: Option<[u8; 32]>,
}

impl FileState {
    /// The version the file asks to have in force, given the one it has (`in_force`):
    /// its last good one, unless what is on disk now is refused; then the one in force
    /// (if any). A version that was left out for a clash and is no longer on disk must
    /// not claim anything: it could block another file's edit, or go into force, for
    /// content the file no longer holds, and a restart (which keeps only versions in
    /// force) would forget it.
    fn wanted<'a>(&'a self, in_force: Option<&'a GoodFile>) -> Option<&'a GoodFile> {
        match self.error {
            Some(_) => in_force,
            None => self.good.as_ref(),
        }
    }
}

#[derive(Clone, Debug)]
struct GoodFile {
    policies: Vec<RoutePolicy>,
    /// Content hash of the file's bytes.
    version: String,
    /// The bytes, saved to the state directory once this version is in force.
    bytes: Arc<[u8]>,
    /// Restored from the state directory rather than read from the policy dir.
    from_state: bool,
    loaded_at: SystemTime,
}

/// What one re-read found.
#[derive(Clone, Debug, Default)]
pub(crate) struct ScanReport {
    /// Files refused in this re-read.
    pub(crate) failures: usize,
}

/// The policy directory and the last good version of each file in it.
#[derive(Debug)]
pub(crate) struct PolicyDir {
    dir: PathBuf,
    state_dir: Option<PathBuf>,
    files: BTreeMap<String, FileState>,
    /// Cross-file problems of the last build (duplicate names or hosts), per file.
    conflicts: HashMap<String, String>,
    /// Bounds on each file and on the directory as a whole.
    limits: Limits,
}

/// One policy in `/policies`.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyView {
    /// Policy name.
    pub name: String,
    /// Namespace (`default` when the file gives none).
    pub namespace: String,
    /// The host it governs.
    pub host: String,
    /// The other names it answers (`spec.aliases`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The file it comes from.
    pub file: String,
    /// Content hash of the file version in force.
    pub file_version: String,
    /// Why the file's current content is refused, if it is.
    pub file_error: Option<String>,
}

/// One file in `/policies`.
#[derive(Clone, Debug, Serialize)]
pub struct FileView {
    /// File name inside the policy directory.
    pub file: String,
    /// Content hash of the version in force, if any version ever validated.
    pub version: Option<String>,
    /// The version in force came from the state directory (the file on disk is
    /// broken since before the last restart).
    pub from_state: bool,
    /// When the version in force was loaded (ms since the Unix epoch).
    pub loaded_at_unix_ms: Option<u64>,
    /// Why the file's current content is refused, if it is.
    pub error: Option<String>,
    /// When that error was found (ms since the Unix epoch).
    pub error_at_unix_ms: Option<u64>,
    /// Names (`namespace/name`) of the policies in force from this file.
    pub policies: Vec<String>,
}

impl PolicyDir {
    /// Opens the directory (which must exist) and restores last good versions
    /// from the state directory; nothing is read from the policy files yet.
    pub(crate) fn open(
        dir: &Path,
        state_dir: Option<&Path>,
        limits: Limits,
    ) -> Result<Self, Error> {
        std::fs::read_dir(dir).map_err(|source| Error::PolicyDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut files = BTreeMap::new();
        // What the saved versions claim, so that a clashing one is not taken as in force.
        let mut saved_claims: HashSet<Claim> = HashSet::new();
        if let Some(state) = state_dir {
            let sub = state.join(STATE_SUBDIR);
            std::fs::create_dir_all(&sub).map_err(|source| Error::Write {
                path: sub.clone(),
                source,
            })?;
            for (name, path) in list_yaml(&sub) {
                let Ok(bytes) = sluice_api::read_policy_file(&path, limits.max_file_bytes) else {
                    continue;
                };
                match parse_file(&name, &bytes, &limits) {
                    Ok(policies) => {
                        // Saved because it was in force: it holds what it claimed
                        // against files that were left out beside it. An older
                        // control plane saved every file's last good version, clashing
                        // ones too, and had the first by name in force: a saved version
                        // that clashes with an earlier one is taken as left out.
                        let clashes = claims(&policies).any(|c| saved_claims.contains(&c));
                        let version = GoodFile {
                            policies,
                            version: short_hash(&bytes),
                            bytes: bytes.into(),
                            from_state: true,
                            loaded_at: SystemTime::now(),
                        };
                        if !clashes {
                            saved_claims.extend(claims(&version.policies));
                        }
                        files.insert(
                            name,
                            FileState {
                                served: (!clashes).then(|| version.clone()),
                                good: Some(version),
                                ..FileState::default()
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "saved policy file no longer validates; ignoring it");
                    }
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            state_dir: state_dir.map(Path::to_path_buf),
            files,
            conflicts: HashMap::new(),
            limits,
        })
    }

    /// Re-reads every policy file; validates the changed ones.
    pub(crate) fn rescan(&mut self) -> ScanReport {
        let mut report = ScanReport::default();
        let present = list_yaml(&self.dir);
        let present_names: Vec<&String> = present.iter().map(|(n, _)| n).collect();
        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|k| !present_names.contains(k))
            .cloned()
            .collect();
        for name in gone {
            tracing::info!(file = %name, "policy file removed");
            self.files.remove(&name);
            if let Some(state) = &self.state_dir {
                let _ = std::fs::remove_file(state.join(STATE_SUBDIR).join(&name));
            }
        }
        let mut total = 0usize;
        for (name, path) in present {
            let bytes = match sluice_api::read_policy_file(&path, self.limits.max_file_bytes) {
                Ok(b) => b,
                // Vanished between listing and reading: the next event re-reads.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read policy file");
                    continue;
                }
            };
            let digest: [u8; 32] = Sha256::digest(&bytes).into();
            let state = self.files.entry(name.clone()).or_default();
            total = total.saturating_add(bytes.len());
            if total > self.limits.max_total_bytes {
                // Read again on every scan: it fits once other files shrink.
                state.seen = None;
                report.failures += 1;
                let error = format!(
                    "{name}:1:1: with this file the policy directory holds more than the {} bytes allowed together (--policy-max-total-bytes)",
                    self.limits.max_total_bytes
                );
                tracing::warn!(file = %name, %error, "policy file refused; keeping its last good version");
                state.error = Some(error);
                state.error_at = Some(SystemTime::now());
                continue;
            }
            if state.seen == Some(digest) {
                continue;
            }
            state.seen = Some(digest);
            let had_policies = state.good.as_ref().is_some_and(|g| !g.policies.is_empty());
            let parsed = match parse_file(&name, &bytes, &self.limits) {
                // What a failed or cut-short save leaves (a full disk) must not take
                // a file's policies off every proxy.
                Ok(policies) if policies.is_empty() && had_policies => Err(format!(
                    "{name}:1:1: the file no longer holds any RoutePolicy; an emptied file is refused while its policies are in force (delete the file to remove them)"
                )),
                parsed => parsed,
            };
            match parsed {
                Ok(policies) => {
                    let version = short_hash(&bytes);
                    tracing::info!(file = %name, %version, policies = policies.len(), "policy file accepted");
                    state.good = Some(GoodFile {
                        policies,
                        version,
                        bytes: bytes.into(),
                        from_state: false,
                        loaded_at: SystemTime::now(),
                    });
                    state.error = None;
                    state.error_at = None;
                }
                Err(error) => {
                    report.failures += 1;
                    let keeping = state.good.as_ref().map(|g| g.version.clone());
                    tracing::warn!(file = %name, %error, last_good = ?keeping, "policy file refused; keeping its last good version");
                    state.error = Some(error);
                    state.error_at = Some(SystemTime::now());
                }
            }
        }
        report
    }

    /// The mesh's policy set from every file's latest good version, with where each
    /// policy came from. What a file claims (a namespace/name, a host) stays with
    /// the file that had it in force while that file's latest version still claims
    /// it: a file added or edited to claim it too is the one left out, keeping its
    /// version in force when it has one, and the clash is reported. A file kept on
    /// its version in force holds everything that version claims, so a host it gave
    /// up in the refused edit is not handed to another file in the same re-read.
    /// Among files with nothing in force, the first by name wins.
    pub(crate) fn build_set(&mut self) -> Option<(PolicySet, Vec<pb::PolicyMeta>)> {
        let Chosen {
            versions: chosen,
            conflicts,
        } = settle(&self.files);
        let mut policies = Vec::new();
        let mut metas = Vec::new();
        for (file, version) in &chosen {
            for p in &version.policies {
                metas.push(pb::PolicyMeta {
                    name: p.metadata.name.clone(),
                    namespace: namespace_of(p),
                    source: file.to_string(),
                });
                policies.push(p.clone());
            }
        }
        for (file, error) in &conflicts {
            tracing::warn!(%file, %error, "policy file left out");
        }
        let chosen: HashMap<String, GoodFile> = chosen
            .into_iter()
            .map(|(f, v)| (f.to_string(), v.clone()))
            .collect();
        self.conflicts = conflicts;
        let set = match PolicySet::new_with(policies, &self.limits) {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(error = %e, "the mesh's policy set is refused; keeping the previous one");
                return None;
            }
        };
        for (file, state) in &mut self.files {
            let now = chosen.get(file);
            if now.map(|v| &v.version) != state.served.as_ref().map(|v| &v.version) {
                save_in_force(self.state_dir.as_deref(), file, now);
            }
            state.served = now.cloned();
        }
        Some((set, metas))
    }

    /// Every policy in force, for `/policies`.
    pub(crate) fn policy_views(&self) -> Vec<PolicyView> {
        let mut out = Vec::new();
        for (file, state) in &self.files {
            let Some(served) = &state.served else {
                continue;
            };
            for p in &served.policies {
                out.push(PolicyView {
                    name: p.metadata.name.clone(),
                    namespace: namespace_of(p),
                    host: p.spec.host.clone(),
                    aliases: p.spec.aliases.clone(),
                    file: file.clone(),
                    file_version: served.version.clone(),
                    file_error: state
                        .error
                        .clone()
                        .or_else(|| self.conflicts.get(file).cloned()),
                });
            }
        }
        out
    }

    /// Every file, for `/policies`.
    pub(crate) fn file_views(&self) -> Vec<FileView> {
        self.files
            .iter()
            .map(|(file, state)| {
                // The version in force; a file left out shows its latest good one.
                let shown = state.served.as_ref().or(state.good.as_ref());
                FileView {
                    file: file.clone(),
                    version: shown.map(|g| g.version.clone()),
                    from_state: shown.is_some_and(|g| g.from_state),
                    loaded_at_unix_ms: shown.map(|g| crate::unix_ms(g.loaded_at)),
                    error: state
                        .error
                        .clone()
                        .or_else(|| self.conflicts.get(file).cloned()),
                    error_at_unix_ms: state.error_at.map(crate::unix_ms),
                    policies: state
                        .served
                        .iter()
                        .flat_map(|g| &g.policies)
                        .map(|p| format!("{}/{}", namespace_of(p), p.metadata.name))
                        .collect(),
                }
            })
            .collect()
    }
}

/// Keeps `version` of `file` in the state directory as the one in force, or
/// removes the kept one when the file has none.
/// The outcome of one round of choosing each file's version.
enum Choice<'a> {
    /// Files whose edit clashes and that have a version in force to keep, with why;
    /// the round is made again with them kept.
    Kept(Vec<(&'a str, String)>),
    /// The versions to publish: nothing newly kept.
    Done(Chosen<'a>),
}

/// The versions chosen for the set, in the order they go in, and why files are
/// left out or kept on an earlier version.
struct Chosen<'a> {
    versions: Vec<(&'a str, &'a GoodFile)>,
    conflicts: HashMap<String, String>,
}

/// Each file's version in force, as one choice sees it.
type InForce<'a> = HashMap<&'a str, &'a GoodFile>;

/// The choice of one re-read, settled: what the next re-read of the same files would
/// choose with it in force. Without this a re-read of an unchanged directory could move
/// the set: a file kept for a clash with another file's edit stayed kept when that edit
/// was kept out in turn, and a file the same re-read put in force held its claims only
/// from the next one on.
fn settle(files: &BTreeMap<String, FileState>) -> Chosen<'_> {
    let served: InForce<'_> = files
        .iter()
        .filter_map(|(f, s)| Some((f.as_str(), s.served.as_ref()?)))
        .collect();
    let mut chosen = choose_once(files, &served);
    // A pass hands in-force claims to the files the last one chose; one pass settles
    // every directory the model test has made, the bound is for those it has not.
    for _ in 0..files.len() {
        let in_force: InForce<'_> = chosen.versions.iter().copied().collect();
        let again = choose_once(files, &in_force);
        if same_versions(&again, &chosen) {
            break;
        }
        chosen = again;
    }
    chosen
}

/// Whether two choices serve the same version of the same files (in whatever order).
fn same_versions(a: &Chosen<'_>, b: &Chosen<'_>) -> bool {
    let versions = |c: &Chosen<'_>| -> BTreeMap<String, String> {
        c.versions
            .iter()
            .map(|(f, v)| (f.to_string(), v.version.clone()))
            .collect()
    };
    versions(a) == versions(b)
}

/// The choice of one re-read with `in_force`: [`choose`] again until no file is newly
/// kept. Keeping a file on its version in force can make another file's edit clash in
/// turn; each round keeps at least one more file, so this ends within one round per
/// file.
fn choose_once<'a>(files: &'a BTreeMap<String, FileState>, in_force: &InForce<'a>) -> Chosen<'a> {
    let mut kept: HashMap<&str, String> = HashMap::new();
    loop {
        match choose(files, in_force, &kept) {
            Choice::Kept(newly) => kept.extend(newly),
            Choice::Done(chosen) => return chosen,
        }
    }
}

/// One round of [`PolicyDir::build_set`]'s choice. `kept` files serve their version
/// in force whatever their latest one says, and hold all of its claims.
fn choose<'a>(
    files: &'a BTreeMap<String, FileState>,
    in_force: &InForce<'a>,
    kept: &HashMap<&'a str, String>,
) -> Choice<'a> {
    let served_of = |file: &str| in_force.get(file).copied();
    let mut held: HashMap<Claim, &str> = HashMap::new();
    for (file, state) in files {
        let served = served_of(file);
        let (Some(served), Some(good)) = (served, state.wanted(served)) else {
            continue;
        };
        if kept.contains_key(file.as_str()) {
            held.extend(claims(&served.policies).map(|c| (c, file.as_str())));
        } else {
            let still: HashSet<Claim> = claims(&good.policies).collect();
            for claim in claims(&served.policies).filter(|c| still.contains(c)) {
                held.insert(claim, file);
            }
        }
    }
    let (incumbents, newcomers): (Vec<_>, Vec<_>) = files
        .iter()
        .partition(|(f, _)| in_force.contains_key(f.as_str()));
    let mut taken: HashMap<Claim, &str> = HashMap::new();
    let mut chosen = Chosen {
        versions: Vec::new(),
        conflicts: HashMap::new(),
    };
    let mut newly = Vec::new();
    for (file, state) in incumbents.into_iter().chain(newcomers) {
        let served = served_of(file);
        let Some(good) = state.wanted(served) else {
            continue;
        };
        let clash = |version: &GoodFile| {
            claims(&version.policies).find_map(|claim| {
                let other = taken
                    .get(&claim)
                    .or_else(|| held.get(&claim).filter(|h| **h != file.as_str()))?;
                Some(claim.clash_with(other))
            })
        };
        let earlier = served.filter(|s| s.version != good.version);
        let version = match (kept.get(file.as_str()), earlier) {
            (Some(why), Some(earlier)) => match clash(earlier) {
                None => {
                    let msg = format!("{why}; version {} stays in force", earlier.version);
                    chosen.conflicts.insert(file.clone(), msg);
                    earlier
                }
                Some(msg) => {
                    chosen.conflicts.insert(file.clone(), msg);
                    continue;
                }
            },
            _ => match clash(good) {
                None => good,
                Some(msg) => {
                    if earlier.is_some() {
                        newly.push((file.as_str(), msg));
                    } else {
                        chosen.conflicts.insert(file.clone(), msg);
                    }
                    continue;
                }
            },
        };
        for claim in claims(&version.policies) {
            taken.insert(claim, file);
        }
        chosen.versions.push((file, version));
    }
    if newly.is_empty() {
        Choice::Done(chosen)
    } else {
        Choice::Kept(newly)
    }
}

fn save_in_force(state_dir: Option<&Path>, file: &str, version: Option<&GoodFile>) {
    let Some(dir) = state_dir else { return };
    let path = dir.join(STATE_SUBDIR).join(file);
    let result = match version {
        Some(v) => sluice_api::write_atomic(&path, &v.bytes),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
    };
    if let Err(e) = result {
        tracing::warn!(file = %path.display(), error = %e, "cannot save the policy file in force");
    }
}

/// What a policy file holds against every other file: a policy's identity or a
/// host one of its policies governs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Claim {
    /// Namespace and name.
    Name(String, String),
    /// `spec.host` or one of `spec.aliases`.
    Host(String),
}

impl Claim {
    /// The refusal of a file that makes this claim while `other` holds it.
    fn clash_with(&self, other: &str) -> String {
        match self {
            Claim::Name(ns, name) => format!("policy {ns}/{name} is also defined in {other}"),
            Claim::Host(h) => format!("host {h:?} is also governed by a policy in {other}"),
        }
    }
}

/// Every claim of `policies`, each policy's name before its hosts.
fn claims(policies: &[RoutePolicy]) -> impl Iterator<Item = Claim> + '_ {
    policies.iter().flat_map(|p| {
        std::iter::once(Claim::Name(namespace_of(p), p.metadata.name.clone()))
            .chain(p.spec.hosts().map(|h| Claim::Host(h.to_string())))
    })
}

fn namespace_of(p: &RoutePolicy) -> String {
    p.metadata.namespace_or_default().to_string()
}

fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

fn parse_file(name: &str, bytes: &[u8], limits: &Limits) -> Result<Vec<RoutePolicy>, String> {
    sluice_config::parse_policy_bytes(name, bytes, limits).map_err(|e| e.to_string())
}

/// A name the directory reads as a policy file: visible, `*.yaml` or `*.yml`.
fn is_policy_name(name: &str) -> bool {
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Visible `*.yaml`/`*.yml` regular files (after following symlinks), sorted.
fn list_yaml(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            if !is_policy_name(&name) {
                return None;
            }
            let path = e.path();
            // `metadata` follows symlinks: a dangling link mid-swap is skipped.
            std::fs::metadata(&path)
                .ok()?
                .is_file()
                .then_some((name, path))
        })
        .collect();
    out.sort();
    out
}

// === impl DirWatcher ===

/// Quiet time after a change that is complete on disk (every policy file written
/// since the last re-read is closed, renamed into place or removed): enough for the
/// rest of one burst (the other half of a rename, the next file of a copy) to
/// arrive, far less than a write in progress may pause for.
const SETTLE: Duration = Duration::from_millis(2);

#[derive(Debug)]
enum WatchMsg {
    /// A policy file was created or changed and is not closed yet: its writer may
    /// still be writing it.
    Writing(PathBuf),
    /// A change that is complete as it stands: a file closed after writing, a name
    /// renamed or removed, or an entry the directory does not read as a policy.
    Done(Vec<PathBuf>),
    Stop,
}

/// What a directory event means for the next re-read; `None` for events that
/// change no content (opening or reading a file, which every re-read does itself:
/// reacting to those re-read the directory in a loop after the first edit).
fn watch_msg(event: notify::Event) -> Option<WatchMsg> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(_))
        | EventKind::Remove(_) => Some(WatchMsg::Done(event.paths)),
        EventKind::Access(_) => None,
        // Any event in the directory may change what a file resolves to (a
        // ConfigMap swap renames `..data`), so each one triggers a full re-read;
        // unchanged files are skipped by content hash.
        _ => Some(
            match event.paths.into_iter().find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_policy_name)
            }) {
                Some(path) => WatchMsg::Writing(path),
                None => WatchMsg::Done(Vec::new()),
            },
        ),
    }
}

/// The policy files being written since the last re-read, and so how long a quiet
/// moment must last before the directory is read.
#[derive(Debug, Default)]
struct Writes {
    open: std::collections::HashSet<PathBuf>,
}

impl Writes {
    fn note(&mut self, msg: WatchMsg) {
        match msg {
            WatchMsg::Writing(path) => {
                self.open.insert(path);
            }
            WatchMsg::Done(paths) => {
                for p in &paths {
                    self.open.remove(p);
                }
            }
            WatchMsg::Stop => {}
        }
    }

    /// `debounce` while a file may be half written, [`SETTLE`] once none is.
    fn quiet(&self, debounce: Duration) -> Duration {
        if self.open.is_empty() {
            debounce.min(SETTLE)
        } else {
            debounce
        }
    }
}

/// Watches the policy directory and reloads on change; dropping it stops the
/// watch and its thread.
#[derive(Debug)]
pub(crate) struct DirWatcher {
    _watcher: notify::RecommendedWatcher,
    tx: std_mpsc::Sender<WatchMsg>,
}

impl Drop for DirWatcher {
    fn drop(&mut self) {
        let _ = self.tx.send(WatchMsg::Stop);
    }
}

impl DirWatcher {
    /// Watches `dir`, calling `reload` after each quiet moment following a change
    /// and every `rescan_interval` without one. The quiet moment is `debounce` while
    /// a policy file is being written, so a file is never read half written; a
    /// change already complete on disk (an editor's write-then-rename, a ConfigMap
    /// swap, a file closed after writing) is read after [`SETTLE`].
    pub(crate) fn start(
        dir: &Path,
        reload: impl Fn() + Send + 'static,
        debounce: Duration,
        rescan_interval: Duration,
    ) -> Result<Self, Error> {
        let (tx, rx) = std_mpsc::channel::<WatchMsg>();
        let events = tx.clone();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(event) => {
                    if let Some(msg) = watch_msg(event) {
                        let _ = events.send(msg);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "policy directory watch error"),
            })
            .map_err(|source| Error::Watch {
                path: dir.to_path_buf(),
                source,
            })?;
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(|source| Error::Watch {
                path: dir.to_path_buf(),
                source,
            })?;
        std::thread::Builder::new()
            .name("policy-dir-watch".into())
            .spawn(move || watch_loop(rx, reload, debounce, rescan_interval))
            .map_err(|source| Error::Write {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            _watcher: watcher,
            tx,
        })
    }
}

fn watch_loop(
    events: std_mpsc::Receiver<WatchMsg>,
    reload: impl Fn(),
    debounce: Duration,
    rescan_interval: Duration,
) {
    use std_mpsc::RecvTimeoutError;
    let mut writes = Writes::default();
    loop {
        match events.recv_timeout(rescan_interval) {
            Ok(WatchMsg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(msg) => writes.note(msg),
            Err(RecvTimeoutError::Timeout) => {
                reload();
                continue;
            }
        }
        // Wait for a quiet moment, bounded so a directory that never stops
        // changing is still re-read.
        let deadline = Instant::now() + debounce * 10;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match events.recv_timeout(writes.quiet(debounce).min(deadline - now)) {
                Ok(WatchMsg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(msg) => writes.note(msg),
                Err(RecvTimeoutError::Timeout) => break,
            }
        }
        // A writer still busy after the bound sends more events, and its file is
        // read again once they settle.
        writes.open.clear();
        reload();
    }
}

#[cfg(test)]
mod model_tests;

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { name: a, namespace: shop }\nspec:\n  host: a\n  inbound: { rateLimit: { perSecond: 100, burst: 10 } }\n";

    #[test]
    fn broken_file_keeps_last_good_and_restart_restores_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "garbage: [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "garbage: [").unwrap();
        let mut pd = PolicyDir::open(dir.path(), Some(state.path()), Limits::default()).unwrap();
        assert_eq!(pd.rescan().failures, 0);
        let (set, _) = pd.build_set().unwrap();
        assert_eq!(set.policies().len(), 1);
        // A file's version names the content in force: 16 hex digits of its hash.
        let version = pd.file_views()[0].version.clone().unwrap();
        assert!(
            version.len() == 16 && version.bytes().all(|b| b.is_ascii_hexdigit()),
            "{version}"
        );

        std::fs::write(dir.path().join("a.yaml"), "apiVersion: [").unwrap();
        assert_eq!(pd.rescan().failures, 1);
        let (again, _) = pd.build_set().unwrap();
        assert_eq!(again.hash(), set.hash());
        assert_eq!(
            pd.file_views()[0].version.as_ref(),
            Some(&version),
            "last good"
        );
        assert!(
            pd.file_views()[0]
                .error
                .as_deref()
                .unwrap()
                .starts_with("a.yaml:")
        );

        let mut restarted =
            PolicyDir::open(dir.path(), Some(state.path()), Limits::default()).unwrap();
        assert_eq!(restarted.rescan().failures, 1);
        let (restored, _) = restarted.build_set().unwrap();
        assert_eq!(restored.hash(), set.hash());
        assert!(restarted.file_views()[0].from_state);
        assert_eq!(restarted.file_views()[0].version.as_ref(), Some(&version));

        // A new good content is a new version.
        std::fs::write(
            dir.path().join("a.yaml"),
            GOOD.replace("burst: 10", "burst: 20"),
        )
        .unwrap();
        assert_eq!(pd.rescan().failures, 0);
        pd.build_set().unwrap();
        let newer = pd.file_views()[0].version.clone().unwrap();
        assert!(
            newer != version && newer.len() == 16,
            "{newer} after {version}"
        );
    }

    #[test]
    fn duplicate_host_in_a_later_file_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(
            dir.path().join("b.yml"),
            GOOD.replace("name: a,", "name: b,"),
        )
        .unwrap();
        let mut pd = PolicyDir::open(dir.path(), None, Limits::default()).unwrap();
        pd.rescan();
        let (set, metas) = pd.build_set().unwrap();
        assert_eq!(set.policies().len(), 1);
        assert_eq!(metas[0].source, "a.yaml");
        let b = &pd.file_views()[1];
        assert!(
            b.error.as_deref().unwrap().contains("also governed"),
            "{b:?}"
        );
    }

    /// Writes `files` (name, YAML) into `dir`, rescans and builds: the set's policies
    /// as `namespace/name@file`, sorted.
    fn publish(pd: &mut PolicyDir, dir: &Path, files: &[(&str, &str)]) -> Vec<String> {
        for (name, yaml) in files {
            std::fs::write(dir.join(name), yaml).unwrap();
        }
        pd.rescan();
        let (_, metas) = pd.build_set().unwrap();
        let mut out: Vec<String> = metas
            .iter()
            .map(|m| format!("{}/{}@{}", m.namespace, m.name, m.source))
            .collect();
        out.sort();
        out
    }

    fn view(pd: &PolicyDir, file: &str) -> FileView {
        pd.file_views()
            .into_iter()
            .find(|v| v.file == file)
            .unwrap()
    }

    /// An edit left out for a clash and then overwritten by a broken save claims
    /// nothing: it is no longer in the file. Another file's edit that takes its name is
    /// served (it was refused, naming a file that held nothing of the kind), and a
    /// restart serves the same set.
    #[test]
    fn a_left_out_edit_claims_nothing_once_its_file_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let policy = |name: &str, host: &str| {
            GOOD.replace("name: a,", &format!("name: {name},"))
                .replace("host: a", &format!("host: {host}"))
        };
        let mut pd = PolicyDir::open(dir.path(), Some(state.path()), Limits::default()).unwrap();
        let files = [("b.yaml", policy("b0", "w")), ("c.yaml", policy("c", "h"))];
        let files: Vec<(&str, &str)> = files.iter().map(|(n, y)| (*n, y.as_str())).collect();
        assert_eq!(
            publish(&mut pd, dir.path(), &files),
            ["shop/b0@b.yaml", "shop/c@c.yaml"]
        );
        // b's edit takes c's host: left out, b0 stays in force. Then b is broken.
        let b_edit = policy("b1", "h");
        publish(&mut pd, dir.path(), &[("b.yaml", &b_edit)]);
        assert!(
            view(&pd, "b.yaml")
                .error
                .unwrap()
                .starts_with("host \"h\" is also governed")
        );
        publish(&mut pd, dir.path(), &[("b.yaml", "apiVersion: [\n")]);

        // c gives the host up and takes the name b1, which only the edit no longer in
        // b.yaml had.
        let c_edit = policy("b1", "k");
        let published = publish(&mut pd, dir.path(), &[("c.yaml", &c_edit)]);
        assert_eq!(published, ["shop/b0@b.yaml", "shop/b1@c.yaml"]);
        assert_eq!(view(&pd, "c.yaml").error, None);
        let b_error = view(&pd, "b.yaml").error.unwrap();
        assert!(b_error.starts_with("b.yaml:2:1: invalid YAML"), "{b_error}");
        let before = pd.build_set().unwrap().0;

        let mut restarted =
            PolicyDir::open(dir.path(), Some(state.path()), Limits::default()).unwrap();
        restarted.rescan();
        assert_eq!(restarted.build_set().unwrap().0.hash(), before.hash());
    }

    /// One re-read settles: a file kept for a clash with another file's edit is not
    /// left kept when that edit is kept out in turn, and the next re-read of the same
    /// files moves nothing. (Before, c stayed on its old version for b's edit, which
    /// went nowhere, and the next re-read put c's edit in.)
    #[test]
    fn a_reread_of_the_same_files_moves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let policy = |ns: &str, name: &str, host: &str| {
            GOOD.replace(
                "name: a, namespace: shop",
                &format!("name: {name}, namespace: {ns}"),
            )
            .replace("host: a", &format!("host: {host}"))
        };
        let mut pd = PolicyDir::open(dir.path(), Some(state.path()), Limits::default()).unwrap();
        let c = policy("shop", "c", "h3");
        assert_eq!(
            publish(&mut pd, dir.path(), &[("b.yaml", ""), ("c.yaml", &c)]),
            ["shop/c@c.yaml"]
        );
        let b_version = view(&pd, "b.yaml").version.unwrap();

        // In one re-read: a is added with h2; c gives h3 up for mail/p; b (empty until
        // now) asks for mail/p, h2 and h3.
        let a = policy("shop", "a", "h2");
        let c_edit = policy("mail", "p", "h0");
        let b_edit = format!(
            "{}---\n{}",
            policy("mail", "p", "h2"),
            policy("shop", "b", "h3")
        );
        let first = publish(
            &mut pd,
            dir.path(),
            &[("a.yaml", &a), ("b.yaml", &b_edit), ("c.yaml", &c_edit)],
        );
        assert_eq!(first, ["mail/p@c.yaml", "shop/a@a.yaml"]);
        assert_eq!(view(&pd, "c.yaml").error, None);
        assert_eq!(
            view(&pd, "b.yaml").error,
            Some(format!(
                "host \"h2\" is also governed by a policy in a.yaml; version {b_version} stays in force"
            ))
        );
        let hash = pd.build_set().unwrap().0.hash().to_string();
        pd.rescan();
        assert_eq!(pd.build_set().unwrap().0.hash(), hash);
    }

    /// A file added with a host or a name already in force is the one left out,
    /// whatever its name sorts as, across a restart too; the file in force keeps
    /// serving, and once it lets the host go the newcomer gets it.
    #[test]
    fn a_file_added_with_a_host_in_force_is_left_out_not_the_file_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let log = GOOD.replace("name: a,", "name: log,");
        let mut pd = PolicyDir::open(dir.path(), Some(state.path()), Limits::default()).unwrap();
        assert_eq!(
            publish(&mut pd, dir.path(), &[("log.yaml", &log)]),
            ["shop/log@log.yaml"]
        );

        // "a.yaml" sorts first: it used to take the host over.
        let a = GOOD.replace("name: a,", "name: copy,");
        assert_eq!(
            publish(&mut pd, dir.path(), &[("a.yaml", &a)]),
            ["shop/log@log.yaml"]
        );
        let refused = view(&pd, "a.yaml");
        assert_eq!(
            refused.error.as_deref(),
            Some("host \"a\" is also governed by a policy in log.yaml")
        );
        assert!(refused.policies.is_empty());
        assert_eq!(view(&pd, "log.yaml").policies, ["shop/log"]);
        assert_eq!(view(&pd, "log.yaml").error, None);
        // The same name in a new file, with another host.
        let same_name = log.replace("host: a", "host: b");
        assert_eq!(
            publish(&mut pd, dir.path(), &[("0.yaml", &same_name)]),
            ["shop/log@log.yaml"]
        );
        assert_eq!(
            view(&pd, "0.yaml").error.as_deref(),
            Some("policy shop/log is also defined in log.yaml")
        );
        std::fs::remove_file(dir.path().join("0.yaml")).unwrap();

        // Restarted on the same state: the file in force is still the one serving.
        let mut restarted =
            PolicyDir::open(dir.path(), Some(state.path()), Limits::default()).unwrap();
        assert_eq!(
            publish(&mut restarted, dir.path(), &[]),
            ["shop/log@log.yaml"]
        );
        assert!(view(&restarted, "a.yaml").error.is_some());

        // The file in force moves to another host: the newcomer gets this one.
        assert_eq!(
            publish(
                &mut restarted,
                dir.path(),
                &[("log.yaml", &log.replace("host: a", "host: c"))]
            ),
            ["shop/copy@a.yaml", "shop/log@log.yaml"]
        );
        assert_eq!(view(&restarted, "a.yaml").error, None);
    }

    /// A file in force edited to claim another file's host keeps its version in
    /// force and says why its edit is not; a later edit without the clash goes in.
    #[test]
    fn an_edit_that_takes_another_files_host_keeps_the_version_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let a = GOOD.replace("host: a", "host: a-host");
        let z = GOOD
            .replace("name: a,", "name: z,")
            .replace("host: a", "host: z-host");
        let mut pd = PolicyDir::open(dir.path(), Some(state.path()), Limits::default()).unwrap();
        assert_eq!(
            publish(&mut pd, dir.path(), &[("a.yaml", &a), ("z.yaml", &z)]),
            ["shop/a@a.yaml", "shop/z@z.yaml"]
        );
        let in_force = view(&pd, "a.yaml").version.clone().unwrap();

        let grabbing = a.replace("host: a-host", "host: a-host\n  aliases: [z-host]");
        assert_eq!(
            publish(&mut pd, dir.path(), &[("a.yaml", &grabbing)]),
            ["shop/a@a.yaml", "shop/z@z.yaml"]
        );
        let a_view = view(&pd, "a.yaml");
        assert_eq!(
            a_view.error.as_deref(),
            Some(
                format!(
                    "host \"z-host\" is also governed by a policy in z.yaml; version {in_force} stays in force"
                )
                .as_str()
            )
        );
        assert_eq!(a_view.version.as_deref(), Some(in_force.as_str()));
        assert_eq!(a_view.policies, ["shop/a"]);
        let served = pd.policy_views();
        let a_policy = served.iter().find(|p| p.name == "a").unwrap();
        assert!(a_policy.aliases.is_empty(), "{a_policy:?}");
        assert_eq!(a_policy.file_error, a_view.error);
        // What is kept for a restart is the version in force.
        assert_eq!(
            std::fs::read_to_string(state.path().join(STATE_SUBDIR).join("a.yaml")).unwrap(),
            a
        );

        // Both in one re-read: z lets the host go, a takes it.
        let z_moved = z.replace("host: z-host", "host: z2-host");
        assert_eq!(
            publish(&mut pd, dir.path(), &[("z.yaml", &z_moved)]),
            ["shop/a@a.yaml", "shop/z@z.yaml"]
        );
        assert_eq!(view(&pd, "a.yaml").error, None);
        let a_policy = pd
            .policy_views()
            .into_iter()
            .find(|p| p.name == "a")
            .unwrap();
        assert_eq!(a_policy.aliases, ["z-host"]);
        assert_eq!(
            std::fs::read_to_string(state.path().join(STATE_SUBDIR).join("a.yaml")).unwrap(),
            grabbing
        );
    }

    /// An edit refused for a clash keeps the whole version in force, hosts it gave up
    /// in the edit included: another file taking one of them in the same re-read is
    /// refused too (it used to leave the first file out whole), and gets the host
    /// once the first file's edit goes in.
    #[test]
    fn an_edit_refused_for_a_clash_keeps_the_hosts_it_gave_up() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let policy = |name: &str, host: &str| {
            GOOD.replace("name: a,", &format!("name: {name},"))
                .replace("host: a", &format!("host: {host}"))
        };
        let m = format!("{}---\n{}", policy("m1", "h-host"), policy("m2", "x-host"));
        let mut pd = PolicyDir::open(dir.path(), Some(state.path()), Limits::default()).unwrap();
        let all = [
            "shop/b@b.yaml",
            "shop/c@c.yaml",
            "shop/m1@m.yaml",
            "shop/m2@m.yaml",
        ];
        let files = [
            ("b.yaml", policy("b", "w-host")),
            ("c.yaml", policy("c", "y-host")),
            ("m.yaml", m.clone()),
        ];
        let files: Vec<(&str, &str)> = files.iter().map(|(n, y)| (*n, y.as_str())).collect();
        assert_eq!(publish(&mut pd, dir.path(), &files), all);
        let m_in_force = view(&pd, "m.yaml").version.unwrap();
        let b_in_force = view(&pd, "b.yaml").version.unwrap();

        // One re-read: m gives h-host up but takes c's y-host; b (first by name)
        // takes h-host.
        let m_edit = format!("{}---\n{}", policy("m1", "y-host"), policy("m2", "x-host"));
        let b_edit = policy("b", "w-host\n  aliases: [h-host]");
        assert_eq!(
            publish(
                &mut pd,
                dir.path(),
                &[("m.yaml", &m_edit), ("b.yaml", &b_edit)]
            ),
            all
        );
        assert_eq!(
            view(&pd, "m.yaml").error,
            Some(format!(
                "host \"y-host\" is also governed by a policy in c.yaml; version {m_in_force} stays in force"
            ))
        );
        assert_eq!(view(&pd, "m.yaml").version, Some(m_in_force));
        assert_eq!(
            view(&pd, "b.yaml").error,
            Some(format!(
                "host \"h-host\" is also governed by a policy in m.yaml; version {b_in_force} stays in force"
            ))
        );
        let hosts = |pd: &PolicyDir| -> Vec<String> {
            let mut h: Vec<String> = pd
                .policy_views()
                .into_iter()
                .flat_map(|p| std::iter::once(p.host).chain(p.aliases))
                .collect();
            h.sort();
            h
        };
        assert_eq!(hosts(&pd), ["h-host", "w-host", "x-host", "y-host"]);
        assert_eq!(
            std::fs::read_to_string(state.path().join(STATE_SUBDIR).join("m.yaml")).unwrap(),
            m
        );

        // m's next edit clashes with nothing: it goes in, and b gets h-host.
        let m_fixed = format!("{}---\n{}", policy("m1", "z-host"), policy("m2", "x-host"));
        assert_eq!(publish(&mut pd, dir.path(), &[("m.yaml", &m_fixed)]), all);
        assert_eq!(view(&pd, "m.yaml").error, None);
        assert_eq!(view(&pd, "b.yaml").error, None);
        assert_eq!(
            hosts(&pd),
            ["h-host", "w-host", "x-host", "y-host", "z-host"]
        );
    }

    /// A state directory written before the versions in force were kept apart holds
    /// every file's last good version, clashing ones too; the first by name was in
    /// force then and stays so after the restart, rather than the last by name.
    #[test]
    fn clashing_versions_in_an_older_state_directory_keep_the_first_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let saved = state.path().join(STATE_SUBDIR);
        std::fs::create_dir_all(&saved).unwrap();
        let log = GOOD.replace("name: a,", "name: log,");
        for (name, yaml) in [("a.yaml", GOOD), ("log.yaml", log.as_str())] {
            std::fs::write(dir.path().join(name), yaml).unwrap();
            std::fs::write(saved.join(name), yaml).unwrap();
        }
        let mut pd = PolicyDir::open(dir.path(), Some(state.path()), Limits::default()).unwrap();
        assert_eq!(publish(&mut pd, dir.path(), &[]), ["shop/a@a.yaml"]);
        assert_eq!(
            view(&pd, "log.yaml").error.as_deref(),
            Some("host \"a\" is also governed by a policy in a.yaml")
        );
    }

    /// The directory's total size is counted file by file in name order: the file that
    /// takes it over the limit is refused (with file:1:1 and the flag to raise) and
    /// keeps its last good version, and is read again on every scan, so that it comes
    /// back once the files before it shrink; a total exactly at the limit is accepted.
    #[test]
    fn the_file_that_takes_the_directory_over_its_total_is_refused_until_it_fits() {
        let dir = tempfile::tempdir().unwrap();
        let b = GOOD
            .replace("name: a,", "name: b,")
            .replace("host: a", "host: b");
        let padded = format!("{GOOD}# a comment that takes the total over\n");
        std::fs::write(dir.path().join("a.yaml"), &padded).unwrap();
        std::fs::write(dir.path().join("b.yaml"), &b).unwrap();
        let limits = Limits {
            max_total_bytes: GOOD.len() + b.len(),
            ..Limits::default()
        };
        let mut pd = PolicyDir::open(dir.path(), None, limits).unwrap();
        assert_eq!(pd.rescan().failures, 1);
        let (set, _) = pd.build_set().unwrap();
        assert_eq!(set.policies().len(), 1, "a only");
        let error = pd.file_views()[1].error.clone().unwrap();
        assert!(
            error.starts_with("b.yaml:1:1: ") && error.contains("--policy-max-total-bytes"),
            "{error}"
        );
        // Unchanged, still over: refused again, not taken as seen.
        assert_eq!(pd.rescan().failures, 1);

        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        assert_eq!(pd.rescan().failures, 0, "exactly at the limit");
        let (set, _) = pd.build_set().unwrap();
        assert_eq!(set.policies().len(), 2);
        assert_eq!(pd.file_views()[1].error, None);
    }

    /// A policy is known by namespace and name: the same name in two namespaces is two
    /// policies, the same namespace and name in a later file is a clash.
    #[test]
    fn policies_are_told_apart_by_namespace_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let other_ns = GOOD
            .replace("namespace: shop", "namespace: billing")
            .replace("host: a", "host: b");
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("b.yaml"), &other_ns).unwrap();
        std::fs::write(
            dir.path().join("c.yaml"),
            GOOD.replace("host: a", "host: c"),
        )
        .unwrap();
        let mut pd = PolicyDir::open(dir.path(), None, Limits::default()).unwrap();
        assert_eq!(pd.rescan().failures, 0);
        let (set, metas) = pd.build_set().unwrap();
        assert_eq!(set.policies().len(), 2);
        let names: Vec<_> = metas
            .iter()
            .map(|m| format!("{}/{} {}", m.namespace, m.name, m.source))
            .collect();
        assert_eq!(names, ["shop/a a.yaml", "billing/a b.yaml"]);
        let c = &pd.file_views()[2];
        assert_eq!(
            c.error.as_deref(),
            Some("policy shop/a is also defined in a.yaml")
        );
    }

    #[test]
    fn removed_file_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let mut pd = PolicyDir::open(dir.path(), None, Limits::default()).unwrap();
        pd.rescan();
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        pd.rescan();
        assert!(pd.build_set().unwrap().0.policies().is_empty());
    }

    /// A file emptied (or left with comments only) while its policies are in force is
    /// refused and they stay; a file that starts empty holds nothing and is no error,
    /// and a file that is deleted takes its policies with it.
    #[test]
    fn an_emptied_file_is_refused_while_its_policies_are_in_force() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("placeholder.yaml"), "").unwrap();
        let mut pd = PolicyDir::open(dir.path(), None, Limits::default()).unwrap();
        assert_eq!(
            publish(&mut pd, dir.path(), &[("a.yaml", GOOD)]),
            ["shop/a@a.yaml"]
        );
        assert_eq!(view(&pd, "placeholder.yaml").error, None);
        for emptied in ["", "\n", "# all gone\n---\n"] {
            assert_eq!(
                publish(&mut pd, dir.path(), &[("a.yaml", emptied)]),
                ["shop/a@a.yaml"],
                "{emptied:?}"
            );
            assert_eq!(
                view(&pd, "a.yaml").error.as_deref(),
                Some(
                    "a.yaml:1:1: the file no longer holds any RoutePolicy; an emptied file is refused while its policies are in force (delete the file to remove them)"
                )
            );
        }
        assert_eq!(
            publish(&mut pd, dir.path(), &[("a.yaml", GOOD)]),
            ["shop/a@a.yaml"]
        );
        assert_eq!(view(&pd, "a.yaml").error, None);
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert!(publish(&mut pd, dir.path(), &[]).is_empty());
    }

    fn event(kind: notify::EventKind, path: &Path) -> notify::Event {
        notify::Event::new(kind).add_path(path.to_path_buf())
    }

    /// Opening and reading a file is what every re-read does; treating it as a
    /// change re-read the directory in a loop after the first edit.
    #[test]
    fn opening_or_reading_a_file_is_no_change() {
        use notify::event::{AccessKind, AccessMode, EventKind};
        let a = Path::new("/policies/a.yaml");
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
        ] {
            assert!(watch_msg(event(kind, a)).is_none(), "{kind:?}");
        }
        assert!(matches!(
            watch_msg(event(EventKind::Access(AccessKind::Close(AccessMode::Write)), a)),
            Some(WatchMsg::Done(p)) if p == vec![a.to_path_buf()]
        ));
    }

    /// A policy file written in place holds the full debounce from its first event
    /// until it is closed; the editor's temporary file of a write-then-rename does
    /// not, and its rename into place is complete at once.
    #[test]
    fn a_file_being_written_holds_the_debounce_until_closed_or_renamed() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RenameMode,
        };
        let debounce = Duration::from_millis(20);
        let (a, b) = (Path::new("/p/a.yaml"), Path::new("/p/b.yml"));
        let tmp = Path::new("/p/.a.yaml.swp");
        let mut w = Writes::default();
        assert_eq!(w.quiet(debounce), SETTLE);

        // In place: created, written, then closed.
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
        ] {
            w.note(watch_msg(event(kind, a)).expect("a change"));
            assert_eq!(w.quiet(debounce), debounce, "{kind:?}");
        }
        w.note(
            watch_msg(event(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                b,
            ))
            .unwrap(),
        );
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        w.note(watch_msg(event(closed, a)).unwrap());
        assert_eq!(w.quiet(debounce), debounce, "b is still open");
        w.note(watch_msg(event(closed, b)).unwrap());
        assert_eq!(w.quiet(debounce), SETTLE);

        // Write-then-rename: the hidden temporary file is not read, the rename is whole.
        w.note(watch_msg(event(EventKind::Create(CreateKind::File), tmp)).unwrap());
        w.note(
            watch_msg(event(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                tmp,
            ))
            .unwrap(),
        );
        assert_eq!(w.quiet(debounce), SETTLE);
        let renamed = notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path(tmp.to_path_buf())
            .add_path(a.to_path_buf());
        assert!(matches!(watch_msg(renamed), Some(WatchMsg::Done(_))));

        // A debounce shorter than the settle time is kept as it is.
        assert_eq!(w.quiet(Duration::ZERO), Duration::ZERO);
    }

    /// Over a real directory watch with a one-hour debounce: an editor's
    /// write-then-rename and a file written and closed are each read without
    /// waiting for it, and the re-read sees the whole file.
    #[test]
    fn a_change_complete_on_disk_is_read_without_waiting_the_debounce() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = std_mpsc::channel();
        let path = dir.path().join("a.yaml");
        let watcher = DirWatcher::start(
            dir.path(),
            {
                let path = path.clone();
                move || {
                    let _ = tx.send(std::fs::read_to_string(&path).unwrap_or_default());
                }
            },
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        )
        .unwrap();
        // Re-reads may come between the steps of a write on a loaded machine; each
        // change must be followed by one that sees it whole.
        let read_until = |want: &str| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("a re-read")
                != want
            {}
        };
        let tmp = dir.path().join(".a.yaml.tmp");
        std::fs::write(&tmp, GOOD).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        read_until(GOOD);

        let edited = GOOD.replace("100", "200");
        std::fs::write(&path, &edited).unwrap();
        read_until(&edited);
        drop(watcher);
    }
}
