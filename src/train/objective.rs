//! Training objectives. `sft` (the only one so far): next-token cross-entropy averaged over
//! the positions the batch's loss mask selects (all tokens for text, reply tokens for JSONL).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::data::Batch;
use crate::model::{ForwardContext, Gpt};

/// Batch buffers as tensors on `device`.
pub struct BatchTensors {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
    pub loss_mask: Tensor<2>,
    /// Number of positions the loss averages over.
    pub loss_tokens: usize,
}

impl BatchTensors {
    pub fn new(batch: &Batch, device: &Device) -> Self {
        let shape = [batch.batch_size, batch.seq_len];
        Self {
            inputs: Tensor::from_data(TensorData::new(batch.inputs.clone(), shape), device),
            targets: Tensor::from_data(TensorData::new(batch.targets.clone(), shape), device),
            loss_mask: Tensor::from_data(TensorData::new(batch.loss_mask.clone(), shape), device),
            loss_tokens: batch.loss_tokens(),
        }
    }
}

/// Mean cross-entropy of `logits [B, T, V]` against `targets [B, T]` over masked-in positions.
pub fn masked_cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>, mask: Tensor<2>, count: usize) -> Tensor<1> {
    let [batch, seq, _] = logits.dims();
    let log_probs = log_softmax(logits, 2);
    let picked = log_probs.gather(2, targets.reshape([batch, seq, 1])).reshape([batch, seq]);
    (picked * mask).sum().neg().div_scalar(count.max(1) as f64)
}

/// The `sft` loss of `model` on one batch (`context`: the trainer's step and kernels).
pub fn sft_loss(model: &Gpt, batch: &BatchTensors, context: &ForwardContext) -> Tensor<1> {
    let logits = model.forward(batch.inputs.clone(), context);
    masked_cross_entropy(logits, batch.targets.clone(), batch.loss_mask.clone(), batch.loss_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_log_vocab_and_mask_selects_positions() {
        let device = Device::flex();
        let logits = Tensor::<3>::zeros([2, 3, 5], &device);
        let targets = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 3, 4, 0], [2, 3]), &device);
        let mask = Tensor::<2>::from_data(TensorData::new(vec![1f32, 1., 0., 1., 0., 0.], [2, 3]), &device);
        let loss = masked_cross_entropy(logits, targets, mask, 3).into_scalar::<f32>();
        assert!((loss - 5f32.ln()).abs() < 1e-6, "{loss}");
    }

    #[test]
    fn masked_positions_do_not_change_the_loss() {
        let device = Device::flex();
        let mut values: Vec<f32> = (0..30).map(|i| (i as f32 * 0.37).sin()).collect();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4, 0, 1], [2, 3]), &device);
        let mask_vec = vec![1f32, 0., 1., 1., 0., 1.];
        let loss = |v: &Vec<f32>| {
            let logits = Tensor::<3>::from_data(TensorData::new(v.clone(), [2, 3, 5]), &device);
            let mask = Tensor::<2>::from_data(TensorData::new(mask_vec.clone(), [2, 3]), &device);
            masked_cross_entropy(logits, targets.clone(), mask, 4).into_scalar::<f32>()
        };
        let before = loss(&values);
        for v in &mut values[5..10] {
            *v += 3.0; // row 0, position 1: masked out
        }
        assert_eq!(before, loss(&values));
    }
}
