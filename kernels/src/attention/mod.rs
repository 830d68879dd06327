//! Scaled dot-product attention over `[batch, heads, seq, head_dim]`.
//!
//! Every model in polyburn calls [`attention`], so a faster implementation can be swapped in
//! behind [`AttentionImpl`] without touching model code.

mod reference;

use burn::tensor::{Bool, Tensor};
pub use reference::attention_reference;

/// Which implementation computes attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionImpl {
    /// Plain tensor ops: scores, mask, softmax, weighted sum.
    #[default]
    Reference,
}

/// Options shared by every implementation.
#[derive(Debug, Clone, Default)]
pub struct AttentionOptions {
    /// Causal masking, bottom-right aligned: query `i` of `Tq` sees keys `j <= i + (Tk - Tq)`,
    /// which is what decoding with a KV cache needs.
    pub causal: bool,
    /// Optional `[batch, 1 or heads, Tq, Tk]` mask, `true` = masked out (e.g. padding).
    pub mask: Option<Tensor<4, Bool>>,
}

/// `softmax(q kᵀ / √d) v` with the given masking.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    options: AttentionOptions,
    implementation: AttentionImpl,
) -> Tensor<4> {
    match implementation {
        AttentionImpl::Reference => attention_reference(q, k, v, options),
    }
}
