use std::time::{Duration, Instant};

use indexmap::IndexMap;
use sluice_config::{Rollout, RolloutBaseline, RolloutSlo};

use super::*;

const S: Duration = Duration::from_secs(1);

/// A fake clock: a fixed origin and an offset moved by hand.
struct Clock {
    origin: Instant,
    offset: Duration,
}

impl Clock {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            offset: Duration::ZERO,
        }
    }
    fn now(&self) -> Now {
        Now {
            at: self.origin + self.offset,
            unix_ms: 1_700_000_000_000 + self.offset.as_millis() as u64,
        }
    }
    fn advance(&mut self, d: Duration) -> Now {
        self.offset += d;
        self.now()
    }
}

fn spec(steps: &[u32], min_requests: u32) -> Spec {
    Spec {
        rollout: Rollout {
            canary: "v2".into(),
            steps: steps.to_vec(),
            interval: Some(sluice_config::Duration::from_secs(10)),
            min_requests: Some(min_requests),
            slo: Some(RolloutSlo {
                error_rate: Some(0.01),
                p99: Some(sluice_config::Duration::from_millis(150)),
            }),
            baseline: None,
            on_inconclusive: None,
            deadline: None,
        },
        file_weights: IndexMap::from([("v1".to_string(), 100), ("v2".to_string(), 0)]),
    }
}

const BOUNDS: [f64; 4] = [0.01, 0.1, 0.25, 0.5];

/// `n` requests, `failures` of them failed, all in the bucket of `secs`.
fn window(n: u64, failures: u64, secs: f64) -> Window {
    let mut durations = vec![0; BOUNDS.len() + 1];
    let i = BOUNDS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(BOUNDS.len());
    durations[i] = n;
    Window {
        requests: n,
        failures,
        durations,
    }
}

/// A rollout of `sp` started at `c`'s time and acked there by every proxy.
fn acked(sp: &Spec, c: &Clock) -> RolloutState {
    let mut s = RolloutState::start("k".into(), sp, c.now());
    s.on_acks(c.now(), &all_acked());
    s
}

/// A fresh rollout of `sp` acked now, told of `canary` (nothing of the others) and
/// judged one interval later: the state and its transition.
fn judged(sp: &Spec, c: &mut Clock, canary: &Window) -> (RolloutState, Transition) {
    let mut s = acked(sp, c);
    s.on_report(sp, c.now(), canary, &Window::default(), &BOUNDS);
    let t = s.on_tick(sp, c.advance(10 * S)).expect("judged");
    (s, t)
}

fn all_acked() -> Vec<ProxyAck> {
    ["a", "b"]
        .iter()
        .map(|n| ProxyAck {
            node: (*n).into(),
            conn: String::new(),
            connected_at_ms: 0,
            acked: true,
            nacked: false,
        })
        .collect()
}

fn results(s: &RolloutState) -> Vec<String> {
    s.history().iter().map(|t| t.result.clone()).collect()
}

#[test]
fn weights_share_the_rest_in_file_proportions_and_keep_file_order() {
    let s = spec(&[5, 100], 1);
    assert_eq!(
        s.weights_at(5),
        IndexMap::from([("v1".into(), 95), ("v2".into(), 5)])
    );
    let mut three = s.clone();
    three.file_weights = IndexMap::from([
        ("a".to_string(), 60),
        ("v2".to_string(), 10),
        ("b".to_string(), 30),
    ]);
    let w = three.weights_at(25);
    assert_eq!(w.keys().collect::<Vec<_>>(), ["a", "v2", "b"]);
    assert_eq!(w.values().copied().collect::<Vec<_>>(), [50, 25, 25]);
    // Remainders go to the largest fractions; the total is always 100.
    three.file_weights = IndexMap::from([
        ("a".to_string(), 1),
        ("b".to_string(), 1),
        ("c".to_string(), 1),
        ("v2".to_string(), 0),
    ]);
    let w = three.weights_at(0);
    assert_eq!(w.values().sum::<u32>(), 100);
    assert_eq!(three.weights_at(100).values().sum::<u32>(), 100);
}

#[test]
fn the_block_key_changes_with_the_block_only() {
    let a = spec(&[5, 100], 100);
    let mut b = a.clone();
    b.file_weights.insert("v1".into(), 90);
    assert_eq!(block_key(&a.rollout), block_key(&b.rollout));
    b.rollout.interval = Some(sluice_config::Duration::from_secs(11));
    assert_ne!(block_key(&a.rollout), block_key(&b.rollout));
    let mut c = a.clone();
    c.rollout.canary = "v3".into();
    assert_ne!(block_key(&a.rollout), block_key(&c.rollout));
}

#[test]
fn wilson_bounds_at_the_edges() {
    assert_eq!(wilson(0, 0, Z99), (0.0, 1.0));
    let (lo, hi) = wilson(0, 100, Z99);
    assert_eq!(lo, 0.0);
    assert!(hi > 0.0 && hi < 0.06, "{hi}");
    // n failures out of n: the lower bound is n / (n + z²).
    let (lo, hi) = wilson(3, 3, Z99);
    assert!((lo - 3.0 / (3.0 + Z99 * Z99)).abs() < 1e-12, "{lo}");
    assert!((hi - 1.0).abs() < 1e-12);
    let (lo, hi) = wilson(50, 100, Z99);
    assert!(lo < 0.5 && hi > 0.5 && (0.5 - lo - (hi - 0.5)).abs() < 1e-12);
}

#[test]
fn steps_advance_after_a_conclusive_interval_from_all_acked_and_end_promoted() {
    let sp = spec(&[10, 50, 100], 100);
    let mut c = Clock::new();
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    assert_eq!(s.canary_weight(&sp), 10);
    // Not acked yet: the interval has not started, whatever the time.
    c.advance(20 * S);
    assert_eq!(
        s.on_report(
            &sp,
            c.now(),
            &window(500, 0, 0.005),
            &window(5000, 0, 0.005),
            &BOUNDS
        ),
        None
    );
    assert_eq!(s.on_tick(&sp, c.now()), None);
    assert_eq!(s.step(), 0);
    s.on_acks(c.now(), &all_acked());
    // Reports before the ack do not count in the window.
    assert_eq!(s.current_window(&sp).canary_requests, 0);
    for weight in [50, 100] {
        s.on_report(
            &sp,
            c.now(),
            &window(150, 0, 0.005),
            &window(900, 0, 0.005),
            &BOUNDS,
        );
        assert_eq!(
            s.on_tick(&sp, c.advance(9 * S)),
            None,
            "the interval is not over"
        );
        let t = s.on_tick(&sp, c.advance(S)).expect("judged");
        assert_eq!((t.result.as_str(), t.canary_weight), ("advanced", weight));
        assert_eq!(s.last_window().unwrap().decision, "pass");
        s.on_acks(c.now(), &all_acked());
    }
    s.on_report(
        &sp,
        c.now(),
        &window(1000, 0, 0.005),
        &Window::default(),
        &BOUNDS,
    );
    let t = s.on_tick(&sp, c.advance(10 * S)).unwrap();
    assert_eq!(t.result, "promoted");
    assert_eq!(s.phase(), Phase::Promoted);
    assert_eq!(
        s.weights(&sp),
        IndexMap::from([("v1".into(), 0), ("v2".into(), 100)])
    );
    assert_eq!(results(&s), ["started", "advanced", "advanced", "promoted"]);
}

#[test]
fn a_proxy_that_never_acks_is_left_out_after_the_grace() {
    let sp = spec(&[10, 100], 10);
    let mut c = Clock::new();
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    let mut proxies = all_acked();
    proxies[1].acked = false;
    s.on_acks(c.advance(29 * S), &proxies);
    assert_eq!(s.acked_at(), None, "still within the grace");
    s.on_acks(c.advance(S), &proxies);
    assert_eq!(s.acked_at(), Some(c.now().at));
    assert_eq!(s.left_out(), ["b"]);
    assert_eq!(s.left_out_why()[0].why, LeftOutWhy::Silent);
}

/// A hung proxy is dropped by the gRPC keepalive at about the moment the grace
/// ends: whichever comes first, it is named, and with why.
#[test]
fn a_proxy_the_step_waited_for_that_disconnects_is_named_whenever_it_goes() {
    let sp = spec(&[10, 100], 10);
    for goes_after in [S, 29 * S, 30 * S] {
        let mut c = Clock::new();
        let mut s = RolloutState::start("k".into(), &sp, c.now());
        let mut proxies = all_acked();
        proxies[1].acked = false;
        s.on_acks(c.advance(S), &proxies);
        assert_eq!(s.awaited(), ["b"]);
        // The others acked, and "b" is gone from the connected list.
        s.on_acks(c.advance(goes_after - S), &proxies[..1]);
        assert_eq!(s.acked_at(), Some(c.now().at), "gone after {goes_after:?}");
        assert_eq!(
            s.left_out_why(),
            [LeftOut {
                node: "b".into(),
                why: LeftOutWhy::Disconnected
            }]
        );
        assert!(s.awaited().is_empty(), "nothing is awaited once acked");
    }
}

/// A stream that closed without acking, told before any look at the acks saw it
/// waiting: named if the step waited for it (connected when the weights were set, or
/// sent them), with its NACK as the reason when it refused them; not if it went
/// before the step or came after and was never sent the weights.
#[test]
fn a_proxy_gone_between_two_looks_is_named_as_the_step_saw_it() {
    let sp = spec(&[10, 100], 10);
    let mut c = Clock::new();
    let gone = |node, connected_at_ms, gone_at_ms, sent, nacked| Departed {
        node,
        conn: "",
        connected_at_ms,
        gone_at_ms,
        sent,
        nacked,
    };
    let mut s = RolloutState::start("k".into(), &sp, c.advance(S));
    let began = c.now().unix_ms;
    // "w" was seen waiting, then refused the weights and went before the next look.
    let mut proxies = all_acked();
    proxies[0].node = "w".into();
    proxies[0].acked = false;
    s.on_acks(c.advance(S), &proxies);
    assert_eq!(s.awaited(), ["w"]);
    let now = c.advance(S).unix_ms;
    s.on_departed(gone("w", 0, now, true, true));
    // Never seen: one connected before the step, one that came after and was sent
    // the weights, both gone now; one gone before the step; one that came after
    // and went before it was sent anything.
    s.on_departed(gone("old", 0, now, false, false));
    s.on_departed(gone("new", began + 1, now, true, false));
    s.on_departed(gone("before", 0, began - 1, false, false));
    s.on_departed(gone("unsent", began + 1, now, false, false));
    assert!(s.awaited().is_empty(), "none of them is connected");
    s.on_acks(c.now(), &proxies[1..]);
    assert!(s.acked_at().is_some());
    assert_eq!(
        s.left_out_why(),
        [
            LeftOut {
                node: "new".into(),
                why: LeftOutWhy::Disconnected
            },
            LeftOut {
                node: "old".into(),
                why: LeftOutWhy::Disconnected
            },
            LeftOut {
                node: "w".into(),
                why: LeftOutWhy::Nacked
            },
        ]
    );
}

/// Only a proxy the step saw waiting is named: one that acked and then went, or
/// went and came back to ack, is not; a disconnected one keeps the step waiting for
/// no one, and a NACK stays the reason after the proxy is gone.
#[test]
fn only_proxies_that_went_without_acking_are_named() {
    let sp = spec(&[10, 100], 10);
    let c = Clock::new();
    let ack = |node: &str, acked: bool, nacked: bool| ProxyAck {
        node: node.into(),
        conn: String::new(),
        connected_at_ms: 0,
        acked,
        nacked,
    };

    // "a" acks then goes; "b" goes and comes back, then acks.
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    s.on_acks(c.now(), &[ack("a", true, false), ack("b", false, false)]);
    s.on_acks(c.now(), &[ack("c", false, false)]);
    assert_eq!(s.acked_at(), None, "c is awaited");
    assert_eq!(s.awaited(), ["c"], "b went: the step does not wait for it");
    s.on_acks(c.now(), &[ack("b", true, false), ack("c", true, false)]);
    assert!(s.acked_at().is_some());
    assert!(s.left_out().is_empty(), "{:?}", s.left_out_why());

    // "n" refused the weights, then went while "a" was still pending.
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    s.on_acks(c.now(), &[ack("a", false, false), ack("n", false, true)]);
    assert_eq!(s.acked_at(), None);
    s.on_acks(c.now(), &[ack("a", true, false)]);
    assert_eq!(
        s.left_out_why(),
        [LeftOut {
            node: "n".into(),
            why: LeftOutWhy::Nacked
        }]
    );

    // A new step forgets who the last one waited for.
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    s.on_acks(c.now(), &[ack("a", false, false)]);
    s.command(&sp, c.now(), Command::Abort).unwrap();
    s.on_acks(c.now(), &[]);
    assert!(s.acked_at().is_some());
    assert!(s.left_out().is_empty());
}

/// Streams sharing a node id are waited for apart: one going without acking is named
/// though its twin acked, while a proxy that comes back on a new stream and acks is
/// not.
#[test]
fn streams_sharing_a_node_id_are_waited_for_apart() {
    let sp = spec(&[10, 100], 10);
    let mut c = Clock::new();
    let ack = |conn: &str, connected_at_ms: u64, acked: bool| ProxyAck {
        node: "twin".into(),
        conn: conn.into(),
        connected_at_ms,
        acked,
        nacked: false,
    };
    let before = c.now().unix_ms - 60_000;

    // One acks, the other (same id, there all along) waits, then goes.
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    s.on_acks(
        c.now(),
        &[ack("#1", before, true), ack("#2", before, false)],
    );
    assert_eq!(s.acked_at(), None, "its twin's ack is not its own");
    assert_eq!(s.awaited(), ["twin"]);
    c.advance(Duration::from_secs(1));
    s.on_acks(c.now(), &[ack("#1", before, true)]);
    assert!(s.acked_at().is_some());
    assert_eq!(
        s.left_out_why(),
        [LeftOut {
            node: "twin".into(),
            why: LeftOutWhy::Disconnected
        }]
    );

    // One proxy seen waiting reconnects on a new stream and acks there.
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    s.on_acks(c.now(), &[ack("#3", before, false)]);
    let back = c.advance(Duration::from_secs(1)).unix_ms;
    s.on_acks(c.now(), &[ack("#4", back, true)]);
    assert!(s.acked_at().is_some());
    assert!(s.left_out().is_empty(), "{:?}", s.left_out_why());

    // Both twins go before acking: named once.
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    s.on_acks(
        c.now(),
        &[ack("#5", before, false), ack("#6", before, false)],
    );
    c.advance(Duration::from_secs(1));
    s.on_acks(c.now(), &[]);
    assert_eq!(s.left_out(), ["twin"]);
}

#[test]
fn a_proxy_that_nacks_is_left_out_at_once() {
    let sp = spec(&[10, 100], 10);
    let c = Clock::new();
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    let mut proxies = all_acked();
    proxies[0].acked = false;
    proxies[0].nacked = true;
    s.on_acks(c.now(), &proxies);
    assert!(s.acked_at().is_some());
    assert_eq!(s.left_out(), ["a"]);
}

/// A check is judged only on a window holding `minRequests` canary requests
/// (DESIGN): with none it says there were none, with too few it says how many, and
/// never "pass" either way; with enough, it passes.
#[test]
fn checks_are_not_judged_without_enough_canary_requests() {
    let mut sp = spec(&[10, 100], 20);
    sp.rollout.baseline = Some(RolloutBaseline {
        error_rate_increase: Some(0.02),
        p99_ratio: None,
    });
    let mut c = Clock::new();
    let mut s = acked(&sp, &c);
    let check = |w: &WindowView, name: &str| {
        let ch = w.checks.iter().find(|ch| ch.name == name).unwrap().clone();
        (ch.verdict, ch.samples, ch.note.unwrap_or_default())
    };

    // No canary request at all: the open window, then the judged (inconclusive) one.
    s.on_report(
        &sp,
        c.now(),
        &Window::default(),
        &window(50, 0, 0.005),
        &BOUNDS,
    );
    let open = s.current_window(&sp);
    let none = (
        "not-judged".to_string(),
        0,
        "no canary requests".to_string(),
    );
    assert_eq!(check(&open, "errorRate"), none);
    assert_eq!(check(&open, "errorRateIncrease"), none);
    s.on_tick(&sp, c.advance(10 * S)).unwrap();
    let judged = s.last_window().unwrap();
    assert_eq!(judged.decision, "inconclusive");
    assert_eq!(check(judged, "errorRate"), none);
    assert_eq!(check(judged, "p99").0, "not-judged");

    // Too few: values shown, not judged.
    s.on_report(
        &sp,
        c.now(),
        &window(5, 0, 0.005),
        &window(50, 0, 0.005),
        &BOUNDS,
    );
    let open = s.current_window(&sp);
    let few = (
        "not-judged".to_string(),
        5,
        "5 of 20 canary requests".to_string(),
    );
    assert_eq!(check(&open, "errorRate"), few);
    assert_eq!(check(&open, "p99"), few);
    assert_eq!(
        open.checks
            .iter()
            .find(|ch| ch.name == "errorRate")
            .unwrap()
            .value,
        Some(0.0)
    );

    // Enough (the window adds up): judged.
    s.on_report(
        &sp,
        c.now(),
        &window(20, 0, 0.005),
        &window(50, 0, 0.005),
        &BOUNDS,
    );
    s.on_tick(&sp, c.advance(10 * S)).unwrap();
    let judged = s.last_window().unwrap();
    assert_eq!(judged.decision, "pass", "{judged:?}");
    assert_eq!(
        check(judged, "errorRate"),
        ("pass".to_string(), 25, String::new())
    );
}

#[test]
fn inconclusive_windows_accumulate_and_hold_never_rolls_back() {
    let mut sp = spec(&[10, 100], 100);
    sp.rollout.deadline = Some(sluice_config::Duration::from_secs(15));
    let mut c = Clock::new();
    let mut s = acked(&sp, &c);
    for _ in 0..3 {
        s.on_report(
            &sp,
            c.now(),
            &window(30, 0, 0.005),
            &window(300, 0, 0.005),
            &BOUNDS,
        );
        let t = s.on_tick(&sp, c.advance(10 * S)).unwrap();
        assert_eq!(t.result, "inconclusive");
        assert_eq!(s.phase(), Phase::Progressing, "hold: past the deadline too");
    }
    assert_eq!(s.last_window().unwrap().canary_requests, 90);
    s.on_report(
        &sp,
        c.now(),
        &window(30, 0, 0.005),
        &window(300, 0, 0.005),
        &BOUNDS,
    );
    // Enough now, but judged at the end of the running interval.
    assert_eq!(s.on_tick(&sp, c.now()), None);
    let t = s.on_tick(&sp, c.advance(10 * S)).unwrap();
    assert_eq!(t.result, "advanced");
    assert_eq!(s.last_window().unwrap().canary_requests, 120);
    assert_eq!(
        results(&s),
        [
            "started",
            "inconclusive",
            "inconclusive",
            "inconclusive",
            "advanced"
        ]
    );
}

#[test]
fn inconclusive_past_the_deadline_rolls_back_when_asked_to() {
    let mut sp = spec(&[10, 100], 100);
    sp.rollout.on_inconclusive = Some(OnInconclusive::Rollback);
    sp.rollout.deadline = Some(sluice_config::Duration::from_secs(25));
    let mut c = Clock::new();
    let mut s = acked(&sp, &c);
    assert_eq!(
        s.on_tick(&sp, c.advance(10 * S)).unwrap().result,
        "inconclusive"
    );
    assert_eq!(
        s.on_tick(&sp, c.advance(10 * S)).unwrap().result,
        "inconclusive"
    );
    assert_eq!(
        s.on_tick(&sp, c.advance(10 * S)).unwrap().result,
        "inconclusive"
    );
    let t = s.on_tick(&sp, c.advance(10 * S)).unwrap();
    assert_eq!(t.result, "rolled-back");
    assert!(t.reason.contains("deadline"), "{}", t.reason);
    assert_eq!(s.canary_weight(&sp), 0);
}

#[test]
fn a_gross_breach_rolls_back_at_the_report_that_shows_it() {
    let sp = spec(&[5, 100], 100);
    let c = Clock::new();
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    // Two failures in two requests are not enough evidence.
    assert_eq!(
        s.on_report(
            &sp,
            c.now(),
            &window(2, 2, 0.005),
            &Window::default(),
            &BOUNDS
        ),
        None
    );
    // Not acked, far below minRequests, long before the interval: still rolled back.
    let t = s
        .on_report(
            &sp,
            c.now(),
            &window(18, 8, 0.005),
            &window(400, 0, 0.005),
            &BOUNDS,
        )
        .unwrap();
    assert_eq!(t.result, "rolled-back");
    assert!(t.reason.contains("gross"), "{}", t.reason);
    let w = s.last_window().unwrap();
    assert!(
        w.checks
            .iter()
            .any(|c| c.name == "grossErrorRate" && c.verdict == "breach")
    );
    assert_eq!(
        s.weights(&sp),
        IndexMap::from([("v1".into(), 100), ("v2".into(), 0)])
    );
}

#[test]
fn a_breach_must_be_significant() {
    let sp = spec(&[10, 100], 100);
    let mut c = Clock::new();
    // 2 % errors in 100 requests against a 1 % SLO: not significant.
    assert_eq!(
        judged(&sp, &mut c, &window(100, 2, 0.005)).1.result,
        "advanced"
    );
    // 6 % in 100: significant (and not gross).
    let mut s = acked(&sp, &c);
    assert_eq!(
        s.on_report(
            &sp,
            c.now(),
            &window(100, 6, 0.005),
            &Window::default(),
            &BOUNDS
        ),
        None
    );
    let t = s.on_tick(&sp, c.advance(10 * S)).unwrap();
    assert_eq!(t.result, "rolled-back");
    assert!(t.reason.contains("errorRate"), "{}", t.reason);
}

/// `errorRate: 0` (the validator accepts it) asks for no failures at all: a clean
/// window passes, and one failure in it is a breach however many requests passed.
#[test]
fn an_slo_of_zero_errors_passes_a_clean_window_and_breaches_on_one_failure() {
    let mut sp = spec(&[10, 100], 100);
    sp.rollout.slo = Some(RolloutSlo {
        error_rate: Some(0.0),
        p99: None,
    });
    let mut c = Clock::new();
    assert_eq!(
        judged(&sp, &mut c, &window(100, 0, 0.005)).1.result,
        "advanced"
    );
    let (_, t) = judged(&sp, &mut c, &window(1000, 1, 0.005));
    assert_eq!(t.result, "rolled-back");
    assert!(t.reason.contains("errorRate"), "{}", t.reason);
}

/// The fleet moved to a build with other duration buckets: what was timed under the
/// old bounds cannot be read by the new, so it is dropped, not misread; the request
/// counts stay.
#[test]
fn durations_under_other_bounds_start_afresh_and_the_counts_stay() {
    let sp = spec(&[10, 100], 100);
    let mut c = Clock::new();
    let mut s = acked(&sp, &c);
    s.on_report(
        &sp,
        c.now(),
        &window(120, 0, 0.3),
        &Window::default(),
        &BOUNDS,
    );
    let other = [0.005, 0.05, 0.5];
    let fast = Window {
        requests: 120,
        failures: 0,
        durations: vec![120, 0, 0, 0],
    };
    s.on_report(&sp, c.now(), &fast, &Window::default(), &other);
    let t = s.on_tick(&sp, c.advance(10 * S)).unwrap();
    assert_eq!(t.result, "advanced", "{t:?}");
    let w = s.last_window().unwrap();
    assert_eq!(w.canary_requests, 240);
    let p99 = w.checks.iter().find(|c| c.name == "p99").unwrap();
    assert_eq!((p99.samples, p99.value), (120, Some(0.005)));
}

#[test]
fn a_slow_canary_breaches_p99() {
    let sp = spec(&[10, 100], 100);
    let mut c = Clock::new();
    let mut s = acked(&sp, &c);
    s.on_report(
        &sp,
        c.now(),
        &window(120, 0, 0.3),
        &window(1000, 0, 0.005),
        &BOUNDS,
    );
    let t = s.on_tick(&sp, c.advance(10 * S)).unwrap();
    assert_eq!(t.result, "rolled-back");
    let p99 = s
        .last_window()
        .unwrap()
        .checks
        .iter()
        .find(|c| c.name == "p99")
        .unwrap()
        .clone();
    assert_eq!((p99.verdict.as_str(), p99.value), ("breach", Some(0.5)));
}

#[test]
fn the_baseline_is_the_other_backends_over_the_same_window() {
    let mut sp = spec(&[10, 100], 100);
    sp.rollout.slo = None;
    sp.rollout.baseline = Some(RolloutBaseline {
        error_rate_increase: Some(0.02),
        p99_ratio: Some(1.5),
    });
    let mut c = Clock::new();
    let judge = |sp: &Spec, c: &mut Clock, canary: Window, others: Window| {
        let mut s = RolloutState::start("k".into(), sp, c.now());
        s.on_acks(c.now(), &all_acked());
        s.on_report(sp, c.now(), &canary, &others, &BOUNDS);
        let t = s.on_tick(sp, c.advance(10 * S)).unwrap();
        (t.result, s.last_window().unwrap().clone())
    };
    // 5 % against 0.5 %: the increase is not significantly above 2 points.
    let (r, w) = judge(&sp, &mut c, window(200, 10, 0.005), window(2000, 10, 0.005));
    assert_eq!(r, "advanced", "{w:?}");
    // Against 2 points of allowed increase at 0.5 %: a breach.
    sp.rollout.baseline.as_mut().unwrap().error_rate_increase = Some(0.005);
    let (r, w) = judge(&sp, &mut c, window(200, 10, 0.005), window(2000, 10, 0.005));
    assert_eq!(r, "rolled-back", "{w:?}");
    // Latency against the others: 10x slower breaches the ratio; same speed passes.
    sp.rollout.baseline.as_mut().unwrap().error_rate_increase = None;
    let (r, _) = judge(&sp, &mut c, window(200, 0, 0.2), window(2000, 0, 0.005));
    assert_eq!(r, "rolled-back");
    let (r, _) = judge(&sp, &mut c, window(200, 0, 0.005), window(2000, 0, 0.005));
    assert_eq!(r, "advanced");
    // Without traffic to the others the baseline is not judged, and is no breach.
    let (r, w) = judge(&sp, &mut c, window(200, 0, 0.2), Window::default());
    assert_eq!(r, "advanced");
    assert_eq!(w.checks[0].verdict, "not-judged");
}

#[test]
fn terminal_states_hold_and_refuse_commands() {
    let sp = spec(&[10, 100], 100);
    let mut c = Clock::new();
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    s.command(&sp, c.now(), Command::Abort).unwrap();
    assert_eq!(s.phase(), Phase::RolledBack);
    s.on_acks(c.now(), &all_acked());
    assert_eq!(
        s.on_report(
            &sp,
            c.now(),
            &window(1000, 0, 0.005),
            &Window::default(),
            &BOUNDS
        ),
        None
    );
    assert_eq!(s.on_tick(&sp, c.advance(3600 * S)), None);
    assert_eq!(s.canary_weight(&sp), 0);
    assert!(s.command(&sp, c.now(), Command::Resume).is_err());
    assert!(s.command(&sp, c.now(), Command::Promote).is_err());
}

#[test]
fn pause_holds_the_step_resume_restarts_its_interval_promote_goes_to_100() {
    let sp = spec(&[10, 50, 100], 10);
    let mut c = Clock::new();
    let mut s = acked(&sp, &c);
    s.command(&sp, c.now(), Command::Pause).unwrap();
    assert!(s.command(&sp, c.now(), Command::Pause).is_err());
    s.on_report(
        &sp,
        c.now(),
        &window(100, 0, 0.005),
        &Window::default(),
        &BOUNDS,
    );
    assert_eq!(s.on_tick(&sp, c.advance(60 * S)), None);
    assert_eq!(s.canary_weight(&sp), 10);
    s.command(&sp, c.now(), Command::Resume).unwrap();
    assert_eq!(s.acked_at(), None, "the interval waits for the acks again");
    s.on_acks(c.now(), &all_acked());
    s.on_report(
        &sp,
        c.now(),
        &window(100, 0, 0.005),
        &Window::default(),
        &BOUNDS,
    );
    assert_eq!(
        s.on_tick(&sp, c.advance(10 * S)).unwrap().result,
        "advanced"
    );
    s.command(&sp, c.now(), Command::Promote).unwrap();
    assert_eq!(s.canary_weight(&sp), 100);
    assert_eq!(
        results(&s),
        ["started", "paused", "resumed", "advanced", "promoted"]
    );
}

#[test]
fn a_restored_rollout_resumes_its_step_after_the_acks() {
    let sp = spec(&[10, 50, 100], 10);
    let mut c = Clock::new();
    let mut s = acked(&sp, &c);
    s.on_report(
        &sp,
        c.now(),
        &window(100, 0, 0.005),
        &Window::default(),
        &BOUNDS,
    );
    s.on_tick(&sp, c.advance(10 * S)).unwrap();
    let saved: Saved = serde_json::from_str(&serde_json::to_string(&s.saved()).unwrap()).unwrap();
    let mut r = RolloutState::restore(saved, &sp, c.advance(5 * S));
    assert_eq!((r.step(), r.canary_weight(&sp)), (1, 50));
    assert_eq!(r.acked_at(), None);
    assert_eq!(results(&r).last().unwrap(), "restarted");
    r.on_acks(c.now(), &all_acked());
    r.on_report(
        &sp,
        c.now(),
        &window(100, 0, 0.005),
        &Window::default(),
        &BOUNDS,
    );
    assert_eq!(
        r.on_tick(&sp, c.advance(10 * S)).unwrap().canary_weight,
        100
    );
}

/// The rollback bench's slow case at 2 s reports, on the engine's side: the step is
/// acked, its 1 s interval ends before the first report (inconclusive, which the
/// driver republishes), then the report carrying the failures arrives. The engine
/// rolls back at that report, waiting for nothing; the 30 s the canary stayed at
/// 10 % came from the publication of that inconclusive tick being sent after the
/// rollback's (`state::tests::a_rollback_is_never_overwritten_by_a_publication_of_the_old_weight`).
#[test]
fn a_gross_breach_right_after_an_inconclusive_interval_rolls_back_at_its_report() {
    let mut sp = spec(&[10, 50, 100], 20);
    sp.rollout.interval = Some(sluice_config::Duration::from_secs(1));
    let mut c = Clock::new();
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    s.on_acks(c.advance(S / 5), &all_acked());
    assert!(s.acked_at().is_some());
    let t = s.on_tick(&sp, c.advance(S)).expect("the interval ended");
    assert_eq!(t.result, "inconclusive");
    assert_eq!(s.canary_weight(&sp), 10);
    // The first report, 2 s after the load began: 13 canary requests, 7 failed.
    let t = s
        .on_report(
            &sp,
            c.advance(S * 4 / 5),
            &window(13, 7, 0.005),
            &window(120, 0, 0.005),
            &BOUNDS,
        )
        .expect("rolled back at the report");
    assert_eq!(t.result, "rolled-back");
    assert_eq!((s.phase(), s.canary_weight(&sp)), (Phase::RolledBack, 0));
    assert_eq!(results(&s), ["started", "inconclusive", "rolled-back"]);
}

#[test]
fn other_backends_all_at_zero_in_the_file_share_the_rest_equally() {
    let mut s = spec(&[10, 100], 1);
    s.file_weights = IndexMap::from([
        ("a".to_string(), 0),
        ("v2".to_string(), 100),
        ("b".to_string(), 0),
    ]);
    assert_eq!(
        s.weights_at(10).values().copied().collect::<Vec<_>>(),
        [45, 10, 45]
    );
    s.file_weights.insert("c".into(), 0);
    // 70 over three: the first in file order takes the one left over.
    assert_eq!(
        s.weights_at(30).values().copied().collect::<Vec<_>>(),
        [24, 30, 23, 23]
    );
}

/// Without a `deadline`, inconclusive windows roll back (when asked to) after 30
/// minutes of them, not before.
#[test]
fn the_default_deadline_is_30_minutes() {
    let mut sp = spec(&[10, 100], 100);
    sp.rollout.on_inconclusive = Some(OnInconclusive::Rollback);
    let mut c = Clock::new();
    let mut s = acked(&sp, &c);
    // The first inconclusive interval ends at 10 s; the deadline runs from there.
    assert_eq!(
        s.on_tick(&sp, c.advance(10 * S)).unwrap().result,
        "inconclusive"
    );
    for _ in 0..179 {
        assert_eq!(
            s.on_tick(&sp, c.advance(10 * S)).unwrap().result,
            "inconclusive"
        );
    }
    let t = s.on_tick(&sp, c.advance(10 * S)).unwrap();
    assert_eq!(t.result, "rolled-back");
    assert!(t.reason.contains("1800s"), "{}", t.reason);
}

#[test]
fn commands_are_named_in_lower_case() {
    assert_eq!(Command::parse("pause"), Some(Command::Pause));
    assert_eq!(Command::parse("resume"), Some(Command::Resume));
    assert_eq!(Command::parse("promote"), Some(Command::Promote));
    assert_eq!(Command::parse("abort"), Some(Command::Abort));
    assert_eq!(Command::parse("Pause"), None);
    assert_eq!(Command::parse("rollback"), None);
}

/// The history keeps the latest [`HISTORY`] transitions, recorded or mirrored.
#[test]
fn the_history_keeps_the_latest_transitions() {
    let sp = spec(&[10, 100], 100);
    let mut c = Clock::new();
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    for _ in 0..40 {
        s.command(&sp, c.advance(S), Command::Pause).unwrap();
        s.command(&sp, c.advance(S), Command::Resume).unwrap();
    }
    // 81 recorded (one a second): the start and the first 16 commands are gone.
    let h = s.history();
    assert_eq!(h.len(), HISTORY);
    assert_eq!(h[0].result, "paused");
    assert_eq!(h[0].at_ms, 1_700_000_000_000 + 17_000);
    assert_eq!(h[HISTORY - 1].result, "resumed");
    assert_eq!(h[HISTORY - 1].at_ms, 1_700_000_000_000 + 80_000);

    let mut saved = s.saved();
    saved.history.extend(saved.history.clone());
    let m = RolloutState::mirror(saved, &sp, c.now());
    assert_eq!(m.history(), h, "the second copy, the latest, is kept");
    let mut saved = s.saved();
    saved.history.truncate(HISTORY - 1);
    let m = RolloutState::mirror(saved.clone(), &sp, c.now());
    assert_eq!(m.history(), saved.history);
}

/// The open window as `/rollouts` shows it: what it waits for, what it holds.
#[test]
fn the_open_window_says_what_it_waits_for() {
    let sp = spec(&[10, 100], 100);
    let mut c = Clock::new();
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    let w = s.current_window(&sp);
    assert_eq!(w.decision, "open");
    assert_eq!(
        w.reason,
        "waiting for every proxy to ack the step's weights"
    );
    s.on_acks(c.now(), &all_acked());
    let acked = s.acked_at();
    s.on_report(
        &sp,
        c.now(),
        &window(30, 0, 0.005),
        &window(300, 0, 0.005),
        &BOUNDS,
    );
    let w = s.current_window(&sp);
    assert_eq!((w.reason.as_str(), w.step), ("collecting", 0));
    assert_eq!((w.canary_requests, w.baseline_requests), (30, 300));
    assert_eq!(w.checks.len(), 2, "{w:?}");
    // Acks seen again later neither move the interval's start nor empty the window.
    s.on_acks(c.advance(S), &all_acked());
    assert_eq!(s.acked_at(), acked);
    assert_eq!(s.current_window(&sp).canary_requests, 30);
    s.on_tick(&sp, c.advance(10 * S)).unwrap();
    let w = s.current_window(&sp);
    assert_eq!(
        w.reason,
        "1 inconclusive interval(s) so far: 30 of 100 canary requests"
    );
}

/// The conclusive windows of the step the rollout stands at: none at a new step, the
/// last one once promoted.
#[test]
fn conclusive_windows_count_in_the_current_step() {
    let sp = spec(&[10, 100], 10);
    let mut c = Clock::new();
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    for result in ["advanced", "promoted"] {
        assert_eq!(s.conclusive_windows(), 0);
        s.on_acks(c.now(), &all_acked());
        s.on_report(
            &sp,
            c.now(),
            &window(20, 0, 0.005),
            &Window::default(),
            &BOUNDS,
        );
        assert_eq!(s.on_tick(&sp, c.advance(10 * S)).unwrap().result, result);
    }
    assert_eq!(s.conclusive_windows(), 1);
}

/// The values a window's checks show: none without requests, the ratio with them.
#[test]
fn a_checks_value_is_the_ratio_seen() {
    let sp = spec(&[10, 100], 100);
    let c = Clock::new();
    let mut s = acked(&sp, &c);
    let error_rate = |s: &RolloutState| {
        s.current_window(&sp)
            .checks
            .into_iter()
            .find(|c| c.name == "errorRate")
            .expect("judged")
    };
    assert_eq!(error_rate(&s).value, None);
    s.on_report(
        &sp,
        c.now(),
        &window(40, 1, 0.005),
        &Window::default(),
        &BOUNDS,
    );
    assert_eq!(error_rate(&s).value, Some(0.025));
    assert_eq!(error_rate(&s).samples, 40);
    // Resume applies to a paused rollout only.
    assert_eq!(
        s.command(&sp, c.now(), Command::Resume),
        Err("not paused".to_string())
    );
}

/// Each baseline check's value, bound and samples; what is not judged and why; and
/// the note on judged checks of a window short of `minRequests`.
#[test]
fn the_baseline_checks_show_their_figures() {
    let mut sp = spec(&[10, 100], 100);
    sp.rollout.slo = None;
    sp.rollout.baseline = Some(RolloutBaseline {
        error_rate_increase: Some(0.02),
        p99_ratio: Some(1.5),
    });
    let c = Clock::new();
    let open = |canary: &Window, others: &Window| {
        let mut s = acked(&sp, &c);
        s.on_report(&sp, c.now(), canary, others, &BOUNDS);
        s.current_window(&sp).checks
    };
    // The canary at 50 ms (its bucket starts at 10 ms), the others at 5 ms (p99 in
    // the bucket ending at 10 ms): not slower than 1.5 × 10 ms by whole buckets.
    let checks = open(&window(200, 10, 0.05), &window(2000, 10, 0.005));
    let inc = &checks[0];
    assert_eq!(inc.name, "errorRateIncrease");
    assert!(
        (inc.value.unwrap() - (0.05 - 0.005)).abs() < 1e-12,
        "{inc:?}"
    );
    let bound = wilson(10, 200, Z99).0 - wilson(10, 2000, Z99).1;
    assert!((inc.bound.unwrap() - bound).abs() < 1e-12, "{inc:?}");
    assert_eq!((inc.samples, inc.baseline_samples), (200, Some(2000)));
    assert_eq!((inc.verdict.as_str(), inc.note.as_deref()), ("pass", None));
    let ratio = &checks[1];
    assert_eq!(ratio.name, "p99Ratio");
    assert_eq!(ratio.value, Some(0.1 / 0.01));
    assert_eq!((ratio.threshold, ratio.bound), (1.5, Some(0.0)));
    assert_eq!((ratio.samples, ratio.baseline_samples), (200, Some(2000)));
    assert_eq!(ratio.verdict, "pass");

    // No canary requests: no value; no timed ones: the ratio is not judged.
    let untimed = Window {
        requests: 0,
        failures: 0,
        durations: Vec::new(),
    };
    let checks = open(&untimed, &window(2000, 10, 0.005));
    assert_eq!(checks[0].value, None);
    assert_eq!(checks[1].verdict, "not-judged");
    assert_eq!((checks[1].value, checks[1].bound), (None, None));
    // The others have enough timed requests: what is missing is the canary's.
    assert_eq!(checks[1].note.as_deref(), Some("no timed canary requests"));

    // Short of minRequests: judged checks say so; a check not judged keeps its why.
    let checks = open(&window(30, 0, 0.005), &window(50, 0, 0.005));
    assert_eq!(checks[0].note.as_deref(), Some("30 of 100 canary requests"));
    assert_eq!(
        checks[1].note.as_deref(),
        Some("needs 100 timed requests to the other backends (has 50)")
    );
    let checks = open(&window(100, 0, 0.005), &window(2000, 0, 0.005));
    assert_eq!(
        (checks[0].note.as_deref(), checks[1].note.as_deref()),
        (None, None)
    );
}

/// A latency SLO needs the duration buckets' bounds: without any report of them,
/// it is not judged.
#[test]
fn p99_without_bounds_is_not_judged() {
    let sp = spec(&[10, 100], 100);
    let c = Clock::new();
    let mut s = acked(&sp, &c);
    s.on_report(&sp, c.now(), &window(200, 0, 0.3), &Window::default(), &[]);
    let w = s.current_window(&sp);
    let p99 = w.checks.iter().find(|c| c.name == "p99").expect("listed");
    assert_eq!(p99.verdict, "not-judged");
}

/// A gross breach shows the failure ratio it saw over the whole step.
#[test]
fn a_gross_breach_shows_its_ratio() {
    let sp = spec(&[5, 100], 100);
    let c = Clock::new();
    let mut s = RolloutState::start("k".into(), &sp, c.now());
    s.on_report(
        &sp,
        c.now(),
        &window(4, 2, 0.005),
        &Window::default(),
        &BOUNDS,
    );
    s.on_report(
        &sp,
        c.now(),
        &window(16, 8, 0.005),
        &Window::default(),
        &BOUNDS,
    )
    .expect("rolled back");
    let w = s.last_window().expect("judged");
    let gross = w
        .checks
        .iter()
        .find(|c| c.name == "grossErrorRate")
        .unwrap();
    assert_eq!((gross.value, gross.samples), (Some(0.5), 20));
}

/// An ended rollout's weights are acked like a step's: after a rollback (or a
/// promotion) `acked_at` says when every proxy had them, a proxy that has not is
/// waited for 30 s from the end (not from the step before it), and nothing else of
/// the ended rollout moves.
#[test]
fn the_end_is_acked_like_a_step() {
    let sp = spec(&[5, 100], 100);
    let mut c = Clock::new();
    let mut s = acked(&sp, &c);
    c.advance(29 * S);
    let t = s.command(&sp, c.now(), Command::Abort).unwrap();
    assert_eq!(t.result, "rolled-back");
    assert_eq!(
        s.acked_at(),
        None,
        "the rollback's weights are not acked yet"
    );
    let mut late = all_acked();
    late[1].acked = false;
    // One second later: 30 s since the step began, 1 s since the end.
    s.on_acks(c.advance(S), &late);
    assert_eq!(s.acked_at(), None, "still waiting for b");
    assert!(s.left_out().is_empty());
    s.on_acks(c.advance(S), &all_acked());
    assert_eq!(s.acked_at(), Some(c.now().at));
    assert_eq!(s.phase(), Phase::RolledBack);
    assert_eq!(s.canary_weight(&sp), 0);
    assert_eq!(s.on_tick(&sp, c.advance(60 * S)), None);

    // Promoted: the same, and a proxy silent for 30 s after the end is left out.
    let mut s = acked(&sp, &c);
    s.command(&sp, c.now(), Command::Promote).unwrap();
    assert_eq!(s.phase(), Phase::Promoted);
    s.on_acks(c.advance(30 * S), &late);
    assert_eq!(s.acked_at(), Some(c.now().at));
    assert_eq!(s.left_out(), ["b"]);
}
