//! `training.gradient_checkpointing`: per-block recomputation. The forward keeps only each
//! block's input (`[B, T, D]` per layer) instead of every activation the backward needs; the
//! backward then walks the blocks from the last to the first, re-running one block with its
//! graph, back-propagating the gradient that arrived at its output, and dropping it again, so
//! at most one block's activations are alive. Costs one extra forward of the blocks.
//!
//! Burn's own checkpointing strategy only recomputes ops it knows to be memory-bound, and
//! polyburn's fused ops (attention, norms, the FFN mix) are custom ops it keeps, so it would
//! save little here; this recomputes everything inside a block.
//!
//! Dropout masks come from the device RNG: it is reseeded from `noise_seed` and the block
//! before each block's forward in both passes, so the recomputed block draws the masks the
//! first pass used.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor};

use super::optim::add_gradients;
use crate::model::{ForwardContext, Gpt, Positions};
use crate::rng::mix64;

/// The device RNG seed before block `i` (`i = n_blocks` for the embeddings).
fn block_seed(noise_seed: u64, i: usize) -> u64 {
    mix64(noise_seed ^ mix64(i as u64 + 1))
}

/// The value of `head(hidden(tokens))` (detached) and its gradients with respect to every
/// parameter of `model`, by per-block recomputation. `head` maps the final hidden states to a
/// scalar loss (the LM head and cross-entropy).
pub fn recomputed_gradients(
    model: &Gpt,
    tokens: Tensor<2, Int>,
    positions: &Positions,
    context: &ForwardContext,
    noise_seed: u64,
    head: impl FnOnce(&Gpt, Tensor<3>) -> Tensor<1>,
) -> (Tensor<1>, GradientsParams) {
    let device: Device = tokens.device();
    let n = model.num_blocks();
    // First pass without a graph: the same parameters with no gradient required record
    // nothing, but still run dropout (an inference copy would not).
    let untracked = model.clone().no_grad();
    device.seed(block_seed(noise_seed, n));
    let mut inputs = vec![untracked.embed(tokens.clone(), positions)];
    for i in 0..n {
        device.seed(block_seed(noise_seed, i));
        let x = untracked.block(i, inputs[i].clone(), positions, context);
        inputs.push(x);
    }
    drop(untracked);

    // The head on the last block's output, then each block from the last, each from a leaf
    // holding its saved input.
    let leaf = inputs.pop().expect("n + 1 saved tensors").require_grad();
    let loss = head(model, model.final_norm(leaf.clone(), context));
    let value = loss.clone().detach();
    let grads = loss.backward();
    let mut upstream = leaf.grad(&grads).expect("the head depends on the hidden states");
    let mut total = GradientsParams::from_grads(grads, model);
    for i in (0..n).rev() {
        let leaf = inputs.pop().expect("one saved input per block").require_grad();
        device.seed(block_seed(noise_seed, i));
        let out = model.block(i, leaf.clone(), positions, context);
        let grads = (out * Tensor::from_inner(upstream)).sum().backward();
        upstream = leaf.grad(&grads).expect("a block's output depends on its input");
        add_gradients(model, &mut total, GradientsParams::from_grads(grads, model));
    }
    device.seed(block_seed(noise_seed, n));
    let grads = (model.embed(tokens, positions) * Tensor::from_inner(upstream)).sum().backward();
    add_gradients(model, &mut total, GradientsParams::from_grads(grads, model));
    (value, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::named_gradients;
    use burn::tensor::Distribution;

    /// `hidden` with the same dropout seeding as the recomputation, in one graph: the plain
    /// backward of the same function.
    fn seeded_hidden(model: &Gpt, tokens: Tensor<2, Int>, positions: &Positions, context: &ForwardContext, noise_seed: u64) -> Tensor<3> {
        let device = tokens.device();
        device.seed(block_seed(noise_seed, model.num_blocks()));
        let mut x = model.embed(tokens, positions);
        for i in 0..model.num_blocks() {
            device.seed(block_seed(noise_seed, i));
            x = model.block(i, x, positions, context);
        }
        model.final_norm(x, context)
    }

    /// The device RNG is process-wide and the other unit tests draw from it on parallel
    /// threads, which shifts the dropout masks between a seeding and its draws: the comparison
    /// runs alone in a child process of this test binary.
    #[test]
    fn recomputed_gradients_equal_the_stored_activation_gradients() {
        let name = "train::recompute::tests::recomputed_gradients_alone";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--ignored", "--test-threads=1"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("1 passed"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    #[ignore = "run alone by recomputed_gradients_equal_the_stored_activation_gradients"]
    fn recomputed_gradients_alone() {
        // The second case packs two documents per row (`data.pack`).
        let packed = Positions::packed((0..27).map(|i| (i % 9 >= 4 + i / 9) as u32).collect(), 3, 9);
        for (dropout, tied, positions) in [(0.0, true, Positions::contiguous(9)), (0.2, false, packed)] {
            let device = Device::flex().autodiff();
            device.seed(11);
            let mut gpt = crate::model::GptConfig::tiny_for_tests(13, tied);
            gpt.dropout = dropout;
            let model = gpt.init(&device);
            // Drawn now: a lazily initialised weight would consume the RNG inside a block.
            crate::model::initialize_parameters(&model);
            let tokens = Tensor::<2>::random([3, 9], Distribution::Uniform(0.0, 13.0), &device).int();
            let probe = Tensor::<3>::random([3, 9, gpt.d_model], Distribution::Normal(0.0, 1.0), &device);
            let context = ForwardContext::default();
            let head = |m: &Gpt, h: Tensor<3>| (m.logits(h).tanh() * probe.clone().mean_dim(2)).sum();
            let reference = head(&model, seeded_hidden(&model, tokens.clone(), &positions, &context, 5));
            let want = GradientsParams::from_grads(reference.clone().backward(), &model);
            let (value, got) = recomputed_gradients(&model, tokens.clone(), &positions, &context, 5, head);
            let (a, b) = (value.into_scalar::<f32>(), reference.into_scalar::<f32>());
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "dropout {dropout}: loss {a} vs {b}");
            for ((name, g), (_, w)) in named_gradients(&got, &model).into_iter().zip(named_gradients(&want, &model)) {
                assert!(!w.is_empty() && g.len() == w.len(), "{name}: {} vs {} values", g.len(), w.len());
                let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
                for (x, y) in g.iter().zip(&w) {
                    assert!(x.is_finite() && (x - y).abs() <= 1e-4 * scale, "dropout {dropout}, {name}: {x} vs {y}");
                }
            }
        }
    }
}
