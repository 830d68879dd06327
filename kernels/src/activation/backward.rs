//! The Autodiff side: keeps the inputs, asks the inner backend for the input gradients.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend};

use super::{ActivationBackend, GatedUnit};

#[derive(Debug)]
struct GeluBackward;

impl<B: ActivationBackend> Backward<B, 1> for GeluBackward {
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

#[derive(Debug)]
struct GatedUnitBackward;

impl<B: ActivationBackend> Backward<B, 3> for GatedUnitBackward {
    /// Value input, gate input, α and the unit.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, GatedUnit);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (a, b, alpha, unit) = ops.state;
        let (da, db, dalpha) = B::gated_unit_fused_backward(a, b, alpha, grad, unit);
        for (parent, g) in ops.parents.into_iter().zip([da, db, dalpha]) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: ActivationBackend, C: CheckpointStrategy> ActivationBackend for Autodiff<B, C> {
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

    fn gated_unit_fused(a: FloatTensor<Self>, b: FloatTensor<Self>, alpha: FloatTensor<Self>, unit: GatedUnit) -> FloatTensor<Self> {
        let prep = GatedUnitBackward.prepare::<C>([a.node(), b.node(), alpha.node()]).compute_bound().stateful();
        let (a, b, alpha) = (a.into_primitive(), b.into_primitive(), alpha.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::gated_unit_fused(a.clone(), b.clone(), alpha.clone(), unit);
                prep.finish((a, b, alpha, unit), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gated_unit_fused(a, b, alpha, unit)),
        }
    }

    fn gated_unit_fused_backward(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        unit: GatedUnit,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let i = Self::inner;
        let (da, db, dalpha) = B::gated_unit_fused_backward(i(a), i(b), i(alpha), i(grad), unit);
        (Self::from_inner(da), Self::from_inner(db), Self::from_inner(dalpha))
    }
}
