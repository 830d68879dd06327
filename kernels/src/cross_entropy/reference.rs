use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// The definition: the full `[N, V]` logits, their log-softmax, the targets' entries.
pub fn linear_cross_entropy_reference(hidden: Tensor<2>, head: Tensor<2>, targets: Tensor<1, Int>, weights: Tensor<1>) -> Tensor<1> {
    let n = hidden.dims()[0];
    let log_probs = log_softmax(hidden.matmul(head.transpose()), 1);
    let picked = log_probs.gather(1, targets.reshape([n, 1])).reshape([n]);
    (picked * weights).sum().neg()
}
