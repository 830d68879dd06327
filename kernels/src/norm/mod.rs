//! LayerNorm and RMSNorm over the last dimension, forward and backward each one pass per row:
//! - LayerNorm: `y = (x − μ)·r·γ + β` with `r = 1/√(var + ε)`;
//! - RMSNorm: `y = x·r·γ` with `r = 1/√(mean(x²) + ε)` (β is zero).
//!
//! The forward saves each row's `(μ, r)` (8 bytes a row) for the backward; the reference's
//! autodiff graph keeps half a dozen row-sized intermediates instead.

mod backward;
mod cpu;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;
use burn::tensor::module::layer_norm;

/// Which implementation computes the transformer's norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormImpl {
    /// Plain tensor ops (Burn's `layer_norm`; RMSNorm as mean, sqrt, recip, two products).
    Reference,
    /// One pass per row forward and one backward (CPU); Cube devices run the reference.
    #[default]
    Fused,
}

/// Which normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `(x − mean) / √(var + ε) · γ + β` (the biased variance, as PyTorch).
    Layer,
    /// `x / √(mean(x²) + ε) · γ` (no centring, no bias).
    Rms,
}

#[backend_extension(Autodiff, Flex)]
pub trait NormBackend: Backend {
    /// The norm of every row of `x` (last dimension `d`), `gamma` and `beta` `[d]` (β zero for
    /// RMSNorm), differentiable under Autodiff w.r.t. all three.
    fn norm_fused(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64, kind: NormKind) -> FloatTensor<Self>;

    /// The output and each row's `(μ, r)` as a `[rows, 2]` tensor (μ = 0 for RMSNorm).
    fn norm_forward_with_stats(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        kind: NormKind,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(d x, d γ, d β)` for the upstream gradient `grad`.
    fn norm_fused_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kind: NormKind,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The definition in plain tensor ops.
pub fn norm_reference<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Option<Tensor<1>>, epsilon: f64, kind: NormKind) -> Tensor<D> {
    match kind {
        NormKind::Layer => layer_norm(x, gamma, beta, epsilon),
        NormKind::Rms => {
            let shape: [usize; D] = std::array::from_fn(|i| if i + 1 == D { gamma.dims()[0] } else { 1 });
            let inv = x.clone().square().mean_dim(D - 1).add_scalar(epsilon).sqrt().recip();
            let y = x * inv * gamma.reshape(shape);
            match beta {
                Some(b) => y + b.reshape(shape),
                None => y,
            }
        }
    }
}

/// LayerNorm or RMSNorm over the last dimension of `x`; `beta` absent means zero.
pub fn norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Option<Tensor<1>>, epsilon: f64, kind: NormKind, implementation: NormImpl) -> Tensor<D> {
    assert_eq!(x.dims()[D - 1], gamma.dims()[0], "norm: last dimension and γ differ");
    match implementation {
        NormImpl::Fused if !crate::is_cube(&x.device()) => {
            let beta = beta.unwrap_or_else(|| Tensor::zeros(gamma.shape(), &gamma.device()));
            Tensor::from_dispatch(<Dispatch as NormBackend>::norm_fused(
                x.into_dispatch(),
                gamma.into_dispatch(),
                beta.into_dispatch(),
                epsilon,
                kind,
            ))
        }
        _ => norm_reference(x, gamma, beta, epsilon, kind),
    }
}
