//! The rollouts of the published policy set, driven by the engine.
//!
//! [`Rollouts`] is the control plane's [`EffectiveWeights`]: the views proxies
//! receive carry each rollout's current weights, so every step is a snapshot
//! version. It keeps one [`RolloutState`] per route with a rollout, keyed by a hash
//! of the block (edits elsewhere in the policy keep it; a changed block starts over),
//! remembers which versions carried which weights (to tell when every connected
//! proxy acked a step), feeds the engine the proxies' reports as they arrive and
//! the time every [`TICK`], and keeps the states in `--state-dir` so a restart
//! resumes the same step.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts};
use serde::{Deserialize, Serialize};
use sluice_config::{
    EffectiveWeights, PolicySet, ROLLOUT_STATUS_HISTORY, RolloutStatus, RoutePolicy,
};
use tokio::sync::watch;

use super::clock::Clock;
use super::engine::{
    Command, Departed, Now, Phase, ProxyAck, RolloutState, Saved, Spec, Transition, WindowView,
};
use super::reports::Window;
use crate::proxies::ProxyRecord;

/// How often acks and interval ends are looked at.
pub const TICK: Duration = Duration::from_millis(200);

/// The file in `--state-dir` holding every rollout's state.
pub const STATE_FILE: &str = "rollouts.json";

/// Versions remembered with the weights they carried.
const VERSIONS: usize = 256;

/// After this replica becomes the lease holder, how long no step's interval starts:
/// the other replicas learn the new holder from the Lease (looked at every 2 s) and
/// then send it their proxies' acks (every [`super::forward::ACKS_EVERY`]); a step
/// whose interval started sooner would count only this replica's own proxies.
pub const TAKEOVER_GRACE: Duration = Duration::from_secs(4);

/// A route with a rollout.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RolloutId {
    /// Namespace of the policy.
    pub namespace: String,
    /// Name of the policy.
    pub policy: String,
    /// Name of the route.
    pub route: String,
}

impl RolloutId {
    fn of(p: &RoutePolicy, route: &str) -> Self {
        Self {
            namespace: p
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            policy: p.metadata.name.clone(),
            route: route.into(),
        }
    }

    fn label(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.policy, self.route)
    }
}

#[derive(Debug)]
struct Entry {
    rule: usize,
    spec: Spec,
    state: RolloutState,
}

#[derive(Debug, Default)]
struct Book {
    entries: BTreeMap<RolloutId, Entry>,
    /// Read from `--state-dir` at start, used when their rollout shows up.
    saved: HashMap<RolloutId, Saved>,
    /// The states the elected replica last wrote into the RoutePolicy statuses.
    from_status: HashMap<RolloutId, RolloutStatus>,
    /// Each published version with the canary weight it carried per rollout.
    versions: VecDeque<(String, HashMap<RolloutId, u32>)>,
    /// Acks start no step's interval before this (see [`TAKEOVER_GRACE`]).
    acks_count_from: Option<Instant>,
}

/// The rollout metrics.
#[derive(Clone, Debug)]
struct RolloutMetrics {
    step: IntGaugeVec,
    transitions: IntCounterVec,
    decision: Histogram,
}

impl RolloutMetrics {
    fn new() -> Self {
        Self {
            step: IntGaugeVec::new(
                Opts::new(
                    "sluice_rollout_step",
                    "The canary's weight (percent) at the step each rollout stands at.",
                ),
                &["namespace", "policy", "route", "canary"],
            )
            .expect("valid metric"),
            transitions: IntCounterVec::new(
                Opts::new(
                    "sluice_rollout_transitions_total",
                    "Rollout transitions, by result (advanced, promoted, rolled-back, paused, resumed, inconclusive, started, restarted).",
                ),
                &["result"],
            )
            .expect("valid metric"),
            decision: Histogram::with_opts(
                HistogramOpts::new(
                    "sluice_rollout_decision_seconds",
                    "Time from a window's start (every proxy acked the step, or the step began for a gross breach) to the decision that ended it.",
                )
                .buckets(vec![0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]),
            )
            .expect("valid metric"),
        }
    }
}

/// Every rollout of the published set.
#[derive(Clone, Debug)]
pub struct Rollouts {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    book: Mutex<Book>,
    /// This replica judges and drives (the only one, or the lease holder); a
    /// follower serves the states the holder writes into the statuses.
    leading: AtomicBool,
    state_dir: Option<PathBuf>,
    metrics: RolloutMetrics,
    clock: Clock,
}

/// Why a command by hand was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    /// No route with a rollout by that name.
    #[error("no rollout on {0}")]
    NotFound(String),
    /// The rollout's state does not allow it.
    #[error("{0}")]
    Refused(String),
    /// This replica does not hold the lease; the holder drives the rollouts.
    #[error(
        "this control-plane replica does not drive rollouts: send the command to the lease holder"
    )]
    NotLeading,
}

impl Rollouts {
    /// No rollouts yet, judged by `clock`; states saved in `state_dir` are resumed
    /// when their block shows up.
    pub fn new(state_dir: Option<&Path>, clock: Clock) -> Self {
        let saved = state_dir.map(load).unwrap_or_default();
        Self {
            inner: Arc::new(Inner {
                book: Mutex::new(Book {
                    saved,
                    ..Default::default()
                }),
                state_dir: state_dir.map(Path::to_path_buf),
                leading: AtomicBool::new(true),
                metrics: RolloutMetrics::new(),
                clock,
            }),
        }
    }

    /// The metric families, for the control plane's registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        let m = &self.inner.metrics;
        vec![
            Box::new(m.step.clone()),
            Box::new(m.transitions.clone()),
            Box::new(m.decision.clone()),
        ]
    }

    /// Whether this replica judges and drives the rollouts.
    pub fn is_leading(&self) -> bool {
        self.inner.leading.load(Ordering::Acquire)
    }

    /// This replica starts or stops driving. A replica that starts drives on from the
    /// states it followed (the statuses): each step waits for every proxy's ack again.
    pub fn set_leading(&self, leading: bool) {
        self.set_leading_at(leading, self.inner.clock.now());
    }

    fn set_leading_at(&self, leading: bool, now: Now) {
        let mut book = self.book();
        let was = self.inner.leading.swap(leading, Ordering::AcqRel);
        if was == leading {
            return;
        }
        tracing::info!(
            leading,
            "rollouts: this replica {}",
            if leading {
                "judges and drives them"
            } else {
                "follows the lease holder's"
            }
        );
        if !leading {
            return;
        }
        book.acks_count_from = Some(now.at + TAKEOVER_GRACE);
        // A rollout no status described while this replica followed was only served
        // at its first step, never started: it starts here, once.
        let Book {
            entries,
            from_status,
            ..
        } = &mut *book;
        let mut started = false;
        for (id, e) in entries.iter_mut() {
            let described = from_status
                .get(id)
                .is_some_and(|st| st.block == e.state.block);
            if described || !e.state.history().is_empty() {
                continue;
            }
            tracing::info!(rollout = %id.label(), canary = %e.spec.rollout.canary, steps = ?e.spec.rollout.steps, "rollout started");
            e.state = RolloutState::start(e.state.block.clone(), &e.spec, now);
            self.inner
                .metrics
                .transitions
                .with_label_values(&["started"])
                .inc();
            started = true;
        }
        if started {
            self.update_gauges(&book);
            self.persist(&book);
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.inner.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the rollouts in line with `set`: a new block starts (or resumes its
    /// saved state), an unchanged one keeps its state, a removed one ends.
    pub fn sync(&self, set: &PolicySet) {
        let now = self.inner.clock.now();
        let mut book = self.book();
        let mut seen = Vec::new();
        let mut changed = false;
        for p in set.policies() {
            for r in &p.spec.routes {
                let Some((rule, spec)) = r
                    .split
                    .iter()
                    .enumerate()
                    .find_map(|(i, rule)| Spec::of(rule).map(|s| (i, s)))
                else {
                    continue;
                };
                let id = RolloutId::of(p, &r.name);
                let key = super::engine::block_key(&spec.rollout);
                seen.push(id.clone());
                match book.entries.get_mut(&id) {
                    Some(e) if e.state.block == key => {
                        e.rule = rule;
                        e.spec = spec;
                        continue;
                    }
                    _ => {}
                }
                let status = book
                    .from_status
                    .get(&id)
                    .filter(|st| st.block == key)
                    .and_then(|st| saved_of(st, Vec::new()));
                let saved = book.saved.remove(&id).filter(|s| s.block == key);
                // A follower records nothing of its own: the holder's status brings the
                // history (a start recorded here too would show twice once it arrives).
                let leading = self.is_leading();
                let state = match (status, saved) {
                    (Some(saved), _) | (None, Some(saved)) if !leading => {
                        RolloutState::mirror(saved, &spec, now)
                    }
                    (None, None) if !leading => {
                        RolloutState::mirror(Saved::first_step(key), &spec, now)
                    }
                    (Some(saved), _) => {
                        tracing::info!(rollout = %id.label(), step = saved.step, phase = ?saved.phase, "rollout resumed from the RoutePolicy status");
                        RolloutState::restore(saved, &spec, now)
                    }
                    (None, Some(saved)) => {
                        tracing::info!(rollout = %id.label(), step = saved.step, phase = ?saved.phase, "rollout resumed from the state directory");
                        RolloutState::restore(saved, &spec, now)
                    }
                    (None, None) => {
                        tracing::info!(rollout = %id.label(), canary = %spec.rollout.canary, steps = ?spec.rollout.steps, "rollout started");
                        RolloutState::start(key, &spec, now)
                    }
                };
                if leading && let Some(t) = state.history().last() {
                    self.inner
                        .metrics
                        .transitions
                        .with_label_values(&[t.result.as_str()])
                        .inc();
                }
                book.entries.insert(id, Entry { rule, spec, state });
                changed = true;
            }
        }
        let before = book.entries.len();
        for (id, e) in book.entries.iter().filter(|(id, _)| !seen.contains(id)) {
            // Its block, route or policy is gone (or its canary with it, in a version
            // that validates): proxies get the file's weights from now on.
            tracing::info!(rollout = %id.label(), canary = %e.spec.rollout.canary, phase = ?e.state.phase(), step = e.state.step(), "rollout ended: its block is no longer in the policy");
        }
        book.entries.retain(|id, _| seen.contains(id));
        changed |= before != book.entries.len();
        self.update_gauges(&book);
        if changed {
            self.persist(&book);
        }
    }

    /// Every rollout's weights now, read under one lock: one build of the views
    /// uses these, and its versions are recorded with these (see [`Self::record_version`]).
    pub fn frozen(&self) -> FrozenWeights {
        let book = self.book();
        FrozenWeights {
            entries: book
                .entries
                .iter()
                .map(|(id, e)| {
                    let frozen = Frozen {
                        rule: e.rule,
                        weights: e.state.weights(&e.spec),
                        canary_weight: e.state.canary_weight(&e.spec),
                        withdrawn: (e.state.phase() == Phase::RolledBack)
                            .then(|| e.spec.rollout.canary.clone()),
                    };
                    (id.clone(), frozen)
                })
                .collect(),
        }
    }

    /// Remembers that `version` carries `used`, the weights its views were built
    /// with. Reading the rollouts again here instead would record a step taken
    /// meanwhile, and an ack of the older version would count for the newer step.
    pub fn record_version(&self, version: &str, used: &FrozenWeights) {
        let mut book = self.book();
        if book.versions.iter().any(|(v, _)| v == version) {
            return;
        }
        let weights = used
            .entries
            .iter()
            .map(|(id, f)| (id.clone(), f.canary_weight))
            .collect();
        book.versions.push_back((version.to_string(), weights));
        while book.versions.len() > VERSIONS {
            book.versions.pop_front();
        }
    }

    /// The canary weight recorded for `version` of rollout `id`, if that version is
    /// remembered and carried the rollout.
    pub fn recorded_weight(&self, version: &str, id: &RolloutId) -> Option<u32> {
        let book = self.book();
        book.versions
            .iter()
            .find(|(v, _)| v == version)
            .and_then(|(_, m)| m.get(id).copied())
    }

    /// Feeds the windows taken from the reports to each rollout; `true` when a
    /// weight changed (the set must be published again).
    pub fn on_reports(&self, taken: &super::reports::Taken, bounds: &[f64]) -> bool {
        if !self.is_leading() {
            return false;
        }
        let now = self.inner.clock.now();
        let mut book = self.book();
        let mut transitions = Vec::new();
        // A proxy that predates namespaces reports none: its counts go to the one
        // rollout of that policy and route name, and to none when several share it.
        let mut named: HashMap<(&str, &str), usize> = HashMap::new();
        for id in book.entries.keys() {
            *named.entry((&id.policy, &id.route)).or_default() += 1;
        }
        let unnamed: HashSet<(String, String)> = named
            .into_iter()
            .filter(|(_, n)| *n == 1)
            .map(|((p, r), _)| (p.to_string(), r.to_string()))
            .collect();
        for (id, e) in &mut book.entries {
            let own = (id.namespace.clone(), id.policy.clone(), id.route.clone());
            let legacy = (String::new(), id.policy.clone(), id.route.clone());
            let legacy = unnamed
                .contains(&(id.policy.clone(), id.route.clone()))
                .then(|| taken.get(&legacy))
                .flatten();
            let sources: Vec<_> = taken.get(&own).into_iter().chain(legacy).collect();
            if sources.is_empty() {
                continue;
            }
            let mut canary = Window::default();
            let mut others = Window::default();
            for (b, w) in sources.into_iter().flatten() {
                if *b == e.spec.rollout.canary {
                    canary.add(w);
                } else {
                    others.add(w);
                }
            }
            let opened = e.state.window_opened();
            if let Some(t) = e.state.on_report(&e.spec, now, &canary, &others, bounds) {
                transitions.push((id.clone(), t, opened));
            }
        }
        self.after(&mut book, transitions, now)
    }

    /// Time passed: acks of every connected proxy, interval ends; `true` when a
    /// weight changed. `proxies` is called only when a step waits for acks: at
    /// thousands of proxies, listing them every tick for nothing costs more than
    /// the rest of the tick.
    pub fn tick(&self, proxies: impl FnOnce() -> Vec<ProxyRecord>) -> bool {
        self.tick_at(proxies, self.inner.clock.now())
    }

    fn tick_at(&self, proxies: impl FnOnce() -> Vec<ProxyRecord>, now: Now) -> bool {
        if !self.is_leading() {
            return false;
        }
        let mut book = self.book();
        let Book {
            entries,
            versions,
            acks_count_from,
            ..
        } = &mut *book;
        let count_acks = acks_count_from.is_none_or(|from| now.at >= from);
        let (mut list, mut proxies) = (None, Some(proxies));
        let mut transitions = Vec::new();
        for (id, e) in entries.iter_mut() {
            if count_acks && e.state.acked_at().is_none() {
                let w = e.state.canary_weight(&e.spec);
                let carries = |v: &Option<String>| {
                    v.as_ref().is_some_and(|v| {
                        versions
                            .iter()
                            .any(|(ver, m)| ver == v && m.get(id) == Some(&w))
                    })
                };
                let proxies: &Vec<ProxyRecord> =
                    list.get_or_insert_with(|| proxies.take().map_or_else(Vec::new, |f| f()));
                let mut acks = Vec::new();
                for p in proxies {
                    let acked = carries(&p.acked_version);
                    let nacked = !acked && carries(&p.nacked_version);
                    if p.connected {
                        acks.push(ProxyAck {
                            node: p.node_id.clone(),
                            conn: p.conn(),
                            connected_at_ms: p.connected_at_unix_ms,
                            acked,
                            nacked,
                        });
                    } else if let (false, Some(gone_at_ms)) = (acked, p.disconnected_at_unix_ms) {
                        // Gone, maybe before any tick saw it waiting: the engine
                        // tells whether the step waited for it.
                        e.state.on_departed(Departed {
                            node: &p.node_id,
                            conn: &p.conn(),
                            connected_at_ms: p.connected_at_unix_ms,
                            gone_at_ms,
                            sent: carries(&p.version_sent),
                            nacked,
                        });
                    }
                }
                e.state.on_acks(now, &acks);
                if e.state.acked_at().is_some() && !e.state.left_out().is_empty() {
                    let why: Vec<String> = e
                        .state
                        .left_out_why()
                        .iter()
                        .map(|l| format!("{}: {}", l.node, l.why.describe()))
                        .collect();
                    tracing::warn!(rollout = %id.label(), left_out = ?why, "proxies left out of the step's acks");
                }
            }
            let opened = e.state.window_opened();
            if let Some(t) = e.state.on_tick(&e.spec, now) {
                transitions.push((id.clone(), t, opened));
            }
        }
        self.after(&mut book, transitions, now)
    }

    /// A command by hand on the rollout of `id`; `Ok` with the transition.
    pub fn command(&self, id: &RolloutId, cmd: Command) -> Result<Transition, CommandError> {
        if !self.is_leading() {
            return Err(CommandError::NotLeading);
        }
        let now = self.inner.clock.now();
        let mut book = self.book();
        let e = book
            .entries
            .get_mut(id)
            .ok_or_else(|| CommandError::NotFound(id.label()))?;
        let opened = e.state.window_opened();
        let t = e
            .state
            .command(&e.spec, now, cmd)
            .map_err(CommandError::Refused)?;
        self.after(&mut book, vec![(id.clone(), t.clone(), opened)], now);
        Ok(t)
    }

    /// Logs, counts and persists transitions; `true` if there were any.
    fn after(
        &self,
        book: &mut Book,
        transitions: Vec<(RolloutId, Transition, Instant)>,
        now: Now,
    ) -> bool {
        if transitions.is_empty() {
            return false;
        }
        let m = &self.inner.metrics;
        for (id, t, opened) in &transitions {
            m.transitions.with_label_values(&[&t.result]).inc();
            if matches!(t.result.as_str(), "advanced" | "promoted" | "rolled-back") {
                m.decision
                    .observe(now.at.saturating_duration_since(*opened).as_secs_f64());
            }
            tracing::info!(
                namespace = %id.namespace,
                policy = %id.policy,
                route = %id.route,
                result = %t.result,
                step = t.step,
                canary_weight = t.canary_weight,
                reason = %t.reason,
                "rollout transition"
            );
        }
        self.update_gauges(book);
        self.persist(book);
        true
    }

    fn update_gauges(&self, book: &Book) {
        let g = &self.inner.metrics.step;
        g.reset();
        for (id, e) in &book.entries {
            g.with_label_values(&[&id.namespace, &id.policy, &id.route, &e.spec.rollout.canary])
                .set(i64::from(e.state.canary_weight(&e.spec)));
        }
    }

    fn persist(&self, book: &Book) {
        let Some(dir) = &self.inner.state_dir else {
            return;
        };
        let mut all: BTreeMap<String, (RolloutId, Saved)> = book
            .saved
            .iter()
            .map(|(id, s)| (id.label(), (id.clone(), s.clone())))
            .collect();
        for (id, e) in &book.entries {
            all.insert(id.label(), (id.clone(), e.state.saved()));
        }
        let list: Vec<SavedRollout> = all
            .into_values()
            .map(|(id, state)| SavedRollout { id, state })
            .collect();
        let bytes = serde_json::to_vec_pretty(&list).unwrap_or_default();
        if let Err(e) = std::fs::create_dir_all(dir)
            .and_then(|()| sluice_api::write_atomic(&dir.join(STATE_FILE), &bytes))
        {
            tracing::warn!(state_dir = %dir.display(), error = %e, "cannot save the rollouts' state");
        }
    }

    /// Every rollout's state as the RoutePolicy statuses carry it, per (namespace,
    /// policy name).
    pub fn statuses(&self) -> BTreeMap<(String, String), Vec<RolloutStatus>> {
        let book = self.book();
        let mut out: BTreeMap<(String, String), Vec<RolloutStatus>> = BTreeMap::new();
        for (id, e) in &book.entries {
            out.entry((id.namespace.clone(), id.policy.clone()))
                .or_default()
                .push(status_of(id, e));
        }
        out
    }

    /// Takes in the states the elected replica wrote into the statuses. A follower
    /// serves them at once; the elected replica keeps its own and only resumes from
    /// them when a rollout shows up. `true` when a weight changed.
    pub fn follow(&self, statuses: HashMap<RolloutId, RolloutStatus>) -> bool {
        let now = self.inner.clock.now();
        let leading = self.is_leading();
        let mut book = self.book();
        let mut changed = false;
        let mut moved = false;
        if !leading {
            for (id, e) in &mut book.entries {
                let Some(st) = statuses.get(id) else { continue };
                if st.block != e.state.block || *st == status_of(id, e) {
                    continue;
                }
                let Some(saved) = saved_of(st, e.state.history().to_vec()) else {
                    tracing::warn!(rollout = %id.label(), phase = %st.phase, "unknown rollout phase in the RoutePolicy status; ignoring it");
                    continue;
                };
                let before = e.state.canary_weight(&e.spec);
                e.state = RolloutState::mirror(saved, &e.spec, now);
                moved = true;
                changed |= before != e.state.canary_weight(&e.spec);
            }
        }
        book.from_status = statuses;
        if moved {
            self.update_gauges(&book);
            self.persist(&book);
        }
        changed
    }

    /// `GET /rollouts`: every rollout with its step, weights, windows and history.
    pub fn view(&self) -> serde_json::Value {
        let book = self.book();
        // The open window lives on the replica that drives; a follower shows the
        // holder's last judged window (from the status) and no open one of its own.
        let driving = self.is_leading();
        let list: Vec<serde_json::Value> = book
            .entries
            .iter()
            .map(|(id, e)| {
                let s = &e.state;
                serde_json::json!({
                    "namespace": id.namespace,
                    "policy": id.policy,
                    "route": id.route,
                    "canary": e.spec.rollout.canary,
                    "block": s.block,
                    "drivenHere": driving,
                    "phase": s.phase(),
                    "step": s.step(),
                    "steps": e.spec.rollout.steps,
                    "canaryWeight": s.canary_weight(&e.spec),
                    "weights": s.weights(&e.spec),
                    "stepAcked": s.acked_at().is_some(),
                    "conclusiveWindows": s.conclusive_windows(),
                    "proxiesLeftOut": s.left_out(),
                    "proxiesLeftOutWhy": s
                        .left_out_why()
                        .iter()
                        .map(|l| (l.node.clone(), l.why.describe().into()))
                        .collect::<serde_json::Map<_, _>>(),
                    "proxiesAwaited": s.awaited(),
                    "currentWindow": (driving && !s.phase().is_terminal()).then(|| s.current_window(&e.spec)),
                    "lastWindow": s.last_window(),
                    "history": s.history(),
                })
            })
            .collect();
        serde_json::json!({ "rollouts": list })
    }
}

/// Every rollout's weights at one moment (see [`Rollouts::frozen`]).
#[derive(Clone, Debug, Default)]
pub struct FrozenWeights {
    entries: HashMap<RolloutId, Frozen>,
}

#[derive(Clone, Debug)]
struct Frozen {
    rule: usize,
    weights: IndexMap<String, u32>,
    canary_weight: u32,
    withdrawn: Option<String>,
}

impl EffectiveWeights for FrozenWeights {
    fn weights(
        &self,
        policy: &RoutePolicy,
        route: &str,
        rule: usize,
    ) -> Option<IndexMap<String, u32>> {
        let f = self.entries.get(&RolloutId::of(policy, route))?;
        (f.rule == rule).then(|| f.weights.clone())
    }

    fn withdrawn(&self, policy: &RoutePolicy, route: &str) -> Option<String> {
        self.entries
            .get(&RolloutId::of(policy, route))?
            .withdrawn
            .clone()
    }
}

/// The status form of the rollout `id`.
fn status_of(id: &RolloutId, e: &Entry) -> RolloutStatus {
    let s = &e.state;
    let last = s.history().last();
    RolloutStatus {
        route: id.route.clone(),
        block: s.block.clone(),
        canary: e.spec.rollout.canary.clone(),
        phase: serde_json::to_value(s.phase())
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        step: u32::try_from(s.step()).unwrap_or(u32::MAX),
        weights: s.weights(&e.spec),
        decision: s.last_window().map(|w| w.decision.clone()),
        last_transition: last.map(|t| t.result.clone()),
        last_transition_ms: last.map(|t| t.at_ms),
        reason: last.map(|t| t.reason.clone()),
        history: status_history(s.history()),
        last_window: s.last_window().cloned(),
    }
}

/// The history a status carries: the first transition (the start, while it is
/// remembered) and the latest ones, [`ROLLOUT_STATUS_HISTORY`] in all.
fn status_history(history: &[Transition]) -> Vec<Transition> {
    if history.len() <= ROLLOUT_STATUS_HISTORY {
        return history.to_vec();
    }
    let latest = &history[history.len() - (ROLLOUT_STATUS_HISTORY - 1)..];
    std::iter::once(&history[0])
        .chain(latest)
        .cloned()
        .collect()
}

/// What the engine restores from a status: `history` (what this replica gathered so
/// far) with the status's transitions it lacks, in time order, each once (a follower's
/// history gathers every transition it saw). `None` for an unknown phase.
fn saved_of(st: &RolloutStatus, mut history: Vec<Transition>) -> Option<Saved> {
    let phase: Phase = serde_json::from_value(serde_json::Value::String(st.phase.clone())).ok()?;
    let mut theirs = st.history.clone();
    // A status written before it carried the history names the last transition only.
    if let (Some(result), Some(at_ms)) = (&st.last_transition, st.last_transition_ms) {
        theirs.push(Transition {
            at_ms,
            result: result.clone(),
            step: st.step as usize,
            canary_weight: st.weights.get(&st.canary).copied().unwrap_or(0),
            reason: st.reason.clone().unwrap_or_default(),
        });
    }
    for t in theirs {
        if !history
            .iter()
            .any(|h| h.at_ms == t.at_ms && h.result == t.result)
        {
            history.push(t);
        }
    }
    // Stable: transitions recorded in one millisecond keep their order.
    history.sort_by_key(|t| t.at_ms);
    let last_window = st.last_window.clone().or_else(|| {
        st.decision.as_ref().map(|d| WindowView {
            step: st.step as usize,
            decision: d.clone(),
            reason: st.reason.clone().unwrap_or_default(),
            ..WindowView::default()
        })
    });
    Some(Saved {
        block: st.block.clone(),
        phase,
        step: st.step as usize,
        history,
        last_window,
    })
}

/// One rollout in the state file.
#[derive(Debug, Serialize, Deserialize)]
struct SavedRollout {
    id: RolloutId,
    state: Saved,
}

fn load(dir: &Path) -> HashMap<RolloutId, Saved> {
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the rollouts' state; starting them afresh");
            return HashMap::new();
        }
    };
    match serde_json::from_slice::<Vec<SavedRollout>>(&bytes) {
        Ok(list) => list.into_iter().map(|s| (s.id, s.state)).collect(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "the rollouts' state is unreadable; starting them afresh");
            HashMap::new()
        }
    }
}

/// Looks at acks and interval ends every [`TICK`]; ends at shutdown.
pub(crate) async fn drive(shared: Arc<crate::state::Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        shared.tick_rollouts();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rollout::TEST_POLICY as POLICY;

    fn set() -> PolicySet {
        set_of(POLICY)
    }

    fn set_of(yaml: &str) -> PolicySet {
        PolicySet::new(sluice_config::parse_policies("log.yaml", yaml).expect("parses"))
            .expect("a valid set")
    }

    /// The policy with the rollout's steps changed: another block.
    fn other_block() -> PolicySet {
        set_of(&POLICY.replace("[10, 50, 100]", "[20, 100]"))
    }

    /// The policy with its rollout block taken out.
    fn without_rollout() -> PolicySet {
        let block = "          rollout:\n            canary: v2\n            steps: [10, 50, 100]\n            interval: 1s\n";
        assert!(POLICY.contains(block));
        set_of(&POLICY.replace(block, ""))
    }

    fn id() -> RolloutId {
        RolloutId {
            namespace: "shop".into(),
            policy: "log".into(),
            route: "ingest".into(),
        }
    }

    fn rollout(r: &Rollouts) -> serde_json::Value {
        r.view()["rollouts"][0].clone()
    }

    /// The status `r` would write for the one rollout.
    fn status(r: &Rollouts) -> RolloutStatus {
        r.statuses()[&("shop".to_string(), "log".to_string())][0].clone()
    }

    /// A status of the policy's block at its second step (50 %), nothing recorded.
    fn status_at_second_step() -> RolloutStatus {
        let holder = Rollouts::new(None, Clock::default());
        holder.sync(&set());
        RolloutStatus {
            step: 1,
            weights: IndexMap::from([("v1".to_string(), 50), ("v2".to_string(), 50)]),
            history: Vec::new(),
            last_transition: None,
            last_transition_ms: None,
            ..status(&holder)
        }
    }

    fn policy() -> RoutePolicy {
        set().policies()[0].clone()
    }

    fn results(r: &Rollouts) -> Vec<String> {
        r.view()["rollouts"][0]["history"]
            .as_array()
            .expect("a history")
            .iter()
            .map(|t| t["result"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    fn at(base: Now, after: Duration) -> Now {
        Now {
            at: base.at + after,
            unix_ms: base.unix_ms + after.as_millis() as u64,
        }
    }

    /// A replica that follows serves a rollout it has no status for at its first
    /// step without recording anything; once it holds the lease it starts it, once,
    /// and starts no step's interval before the other replicas can have sent it
    /// their proxies' acks.
    #[test]
    fn a_new_holder_starts_an_undescribed_rollout_once_and_waits_for_the_acks() {
        let r = Rollouts::new(None, Clock::default());
        r.set_leading(false);
        r.sync(&set());
        assert_eq!(results(&r), Vec::<String>::new());
        assert_eq!(r.view()["rollouts"][0]["canaryWeight"], 10);
        let t0 = r.inner.clock.now();
        r.set_leading_at(true, t0);
        assert_eq!(results(&r), ["started"]);
        // A second election (lost and won again) starts nothing.
        r.set_leading_at(false, t0);
        r.set_leading_at(true, t0);
        assert_eq!(results(&r), ["started"]);

        // No proxy is connected here: only the other replicas' acks are missing.
        r.tick_at(Vec::new, at(t0, TAKEOVER_GRACE - Duration::from_millis(1)));
        assert_eq!(r.view()["rollouts"][0]["stepAcked"], false);
        r.tick_at(Vec::new, at(t0, TAKEOVER_GRACE));
        assert_eq!(r.view()["rollouts"][0]["stepAcked"], true);
    }

    /// The status a follower reads: the history it brings is merged with what the
    /// follower gathered, each transition once and in time order, and it carries the
    /// first transition and the latest ones.
    #[test]
    fn a_followers_history_holds_each_of_the_holders_transitions_once() {
        let holder = Rollouts::new(None, Clock::default());
        holder.sync(&set());
        let base = holder.inner.clock.now();
        for i in 1..=12 {
            let mut book = holder.book();
            let e = book.entries.values_mut().next().expect("the rollout");
            let spec = e.spec.clone();
            let t = at(base, Duration::from_millis(i));
            e.state.command(&spec, t, Command::Pause).expect("pauses");
            e.state.command(&spec, t, Command::Resume).expect("resumes");
        }
        let statuses = holder.statuses();
        let st = &statuses[&("shop".to_string(), "log".to_string())][0];
        assert_eq!(st.history.len(), ROLLOUT_STATUS_HISTORY);
        assert_eq!(st.history[0].result, "started");

        let follower = Rollouts::new(None, Clock::default());
        follower.set_leading(false);
        follower.sync(&set());
        let id = RolloutId {
            namespace: "shop".into(),
            policy: "log".into(),
            route: "ingest".into(),
        };
        let statuses = HashMap::from([(id.clone(), st.clone())]);
        follower.follow(statuses.clone());
        // The same status read again (every watch event brings it) adds nothing.
        follower.follow(statuses);
        let seen = results(&follower);
        assert_eq!(seen.len(), ROLLOUT_STATUS_HISTORY, "{seen:?}");
        assert_eq!(seen.iter().filter(|r| *r == "started").count(), 1);
        assert_eq!(seen.last().map(String::as_str), Some("resumed"));
        let times: Vec<u64> = follower.view()["rollouts"][0]["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["atMs"].as_u64().unwrap())
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    }

    /// A command names the rollout it could not find by namespace, policy and route;
    /// a replica that does not drive refuses every command.
    #[test]
    fn commands_name_an_unknown_rollout_and_need_the_lease() {
        let r = Rollouts::new(None, Clock::default());
        r.sync(&set());
        let nope = RolloutId {
            route: "nope".into(),
            ..id()
        };
        assert_eq!(
            r.command(&nope, Command::Pause),
            Err(CommandError::NotFound("shop/log/nope".into()))
        );
        assert_eq!(
            r.command(&id(), Command::Pause).map(|t| t.result),
            Ok("paused".into())
        );
        assert_eq!(
            r.command(&id(), Command::Pause),
            Err(CommandError::Refused("already paused".into()))
        );
        r.set_leading(false);
        assert_eq!(
            r.command(&id(), Command::Resume),
            Err(CommandError::NotLeading)
        );
    }

    /// The step gauge follows each rollout's canary weight, every transition is
    /// counted by result, and a decision's time is observed.
    #[test]
    fn the_metrics_follow_the_steps_and_transitions() {
        let r = Rollouts::new(None, Clock::default());
        let registry = prometheus::Registry::new();
        for c in r.collectors() {
            registry.register(c).expect("registers");
        }
        let text = || {
            let mut buf = Vec::new();
            prometheus::Encoder::encode(
                &prometheus::TextEncoder::new(),
                &registry.gather(),
                &mut buf,
            )
            .expect("encodes");
            String::from_utf8(buf).expect("UTF-8")
        };
        let step =
            r#"sluice_rollout_step{canary="v2",namespace="shop",policy="log",route="ingest"}"#;
        r.sync(&set());
        let now = text();
        assert!(now.contains(&format!("{step} 10\n")), "{now}");
        assert!(now.contains("sluice_rollout_transitions_total{result=\"started\"} 1\n"));
        r.command(&id(), Command::Abort).expect("aborts");
        let now = text();
        assert!(now.contains(&format!("{step} 0\n")), "{now}");
        assert!(now.contains("sluice_rollout_transitions_total{result=\"rolled-back\"} 1\n"));
        assert!(
            now.contains("sluice_rollout_decision_seconds_count 1\n"),
            "{now}"
        );
        // A rollout gone from the policy leaves no gauge behind.
        r.sync(&without_rollout());
        assert!(!text().contains(step));
    }

    /// A new lease holder drives on from the step the old holder's status described,
    /// and a rollout it already has a history for is not started again (even when
    /// the statuses no longer describe it).
    #[test]
    fn a_new_holder_drives_on_from_what_it_followed() {
        let r = Rollouts::new(None, Clock::default());
        r.set_leading(false);
        r.sync(&set());
        r.follow(HashMap::from([(id(), status_at_second_step())]));
        r.set_leading(true);
        assert_eq!(rollout(&r)["step"], 1);
        assert_eq!(results(&r), Vec::<String>::new());

        let r = Rollouts::new(None, Clock::default());
        r.set_leading(false);
        r.sync(&set());
        let mut st = status_at_second_step();
        st.last_transition = Some("advanced".into());
        st.last_transition_ms = Some(1);
        r.follow(HashMap::from([(id(), st)]));
        r.follow(HashMap::new());
        r.set_leading(true);
        assert_eq!(rollout(&r)["step"], 1);
        assert_eq!(results(&r), ["advanced"]);
    }

    /// An unchanged block keeps its state whatever else changed in the policy; a
    /// changed one starts over.
    #[test]
    fn a_changed_block_starts_over() {
        let r = Rollouts::new(None, Clock::default());
        r.sync(&set());
        r.command(&id(), Command::Pause).expect("pauses");
        r.sync(&set_of(&POLICY.replace("127.0.0.1:2", "127.0.0.1:3")));
        assert_eq!(rollout(&r)["phase"], "paused");
        r.sync(&other_block());
        assert_eq!(rollout(&r)["phase"], "progressing");
        assert_eq!(rollout(&r)["canaryWeight"], 20);
        assert_eq!(results(&r), ["started"]);
    }

    /// The holder resumes a rollout from a status of the same block (and records the
    /// restart); a status of another block is not its state.
    #[test]
    fn a_holder_resumes_from_a_status_of_the_same_block_only() {
        let r = Rollouts::new(None, Clock::default());
        r.follow(HashMap::from([(id(), status_at_second_step())]));
        r.sync(&set());
        assert_eq!(rollout(&r)["step"], 1);
        assert_eq!(results(&r), ["restarted"]);

        let r = Rollouts::new(None, Clock::default());
        r.follow(HashMap::from([(id(), status_at_second_step())]));
        r.sync(&other_block());
        assert_eq!(rollout(&r)["step"], 0);
        assert_eq!(results(&r), ["started"]);
    }

    /// A follower serves the holder's step as the status says and records nothing
    /// itself.
    #[test]
    fn a_follower_mirrors_a_status_without_recording() {
        let r = Rollouts::new(None, Clock::default());
        r.set_leading(false);
        r.follow(HashMap::from([(id(), status_at_second_step())]));
        r.sync(&set());
        assert_eq!(rollout(&r)["step"], 1);
        assert_eq!(rollout(&r)["canaryWeight"], 50);
        assert_eq!(results(&r), Vec::<String>::new());
    }

    /// The status a follower takes in: another block's is ignored; its step, phase,
    /// last transition and decision are served; `true` only when a weight moved.
    #[test]
    fn a_follower_takes_in_statuses_of_its_block() {
        let r = Rollouts::new(None, Clock::default());
        r.set_leading(false);
        r.sync(&set());
        let other = {
            let holder = Rollouts::new(None, Clock::default());
            holder.sync(&other_block());
            RolloutStatus {
                step: 1,
                ..status(&holder)
            }
        };
        assert!(!r.follow(HashMap::from([(id(), other)])));
        assert_eq!(rollout(&r)["step"], 0);

        let mut st = status_at_second_step();
        st.last_transition = Some("advanced".into());
        st.last_transition_ms = Some(1_000);
        st.reason = Some("window passed at 10%".into());
        st.decision = Some("pass".into());
        assert!(r.follow(HashMap::from([(id(), st.clone())])));
        let seen = rollout(&r);
        assert_eq!(seen["canaryWeight"], 50);
        assert_eq!(seen["history"][0]["result"], "advanced");
        assert_eq!(seen["history"][0]["atMs"], 1_000);
        assert_eq!(seen["history"][0]["step"], 1);
        assert_eq!(seen["history"][0]["canaryWeight"], 50);
        assert_eq!(seen["history"][0]["reason"], "window passed at 10%");
        assert_eq!(seen["lastWindow"]["decision"], "pass");
        assert_eq!(seen["lastWindow"]["step"], 1);
        assert_eq!(seen["lastWindow"]["reason"], "window passed at 10%");
        // The same status again moves nothing.
        assert!(!r.follow(HashMap::from([(id(), st.clone())])));
        // Paused at the same step: the phase changes, no weight does.
        st.phase = "paused".into();
        assert!(!r.follow(HashMap::from([(id(), st.clone())])));
        assert_eq!(rollout(&r)["phase"], "paused");
        // A phase this version does not know is ignored.
        st.phase = "sideways".into();
        st.step = 2;
        assert!(!r.follow(HashMap::from([(id(), st)])));
        assert_eq!(rollout(&r)["phase"], "paused");
        assert_eq!(rollout(&r)["step"], 1);
    }

    /// The state directory: a restart resumes the same state of the same block,
    /// another block starts over, a rollout gone from the policy is forgotten, and
    /// an unreadable file starts the rollouts afresh.
    #[test]
    fn the_state_directory_survives_a_restart() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let r = Rollouts::new(Some(dir.path()), Clock::default());
        r.sync(&set());
        r.command(&id(), Command::Pause).expect("pauses");
        drop(r);

        let r = Rollouts::new(Some(dir.path()), Clock::default());
        r.sync(&set());
        assert_eq!(rollout(&r)["phase"], "paused");
        assert_eq!(results(&r), ["started", "paused", "restarted"]);
        drop(r);

        let r = Rollouts::new(Some(dir.path()), Clock::default());
        r.sync(&other_block());
        assert_eq!(results(&r), ["started"]);
        r.command(&id(), Command::Pause).expect("pauses");
        // Only a removal: saved all the same.
        r.sync(&without_rollout());
        drop(r);
        let r = Rollouts::new(Some(dir.path()), Clock::default());
        r.sync(&other_block());
        assert_eq!(results(&r), ["started"]);

        std::fs::write(dir.path().join(STATE_FILE), "not json").expect("writes");
        let r = Rollouts::new(Some(dir.path()), Clock::default());
        r.sync(&set());
        assert_eq!(results(&r), ["started"]);
    }

    /// Two rollouts are saved side by side: one is not written over the other.
    #[test]
    fn every_rollout_is_saved() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let two = POLICY
            .replace("metadata: { name: log", "metadata: { name: log2")
            .replace("host: log", "host: log2")
            + "---\n"
            + POLICY;
        let r = Rollouts::new(Some(dir.path()), Clock::default());
        r.sync(&set_of(&two));
        for policy in ["log", "log2"] {
            let id = RolloutId {
                policy: policy.into(),
                ..id()
            };
            r.command(&id, Command::Pause).expect("pauses");
        }
        let saved = load(dir.path());
        assert_eq!(saved.len(), 2);
        assert!(saved.values().all(|s| s.phase == Phase::Paused));
    }

    /// The weights one build of the views uses: the step's, for the rule holding the
    /// rollout only; the canary named as withdrawn once rolled back.
    #[test]
    fn frozen_weights_are_the_steps_and_name_a_withdrawn_canary() {
        let r = Rollouts::new(None, Clock::default());
        r.sync(&set());
        let p = policy();
        let f = r.frozen();
        let step = IndexMap::from([("v1".to_string(), 90), ("v2".to_string(), 10)]);
        assert_eq!(f.weights(&p, "ingest", 0), Some(step));
        assert_eq!(f.weights(&p, "ingest", 1), None);
        assert_eq!(f.weights(&p, "other", 0), None);
        assert_eq!(f.withdrawn(&p, "ingest"), None);
        r.command(&id(), Command::Abort).expect("aborts");
        let f = r.frozen();
        let back = IndexMap::from([("v1".to_string(), 100), ("v2".to_string(), 0)]);
        assert_eq!(f.weights(&p, "ingest", 0), Some(back));
        assert_eq!(f.withdrawn(&p, "ingest"), Some("v2".into()));
        assert_eq!(f.withdrawn(&p, "other"), None);
    }

    /// Versions are remembered with the weights they were built with, the first
    /// record of a version holds, and only the latest [`VERSIONS`] are kept.
    #[test]
    fn versions_are_remembered_with_their_weights() {
        let r = Rollouts::new(None, Clock::default());
        r.sync(&set());
        let at_first = r.frozen();
        r.record_version("a", &at_first);
        r.command(&id(), Command::Promote).expect("promotes");
        r.record_version("a", &r.frozen());
        r.record_version("b", &r.frozen());
        assert_eq!(r.recorded_weight("a", &id()), Some(10));
        assert_eq!(r.recorded_weight("b", &id()), Some(100));
        assert_eq!(r.recorded_weight("c", &id()), None);
        let nope = RolloutId {
            route: "nope".into(),
            ..id()
        };
        assert_eq!(r.recorded_weight("a", &nope), None);
        for i in 0..VERSIONS - 1 {
            r.record_version(&format!("v{i}"), &at_first);
        }
        // "a" is the oldest of VERSIONS + 1.
        assert_eq!(r.recorded_weight("a", &id()), None);
        assert_eq!(r.recorded_weight("b", &id()), Some(100));
        assert_eq!(r.recorded_weight("v0", &id()), Some(10));
    }

    /// The canary's failures in the reports roll it back at once; the same
    /// failures on the other backends do not; a follower judges nothing.
    #[test]
    fn the_canarys_failures_roll_it_back() {
        let failing = Window {
            requests: 20,
            failures: 20,
            durations: Vec::new(),
        };
        let route = ("shop".to_string(), "log".to_string(), "ingest".to_string());
        let on = |backend: &str| {
            super::super::reports::Taken::from([(
                route.clone(),
                BTreeMap::from([(backend.to_string(), failing.clone())]),
            )])
        };
        let clock = Clock::default();
        let r = Rollouts::new(None, clock.clone());
        r.sync(&set());
        assert!(!r.on_reports(&on("v1"), &[]));
        assert!(!r.on_reports(&super::super::reports::Taken::new(), &[]));
        assert_eq!(rollout(&r)["phase"], "progressing");
        r.set_leading(false);
        assert!(!r.on_reports(&on("v2"), &[]));
        assert_eq!(rollout(&r)["phase"], "progressing");
        r.set_leading(true);
        assert!(r.on_reports(&on("v2"), &[]));
        assert_eq!(rollout(&r)["phase"], "rolled-back");
        // The rollback's weights are acked like a step's: waiting until a proxy has a
        // version carrying them, then listed no more.
        assert_eq!(rollout(&r)["stepAcked"], false);
        // (Acks count once the new holder's takeover grace has passed.)
        clock.advance(TAKEOVER_GRACE);
        r.record_version("back", &r.frozen());
        let mut p = ProxyRecord {
            node_id: "a".into(),
            connected: true,
            acked_version: Some("before".into()),
            ..Default::default()
        };
        assert!(!r.tick(|| vec![p.clone()]));
        assert_eq!(rollout(&r)["stepAcked"], false);
        p.acked_version = Some("back".into());
        assert!(!r.tick(|| vec![p.clone()]));
        assert_eq!(rollout(&r)["stepAcked"], true);
        assert!(!r.tick(|| panic!("the rollback is acked already")));
    }

    /// The same policy applied to two namespaces is two rollouts: the staging canary's
    /// failures roll back staging's only. A report without a namespace (a proxy that
    /// predates it) cannot say which of the two it means and moves neither.
    #[test]
    fn a_canary_is_judged_by_the_reports_of_its_own_namespace() {
        let staging = POLICY
            .replace("namespace: shop", "namespace: staging")
            .replace("host: log", "host: log.staging");
        let two = PolicySet::new(
            [POLICY, staging.as_str()]
                .iter()
                .flat_map(|y| sluice_config::parse_policies("log.yaml", y).expect("parses"))
                .collect(),
        )
        .expect("a valid set");
        let failing = Window {
            requests: 20,
            failures: 20,
            durations: Vec::new(),
        };
        let on = |namespace: &str| {
            let route = (
                namespace.to_string(),
                "log".to_string(),
                "ingest".to_string(),
            );
            super::super::reports::Taken::from([(
                route,
                BTreeMap::from([("v2".to_string(), failing.clone())]),
            )])
        };
        let r = Rollouts::new(None, Clock::default());
        r.sync(&two);
        let phases = |r: &Rollouts| -> Vec<(String, String)> {
            let view = r.view();
            let mut v: Vec<(String, String)> = view["rollouts"]
                .as_array()
                .expect("a list")
                .iter()
                .map(|x| (x["namespace"].to_string(), x["phase"].to_string()))
                .collect();
            v.sort();
            v
        };
        let progressing = |ns: &str| (format!("{ns:?}"), "\"progressing\"".to_string());
        assert_eq!(phases(&r), [progressing("shop"), progressing("staging")]);
        assert!(!r.on_reports(&on(""), &[]), "ambiguous without a namespace");
        assert_eq!(phases(&r), [progressing("shop"), progressing("staging")]);
        assert!(r.on_reports(&on("staging"), &[]));
        assert_eq!(
            phases(&r),
            [
                progressing("shop"),
                ("\"staging\"".to_string(), "\"rolled-back\"".to_string())
            ]
        );
    }

    /// A proxy a step waited for that disconnects without acking (a hung one is
    /// dropped by the keepalive as the grace ends) is named in `/rollouts` with why;
    /// while the step waits, `/rollouts` names whom it waits for.
    #[test]
    fn a_proxy_gone_without_acking_is_named_left_out() {
        let clock = Clock::default();
        let r = Rollouts::new(None, clock.clone());
        r.sync(&set());
        r.record_version("v1", &r.frozen());
        let proxy = |node: &str, acked: &str, connected: bool| ProxyRecord {
            node_id: node.into(),
            acked_version: Some(acked.into()),
            connected,
            ..Default::default()
        };
        assert!(!r.tick(|| vec![proxy("a", "v1", true), proxy("hung", "v0", true)]));
        assert_eq!(rollout(&r)["stepAcked"], false);
        assert_eq!(rollout(&r)["proxiesAwaited"], serde_json::json!(["hung"]));
        clock.advance(Duration::from_secs(30));
        assert!(!r.tick(|| vec![proxy("a", "v1", true), proxy("hung", "v0", false)]));
        assert_eq!(rollout(&r)["stepAcked"], true);
        assert_eq!(rollout(&r)["proxiesLeftOut"], serde_json::json!(["hung"]));
        assert_eq!(
            rollout(&r)["proxiesLeftOutWhy"],
            serde_json::json!({ "hung": "disconnected before acking" })
        );
        assert_eq!(rollout(&r)["proxiesAwaited"], serde_json::json!([]));
    }

    /// A proxy connected when a step's weights were set that goes within a tick,
    /// before any tick saw it waiting, is named all the same; one gone before the
    /// step began, or one that came after it and went before being sent its weights,
    /// is not.
    #[test]
    fn a_proxy_gone_before_any_tick_saw_it_is_named_left_out() {
        let clock = Clock::default();
        let r = Rollouts::new(None, clock.clone());
        r.sync(&set());
        let step = clock.now().unix_ms;
        r.record_version("v1", &r.frozen());
        let proxy = |node: &str, sent: Option<&str>, opened: u64, gone: Option<u64>| ProxyRecord {
            node_id: node.into(),
            acked_version: Some("v0".into()),
            version_sent: sent.map(str::to_string),
            connected_at_unix_ms: opened,
            connected: gone.is_none(),
            disconnected_at_unix_ms: gone,
            ..Default::default()
        };
        let mut acked = proxy("a", Some("v1"), step - 60_000, None);
        acked.acked_version = Some("v1".into());
        let proxies = vec![
            acked,
            // There when the step began; gone 50 ms later, the step's version unsent.
            proxy("quick", None, step - 60_000, Some(step + 50)),
            // Sent the step's weights after it began, gone before acking.
            proxy("sent", Some("v1"), step + 10, Some(step + 100)),
            proxy("before", None, step - 60_000, Some(step - 1_000)),
            proxy("newcomer", None, step + 10, Some(step + 20)),
        ];
        assert!(!r.tick(|| proxies));
        let r = rollout(&r);
        assert_eq!(r["stepAcked"], true, "{r:#}");
        assert_eq!(r["proxiesLeftOut"], serde_json::json!(["quick", "sent"]));
        assert_eq!(
            r["proxiesLeftOutWhy"],
            serde_json::json!({
                "quick": "disconnected before acking",
                "sent": "disconnected before acking",
            })
        );
    }

    /// A step's interval starts once every connected proxy acked a version carrying
    /// its weights; a proxy that refused it is left out at once, one that is not
    /// connected does not count. A tick with nothing to decide changes nothing.
    #[test]
    fn acks_start_the_steps_interval() {
        let clock = Clock::default();
        let r = Rollouts::new(None, clock.clone());
        r.sync(&set());
        r.record_version("v1", &r.frozen());
        let proxy = |node: &str, acked: Option<&str>, nacked: Option<&str>| ProxyRecord {
            node_id: node.into(),
            acked_version: acked.map(str::to_string),
            nacked_version: nacked.map(str::to_string),
            connected: true,
            ..Default::default()
        };
        let mut gone = proxy("gone", None, None);
        gone.connected = false;
        // One proxy has not acked yet.
        assert!(!r.tick(|| vec![proxy("a", Some("v1"), None), proxy("b", Some("v0"), None)]));
        assert_eq!(rollout(&r)["stepAcked"], false);
        assert!(!r.tick(|| vec![
            proxy("a", Some("v1"), None),
            proxy("b", Some("v0"), Some("v1")),
            gone,
        ]));
        assert_eq!(rollout(&r)["stepAcked"], true);
        assert_eq!(rollout(&r)["proxiesLeftOut"], serde_json::json!(["b"]));
        assert_eq!(
            rollout(&r)["proxiesLeftOutWhy"],
            serde_json::json!({ "b": "refused the step's weights (NACK)" })
        );
        // No proxy is listed once the step is acked.
        assert!(!r.tick(|| panic!("the step is acked already")));
        // The interval (1 s) ends without enough requests: a transition.
        clock.advance(Duration::from_secs(1));
        assert!(r.tick(Vec::new));
        assert_eq!(results(&r), ["started", "inconclusive"]);
        // A follower ticks nothing.
        r.set_leading(false);
        clock.advance(Duration::from_secs(1));
        assert!(!r.tick(|| panic!("a follower lists no proxies")));
    }
}
