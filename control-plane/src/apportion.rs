//! Sharing a whole number out in proportion to weights, by largest remainders: a
//! rollout's other backends sharing the weight the canary leaves, and `convert`
//! writing a Gateway API route's weights as percentages a policy file takes.

/// `total` shared in proportion to `weights`: each gets the floor of its exact
/// share, and what is left goes one by one to the largest remainders (the earlier
/// weight first among equal ones). All weights 0 share equally. The shares always
/// sum to `total` (none when `weights` is empty).
pub(crate) fn apportion(total: u32, weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let sum: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let (weights, sum): (Vec<u64>, u64) = if sum == 0 {
        (vec![1; weights.len()], weights.len() as u64)
    } else {
        (weights.iter().map(|w| u64::from(*w)).collect(), sum)
    };
    let total = u64::from(total);
    let mut shares: Vec<(u64, u64)> = weights
        .iter()
        .map(|w| (total * w / sum, total * w % sum))
        .collect();
    let given: u64 = shares.iter().map(|(q, _)| q).sum();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    // Stable: among equal remainders the earlier weight goes first.
    order.sort_by_key(|i| std::cmp::Reverse(shares[*i].1));
    for i in order.into_iter().take((total - given) as usize) {
        shares[i].0 += 1;
    }
    shares
        .into_iter()
        .map(|(q, _)| u32::try_from(q).unwrap_or(u32::MAX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::apportion;

    #[test]
    fn shares_sum_to_the_total_by_largest_remainders() {
        assert_eq!(apportion(100, &[3, 0, 7]), [30, 0, 70]);
        assert_eq!(apportion(100, &[1, 1, 1]), [34, 33, 33]);
        assert_eq!(apportion(100, &[1, 2]), [33, 67]);
        assert_eq!(apportion(100, &[2, 1, 2]), [40, 20, 40]);
        assert_eq!(
            apportion(100, &[1, 1, 1, 1, 1, 1]),
            [17, 17, 17, 17, 16, 16]
        );
        assert_eq!(apportion(90, &[0, 0]), [45, 45], "all 0: equal shares");
        assert_eq!(apportion(7, &[1_000_000, 1]), [7, 0]);
        assert_eq!(apportion(100, &[]), Vec::<u32>::new());
        for weights in [[5u32, 5, 990], [333, 333, 334], [1, 1_000_000, 3]] {
            assert_eq!(
                apportion(100, &weights).iter().sum::<u32>(),
                100,
                "{weights:?}"
            );
        }
    }
}
