//! The FFN activation as one elementwise pass forward and one backward:
//! - GELU (exact, `x·Φ(x)`, and the tanh form) of the plain MLP;
//! - the paGating mix `y = a' ⊙ (α·g(b) + 1 − α)` of the gated units, with `a' = a` (or
//!   `tanh a` for paGTU), `g` the unit's gate nonlinearity and α a one-element tensor (a
//!   constant, or `sigmoid(θ)` of a learnable θ), with gradients to `a`, `b` and α.
//!
//! Burn's own GELU evaluates `erf` through scalar libm calls and the reference mix is five
//! whole-tensor ops (each a buffer); the fused op uses vectorisable approximations (absolute
//! error below 5e-7) compiled for the CPU's widest vectors.

mod backward;
mod cpu;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu as burn_gelu, gelu_approximate, relu, sigmoid, silu, softplus, tanh};

/// Which implementation computes the FFN activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationImpl {
    /// Plain tensor ops (Burn's `gelu`, `sigmoid`, … and the mix as whole-tensor ops).
    Reference,
    /// One vectorised pass forward and one backward (CPU); Cube devices run the reference.
    #[default]
    Fused,
}

/// The gate nonlinearity `g` of a paGating unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Sigmoid,
    Tanh,
    /// `x·sigmoid(x)` (SiLU = Swish with β = 1).
    Silu,
    Relu,
    Gelu,
    /// GELU in its tanh form.
    GeluTanh,
    /// `x·tanh(softplus(x))`.
    Mish,
}

/// A paGating unit's elementwise part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatedUnit {
    pub gate: Gate,
    /// paGTU: the value path goes through `tanh` as well.
    pub tanh_value: bool,
}

#[backend_extension(Autodiff, Flex)]
pub trait ActivationBackend: Backend {
    /// GELU of every element (`tanh`: the tanh approximation), differentiable under Autodiff.
    fn gelu_fused(x: FloatTensor<Self>, tanh: bool) -> FloatTensor<Self>;

    /// `grad · GELU'(x)`.
    fn gelu_fused_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>, tanh: bool) -> FloatTensor<Self>;

    /// `a' ⊙ (α·g(b) + 1 − α)` for `a`, `b` of one shape and α `[1]`, differentiable under
    /// Autodiff w.r.t. all three.
    fn gated_unit_fused(a: FloatTensor<Self>, b: FloatTensor<Self>, alpha: FloatTensor<Self>, unit: GatedUnit) -> FloatTensor<Self>;

    /// `(d a, d b, d α [1])` for the upstream gradient `grad`.
    fn gated_unit_fused_backward(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        unit: GatedUnit,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The definition: Burn's GELU.
pub fn gelu_reference<const D: usize>(x: Tensor<D>, tanh: bool) -> Tensor<D> {
    if tanh { gelu_approximate(x) } else { burn_gelu(x) }
}

/// GELU, exact (`tanh = false`) or in its tanh form.
pub fn gelu<const D: usize>(x: Tensor<D>, tanh: bool, implementation: ActivationImpl) -> Tensor<D> {
    match implementation {
        ActivationImpl::Fused if !crate::is_cube(&x.device()) => {
            Tensor::from_dispatch(<Dispatch as ActivationBackend>::gelu_fused(x.into_dispatch(), tanh))
        }
        _ => gelu_reference(x, tanh),
    }
}

/// The definition of each gate nonlinearity, in plain tensor ops.
pub fn gate_reference<const D: usize>(gate: Gate, x: Tensor<D>) -> Tensor<D> {
    match gate {
        Gate::Sigmoid => sigmoid(x),
        Gate::Tanh => tanh(x),
        Gate::Silu => silu(x),
        Gate::Relu => relu(x),
        Gate::Gelu => burn_gelu(x),
        Gate::GeluTanh => gelu_approximate(x),
        Gate::Mish => x.clone() * tanh(softplus(x, 1.0)),
    }
}

/// The value path `a'`: `a`, or `tanh a` for paGTU.
pub fn value_reference<const D: usize>(unit: GatedUnit, a: Tensor<D>) -> Tensor<D> {
    if unit.tanh_value { tanh(a) } else { a }
}

/// `a ⊙ (α·g + 1 − α)` for an already computed gate `g` (the model's gate-norm path) and α `[1]`.
pub fn mix_reference<const D: usize>(value: Tensor<D>, g: Tensor<D>, alpha: Tensor<1>) -> Tensor<D> {
    let alpha = alpha.reshape([1; D]);
    value * (g * alpha.clone() - alpha + 1.0)
}

/// The definition of the gated unit: the three functions above in order.
pub fn gated_unit_reference<const D: usize>(a: Tensor<D>, b: Tensor<D>, alpha: Tensor<1>, unit: GatedUnit) -> Tensor<D> {
    mix_reference(value_reference(unit, a), gate_reference(unit.gate, b), alpha)
}

/// `a' ⊙ (α·g(b) + 1 − α)`; `alpha` is `[1]`.
pub fn gated_unit<const D: usize>(a: Tensor<D>, b: Tensor<D>, alpha: Tensor<1>, unit: GatedUnit, implementation: ActivationImpl) -> Tensor<D> {
    assert_eq!(a.dims(), b.dims(), "gated unit: value and gate shapes differ");
    match implementation {
        ActivationImpl::Fused if !crate::is_cube(&a.device()) => Tensor::from_dispatch(<Dispatch as ActivationBackend>::gated_unit_fused(
            a.into_dispatch(),
            b.into_dispatch(),
            alpha.into_dispatch(),
            unit,
        )),
        _ => gated_unit_reference(a, b, alpha, unit),
    }
}
