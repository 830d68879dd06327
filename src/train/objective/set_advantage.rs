//! Per-reply advantages of `polychromic_rl` over the sets a prompt's K replies can form.
//!
//! A set S of n replies scores `f(S) = r̄(S) · d(S)`: its mean reward times its diversity.
//! `marginal` (the default) gives reply a the mean score of all size-n sets that contain it
//! minus the mean over all size-n sets, so a right reply is not dragged down by the wrong ones
//! it happened to be sampled beside; `partition` (the original form) cuts the K replies into
//! K/n consecutive sets and gives every reply its set's score minus the mean of the sets.
//!
//! Exact marginals for pairwise diversities. When `d(S)` is the mean over S's pairs of a
//! distance `d_jk` (semantic and LCS diversity), with `P = n(n−1)/2`,
//!
//! ```text
//! f(S) = 1/(n·P) · Σ_{i∈S} Σ_{{j,k}⊂S} r_i · d_jk,
//! ```
//!
//! a sum of (reply, pair) terms, each over the distinct replies `T = {i, j, k}` it involves
//! (|T| = 2 when i ∈ {j, k}, else 3). A uniformly drawn size-n set contains a given
//! m-element set with probability `C(K−m, n−m) / C(K, n)`; given that it contains a, with
//! probability `C(K−m, n−m) / C(K−1, n−1)` if a ∈ T and `C(K−1−m, n−1−m) / C(K−1, n−1)` if not.
//! So each mean is four sums of the terms — by |T| and by whether a is in T — weighted by
//! those probabilities; all of them come from the reward vector and the K×K distance matrix
//! in O(K²). And since every set has n members, `Σ_a E[f | a ∈ S] = K · E[f]`: the mean over
//! all sets is the mean of the per-reply marginals.
//!
//! Other diversities (distinct answers, distinct-2, self-BLEU) do not decompose; for them each
//! reply's marginal is estimated from `objective.n_subsets` seeded random sets containing it.

use crate::rng::SplitMix64;

pub use crate::config::SetAdvantage;

/// `C(n, k)` as a float (0 when k > n).
fn choose(n: usize, k: usize) -> f64 {
    if k > n {
        return 0.0;
    }
    let k = k.min(n - k);
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// Exact marginal set scores of K replies with `rewards` and a symmetric K×K `distances`
/// matrix (row-major; the diagonal is ignored) for sets of `n`: `E[f | a ∈ S]` per reply
/// (their mean is `E[f]`; [`centred`] turns them into advantages). Sets of fewer than 2 have
/// no pairs (diversity 0): every score is 0.
pub fn marginal_means_pairwise(rewards: &[f64], distances: &[f64], n: usize) -> Vec<f64> {
    let k = rewards.len();
    assert_eq!(distances.len(), k * k, "a K×K distance matrix");
    assert!(n <= k, "sets of {n} from {k} replies");
    if n < 2 {
        return vec![0.0; k];
    }
    let d = |j: usize, l: usize| distances[j * k + l];
    let total_reward: f64 = rewards.iter().sum();
    // Per reply a: Σ_{k≠a} d_ak, Σ_{k≠a} r_k d_ak.
    let row_sum: Vec<f64> = (0..k).map(|a| (0..k).filter(|&l| l != a).map(|l| d(a, l)).sum()).collect();
    let row_reward_sum: Vec<f64> = (0..k).map(|a| (0..k).filter(|&l| l != a).map(|l| rewards[l] * d(a, l)).sum()).collect();
    let all_pairs: f64 = row_sum.iter().sum::<f64>() / 2.0; // Σ_{j<l} d_jl
    // |T| = 2 terms: Σ_{j<l} (r_j + r_l) d_jl; |T| = 3 terms: Σ_{j<l} (R − r_j − r_l) d_jl.
    let two: f64 = (0..k).map(|a| rewards[a] * row_sum[a]).sum(); // each pair counted from both ends
    let three = total_reward * all_pairs - two;
    let pairs = (n * (n - 1) / 2) as f64;
    let scale = 1.0 / (n as f64 * pairs);
    let given = choose(k - 1, n - 1);
    // P(T ⊂ S | a ∈ S) for |T| = m with a ∈ T, and with a ∉ T.
    let inside = |m: usize| if n >= m { choose(k - m, n - m) / given } else { 0.0 };
    let outside = |m: usize| if n > m { choose(k - 1 - m, n - 1 - m) / given } else { 0.0 };
    (0..k)
        .map(|a| {
            // Terms whose T contains a. |T| = 2: the pairs {a, l}, weighted r_a + r_l.
            let two_in = rewards[a] * row_sum[a] + row_reward_sum[a];
            // |T| = 3: i = a with a pair not touching a, or a in the pair with a third reply i.
            let pairs_without_a = all_pairs - row_sum[a];
            let three_in = rewards[a] * pairs_without_a + (total_reward - rewards[a]) * row_sum[a] - row_reward_sum[a];
            scale * (two_in * inside(2) + (two - two_in) * outside(2) + three_in * inside(3) + (three - three_in) * outside(3))
        })
        .collect()
}

/// Each value minus their mean: marginal means → advantages.
pub fn centred(values: Vec<f64>) -> Vec<f64> {
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    values.into_iter().map(|v| v - mean).collect()
}

/// `n_subsets` random size-n sets containing each of the K replies, reply by reply (set
/// members as indices, the reply itself first).
pub fn sample_sets_containing_each(k: usize, n: usize, n_subsets: usize, rng: &mut SplitMix64) -> Vec<Vec<usize>> {
    let mut sets = Vec::with_capacity(k * n_subsets);
    for a in 0..k {
        let mut others: Vec<usize> = (0..k).filter(|&i| i != a).collect();
        for _ in 0..n_subsets {
            // Partial Fisher–Yates: the first n − 1 of `others` become a uniform draw.
            for i in 0..n.saturating_sub(1) {
                let j = i + rng.below((others.len() - i) as u64) as usize;
                others.swap(i, j);
            }
            let mut set = vec![a];
            set.extend_from_slice(&others[..n - 1]);
            sets.push(set);
        }
    }
    sets
}

/// Estimated marginal set scores from the scores of the sets [`sample_sets_containing_each`]
/// drew (in its order): per reply the mean of its sets' scores.
pub fn marginal_means_sampled(scores: &[f64], k: usize, n_subsets: usize) -> Vec<f64> {
    assert_eq!(scores.len(), k * n_subsets, "one score per sampled set");
    scores.chunks(n_subsets.max(1)).map(|s| s.iter().sum::<f64>() / s.len() as f64).collect()
}

/// `partition`: consecutive sets of n, each reply gets its set's score minus the mean of the
/// prompt's set scores.
pub fn partition_advantages(set_scores: &[f64], n: usize) -> Vec<f64> {
    centred(set_scores.to_vec()).into_iter().flat_map(|a| std::iter::repeat_n(a, n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f(S)` straight from its definition.
    fn set_score(set: &[usize], rewards: &[f64], distances: &[f64], k: usize) -> f64 {
        let n = set.len();
        let mean_reward = set.iter().map(|&i| rewards[i]).sum::<f64>() / n as f64;
        let mut d = 0.0;
        for x in 0..n {
            for y in x + 1..n {
                d += distances[set[x] * k + set[y]];
            }
        }
        mean_reward * d / (n * (n - 1) / 2) as f64
    }

    /// Every size-n subset of 0..k.
    fn subsets(k: usize, n: usize) -> Vec<Vec<usize>> {
        (0u32..1 << k).filter(|m| m.count_ones() as usize == n).map(|m| (0..k).filter(|i| m >> i & 1 == 1).collect()).collect()
    }

    fn random_case(k: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut rng = SplitMix64::new(seed);
        let rewards: Vec<f64> = (0..k).map(|_| if rng.below(3) == 0 { 0.0 } else { rng.next_f64() }).collect();
        let mut d = vec![0.0; k * k];
        for i in 0..k {
            for j in i + 1..k {
                let v = rng.next_f64();
                d[i * k + j] = v;
                d[j * k + i] = v;
            }
        }
        (rewards, d)
    }

    #[test]
    fn exact_marginals_equal_enumerating_every_subset() {
        for k in 2..=12 {
            for n in 2..=k {
                let (rewards, d) = random_case(k, (k * 100 + n) as u64);
                let all = subsets(k, n);
                let mean_all = all.iter().map(|s| set_score(s, &rewards, &d, k)).sum::<f64>() / all.len() as f64;
                let means = marginal_means_pairwise(&rewards, &d, n);
                let mean_of_means = means.iter().sum::<f64>() / k as f64;
                assert!((mean_of_means - mean_all).abs() < 1e-12, "K={k} n={n}: the mean of the marginals is the mean over all sets");
                let got = centred(means);
                for a in 0..k {
                    let with_a: Vec<&Vec<usize>> = all.iter().filter(|s| s.contains(&a)).collect();
                    let mean_a = with_a.iter().map(|s| set_score(s, &rewards, &d, k)).sum::<f64>() / with_a.len() as f64;
                    let want = mean_a - mean_all;
                    assert!((got[a] - want).abs() < 1e-12, "K={k} n={n} reply {a}: {} vs {want}", got[a]);
                }
            }
        }
    }

    #[test]
    fn sampled_marginals_converge_to_the_exact_ones() {
        let (k, n) = (8, 3);
        let (rewards, d) = random_case(k, 5);
        let exact = centred(marginal_means_pairwise(&rewards, &d, n));
        let sets = sample_sets_containing_each(k, n, 4000, &mut SplitMix64::new(9));
        assert!(sets.iter().enumerate().all(|(i, s)| s[0] == i / 4000 && s.len() == n));
        assert!(sets.iter().all(|s| { let mut t = s.clone(); t.sort(); t.dedup(); t.len() == n }), "members are distinct");
        let scores: Vec<f64> = sets.iter().map(|s| set_score(s, &rewards, &d, k)).collect();
        let sampled = centred(marginal_means_sampled(&scores, k, 4000));
        for a in 0..k {
            assert!((sampled[a] - exact[a]).abs() < 0.01, "reply {a}: {} vs {}", sampled[a], exact[a]);
        }
    }

    #[test]
    fn marginal_advantages_single_out_the_right_reply_where_partition_cannot() {
        // Replies 0..4, sets of 2. Only reply 0 is right; all pairs equally distant.
        let (k, n) = (4, 2);
        let rewards = [1.0, 0.0, 0.0, 0.0];
        let d: Vec<f64> = (0..k * k).map(|i| if i / k == i % k { 0.0 } else { 1.0 }).collect();
        let marginal = centred(marginal_means_pairwise(&rewards, &d, n));
        assert!(marginal[0] > 0.0 && marginal[1..].iter().all(|&a| a < 0.0 && (a - marginal[1]).abs() < 1e-12), "{marginal:?}");
        // Partition: sets {0, 1} and {2, 3}; reply 1 (wrong) shares reply 0's advantage.
        let scores = [set_score(&[0, 1], &rewards, &d, k), set_score(&[2, 3], &rewards, &d, k)];
        assert_eq!(partition_advantages(&scores, n), vec![0.25, 0.25, -0.25, -0.25]);
    }

    #[test]
    fn sets_without_pairs_get_no_advantage() {
        assert_eq!(marginal_means_pairwise(&[1.0, 0.0], &[0.0, 1.0, 1.0, 0.0], 1), vec![0.0, 0.0]);
    }
}
