//! Semantic diversity of groups of embeddings: the mean pairwise cosine distance within each
//! group, `1 − mean_{i≠j} cos(e_i, e_j)`. Differentiable, so a policy's own representations
//! can be pushed apart by the gradient (`polychromic_regularized`).
//!
//! The fused op never forms the `[G, N, N]` Gram matrix: with unit vectors `u_i` and their sum
//! `s`, `Σ_{i≠j} u_i·u_j = ‖s‖² − Σ_i ‖u_i‖²`, so a group costs O(N·D) time and memory. The
//! same identity gives the pooled diversity of M texts (one group of M) in O(M·D).

mod backward;
mod cpu;
#[cfg(feature = "cube")]
mod cube;
mod reference;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;
pub use reference::{pairwise_cosine_diversity_reference, pairwise_cosine_similarity_reference};

/// Which implementation computes the diversity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiversityImpl {
    /// Plain tensor ops: normalise, Gram matrix, masked mean.
    Reference,
    /// One pass per group through the sum of unit vectors.
    #[default]
    Fused,
}

/// The diversity as a custom op.
#[backend_extension(Autodiff, Flex, Cube: cfg(feature = "cube"), Fusion: cfg(feature = "cube"))]
pub trait DiversityBackend: Backend {
    /// `[G, N, D]` → `[G]`.
    #[fusion(dtype = embeddings, shape = per_group(embeddings))]
    fn pairwise_cosine_diversity(embeddings: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Gradient w.r.t. the embeddings given the upstream gradient `[G]`.
    #[fusion(dtype = embeddings, shape = embeddings)]
    fn pairwise_cosine_diversity_backward(embeddings: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The `[G]` output shape of `[G, N, D]` embeddings (Fusion's lazy graph needs it up front).
#[cfg(feature = "cube")]
fn per_group(embeddings: &burn::tensor::Shape) -> burn::tensor::Shape {
    burn::tensor::Shape::new([embeddings[0]])
}

/// `[G, N, D]` embeddings → `[G]` mean pairwise cosine distance per group. A group of one
/// has no pairs; its diversity is defined as 0.
pub fn pairwise_cosine_diversity(embeddings: Tensor<3>, implementation: DiversityImpl) -> Tensor<1> {
    match implementation {
        DiversityImpl::Reference => pairwise_cosine_diversity_reference(embeddings),
        DiversityImpl::Fused => Tensor::from_dispatch(<Dispatch as DiversityBackend>::pairwise_cosine_diversity(embeddings.into_dispatch())),
    }
}

/// The diversity of all `M` rows of `[M, D]` as one group, in O(M·D): 100,000 embeddings
/// need no M × M matrix.
pub fn pooled_cosine_diversity(embeddings: Tensor<2>) -> Tensor<1> {
    let [m, d] = embeddings.dims();
    pairwise_cosine_diversity(embeddings.reshape([1, m, d]), DiversityImpl::Fused)
}

/// The `[G, N, N]` cosine similarity matrix, for callers that want the pairs themselves.
pub fn pairwise_cosine_similarity(embeddings: Tensor<3>) -> Tensor<3> {
    pairwise_cosine_similarity_reference(embeddings)
}
