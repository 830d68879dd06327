//! The fused diversity on the CPU (Flex): one pass per group over its unit vectors.

use rayon::prelude::*;

use crate::math::{sum_zip, with_widest_simd};

/// Norms below this count as zero (the reference clamps the same way).
const NORM_EPS: f32 = 1e-12;

/// `embeddings [G, N, D]` (flat) → diversity per group.
pub fn diversity_forward(embeddings: &[f32], groups: usize, n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; groups]; // poisoned: every group must be written
    out.par_iter_mut().enumerate().for_each(|(g, slot)| {
        *slot = if n < 2 {
            0.0
        } else {
            with_widest_simd(#[inline(always)] || {
                let group = &embeddings[g * n * d..(g + 1) * n * d];
                let mut sum = vec![0f32; d];
                let self_dots = unit_sum(group, d, &mut sum, |_, _| {});
                let pairs = dot(&sum, &sum) as f64 - self_dots;
                (1.0 - pairs / (n * (n - 1)) as f64) as f32
            })
        };
    });
    out
}

/// Gradient of `Σ_g grad[g] · diversity[g]` w.r.t. the embeddings:
/// `∂D/∂u_i = −2 (s − u_i) / (N(N−1))`, projected through the normalisation
/// `∂u/∂e = (I − u uᵀ) / ‖e‖`. Per group: one pass for the norms and `s`, one that writes
/// the gradient row by row (each row's unit vector formed once, in L1).
pub fn diversity_backward(embeddings: &[f32], grad: &[f32], groups: usize, n: usize, d: usize) -> Vec<f32> {
    assert_eq!(grad.len(), groups, "one upstream gradient per group");
    let mut out = vec![f32::NAN; embeddings.len()];
    out.par_chunks_mut((n * d).max(1)).enumerate().for_each(|(g, dst)| {
        if n < 2 || d == 0 {
            dst.fill(0.0);
            return;
        }
        with_widest_simd(#[inline(always)] || {
            let group = &embeddings[g * n * d..(g + 1) * n * d];
            let mut sum = vec![0f32; d];
            let mut norms = vec![0f32; n];
            unit_sum(group, d, &mut sum, |row, norm| norms[row] = norm);
            let coef = -2.0 * grad[g] / (n * (n - 1)) as f32;
            let mut u = vec![0f32; d];
            for ((e, &norm), dst) in group.chunks_exact(d).zip(&norms).zip(dst.chunks_exact_mut(d)) {
                // u = e / ‖e‖ (a division, as the reference does: in one dimension u is then
                // exactly ±1 and the projected gradient exactly 0); g_u = coef · (s − u);
                // result = (g_u − u (u·g_u)) / ‖e‖.
                u.iter_mut().zip(e).for_each(|(u, &x)| *u = x / norm);
                let u_dot_g = coef * dot_minus(&u, &sum);
                for ((o, &u), &s) in dst.iter_mut().zip(&u).zip(&sum) {
                    *o = (coef * (s - u) - u * u_dot_g) / norm;
                }
            }
        });
    });
    out
}

/// Adds each row's unit vector into `sum` (telling `clamped_norm(row, ‖e‖)` as it goes) and
/// returns `Σ ‖u_i‖²` (1 per nonzero row, 0 for a zero row).
#[inline(always)]
fn unit_sum(group: &[f32], d: usize, sum: &mut [f32], mut clamped_norm: impl FnMut(usize, f32)) -> f64 {
    let mut self_dots = 0f64;
    for (row, e) in group.chunks_exact(d).enumerate() {
        let length = dot(e, e).sqrt();
        let norm = length.max(NORM_EPS);
        clamped_norm(row, norm);
        for (s, &x) in sum.iter_mut().zip(e) {
            *s += x / norm;
        }
        self_dots += (length as f64 / norm as f64).powi(2);
    }
    self_dots
}

/// `Σ u_c (s_c − u_c)`.
#[inline(always)]
fn dot_minus(u: &[f32], s: &[f32]) -> f32 {
    sum_zip(u, s, |u, s| u * (s - u))
}

/// `a · b`.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_zip(a, b, |x, y| x * y)
}

mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;

    use super::{diversity_backward, diversity_forward};
    use crate::diversity::DiversityBackend;

    use crate::flex_tensors::{contiguous_f32 as contiguous, f32_values as values};

    impl DiversityBackend for Flex {
        fn pairwise_cosine_diversity(embeddings: FloatTensor<Self>) -> FloatTensor<Self> {
            let s = embeddings.layout().shape();
            let (g, n, d) = (s[0], s[1], s[2]);
            let e = contiguous(&embeddings);
            FlexTensor::from_data(TensorData::new(diversity_forward(values(&e), g, n, d), vec![g]))
        }

        fn pairwise_cosine_diversity_backward(embeddings: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
            let s = embeddings.layout().shape();
            let (g, n, d) = (s[0], s[1], s[2]);
            let (e, grad) = (contiguous(&embeddings), contiguous(&grad));
            let out = diversity_backward(values(&e), values(&grad), g, n, d);
            FlexTensor::from_data(TensorData::new(out, vec![g, n, d]))
        }
    }
}
