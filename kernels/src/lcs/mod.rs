//! LCS similarity: token sequences `[G, N, L]` with lengths `[G, N]` → `[G, N, N]` lengths of
//! the longest common subsequence of every pair in a group (what LCS diversity needs).
//! Results are integers and exactly equal to the dynamic-programming reference.

mod cpu;
mod reference;

use burn::backend::tensor::IntTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Int, Tensor};
pub use cpu::lcs_length_bit_parallel;
pub use reference::{lcs_length_dp, lcs_similarity_reference};

/// Which implementation computes LCS lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LcsImpl {
    /// The O(L²) dynamic program per pair.
    Reference,
    /// Bit-parallel: O(L · ⌈L/64⌉) word operations per pair.
    #[default]
    Fused,
}

/// LCS similarity as a custom op (integers: no gradient).
#[backend_extension(Autodiff, Flex)]
pub trait LcsBackend: Backend {
    fn lcs_similarity(tokens: IntTensor<Self>, lengths: IntTensor<Self>) -> IntTensor<Self>;
}

impl<B: LcsBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> LcsBackend for burn::backend::Autodiff<B, C> {
    fn lcs_similarity(tokens: IntTensor<Self>, lengths: IntTensor<Self>) -> IntTensor<Self> {
        B::lcs_similarity(tokens, lengths)
    }
}

/// `tokens [G, N, L]`, `lengths [G, N]` → `[G, N, N]` LCS lengths.
pub fn lcs_similarity(tokens: Tensor<3, Int>, lengths: Tensor<2, Int>, implementation: LcsImpl) -> Tensor<3, Int> {
    match implementation {
        LcsImpl::Reference => lcs_similarity_reference(tokens, lengths),
        LcsImpl::Fused => Tensor::from_dispatch(<Dispatch as LcsBackend>::lcs_similarity(tokens.into_dispatch(), lengths.into_dispatch())),
    }
}

/// Host-side driver shared by the implementations: every pair of every group.
pub(crate) fn all_pairs(tokens: &[i64], lengths: &[i64], g: usize, n: usize, l: usize, lcs: impl Fn(&[i64], &[i64]) -> usize + Sync) -> Vec<i64> {
    use rayon::prelude::*;
    let mut out = vec![-1i64; g * n * n]; // poisoned: every pair must be written
    out.par_chunks_mut((n * n).max(1)).enumerate().for_each(|(group, dst)| {
        let seq = |i: usize| {
            let len = (lengths[group * n + i].max(0) as usize).min(l);
            &tokens[(group * n + i) * l..(group * n + i) * l + len]
        };
        for i in 0..n {
            dst[i * n + i] = seq(i).len() as i64;
            for j in i + 1..n {
                let v = lcs(seq(i), seq(j)) as i64;
                dst[i * n + j] = v;
                dst[j * n + i] = v;
            }
        }
    });
    out
}
