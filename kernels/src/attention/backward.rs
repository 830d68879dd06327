//! The Autodiff side of flash attention: the forward keeps q, k, v, the output and the per-row
//! log-sum-exp (O(T·D) memory), and the backward asks the inner backend for dq, dk, dv.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, AutodiffBackend};
use burn::backend::tensor::FloatTensor;

use super::FlashAttentionBackend;

#[derive(Debug)]
struct FlashAttentionBackward;

/// What the forward keeps for the backward.
#[derive(Debug, Clone)]
struct Saved<B: FlashAttentionBackend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    query_segments: FloatTensor<B>,
    key_segments: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    causal: bool,
    scale: f32,
}

impl<B: FlashAttentionBackend> Backward<B, 3> for FlashAttentionBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved { q, k, v, query_segments, key_segments, out, lse, causal, scale } = ops.state;
        let d_out = grads.consume::<B>(&ops.node);
        let (dq, dk, dv) = B::flash_attention_backward(q, k, v, query_segments, key_segments, out, lse, d_out, causal, scale);
        let [pq, pk, pv] = ops.parents;
        for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FlashAttentionBackend, C: CheckpointStrategy> FlashAttentionBackend for Autodiff<B, C> {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        query_segments: FloatTensor<Self>,
        key_segments: FloatTensor<Self>,
        causal: bool,
        scale: f32,
    ) -> FloatTensor<Self> {
        let prep = FlashAttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful();
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let (query_segments, key_segments) = (query_segments.into_primitive(), key_segments.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => {
                let (out, lse) =
                    B::flash_attention_forward(q.clone(), k.clone(), v.clone(), query_segments.clone(), key_segments.clone(), causal, scale);
                prep.finish(Saved { q, k, v, query_segments, key_segments, out: out.clone(), lse, causal, scale }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::flash_attention_forward(q, k, v, query_segments, key_segments, causal, scale).0),
        }
    }

    fn flash_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        query_segments: FloatTensor<Self>,
        key_segments: FloatTensor<Self>,
        causal: bool,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let i = Self::inner;
        let (out, lse) = B::flash_attention_forward(i(q), i(k), i(v), i(query_segments), i(key_segments), causal, scale);
        (Self::from_inner(out), Self::from_inner(lse))
    }

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
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let i = Self::inner;
        let (dq, dk, dv) =
            B::flash_attention_backward(i(q), i(k), i(v), i(query_segments), i(key_segments), i(out), i(lse), i(d_out), causal, scale);
        (Self::from_inner(dq), Self::from_inner(dk), Self::from_inner(dv))
    }
}
