//! The fixed hashes behind sticky splits.
//!
//! Every sidecar, on every machine and after every restart or upgrade, must send a
//! given user to the same side of a weighted split; otherwise a user would flap
//! between versions. So the hashes are unseeded and fixed.
//!
//! `ordered` (the default): 64-bit FNV-1a of the header value's bytes, reduced
//! modulo 10000 to a point in `[0, 10000)`. Each backend covers a share of the
//! points proportional to its weight, consecutive in file order (with weights
//! summing to 100, `weight × 100` points), so raising a canary listed last from 10
//! to 20 moves users only into the canary.
//!
//! `rendezvous`: weighted rendezvous hashing. Each backend with weight `w` gets the
//! key `-log2(u) / w`, where `u` in `(0, 1]` comes from a fixed hash of (value, a
//! zero byte, backend name); the lowest key wins. A backend's key depends only on
//! its own name and weight, so the listing order never matters and changing one
//! weight moves users only into or out of that backend. The logarithm is an integer
//! fixed-point one and the keys are compared by cross-multiplication, so every
//! platform gives the same answer.

use indexmap::IndexMap;

/// Number of points a sticky split hashes onto (a weight of 1% covers 100).
pub const STICKY_POINTS: u32 = 10_000;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    })
}

/// The point in `[0, 10000)` of a sticky split's header value.
///
/// This function must never change: sidecars of different releases compare its
/// results, and changing it would move users between backends.
pub fn sticky_point(value: &[u8]) -> u32 {
    // The remainder is below 10000, so it always fits.
    (fnv1a64(value) % u64::from(STICKY_POINTS)) as u32
}

/// The backend that owns `point` (in `[0, 10000)`, from [`sticky_point`] or drawn at
/// random) when `weights` (of any total above zero) are walked in file order.
///
/// Backend `i` owns the points `p` with `p × total < (w₀ + … + wᵢ) × 10000`: exact
/// for every total, and for weights summing to 100, `weight × 100` points each.
pub fn weighted_backend(weights: &IndexMap<String, u32>, point: u32) -> Option<&str> {
    let total: u64 = weights.values().map(|w| u64::from(*w)).sum();
    let mut end = 0u64;
    for (name, w) in weights {
        end += u64::from(*w);
        if *w > 0 && u64::from(point) * total < end * u64::from(STICKY_POINTS) {
            return Some(name);
        }
    }
    None
}

/// Murmur3's 64-bit finaliser: FNV-1a mixes its last bytes into the low bits only,
/// so backend names that differ in one letter would get nearly equal hashes.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// FNV-1a state after `value` and the zero byte that separates it from a backend
/// name (header values never contain a zero byte, so the pair is unambiguous).
fn rendezvous_prefix(value: &[u8]) -> u64 {
    fnv_continue(fnv1a64(value), &[0])
}

fn fnv_continue(state: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(state, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME))
}

/// The fixed hash of (value, 0, backend name) behind a rendezvous split.
///
/// This function must never change, for the same reason as [`sticky_point`].
pub fn rendezvous_hash(value: &[u8], backend: &str) -> u64 {
    fmix64(fnv_continue(rendezvous_prefix(value), backend.as_bytes()))
}

/// Fractional bits of the fixed-point logarithm.
const LOG_FRACTION_BITS: u32 = 32;

/// `log2(x)` for `x` in `[1, 2^64]`, in fixed point with 32 fractional bits, by
/// repeated squaring of the mantissa: integer arithmetic only, the same everywhere.
fn log2_fixed(x: u128) -> u64 {
    debug_assert!((1..=1u128 << 64).contains(&x));
    let int_part = 127 - x.leading_zeros();
    // The mantissa x / 2^int_part in [1, 2), with 62 fractional bits.
    let mut m: u128 = if int_part >= 62 {
        x >> (int_part - 62)
    } else {
        x << (62 - int_part)
    };
    let mut frac = 0u64;
    for bit in (0..LOG_FRACTION_BITS).rev() {
        m = (m * m) >> 62;
        if m >= 1 << 63 {
            m >>= 1;
            frac |= 1 << bit;
        }
    }
    (u64::from(int_part) << LOG_FRACTION_BITS) | frac
}

/// `-log2(u)` for `u = (hash + 1) / 2^64` in `(0, 1]`, fixed point: the unweighted key.
fn rendezvous_distance(hash: u64) -> u64 {
    (64u64 << LOG_FRACTION_BITS) - log2_fixed(u128::from(hash) + 1)
}

/// The position in `candidates` (name and weight) of the backend a rendezvous
/// split sends `value` to; `None` when every weight is zero.
///
/// The lowest `distance / weight` wins, compared exactly as
/// `distance_a × weight_b < distance_b × weight_a`; a tie goes to the smaller name,
/// so the choice never depends on the order of `candidates`.
pub fn rendezvous_backend<'a>(
    value: &[u8],
    candidates: impl IntoIterator<Item = (&'a str, u32)>,
) -> Option<usize> {
    let prefix = rendezvous_prefix(value);
    let mut best: Option<(usize, &str, u64, u32)> = None;
    for (i, (name, weight)) in candidates.into_iter().enumerate() {
        if weight == 0 {
            continue;
        }
        let d = rendezvous_distance(fmix64(fnv_continue(prefix, name.as_bytes())));
        let better = match best {
            None => true,
            Some((_, bname, bd, bw)) => {
                let (lhs, rhs) = (
                    u128::from(d) * u128::from(bw),
                    u128::from(bd) * u128::from(weight),
                );
                lhs < rhs || (lhs == rhs && name < bname)
            }
        };
        if better {
            best = Some((i, name, d, weight));
        }
    }
    best.map(|(i, ..)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fnv1a64_matches_the_published_vectors() {
        // Test vectors from the FNV reference (draft-eastlake-fnv).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            sticky_point(b"foobar"),
            (0x8594_4171_f739_67e8_u64 % 10_000) as u32
        );
    }

    #[test]
    fn points_spread_evenly() {
        let mut buckets = [0u32; 10];
        for i in 0..100_000 {
            let p = sticky_point(format!("user-{i}").as_bytes());
            assert!(p < STICKY_POINTS);
            buckets[(p / 1_000) as usize] += 1;
        }
        for b in buckets {
            assert!((9_000..=11_000).contains(&b), "uneven: {buckets:?}");
        }
    }

    fn split(stable: u32) -> IndexMap<String, u32> {
        IndexMap::from([
            ("stable".to_string(), stable),
            ("canary".to_string(), 100 - stable),
        ])
    }

    #[test]
    fn log2_fixed_is_exact_at_powers_of_two_and_close_elsewhere() {
        for k in 0..=64u32 {
            assert_eq!(log2_fixed(1u128 << k), u64::from(k) << LOG_FRACTION_BITS);
        }
        // Checked against the float logarithm only here, never in a decision.
        for x in [3u128, 10, 1_000_003, 0xdead_beef_cafe, u128::from(u64::MAX)] {
            let want = (x as f64).log2();
            let got = log2_fixed(x) as f64 / f64::from(1u32 << 31) / 2.0;
            assert!((want - got).abs() < 1e-8, "{x}: {got} vs {want}");
        }
    }

    #[test]
    fn rendezvous_hash_is_pinned() {
        // Golden values: a change here moves users between backends.
        assert_eq!(rendezvous_hash(b"user-1", "log-v1"), GOLDEN_HASH);
        let both = [("log-v1", 90), ("log-v2", 10)];
        let picks: Vec<usize> = (0..12)
            .map(|i| rendezvous_backend(format!("user-{i}").as_bytes(), both).unwrap())
            .collect();
        assert_eq!(picks, GOLDEN_PICKS);
        let three = [("a", 1), ("b", 2), ("c", 3)];
        let picks: Vec<usize> = (0..12)
            .map(|i| rendezvous_backend(format!("user-{i}").as_bytes(), three).unwrap())
            .collect();
        assert_eq!(picks, GOLDEN_PICKS_THREE);
        assert_eq!(rendezvous_backend(b"x", [("a", 0), ("b", 0)]), None);
        // The unweighted key is -log2((hash + 1) / 2^64): 64 for the lowest hash, 1 for
        // the middle one, 0 for the highest; exact, not close.
        assert_eq!(rendezvous_distance(0), 64 << LOG_FRACTION_BITS);
        assert_eq!(rendezvous_distance((1 << 63) - 1), 1 << LOG_FRACTION_BITS);
        assert_eq!(rendezvous_distance(u64::MAX), 0);
    }

    // Cross-checked with an independent implementation using the float logarithm.
    const GOLDEN_HASH: u64 = 16_805_729_231_903_761_881;
    const GOLDEN_PICKS: [usize; 12] = [0, 0, 1, 1, 0, 1, 0, 1, 0, 0, 0, 0];
    const GOLDEN_PICKS_THREE: [usize; 12] = [1, 2, 2, 1, 2, 1, 2, 1, 2, 0, 2, 2];

    /// Shares of 100,000 users, in percent, per candidate.
    fn rendezvous_shares(weights: &[(&str, u32)]) -> Vec<f64> {
        let mut counts = vec![0u32; weights.len()];
        for i in 0..100_000 {
            let key = format!("user-{i}");
            counts[rendezvous_backend(key.as_bytes(), weights.iter().copied()).unwrap()] += 1;
        }
        counts.iter().map(|c| f64::from(*c) / 1_000.0).collect()
    }

    #[test]
    fn rendezvous_shares_follow_the_weights() {
        for weights in [
            vec![("log-v1", 90), ("log-v2", 10)],
            vec![("a", 1), ("b", 2), ("c", 3)],
            vec![("stable", 999), ("canary", 1)],
            vec![("x1", 25), ("x2", 25), ("x3", 25), ("x4", 25)],
        ] {
            let total: u32 = weights.iter().map(|(_, w)| w).sum();
            let shares = rendezvous_shares(&weights);
            for ((name, w), share) in weights.iter().zip(&shares) {
                let want = 100.0 * f64::from(*w) / f64::from(total);
                // 100,000 draws: the standard deviation of a share is at most 0.16 points.
                assert!((share - want).abs() < 1.0, "{name}: {share}% for {want}%");
            }
        }
    }

    #[test]
    fn ordered_walk_keeps_proportions_of_any_total() {
        let weights = IndexMap::from([("a".to_string(), 1), ("b".to_string(), 2)]);
        let owners: Vec<&str> = (0..STICKY_POINTS)
            .map(|p| weighted_backend(&weights, p).unwrap())
            .collect();
        // 10000 / 3 = 3333.3…: a owns points 0..=3333, b the rest.
        assert_eq!(owners.iter().filter(|o| **o == "a").count(), 3334);
        let hundred = split(70);
        for p in 0..STICKY_POINTS {
            let want = if p < 7_000 { "stable" } else { "canary" };
            assert_eq!(weighted_backend(&hundred, p), Some(want));
        }
    }

    fn named_weights() -> impl Strategy<Value = Vec<(String, u32)>> {
        proptest::collection::btree_map("[a-z][a-z0-9-]{0,8}", 0u32..1_000, 1..6)
            .prop_map(|m| m.into_iter().collect::<Vec<_>>())
            .prop_filter("some weight above zero", |v| v.iter().any(|(_, w)| *w > 0))
    }

    proptest! {
        #[test]
        fn ordered_shares_match_weights_of_any_total(weights in named_weights()) {
            let map: IndexMap<String, u32> = weights.iter().cloned().collect();
            let total: u64 = map.values().map(|w| u64::from(*w)).sum();
            for (name, w) in &map {
                let points = (0..STICKY_POINTS)
                    .filter(|p| weighted_backend(&map, *p) == Some(name.as_str()))
                    .count() as f64;
                let want = f64::from(STICKY_POINTS) * *w as f64 / total as f64;
                // Each boundary is exact up to one point.
                prop_assert!((points - want).abs() <= 1.0, "{name}: {points} for {want}");
            }
        }

        #[test]
        fn rendezvous_ignores_listing_order(
            weights in named_weights(),
            user in proptest::collection::vec(1u8..=255, 0..24),
            rotate in 0usize..6,
        ) {
            let as_ref = |v: &[(String, u32)]| -> Vec<(String, u32)> { v.to_vec() };
            let mut other = as_ref(&weights);
            other.reverse();
            let k = rotate % other.len();
            other.rotate_left(k);
            let pick = |v: &[(String, u32)]| {
                rendezvous_backend(&user, v.iter().map(|(n, w)| (n.as_str(), *w)))
                    .map(|i| v[i].0.clone())
            };
            prop_assert_eq!(pick(&weights), pick(&other));
        }

        #[test]
        fn rendezvous_moves_users_only_into_a_raised_and_out_of_a_lowered_backend(
            weights in named_weights(),
            which in 0usize..6,
            new_weight in 0u32..1_000,
        ) {
            let i = which % weights.len();
            let mut changed = weights.clone();
            changed[i].1 = new_weight;
            prop_assume!(changed.iter().any(|(_, w)| *w > 0));
            let raised = new_weight > weights[i].1;
            let name = weights[i].0.as_str();
            for u in 0..500 {
                let user = format!("u{u}");
                let pick = |v: &[(String, u32)]| {
                    let at = rendezvous_backend(user.as_bytes(), v.iter().map(|(n, w)| (n.as_str(), *w)));
                    v[at.unwrap()].0.clone()
                };
                let (before, after) = (pick(&weights), pick(&changed));
                if before != after {
                    if raised {
                        prop_assert_eq!(after.as_str(), name, "moved into another backend");
                    } else {
                        prop_assert_eq!(before.as_str(), name, "moved out of another backend");
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn raising_the_canary_only_moves_users_into_it(
            user in proptest::collection::vec(any::<u8>(), 0..32),
            canary in 0u32..100,
            more in 0u32..100,
        ) {
            let raised = (canary + more).min(100);
            let p = sticky_point(&user);
            let (old, new) = (split(100 - canary), split(100 - raised));
            let before = weighted_backend(&old, p).unwrap();
            let after = weighted_backend(&new, p).unwrap();
            prop_assert!(before == after || after == "canary");
        }
    }
}
