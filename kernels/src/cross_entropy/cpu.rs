//! The fused linear cross-entropy on the CPU (Flex): chunks of rows through one logits
//! buffer, so the peak is `CHUNK × V` floats instead of `N × V`.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::math::{exp_shifted_in_place, matmul, max_of, with_widest_simd};

/// Rows per chunk: a `256 × V` logits buffer (8 MiB at V = 8192) stays cache-friendly for the
/// gemm and is large enough that its products run at full speed.
const CHUNK: usize = 256;

/// Sizes of one call over contiguous `hidden [rows, dim]` and `head [vocab, dim]`.
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropyShape {
    pub rows: usize,
    pub dim: usize,
    pub vocab: usize,
}

/// `(loss, d_hidden [rows, dim], d_head [vocab, dim])`; the gradients are empty unless
/// `with_grads`. Rows of weight 0 are skipped. Panics on a target outside the vocabulary.
pub fn linear_cross_entropy_cpu(
    hidden: &[f32],
    head: &[f32],
    targets: &[f32],
    weights: &[f32],
    s: CrossEntropyShape,
    with_grads: bool,
) -> (f32, Vec<f32>, Vec<f32>) {
    let CrossEntropyShape { rows, dim, vocab } = s;
    assert!(hidden.len() == rows * dim && head.len() == vocab * dim && targets.len() == rows && weights.len() == rows);
    let active: Vec<usize> = (0..rows).filter(|&i| weights[i] != 0.0).collect();
    let (mut d_hidden, mut d_head) = if with_grads { (vec![0f32; rows * dim], vec![0f32; vocab * dim]) } else { (Vec::new(), Vec::new()) };
    let mut logits = vec![0f32; CHUNK.min(active.len()) * vocab];
    let mut chunk_hidden = vec![0f32; CHUNK.min(active.len()) * dim];
    let mut chunk_d_hidden = vec![0f32; if with_grads { chunk_hidden.len() } else { 0 }];
    let mut loss = 0f64;
    let parallel = Parallelism::Rayon(0);
    for chunk in active.chunks(CHUNK) {
        let c = chunk.len();
        for (r, &i) in chunk.iter().enumerate() {
            chunk_hidden[r * dim..(r + 1) * dim].copy_from_slice(&hidden[i * dim..(i + 1) * dim]);
        }
        let (h, z) = (&chunk_hidden[..c * dim], &mut logits[..c * vocab]);
        matmul(z, h, head, (c, vocab, dim), false, true, false, parallel);
        // Each row becomes w · (softmax − one-hot), the gradient w.r.t. its logits.
        loss += z
            .par_chunks_mut(vocab)
            .zip(chunk.par_iter())
            .map(|(row, &i)| with_widest_simd(#[inline(always)] || softmax_row_loss(row, targets[i], weights[i], with_grads)))
            .sum::<f64>();
        if with_grads {
            let g = &logits[..c * vocab];
            // d_hidden rows = G · W ; d_head += Gᵀ · H
            matmul(&mut chunk_d_hidden[..c * dim], g, head, (c, dim, vocab), false, false, false, parallel);
            for (r, &i) in chunk.iter().enumerate() {
                d_hidden[i * dim..(i + 1) * dim].copy_from_slice(&chunk_d_hidden[r * dim..(r + 1) * dim]);
            }
            matmul(&mut d_head, g, &chunk_hidden[..c * dim], (vocab, dim, c), true, false, true, parallel);
        }
    }
    (loss as f32, d_hidden, d_head)
}

/// One row's weighted NLL; with `with_grads` the row's logits are replaced by
/// `weight · (softmax − one-hot(target))`.
#[inline(always)]
fn softmax_row_loss(row: &mut [f32], target: f32, weight: f32, with_grads: bool) -> f64 {
    let t = target as usize;
    assert!(target >= 0.0 && t < row.len() && target.fract() == 0.0, "cross-entropy target {target} outside the vocabulary of {}", row.len());
    let target_logit = row[t];
    let max = max_of(row);
    let sum = exp_shifted_in_place(row, max);
    let log_sum_exp = max + sum.ln();
    if with_grads {
        let scale = weight / sum;
        row.iter_mut().for_each(|x| *x *= scale);
        row[t] -= weight;
    }
    weight as f64 * (log_sum_exp - target_logit) as f64
}

mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;

    use super::{CrossEntropyShape, linear_cross_entropy_cpu};
    use crate::cross_entropy::LinearCrossEntropyBackend;
    use crate::flex_tensors::{contiguous_f32 as contiguous, f32_values as values};

    fn run(hidden: &FlexTensor, head: &FlexTensor, targets: &FlexTensor, weights: &FlexTensor, with_grads: bool) -> (f32, Vec<f32>, Vec<f32>, CrossEntropyShape) {
        let (hs, ws) = (hidden.layout().shape(), head.layout().shape());
        assert_eq!(hs[1], ws[1], "hidden [N, D] and head [V, D] differ in D");
        let s = CrossEntropyShape { rows: hs[0], dim: hs[1], vocab: ws[0] };
        let [h, w, t, wt] = [hidden, head, targets, weights].map(contiguous);
        let (loss, dh, dw) = linear_cross_entropy_cpu(values(&h), values(&w), values(&t), values(&wt), s, with_grads);
        (loss, dh, dw, s)
    }

    fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    impl LinearCrossEntropyBackend for Flex {
        fn linear_cross_entropy(hidden: FloatTensor<Self>, head: FloatTensor<Self>, targets: FloatTensor<Self>, weights: FloatTensor<Self>) -> FloatTensor<Self> {
            let (loss, ..) = run(&hidden, &head, &targets, &weights, false);
            tensor(vec![loss], vec![1])
        }

        fn linear_cross_entropy_with_grads(
            hidden: FloatTensor<Self>,
            head: FloatTensor<Self>,
            targets: FloatTensor<Self>,
            weights: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let (loss, dh, dw, s) = run(&hidden, &head, &targets, &weights, true);
            (tensor(vec![loss], vec![1]), tensor(dh, vec![s.rows, s.dim]), tensor(dw, vec![s.vocab, s.dim]))
        }
    }
}
