//! The Autodiff side: keeps the input, asks the inner backend for `grad · GELU'(x)`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend};

use super::GeluBackend;

#[derive(Debug)]
struct GeluBackward;

impl<B: GeluBackend> Backward<B, 1> for GeluBackward {
    /// The input and the form.
    type State = (FloatTensor<B>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, tanh) = ops.state;
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, B::gelu_fused_backward(x, grad, tanh));
        }
    }
}

impl<B: GeluBackend, C: CheckpointStrategy> GeluBackend for Autodiff<B, C> {
    fn gelu_fused(x: FloatTensor<Self>, tanh: bool) -> FloatTensor<Self> {
        let prep = GeluBackward.prepare::<C>([x.node()]).compute_bound().stateful();
        let x = x.into_primitive();
        match prep {
            OpsKind::Tracked(prep) => prep.finish((x.clone(), tanh), B::gelu_fused(x, tanh)),
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_fused(x, tanh)),
        }
    }

    fn gelu_fused_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>, tanh: bool) -> FloatTensor<Self> {
        Self::from_inner(B::gelu_fused_backward(Self::inner(x), Self::inner(grad), tanh))
    }
}
