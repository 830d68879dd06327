//! The fused diversity on the CPU (Flex): one pass per group over its unit vectors.

use rayon::prelude::*;

use crate::math::{output_buffer, sum_zip, with_widest_simd};

/// Norms below this count as zero (the reference clamps the same way).
const NORM_EPS: f32 = 1e-12;

/// `embeddings [G, N, D]` (flat) → diversity per group.
pub fn diversity_forward(embeddings: &[f32], groups: usize, n: usize, d: usize) -> Vec<f32> {
    let mut out = output_buffer(groups);
    out.par_iter_mut().enumerate().for_each_init(
        || vec![0f32; d],
        |sum, (g, slot)| {
            *slot = if n < 2 {
                0.0
            } else {
                with_widest_simd(#[inline(always)] || {
                    let group = &embeddings[g * n * d..(g + 1) * n * d];
                    let self_dots = unit_sum(group, d, sum, |_, _| {});
                    let pairs = dot(sum, sum) as f64 - self_dots;
                    (1.0 - pairs / (n * (n - 1)) as f64) as f32
                })
            };
        },
    );
    out
}

/// Gradient of `Σ_g grad[g] · diversity[g]` w.r.t. the embeddings:
/// `∂D/∂u_i = −2 (s − u_i) / (N(N−1))`, projected through the normalisation
/// `∂u/∂e = (I − u uᵀ) / ‖e‖`. Per group: one pass over the embeddings for the norms and `s`,
/// then one that writes the gradient row by row; the group (N·D floats) is still in cache for
/// the second, so memory sees one read and one write.
pub fn diversity_backward(embeddings: &[f32], grad: &[f32], groups: usize, n: usize, d: usize) -> Vec<f32> {
    assert_eq!(grad.len(), groups, "one upstream gradient per group");
    let mut out = output_buffer(embeddings.len());
    out.par_chunks_mut((n * d).max(1)).enumerate().for_each_init(
        || (vec![0f32; d], vec![0f32; n]),
        |(sum, norms), (g, dst)| {
            if n < 2 || d == 0 {
                dst.fill(0.0);
                return;
            }
            with_widest_simd(#[inline(always)] || {
                let group = &embeddings[g * n * d..(g + 1) * n * d];
                unit_sum(group, d, sum, |row, norm| norms[row] = norm);
                let coef = -2.0 * grad[g] / (n * (n - 1)) as f32;
                for ((e, &norm), dst) in group.chunks_exact(d).zip(norms.iter()).zip(dst.chunks_exact_mut(d)) {
                    let inverse = 1.0 / norm;
                    if d == 1 {
                        // In one dimension u = ±1, exactly only by division (x · (1/‖x‖) can
                        // miss by an ulp, which the 1/‖e‖ would scale up): then the projected
                        // gradient is exactly 0, as the reference's.
                        project_row(e, sum, dst, coef, inverse, |x| x / norm);
                    } else {
                        project_row(e, sum, dst, coef, inverse, |x| x * inverse);
                    }
                }
            });
        },
    );
    out
}

/// One row's gradient: `g_u = coef · (s − u)`, `(g_u − u (u·g_u)) / ‖e‖`, with
/// `u = unit(e)` formed on the fly in both passes over the row (no stored copy).
#[inline(always)]
fn project_row(e: &[f32], sum: &[f32], dst: &mut [f32], coef: f32, inverse_norm: f32, unit: impl Fn(f32) -> f32) {
    let u_dot_g = coef
        * sum_zip(e, sum, |x, s| {
            let u = unit(x);
            u * (s - u)
        });
    for ((o, &x), &s) in dst.iter_mut().zip(e).zip(sum) {
        let u = unit(x);
        *o = (coef * (s - u) - u * u_dot_g) * inverse_norm;
    }
}

/// Overwrites `sum` with the sum of the rows' unit vectors (telling `clamped_norm(row, ‖e‖)`
/// as it goes) and returns `Σ ‖u_i‖²` (1 per nonzero row, 0 for a zero row).
#[inline(always)]
fn unit_sum(group: &[f32], d: usize, sum: &mut [f32], mut clamped_norm: impl FnMut(usize, f32)) -> f64 {
    sum.fill(0.0);
    let mut self_dots = 0f64;
    for (row, e) in group.chunks_exact(d).enumerate() {
        let length = dot(e, e).sqrt();
        let norm = length.max(NORM_EPS);
        clamped_norm(row, norm);
        let inverse = 1.0 / norm;
        for (s, &x) in sum.iter_mut().zip(e) {
            *s += x * inverse;
        }
        self_dots += (length as f64 / norm as f64).powi(2);
    }
    self_dots
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
