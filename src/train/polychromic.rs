//! Sampling objectives: `grpo`, `polychromic_rl` and `polychromic_regularized`.
//!
//! Order within an optimizer step: sample replies with the inference model (no autodiff graph
//! alive) → decode and score them (rewards, diversity: once per step) → one teacher-forced
//! forward and one backward of the objective.

use std::time::Instant;
#[cfg(test)]
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use polyburn_kernels::diversity::{DiversityImpl, pairwise_cosine_diversity};

use super::objective::{BatchTensors, sft_loss};
use super::reward::Rewards;
use crate::config::{Config, KernelsConfig, ObjectiveType};
use crate::data::{Example, SampleSource, TextTokenizer};
use crate::diversity::{DiversityMetric, lcs_diversities, lexical_diversity, semantic_diversity};
use crate::generate::{Decoding, SamplingOptions, generate_batch};
use crate::model::encoder::{SentenceEncoder, mean_pool_normalized};
use crate::model::{ForwardContext, Gpt};
use crate::rng::{Stream, derive_seed};

/// Prompt + reply sequences for teacher forcing, right-padded to one length.
pub struct ReplyBatch {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
    /// 1 where the target is a reply token (the end-of-text token included), else 0.
    pub reply_mask: Tensor<2>,
    /// Reply tokens per row (≥ 1 unless a reply was cut by `max_new_tokens` at 0 tokens).
    pub reply_tokens: Vec<usize>,
}

impl ReplyBatch {
    /// `rows[i] = (prompt, reply)`; a reply that ended by choice gets `eos` appended so its
    /// stopping decision is trained too. Over-long rows lose prompt tokens from the left.
    pub fn new(rows: &[(&[u32], &[u32], bool)], eos: u32, context: usize, device: &Device) -> Self {
        let sequences: Vec<(Vec<u32>, usize)> = rows
            .iter()
            .map(|(prompt, reply, stopped)| {
                let mut seq = prompt.to_vec();
                seq.extend_from_slice(reply);
                if *stopped {
                    seq.push(eos);
                }
                let drop = seq.len().saturating_sub(context + 1).min(prompt.len().saturating_sub(1));
                (seq[drop..].to_vec(), prompt.len() - drop)
            })
            .collect();
        let len = sequences.iter().map(|(s, _)| s.len() - 1).max().unwrap_or(1).clamp(1, context);
        let batch = rows.len();
        let (mut inputs, mut targets, mut mask) = (vec![0i64; batch * len], vec![0i64; batch * len], vec![0f32; batch * len]);
        let mut reply_tokens = Vec::with_capacity(batch);
        for (r, (seq, prompt_len)) in sequences.iter().enumerate() {
            let mut count = 0;
            for p in 0..(seq.len() - 1).min(len) {
                inputs[r * len + p] = seq[p] as i64;
                targets[r * len + p] = seq[p + 1] as i64;
                if p + 1 >= *prompt_len {
                    mask[r * len + p] = 1.0;
                    count += 1;
                }
            }
            reply_tokens.push(count);
        }
        Self {
            inputs: Tensor::from_data(TensorData::new(inputs, [batch, len]), device),
            targets: Tensor::from_data(TensorData::new(targets, [batch, len]), device),
            reply_mask: Tensor::from_data(TensorData::new(mask, [batch, len]), device),
            reply_tokens,
        }
    }

    /// Reply tokens per row as a `[rows, 1]` divisor (at least 1).
    fn lengths(&self, device: &Device) -> Tensor<2> {
        let n: Vec<f32> = self.reply_tokens.iter().map(|&n| n.max(1) as f32).collect();
        Tensor::from_data(TensorData::new(n, [self.reply_tokens.len(), 1]), device)
    }
}

/// Log-probability of every target token, `[rows, len]`.
pub fn token_logprobs(model: &Gpt, batch: &ReplyBatch, context: &ForwardContext) -> Tensor<2> {
    let logits = model.forward(batch.inputs.clone(), context);
    let [rows, len, _] = logits.dims();
    log_softmax(logits, 2).gather(2, batch.targets.clone().reshape([rows, len, 1])).reshape([rows, len])
}

/// Mean of the final hidden states over the positions that predict reply tokens, L2-normalised:
/// the policy's own embedding of each reply, `[rows, d_model]`.
pub fn reply_embeddings(model: &Gpt, batch: &ReplyBatch, context: &ForwardContext) -> Tensor<2> {
    mean_pool_normalized(model.hidden(batch.inputs.clone(), context), batch.reply_mask.clone())
}

/// `D_θ`: mean over prompts of the semantic diversity of the policy's embeddings of their
/// `n` replies (rows grouped by prompt). Differentiable.
pub fn policy_diversity(model: &Gpt, batch: &ReplyBatch, n: usize, context: &ForwardContext, implementation: DiversityImpl) -> Tensor<1> {
    let e = reply_embeddings(model, batch, context);
    let [rows, width] = e.dims();
    pairwise_cosine_diversity(e.reshape([rows / n, n, width]), implementation).mean()
}

/// The clipped policy-gradient surrogate with an optional k3 KL penalty, averaged over each
/// reply's tokens, then over replies. `old_logp` is the sampling policy's, `reference_logp`
/// the initial policy's. Returns `(loss, surrogate term, mean KL)`.
pub fn policy_gradient_loss(
    logp: Tensor<2>,
    old_logp: Tensor<2>,
    reference_logp: Option<Tensor<2>>,
    batch: &ReplyBatch,
    advantages: &[f64],
    ppo_clip: f64,
    kl_beta: f64,
) -> (Tensor<1>, Tensor<1>, Option<Tensor<1>>) {
    let device = logp.device();
    let rows = advantages.len();
    let a: Vec<f32> = advantages.iter().map(|&a| a as f32).collect();
    let a = Tensor::<2>::from_data(TensorData::new(a, [rows, 1]), &device);
    let ratio = (logp.clone() - old_logp).exp();
    let mut surrogate = ratio.clone() * a.clone();
    if ppo_clip > 0.0 {
        surrogate = surrogate.min_pair(ratio.clamp(1.0 - ppo_clip, 1.0 + ppo_clip) * a);
    }
    let lengths = batch.lengths(&device);
    let per_reply = |t: Tensor<2>| (t * batch.reply_mask.clone()).sum_dim(1) / lengths.clone();
    let quality = per_reply(surrogate).mean().neg();
    match reference_logp {
        Some(reference) if kl_beta > 0.0 => {
            let d = reference - logp;
            let kl = per_reply(d.clone().exp() - d - 1.0).mean();
            (quality.clone() + kl.clone() * kl_beta, quality, Some(kl))
        }
        _ => (quality.clone(), quality, None),
    }
}

/// Group-relative advantages: `r − mean(group)`, divided by the group's std when asked.
pub fn group_advantages(rewards: &[f64], normalize: bool) -> Vec<f64> {
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
    rewards.iter().map(|r| if normalize && std > 1e-8 { (r - mean) / std } else { r - mean }).collect()
}

/// Polychromic set scores `f = mean reward × diversity` for each set.
pub fn set_scores(rewards: &[Vec<f64>], diversities: &[f64]) -> Vec<f64> {
    rewards.iter().zip(diversities).map(|(r, d)| r.iter().sum::<f64>() / r.len() as f64 * d).collect()
}

/// What a sampling step measured, besides the loss.
#[derive(Debug, Default, Clone)]
pub struct SamplingStats {
    pub metrics: Vec<(&'static str, f64)>,
}

impl SamplingStats {
    fn add(&mut self, name: &'static str, value: f64) {
        self.metrics.push((name, value));
    }

    fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        self.add(name, started.elapsed().as_secs_f64() * 1e3);
        out
    }
}

/// What sampling objectives need besides the model: rewards, the tokenizer to decode
/// replies, the sentence encoder (semantic diversity) and the initial policy (KL penalty).
pub struct PolicyTools {
    pub rewards: Rewards,
    pub tokenizer: TextTokenizer,
    pub encoder: Option<SentenceEncoder>,
    /// Inference copy of the policy when sampling started; set at the first sampling step.
    pub reference: Option<Gpt>,
}

impl PolicyTools {
    pub fn new(config: &Config, tokenizer: TextTokenizer) -> Result<Self> {
        let ob = &config.objective;
        let needs_encoder = ob.kind.samples() && ob.kind != ObjectiveType::PolychromicRegularized && ob.diversity == DiversityMetric::Semantic;
        let encoder = if needs_encoder {
            Some(SentenceEncoder::load(&ob.encoder, &Device::flex()).with_context(|| {
                "objective.encoder (semantic diversity); run .ci/fetch-minilm to cache all-MiniLM-L6-v2, \
                 or choose objective.diversity: lcs, distinct_2 or self_bleu"
            })?)
        } else {
            None
        };
        Ok(Self { rewards: Rewards::from_config(&ob.rewards), tokenizer, encoder, reference: None })
    }

    /// The configured diversity of each group of token sequences (texts for `semantic`).
    pub fn diversities(
        &self,
        metric: DiversityMetric,
        kernels: &KernelsConfig,
        device: &Device,
        groups: &[Vec<Vec<u32>>],
        texts: &[Vec<String>],
        stats: &mut SamplingStats,
    ) -> Result<Vec<f64>> {
        if metric == DiversityMetric::Semantic {
            let encoder = self.encoder.as_ref().context("semantic diversity needs objective.encoder")?;
            let flat: Vec<&str> = texts.iter().flatten().map(String::as_str).collect();
            let embeddings = stats.time("perf/encode_ms", || encoder.embed(&flat))?;
            let mut chunks = embeddings.chunks(texts.first().map_or(1, Vec::len));
            return stats.time("perf/diversity_ms", || chunks.try_fold(Vec::new(), |mut v, group| {
                v.push(semantic_diversity(group)?);
                Ok(v)
            }));
        }
        if metric == DiversityMetric::Lcs {
            // All groups in one batch, so a large one can go to the GPU in a single launch.
            return Ok(stats.time("perf/diversity_ms", || lcs_diversities(groups, kernels.lcs, device, kernels.lcs_gpu_min_cells)));
        }
        stats.time("perf/diversity_ms", || groups.iter().map(|g| lexical_diversity(metric, g, kernels.lcs)).collect())
    }
}

/// One sampling-objective optimizer step's loss (graph attached) and measurements.
pub struct SamplingLoss {
    pub loss: Tensor<1>,
    pub stats: SamplingStats,
    /// Input tokens of the teacher-forced passes (padding included).
    pub tokens: usize,
}

/// Samples, scores and builds the loss of `config.objective` for the `batch_size` prompts
/// starting at sample `first` of `source`, at optimizer step `step`.
#[allow(clippy::too_many_arguments)]
pub fn sampling_loss(
    config: &Config,
    model: &Gpt,
    tools: &mut PolicyTools,
    source: &mut SampleSource,
    first: u64,
    step: u64,
    device: &Device,
) -> Result<SamplingLoss> {
    let ob = &config.objective;
    let batch_size = config.training.batch_size;
    let context = ForwardContext::for_run(config, step);
    let mut stats = SamplingStats::default();
    let examples: Vec<Example> = (0..batch_size as u64)
        .map(|i| source.example(first + i))
        .collect::<Option<_>>()
        .context("sampling objectives need prompt/reply JSONL data (data.train)")?;
    let eos = tools.tokenizer.eos_id().context("the tokenizer has no end-of-text token")?;
    let per_prompt = match ob.kind {
        ObjectiveType::Grpo | ObjectiveType::PolychromicRl => ob.n_sets * ob.n_samples,
        _ => ob.n_samples,
    };

    // 1. Sample with the inference copy of the model: no autodiff graph is built.
    let inference = model.valid();
    let inference_device = device.clone().inner();
    if ob.kl_beta > 0.0 && tools.reference.is_none() {
        tools.reference = Some(inference.clone());
    }
    let options = SamplingOptions {
        temperature: ob.sampling.temperature,
        top_k: ob.sampling.top_k,
        top_p: ob.sampling.top_p,
        max_new_tokens: ob.sampling.max_new_tokens,
        stop_token: Some(eos),
        seed: derive_seed(config.run.seed, Stream::Sampling, step),
    };
    let prompts: Vec<Vec<u32>> = examples.iter().map(|e| e.prompt_tokens().to_vec()).collect();
    let replies = stats.time("perf/generate_ms", || {
        generate_batch(&inference, &prompts, per_prompt, &options, &ForwardContext::at_step(step), Decoding::KvCache, &inference_device)
    })?;
    let rows: Vec<(&[u32], &[u32], bool)> = prompts
        .iter()
        .zip(&replies)
        .flat_map(|(p, group)| group.iter().map(move |r| (p.as_slice(), r.as_slice(), r.len() < options.max_new_tokens)))
        .collect();
    let batch = ReplyBatch::new(&rows, eos, model.context_length(), device);
    let reply_batch_tokens = batch.inputs.dims().iter().product::<usize>();

    if ob.kind == ObjectiveType::PolychromicRegularized {
        let started = Instant::now();
        let sft_batch = source.batch(first, batch_size);
        let tokens = reply_batch_tokens + sft_batch.batch_size * sft_batch.seq_len;
        let sft = BatchTensors::new(&sft_batch, device);
        let quality = sft_loss(model, &sft, &context);
        let diversity = policy_diversity(model, &batch, per_prompt, &context, config.kernels.diversity);
        let loss = quality.clone() - diversity.clone() * ob.lambda;
        stats.add("perf/forward_ms", started.elapsed().as_secs_f64() * 1e3);
        stats.add("train/quality_loss", scalar(&quality));
        stats.add("train/diversity", scalar(&diversity));
        return Ok(SamplingLoss { loss, stats, tokens });
    }

    // 2. Score: rewards per reply, diversity per group (GRPO) or set (polychromic).
    let texts: Vec<Vec<String>> = replies
        .iter()
        .map(|g| g.iter().map(|r| tools.tokenizer.decode(r)).collect::<Result<_>>())
        .collect::<Result<_>>()?;
    let rewards: Vec<Vec<f64>> = examples
        .iter()
        .zip(&texts)
        .map(|(e, g)| {
            let record = e.record.as_ref().expect("JSONL examples keep their record");
            g.iter().map(|t| tools.rewards.score(record, t)).collect()
        })
        .collect();
    let set_size = if ob.kind == ObjectiveType::PolychromicRl { ob.n_samples } else { per_prompt };
    let all: Vec<f64> = rewards.iter().flatten().copied().collect();
    if !all.iter().all(|r| r.is_finite()) {
        bail!("a reward is not finite");
    }
    let diversities = tools.diversities(ob.diversity, &config.kernels, device, &sets_of(&replies, set_size), &sets_of(&texts, set_size), &mut stats)?;
    let mut advantages = Vec::with_capacity(rows.len());
    match ob.kind {
        ObjectiveType::Grpo => {
            for r in &rewards {
                advantages.extend(group_advantages(r, ob.normalize_advantage));
            }
        }
        ObjectiveType::PolychromicRl => {
            let scores = set_scores(&sets_of(&rewards, set_size), &diversities);
            stats.add("train/set_score", scores.iter().sum::<f64>() / scores.len() as f64);
            for prompt_sets in scores.chunks(ob.n_sets) {
                for a in group_advantages(prompt_sets, ob.normalize_advantage) {
                    advantages.extend(std::iter::repeat_n(a, set_size));
                }
            }
        }
        ObjectiveType::Sft | ObjectiveType::PolychromicRegularized => unreachable!("handled above"),
    }
    stats.add("train/reward_mean", all.iter().sum::<f64>() / all.len() as f64);
    stats.add("train/diversity", diversities.iter().sum::<f64>() / diversities.len() as f64);

    // 3. One teacher-forced forward of the policy (plus inference passes for the ratio's
    // sampling policy under dropout and for the KL reference).
    let started = Instant::now();
    let logp = token_logprobs(model, &batch, &context);
    let reference = tools.reference.as_ref().filter(|_| ob.kl_beta > 0.0);
    let with_dropout = config.model.dropout > 0.0;
    // The same sequences on the inference device, built once for both extra passes.
    let inner_batch = (with_dropout || reference.is_some()).then(|| ReplyBatch::new(&rows, eos, model.context_length(), &inference_device));
    let host_logprobs = |m: &Gpt| {
        let inner = inner_batch.as_ref().expect("built when an extra pass is needed");
        Tensor::<2>::from_data(token_logprobs(m, inner, &context).into_data(), device)
    };
    let old_logp = if with_dropout { host_logprobs(&inference) } else { logp.clone().detach() };
    let reference_logp = reference.map(host_logprobs);
    let (loss, quality, kl) = policy_gradient_loss(logp, old_logp, reference_logp, &batch, &advantages, ob.ppo_clip, ob.kl_beta);
    stats.add("perf/forward_ms", started.elapsed().as_secs_f64() * 1e3);
    stats.add("train/quality_loss", scalar(&quality));
    if let Some(kl) = kl {
        stats.add("train/kl", scalar(&kl));
    }
    Ok(SamplingLoss { loss, stats, tokens: reply_batch_tokens })
}

/// Each prompt's group cut into consecutive sets of `size` (one set per group for `grpo`).
fn sets_of<T: Clone>(groups: &[Vec<T>], size: usize) -> Vec<Vec<T>> {
    groups.iter().flat_map(|g| g.chunks(size).map(<[T]>::to_vec)).collect()
}

fn scalar(t: &Tensor<1>) -> f64 {
    t.clone().into_scalar::<f32>() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::trainer::build_model;
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
            let out = sampling_loss(&config(lambda), &model, &mut tools, &mut data.train, 0, step, &device).unwrap();
            grads_of(out.loss)
        };
        let (g0, g_lambda) = (loss_at(0.0), loss_at(0.5));
        let sft = BatchTensors::new(&data.train.batch(0, base.training.batch_size), &device);
        let g_sft = grads_of(sft_loss(&model, &sft, &ForwardContext::for_run(&base, step)));
        let ids: Vec<_> = crate::train::checkpoint::named_parameters(&model).into_iter().map(|(n, id, d)| (n, id, d.shape().len())).collect();
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

    #[test]
    fn group_advantages_center_and_scale() {
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0], true);
        assert_eq!(a, vec![1.0, -1.0, -1.0, 1.0]);
        assert_eq!(group_advantages(&[1.0, 1.0], true), vec![0.0, 0.0]);
        assert_eq!(group_advantages(&[2.0, 0.0], false), vec![1.0, -1.0]);
    }

    #[test]
    fn set_scores_multiply_mean_reward_by_diversity() {
        let s = set_scores(&[vec![1.0, 0.0], vec![1.0, 1.0]], &[0.5, 0.0]);
        assert_eq!(s, vec![0.25, 0.0]);
    }
}
