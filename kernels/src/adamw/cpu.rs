//! AdamW on the CPU (Flex): elementwise, in parallel chunks, each compiled for the widest
//! vector unit.

use rayon::prelude::*;

use super::AdamWStep;
use crate::math::with_widest_simd;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `(parameter, first moment, second moment)` after one update.
pub fn adamw_values(param: &[f32], grad: &[f32], moment_1: &[f32], moment_2: &[f32], step: AdamWStep) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = param.len();
    assert!(grad.len() == n && moment_1.len() == n && moment_2.len() == n, "AdamW: parameter, gradient and moment sizes differ");
    let [scale, beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, correction_1, correction_2, decay] = step.constants();
    let (lr, epsilon) = (step.learning_rate as f32, step.epsilon);
    // Poisoned: every element must be written.
    let (mut p_out, mut m_out, mut v_out) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
    p_out
        .par_chunks_mut(CHUNK)
        .zip(m_out.par_chunks_mut(CHUNK).zip(v_out.par_chunks_mut(CHUNK)))
        .zip(param.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)).zip(moment_1.par_chunks(CHUNK).zip(moment_2.par_chunks(CHUNK))))
        .for_each(|((po, (mo, vo)), ((p, g), (m, v)))| {
            with_widest_simd(#[inline(always)] || {
                for i in 0..po.len() {
                    let g = g[i] * scale;
                    let m = m[i] * beta_1 + g * one_minus_beta_1;
                    let v = v[i] * beta_2 + g * g * one_minus_beta_2;
                    let delta = (m / correction_1) / ((v / correction_2).sqrt() + epsilon);
                    po[i] = p[i] * decay - delta * lr;
                    mo[i] = m;
                    vo[i] = v;
                }
            })
        });
    (p_out, m_out, v_out)
}

mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;

    use super::adamw_values;
    use crate::adamw::{AdamWBackend, AdamWStep};
    use crate::flex_tensors::{contiguous_f32 as contiguous, f32_values as values};

    impl AdamWBackend for Flex {
        fn adamw_fused(
            param: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            moment_1: FloatTensor<Self>,
            moment_2: FloatTensor<Self>,
            step: AdamWStep,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let shape = param.layout().shape().to_vec();
            let [p, g, m, v] = [&param, &grad, &moment_1, &moment_2].map(contiguous);
            let (p, m, v) = adamw_values(values(&p), values(&g), values(&m), values(&v), step);
            let tensor = |x: Vec<f32>| FlexTensor::from_data(TensorData::new(x, shape.clone()));
            (tensor(p), tensor(m), tensor(v))
        }
    }
}
