//! The Autodiff side: the forward keeps each row's `(μ, r)`; the backward is one more pass.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend};

use super::{NormBackend, NormKind};

#[derive(Debug)]
struct NormBackward;

impl<B: NormBackend> Backward<B, 3> for NormBackward {
    /// Input, γ, the rows' `(μ, r)` and the kind.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, NormKind);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, stats, kind) = ops.state;
        let (dx, dgamma, dbeta) = B::norm_fused_backward(x, gamma, stats, grad, kind);
        for (parent, g) in ops.parents.into_iter().zip([dx, dgamma, dbeta]) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: NormBackend, C: CheckpointStrategy> NormBackend for Autodiff<B, C> {
    fn norm_fused(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64, kind: NormKind) -> FloatTensor<Self> {
        let prep = NormBackward.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful();
        let (x, gamma, beta) = (x.into_primitive(), gamma.into_primitive(), beta.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => {
                let (y, stats) = B::norm_forward_with_stats(x.clone(), gamma.clone(), beta, epsilon, kind);
                prep.finish((x, gamma, stats, kind), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::norm_fused(x, gamma, beta, epsilon, kind)),
        }
    }

    fn norm_forward_with_stats(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        kind: NormKind,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let i = Self::inner;
        let (y, stats) = B::norm_forward_with_stats(i(x), i(gamma), i(beta), epsilon, kind);
        (Self::from_inner(y), Self::from_inner(stats))
    }

    fn norm_fused_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kind: NormKind,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let i = Self::inner;
        let (dx, dgamma, dbeta) = B::norm_fused_backward(i(x), i(gamma), i(stats), i(grad), kind);
        (Self::from_inner(dx), Self::from_inner(dgamma), Self::from_inner(dbeta))
    }
}
