//! Semantic diversity of groups of embeddings: the mean pairwise cosine distance within each
//! group, `1 − mean_{i≠j} cos(e_i, e_j)`. Differentiable, so a policy's own representations
//! can be pushed apart by the gradient (`polychromic_regularized`).

mod reference;

pub use reference::{pairwise_cosine_diversity_reference, pairwise_cosine_similarity_reference};

/// Which implementation computes the diversity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiversityImpl {
    /// Plain tensor ops: normalise, Gram matrix, masked mean.
    #[default]
    Reference,
}

/// `[G, N, D]` embeddings → `[G]` mean pairwise cosine distance per group. A group of one
/// has no pairs; its diversity is defined as 0.
pub fn pairwise_cosine_diversity(embeddings: burn::tensor::Tensor<3>, implementation: DiversityImpl) -> burn::tensor::Tensor<1> {
    match implementation {
        DiversityImpl::Reference => pairwise_cosine_diversity_reference(embeddings),
    }
}
