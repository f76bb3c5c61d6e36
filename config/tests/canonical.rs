//! The canonical form round-trips and its hash is a stable version: random valid
//! policies, serialised canonically, parse back to the same policies; the hash
//! does not depend on the order of policies or on how they are spread over files.

use indexmap::IndexMap;
use proptest::prelude::*;
use proptest::sample::subsequence;
use sluice_config::*;

fn duration_ms(max: u64) -> impl Strategy<Value = Duration> {
    (1..=max).prop_map(Duration::from_millis)
}

fn label() -> impl Strategy<Value = String> {
    "[a-z]([a-z0-9-]{0,8}[a-z0-9])?"
}

fn header_name() -> impl Strategy<Value = String> {
    "x-[a-z0-9-]{1,10}"
}

/// Printable ASCII, including values YAML would read as other types unquoted; never
/// starting or ending with a space, which no received value does.
fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "([!-~]([ -~]{0,6}[!-~])?)?",
        Just("true".to_string()),
        Just("0123".to_string()),
        Just("~".to_string()),
        Just("- a".to_string()),
    ]
}

fn headers(max: usize) -> impl Strategy<Value = IndexMap<String, String>> {
    proptest::collection::vec((header_name(), header_value()), 0..=max)
        .prop_map(|v| v.into_iter().collect())
}

fn spiffe() -> impl Strategy<Value = String> {
    (label(), label()).prop_map(|(ns, sa)| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"))
}

fn rate_limit() -> impl Strategy<Value = RateLimit> {
    let key = prop_oneof![
        Just(None),
        header_name().prop_map(|h| Some(RateLimitKey {
            header: Some(h),
            ..Default::default()
        })),
        Just(Some(RateLimitKey {
            path: Some(true),
            ..Default::default()
        })),
        Just(Some(RateLimitKey {
            peer_identity: Some(true),
            ..Default::default()
        })),
    ];
    (
        1..=1_000_000u32,
        proptest::option::of(1..=1_000_000u32),
        key,
        any::<bool>(),
    )
        .prop_map(|(per_second, burst, key, shadow)| RateLimit {
            per_second,
            burst,
            key,
            shadow,
            ..Default::default()
        })
}

const RETRY_ON: [RetryOn; 6] = [
    RetryOn::ConnectFailure,
    RetryOn::RefusedStream,
    RetryOn::Reset,
    RetryOn::GatewayError,
    RetryOn::ServerError,
    RetryOn::Timeout,
];
const GRPC: [GrpcCode; 5] = [
    GrpcCode::Unavailable,
    GrpcCode::Internal,
    GrpcCode::DeadlineExceeded,
    GrpcCode::ResourceExhausted,
    GrpcCode::Unknown,
];
const FAILURE_ON: [FailureClass; 4] = [
    FailureClass::ConnectFailure,
    FailureClass::Timeout,
    FailureClass::GatewayError,
    FailureClass::ServerError,
];

fn retry(timeout: Option<Duration>) -> impl Strategy<Value = Retry> {
    let per_try_max = timeout.map_or(3_600_000, |t| t.get().as_millis() as u64);
    let backoff =
        proptest::option::of(
            (1..=250u64, 0..=1_000u64).prop_map(|(base, extra)| Backoff {
                base: Some(Duration::from_millis(base)),
                max: Some(Duration::from_millis(base + extra)),
                // The floor is enforced, so it takes part in the round trip.
                min: (extra % 2 == 0).then(|| Duration::from_millis(base)),
            }),
        );
    let budget = proptest::option::of(
        (
            0.0..=1.0f64,
            0..=1_000_000u32,
            proptest::option::of(duration_ms(3_600_000)),
        )
            .prop_map(|(ratio, min_per_second, window)| RetryBudget {
                ratio,
                min_per_second,
                window,
            }),
    );
    (
        0..=10u32,
        subsequence(RETRY_ON.to_vec(), 0..=6),
        proptest::collection::btree_set(400..=599u16, 0..3),
        subsequence(GRPC.to_vec(), 0..=2),
        proptest::option::of(duration_ms(per_try_max)),
        backoff,
        any::<bool>(),
        proptest::option::of(0..=16_777_216u64),
        budget,
    )
        .prop_map(
            |(
                attempts,
                on,
                codes,
                grpc,
                per_try_timeout,
                backoff,
                non_idempotent,
                replay,
                budget,
            )| {
                Retry {
                    attempts,
                    on,
                    status_codes: codes.into_iter().collect(),
                    grpc_statuses: grpc,
                    per_try_timeout,
                    backoff,
                    non_idempotent,
                    max_replay_bytes: replay,
                    budget,
                }
            },
        )
}

fn circuit_breaker() -> impl Strategy<Value = CircuitBreaker> {
    let failure_rate = (1..=100u32, duration_ms(3_600_000), 1..=1_000_000u32).prop_map(
        |(percent, window, min_requests)| FailureRate {
            percent,
            window,
            min_requests,
        },
    );
    (
        proptest::option::of(1..=10_000u32),
        proptest::option::of(failure_rate),
        1..=60_000u64,
        proptest::option::of(0..=60_000u64),
        proptest::option::of(1..=1_000u32),
        subsequence(FAILURE_ON.to_vec(), 0..=4),
        subsequence(GRPC.to_vec(), 0..=3),
    )
        .prop_filter("needs a trigger", |t| t.0.is_some() || t.1.is_some())
        .prop_map(
            |(consecutive, rate, open, extra, half_open, failure_on, grpc)| CircuitBreaker {
                consecutive_failures: consecutive,
                failure_rate: rate,
                open_for: Some(Duration::from_millis(open)),
                max_open_for: extra.map(|e| Duration::from_millis(open + e)),
                half_open_requests: half_open,
                failure_on,
                grpc_statuses: grpc,
            },
        )
}

/// Percentages summing to 100 over `n` backends, from `n - 1` cut points.
fn weights(n: usize) -> impl Strategy<Value = Vec<u32>> {
    proptest::collection::vec(0..=100u32, n - 1).prop_map(|mut cuts| {
        cuts.sort_unstable();
        let mut prev = 0;
        let mut out = Vec::new();
        for c in cuts.into_iter().chain([100]) {
            out.push(c - prev);
            prev = c;
        }
        out
    })
}

fn split(backends: Vec<String>) -> impl Strategy<Value = Vec<SplitRule>> {
    let n = backends.len();
    let header_rules = proptest::collection::vec(
        (
            proptest::collection::vec((header_name(), header_value()), 1..=2),
            0..n,
        ),
        0..=2,
    );
    let last = prop_oneof![
        (0..n).prop_map(Some),
        Just(None), // weighted
    ];
    (
        header_rules,
        last,
        weights(n),
        proptest::option::of((header_name(), any::<bool>())),
    )
        .prop_map(move |(rules, last, weights, sticky)| {
            let mut out: Vec<SplitRule> = rules
                .into_iter()
                .map(|(hs, b)| SplitRule {
                    when: Some(SplitWhen {
                        headers: hs.into_iter().collect(),
                    }),
                    backend: Some(backends[b].clone()),
                    ..Default::default()
                })
                .collect();
            out.push(match last {
                Some(b) => SplitRule {
                    backend: Some(backends[b].clone()),
                    ..Default::default()
                },
                None => SplitRule {
                    weights: Some(backends.iter().cloned().zip(weights).collect()),
                    sticky_by: sticky.map(|(header, rendezvous)| StickyBy {
                        header,
                        hash: if rendezvous {
                            StickyHash::Rendezvous
                        } else {
                            StickyHash::Ordered
                        },
                    }),
                    ..Default::default()
                },
            });
            out
        })
}

/// A route whose path is unique to its index, so no route shadows another.
fn route(i: usize, backends: Vec<String>) -> impl Strategy<Value = Route> {
    let needs_split = backends.len() > 1;
    let path = prop_oneof![
        label().prop_map(move |l| Some(PathMatch {
            exact: Some(format!("/r{i}/{l}")),
            prefix: None
        })),
        Just(Some(PathMatch {
            exact: None,
            prefix: Some(format!("/p{i}")),
        })),
    ];
    let method = proptest::option::of(prop_oneof![Just("GET"), Just("POST"), Just("DELETE")]);
    (
        path,
        method,
        headers(2),
        proptest::option::of(duration_ms(3_600_000)),
        proptest::option::of(rate_limit()),
        proptest::option::of(circuit_breaker()),
        proptest::option::of(any::<bool>()),
    )
        .prop_flat_map(move |(path, method, hs, timeout, rl, cb, access_log)| {
            let m = RouteMatch {
                path,
                method: method.map(String::from),
                headers: hs,
            };
            let split_strategy = if needs_split || i.is_multiple_of(2) {
                split(backends.clone()).boxed()
            } else {
                Just(Vec::new()).boxed()
            };
            (
                proptest::option::of(retry(timeout)),
                split_strategy,
                Just((m, timeout, rl, cb, access_log)),
            )
        })
        .prop_map(
            move |(retry, split, (matches, timeout, rate_limit, cb, access_log))| Route {
                name: format!("route-{i}"),
                matches,
                timeout,
                rate_limit,
                retry,
                circuit_breaker: cb,
                split,
                access_log,
                ..Default::default()
            },
        )
}

fn backend() -> impl Strategy<Value = Backend> {
    let place = prop_oneof![
        proptest::collection::btree_set(1..=65535u16, 1..=3).prop_map(|ports| (
            ports
                .into_iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
            None
        )),
        (label(), label()).prop_map(|(n, ns)| (Vec::new(), Some(format!("{n}.{ns}")))),
    ];
    (place, proptest::option::of(spiffe())).prop_map(|((addresses, service), identity)| Backend {
        addresses,
        service,
        identity,
        ..Default::default()
    })
}

fn inbound() -> impl Strategy<Value = Inbound> {
    (
        proptest::option::of(proptest::collection::btree_set(spiffe(), 1..=3)),
        proptest::option::of(rate_limit()),
        proptest::option::of(any::<bool>()),
    )
        .prop_map(|(allow, rate_limit, access_log)| Inbound {
            allow: allow.map(|a| a.into_iter().collect()),
            rate_limit,
            access_log,
            ..Default::default()
        })
}

fn spec() -> impl Strategy<Value = RoutePolicySpec> {
    (proptest::collection::vec(backend(), 1..=3), 0..=4usize)
        .prop_flat_map(|(backends, n_routes)| {
            let names: Vec<String> = (0..backends.len()).map(|i| format!("b{i}")).collect();
            let routes: Vec<_> = (0..n_routes).map(|i| route(i, names.clone())).collect();
            let inbound = if n_routes == 0 {
                inbound().prop_map(Some).boxed()
            } else {
                proptest::option::of(inbound()).boxed()
            };
            (
                Just(names.into_iter().zip(backends).collect()),
                routes,
                inbound,
            )
        })
        .prop_map(
            |(backends, routes, inbound): (IndexMap<_, _>, Vec<Route>, _)| RoutePolicySpec {
                host: String::new(),
                aliases: Vec::new(),
                backends: if routes.is_empty() {
                    IndexMap::new()
                } else {
                    backends
                },
                routes,
                inbound,
            },
        )
}

/// Valid policies with distinct names and hosts.
fn policies() -> impl Strategy<Value = Vec<RoutePolicy>> {
    proptest::collection::vec(
        (
            spec(),
            proptest::option::of(label()),
            proptest::collection::vec((label(), header_value()), 0..2),
        ),
        1..=4,
    )
    .prop_map(|items| {
        items
            .into_iter()
            .enumerate()
            .map(|(i, (mut spec, namespace, labels))| {
                spec.host = format!("svc-{i}.mesh");
                RoutePolicy {
                    api_version: API_VERSION.to_string(),
                    kind: KIND.to_string(),
                    metadata: Metadata {
                        name: format!("policy-{i}"),
                        namespace,
                        labels: labels.into_iter().collect(),
                        annotations: IndexMap::new(),
                    },
                    spec,
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn canonical_form_round_trips(policies in policies()) {
        let set = PolicySet::new(policies.clone()).unwrap_or_else(|e| panic!("{e}"));
        let text = std::str::from_utf8(set.canonical_bytes()).unwrap();
        let parsed = parse_policies("canonical", text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        prop_assert_eq!(&parsed, &set.policies().to_vec());
        let again = PolicySet::from_canonical("snapshot", set.canonical_bytes()).unwrap();
        prop_assert_eq!(again.canonical_bytes(), set.canonical_bytes());
        prop_assert_eq!(again.hash(), set.hash());
        for p in &policies {
            // As the set holds it: values written at their defaults left out.
            let alone = PolicySet::new(vec![p.clone()]).unwrap();
            prop_assert!(set.policies().contains(&alone.policies()[0]));
        }
    }

    #[test]
    fn hash_ignores_order_of_policies_and_files(
        (policies, shuffled) in policies().prop_flat_map(|p| (Just(p.clone()), Just(p).prop_shuffle())),
    ) {
        let set = PolicySet::new(policies.clone()).unwrap();
        prop_assert_eq!(set.hash(), PolicySet::new(shuffled.clone()).unwrap().hash().to_string());
        // One file per policy, in the shuffled order.
        let files: Vec<(String, String)> = shuffled
            .iter()
            .map(|p| (format!("{}.yaml", p.metadata.name), serde_yaml::to_string(p).unwrap()))
            .collect();
        let from_files =
            PolicySet::from_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str()))).unwrap();
        prop_assert_eq!(from_files.hash(), set.hash());
        // All in one multi-document file.
        let joined: String = files.iter().map(|(_, t)| format!("---\n{t}")).collect();
        let one_file = PolicySet::from_files([("all.yaml", joined.as_str())]).unwrap();
        prop_assert_eq!(one_file.hash(), set.hash());
    }

    #[test]
    fn any_change_changes_the_hash(policies in policies(), bump in 1..=60u64) {
        let set = PolicySet::new(policies.clone()).unwrap();
        let mut changed = policies;
        let spec = &mut changed[0].spec;
        match spec.routes.first_mut() {
            Some(r) => {
                let t = r.timeout.map_or(0, |t| t.get().as_millis() as u64);
                r.timeout = Some(Duration::from_millis(t + bump));
                if let Some(retry) = &mut r.retry {
                    retry.per_try_timeout = None;
                }
            }
            None => spec.host.push_str(".changed"),
        }
        prop_assert_ne!(PolicySet::new(changed).unwrap().hash().to_string(), set.hash());
    }
}
