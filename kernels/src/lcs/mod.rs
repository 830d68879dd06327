//! LCS similarity: token sequences `[G, N, L]` with lengths `[G, N]` → `[G, N, N]` lengths of
//! the longest common subsequence of every pair in a group (what LCS diversity needs).
//! Results are integers and exactly equal to the dynamic-programming reference.

mod cpu;
mod reference;

use burn::backend::tensor::IntTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Int, Tensor};
pub use cpu::{lcs_group_bit_parallel, lcs_length_bit_parallel};
pub use reference::{lcs_group_dp, lcs_length_dp, lcs_similarity_reference};

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

/// Host-side driver shared by the implementations: `lcs_group` turns one group's sequences
/// (cut to their lengths) into its `[N, N]` matrix; groups run in parallel.
pub(crate) fn group_sequences(
    tokens: &[i64],
    lengths: &[i64],
    g: usize,
    n: usize,
    l: usize,
    lcs_group: impl Fn(&[&[i64]]) -> Vec<i64> + Sync,
) -> Vec<i64> {
    use rayon::prelude::*;
    let mut out = vec![-1i64; g * n * n]; // poisoned: every pair must be written
    out.par_chunks_mut((n * n).max(1)).enumerate().for_each(|(group, dst)| {
        let seqs: Vec<&[i64]> = (0..n)
            .map(|i| {
                let len = (lengths[group * n + i].max(0) as usize).min(l);
                &tokens[(group * n + i) * l..(group * n + i) * l + len]
            })
            .collect();
        dst.copy_from_slice(&lcs_group(&seqs));
    });
    out
}

