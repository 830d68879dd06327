//! Normalisation layers of the decoder families polyburn runs: LayerNorm (GPT-2) and
//! RMSNorm (Llama). One module so both keep the parameter names `gamma` (and `beta`).

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::module::layer_norm;
use burn::tensor::{Device, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `(x − mean) / √(var + ε) · γ + β`.
    Layer,
    /// `x / √(mean(x²) + ε) · γ` (no centring, no bias).
    Rms,
}

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

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gamma = self.gamma.val();
        match self.kind {
            NormKind::Layer => layer_norm(x, gamma, self.beta.as_ref().map(|b| b.val()), self.epsilon),
            NormKind::Rms => {
                let shape: [usize; D] = std::array::from_fn(|i| if i + 1 == D { gamma.dims()[0] } else { 1 });
                let inv = x.clone().square().mean_dim(D - 1).add_scalar(self.epsilon).sqrt().recip();
                x * inv * gamma.reshape(shape)
            }
        }
    }
}
