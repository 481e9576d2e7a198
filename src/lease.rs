//! Leases: how a budget of slots is split among the holders that share it, by what each
//! has in use and has waiting.
//!
//! Pure functions at the bottom of the crate, used wherever slots are leased: a pool's
//! slots among its per-core parts (`pool::shards`), an identity's server cap among the
//! cores' admission schedulers (`admission::cores`). A holder is never planned below what it
//! holds for whole sessions; what it holds for transactions comes back within one and goes
//! where clients wait. Whoever applies a plan keeps the cap exact while slots move (lowering
//! first, raising only by what is free).

/// One holder's demand on the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Demand {
    /// Grants (connections) in use.
    pub(crate) busy: usize,
    /// Clients waiting.
    pub(crate) waiting: usize,
    /// Of `busy`, what is held for whole sessions (or pinned): it does not come back soon.
    pub(crate) held: usize,
}

/// New leases when a core's clients wait while its fair part of `share` is larger than its
/// lease, or the leases do not add up to `share`; None to leave them.
pub(crate) fn plan(share: usize, leases: &[usize], demand: &[Demand]) -> Option<Vec<usize>> {
    let want: Vec<usize> = demand.iter().map(|d| d.busy + d.waiting).collect();
    let fair = water_fill(share, &want, leases);
    let total: usize = leases.iter().sum();
    let needy = (0..leases.len()).any(|k| demand[k].waiting > 0 && leases[k] < fair[k]);
    let spare = total < share && demand.iter().any(|d| d.waiting > 0);
    if !needy && !spare && total == share {
        return None;
    }
    // Everyone's fair part, but no less than it holds for whole sessions (a connection held
    // for a session, or pinned, does not come back soon: a lease cut below it would leave
    // the other core's grants without a connection; one held for a transaction comes back
    // within it and goes to the core whose lease grew); then what is left to those that
    // hold it now, then evenly.
    let mut new = keep_in_use(share, fair, leases, demand);
    let mut left = share.saturating_sub(new.iter().sum::<usize>());
    for k in 0..new.len() {
        let keep = leases[k].saturating_sub(new[k]).min(left);
        new[k] += keep;
        left -= keep;
    }
    for k in (0..new.len()).cycle().take(left) {
        new[k] += 1;
    }
    (new != leases).then_some(new)
}

/// `fair`, raised so no core's lease falls below what it holds for whole sessions (nor
/// below its lease now, when that is less), the raise taken back from the cores that would
/// grow most.
fn keep_in_use(share: usize, mut fair: Vec<usize>, leases: &[usize], demand: &[Demand]) -> Vec<usize> {
    let floor: Vec<usize> = (0..fair.len()).map(|k| leases[k].min(demand[k].held)).collect();
    for k in 0..fair.len() {
        fair[k] = fair[k].max(floor[k]);
    }
    while fair.iter().sum::<usize>() > share {
        let grower = (0..fair.len())
            .filter(|&k| fair[k] > floor[k])
            .max_by_key(|&k| fair[k].saturating_sub(leases[k]));
        match grower {
            Some(k) => fair[k] -= 1,
            None => break,
        }
    }
    fair
}

/// Leases that add up to `share` (after a resize, or a claim of pgvalve's own), where part
/// `k` has `open[k]` connections open. A cut takes lease no part uses first (the most unused
/// first), so an idle connection keeps its slot where it is; only what is left is cut, like
/// a growth, in proportion.
pub(crate) fn fit(share: usize, leases: &[usize], open: &[usize]) -> Vec<usize> {
    let mut new = leases.to_vec();
    let mut total: usize = new.iter().sum();
    while total > share {
        let unused = (0..new.len())
            .filter(|&k| new[k] > open[k])
            .max_by_key(|&k| (new[k] - open[k], new[k]));
        match unused {
            Some(k) => new[k] -= 1,
            None => break,
        }
        total -= 1;
    }
    proportional(share, &new)
}

/// Leases that add up to `share`, each cut or grown in proportion.
fn proportional(share: usize, leases: &[usize]) -> Vec<usize> {
    let total: usize = leases.iter().sum();
    if total == 0 {
        return even(share, leases.len());
    }
    let mut new: Vec<usize> = leases.iter().map(|&l| l * share / total).collect();
    let left = share - new.iter().sum::<usize>();
    for k in (0..new.len()).cycle().take(left) {
        new[k] += 1;
    }
    new
}

/// `share` split evenly over `n` cores (the first ones get the remainder).
pub(crate) fn even(share: usize, n: usize) -> Vec<usize> {
    (0..n).map(|k| share / n + usize::from(k < share % n)).collect()
}

/// Max-min fair parts of `share` for demands `want`: nobody gets more than it wants, and
/// what one does not want goes to the others equally. Units that cannot be split equally go
/// to the cores holding the larger leases now (so saturated cores keep what they hold).
fn water_fill(share: usize, want: &[usize], leases: &[usize]) -> Vec<usize> {
    let n = want.len();
    let mut got = vec![0; n];
    let mut left = share;
    loop {
        let open: Vec<usize> = (0..n).filter(|&k| got[k] < want[k]).collect();
        if open.is_empty() || left == 0 {
            return got;
        }
        let each = left / open.len();
        if each == 0 {
            let mut by_lease = open;
            by_lease.sort_by_key(|&k| std::cmp::Reverse(leases[k]));
            for k in by_lease.into_iter().take(left) {
                got[k] += 1;
            }
            return got;
        }
        for k in open {
            let add = each.min(want[k] - got[k]);
            got[k] += add;
            left -= add;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Demand whose connections are all held for whole sessions.
    fn d(busy: usize, waiting: usize) -> Demand {
        Demand {
            busy,
            waiting,
            held: busy,
        }
    }

    /// Demand whose connections are held for transactions (they come back soon).
    fn t(busy: usize, waiting: usize) -> Demand {
        Demand { busy, waiting, held: 0 }
    }

    #[test]
    fn leases_stay_while_every_core_is_served() {
        assert_eq!(plan(20, &[10, 10], &[d(3, 0), d(10, 0)]), None);
        assert_eq!(plan(20, &[10, 10], &[d(0, 0), d(0, 0)]), None);
    }

    #[test]
    fn a_waiting_core_gets_what_another_does_not_use() {
        assert_eq!(plan(20, &[10, 10], &[d(10, 5), d(2, 0)]), Some(vec![15, 5]));
        // All load on one core: it gets the whole pool.
        assert_eq!(plan(20, &[10, 10], &[d(10, 90), d(0, 0)]), Some(vec![20, 0]));
        assert_eq!(plan(1, &[1, 0], &[d(0, 0), d(0, 1)]), Some(vec![0, 1]));
    }

    #[test]
    fn saturated_cores_keep_equal_parts_without_trading() {
        assert_eq!(plan(20, &[10, 10], &[d(10, 200), d(10, 30)]), None);
        assert_eq!(plan(21, &[11, 10], &[d(11, 200), d(10, 300)]), None);
        // Unequal parts even out when both wait, as far as what is in use lets them.
        assert_eq!(plan(20, &[16, 4], &[d(16, 50), d(4, 50)]), None);
        assert_eq!(plan(20, &[16, 4], &[d(9, 50), d(4, 50)]), Some(vec![10, 10]));
    }

    #[test]
    fn saturated_cores_even_out_when_their_connections_come_back() {
        // Transaction mode, both cores' clients waiting: a lopsided split (left by a start
        // where one core's clients came first) evens out; the busy ones beyond the new lease
        // go to the other core as their transactions end.
        assert_eq!(plan(20, &[18, 2], &[t(18, 90), t(2, 108)]), Some(vec![10, 10]));
        assert_eq!(plan(20, &[10, 10], &[t(18, 90), t(2, 108)]), None, "and stays");
        // Connections held for sessions still keep their lease.
        let part = Demand {
            busy: 18,
            waiting: 90,
            held: 15,
        };
        assert_eq!(plan(20, &[18, 2], &[part, t(2, 108)]), Some(vec![15, 5]));
    }

    #[test]
    fn a_lease_is_never_cut_below_what_is_in_use() {
        // Core 0 holds 14 for whole sessions: core 1 gets only what is free.
        assert_eq!(plan(20, &[14, 6], &[d(14, 40), d(6, 30)]), None);
        assert_eq!(plan(20, &[14, 6], &[d(12, 40), d(6, 30)]), Some(vec![12, 8]));
    }

    #[test]
    fn leases_follow_a_new_share() {
        assert_eq!(fit(10, &[15, 5], &[15, 5]), vec![8, 2]);
        assert_eq!(fit(4, &[0, 0, 0], &[0, 0, 0]), vec![2, 1, 1]);
        assert_eq!(fit(30, &[15, 5], &[0, 0]), vec![23, 7]);
        assert_eq!(plan(30, &[10, 10], &[d(0, 0), d(0, 0)]), Some(vec![15, 15]));
        assert_eq!(even(5, 2), vec![3, 2]);
    }

    #[test]
    fn a_smaller_share_takes_unused_lease_first() {
        // Core 1 holds its one idle connection: the claim's slot comes from core 0's unused
        // lease, not from core 1's (which would hand the connection over or close it).
        assert_eq!(fit(3, &[3, 1], &[0, 1]), vec![2, 1]);
        assert_eq!(fit(2, &[2, 2], &[1, 2]), vec![1, 1]);
        assert_eq!(fit(10, &[12, 8], &[2, 8]), vec![2, 8]);
        // Every lease in use: the rest of the cut in proportion.
        assert_eq!(fit(10, &[15, 5], &[15, 5]), vec![8, 2]);
        assert_eq!(fit(6, &[6, 6], &[4, 6]), vec![3, 3]);
    }

    #[test]
    fn water_fill_is_max_min_fair() {
        assert_eq!(water_fill(20, &[3, 100], &[10, 10]), vec![3, 17]);
        assert_eq!(water_fill(20, &[100, 100, 100], &[0, 9, 0]), vec![7, 7, 6]);
    }
}
