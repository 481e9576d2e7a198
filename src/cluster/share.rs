//! Max-min fair shares of a cluster's budget: pure arithmetic, the same in every instance.
//!
//! Part of the cluster coordination: each instance computes every instance's share from the
//! demands all of them published (docs/cluster.md, "Follows demand") and acts on its own.

/// Max-min fair shares of `total` among `demands`: everyone asking less than an equal share
/// gets what it asks, the rest is split evenly among the others (the remainder going to the
/// first in order, so every instance computes the same shares).
pub fn max_min(demands: &[usize], total: usize) -> Vec<usize> {
    weighted(demands, &vec![1; demands.len()], total)
}

/// Weighted max-min fair shares of `total` among `demands`: each claimant's part is in
/// proportion to its weight (the identities waiting there, at least 1), nobody gets more than
/// it asks, and what one does not take goes to the others by the same rule. Slots too few to
/// split by weight go one each, heaviest first (ties in order), so every instance computes
/// the same shares.
pub fn weighted(demands: &[usize], weights: &[usize], total: usize) -> Vec<usize> {
    let w = |i: usize| weights.get(i).copied().unwrap_or(1).max(1);
    let mut share = vec![0; demands.len()];
    let mut left = total;
    loop {
        let open: Vec<usize> = (0..demands.len()).filter(|&i| share[i] < demands[i]).collect();
        if open.is_empty() || left == 0 {
            return share;
        }
        let sum: usize = open.iter().map(|&i| w(i)).sum();
        let mut gave = 0;
        for &i in &open {
            let give = (left * w(i) / sum).min(demands[i] - share[i]);
            share[i] += give;
            gave += give;
        }
        left -= gave;
        if gave == 0 {
            let mut order = open;
            order.sort_by_key(|&i| std::cmp::Reverse(w(i)));
            for i in order.into_iter().take(left) {
                share[i] += 1;
            }
            return share;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::max_min;

    #[test]
    fn small_demands_are_met_and_the_rest_is_split_evenly() {
        assert_eq!(max_min(&[2, 30, 30], 20), vec![2, 9, 9]);
        assert_eq!(max_min(&[1, 1, 40], 20), vec![1, 1, 18]);
        assert_eq!(max_min(&[5, 5, 5], 20), vec![5, 5, 5]);
        assert_eq!(max_min(&[30, 30, 30], 20), vec![7, 7, 6]);
        assert_eq!(max_min(&[0, 3], 2), vec![0, 2]);
        assert_eq!(max_min(&[4, 4, 4], 2), vec![1, 1, 0]);
    }

    #[test]
    fn shares_follow_the_identities_waiting() {
        use super::weighted;
        // Two instances want everything: one with 3 identities waiting, one with 1.
        assert_eq!(weighted(&[30, 30], &[3, 1], 20), vec![15, 5]);
        // What the heavy one does not want goes to the other.
        assert_eq!(weighted(&[4, 30], &[3, 1], 20), vec![4, 16]);
        assert_eq!(weighted(&[30, 30, 30], &[2, 1, 1], 20), vec![10, 5, 5]);
        // Too few slots to split by weight: the heaviest first.
        assert_eq!(weighted(&[5, 5, 5], &[1, 3, 1], 2), vec![0, 2, 0]);
        assert_eq!(weighted(&[5, 5, 5], &[1, 3, 1], 1), vec![0, 1, 0]);
        for seed in 0u64..2000 {
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let mut next = || {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 33) as usize
            };
            let n = 1 + next() % 6;
            let demands: Vec<usize> = (0..n).map(|_| next() % 30).collect();
            let weights: Vec<usize> = (0..n).map(|_| next() % 5).collect();
            let total = next() % 40;
            let s = weighted(&demands, &weights, total);
            assert!(s.iter().sum::<usize>() <= total);
            assert!(s.iter().zip(&demands).all(|(s, d)| s <= d));
            if s.iter().sum::<usize>() < total {
                assert_eq!(s, demands);
            }
        }
    }

    #[test]
    fn shares_never_exceed_the_total_nor_a_demand() {
        for seed in 0u64..2000 {
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mut next = || {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 33) as usize
            };
            let n = 1 + next() % 6;
            let demands: Vec<usize> = (0..n).map(|_| next() % 30).collect();
            let total = next() % 40;
            let s = max_min(&demands, total);
            assert!(s.iter().sum::<usize>() <= total);
            assert!(s.iter().zip(&demands).all(|(s, d)| s <= d));
            // Work-conserving: slots are left over only when every demand is met.
            if s.iter().sum::<usize>() < total {
                assert_eq!(s, demands);
            }
        }
    }
}
