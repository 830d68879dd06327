//! Scaled dot-product attention over `[batch, heads, seq, head_dim]`.
//!
//! Every model in polyburn calls [`attention`], so the implementation is chosen per call:
//! the reference (plain tensor ops, the definition) or the fused flash attention, a custom
//! Burn op ([`FlashAttentionBackend`]) with its own backward that never materialises the
//! `[Tq, Tk]` score matrix.
//!
//! Masking beyond causality is by segment ids: query `i` sees key `j` only where their
//! segments are equal. Padded keys get a segment no query has, and packed rows
//! (`data.pack`) give each document its own segment, so documents sharing a row never see
//! each other.

mod backward;
mod cpu;
#[cfg(feature = "cube")]
mod cube;
mod reference;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Bool, Int, Tensor};
pub use cpu::{FlashShape, Heads, flash_backward, flash_forward};
pub use reference::attention_reference;

/// Which implementation computes attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionImpl {
    /// Plain tensor ops: scores, mask, softmax, weighted sum.
    Reference,
    /// Flash attention: tiled online softmax forward, FlashAttention-2 backward.
    #[default]
    Fused,
}

/// Options shared by every implementation.
#[derive(Debug, Clone, Default)]
pub struct AttentionOptions {
    /// Causal masking, bottom-right aligned: query `i` of `Tq` sees keys `j <= i + (Tk - Tq)`,
    /// which is what decoding with a KV cache needs.
    pub causal: bool,
    /// Padded keys, `[batch, Tk]`, `true` = masked out.
    pub key_padding: Option<Tensor<2, Bool>>,
    /// Document ids (non-negative) of the keys, `[batch, Tk]`, for rows that pack several
    /// documents: query `i` belongs to the document of key `i + (Tk − Tq)` (the queries are
    /// the last `Tq` keys, as in self-attention) and sees only keys of its own document.
    pub documents: Option<Tensor<2, Int>>,
    /// Any other `[batch, 1 or heads, Tq, Tk]` mask, `true` = masked out. The fused kernel
    /// does not take arbitrary masks: a call with one runs the reference.
    pub mask: Option<Tensor<4, Bool>>,
}

/// Flash attention as a custom op. Query `i` sees key `j` only where
/// `query_segments[b, i] == key_segments[b, j]` (`[B, Tq]` and `[B, Tk]`, whole numbers as
/// floats) and, when causal, `j <= i + (Tk − Tq)`. Query rows that see no key output zeros.
#[backend_extension(Autodiff, Flex, Cube: cfg(feature = "cube"), Fusion: cfg(feature = "cube"))]
pub trait FlashAttentionBackend: Backend {
    /// `softmax(q kᵀ · scale) v`, differentiable under Autodiff.
    #[fusion(dtype = q, shape = q)]
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        query_segments: FloatTensor<Self>,
        key_segments: FloatTensor<Self>,
        causal: bool,
        scale: f32,
    ) -> FloatTensor<Self>;

    /// Output `[B, H, Tq, D]` and the per-row log-sum-exp `[B, H, Tq]` the backward needs.
    #[fusion(meta = |q, _k, _v, _query_segments, _key_segments, _causal, _scale| (q.clone(), log_sum_exp_spec(q)))]
    fn flash_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        query_segments: FloatTensor<Self>,
        key_segments: FloatTensor<Self>,
        causal: bool,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dq, dk, dv)`, recomputing the scores tile by tile.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = |_q, k, v, _query_segments, _key_segments, out, _lse, _d_out, _causal, _scale| (out.clone(), k.clone(), v.clone()))]
    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        query_segments: FloatTensor<Self>,
        key_segments: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        causal: bool,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The `[B, H, Tq]` log-sum-exp beside a `[B, H, Tq, D]` output, for Fusion's lazy graph.
#[cfg(feature = "cube")]
fn log_sum_exp_spec(q: &burn::backend::fusion::custom::TensorSpec) -> burn::backend::fusion::custom::TensorSpec {
    let mut spec = q.clone();
    spec.shape = burn::tensor::Shape::new([q.shape[0], q.shape[1], q.shape[2]]);
    spec
}

/// Per-row segment ids `([B, Tq], [B, Tk])` as floats for the fused op: each query's document
/// (0 without documents), each key's document, −1 for padded keys (no query's segment).
fn segments(options: &AttentionOptions, batch: usize, tq: usize, tk: usize, device: &burn::tensor::Device) -> (Tensor<2>, Tensor<2>) {
    let (query, mut key) = match &options.documents {
        Some(documents) => {
            assert!(tq <= tk, "attention with documents needs Tq <= Tk (the queries are the last Tq keys), got Tq {tq}, Tk {tk}");
            let documents = documents.clone().float();
            (documents.clone().narrow(1, tk - tq, tq), documents)
        }
        None => (Tensor::zeros([batch, tq], device), Tensor::zeros([batch, tk], device)),
    };
    if let Some(padding) = &options.key_padding {
        key = key.mask_fill(padding.clone(), -1.0);
    }
    (query, key)
}

/// The fused flash attention (differentiable on an autodiff device).
pub fn flash_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, options: &AttentionOptions) -> Tensor<4> {
    let [batch, _, tq, head_dim] = q.dims();
    let tk = k.dims()[2];
    let (query_segments, key_segments) = segments(options, batch, tq, tk, &q.device());
    let scale = 1.0 / (head_dim as f32).sqrt();
    let out = <Dispatch as FlashAttentionBackend>::flash_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        query_segments.into_dispatch(),
        key_segments.into_dispatch(),
        options.causal,
        scale,
    );
    Tensor::from_dispatch(out)
}

/// `softmax(q kᵀ / √d) v` with the given masking.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, options: AttentionOptions, implementation: AttentionImpl) -> Tensor<4> {
    match implementation {
        AttentionImpl::Fused if options.mask.is_none() => flash_attention(q, k, v, &options),
        _ => attention_reference(q, k, v, options),
    }
}
