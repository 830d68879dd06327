//! LCS similarity: token sequences `[G, N, L]` with lengths `[G, N]` → `[G, N, N]` lengths of
//! the longest common subsequence of every pair in a group (what LCS diversity needs).
//! Results are integers and exactly equal to the dynamic-programming reference.

mod cpu;
#[cfg(feature = "cube")]
mod cube;
mod reference;

use burn::backend::tensor::IntTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Device, Int, Tensor, TensorData};
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
#[backend_extension(Autodiff, Flex, Cube: cfg(feature = "cube"), Fusion: cfg(feature = "cube"))]
pub trait LcsBackend: Backend {
    #[fusion(dtype = tokens, shape = pairs_per_group(tokens))]
    fn lcs_similarity(tokens: IntTensor<Self>, lengths: IntTensor<Self>) -> IntTensor<Self>;
}

impl<B: LcsBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> LcsBackend for burn::backend::Autodiff<B, C> {
    fn lcs_similarity(tokens: IntTensor<Self>, lengths: IntTensor<Self>) -> IntTensor<Self> {
        B::lcs_similarity(tokens, lengths)
    }
}

/// The `[G, N, N]` output shape of `[G, N, L]` tokens (Fusion's lazy graph needs it up front).
#[cfg(feature = "cube")]
fn pairs_per_group(tokens: &burn::tensor::Shape) -> burn::tensor::Shape {
    burn::tensor::Shape::new([tokens[0], tokens[1], tokens[1]])
}

/// `tokens [G, N, L]`, `lengths [G, N]` → `[G, N, N]` LCS lengths.
pub fn lcs_similarity(tokens: Tensor<3, Int>, lengths: Tensor<2, Int>, implementation: LcsImpl) -> Tensor<3, Int> {
    match implementation {
        LcsImpl::Reference => lcs_similarity_reference(tokens, lengths),
        LcsImpl::Fused => Tensor::from_dispatch(<Dispatch as LcsBackend>::lcs_similarity(tokens.into_dispatch(), lengths.into_dispatch())),
    }
}

/// Default of the `kernels.lcs_gpu_min_cells` config value: batches with fewer
/// dynamic-programming cells (`G · N² · L²`) than this run on the CPU even when the run's device
/// is a GPU; see [`lcs_groups`].
pub const DEFAULT_GPU_MIN_CELLS: u64 = 1 << 28;

/// Longest sequences the GPU kernel takes (it keeps three diagonals of the dynamic program in
/// shared memory); [`lcs_groups`] computes longer ones on the host.
pub const MAX_GPU_LENGTH: usize = 1023;

/// The `[N, N]` LCS matrix of each group of host sequences, fused. Every group must have the
/// same number of sequences for the GPU path. The bit-parallel CPU code runs unless `device` is
/// a Cube (GPU) device and the batch has at least `gpu_min_cells` DP cells: a small batch costs
/// more in transfers and a launch than it saves, and the CPU code does 64 cells per word
/// operation where a GPU unit does one.
pub fn lcs_groups(groups: &[Vec<&[i64]>], device: &Device, gpu_min_cells: u64) -> Vec<Vec<i64>> {
    let n = groups.first().map_or(0, Vec::len);
    let l = groups.iter().flatten().map(|s| s.len()).max().unwrap_or(0);
    let cells = (groups.len() as u64).saturating_mul((n * n) as u64).saturating_mul((l * l) as u64);
    let uniform = groups.iter().all(|g| g.len() == n);
    if !(crate::is_cube(device) && uniform && n > 0 && l <= MAX_GPU_LENGTH && cells >= gpu_min_cells) {
        use rayon::prelude::*;
        return groups.par_iter().map(|g| lcs_group_bit_parallel(g)).collect();
    }
    let mut tokens = vec![0i64; groups.len() * n * l];
    let mut lengths = Vec::with_capacity(groups.len() * n);
    for (s, seq) in groups.iter().flatten().enumerate() {
        tokens[s * l..s * l + seq.len()].copy_from_slice(seq);
        lengths.push(seq.len() as i64);
    }
    let tokens = Tensor::<3, Int>::from_data(TensorData::new(tokens, [groups.len(), n, l]), device);
    let lengths = Tensor::<2, Int>::from_data(TensorData::new(lengths, [groups.len(), n]), device);
    let all = lcs_similarity(tokens, lengths, LcsImpl::Fused).into_data().convert::<i64>().try_into_vec::<i64>().expect("int LCS lengths");
    all.chunks(n * n).map(<[i64]>::to_vec).collect()
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

