//! The fixed hash behind sticky splits.
//!
//! Every sidecar, on every machine and after every restart or upgrade, must send a
//! given user to the same side of a weighted split; otherwise a user would flap
//! between versions. So the hash is unseeded and fixed: 64-bit FNV-1a of the header
//! value's bytes, reduced modulo 10000 to a point in `[0, 10000)`. Weights are
//! percentages, each covering `weight × 100` consecutive points in file order, so
//! raising a canary listed last from 10 to 20 moves users only into the canary.

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
/// random) when `weights` (validated: summing to 100) are walked in file order.
pub fn weighted_backend(weights: &IndexMap<String, u32>, point: u32) -> Option<&str> {
    let mut end = 0u32;
    for (name, w) in weights {
        end = end.saturating_add(w.saturating_mul(STICKY_POINTS / 100));
        if point < end {
            return Some(name);
        }
    }
    None
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
