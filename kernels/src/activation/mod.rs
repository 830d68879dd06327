//! GELU (exact, `x·Φ(x)`, and the tanh form) as one elementwise pass forward and one backward.
//! Burn's own GELU evaluates `erf` through scalar libm calls; the fused op uses a vectorisable
//! approximation (absolute error below 5e-7) compiled for the CPU's widest vectors.

mod backward;
mod cpu;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu as burn_gelu, gelu_approximate};
pub use cpu::{gelu_backward_values, gelu_values};

/// Which implementation computes the FFN activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationImpl {
    /// Burn's `gelu` / `gelu_approximate`.
    Reference,
    /// One vectorised pass forward and one backward (CPU); Cube devices run the reference.
    #[default]
    Fused,
}

#[backend_extension(Autodiff, Flex)]
pub trait GeluBackend: Backend {
    /// GELU of every element (`tanh`: the tanh approximation), differentiable under Autodiff.
    fn gelu_fused(x: FloatTensor<Self>, tanh: bool) -> FloatTensor<Self>;

    /// `grad · GELU'(x)`.
    fn gelu_fused_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>, tanh: bool) -> FloatTensor<Self>;
}

/// The definition: Burn's GELU.
pub fn gelu_reference<const D: usize>(x: Tensor<D>, tanh: bool) -> Tensor<D> {
    if tanh { gelu_approximate(x) } else { burn_gelu(x) }
}

/// GELU, exact (`tanh = false`) or in its tanh form.
pub fn gelu<const D: usize>(x: Tensor<D>, tanh: bool, implementation: ActivationImpl) -> Tensor<D> {
    match implementation {
        ActivationImpl::Fused if !crate::is_cube(&x.device()) => {
            Tensor::from_dispatch(<Dispatch as GeluBackend>::gelu_fused(x.into_dispatch(), tanh))
        }
        _ => gelu_reference(x, tanh),
    }
}
