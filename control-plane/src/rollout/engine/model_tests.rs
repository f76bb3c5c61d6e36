//! The rollout engine over random specs and random sequences of what a driver feeds it
//! (acks, reports with any counts, time, commands by hand, departures, restarts), on a
//! fake clock. After every event the state is checked against DESIGN's rules: weights
//! always total 100 and are the step's, an end is final, steps only move forward and one
//! at a time, an advance or a promotion needs a passing window of at least
//! `minRequests` canary requests, a rollback needs a breach the rules count (or a hand,
//! or the deadline when asked for), and a restart keeps phase and step.

use std::time::{Duration, Instant};

use indexmap::IndexMap;
use proptest::prelude::*;
use sluice_config::{OnInconclusive, Rollout, RolloutBaseline, RolloutSlo};

use super::*;

const BOUNDS: [f64; 3] = [0.05, 0.2, 1.0];

fn steps() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::btree_set(1u32..100, 0..4).prop_map(|s| {
        let mut steps: Vec<u32> = s.into_iter().collect();
        steps.push(100);
        steps
    })
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        steps(),
        1u64..40,
        prop::option::of(1u32..300),
        (prop::option::of(0.0f64..0.5), prop::option::of(10u64..2000)),
        prop::option::of((prop::option::of(0.0f64..0.3), prop::option::of(1.0f64..4.0))),
        prop::option::of(prop_oneof![
            Just(OnInconclusive::Hold),
            Just(OnInconclusive::Rollback)
        ]),
        prop::option::of(1u64..200),
        0u32..3,
    )
        .prop_map(
            |(steps, interval, min, (error_rate, p99), baseline, on_inc, deadline, others)| {
                let mut file_weights = IndexMap::new();
                for i in 0..=others {
                    file_weights.insert(format!("v{i}"), if i == 0 { 100 } else { 10 * i });
                }
                file_weights.insert("canary".to_string(), 0);
                Spec {
                    rollout: Rollout {
                        canary: "canary".into(),
                        steps,
                        interval: Some(sluice_config::Duration::from_secs(interval)),
                        min_requests: min,
                        slo: (error_rate.is_some() || p99.is_some()).then(|| RolloutSlo {
                            error_rate,
                            p99: p99.map(sluice_config::Duration::from_millis),
                        }),
                        baseline: baseline.map(|(error_rate_increase, p99_ratio)| {
                            RolloutBaseline {
                                error_rate_increase,
                                p99_ratio,
                            }
                        }),
                        on_inconclusive: on_inc,
                        deadline: deadline.map(sluice_config::Duration::from_secs),
                    },
                    file_weights,
                }
            },
        )
}

/// A window of `requests`, `failures` of them failed (any count: a report is checked
/// for shape, not for sense), spread over the buckets.
fn window() -> impl Strategy<Value = Window> {
    let count = prop_oneof![
        8 => 0u64..400,
        1 => Just(u64::MAX / 2),
        1 => Just(u64::MAX),
    ];
    let failures = prop_oneof![
        5 => Just(0u64),
        4 => 0u64..20,
        1 => count.clone(),
    ];
    (
        count,
        failures,
        prop::collection::vec(0u64..200, BOUNDS.len() + 1),
    )
        .prop_map(|(requests, failures, durations)| Window {
            requests,
            failures: failures.min(requests.saturating_add(3)),
            durations,
        })
}

#[derive(Clone, Debug)]
enum Event {
    /// Seconds pass, then a tick.
    Tick(u64),
    Report(Window, Window),
    /// Three proxies: each acked, refused, or neither, or is gone from the list.
    Acks([u8; 3]),
    Departed(u8, bool),
    Command(Command),
    Restart,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => (0u64..45).prop_map(Event::Tick),
        4 => (window(), window()).prop_map(|(c, o)| Event::Report(c, o)),
        3 => [0u8..4, 0u8..4, 0u8..4].prop_map(Event::Acks),
        1 => (0u8..3, any::<bool>()).prop_map(|(n, s)| Event::Departed(n, s)),
        1 => prop_oneof![
            Just(Command::Pause),
            Just(Command::Resume),
            Just(Command::Promote),
            Just(Command::Abort)
        ]
        .prop_map(Event::Command),
        1 => Just(Event::Restart),
    ]
}

struct Clock {
    origin: Instant,
    offset: Duration,
}

impl Clock {
    fn now(&self) -> Now {
        Now {
            at: self.origin + self.offset,
            unix_ms: 1_700_000_000_000 + self.offset.as_millis() as u64,
        }
    }
}

fn acks(states: [u8; 3]) -> Vec<ProxyAck> {
    states
        .iter()
        .enumerate()
        .filter(|(_, s)| **s != 3)
        .map(|(i, s)| ProxyAck {
            node: format!("p{i}"),
            conn: "1".into(),
            connected_at_ms: 0,
            acked: *s == 1,
            nacked: *s == 2,
        })
        .collect()
}

fn check_state(s: &RolloutState, spec: &Spec, at: usize) {
    let weights = s.weights(spec);
    assert_eq!(
        weights.values().sum::<u32>(),
        100,
        "event {at}: {weights:?}"
    );
    assert_eq!(
        weights.keys().collect::<Vec<_>>(),
        spec.file_weights.keys().collect::<Vec<_>>(),
        "event {at}: the rule's backends, in file order"
    );
    let canary = weights[&spec.rollout.canary];
    let want = match s.phase() {
        Phase::Promoted => 100,
        Phase::RolledBack => 0,
        Phase::Progressing | Phase::Paused => spec.rollout.steps[s.step()],
    };
    assert_eq!(
        canary,
        want,
        "event {at}: {:?} at step {}",
        s.phase(),
        s.step()
    );
    assert!(s.step() < spec.rollout.steps.len(), "event {at}");
    assert!(s.history().len() <= HISTORY, "event {at}");
}

fn run(spec: Spec, events: Vec<Event>) {
    let mut clock = Clock {
        origin: Instant::now(),
        offset: Duration::ZERO,
    };
    let min = spec.min_requests();
    let mut s = RolloutState::start("k".into(), &spec, clock.now());
    check_state(&s, &spec, 0);
    for (at, event) in events.into_iter().enumerate() {
        let (phase, step) = (s.phase(), s.step());
        let transition = match &event {
            Event::Tick(secs) => {
                clock.offset += Duration::from_secs(*secs);
                s.on_tick(&spec, clock.now())
            }
            Event::Report(c, o) => s.on_report(&spec, clock.now(), c, o, &BOUNDS),
            Event::Acks(states) => s.on_acks(clock.now(), &acks(*states)),
            Event::Departed(n, sent) => {
                let now = clock.now();
                s.on_departed(Departed {
                    node: &format!("p{n}"),
                    conn: "1",
                    connected_at_ms: 0,
                    gone_at_ms: now.unix_ms,
                    sent: *sent,
                    nacked: false,
                });
                None
            }
            Event::Command(cmd) => {
                let result = s.command(&spec, clock.now(), *cmd);
                assert_eq!(
                    result.is_err(),
                    phase.is_terminal()
                        || (*cmd == Command::Pause && phase == Phase::Paused)
                        || (*cmd == Command::Resume && phase != Phase::Paused),
                    "event {at}: {cmd:?} in {phase:?}: {result:?}"
                );
                result.ok()
            }
            Event::Restart => {
                s = RolloutState::restore(s.saved(), &spec, clock.now());
                assert_eq!((s.phase(), s.step()), (phase, step), "event {at}: restored");
                None
            }
        };
        check_state(&s, &spec, at);

        // An end is final.
        if phase.is_terminal() {
            assert_eq!(s.phase(), phase, "event {at}: left {phase:?} on {event:?}");
            assert!(transition.is_none(), "event {at}: {transition:?}");
        }
        // Steps move forward, one at a time, only on a passing window.
        assert!(s.step() == step || s.step() == step + 1, "event {at}");
        if s.step() == step + 1 || (s.phase() == Phase::Promoted && phase != Phase::Promoted) {
            let by_hand = matches!(event, Event::Command(Command::Promote));
            if !by_hand {
                assert!(
                    matches!(event, Event::Tick(_) | Event::Report(..)),
                    "event {at}: moved on {event:?}"
                );
                let w = s.last_window().expect("a judged window");
                assert_eq!(w.decision, "pass", "event {at}: {w:?}");
                assert!(w.canary_requests >= min, "event {at}: passed on {w:?}");
                assert!(
                    w.checks.iter().all(|c| c.verdict != "breach"),
                    "event {at}: {w:?}"
                );
            }
            if s.step() == step + 1 {
                assert_eq!(
                    phase,
                    Phase::Progressing,
                    "event {at}: advanced while {phase:?}"
                );
            }
        }
        // A rollback has a cause the rules count.
        if s.phase() == Phase::RolledBack && phase != Phase::RolledBack {
            let t = transition.as_ref().expect("the rollback's transition");
            let w = s.last_window();
            let cause_ok = match &event {
                Event::Command(Command::Abort) => true,
                Event::Tick(_) | Event::Report(..) => {
                    let w = w.expect("a judged window");
                    if t.reason.starts_with("gross breach") {
                        w.canary_failures >= GROSS_MIN_FAILURES
                    } else if t.reason.starts_with("inconclusive") {
                        spec.rollout.on_inconclusive == Some(OnInconclusive::Rollback)
                    } else {
                        w.decision == "breach"
                            && w.canary_requests >= min
                            && w.checks.iter().any(|c| c.verdict == "breach")
                    }
                }
                _ => false,
            };
            assert!(
                cause_ok,
                "event {at}: rolled back on {event:?}: {t:?} {w:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_rollout_keeps_the_rules_over_any_sequence_of_events(
        spec in spec(),
        events in prop::collection::vec(event(), 1..60),
    ) {
        run(spec, events);
    }
}
