//! Diversity of a group of N replies to one prompt: semantic (embedding cosine distance),
//! distinct-n, self-BLEU and LCS diversity. Every metric has a defined value for empty replies
//! and for a group of one (a single reply has no pairs: diversity 0, self-BLEU 1); inputs that
//! cannot be scored (embeddings of different widths, non-finite values) are errors.

use std::collections::HashMap;
use std::hash::Hash;

use anyhow::{Result, bail};
use burn::tensor::Device;
use polyburn_kernels::lcs::{LcsImpl, lcs_group_dp, lcs_groups};

pub use crate::config::DiversityMetric;

/// Mean pairwise cosine distance, `1 − mean_{i≠j} cos(e_i, e_j)`, in [0, 2].
pub fn semantic_diversity(embeddings: &[Vec<f32>]) -> Result<f64> {
    Ok(mean_pair_distance(&semantic_distances(embeddings)?, embeddings.len()))
}

/// The `[n×n]` cosine distances `1 − cos(e_i, e_j)` (diagonal 0).
pub fn semantic_distances(embeddings: &[Vec<f32>]) -> Result<Vec<f64>> {
    let n = embeddings.len();
    let width = embeddings.first().map_or(0, Vec::len);
    if embeddings.iter().any(|e| e.len() != width) {
        bail!("semantic diversity: embeddings of different widths in one group");
    }
    if embeddings.iter().flatten().any(|v| !v.is_finite()) {
        bail!("semantic diversity: non-finite embedding values");
    }
    let unit: Vec<Vec<f64>> = embeddings
        .iter()
        .map(|e| {
            let norm = e.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
            e.iter().map(|&v| v as f64 / norm).collect()
        })
        .collect();
    let mut d = vec![0.0; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let distance = 1.0 - unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum::<f64>();
            d[i * n + j] = distance;
            d[j * n + i] = distance;
        }
    }
    Ok(d)
}

/// The mean of an `[n×n]` distance matrix over its `n(n−1)/2` pairs (0 for fewer than 2).
pub fn mean_pair_distance(distances: &[f64], n: usize) -> f64 {
    if n < 2 {
        return 0.0;
    }
    let total: f64 = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).map(|(i, j)| distances[i * n + j]).sum();
    total / (n * (n - 1) / 2) as f64
}

/// Distinct replies over all replies, comparing texts trimmed, lower-cased and with runs of
/// white space collapsed; in [1/N, 1] (0 for no replies).
pub fn distinct_replies(texts: &[String]) -> f64 {
    let normalised: std::collections::HashSet<String> =
        texts.iter().map(|t| t.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()).collect();
    if texts.is_empty() { 0.0 } else { normalised.len() as f64 / texts.len() as f64 }
}

fn ngrams<T: Hash + Eq + Clone>(tokens: &[T], n: usize) -> impl Iterator<Item = &[T]> {
    tokens.windows(n.max(1)).filter(move |_| tokens.len() >= n)
}

/// Unique n-grams over all n-grams, pooled over the group. No n-grams at all (every reply
/// shorter than n) gives 0.
pub fn distinct_n<T: Hash + Eq + Clone>(replies: &[Vec<T>], n: usize) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0usize;
    for r in replies {
        for g in ngrams(r, n) {
            seen.insert(g);
            total += 1;
        }
    }
    if total == 0 { 0.0 } else { seen.len() as f64 / total as f64 }
}

fn counts<T: Hash + Eq + Clone>(tokens: &[T], n: usize) -> HashMap<&[T], usize> {
    let mut c = HashMap::new();
    for g in ngrams(tokens, n) {
        *c.entry(g).or_insert(0) += 1;
    }
    c
}

/// Sentence BLEU-4 of `hypothesis` against `references`, uniform weights, with the brevity
/// penalty of the closest reference length and smoothing method 1 (ε = 0.1 added to zero
/// n-gram matches), as NLTK's `sentence_bleu` computes it.
pub fn bleu4<T: Hash + Eq + Clone>(hypothesis: &[T], references: &[&[T]]) -> f64 {
    const EPSILON: f64 = 0.1;
    if hypothesis.is_empty() || references.is_empty() {
        return 0.0;
    }
    let mut log_sum = 0.0;
    for n in 1..=4 {
        let hyp = counts(hypothesis, n);
        let mut max_ref: HashMap<&[T], usize> = HashMap::new();
        for r in references {
            for (g, c) in counts(r, n) {
                let m = max_ref.entry(g).or_insert(0);
                *m = (*m).max(c);
            }
        }
        let matched: usize = hyp.iter().map(|(g, c)| (*c).min(max_ref.get(g).copied().unwrap_or(0))).sum();
        let total = hypothesis.len().saturating_sub(n - 1).max(1);
        if n == 1 && matched == 0 {
            return 0.0; // NLTK: no unigram in common means BLEU 0, before any smoothing.
        }
        let precision = if matched == 0 { EPSILON / total as f64 } else { matched as f64 / total as f64 };
        log_sum += precision.ln() / 4.0;
    }
    let c = hypothesis.len();
    // Closest reference length; ties go to the shorter one.
    let r = references.iter().map(|r| r.len()).min_by_key(|&l| (l.abs_diff(c), l)).expect("references");
    let brevity = if c > r { 1.0 } else { (1.0 - r as f64 / c as f64).exp() };
    brevity * log_sum.exp()
}

/// Mean BLEU-4 of each reply against the others. A group of one scores 1 (no diversity).
pub fn self_bleu<T: Hash + Eq + Clone>(replies: &[Vec<T>]) -> f64 {
    if replies.len() < 2 {
        return 1.0;
    }
    let total: f64 = (0..replies.len())
        .map(|i| {
            let others: Vec<&[T]> = replies.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, r)| r.as_slice()).collect();
            bleu4(&replies[i], &others)
        })
        .sum();
    total / replies.len() as f64
}

/// `1 − mean over pairs of LCS(a, b) / max(|a|, |b|)` over token ids; two empty replies are
/// identical. LCS lengths come from the bit-parallel kernel or the dynamic program.
pub fn lcs_diversity(replies: &[Vec<u32>], implementation: LcsImpl) -> f64 {
    lcs_diversities(&[replies.to_vec()], implementation, &Device::flex(), u64::MAX)[0]
}

/// [`lcs_diversity`] of many groups in one batch: the fused LCS of all groups runs on the CPU,
/// or on `device` when it is a GPU and the batch has at least `gpu_min_cells` DP cells
/// (`kernels.lcs_gpu_min_cells`).
pub fn lcs_diversities(groups: &[Vec<Vec<u32>>], implementation: LcsImpl, device: &Device, gpu_min_cells: u64) -> Vec<f64> {
    let distances = lcs_distances(groups, implementation, device, gpu_min_cells);
    groups.iter().zip(&distances).map(|(g, d)| mean_pair_distance(d, g.len())).collect()
}

/// Each group's `[n×n]` LCS distances `1 − LCS(i, j) / longer length` (0 between two empty
/// replies), all groups in one batch.
pub fn lcs_distances(groups: &[Vec<Vec<u32>>], implementation: LcsImpl, device: &Device, gpu_min_cells: u64) -> Vec<Vec<f64>> {
    // Each sequence is converted (and, on the CPU, its bit masks built) once per batch.
    let ids: Vec<Vec<Vec<i64>>> = groups.iter().map(|g| g.iter().map(|r| r.iter().map(|&t| t as i64).collect()).collect()).collect();
    let seqs: Vec<Vec<&[i64]>> = ids.iter().map(|g| g.iter().map(Vec::as_slice).collect()).collect();
    let matrices = match implementation {
        LcsImpl::Fused => lcs_groups(&seqs, device, gpu_min_cells),
        LcsImpl::Reference => seqs.iter().map(|g| lcs_group_dp(g)).collect(),
    };
    groups
        .iter()
        .zip(&matrices)
        .map(|(g, lcs)| {
            let n = g.len();
            let mut d = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    let longer = g[i].len().max(g[j].len());
                    d[i * n + j] = if i == j || longer == 0 { 0.0 } else { 1.0 - lcs[i * n + j] as f64 / longer as f64 };
                }
            }
            d
        })
        .collect()
}

/// A lexical diversity of token sequences (every metric but `semantic`, which needs an encoder).
pub fn lexical_diversity(metric: DiversityMetric, replies: &[Vec<u32>], lcs: LcsImpl) -> Result<f64> {
    Ok(match metric {
        DiversityMetric::Distinct2 => distinct_n(replies, 2),
        DiversityMetric::SelfBleu => 1.0 - self_bleu(replies),
        DiversityMetric::Lcs => lcs_diversity(replies, lcs),
        DiversityMetric::Semantic => bail!("semantic diversity needs embeddings from a sentence encoder"),
        DiversityMetric::Distinct => bail!("distinct-reply diversity compares the decoded texts"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use polyburn_kernels::lcs::lcs_length_dp;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn semantic_diversity_of_known_geometries() {
        assert_eq!(semantic_diversity(&[vec![1.0, 0.0], vec![2.0, 0.0]]).unwrap(), 0.0);
        assert!((semantic_diversity(&[vec![1.0, 0.0], vec![0.0, 1.0]]).unwrap() - 1.0).abs() < 1e-12);
        assert!((semantic_diversity(&[vec![1.0, 0.0], vec![-1.0, 0.0]]).unwrap() - 2.0).abs() < 1e-12);
        assert_eq!(semantic_diversity(&[vec![1.0]]).unwrap(), 0.0);
        assert!(semantic_diversity(&[vec![1.0], vec![1.0, 2.0]]).is_err());
        assert!(semantic_diversity(&[vec![f32::NAN], vec![1.0]]).is_err());
    }

    #[test]
    fn distinct_n_pools_the_group() {
        let g = vec![words("a b c"), words("a b d")];
        assert_eq!(distinct_n(&g, 1), 4.0 / 6.0);
        assert_eq!(distinct_n(&g, 2), 3.0 / 4.0);
        assert_eq!(distinct_n(&[words("a")], 2), 0.0);
        assert_eq!(distinct_n::<String>(&[vec![], vec![]], 1), 0.0);
    }

    #[test]
    fn bleu_matches_nltk() {
        // nltk.translate.bleu_score.sentence_bleu(refs, hyp, smoothing_function=SmoothingFunction().method1)
        let hyp = words("the cat sat on the mat");
        let r1 = words("the cat is on the mat");
        let r2 = words("a cat sat on a mat");
        let b = bleu4(&hyp, &[&r1, &r2]);
        assert!((b - 0.35930411196308426).abs() < 1e-9, "{b}");
        let short = bleu4(&words("the cat"), &[&r1]);
        assert!((short - 0.04279677428117006).abs() < 1e-9, "{short}");
        assert_eq!(bleu4(&words("x y"), &[&r1]), 0.0);
        assert_eq!(bleu4(&Vec::<String>::new(), &[&r1]), 0.0);
    }

    #[test]
    fn self_bleu_and_lcs_diversity_of_identical_and_disjoint_groups() {
        let same = vec![words("one two three four five"); 3];
        assert!((self_bleu(&same) - 1.0).abs() < 1e-12);
        let disjoint = vec![words("a b c d"), words("e f g h")];
        assert_eq!(self_bleu(&disjoint), 0.0);
        assert_eq!(self_bleu(&[words("alone")]), 1.0);
        for lcs in [LcsImpl::Fused, LcsImpl::Reference] {
            assert_eq!(lcs_diversity(&vec![vec![1, 2, 3]; 3], lcs), 0.0);
            assert_eq!(lcs_diversity(&[vec![1, 2, 3, 4], vec![5, 6, 7, 8]], lcs), 1.0);
            // LCS(1 2 3 4, 2 4 9) = 2 of the longer 4.
            assert_eq!(lcs_diversity(&[vec![1, 2, 3, 4], vec![2, 4, 9]], lcs), 0.5);
            assert_eq!(lcs_diversity(&[vec![1]], lcs), 0.0);
            assert_eq!(lcs_diversity(&[vec![], vec![]], lcs), 0.0);
            assert_eq!(lcs_diversity(&[vec![], vec![1]], lcs), 1.0);
        }
    }

    #[test]
    fn lcs_length_by_dynamic_programming() {
        assert_eq!(lcs_length_dp(b"ABCBDAB", b"BDCABA"), 4);
        assert_eq!(lcs_length_dp(b"", b"abc"), 0);
        assert_eq!(lcs_length_dp(b"kitten", b"sitting"), 4);
    }
}
