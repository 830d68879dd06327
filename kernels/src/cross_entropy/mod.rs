//! Linear + cross-entropy: final hidden states `[N, D]`, the LM head `[V, D]` (tied to the
//! token embedding or not), targets `[N]` and per-row weights `[N]` →
//! `Σ_n w_n · (logsumexp(h_n Wᵀ) − (h_n Wᵀ)[t_n])`, the mean masked NLL when `w = mask / count`.
//!
//! The fused op never holds the `[N, V]` logits: rows are processed in chunks, and since the
//! loss is a scalar both gradients are computed in the same pass from each chunk's
//! `w · (softmax − one-hot)` (Liger Kernel's fused linear cross-entropy does the same); the
//! backward only scales them by the upstream gradient. Rows of weight 0 (prompt tokens of a
//! JSONL record, padding) cost nothing.

mod backward;
mod cpu;
mod reference;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Int, Tensor};
pub use cpu::{CrossEntropyShape, linear_cross_entropy_cpu};
pub use reference::{linear_cross_entropy_reference, target_log_probs};

/// Which implementation computes the LM head's cross-entropy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrossEntropyImpl {
    /// Plain tensor ops: logits, log-softmax, gather, weighted sum.
    Reference,
    /// Row chunks with both gradients computed in the forward pass (CPU); Cube devices run
    /// the reference.
    #[default]
    Fused,
}

/// The fused op. `targets` are token ids stored as floats (exact below 2²⁴).
#[backend_extension(Autodiff, Flex)]
pub trait LinearCrossEntropyBackend: Backend {
    /// The `[1]` loss, differentiable under Autodiff w.r.t. `hidden` and `head`.
    fn linear_cross_entropy(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The loss with its gradients `(loss [1], d_hidden [N, D], d_head [V, D])`.
    fn linear_cross_entropy_with_grads(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// `Σ_n weights[n] · NLL(softmax(hidden[n] · headᵀ), targets[n])` as a `[1]` tensor.
/// `hidden [N, D]`, `head [V, D]`, `targets [N]`, `weights [N]`.
pub fn linear_cross_entropy(
    hidden: Tensor<2>,
    head: Tensor<2>,
    targets: Tensor<1, Int>,
    weights: Tensor<1>,
    implementation: CrossEntropyImpl,
) -> Tensor<1> {
    match implementation {
        CrossEntropyImpl::Fused if !crate::is_cube(&hidden.device()) => Tensor::from_dispatch(<Dispatch as LinearCrossEntropyBackend>::linear_cross_entropy(
            hidden.into_dispatch(),
            head.into_dispatch(),
            targets.float().into_dispatch(),
            weights.into_dispatch(),
        )),
        _ => linear_cross_entropy_reference(hidden, head, targets, weights),
    }
}
