//! The polychromic objectives (Hamid et al., ICLR 2026).
//!
//! - `polychromic_rl`: M sets of N replies per prompt; set score `f = mean reward × diversity`;
//!   advantage `f − mean over the prompt's sets` (÷ std); every reply of a set gets its set's
//!   advantage.
//! - `polychromic_regularized`: `CE − λ · D_θ`, with `D_θ` the semantic diversity of the
//!   policy's own mean-pooled hidden states of its N sampled replies (differentiable).

use std::time::Instant;

use anyhow::Result;
use burn::tensor::Tensor;
use polyburn_kernels::diversity::{DiversityImpl, pairwise_cosine_diversity};

use super::sampling::{ReplyBatch, Sampled, policy_gradient_step, reply_embeddings, reward_spread_metrics, sample, scalar, scaled_advantages, score};
use super::set_advantage::{SetAdvantage, marginal_means_pairwise, marginal_means_sampled, sample_sets_containing_each};
use crate::diversity::mean_pair_distance;
use crate::rng::{SplitMix64, Stream, derive_seed};
use super::sft::{BatchTensors, sft_loss};
use super::{Loss, Objective, StepInput};
use crate::model::{ForwardContext, Gpt};

pub struct PolychromicRl;

impl Objective for PolychromicRl {
    fn loss(&self, mut input: StepInput) -> Result<Loss> {
        policy_gradient_step(&mut input, sample_and_score_sets)
    }
}

/// Samples M·N replies per prompt and gives each its set advantage (`objective.set_advantage`).
fn sample_and_score_sets(input: &mut StepInput) -> Result<(Sampled, Vec<f64>)> {
    let (config, device) = (input.config, input.device);
    let ob = &config.objective;
    let (sets, set_size) = (ob.n_sets, ob.n_samples);
    let mut sampled = sample(input, sets * set_size)?;
    let step = input.step;
    let tools = input.tools()?;
    let scored = score(tools, &sampled)?;
    sampled.stats.keep_samples(&sampled.examples, &scored);
    let k = sets * set_size;
    let stats = &mut sampled.stats;
    // Per prompt: each reply's set score (its set's under `partition`, its marginal under
    // `marginal`), and the diversity of the sets that were scored.
    let (reply_scores, diversities): (Vec<Vec<f64>>, Vec<f64>) = match ob.set_advantage {
        SetAdvantage::Partition => {
            let (reply_sets, text_sets) = (sets_of(&sampled.replies, set_size), sets_of(&scored.texts, set_size));
            let diversities = tools.diversities(ob.diversity, &config.kernels, device, &reply_sets, &text_sets, stats)?;
            let scores = set_scores(&sets_of(&scored.rewards, set_size), &diversities);
            let per_reply = scores.chunks(sets).map(|s| s.iter().flat_map(|&f| std::iter::repeat_n(f, set_size)).collect()).collect();
            (per_reply, diversities)
        }
        SetAdvantage::Marginal if ob.diversity.is_pairwise() => {
            let matrices = tools.distance_matrices(ob.diversity, &config.kernels, device, &sampled.replies, &scored.texts, stats)?;
            let per_reply = scored.rewards.iter().zip(&matrices).map(|(r, d)| marginal_means_pairwise(r, d, set_size)).collect();
            (per_reply, matrices.iter().map(|d| mean_pair_distance(d, k)).collect())
        }
        SetAdvantage::Marginal => {
            let mut rng = SplitMix64::new(derive_seed(config.run.seed, Stream::SetSampling, step));
            let drawn = sample_sets_containing_each(k, set_size, ob.n_subsets, &mut rng);
            let pick = |group: &[Vec<u32>]| drawn.iter().map(|s| s.iter().map(|&i| group[i].clone()).collect()).collect::<Vec<Vec<_>>>();
            let reply_sets: Vec<Vec<Vec<u32>>> = sampled.replies.iter().flat_map(|g| pick(g)).collect();
            let text_sets: Vec<Vec<String>> =
                scored.texts.iter().flat_map(|g| drawn.iter().map(|s| s.iter().map(|&i| g[i].clone()).collect::<Vec<_>>()).collect::<Vec<_>>()).collect();
            let diversities = tools.diversities(ob.diversity, &config.kernels, device, &reply_sets, &text_sets, stats)?;
            let reward_sets: Vec<Vec<f64>> =
                scored.rewards.iter().flat_map(|r| drawn.iter().map(|s| s.iter().map(|&i| r[i]).collect::<Vec<_>>()).collect::<Vec<_>>()).collect();
            let scores = set_scores(&reward_sets, &diversities);
            let per_reply = scores.chunks(drawn.len()).map(|s| marginal_means_sampled(s, k, ob.n_subsets)).collect();
            (per_reply, diversities)
        }
    };
    // One row per reply, prompt by prompt in sampling order; each prompt's reply scores are
    // centred (their mean is the prompt's mean set score in both modes).
    let advantages = scaled_advantages(&reply_scores, ob.reward_scaling());
    let mean_score = reply_scores.iter().flatten().sum::<f64>() / (reply_scores.len() * k).max(1) as f64;
    stats.add("train/set_score", mean_score);
    stats.add("train/reward_mean", scored.mean_reward());
    reward_spread_metrics(&scored, stats);
    stats.add("train/diversity", diversities.iter().sum::<f64>() / diversities.len().max(1) as f64);
    Ok((sampled, advantages))
}

pub struct PolychromicRegularized;

impl Objective for PolychromicRegularized {
    fn loss(&self, mut input: StepInput) -> Result<Loss> {
        let (config, model, device) = (input.config, input.model, input.device);
        let ob = &config.objective;
        let mut sampled = sample(&mut input, ob.n_samples)?;
        let started = Instant::now();
        let context = ForwardContext::for_run(config, input.step);
        let sft_batch = input.source.batch(input.first, config.training.batch_size);
        let tokens = sampled.batch.tokens() + sft_batch.batch_size * sft_batch.seq_len;
        let quality = sft_loss(model, &BatchTensors::new(&sft_batch, device), &context);
        let diversity = policy_diversity(model, &sampled.batch, ob.n_samples, &context, config.kernels.diversity);
        let loss = quality.clone() - diversity.clone() * ob.lambda;
        let stats = &mut sampled.stats;
        stats.add("perf/forward_ms", started.elapsed().as_secs_f64() * 1e3);
        stats.add("train/quality_loss", scalar(&quality));
        stats.add("train/diversity", scalar(&diversity));
        Ok(Loss { loss, tokens, metrics: sampled.stats.metrics, samples: sampled.stats.samples, grads: None })
    }
}

/// `D_θ`: mean over prompts of the semantic diversity of the policy's embeddings of their
/// `n` replies (rows grouped by prompt). Differentiable.
pub fn policy_diversity(model: &Gpt, batch: &ReplyBatch, n: usize, context: &ForwardContext, implementation: DiversityImpl) -> Tensor<1> {
    let e = reply_embeddings(model, batch, context);
    let [rows, width] = e.dims();
    pairwise_cosine_diversity(e.reshape([rows / n, n, width]), implementation).mean()
}

/// Polychromic set scores `f = mean reward × diversity` for each set.
pub fn set_scores(rewards: &[Vec<f64>], diversities: &[f64]) -> Vec<f64> {
    rewards.iter().zip(diversities).map(|(r, d)| r.iter().sum::<f64>() / r.len() as f64 * d).collect()
}

/// Each prompt's group cut into consecutive sets of `size`.
fn sets_of<T: Clone>(groups: &[Vec<T>], size: usize) -> Vec<Vec<T>> {
    groups.iter().flat_map(|g| g.chunks(size).map(<[T]>::to_vec)).collect()
}

#[cfg(test)]
mod tests {
    use crate::config::ScaleRewards;
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::model::generate::{Decoding, SamplingOptions, generate_batch};
    use crate::rng::{Stream, derive_seed};
    use crate::train::objective::PolicyTools;
    use crate::train::trainer::build_model;
    use burn::module::Module;
    use burn::tensor::Device;
    use burn::module::{ModuleMapper, Param};
    use burn::optim::GradientsParams;

    fn demo_config(overrides: &[&str], out: &Path) -> Config {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut sets: Vec<String> = vec![
            format!("data.train={root}/data/category_letters/train.jsonl"),
            format!("data.validation={root}/data/category_letters/validation.jsonl"),
            format!("run.output_dir={}", out.display()),
            "model.d_model=32".into(),
            "model.n_layers=2".into(),
            "training.batch_size=3".into(),
            "objective.n_samples=3".into(),
            "objective.sampling.max_new_tokens=6".into(),
        ];
        sets.extend(overrides.iter().map(|s| s.to_string()));
        Config::load(Path::new(&format!("{root}/configs/polychromic_base.yaml")), &sets).unwrap()
    }

    /// Adds `scale ×` the gradient in `grads` to every parameter.
    struct Step<'a> {
        grads: &'a GradientsParams,
        scale: f64,
    }
    impl ModuleMapper for Step<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(g) = self.grads.get::<D>(param.id) else { return param };
            let scale = self.scale;
            param.map(|t| {
                let g = Tensor::from_data(g.into_data(), &t.device());
                t + g * scale
            })
        }
    }

    #[test]
    fn regularized_objective_gradient_is_sft_at_lambda_zero_and_raises_diversity() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::flex().autodiff();
        let config = |lambda: f64| demo_config(&["objective.type=polychromic_regularized", &format!("objective.lambda={lambda}")], dir.path());
        let base = config(0.0);
        let mut data = crate::data::prepare(&base, dir.path()).unwrap();
        let (_, model) = build_model(&base, data.tokenizer.vocab_size(), &device).unwrap();
        let mut tools = PolicyTools::new(&base, data.tokenizer.clone()).unwrap();
        let step = 1500; // past sft_steps: the objective is active
        let grads_of = |loss: Tensor<1>| GradientsParams::from_grads(loss.backward(), &model);
        let mut loss_at = |lambda: f64| {
            let config = config(lambda);
            let input = StepInput { config: &config, model: &model, source: &mut data.train, tools: Some(&mut tools), first: 0, step, device: &device };
            grads_of(PolychromicRegularized.loss(input).unwrap().loss)
        };
        let (g0, g_lambda) = (loss_at(0.0), loss_at(0.5));
        let sft = BatchTensors::new(&data.train.batch(0, base.training.batch_size), &device);
        let g_sft = grads_of(sft_loss(&model, &sft, &ForwardContext::for_run(&base, step)));
        let ids: Vec<_> = crate::weights::named_parameters(&model).into_iter().map(|(n, id, d)| (n, id, d.shape().len())).collect();
        let as_vec = |g: &GradientsParams, id, rank: usize| -> Vec<f32> {
            match rank {
                1 => g.get::<1>(id).unwrap().into_data().try_into_vec().unwrap(),
                2 => g.get::<2>(id).unwrap().into_data().try_into_vec().unwrap(),
                r => panic!("rank {r}"),
            }
        };
        let mut changed = 0.0f64;
        for (name, id, rank) in &ids {
            assert_eq!(as_vec(&g0, *id, *rank), as_vec(&g_sft, *id, *rank), "{name}: λ = 0 must give the sft gradient exactly");
            changed += as_vec(&g_lambda, *id, *rank).iter().zip(as_vec(&g0, *id, *rank)).map(|(a, b)| ((a - b) as f64).abs()).sum::<f64>();
        }
        assert!(changed > 0.0, "λ > 0 must change the gradient");

        // The change is −λ ∇D_θ: stepping against it (along ∇D_θ) raises D_θ, at the rate the
        // gradient predicts (central finite difference over the same sampled replies).
        let inference = model.valid();
        let prompts: Vec<Vec<u32>> = (0..3).map(|i| data.train.example(i).unwrap().prompt_tokens().to_vec()).collect();
        let o = SamplingOptions { temperature: 1.0, max_new_tokens: 6, stop_token: data.tokenizer.eos_id(), seed: derive_seed(base.run.seed, Stream::Sampling, step), ..Default::default() };
        let ctx = ForwardContext::for_run(&base, step);
        let replies = generate_batch(&inference, &prompts, 3, &o, &ctx, Decoding::KvCache, &device.clone().inner()).unwrap();
        let rows: Vec<(&[u32], &[u32], bool)> = prompts.iter().zip(&replies).flat_map(|(p, g)| g.iter().map(move |r| (p.as_slice(), r.as_slice(), r.len() < 6))).collect();
        let batch = ReplyBatch::new(&rows, data.tokenizer.eos_id().unwrap(), model.context_length(), &device);
        let d_of = |m: &Gpt| policy_diversity(m, &batch, 3, &ctx, base.kernels.diversity).into_scalar::<f32>() as f64;
        let grad_d = grads_of(policy_diversity(&model, &batch, 3, &ctx, base.kernels.diversity));
        let mut norm2 = 0.0f64;
        for (name, id, rank) in &ids {
            let (gl, g0v, gd) = (as_vec(&g_lambda, *id, *rank), as_vec(&g0, *id, *rank), as_vec(&grad_d, *id, *rank));
            for ((a, b), d) in gl.iter().zip(&g0v).zip(&gd) {
                let predicted = -0.5 * d;
                assert!(((a - b) - predicted).abs() <= 1e-5 + 1e-3 * predicted.abs(), "{name}: Δgrad {} vs −λ∇D {predicted}", a - b);
                norm2 += (*d as f64).powi(2);
            }
        }
        let eps = 1e-3 / norm2.sqrt();
        let moved = |scale: f64| model.clone().map(&mut Step { grads: &grad_d, scale });
        let (d0, up, down) = (d_of(&model), d_of(&moved(eps)), d_of(&moved(-eps)));
        let numeric = (up - down) / (2.0 * eps);
        assert!(up > d0 && d0 > down, "D_θ must rise along ∇D_θ: {down} {d0} {up}");
        assert!((numeric - norm2).abs() <= 0.05 * norm2, "directional derivative: numeric {numeric} vs ‖∇D‖² {norm2}");
    }

    /// Two prompts × 4 replies in sets of 2, every pair equally distant: under `marginal`
    /// exactly the right reply's row (prompt 0 reply 2, prompt 1 reply 0: rows 2 and 4) gets a
    /// positive advantage; under `partition` its set-mate's row gets the same one.
    #[test]
    fn rows_of_the_batch_receive_their_own_reply_advantage() {
        use crate::train::objective::set_advantage::{marginal_means_pairwise, partition_advantages};
        let rewards = [vec![0.0, 0.0, 1.0, 0.0], vec![1.0, 0.0, 0.0, 0.0]];
        let d: Vec<f64> = (0..16).map(|i| if i / 4 == i % 4 { 0.0 } else { 1.0 }).collect();
        let marginal: Vec<Vec<f64>> = rewards.iter().map(|r| marginal_means_pairwise(r, &d, 2)).collect();
        let rows = scaled_advantages(&marginal, ScaleRewards::Group);
        let positive: Vec<usize> = (0..8).filter(|&i| rows[i] > 0.0).collect();
        assert_eq!(positive, vec![2, 4], "{rows:?}");
        let partition: Vec<Vec<f64>> = rewards.iter().map(|r| set_scores(&[r[..2].to_vec(), r[2..].to_vec()], &[1.0, 1.0])).collect();
        let per_reply: Vec<Vec<f64>> = partition.iter().map(|s| s.iter().flat_map(|&f| [f, f]).collect()).collect();
        let rows = scaled_advantages(&per_reply, ScaleRewards::None);
        assert_eq!(rows, vec![-0.25, -0.25, 0.25, 0.25, 0.25, 0.25, -0.25, -0.25]);
        assert_eq!(partition_advantages(&partition[0], 2), rows[..4].to_vec());
    }

    #[test]
    fn set_scores_multiply_mean_reward_by_diversity() {
        let s = set_scores(&[vec![1.0, 0.0], vec![1.0, 1.0]], &[0.5, 0.0]);
        assert_eq!(s, vec![0.25, 0.0]);
    }
}
