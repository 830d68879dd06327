//! AdamW on the CPU (Flex): elementwise, in parallel chunks, each compiled for the widest
//! vector unit.

use rayon::prelude::*;

use super::AdamWStep;
use crate::math::with_widest_simd;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// One update of `param`, `moment_1` and `moment_2` in place (each element reads and writes
/// only its own index, so no second buffer is needed).
pub fn adamw_in_place(param: &mut [f32], grad: &[f32], moment_1: &mut [f32], moment_2: &mut [f32], step: AdamWStep) {
    let n = param.len();
    assert!(grad.len() == n && moment_1.len() == n && moment_2.len() == n, "AdamW: parameter, gradient and moment sizes differ");
    let [scale, beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, correction_1, correction_2, decay] = step.constants();
    let (lr, epsilon) = (step.learning_rate as f32, step.epsilon);
    param
        .par_chunks_mut(CHUNK)
        .zip(moment_1.par_chunks_mut(CHUNK).zip(moment_2.par_chunks_mut(CHUNK)))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|((p, (m, v)), g)| {
            with_widest_simd(#[inline(always)] || {
                for i in 0..p.len() {
                    let g = g[i] * scale;
                    let m_new = m[i] * beta_1 + g * one_minus_beta_1;
                    let v_new = v[i] * beta_2 + g * g * one_minus_beta_2;
                    let delta = (m_new / correction_1) / ((v_new / correction_2).sqrt() + epsilon);
                    p[i] = p[i] * decay - delta * lr;
                    m[i] = m_new;
                    v[i] = v_new;
                }
            })
        });
}

mod flex {
    use burn::backend::Flex;
    use burn::backend::tensor::FloatTensor;

    use super::adamw_in_place;
    use crate::adamw::{AdamWBackend, AdamWStep};
    use crate::flex_tensors::{contiguous_f32 as contiguous, f32_values as values, writable_f32 as writable};

    impl AdamWBackend for Flex {
        fn adamw_fused(
            param: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            moment_1: FloatTensor<Self>,
            moment_2: FloatTensor<Self>,
            step: AdamWStep,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            // The optimizer owns the moments, so they are normally updated where they lie; a
            // parameter still shared with the caller's model is copied once (as before).
            let g = contiguous(&grad);
            let [mut p, mut m, mut v] = [param, moment_1, moment_2].map(writable);
            adamw_in_place(p.storage_mut(), values(&g), m.storage_mut(), v.storage_mut(), step);
            (p, m, v)
        }
    }
}
