//! The Autodiff side: the forward already computed both gradients (the loss is a scalar), so
//! the state is the two gradients and the backward scales them by the upstream gradient.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend};
use burn::tensor::Shape;

use super::LinearCrossEntropyBackend;

#[derive(Debug)]
struct LinearCrossEntropyBackward;

impl<B: LinearCrossEntropyBackend> Backward<B, 2> for LinearCrossEntropyBackward {
    /// d_hidden, d_head for an upstream gradient of 1.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let upstream = B::float_reshape(grads.consume::<B>(&ops.node), Shape::new([1, 1]));
        let (d_hidden, d_head) = ops.state;
        let [hidden, head] = ops.parents;
        for (parent, grad) in [(hidden, d_hidden), (head, d_head)] {
            if let Some(node) = parent {
                grads.register::<B>(node.id, B::float_mul(grad, upstream.clone()));
            }
        }
    }
}

impl<B: LinearCrossEntropyBackend, C: CheckpointStrategy> LinearCrossEntropyBackend for Autodiff<B, C> {
    fn linear_cross_entropy(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let prep = LinearCrossEntropyBackward.prepare::<C>([hidden.node(), head.node()]).compute_bound().stateful();
        let (hidden, head) = (hidden.into_primitive(), head.into_primitive());
        let (targets, weights) = (Self::inner(targets), Self::inner(weights));
        match prep {
            OpsKind::Tracked(prep) => {
                let (loss, d_hidden, d_head) = B::linear_cross_entropy_with_grads(hidden, head, targets, weights);
                prep.finish((d_hidden, d_head), loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::linear_cross_entropy(hidden, head, targets, weights)),
        }
    }

    fn linear_cross_entropy_with_grads(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let i = Self::inner;
        let (loss, d_hidden, d_head) = B::linear_cross_entropy_with_grads(i(hidden), i(head), i(targets), i(weights));
        (Self::from_inner(loss), Self::from_inner(d_hidden), Self::from_inner(d_head))
    }
}
