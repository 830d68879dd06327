//! The fused diversity on the CPU (Flex): one pass per group over its unit vectors.

use rayon::prelude::*;

/// Norms below this count as zero (the reference clamps the same way).
const NORM_EPS: f32 = 1e-12;

/// `embeddings [G, N, D]` (flat) → diversity per group.
pub fn diversity_forward(embeddings: &[f32], groups: usize, n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; groups]; // poisoned: every group must be written
    out.par_iter_mut().enumerate().for_each(|(g, slot)| {
        *slot = if n < 2 {
            0.0
        } else {
            let group = &embeddings[g * n * d..(g + 1) * n * d];
            let mut sum = vec![0f64; d];
            let mut self_dots = 0f64;
            for e in group.chunks(d) {
                let inv = 1.0 / norm(e).max(NORM_EPS) as f64;
                for (s, &x) in sum.iter_mut().zip(e) {
                    *s += x as f64 * inv;
                }
                self_dots += (norm(e) as f64 * inv).powi(2);
            }
            let pairs = sum.iter().map(|s| s * s).sum::<f64>() - self_dots;
            (1.0 - pairs / (n * (n - 1)) as f64) as f32
        };
    });
    out
}

/// Gradient of `Σ_g grad[g] · diversity[g]` w.r.t. the embeddings:
/// `∂D/∂u_i = −2 (s − u_i) / (N(N−1))`, projected through the normalisation
/// `∂u/∂e = (I − u uᵀ) / ‖e‖`.
pub fn diversity_backward(embeddings: &[f32], grad: &[f32], groups: usize, n: usize, d: usize) -> Vec<f32> {
    assert_eq!(grad.len(), groups, "one upstream gradient per group");
    let mut out = vec![f32::NAN; embeddings.len()];
    out.par_chunks_mut((n * d).max(1)).enumerate().for_each(|(g, dst)| {
        if n < 2 || d == 0 {
            dst.iter_mut().for_each(|x| *x = 0.0);
            return;
        }
        let group = &embeddings[g * n * d..(g + 1) * n * d];
        let norms: Vec<f32> = group.chunks(d).map(|e| norm(e).max(NORM_EPS)).collect();
        let mut sum = vec![0f32; d];
        for (e, &nrm) in group.chunks(d).zip(&norms) {
            for (s, &x) in sum.iter_mut().zip(e) {
                *s += x / nrm;
            }
        }
        let coef = -2.0 * grad[g] / (n * (n - 1)) as f32;
        for ((e, &nrm), dst) in group.chunks(d).zip(&norms).zip(dst.chunks_mut(d)) {
            // g_u = coef · (s − u); result = (g_u − u (u·g_u)) / ‖e‖
            let u = |c: usize| e[c] / nrm;
            let dot: f32 = (0..d).map(|c| u(c) * coef * (sum[c] - u(c))).sum();
            for c in 0..d {
                dst[c] = (coef * (sum[c] - u(c)) - u(c) * dot) / nrm;
            }
        }
    });
    out
}

fn norm(e: &[f32]) -> f32 {
    e.iter().map(|x| x * x).sum::<f32>().sqrt()
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
