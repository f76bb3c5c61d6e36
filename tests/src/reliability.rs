//! The reliability suite: sustained load through a real `sluice-proxy` (a child
//! process, so a crash and its resident memory are seen) to real upstreams, while the
//! policy is rewritten, an upstream dies and comes back, another turns slow and then
//! hangs, 10,000 idle connections are held open from another process, and malformed
//! HTTP/1.1 and HTTP/2 arrives over raw TCP.
//!
//! Every answer is sorted: a success (200 from one of the host's upstreams), a failure
//! by design (429/502/503/504 whose `x-sluice-reason` is one the fault injected on that
//! host at that moment explains), or an unexpected failure (anything else, including a
//! connection the proxy broke). [`run`] returns a [`Report`] that fails on any
//! unexpected failure, a crash, a refused or unapplied policy edit, a malformed input
//! that was not refused, or resident memory still climbing over the last third.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::malformed;
use crate::{ChildProxy, HttpConn, Protocol, Stall, Unsent, Upstream};

/// What to run, and for how long.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    /// The `sluice-proxy` binary.
    pub proxy_bin: PathBuf,
    /// A program that understands `hold-idle --target ADDR --count N` (the
    /// `reliability` binary itself).
    pub holder_bin: PathBuf,
    /// The whole run; faults happen in the first two thirds, the last third is load
    /// only and judges memory.
    pub duration: Duration,
    /// Policy rewrites (a few of them broken on purpose).
    pub edits: u32,
    /// Idle connections held open at once.
    pub idle_connections: usize,
    /// How long the idle connections stay open.
    pub idle_hold: Duration,
    /// Requests per second of each client loop (0: as fast as answers come).
    pub rate_per_loop: u32,
    /// How often resident memory is sampled.
    pub sample_every: Duration,
    /// Allowed growth of resident memory across the last third (mean of its second
    /// half minus mean of its first half).
    pub memory_growth_bound_kib: u64,
}

impl SuiteOptions {
    /// The short run CI does: about a minute and a half.
    pub fn short(proxy_bin: PathBuf, holder_bin: PathBuf) -> Self {
        Self {
            proxy_bin,
            holder_bin,
            duration: Duration::from_secs(75),
            edits: 100,
            idle_connections: 10_000,
            idle_hold: Duration::from_secs(3),
            rate_per_loop: 30,
            sample_every: Duration::from_millis(250),
            memory_growth_bound_kib: 4 * 1024,
        }
    }

    /// The long run, by hand: ten minutes, the fault cycle repeated.
    pub fn long(proxy_bin: PathBuf, holder_bin: PathBuf) -> Self {
        Self {
            duration: Duration::from_secs(600),
            idle_hold: Duration::from_secs(10),
            rate_per_loop: 100,
            sample_every: Duration::from_secs(1),
            ..Self::short(proxy_bin, holder_bin)
        }
    }
}

// === hosts and faults ===

/// The hosts the suite routes, each with its own upstream(s) and faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Host {
    /// Two healthy upstreams split by weights the policy edits keep changing.
    Steady,
    /// An upstream that is killed and restarted; a circuit breaker guards it.
    Flaky,
    /// An upstream that turns slow, then hangs; a 4 s route timeout cuts it.
    Slow,
    /// A healthy upstream behind a rate limit far below the load.
    Limited,
}

const HOSTS: [Host; 4] = [Host::Steady, Host::Flaky, Host::Slow, Host::Limited];

impl Host {
    fn name(self) -> &'static str {
        match self {
            Host::Steady => "steady",
            Host::Flaky => "flaky",
            Host::Slow => "slow",
            Host::Limited => "limited",
        }
    }

    fn answers_from(self, upstream: &str) -> bool {
        match self {
            Host::Steady => upstream == "steady-a" || upstream == "steady-b",
            other => upstream == other.name(),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fault in force on a host from `start` until `end`: the reasons it explains.
#[derive(Debug)]
struct Window {
    host: Host,
    reasons: &'static [&'static str],
    start: Instant,
    end: Option<Instant>,
}

#[derive(Debug, Default)]
struct Faults {
    windows: Mutex<Vec<Window>>,
}

impl Faults {
    fn open(&self, host: Host, reasons: &'static [&'static str]) -> usize {
        let mut w = self.windows.lock().expect("faults lock");
        w.push(Window {
            host,
            reasons,
            start: Instant::now(),
            end: None,
        });
        w.len() - 1
    }

    fn close(&self, id: usize) {
        self.windows.lock().expect("faults lock")[id].end = Some(Instant::now());
    }

    /// Whether a fault on `host` in force at some point between `sent` and `received`
    /// explains `reason`.
    fn explains(&self, host: Host, reason: &str, sent: Instant, received: Instant) -> bool {
        self.windows.lock().expect("faults lock").iter().any(|w| {
            w.host == host
                && w.reasons.contains(&reason)
                && w.start <= received
                && w.end.is_none_or(|end| end >= sent)
        })
    }
}

// === counters ===

#[derive(Debug, Default)]
struct HostCounts {
    sent: AtomicU64,
    ok: AtomicU64,
    by_design: AtomicU64,
    unexpected: AtomicU64,
}

#[derive(Debug, Default)]
struct Shared {
    faults: Faults,
    counts: [HostCounts; 4],
    h2_sent: AtomicU64,
    resent: AtomicU64,
    reasons: Mutex<BTreeMap<String, u64>>,
    examples: Mutex<Vec<String>>,
    crashed: AtomicBool,
}

impl Shared {
    fn counts(&self, host: Host) -> &HostCounts {
        &self.counts[host as usize]
    }

    fn unexpected(&self, host: Host, what: String) {
        self.counts(host).unexpected.fetch_add(1, Ordering::Relaxed);
        let mut ex = self.examples.lock().expect("examples lock");
        if ex.len() < 20 {
            ex.push(what);
        }
    }

    fn problem(&self, what: String) {
        let mut ex = self.examples.lock().expect("examples lock");
        ex.push(what);
    }
}

// === the report ===

/// Per-host request counts.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Requests sent.
    pub sent: u64,
    /// Answered 200 by one of the host's upstreams.
    pub ok: u64,
    /// Refused with a reason the fault in force explains.
    pub by_design: u64,
    /// Anything else.
    pub unexpected: u64,
}

/// What a run saw.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// How long it ran.
    pub elapsed: Duration,
    /// Counts per host.
    pub hosts: Vec<(String, Counts)>,
    /// Requests sent over HTTP/2 (the rest over HTTP/1.1).
    pub h2_sent: u64,
    /// Requests a keep-alive connection did not take because the proxy had closed it or
    /// sent GOAWAY (HTTP/2's per-connection stream cap), sent again on a new connection
    /// as a pooled client would; their outcome is counted like any other's.
    pub resent: u64,
    /// Failures by design, by `status reason`.
    pub by_reason: BTreeMap<String, u64>,
    /// Policy edits applied / broken edits refused.
    pub edits_applied: u32,
    /// Broken edits that were refused while the previous policy stayed in force.
    pub edits_refused: u32,
    /// Fault cycles run (kill/restart, slow/hang, idle connections, malformed input).
    pub cycles: u32,
    /// Idle connections opened, and the proxy's open descriptors while they were.
    pub idle: Vec<(usize, usize)>,
    /// The proxy's open-files limit (soft, hard) after it started.
    pub proxy_open_files_limit: Option<(Option<u64>, Option<u64>)>,
    /// The soft limit the proxy inherited (it raises its own).
    pub inherited_open_files: Option<u64>,
    /// Each malformed input and what the proxy did.
    pub malformed: Vec<malformed::AttackOutcome>,
    /// Resident memory samples: seconds since start, KiB.
    pub rss: Vec<(f64, u64)>,
    /// Peak resident memory (VmHWM), KiB.
    pub rss_peak_kib: u64,
    /// Growth over the last third (KiB; negative when it shrank).
    pub rss_growth_kib: i64,
    /// The bound that growth is held to.
    pub rss_growth_bound_kib: u64,
    /// Whether the proxy process died.
    pub crashed: bool,
    /// Unexpected failures and other problems (the first few).
    pub problems: Vec<String>,
}

impl Report {
    /// Whether the run passed: no unexpected failure, no crash, no problem, and
    /// memory not climbing over the last third.
    pub fn passed(&self) -> bool {
        !self.crashed
            && self.problems.is_empty()
            && self.hosts.iter().all(|(_, c)| c.unexpected == 0)
            && self.rss_growth_kib <= self.rss_growth_bound_kib as i64
    }

    fn total(&self) -> Counts {
        let mut t = Counts::default();
        for (_, c) in &self.hosts {
            t.sent += c.sent;
            t.ok += c.ok;
            t.by_design += c.by_design;
            t.unexpected += c.unexpected;
        }
        t
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.total();
        writeln!(
            f,
            "reliability: {} in {:.0} s, {} fault cycle(s)",
            if self.passed() { "PASSED" } else { "FAILED" },
            self.elapsed.as_secs_f64(),
            self.cycles
        )?;
        writeln!(
            f,
            "  requests: {} sent ({} over HTTP/2), {} succeeded, {} failed by design, {} failed unexpectedly",
            t.sent, self.h2_sent, t.ok, t.by_design, t.unexpected
        )?;
        writeln!(
            f,
            "  connections the proxy closed between requests (GOAWAY at the stream cap): {} requests sent again on a new one",
            self.resent
        )?;
        for (host, c) in &self.hosts {
            writeln!(
                f,
                "    {host:<8} sent {:>7}  ok {:>7}  by design {:>6}  unexpected {}",
                c.sent, c.ok, c.by_design, c.unexpected
            )?;
        }
        let reasons: Vec<String> = self
            .by_reason
            .iter()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect();
        writeln!(f, "  by design: {}", reasons.join(", "))?;
        writeln!(
            f,
            "  policy: {} edits applied, {} broken edits refused",
            self.edits_applied, self.edits_refused
        )?;
        if let Some((soft, hard)) = self.proxy_open_files_limit {
            let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |v| v.to_string());
            writeln!(
                f,
                "  proxy open-files limit: soft {} hard {} (started with soft {})",
                show(soft),
                show(hard),
                show(self.inherited_open_files)
            )?;
        }
        for (opened, fds) in &self.idle {
            writeln!(
                f,
                "  idle connections: {opened} held open from another process; proxy had {fds} descriptors open"
            )?;
        }
        let refused = self.malformed.iter().filter(|m| m.ok).count();
        writeln!(
            f,
            "  malformed input: {refused} of {} handled as required",
            self.malformed.len()
        )?;
        for m in &self.malformed {
            writeln!(
                f,
                "    [{}] {}: {}",
                if m.ok { "ok" } else { "FAIL" },
                m.name,
                m.seen
            )?;
        }
        writeln!(
            f,
            "  memory: peak {} KiB; growth over the last third {} KiB (bound {} KiB); crashed: {}",
            self.rss_peak_kib, self.rss_growth_kib, self.rss_growth_bound_kib, self.crashed
        )?;
        let step = (self.rss.len() / 40).max(1);
        let samples: Vec<String> = self
            .rss
            .iter()
            .step_by(step)
            .map(|(t, kib)| format!("{t:.0}s:{kib}"))
            .collect();
        writeln!(f, "  RSS samples (s:KiB): {}", samples.join(" "))?;
        for p in &self.problems {
            writeln!(f, "  problem: {p}")?;
        }
        Ok(())
    }
}

// === policies ===

struct Backends {
    steady_a: SocketAddr,
    steady_b: SocketAddr,
    flaky: SocketAddr,
    slow: SocketAddr,
    limited: SocketAddr,
}

/// The valid policy of edit `i`: the steady host's weights and an extra route move;
/// every setting that carries state (breaker, rate limit) stays as it was.
fn policy(b: &Backends, i: u32) -> String {
    let a = 1 + (i * 37) % 98;
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: steady, namespace: reliability }}
spec:
  host: steady
  backends:
    steady-a: {{ addresses: ["{sa}"] }}
    steady-b: {{ addresses: ["{sb}"] }}
  routes:
    - name: edit-{i}
      match: {{ path: {{ prefix: /edit-{i} }} }}
      split:
        - backend: steady-b
    - name: main
      timeout: 30s
      split:
        - weights: {{ steady-a: {a}, steady-b: {b} }}
---
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: flaky, namespace: reliability }}
spec:
  host: flaky
  backends:
    flaky: {{ addresses: ["{flaky}"] }}
  routes:
    - name: main
      timeout: 30s
      circuitBreaker:
        consecutiveFailures: 3
        openFor: 500ms
        maxOpenFor: 2s
        halfOpenRequests: 1
        failureOn: [connect-failure, 5xx]
---
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: slow, namespace: reliability }}
spec:
  host: slow
  backends:
    slow: {{ addresses: ["{slow}"] }}
  routes:
    - name: main
      timeout: 4s
---
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: limited, namespace: reliability }}
spec:
  host: limited
  backends:
    limited: {{ addresses: ["{limited}"] }}
  routes:
    - name: main
      rateLimit: {{ perSecond: 20, burst: 10 }}
"#,
        sa = b.steady_a,
        sb = b.steady_b,
        b = 100 - a,
        flaky = b.flaky,
        slow = b.slow,
        limited = b.limited,
    )
}

/// Broken edit number `k`: each kind of mistake an operator makes.
fn broken_policy(b: &Backends, k: u32) -> (&'static str, String) {
    let good = policy(b, 10_000 + k);
    match k % 5 {
        0 => ("not YAML", "routes: [unclosed\n  - {".to_string()),
        1 => (
            "a split to a backend that does not exist",
            good.replace("- backend: steady-b", "- backend: steady-c"),
        ),
        2 => (
            "a duration that is not one",
            good.replace("timeout: 4s", "timeout: 4parsecs"),
        ),
        3 => {
            // Cut inside the first address: an unclosed flow sequence.
            let at = good.find("[\"").expect("an address list") + 5;
            ("a file cut short", good[..at].to_string())
        }
        _ => (
            "two policies for one host",
            good.replace("host: limited", "host: steady"),
        ),
    }
}

// === the run ===

/// Runs the suite once and reports what it saw.
pub async fn run(opts: SuiteOptions) -> Report {
    let started = Instant::now();
    let shared = Arc::new(Shared::default());
    let mut report = Report {
        rss_growth_bound_kib: opts.memory_growth_bound_kib,
        ..Report::default()
    };

    let steady_a = Upstream::auto("steady-a").await;
    let steady_b = Upstream::auto("steady-b").await;
    // Killed and started again on its port ([`crate::restartable_addr`]).
    let mut flaky = Upstream::start_on("flaky", Protocol::Auto, crate::restartable_addr()).await;
    let slow = Upstream::auto("slow").await;
    let limited = Upstream::auto("limited").await;
    let backends = Backends {
        steady_a: steady_a.addr(),
        steady_b: steady_b.addr(),
        flaky: flaky.addr(),
        slow: slow.addr(),
        limited: limited.addr(),
    };

    let proxy = Arc::new(
        ChildProxy::spawn(
            &opts.proxy_bin,
            &policy(&backends, 0),
            &["--log-level", "warn"],
        )
        .await,
    );
    let target = proxy.outbound_addr();
    report.proxy_open_files_limit = proxy.open_files_limit();
    report.inherited_open_files =
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    // The rate limit refuses by design from the first request to the last.
    shared.faults.open(Host::Limited, &["rate-limited"]);

    // Load.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = JoinSet::new();
    let plan: [(Host, usize, usize); 4] = [
        // host, HTTP/1.1 client loops, HTTP/2 client loops (one connection each)
        (Host::Steady, 6, 4),
        (Host::Flaky, 2, 2),
        (Host::Slow, 2, 2),
        (Host::Limited, 1, 1),
    ];
    for (host, h1, h2) in plan {
        for _ in 0..h1 {
            workers.spawn(client_loop(
                shared.clone(),
                target,
                host,
                false,
                opts.rate_per_loop,
                stop_rx.clone(),
            ));
        }
        for _ in 0..h2 {
            workers.spawn(client_loop(
                shared.clone(),
                target,
                host,
                true,
                opts.rate_per_loop,
                stop_rx.clone(),
            ));
        }
    }

    // Memory and liveness, sampled all along.
    let sampler = {
        let proxy = proxy.clone();
        let shared = shared.clone();
        let every = opts.sample_every;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut peak = 0;
            loop {
                match proxy.try_memory() {
                    Some(m) if proxy.is_alive() => {
                        samples.push((started.elapsed().as_secs_f64(), m.rss_kib));
                        peak = peak.max(m.hwm_kib);
                    }
                    _ => {
                        shared.crashed.store(true, Ordering::SeqCst);
                        break;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => break,
                }
            }
            (samples, peak)
        })
    };

    // Policy edits, spread over the first two thirds.
    let fault_phase = opts.duration * 2 / 3;
    let editor = {
        let proxy = proxy.clone();
        let shared = shared.clone();
        let edits = opts.edits;
        let texts: Vec<(Option<&'static str>, String)> = (1..=edits)
            .map(|i| {
                if i % 20 == 10 {
                    let (what, text) = broken_policy(&backends, i / 20);
                    (Some(what), text)
                } else {
                    (None, policy(&backends, i))
                }
            })
            .collect();
        let pause = fault_phase.mul_f64(0.8) / edits.max(1);
        tokio::spawn(async move { edit_policies(&proxy, &shared, texts, pause).await })
    };

    // Fault cycles until two thirds of the run have passed (at least one).
    loop {
        report.cycles += 1;
        if shared.crashed.load(Ordering::SeqCst) {
            break;
        }
        match hold_idle(&opts, &proxy, target).await {
            Ok(seen) => report.idle.push(seen),
            Err(e) => shared.problem(format!("idle connections: {e}")),
        }
        pause(Duration::from_secs(1)).await;
        flaky = kill_and_restart(flaky, target, &shared).await;
        pause(Duration::from_secs(1)).await;
        slow_then_hang(&slow, target, &shared).await;
        pause(Duration::from_secs(1)).await;
        for attack in malformed::attacks("steady") {
            let outcome = malformed::send(target, &attack).await;
            if !outcome.ok {
                shared.problem(format!(
                    "malformed input not refused: {}: {}",
                    outcome.name, outcome.seen
                ));
            }
            if !proxy.is_alive() {
                shared.crashed.store(true, Ordering::SeqCst);
                shared.problem(format!("the proxy died on: {}", outcome.name));
                report.malformed.push(outcome);
                break;
            }
            if let Err(e) = probe(target, Host::Steady).await {
                shared.problem(format!("after {}: steady host failed: {e}", outcome.name));
            }
            report.malformed.push(outcome);
        }
        if started.elapsed() >= fault_phase {
            break;
        }
    }
    match editor.await {
        Ok((applied, refused)) => {
            report.edits_applied = applied;
            report.edits_refused = refused;
        }
        Err(e) => shared.problem(format!("the policy editor failed: {e}")),
    }

    // The last third: load only; memory must settle.
    let steady_from = started.elapsed().as_secs_f64();
    let rest = opts.duration.saturating_sub(started.elapsed());
    pause(rest.max(opts.duration / 3)).await;

    let _ = stop_tx.send(true);
    while let Some(r) = workers.join_next().await {
        if let Err(e) = r {
            shared.problem(format!("a client loop failed: {e}"));
        }
    }
    let (samples, peak) = sampler.await.unwrap_or_default();
    report.rss_peak_kib = peak;
    report.rss_growth_kib = growth(&samples, steady_from);
    report.rss = samples;

    // Everything is healthy again at the end.
    if proxy.is_alive() {
        for host in HOSTS {
            // The rate limit may still refuse a probe; any other host must answer.
            if host != Host::Limited
                && let Err(e) = probe(target, host).await
            {
                shared.problem(format!("after the run, {host} failed: {e}"));
            }
        }
    } else {
        shared.crashed.store(true, Ordering::SeqCst);
    }
    report.crashed = shared.crashed.load(Ordering::SeqCst);
    if report.crashed {
        let log = proxy.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        shared.problem(format!(
            "the proxy process died; last log lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }

    for host in HOSTS {
        let c = shared.counts(host);
        report.hosts.push((
            host.name().to_string(),
            Counts {
                sent: c.sent.load(Ordering::Relaxed),
                ok: c.ok.load(Ordering::Relaxed),
                by_design: c.by_design.load(Ordering::Relaxed),
                unexpected: c.unexpected.load(Ordering::Relaxed),
            },
        ));
    }
    report.h2_sent = shared.h2_sent.load(Ordering::Relaxed);
    report.resent = shared.resent.load(Ordering::Relaxed);
    report.by_reason = shared.reasons.lock().expect("reasons lock").clone();
    report.problems = shared.examples.lock().expect("examples lock").clone();
    report.elapsed = started.elapsed();
    drop((steady_a, steady_b, flaky, slow, limited));
    report
}

/// Growth of resident memory over the samples taken after `from` seconds: the mean of
/// their second half minus the mean of their first half, in KiB.
fn growth(samples: &[(f64, u64)], from: f64) -> i64 {
    let tail: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= from)
        .map(|(_, kib)| *kib)
        .collect();
    if tail.len() < 4 {
        return 0;
    }
    let (first, second) = tail.split_at(tail.len() / 2);
    let mean = |s: &[u64]| s.iter().sum::<u64>() as i64 / s.len() as i64;
    mean(second) - mean(first)
}

/// The suite waits on the wall clock by design: it is a load run, not a unit test.
async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}

/// One GET to `host` on a fresh HTTP/1.1 connection; Ok when 200 from its upstream.
async fn probe(target: SocketAddr, host: Host) -> Result<(), String> {
    let call = async {
        let mut conn = HttpConn::h1(target).await.map_err(|e| e.to_string())?;
        let r = conn
            .get(host.name(), "/")
            .await
            .map_err(|e| e.to_string())?;
        if r.status == StatusCode::OK && host.answers_from(r.header("x-upstream")) {
            Ok(())
        } else {
            Err(format!(
                "{} {} from {:?}",
                r.status,
                r.header("x-sluice-reason"),
                r.header("x-upstream")
            ))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()))
}

/// A new client connection to `target`, over HTTP/2 or HTTP/1.1.
async fn connect(target: SocketAddr, h2: bool) -> Result<HttpConn, crate::BoxError> {
    if h2 {
        HttpConn::h2(target).await
    } else {
        HttpConn::h1(target).await
    }
}

/// One client: a keep-alive connection sending GETs to `host` until told to stop.
async fn client_loop(
    shared: Arc<Shared>,
    target: SocketAddr,
    host: Host,
    h2: bool,
    rate: u32,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = (rate > 0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs(1) / rate);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut conn: Option<HttpConn> = None;
    let mut n = 0u64;
    while !*stop.borrow() {
        if let Some(t) = tick.as_mut() {
            tokio::select! {
                _ = t.tick() => {}
                _ = stop.changed() => break,
            }
        }
        if conn.is_none() {
            match connect(target, h2).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    shared.unexpected(host, format!("{host}: cannot connect: {e}"));
                    pause(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected");
        n += 1;
        let path = format!("/r/{n}");
        let counts = shared.counts(host);
        counts.sent.fetch_add(1, Ordering::Relaxed);
        if h2 {
            shared.h2_sent.fetch_add(1, Ordering::Relaxed);
        }
        let sent = Instant::now();
        let mut result =
            tokio::time::timeout(Duration::from_secs(15), c.get(host.name(), &path)).await;
        // A connection that did not take the request (closed or going away between two
        // requests) is replaced and the request sent on the new one, as a pooled client
        // does; a failure there counts.
        if matches!(&result, Ok(Err(e)) if e.is::<Unsent>()) {
            shared.resent.fetch_add(1, Ordering::Relaxed);
            result = match connect(target, h2).await {
                Ok(fresh) => {
                    let c = conn.insert(fresh);
                    tokio::time::timeout(Duration::from_secs(15), c.get(host.name(), &path)).await
                }
                Err(e) => Ok(Err(e)),
            };
        }
        let received = Instant::now();
        let proto = if h2 { "HTTP/2" } else { "HTTP/1.1" };
        match result {
            Ok(Ok(r))
                if r.status == StatusCode::OK && host.answers_from(r.header("x-upstream")) =>
            {
                counts.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(r))
                if matches!(r.status.as_u16(), 429 | 502 | 503 | 504)
                    && shared.faults.explains(
                        host,
                        r.header("x-sluice-reason"),
                        sent,
                        received,
                    ) =>
            {
                counts.by_design.fetch_add(1, Ordering::Relaxed);
                *shared
                    .reasons
                    .lock()
                    .expect("reasons lock")
                    .entry(format!(
                        "{} {}",
                        r.status.as_u16(),
                        r.header("x-sluice-reason")
                    ))
                    .or_default() += 1;
            }
            Ok(Ok(r)) => shared.unexpected(
                host,
                format!(
                    "{host} over {proto}: {} reason {:?} from {:?} after {:?}: {}",
                    r.status,
                    r.header("x-sluice-reason"),
                    r.header("x-upstream"),
                    received - sent,
                    r.text().trim()
                ),
            ),
            Ok(Err(e)) => {
                shared.unexpected(host, format!("{host} over {proto}: connection failed: {e}"));
                conn = None;
            }
            Err(_) => {
                shared.unexpected(host, format!("{host} over {proto}: no answer within 15 s"));
                conn = None;
            }
        }
    }
}

/// Rewrites the policy file, one edit after another: a valid edit must be applied
/// (the version changes), a broken one refused (the rejection counter moves, the
/// version stays). Returns (applied, refused).
async fn edit_policies(
    proxy: &ChildProxy,
    shared: &Shared,
    texts: Vec<(Option<&'static str>, String)>,
    every: Duration,
) -> (u32, u32) {
    let path = proxy.dir().join("policy.yaml");
    let (mut applied, mut refused) = (0, 0);
    for (i, (broken, text)) in texts.into_iter().enumerate() {
        pause(every).await;
        if shared.crashed.load(Ordering::SeqCst) {
            break;
        }
        let before = config_version(proxy).await;
        let rejected_before = rejected_reloads(proxy).await;
        crate::proxy::write_atomically(&path, &text);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now_version = config_version(proxy).await;
            match broken {
                None if now_version != before => {
                    applied += 1;
                    break;
                }
                Some(_) if rejected_reloads(proxy).await > rejected_before => {
                    if now_version == before {
                        refused += 1;
                    } else {
                        shared.problem(format!("edit {i}: a broken policy was applied"));
                    }
                    break;
                }
                _ => {}
            }
            if Instant::now() > deadline {
                shared.problem(match broken {
                    None => format!("edit {i}: a valid policy was not applied within 20 s"),
                    Some(what) => {
                        format!("edit {i}: a broken policy ({what}) was not refused within 20 s")
                    }
                });
                break;
            }
            pause(Duration::from_millis(20)).await;
        }
    }
    (applied, refused)
}

async fn config_version(proxy: &ChildProxy) -> Option<String> {
    let (status, body) = proxy.admin_send(Method::GET, "/config", "").await;
    if status != StatusCode::OK {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v.get("version")?.as_str().map(str::to_owned)
}

async fn rejected_reloads(proxy: &ChildProxy) -> u64 {
    let (_, text) = proxy.admin_send(Method::GET, "/metrics", "").await;
    text.lines()
        .filter(|l| l.starts_with("sluice_policy_reloads_total") && l.contains("rejected"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Kills the flaky upstream, keeps it down a while, brings it back on its address
/// and waits until the proxy reaches it again; connection failures and an open
/// breaker are failures by design meanwhile.
async fn kill_and_restart(up: Upstream, target: SocketAddr, shared: &Shared) -> Upstream {
    let addr = up.addr();
    let window = shared.faults.open(
        Host::Flaky,
        &[
            "upstream-unavailable",
            "breaker-open",
            "no-healthy-endpoint",
        ],
    );
    up.shutdown().await;
    pause(Duration::from_secs(3)).await;
    let up = Upstream::start_on("flaky", Protocol::Auto, addr).await;
    // Back once a run of requests gets through (the breaker's probe closes it).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut in_a_row = 0;
    while in_a_row < 5 && Instant::now() < deadline {
        if probe(target, Host::Flaky).await.is_ok() {
            in_a_row += 1;
        } else {
            in_a_row = 0;
            pause(Duration::from_millis(100)).await;
        }
    }
    if in_a_row < 5 {
        shared.problem("the flaky upstream was not reachable within 30 s of its restart".into());
    }
    pause(Duration::from_millis(500)).await;
    shared.faults.close(window);
    up
}

/// Makes the slow upstream answer after 5 s, then not at all, against a 4 s route
/// timeout (far above any latency a loaded machine adds): 504 `timeout` is the answer by design meanwhile.
async fn slow_then_hang(up: &Upstream, target: SocketAddr, shared: &Shared) {
    let window = shared.faults.open(Host::Slow, &["timeout"]);
    up.set_stall(Stall::Delay(Duration::from_secs(5)));
    pause(Duration::from_secs(6)).await;
    up.set_stall(Stall::Hang);
    pause(Duration::from_secs(6)).await;
    up.set_stall(Stall::None);
    let deadline = Instant::now() + Duration::from_secs(15);
    while probe(target, Host::Slow).await.is_err() && Instant::now() < deadline {
        pause(Duration::from_millis(100)).await;
    }
    // Requests that the upstream held past the timeout were cut at 4 s.
    pause(Duration::from_millis(4500)).await;
    shared.faults.close(window);
}

/// Opens `idle_connections` connections from a separate process, holds them, and
/// returns (opened, descriptors the proxy had open meanwhile).
async fn hold_idle(
    opts: &SuiteOptions,
    proxy: &ChildProxy,
    target: SocketAddr,
) -> Result<(usize, usize), String> {
    let mut child = Command::new(&opts.holder_bin)
        .args(["hold-idle", "--target", &target.to_string()])
        .args(["--count", &opts.idle_connections.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start {}: {e}", opts.holder_bin.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The holder opens a batch, then waits until the proxy has accepted it: a listen
    // backlog overrun would leave connections the client thinks open and the proxy
    // never saw.
    let (mut opened, mut failed, mut fds) = (0usize, 0usize, 0usize);
    loop {
        let line = tokio::time::timeout(Duration::from_secs(60), line_rx.recv())
            .await
            .map_err(|_| "the holder said nothing for 60 s".to_string())?
            .ok_or("the holder exited before it was done")?;
        if line == "done" {
            break;
        }
        // "opened N failed M"
        let nums: Vec<usize> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        match nums.as_slice() {
            [o, f] => (opened, failed) = (*o, *f),
            _ => return Err(format!("the holder said {line:?}")),
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            fds = fds.max(proxy.open_fds().unwrap_or(0));
            if fds >= opened {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the proxy had {fds} descriptors open 30 s after {opened} connections were made"
                ));
            }
            pause(Duration::from_millis(20)).await;
        }
        writeln!(stdin, "more").map_err(|e| format!("tell the holder: {e}"))?;
    }
    pause(opts.idle_hold).await;
    fds = fds.max(proxy.open_fds().unwrap_or(0));
    drop(stdin); // tells the holder to close them
    let last = tokio::time::timeout(Duration::from_secs(60), line_rx.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    if failed > 0 || opened < opts.idle_connections {
        return Err(format!(
            "opened {opened} of {} ({failed} failed); {last}",
            opts.idle_connections
        ));
    }
    if fds < opened {
        return Err(format!(
            "the proxy had {fds} descriptors open while {opened} connections were held; holder: {last}"
        ));
    }
    Ok((opened, fds))
}

// === the holder process ===

/// Raises this process's soft open-files limit to its hard limit; returns the limit.
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Rlimit { maximum, .. } = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: maximum,
            maximum,
        },
    );
    getrlimit(Resource::Nofile).current
}

/// Sets this process's soft open-files limit to `soft` (at most the hard limit), so
/// that children it starts (the proxy) inherit a low limit they must raise themselves.
pub fn lower_open_files_limit(soft: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Rlimit { maximum, .. } = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(maximum.map_or(soft, |m| m.min(soft))),
            maximum,
        },
    );
}

/// The holder: opens `count` connections to `target` in batches and sends nothing on
/// them. After each batch it prints `opened N failed M` and waits for a line on its
/// standard input before the next; then it prints `done`, holds them all until its
/// standard input closes, and prints how many are still open (`open K`).
pub async fn hold_idle_connections(target: SocketAddr, count: usize) -> std::io::Result<()> {
    let limit = raise_open_files_limit().unwrap_or(u64::MAX);
    if limit < count as u64 + 64 {
        return Err(std::io::Error::other(format!(
            "the open-files limit is {limit}; {count} connections need more (raise the hard limit: ulimit -Hn)"
        )));
    }
    let mut streams = Vec::with_capacity(count);
    let mut failed = 0usize;
    // Standard input is read on a thread of its own; its lines arrive here.
    let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            if line.is_err() || line_tx.send(()).is_err() {
                break;
            }
        }
    });
    let mut stdin_open = true;
    while streams.len() + failed < count && stdin_open {
        // Within even a small listen backlog (128).
        let batch = (count - streams.len() - failed).min(100);
        let mut pending = JoinSet::new();
        for _ in 0..batch {
            pending.spawn(tokio::net::TcpStream::connect(target));
        }
        while let Some(r) = pending.join_next().await {
            match r {
                Ok(Ok(s)) => streams.push(s),
                _ => failed += 1,
            }
        }
        say(&format!("opened {} failed {failed}", streams.len()))?;
        stdin_open = lines.recv().await.is_some();
    }
    say("done")?;
    while stdin_open && lines.recv().await.is_some() {}
    let mut buf = [0u8; 1];
    let open = streams
        .iter()
        .filter(|s| {
            matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    say(&format!("open {open}"))
}

fn say(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}
