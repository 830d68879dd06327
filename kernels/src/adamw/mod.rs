//! One AdamW update of a parameter tensor (decoupled weight decay, bias-corrected moments, the
//! step's gradient scale from averaging and clipping folded in) as one pass over its
//! elements, instead of Burn's chain of a dozen whole-tensor ops (each a buffer).
//!
//! The arithmetic is Burn's `AdamW` step, operation for operation in f32, so the two agree to
//! rounding and a checkpoint written by either continues under the other.

mod cpu;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, backend_extension};
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::Tensor;
pub use cpu::adamw_in_place;

/// Which implementation updates the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdamWImpl {
    /// Burn's `AdamW` (whole-tensor ops), after the gradients are scaled in a pass of their own.
    Reference,
    /// One pass per parameter tensor (CPU); Cube devices run the reference.
    #[default]
    Fused,
}

/// Everything about one update but the tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub learning_rate: f64,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    /// 1-based count of updates including this one (the bias corrections' exponent).
    pub time: usize,
    /// Multiplies the gradient first (micro-batch averaging × global-norm clipping).
    pub grad_scale: f32,
}

impl AdamWStep {
    /// The f32 constants of the update, rounded as Burn's scalar ops round them.
    fn constants(&self) -> [f32; 8] {
        let t = self.time as i32;
        [
            self.grad_scale,
            self.beta_1,
            1.0 - self.beta_1,
            self.beta_2,
            1.0 - self.beta_2,
            1.0 - self.beta_1.powi(t),
            1.0 - self.beta_2.powi(t),
            (1.0 - self.learning_rate * self.weight_decay as f64) as f32,
        ]
    }
}

#[backend_extension(Autodiff, Flex)]
pub trait AdamWBackend: Backend {
    /// `(parameter, first moment, second moment)` after the update.
    fn adamw_fused(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Optimizers update the inner (untracked) tensors; under Autodiff the op just runs there.
impl<B: AdamWBackend, C: CheckpointStrategy> AdamWBackend for Autodiff<B, C> {
    fn adamw_fused(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let i = Self::inner;
        let (p, m, v) = B::adamw_fused(i(param), i(grad), i(moment_1), i(moment_2), step);
        (Self::from_inner(p), Self::from_inner(m), Self::from_inner(v))
    }
}

/// The definition in whole-tensor ops (Burn's `AdamW` step); absent moments are zero.
pub fn adamw_reference<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<(Tensor<D>, Tensor<D>)>,
    step: AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let [scale, beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, correction_1, correction_2, decay] = step.constants();
    let grad = grad.mul_scalar(scale);
    let (m, v) = match moments {
        Some((m, v)) => (m.mul_scalar(beta_1).add(grad.clone().mul_scalar(one_minus_beta_1)), v.mul_scalar(beta_2).add(grad.square().mul_scalar(one_minus_beta_2))),
        None => (grad.clone().mul_scalar(one_minus_beta_1), grad.square().mul_scalar(one_minus_beta_2)),
    };
    let delta = m.clone().div_scalar(correction_1).div(v.clone().div_scalar(correction_2).sqrt().add_scalar(step.epsilon));
    let param = param.mul_scalar(decay) - delta.mul_scalar(step.learning_rate as f32);
    (param, m, v)
}

/// One AdamW update: `(parameter, first moment, second moment)`.
pub fn adamw<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<(Tensor<D>, Tensor<D>)>,
    step: AdamWStep,
    implementation: AdamWImpl,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    match implementation {
        AdamWImpl::Fused if !crate::is_cube(&param.device()) => {
            let (m, v) = moments.unwrap_or_else(|| (param.zeros_like(), param.zeros_like()));
            let (p, m, v) = <Dispatch as AdamWBackend>::adamw_fused(param.into_dispatch(), grad.into_dispatch(), m.into_dispatch(), v.into_dispatch(), step);
            (Tensor::from_dispatch(p), Tensor::from_dispatch(m), Tensor::from_dispatch(v))
        }
        _ => adamw_reference(param, grad, moments, step),
    }
}
