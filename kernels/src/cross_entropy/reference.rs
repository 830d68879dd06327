use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// The definition: the full `[N, V]` logits, their log-softmax, the targets' entries.
pub fn linear_cross_entropy_reference(hidden: Tensor<2>, head: Tensor<2>, targets: Tensor<1, Int>, weights: Tensor<1>) -> Tensor<1> {
    (target_log_probs(hidden.matmul(head.transpose()), targets) * weights).sum().neg()
}

/// `log softmax(logits[n])[targets[n]]` for `[N, V]` logits: the per-token log-likelihood the
/// cross-entropy sums, and the token log-probabilities of the policy-gradient objectives.
pub fn target_log_probs(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let n = logits.dims()[0];
    log_softmax(logits, 1).gather(1, targets.reshape([n, 1])).reshape([n])
}
