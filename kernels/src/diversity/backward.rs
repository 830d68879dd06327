//! The Autodiff side of the fused diversity: keeps the embeddings, asks the inner backend for
//! the gradient.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend};

use super::DiversityBackend;

#[derive(Debug)]
struct DiversityBackward;

impl<B: DiversityBackend> Backward<B, 1> for DiversityBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, B::pairwise_cosine_diversity_backward(ops.state, grad));
        }
    }
}

impl<B: DiversityBackend, C: CheckpointStrategy> DiversityBackend for Autodiff<B, C> {
    fn pairwise_cosine_diversity(embeddings: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = DiversityBackward.prepare::<C>([embeddings.node()]).compute_bound().stateful();
        let e = embeddings.into_primitive();
        match prep {
            OpsKind::Tracked(prep) => prep.finish(e.clone(), B::pairwise_cosine_diversity(e)),
            OpsKind::UnTracked(prep) => prep.finish(B::pairwise_cosine_diversity(e)),
        }
    }

    fn pairwise_cosine_diversity_backward(embeddings: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::pairwise_cosine_diversity_backward(Self::inner(embeddings), Self::inner(grad)))
    }
}
