use std::sync::Arc;

use http::{Request, Response};
use proptest::prelude::*;
use sluice_config::{Route, SplitRule, SplitWhen, StickyBy, StickyHash};
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;
use tower_test::mock;

use super::*;
use crate::extensions::SelectedBackend;
use crate::random::RandomSource;

const BACKENDS: [&str; 3] = ["log-v1", "log-v2", "log-v3"];

fn weighted(weights: &[(&str, u32)], sticky: Option<&str>) -> SplitRule {
    SplitRule {
        weights: Some(weights.iter().map(|(b, w)| (b.to_string(), *w)).collect()),
        sticky_by: sticky.map(|h| StickyBy {
            header: h.into(),
            hash: StickyHash::Ordered,
        }),
        ..Default::default()
    }
}

fn route(split: Vec<SplitRule>) -> Route {
    Route {
        name: "ingest".into(),
        split,
        ..Default::default()
    }
}

fn params(split: Vec<SplitRule>) -> SplitParams {
    SplitParams::from_config(&route(split), BACKENDS).unwrap()
}

fn user(id: u64) -> Request<()> {
    Request::builder()
        .header("x-user-id", format!("user-{id}"))
        .body(())
        .unwrap()
}

#[test]
fn random_weighted_shares_within_two_points() {
    for weights in [
        vec![("log-v1", 90), ("log-v2", 10)],
        vec![("log-v1", 50), ("log-v2", 30), ("log-v3", 20)],
        // Weights not summing to 100 (as Gateway API's may): each draw lands on a bound
        // a third of the time, and must go to the backend above it.
        vec![("log-v1", 1), ("log-v2", 1), ("log-v3", 1)],
    ] {
        let p = params(vec![weighted(&weights, None)]);
        let rng = RandomSource::seeded(7);
        let mut counts = [0u32; 3];
        for _ in 0..10_000 {
            counts[p.decide(&Request::new(()), &rng)] += 1;
        }
        let total: u32 = weights.iter().map(|(_, w)| w).sum();
        for (name, w) in &weights {
            let i = BACKENDS.iter().position(|b| b == name).unwrap();
            let share = f64::from(counts[i]) / 100.0;
            let want = f64::from(*w) * 100.0 / f64::from(total);
            assert!(
                (share - want).abs() <= 2.0,
                "{name}: {share}% for weight {w} of {total}"
            );
        }
    }
}

/// A backend at weight 0 (a rolled-back canary, wherever it is listed) gets no
/// request, not even on the lowest draw there is.
#[test]
fn a_zero_weight_backend_gets_no_request_even_on_the_lowest_draw() {
    let p = params(vec![weighted(&[("log-v2", 0), ("log-v1", 100)], None)]);
    // A seed whose first draw is the lowest point of any split (a share of 10,000
    // points or fewer): about one seed in 10,000.
    let lowest = u64::MAX / 10_000;
    let seed = (0..10_000_000u64)
        .find(|s| RandomSource::seeded(*s).next_u64() < lowest)
        .expect("a seed with a low first draw");
    let rng = RandomSource::seeded(seed);
    assert_eq!(BACKENDS[p.decide(&Request::new(()), &rng)], "log-v1");
    let rng = RandomSource::seeded(11);
    for _ in 0..10_000 {
        assert_eq!(BACKENDS[p.decide(&Request::new(()), &rng)], "log-v1");
    }
}

#[test]
fn thread_local_randomness_also_respects_weights() {
    let p = params(vec![weighted(&[("log-v1", 80), ("log-v2", 20)], None)]);
    let rng = RandomSource::ThreadLocal;
    let canary = (0..10_000)
        .filter(|_| p.decide(&Request::new(()), &rng) == 1)
        .count();
    // 10,000 draws at p = 0.2: six standard deviations is 240.
    assert!((1_760..=2_240).contains(&canary), "{canary}");
}

#[test]
fn sticky_shares_within_two_points() {
    let p = params(vec![weighted(
        &[("log-v1", 90), ("log-v2", 10)],
        Some("x-user-id"),
    )]);
    let rng = RandomSource::seeded(1);
    let canary = (0..10_000u64)
        .filter(|id| p.decide(&user(*id), &rng) == 1)
        .count();
    assert!(
        (800..=1_200).contains(&canary),
        "{canary} of 10000 on the canary"
    );
}

#[test]
fn raising_the_canary_moves_users_only_into_it() {
    let before = params(vec![weighted(
        &[("log-v1", 90), ("log-v2", 10)],
        Some("x-user-id"),
    )]);
    let after = params(vec![weighted(
        &[("log-v1", 80), ("log-v2", 20)],
        Some("x-user-id"),
    )]);
    let rng = RandomSource::seeded(1);
    let mut moved_in = 0;
    for id in 0..100_000u64 {
        let (a, b) = (
            before.decide(&user(id), &rng),
            after.decide(&user(id), &rng),
        );
        assert!(!(a == 1 && b == 0), "user {id} left the canary");
        if a == 0 && b == 1 {
            moved_in += 1;
        }
    }
    assert!((9_000..=11_000).contains(&moved_in), "{moved_in} moved in");
}

#[test]
fn two_independent_instances_agree_on_every_user() {
    // As in two proxy processes: separately built params and separate randomness.
    let cfg = vec![weighted(
        &[("log-v1", 70), ("log-v2", 30)],
        Some("x-user-id"),
    )];
    let a = SplitParams::from_config(&route(cfg.clone()), BACKENDS).unwrap();
    let b = SplitParams::from_config(&route(cfg), BACKENDS.iter().copied()).unwrap();
    let (ra, rb) = (RandomSource::ThreadLocal, RandomSource::seeded(99));
    for id in 0..10_000u64 {
        assert_eq!(
            a.decide(&user(id), &ra),
            b.decide(&user(id), &rb),
            "user {id}"
        );
    }
}

#[test]
fn sticky_point_is_fixed_fnv1a() {
    // FNV-1a 64 test vectors: "" → cbf29ce484222325, "a" → af63dc4c8601ec8c.
    assert_eq!(
        sticky_point(b""),
        (0xcbf2_9ce4_8422_2325u64 % 10_000) as u32
    );
    assert_eq!(
        sticky_point(b"a"),
        (0xaf63_dc4c_8601_ec8cu64 % 10_000) as u32
    );
    assert!((0..10_000u64).all(|i| sticky_point(format!("u{i}").as_bytes()) < POINTS));
}

#[test]
fn header_rules_win_over_weights_in_order() {
    let canary_rule = SplitRule {
        when: Some(SplitWhen {
            headers: [("x-canary".to_string(), "true".to_string())]
                .into_iter()
                .collect(),
        }),
        backend: Some("log-v2".into()),
        ..Default::default()
    };
    let beta_rule = SplitRule {
        when: Some(SplitWhen {
            headers: [("x-beta".to_string(), "1".to_string())]
                .into_iter()
                .collect(),
        }),
        backend: Some("log-v3".into()),
        ..Default::default()
    };
    let p = params(vec![
        canary_rule,
        beta_rule,
        weighted(&[("log-v1", 100)], Some("x-user-id")),
    ]);
    let rng = RandomSource::seeded(3);
    let req = |hs: &[(&str, &str)]| {
        let mut b = Request::builder();
        for (n, v) in hs {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    };
    for id in 0..1_000 {
        let uid = format!("u{id}");
        assert_eq!(
            p.decide(&req(&[("x-canary", "true"), ("x-user-id", &uid)]), &rng),
            1
        );
        assert_eq!(
            p.decide(&req(&[("x-beta", "1"), ("x-user-id", &uid)]), &rng),
            2
        );
        assert_eq!(
            p.decide(&req(&[("x-canary", "true"), ("x-beta", "1")]), &rng),
            1,
            "first rule wins"
        );
        assert_eq!(
            p.decide(&req(&[("x-canary", "false"), ("x-user-id", &uid)]), &rng),
            0
        );
        // A repeated header matches on any of its values, first or not.
        assert_eq!(
            p.decide(
                &req(&[
                    ("x-canary", "false"),
                    ("x-canary", "true"),
                    ("x-user-id", &uid)
                ]),
                &rng
            ),
            1
        );
    }
}

#[test]
fn config_errors_and_defaults() {
    let bad = route(vec![SplitRule {
        backend: Some("nope".into()),
        ..Default::default()
    }]);
    assert_eq!(
        SplitParams::from_config(&bad, BACKENDS),
        Err(SplitConfigError::UnknownBackend("nope".into()))
    );
    let none = SplitParams::from_config(&route(vec![]), ["only"]).unwrap();
    assert_eq!(none.decide(&Request::new(()), &RandomSource::seeded(0)), 0);
    assert_eq!(
        SplitParams::from_config(&route(vec![]), []),
        Err(SplitConfigError::NoBackends)
    );
}

#[test]
fn a_backend_named_only_as_fallback_is_never_the_primary() {
    let mut r = route(vec![]);
    r.fallback = Some(sluice_config::Fallback {
        on: vec![sluice_config::FallbackOn::BreakerOpen],
        backend: Some("quote-cache".into()),
        response: None,
    });
    // The fallback is listed first: a route without split must still go to the other.
    let p = SplitParams::from_config(&r, ["quote-cache", "quote"]).unwrap();
    for seed in 0..20 {
        assert_eq!(p.decide(&Request::new(()), &RandomSource::seeded(seed)), 1);
    }
    let p = SplitParams::from_config(&r, ["quote", "quote-cache"]).unwrap();
    assert_eq!(p.decide(&Request::new(()), &RandomSource::seeded(0)), 0);
}

#[tokio::test]
async fn layer_sets_selected_backend_extension() {
    let p = Arc::new(params(vec![weighted(
        &[("log-v1", 0), ("log-v3", 100)],
        None,
    )]));
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc = SplitLayer::new(p)
        .with_random(RandomSource::seeded(5))
        .layer(mock);
    handle.allow(1);
    let fut = svc.ready().await.unwrap().call(Request::new(()));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(
        crate::extensions::Routing::backend(req.extensions()),
        Some(&SelectedBackend {
            name: Arc::from("log-v3"),
            index: 2
        })
    );
    send.send_response(Response::new(()));
    fut.await.unwrap();
}

fn rendezvous(weights: &[(&str, u32)]) -> SplitRule {
    let mut rule = weighted(weights, Some("x-user-id"));
    if let Some(s) = rule.sticky_by.as_mut() {
        s.hash = StickyHash::Rendezvous;
    }
    rule
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn shares_follow_weights_of_any_total(
        w in proptest::collection::vec(0u32..5_000, 3)
            .prop_filter("a weight above zero", |w| w.iter().any(|x| *x > 0)),
        sticky in any::<bool>(),
    ) {
        let weights: Vec<(&str, u32)> = BACKENDS.iter().copied().zip(w.iter().copied()).collect();
        let p = params(vec![weighted(&weights, sticky.then_some("x-user-id"))]);
        let rng = RandomSource::seeded(11);
        let mut counts = [0u32; 3];
        for id in 0..20_000u64 {
            counts[p.decide(&user(id), &rng)] += 1;
        }
        let total: u32 = w.iter().sum();
        for (i, weight) in w.iter().enumerate() {
            let want = f64::from(*weight) / f64::from(total);
            let got = f64::from(counts[i]) / 20_000.0;
            // 20,000 draws: six standard deviations stay under 0.021.
            prop_assert!((got - want).abs() < 0.021, "{i}: {got} for {want} ({w:?})");
            if *weight == 0 {
                prop_assert_eq!(counts[i], 0);
            }
        }
    }
}

#[test]
fn ordered_sticky_split_is_unchanged_for_weights_of_100() {
    // The file-order walk of the first wave: point < 100 × running sum of percentages.
    let p = params(vec![weighted(
        &[("log-v1", 70), ("log-v3", 20), ("log-v2", 10)],
        Some("x-user-id"),
    )]);
    let rng = RandomSource::seeded(0);
    for id in 0..20_000u64 {
        let point = sticky_point(format!("user-{id}").as_bytes());
        let want = match point {
            0..7_000 => 0,
            7_000..9_000 => 2,
            _ => 1,
        };
        assert_eq!(
            p.decide(&user(id), &rng),
            want,
            "user {id} at point {point}"
        );
    }
}

#[test]
fn rendezvous_agrees_with_sluice_config_and_ignores_listing_order() {
    let a = params(vec![rendezvous(&[
        ("log-v1", 80),
        ("log-v2", 15),
        ("log-v3", 5),
    ])]);
    let b = params(vec![rendezvous(&[
        ("log-v3", 5),
        ("log-v1", 80),
        ("log-v2", 15),
    ])]);
    let rng = RandomSource::seeded(0);
    let mut counts = [0u32; 3];
    for id in 0..100_000u64 {
        let chosen = a.decide(&user(id), &rng);
        assert_eq!(chosen, b.decide(&user(id), &rng), "user {id}");
        let key = format!("user-{id}");
        let same = sluice_config::rendezvous_backend(
            key.as_bytes(),
            [("log-v1", 80), ("log-v2", 15), ("log-v3", 5)],
        );
        assert_eq!(Some(chosen), same);
        counts[chosen] += 1;
    }
    for (i, want) in [80.0, 15.0, 5.0].iter().enumerate() {
        let share = f64::from(counts[i]) / 1_000.0;
        assert!((share - want).abs() < 1.0, "{i}: {share}% for {want}%");
    }
}

#[test]
fn rendezvous_raising_the_canary_moves_users_only_into_it() {
    let before = params(vec![rendezvous(&[("log-v1", 90), ("log-v2", 10)])]);
    let after = params(vec![rendezvous(&[("log-v1", 80), ("log-v2", 20)])]);
    let rng = RandomSource::seeded(0);
    let mut moved = 0;
    for id in 0..100_000u64 {
        let (a, b) = (
            before.decide(&user(id), &rng),
            after.decide(&user(id), &rng),
        );
        assert!(!(a == 1 && b == 0), "user {id} left the canary");
        moved += u32::from(a != b);
    }
    // Rendezvous moves about 100 × (20/100 − 10/100)… of the users: 10 %.
    assert!((9_000..=11_000).contains(&moved), "{moved} moved");
}

#[test]
fn choose_names_the_rule_and_agrees_with_decide() {
    let canary_rule = SplitRule {
        when: Some(SplitWhen {
            headers: [("x-canary".to_string(), "true".to_string())]
                .into_iter()
                .collect(),
        }),
        backend: Some("log-v2".into()),
        ..Default::default()
    };
    let p = params(vec![
        canary_rule,
        weighted(&[("log-v1", 60), ("log-v3", 40)], Some("x-user-id")),
    ]);
    let rng = RandomSource::seeded(11);
    let canary = Request::builder()
        .header("x-canary", "true")
        .body(())
        .unwrap();
    assert_eq!(
        p.choose(canary.headers()),
        SplitChoice::Fixed {
            rule: 0,
            backend: 1
        }
    );
    for id in 0..500 {
        let req = user(id);
        let choice = p.choose(req.headers());
        let SplitChoice::Sticky {
            rule: 1,
            backend,
            hash: StickyHash::Ordered,
        } = choice
        else {
            panic!("a user goes by the sticky rule: {choice:?}");
        };
        assert_eq!(backend, p.decide(&req, &rng));
    }
    assert_eq!(
        p.choose(&http::HeaderMap::new()),
        SplitChoice::Random { rule: 1 }
    );
    let plain = params(Vec::new());
    assert_eq!(
        plain.choose(&http::HeaderMap::new()),
        SplitChoice::Primary { backend: 0 }
    );
}
