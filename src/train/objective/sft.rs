//! The `sft` objective: next-token cross-entropy averaged over the positions the batch's loss
//! mask selects (all tokens for text, reply tokens for JSONL).

use burn::tensor::{Device, Int, Tensor, TensorData};
use polyburn_kernels::cross_entropy::linear_cross_entropy;

use super::{Loss, Objective, StepInput};
use crate::data::Batch;
use crate::rng::{Stream, derive_seed};
use crate::train::recompute::recomputed_gradients;
use crate::model::{ForwardContext, Gpt, Positions};

/// Batch buffers as tensors on `device`.
pub struct BatchTensors {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
    pub loss_mask: Tensor<2>,
    /// Number of positions the loss averages over.
    pub loss_tokens: usize,
    /// Token positions, and documents for packed rows.
    pub positions: Positions,
}

impl BatchTensors {
    pub fn new(batch: &Batch, device: &Device) -> Self {
        let shape = [batch.batch_size, batch.seq_len];
        Self {
            inputs: Tensor::from_data(TensorData::new(batch.inputs.clone(), shape), device),
            targets: Tensor::from_data(TensorData::new(batch.targets.clone(), shape), device),
            loss_mask: Tensor::from_data(TensorData::new(batch.loss_mask.clone(), shape), device),
            loss_tokens: batch.loss_tokens(),
            positions: match &batch.documents {
                Some(documents) => Positions::packed(documents.clone(), batch.batch_size, batch.seq_len),
                None => Positions::contiguous(batch.seq_len),
            },
        }
    }
}

/// The `sft` loss of `model` on one batch (`context`: the trainer's step and kernels). The LM
/// head and the cross-entropy run as one op (`kernels.cross_entropy`): with `fused`, the
/// `[B·T, V]` logits never exist.
pub fn sft_loss(model: &Gpt, batch: &BatchTensors, context: &ForwardContext) -> Tensor<1> {
    head_loss(model, model.hidden_at(batch.inputs.clone(), &batch.positions, context), batch, context)
}

/// The LM head and cross-entropy on the final hidden states.
fn head_loss(model: &Gpt, hidden: Tensor<3>, batch: &BatchTensors, context: &ForwardContext) -> Tensor<1> {
    let [b, t, d] = hidden.dims();
    let weights = batch.loss_mask.clone().reshape([b * t]).div_scalar(batch.loss_tokens.max(1) as f64);
    linear_cross_entropy(hidden.reshape([b * t, d]), model.lm_head_weight(), batch.targets.clone().reshape([b * t]), weights, context.cross_entropy)
}

/// `sft`: cross-entropy on the next `batch_size` samples of the data.
pub struct Sft;

impl Objective for Sft {
    fn loss(&self, input: StepInput) -> anyhow::Result<Loss> {
        let batch = input.source.batch(input.first, input.config.training.batch_size);
        // Throughput counts tokens, not the padding after them.
        let tokens = batch.filled;
        let context = ForwardContext::for_run(input.config, input.step);
        let batch = BatchTensors::new(&batch, input.device);
        if input.config.training.gradient_checkpointing {
            let noise_seed = derive_seed(input.config.run.seed, Stream::StepNoise, input.step) ^ input.first;
            let (loss, grads) = recomputed_gradients(input.model, batch.inputs.clone(), &batch.positions, &context, noise_seed, |model, hidden| {
                head_loss(model, hidden, &batch, &context)
            });
            return Ok(Loss { loss, tokens, metrics: Vec::new(), samples: Vec::new(), grads: Some(grads) });
        }
        let loss = sft_loss(input.model, &batch, &context);
        Ok(Loss { loss, tokens, metrics: Vec::new(), samples: Vec::new(), grads: None })
    }

    fn samples(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polyburn_kernels::cross_entropy::CrossEntropyImpl;

    const BOTH: [CrossEntropyImpl; 2] = [CrossEntropyImpl::Fused, CrossEntropyImpl::Reference];

    fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    #[test]
    fn uniform_logits_give_log_vocab_and_mask_selects_positions() {
        let device = Device::flex();
        for implementation in BOTH {
            // A zero head makes every logit 0: each counted position costs ln 5.
            let hidden = tensor((0..18).map(|i| i as f32).collect(), [6, 3], &device);
            let head = Tensor::<2>::zeros([5, 3], &device);
            let targets = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 3, 4, 0], [6]), &device);
            let weights = tensor(vec![1f32, 1., 0., 1., 0., 0.], [6], &device).div_scalar(3.0);
            let loss = linear_cross_entropy(hidden, head, targets, weights, implementation).into_scalar::<f32>();
            assert!((loss - 5f32.ln()).abs() < 1e-6, "{implementation:?}: {loss}");
        }
    }

    #[test]
    fn masked_positions_do_not_change_the_loss() {
        let device = Device::flex();
        let head = tensor((0..20).map(|i| (i as f32 * 0.37).sin()).collect(), [5, 4], &device);
        let targets = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4, 0, 1], [6]), &device);
        let weights = tensor(vec![1f32, 0., 1., 1., 0., 1.], [6], &device).div_scalar(4.0);
        for implementation in BOTH {
            let loss = |v: &Vec<f32>| {
                let hidden = tensor(v.clone(), [6, 4], &device);
                linear_cross_entropy(hidden, head.clone(), targets.clone(), weights.clone(), implementation).into_scalar::<f32>()
            };
            let mut values: Vec<f32> = (0..24).map(|i| (i as f32 * 0.91).cos()).collect();
            let before = loss(&values);
            for v in &mut values[4..8] {
                *v += 3.0; // row 1: masked out
            }
            assert_eq!(before, loss(&values), "{implementation:?}");
            values[0] += 1.0; // row 0 counts
            assert_ne!(before, loss(&values), "{implementation:?}");
        }
    }

    /// A packed row of three documents has the loss and gradients of the same documents one per row: each
    /// attends only to itself and its positions restart at 0 (learned positions and RoPE,
    /// both attention implementations). Without the document ids it would not.
    #[test]
    fn packed_documents_give_the_loss_of_separate_rows() {
        use crate::data::{Batch, LossSequence};
        use polyburn_kernels::attention::AttentionImpl;
        let device = Device::flex();
        let seq = |start: u32, len: u32, loss_from: usize| LossSequence {
            tokens: (start..start + len).map(|t| t % 11).collect(),
            loss_spans: vec![loss_from..len as usize],
        };
        let docs = vec![seq(1, 7, 2), seq(4, 5, 1), seq(2, 9, 4)];
        let separate = Batch::pack(&docs);
        let packed = Batch::pack_documents(std::slice::from_ref(&docs));
        assert_eq!((packed.batch_size, packed.seq_len, packed.filled), (1, 18, 18));
        assert_eq!(packed.loss_tokens(), separate.loss_tokens());
        for llama in [false, true] {
            let mut gpt = crate::model::GptConfig::tiny_for_tests(11, llama);
            gpt.dropout = 0.0;
            device.seed(3);
            let model = gpt.init(&device);
            for attention in [AttentionImpl::Fused, AttentionImpl::Reference] {
                let context = ForwardContext { attention, ..ForwardContext::default() };
                let loss = |b: &Batch| sft_loss(&model, &BatchTensors::new(b, &device), &context).into_scalar::<f32>();
                let (want, got) = (loss(&separate), loss(&packed));
                assert!((want - got).abs() <= 1e-5 * want.abs(), "llama {llama}, {attention:?}: packed {got} vs separate {want}");
                let unmasked = loss(&Batch { documents: None, ..packed.clone() });
                assert!((want - unmasked).abs() > 1e-3, "llama {llama}, {attention:?}: documents made no difference ({unmasked})");
            }
        }
        // And the same gradient for every parameter (fused attention's backward, RoPE).
        let device = Device::flex().autodiff();
        device.seed(4);
        let mut gpt = crate::model::GptConfig::tiny_for_tests(11, true);
        gpt.dropout = 0.0;
        let model = gpt.init(&device);
        let context = ForwardContext { attention: AttentionImpl::Fused, ..ForwardContext::default() };
        let grads = |b: &Batch| {
            let loss = sft_loss(&model, &BatchTensors::new(b, &device), &context);
            crate::weights::named_gradients(&burn::optim::GradientsParams::from_grads(loss.backward(), &model), &model)
        };
        for ((name, a), (_, b)) in grads(&separate).into_iter().zip(grads(&packed)) {
            assert!(!a.is_empty() && a.len() == b.len(), "{name}: {} vs {} gradient values", a.len(), b.len());
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-4 * scale, "{name}: packed {y} vs separate {x}");
            }
        }
    }
}
