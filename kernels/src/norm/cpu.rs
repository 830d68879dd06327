//! LayerNorm / RMSNorm on the CPU (Flex): rows in parallel tasks of a fixed size, each row's
//! reductions vectorised. γ's and β's gradients are summed per task and then over the tasks in
//! order, so they do not depend on thread timing (bit-exact resume needs that).

use rayon::prelude::*;

use super::NormKind;
use crate::math::{output_buffer, sum_zip, with_widest_simd};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// `(y, [(μ, r) per row])` for rows of length `d`.
pub fn norm_forward_values(x: &[f32], gamma: &[f32], beta: &[f32], epsilon: f64, kind: NormKind) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    assert!(d > 0 && x.len() % d == 0 && beta.len() == d, "norm: input, γ and β sizes disagree");
    let mut y = output_buffer(x.len());
    let mut stats = output_buffer(2 * (x.len() / d));
    let task = ROWS_PER_TASK * d;
    y.par_chunks_mut(task).zip(stats.par_chunks_mut(2 * ROWS_PER_TASK)).zip(x.par_chunks(task)).for_each(|((y, stats), x)| {
        with_widest_simd(#[inline(always)] || {
            for ((y, stat), x) in y.chunks_exact_mut(d).zip(stats.chunks_exact_mut(2)).zip(x.chunks_exact(d)) {
                let (mean, rstd) = row_stats(x, epsilon, kind);
                for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                    *y = (x - mean) * rstd * g + b;
                }
                stat.copy_from_slice(&[mean, rstd]);
            }
        })
    });
    (y, stats)
}

/// `(μ, r)` of one row: two passes (mean, then centred squares) as PyTorch and Burn do, so a
/// large mean does not swallow the variance.
#[inline(always)]
fn row_stats(x: &[f32], epsilon: f64, kind: NormKind) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = match kind {
        NormKind::Layer => sum_zip(x, x, |x, _| x) / n,
        NormKind::Rms => 0.0,
    };
    let var = sum_zip(x, x, |x, _| (x - mean) * (x - mean)) / n;
    (mean, 1.0 / (var + epsilon as f32).sqrt())
}

/// The norm's backward with the upstream gradient `grad` (dy) overwritten by d x; returns
/// `(d γ, d β)`. With `x̂ = (x − μ)·r` and `g = dy ⊙ γ`,
/// `d x = r·(g − mean(g) − x̂·mean(g ⊙ x̂))` (LayerNorm) or `r·(g − x̂·mean(g ⊙ x̂))` (RMSNorm),
/// `d γ = Σ_rows dy ⊙ x̂`, `d β = Σ_rows dy`. Autodiff hands the gradient over, so the
/// backward allocates no buffer of the input's size.
pub fn norm_backward_in_place(x: &[f32], gamma: &[f32], stats: &[f32], grad: &mut [f32], kind: NormKind) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    assert!(x.len() == grad.len() && x.len() % d == 0 && stats.len() == 2 * (x.len() / d), "norm backward: sizes disagree");
    let task = ROWS_PER_TASK * d;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = grad
        .par_chunks_mut(task)
        .zip(x.par_chunks(task).zip(stats.par_chunks(2 * ROWS_PER_TASK)))
        .map(|(grad, (x, stats))| {
            with_widest_simd(#[inline(always)] || {
                let (mut dgamma, mut dbeta) = (vec![0f32; d], vec![0f32; d]);
                for ((row, x), stat) in grad.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(stats.chunks_exact(2)) {
                    let (mean, rstd) = (stat[0], stat[1]);
                    // dy is read once, for d γ and d β; the row then holds g = dy ⊙ γ until
                    // the last loop turns it into d x.
                    for ((((slot, &x), &gamma), dgamma), dbeta) in row.iter_mut().zip(x).zip(gamma).zip(&mut dgamma).zip(&mut dbeta) {
                        let dy = *slot;
                        *dgamma += dy * (x - mean) * rstd;
                        *dbeta += dy;
                        *slot = dy * gamma;
                    }
                    let n = d as f32;
                    let g_xhat = sum_zip(row, x, |g, x| g * (x - mean) * rstd) / n;
                    let g_mean = match kind {
                        NormKind::Layer => sum_zip(row, row, |g, _| g) / n,
                        NormKind::Rms => 0.0,
                    };
                    for (g, &x) in row.iter_mut().zip(x) {
                        let xhat = (x - mean) * rstd;
                        *g = rstd * (*g - g_mean - xhat * g_xhat);
                    }
                }
                (dgamma, dbeta)
            })
        })
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0f32; d], vec![0f32; d]);
    for (pg, pb) in &partials {
        for ((g, b), (pg, pb)) in dgamma.iter_mut().zip(&mut dbeta).zip(pg.iter().zip(pb)) {
            *g += pg;
            *b += pb;
        }
    }
    (dgamma, dbeta)
}

mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;

    use super::{norm_backward_in_place, norm_forward_values};
    use crate::flex_tensors::{contiguous_f32 as contiguous, f32_values as values, writable_f32 as writable};
    use crate::norm::{NormBackend, NormKind};

    fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    impl NormBackend for Flex {
        fn norm_fused(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64, kind: NormKind) -> FloatTensor<Self> {
            Self::norm_forward_with_stats(x, gamma, beta, epsilon, kind).0
        }

        fn norm_forward_with_stats(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            epsilon: f64,
            kind: NormKind,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let shape = x.layout().shape().to_vec();
            let (x, gamma, beta) = (contiguous(&x), contiguous(&gamma), contiguous(&beta));
            let (y, stats) = norm_forward_values(values(&x), values(&gamma), values(&beta), epsilon, kind);
            let rows = stats.len() / 2;
            (tensor(y, shape), tensor(stats, vec![rows, 2]))
        }

        fn norm_fused_backward(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            stats: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            kind: NormKind,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let d = *x.layout().shape().last().expect("norm input has a last dimension");
            let (x, gamma, stats, mut grad) = (contiguous(&x), contiguous(&gamma), contiguous(&stats), writable(grad));
            let (dgamma, dbeta) = norm_backward_in_place(values(&x), values(&gamma), values(&stats), grad.storage_mut(), kind);
            (grad, tensor(dgamma, vec![d]), tensor(dbeta, vec![d]))
        }
    }
}
