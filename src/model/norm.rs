//! Normalisation layers of the decoder families polyburn runs: LayerNorm (GPT-2) and
//! RMSNorm (Llama). One module so both keep the parameter names `gamma` (and `beta`).

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};
pub use polyburn_kernels::norm::NormKind;
use polyburn_kernels::norm::{NormImpl, norm};

#[derive(Module, Debug)]
pub struct Norm {
    pub gamma: Param<Tensor<1>>,
    pub beta: Option<Param<Tensor<1>>>,
    epsilon: f64,
    #[module(skip)]
    kind: NormKind,
}

impl Norm {
    pub fn new(kind: NormKind, d_model: usize, bias: bool, epsilon: f64, device: &Device) -> Self {
        Self {
            gamma: Initializer::Ones.init([d_model], device),
            beta: (bias && kind == NormKind::Layer).then(|| Initializer::Zeros.init([d_model], device)),
            epsilon,
            kind,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>, implementation: NormImpl) -> Tensor<D> {
        norm(x, self.gamma.val(), self.beta.as_ref().map(|b| b.val()), self.epsilon, self.kind, implementation)
    }
}
