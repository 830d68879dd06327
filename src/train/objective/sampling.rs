//! What the sampling objectives share. Order within an optimizer step: [`sample`] replies with
//! the inference model (no autodiff graph alive) → [`score`] them (rewards per reply) and their
//! groups (diversity, once per step) → one teacher-forced forward and one backward, through
//! [`policy_gradient_loss`] for `grpo` and `polychromic_rl`.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use polyburn_kernels::cross_entropy::target_log_probs;
use burn::tensor::{Device, Tensor, TensorData};

use super::rollout::{Rollout, Rollouts};
use super::sft::BatchTensors;
use super::{Loss, StepInput};
use crate::config::{Config, KernelsConfig, LossType, ObjectiveType};
use crate::data::{Batch, Example, LossSequence, TextTokenizer, fit_to_context};
use crate::diversity::{DiversityMetric, distinct_replies, lcs_distances, lexical_diversity, mean_pair_distance, semantic_distances};
use crate::model::generate::{Decoding, SamplingOptions, generate_batch};
use crate::model::encoder::{SentenceEncoder, mean_pool_normalized};
use crate::model::{ForwardContext, Gpt};
use crate::rng::{Stream, derive_seed};
use crate::train::reward::Rewards;

/// Prompt + reply sequences for teacher forcing, packed like the data's JSONL records
/// ([`Batch::pack`]): the loss mask covers the reply tokens.
pub struct ReplyBatch {
    pub tensors: BatchTensors,
    /// Reply tokens per row (≥ 1 unless a reply was cut by `max_new_tokens` at 0 tokens).
    pub reply_tokens: Vec<usize>,
    /// The end token appended to replies that stopped.
    pub eos: u32,
}

impl ReplyBatch {
    /// `rows[i] = (prompt, reply, stopped)`; a reply that ended by choice gets `eos` appended so
    /// its stopping decision is trained too. Over-long rows lose prompt tokens from the left.
    pub fn new(rows: &[(&[u32], &[u32], bool)], eos: u32, context: usize, device: &Device) -> Self {
        let sequences: Vec<LossSequence> = rows
            .iter()
            .map(|(prompt, reply, stopped)| {
                let mut seq = prompt.to_vec();
                seq.extend_from_slice(reply);
                if *stopped {
                    seq.push(eos);
                }
                fit_to_context(&seq, &[prompt.len()..seq.len()], context)
            })
            .collect();
        let batch = Batch::pack(&sequences);
        Self { reply_tokens: batch.loss_tokens_per_row(), tensors: BatchTensors::new(&batch, device), eos }
    }

    /// Reply tokens per row as a `[rows, 1]` divisor (at least 1).
    fn lengths(&self, device: &Device) -> Tensor<2> {
        let n: Vec<f32> = self.reply_tokens.iter().map(|&n| n.max(1) as f32).collect();
        Tensor::from_data(TensorData::new(n, [self.reply_tokens.len(), 1]), device)
    }

    /// Input tokens (padding included).
    pub fn tokens(&self) -> usize {
        self.tensors.inputs.dims().iter().product()
    }
}

/// Log-probability of every target token, `[rows, len]`, under the distribution replies are
/// sampled from: logits divided by the sampling `temperature` (1 = the model's own; 0, greedy,
/// is treated as 1).
pub fn token_logprobs(model: &Gpt, batch: &ReplyBatch, context: &ForwardContext, temperature: f64) -> Tensor<2> {
    gathered_log_probs(sampling_logits(model, batch, context, temperature), batch)
}

/// The policy's logits divided by the sampling temperature, `[rows, len, vocab]`.
fn sampling_logits(model: &Gpt, batch: &ReplyBatch, context: &ForwardContext, temperature: f64) -> Tensor<3> {
    let logits = model.forward(batch.tensors.inputs.clone(), context);
    if temperature > 0.0 && temperature != 1.0 { logits.div_scalar(temperature) } else { logits }
}

/// The log-probability of each target token under `logits`, `[rows, len]`.
fn gathered_log_probs(logits: Tensor<3>, batch: &ReplyBatch) -> Tensor<2> {
    let [rows, len, vocab] = logits.dims();
    target_log_probs(logits.reshape([rows * len, vocab]), batch.tensors.targets.clone().reshape([rows * len])).reshape([rows, len])
}

/// Mean entropy (nats) of the sampling distributions at the positions `mask` counts: how much
/// randomness the policy has left (a collapsing policy's falls towards 0).
pub fn mean_token_entropy(logits: Tensor<3>, mask: &Tensor<2>) -> f64 {
    let [rows, len, _] = logits.dims();
    let log_p = burn::tensor::activation::log_softmax(logits, 2);
    let entropy = (log_p.clone().exp() * log_p).sum_dim(2).reshape([rows, len]).neg();
    let counted = mask.clone().sum().into_scalar::<f32>().max(1.0) as f64;
    (entropy * mask.clone()).sum().into_scalar::<f32>() as f64 / counted
}

/// Mean of the final hidden states over the positions that predict reply tokens, L2-normalised:
/// the policy's own embedding of each reply, `[rows, d_model]`.
pub fn reply_embeddings(model: &Gpt, batch: &ReplyBatch, context: &ForwardContext) -> Tensor<2> {
    mean_pool_normalized(model.hidden(batch.tensors.inputs.clone(), context), batch.tensors.loss_mask.clone())
}

/// How the policy-gradient term is built (from `objective`).
#[derive(Debug, Clone, Copy)]
pub struct PolicyGradientOptions {
    /// Ratio clip range below and above 1 (0 below: no clipping).
    pub clip_low: f64,
    pub clip_high: f64,
    pub kl_beta: f64,
    pub loss_type: LossType,
    /// The `dr_grpo` constant: the longest possible reply (+ its end token).
    pub max_reply_tokens: usize,
}

impl PolicyGradientOptions {
    pub fn from_config(ob: &crate::config::ObjectiveConfig) -> Self {
        Self {
            clip_low: ob.ppo_clip,
            clip_high: ob.ppo_clip_high.unwrap_or(ob.ppo_clip),
            kl_beta: ob.kl_beta,
            loss_type: ob.loss_type,
            max_reply_tokens: ob.sampling.max_new_tokens + 1,
        }
    }
}

/// The policy-gradient terms of a batch and what they measured.
pub struct PolicyGradientLoss {
    pub loss: Tensor<1>,
    /// The surrogate term alone (the loss without the KL penalty).
    pub quality: Tensor<1>,
    pub kl: Option<Tensor<1>>,
    /// Share of counted tokens whose ratio was clipped.
    pub clip_fraction: f64,
}

/// The clipped policy-gradient surrogate with an optional k3 KL penalty, averaged as
/// `options.loss_type` says over the reply tokens of the rows `kept` (all rows, or those not
/// cut off by `max_new_tokens` with `objective.mask_truncated`). `old_logp` is the sampling
/// policy's, `reference_logp` the initial policy's. Padded positions are masked before `exp`,
/// so whatever their log-probabilities are cannot overflow.
pub fn policy_gradient_loss(
    logp: Tensor<2>,
    old_logp: Tensor<2>,
    reference_logp: Option<Tensor<2>>,
    batch: &ReplyBatch,
    advantages: &[f64],
    kept: &[bool],
    options: PolicyGradientOptions,
) -> PolicyGradientLoss {
    let device = logp.device();
    let rows = advantages.len();
    let a: Vec<f32> = advantages.iter().map(|&a| a as f32).collect();
    let a = Tensor::<2>::from_data(TensorData::new(a, [rows, 1]), &device);
    let keep: Vec<f32> = kept.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
    let keep = Tensor::<2>::from_data(TensorData::new(keep, [rows, 1]), &device);
    let mask = batch.tensors.loss_mask.clone() * keep.clone();
    let ratio = ((logp.clone() - old_logp) * mask.clone()).exp();
    let mut surrogate = ratio.clone() * a.clone();
    let mut clip_fraction = 0.0;
    if options.clip_low > 0.0 || options.clip_high > 0.0 {
        let clipped = ratio.clone().clamp(1.0 - options.clip_low, 1.0 + options.clip_high);
        let counted = mask.clone().sum().into_scalar::<f32>().max(1.0) as f64;
        let changed = clipped.clone().not_equal(ratio.clone()).float() * mask.clone();
        clip_fraction = changed.sum().into_scalar::<f32>() as f64 / counted;
        surrogate = surrogate.min_pair(clipped * a);
    }
    let kept_rows = kept.iter().filter(|&&k| k).count().max(1) as f64;
    let lengths = batch.lengths(&device);
    // Token terms `[rows, len]` → one number, as `loss_type` averages them.
    let average = |t: Tensor<2>| -> Tensor<1> {
        let t = t * mask.clone();
        match options.loss_type {
            LossType::Grpo => (t.sum_dim(1) / lengths.clone()).sum().div_scalar(kept_rows),
            LossType::DrGrpo => t.sum().div_scalar(options.max_reply_tokens as f64 * kept_rows),
            LossType::Dapo => t.sum() / mask.clone().sum().clamp_min(1.0),
        }
    };
    let quality = average(surrogate).neg();
    match reference_logp {
        Some(reference) if options.kl_beta > 0.0 => {
            let d = (reference - logp) * mask.clone();
            let kl = average(d.clone().exp() - d - 1.0);
            PolicyGradientLoss { loss: quality.clone() + kl.clone() * options.kl_beta, quality, kl: Some(kl), clip_fraction }
        }
        _ => PolicyGradientLoss { loss: quality.clone(), quality, kl: None, clip_fraction },
    }
}

/// Advantages of a batch of groups, row by row: each reward minus its group's mean, divided
/// as `scale` says (by the group's std, by the std of every reward in the batch, or not).
pub fn scaled_advantages(groups: &[Vec<f64>], scale: crate::config::ScaleRewards) -> Vec<f64> {
    use crate::config::ScaleRewards;
    match scale {
        ScaleRewards::Group => groups.iter().flat_map(|g| group_advantages(g, true)).collect(),
        ScaleRewards::None => groups.iter().flat_map(|g| group_advantages(g, false)).collect(),
        ScaleRewards::Batch => {
            let all: Vec<f64> = groups.iter().flatten().copied().collect();
            let n = all.len().max(1) as f64;
            let mean = all.iter().sum::<f64>() / n;
            let std = (all.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
            let centred = groups.iter().flat_map(|g| group_advantages(g, false));
            centred.map(|a| if std > 1e-8 { a / std } else { a }).collect()
        }
    }
}

/// Group-relative advantages: `r − mean(group)`, divided by the group's std when asked.
pub fn group_advantages(rewards: &[f64], normalize: bool) -> Vec<f64> {
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
    rewards.iter().map(|r| if normalize && std > 1e-8 { (r - mean) / std } else { r - mean }).collect()
}

/// Measurements of one sampling step, in the order they were taken.
#[derive(Debug, Default, Clone)]
pub struct SamplingStats {
    pub metrics: Vec<(&'static str, f64)>,
    /// A few of the step's replies with their rewards (the run's `samples.jsonl`).
    pub samples: Vec<ReplySample>,
}

/// One sampled reply as `samples.jsonl` records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplySample {
    pub prompt: String,
    pub reply: String,
    pub reward: f64,
}

/// Replies of the first prompt kept per step for `samples.jsonl`.
const SAMPLES_PER_STEP: usize = 4;

impl SamplingStats {
    /// Keeps the first prompt's first few replies and their rewards.
    pub fn keep_samples(&mut self, examples: &[Example], scored: &Scored) {
        let (Some(example), Some(texts), Some(rewards)) = (examples.first(), scored.texts.first(), scored.rewards.first()) else { return };
        let prompt = example.record.as_ref().map_or(String::new(), |r| r.prompt.clone());
        self.samples = texts
            .iter()
            .zip(rewards)
            .take(SAMPLES_PER_STEP)
            .map(|(reply, &reward)| ReplySample { prompt: prompt.clone(), reply: reply.clone(), reward })
            .collect();
    }
}

impl SamplingStats {
    pub fn add(&mut self, name: &'static str, value: f64) {
        self.metrics.push((name, value));
    }

    /// Runs `f` and records its wall time in ms under `name`.
    pub fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> T) -> T {
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
    /// The sample batches of the `objective.num_iterations` cycle in progress.
    pub rollouts: Rollouts,
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
        Ok(Self { rewards: Rewards::from_config(&ob.rewards), tokenizer, encoder, reference: None, rollouts: Rollouts::default() })
    }

    /// The configured diversity of each group of token sequences (texts for `semantic` and
    /// `distinct`). The pairwise metrics are the mean over pairs of [`Self::distance_matrices`].
    pub fn diversities(
        &self,
        metric: DiversityMetric,
        kernels: &KernelsConfig,
        device: &Device,
        groups: &[Vec<Vec<u32>>],
        texts: &[Vec<String>],
        stats: &mut SamplingStats,
    ) -> Result<Vec<f64>> {
        if metric.is_pairwise() {
            let matrices = self.distance_matrices(metric, kernels, device, groups, texts, stats)?;
            return Ok(matrices.iter().zip(texts).map(|(d, group)| mean_pair_distance(d, group.len())).collect());
        }
        if metric == DiversityMetric::Distinct {
            return Ok(stats.time("perf/diversity_ms", || texts.iter().map(|g| distinct_replies(g)).collect()));
        }
        stats.time("perf/diversity_ms", || groups.iter().map(|g| lexical_diversity(metric, g, kernels.lcs)).collect())
    }

    /// Each group's `[n×n]` pairwise distances of a pairwise `metric` (semantic, lcs), whose
    /// mean over a set's pairs is the set's diversity.
    pub fn distance_matrices(
        &self,
        metric: DiversityMetric,
        kernels: &KernelsConfig,
        device: &Device,
        groups: &[Vec<Vec<u32>>],
        texts: &[Vec<String>],
        stats: &mut SamplingStats,
    ) -> Result<Vec<Vec<f64>>> {
        match metric {
            DiversityMetric::Semantic => {
                let encoder = self.encoder.as_ref().context("semantic diversity needs objective.encoder")?;
                let flat: Vec<&str> = texts.iter().flatten().map(String::as_str).collect();
                let embeddings = stats.time("perf/encode_ms", || encoder.embed(&flat))?;
                let per_group = texts.first().map_or(1, Vec::len);
                stats.time("perf/diversity_ms", || embeddings.chunks(per_group).map(semantic_distances).collect())
            }
            // All groups in one batch, so a large one can go to the GPU in a single launch.
            DiversityMetric::Lcs => Ok(stats.time("perf/diversity_ms", || lcs_distances(groups, kernels.lcs, device, kernels.lcs_gpu_min_cells))),
            other => bail!("objective.diversity: `{other:?}` is not a mean over pairs"),
        }
    }
}

/// One micro-batch's prompts and the replies sampled to them.
pub struct Sampled {
    pub examples: Vec<Example>,
    pub prompts: Vec<Vec<u32>>,
    /// `replies[prompt][i]`: new tokens, without the end token.
    pub replies: Vec<Vec<Vec<u32>>>,
    /// Every (prompt, reply) pair as a teacher-forcing batch on the training device.
    pub batch: ReplyBatch,
    /// The model the replies were sampled from (the policy without its autodiff graph).
    pub inference: Gpt,
    pub eos: u32,
    pub max_new_tokens: usize,
    pub stats: SamplingStats,
}

impl Sampled {
    /// `(prompt, reply, ended with the end token)` for every reply, prompt by prompt.
    pub fn rows(&self) -> Vec<(&[u32], &[u32], bool)> {
        rows_of(&self.prompts, &self.replies, self.max_new_tokens)
    }
}

/// A reply shorter than `max_new_tokens` stopped at the end token.
fn rows_of<'a>(prompts: &'a [Vec<u32>], replies: &'a [Vec<Vec<u32>>], max_new_tokens: usize) -> Vec<(&'a [u32], &'a [u32], bool)> {
    prompts
        .iter()
        .zip(replies)
        .flat_map(|(p, group)| group.iter().map(move |r| (p.as_slice(), r.as_slice(), r.len() < max_new_tokens)))
        .collect()
}

/// Samples `per_prompt` replies to each of the micro-batch's `batch_size` prompts with the
/// inference copy of the model, in one batch over a KV cache, seeded from the run seed and
/// the step. Also keeps the initial policy for the KL penalty at the first sampling step.
pub fn sample(input: &mut StepInput, per_prompt: usize) -> Result<Sampled> {
    let (config, step, first) = (input.config, input.step, input.first);
    let mut stats = SamplingStats::default();
    let examples: Vec<Example> = (0..config.training.batch_size as u64)
        .map(|i| input.source.example(first + i))
        .collect::<Option<_>>()
        .context("sampling objectives need prompt/reply JSONL data (data.train)")?;
    let inference = input.model.valid();
    let inference_device = input.device.clone().inner();
    let tools = input.tools()?;
    let eos = tools.tokenizer.eos_id().context("the tokenizer has no end-of-text token")?;
    if config.objective.kl_beta > 0.0 && tools.reference.is_none() {
        tools.reference = Some(inference.clone());
    }
    let options = SamplingOptions::from_config(&config.objective.sampling, Some(eos), derive_seed(config.run.seed, Stream::Sampling, step));
    let prompts: Vec<Vec<u32>> = examples.iter().map(|e| e.prompt_tokens().to_vec()).collect();
    let replies = stats.time("perf/generate_ms", || {
        generate_batch(&inference, &prompts, per_prompt, &options, &ForwardContext::at_step(step), Decoding::KvCache, &inference_device)
    })?;
    let batch = ReplyBatch::new(&rows_of(&prompts, &replies, options.max_new_tokens), eos, input.model.context_length(), input.device);
    Ok(Sampled { examples, prompts, replies, batch, inference, eos, max_new_tokens: options.max_new_tokens, stats })
}

/// Decoded replies and their rewards, `[prompt][reply]`.
pub struct Scored {
    pub texts: Vec<Vec<String>>,
    pub rewards: Vec<Vec<f64>>,
}

impl Scored {
    pub fn mean_reward(&self) -> f64 {
        let all: Vec<f64> = self.rewards.iter().flatten().copied().collect();
        all.iter().sum::<f64>() / all.len() as f64
    }
}

/// Decodes every reply and scores it with the configured rewards against its record.
pub fn score(tools: &PolicyTools, sampled: &Sampled) -> Result<Scored> {
    let texts: Vec<Vec<String>> = sampled
        .replies
        .iter()
        .map(|g| g.iter().map(|r| tools.tokenizer.decode(r)).collect::<Result<_>>())
        .collect::<Result<_>>()?;
    let rewards: Vec<Vec<f64>> = sampled
        .examples
        .iter()
        .zip(&texts)
        .map(|(e, g)| {
            let record = e.record.as_ref().expect("JSONL examples keep their record");
            g.iter().map(|t| tools.rewards.score(record, t)).collect()
        })
        .collect();
    if !rewards.iter().flatten().all(|r| r.is_finite()) {
        bail!("a reward is not finite");
    }
    Ok(Scored { texts, rewards })
}

/// The loss of a `grpo` / `polychromic_rl` step. At the first step of a cycle of
/// `objective.num_iterations` updates, `sample_and_score` samples the replies and gives each
/// row's advantage; the cycle's later steps train on that saved rollout again (the sampling
/// policy's log-probs kept from the first update, so the ratio is the current policy's to it).
pub fn policy_gradient_step(
    input: &mut StepInput,
    sample_and_score: impl FnOnce(&mut StepInput) -> Result<(Sampled, Vec<f64>)>,
) -> Result<Loss> {
    let ob = &input.config.objective;
    let (step, first) = (input.step, input.first);
    let sampled_at = ob.batch_step(step);
    if sampled_at != step {
        let rollout = input.tools()?.rollouts.get(sampled_at, first).cloned().with_context(|| {
            format!(
                "step {}: the replies sampled at step {} for objective.num_iterations {} are missing",
                step + 1,
                sampled_at + 1,
                ob.num_iterations
            )
        })?;
        let rows = rollout.rows();
        let batch = ReplyBatch::new(&rows, rollout.eos, input.model.context_length(), input.device);
        let dims: [usize; 2] = batch.tensors.loss_mask.dims();
        let old: Vec<f32> = rollout.old_logp.iter().map(|&v| v as f32).collect();
        let old = Tensor::<2>::from_data(TensorData::new(old, dims), input.device);
        let mut stats = SamplingStats { metrics: rollout.metrics.clone(), samples: rollout.samples.clone() };
        stats.add("train/rollout_iteration", (step - sampled_at) as f64);
        return Ok(update_loss(input, &rows, &batch, &rollout.advantages, OldPolicy::Saved(old), stats)?.0);
    }
    let (sampled, advantages) = sample_and_score(input)?;
    let rows = sampled.rows();
    let mut stats = sampled.stats.clone();
    let measured: Vec<(&'static str, f64)> = stats.metrics.iter().filter(|(n, _)| !n.starts_with("perf/")).copied().collect();
    stats.add("train/rollout_iteration", 0.0);
    let (loss, old_logp) = update_loss(input, &rows, &sampled.batch, &advantages, OldPolicy::Sampler(&sampled.inference), stats)?;
    if input.config.objective.num_iterations > 1 {
        let old_logp: Vec<f32> = old_logp.into_data().convert::<f32>().try_into_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let rollout = Rollout {
            sampled_at,
            first,
            rows: rows.iter().map(|(p, r, s)| (p.to_vec(), r.to_vec(), *s)).collect(),
            eos: sampled.batch.eos,
            advantages,
            old_logp: old_logp.into_iter().map(f64::from).collect(),
            metrics: measured,
            samples: sampled.stats.samples.clone(),
        };
        input.tools()?.rollouts.keep(rollout);
    }
    Ok(loss)
}

/// Where the ratio's sampling-policy log-probs come from.
enum OldPolicy<'a> {
    /// This update sampled with `model`: the policy's own log-probs (detached), or `model`'s
    /// own pass when dropout makes the training forward differ from the sampler.
    Sampler(&'a Gpt),
    /// Saved by the cycle's first update.
    Saved(Tensor<2>),
}

/// One update's policy-gradient loss on `batch` (the sequences of `rows`): one teacher-forced
/// forward of the policy, plus inference passes for the ratio's sampling policy (under
/// dropout) and for the KL reference. Also returns the sampling policy's log-probs.
fn update_loss(
    input: &mut StepInput,
    rows: &[(&[u32], &[u32], bool)],
    batch: &ReplyBatch,
    advantages: &[f64],
    old: OldPolicy,
    mut stats: SamplingStats,
) -> Result<(Loss, Tensor<2>)> {
    let (config, model, device) = (input.config, input.model, input.device);
    let ob = &config.objective;
    let context = ForwardContext::for_run(config, input.step);
    let started = Instant::now();
    let temperature = ob.sampling.temperature;
    let logits = sampling_logits(model, batch, &context, temperature);
    stats.add("train/entropy", mean_token_entropy(logits.clone().detach(), &batch.tensors.loss_mask));
    let logp = gathered_log_probs(logits, batch);
    let reference = input.tools()?.reference.as_ref().filter(|_| ob.kl_beta > 0.0);
    let with_dropout = config.model.dropout > 0.0;
    let sampler_pass = with_dropout && matches!(old, OldPolicy::Sampler(_));
    // The same sequences on the inference device, built once for both extra passes.
    let inner_batch = (sampler_pass || reference.is_some())
        .then(|| ReplyBatch::new(rows, batch.eos, model.context_length(), &device.clone().inner()));
    let host_logprobs = |m: &Gpt| {
        let inner = inner_batch.as_ref().expect("built when an extra pass is needed");
        Tensor::<2>::from_data(token_logprobs(m, inner, &context, temperature).into_data(), device)
    };
    let old_logp = match old {
        OldPolicy::Sampler(sampler) if with_dropout => host_logprobs(sampler),
        OldPolicy::Sampler(_) => logp.clone().detach(),
        OldPolicy::Saved(saved) => saved,
    };
    let reference_logp = reference.map(host_logprobs);
    let truncated: Vec<bool> = rows.iter().map(|(_, reply, stopped)| !stopped && !reply.is_empty()).collect();
    let kept: Vec<bool> = truncated.iter().map(|&t| !(t && ob.mask_truncated)).collect();
    let options = PolicyGradientOptions::from_config(ob);
    let pg = policy_gradient_loss(logp, old_logp.clone(), reference_logp, batch, advantages, &kept, options);
    stats.add("perf/forward_ms", started.elapsed().as_secs_f64() * 1e3);
    stats.add("train/quality_loss", scalar(&pg.quality));
    if let Some(kl) = &pg.kl {
        stats.add("train/kl", scalar(kl));
    }
    stats.add("train/clip_fraction", pg.clip_fraction);
    let lengths: Vec<f64> = rows.iter().map(|(_, reply, _)| reply.len() as f64).collect();
    stats.add("train/reply_length_mean", lengths.iter().sum::<f64>() / lengths.len().max(1) as f64);
    stats.add("train/reply_length_min", lengths.iter().copied().fold(f64::INFINITY, f64::min));
    stats.add("train/reply_length_max", lengths.iter().copied().fold(0.0, f64::max));
    stats.add("train/truncated_fraction", truncated.iter().filter(|&&t| t).count() as f64 / truncated.len().max(1) as f64);
    let loss = Loss { loss: pg.loss, tokens: batch.tokens(), metrics: stats.metrics, samples: stats.samples, grads: None };
    Ok((loss, old_logp))
}

/// `train/reward_std` and `train/zero_spread_fraction` (prompts whose replies all scored the
/// same, so a group-relative objective learns nothing from them).
pub fn reward_spread_metrics(scored: &Scored, stats: &mut SamplingStats) {
    let all: Vec<f64> = scored.rewards.iter().flatten().copied().collect();
    let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
    let std = (all.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / all.len().max(1) as f64).sqrt();
    stats.add("train/reward_std", std);
    let flat = scored.rewards.iter().filter(|g| g.iter().all(|&r| (r - g[0]).abs() < 1e-12)).count();
    stats.add("train/zero_spread_fraction", flat as f64 / scored.rewards.len().max(1) as f64);
}

pub(crate) fn scalar(t: &Tensor<1>) -> f64 {
    t.clone().into_scalar::<f32>() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::log_softmax;

    #[test]
    fn group_advantages_center_and_scale() {
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0], true);
        assert_eq!(a, vec![1.0, -1.0, -1.0, 1.0]);
        assert_eq!(group_advantages(&[1.0, 1.0], true), vec![0.0, 0.0]);
        assert_eq!(group_advantages(&[2.0, 0.0], false), vec![1.0, -1.0]);
    }

    /// Row 0: one reply token, row 1: three (batch length 3, row 0 padded at 1 and 2).
    fn two_row_batch(device: &Device) -> ReplyBatch {
        let (prompt, short, long) = ([5u32], [6u32], [6u32, 7, 8]);
        ReplyBatch::new(&[(&prompt, &short, false), (&prompt, &long, false)], 2, 16, device)
    }

    fn options(loss_type: LossType) -> PolicyGradientOptions {
        PolicyGradientOptions { clip_low: 0.2, clip_high: 0.2, kl_beta: 0.0, loss_type, max_reply_tokens: 4 }
    }

    fn loss_of(pg: &PolicyGradientLoss) -> f32 {
        pg.loss.clone().into_scalar::<f32>()
    }

    #[test]
    fn token_logprobs_follow_the_sampling_temperature() {
        let device = Device::flex();
        device.seed(3);
        let model = crate::model::GptConfig::tiny_for_tests(11, false).init(&device);
        let batch = two_row_batch(&device);
        let ctx = ForwardContext::default();
        let logits = model.forward(batch.tensors.inputs.clone(), &ctx);
        let want = log_softmax(logits.div_scalar(2.0), 2).gather(2, batch.tensors.targets.clone().reshape([2, 3, 1])).reshape([2, 3]);
        let got = token_logprobs(&model, &batch, &ctx, 2.0);
        got.clone().into_data().assert_approx_eq::<f32>(&want.into_data(), Default::default());
        let at_one: Vec<f32> = token_logprobs(&model, &batch, &ctx, 1.0).into_data().try_into_vec().unwrap();
        assert_ne!(at_one, got.into_data().try_into_vec::<f32>().unwrap(), "temperature 2 changes the log-probs");
    }

    #[test]
    fn loss_types_average_the_token_terms_as_their_papers_do() {
        let device = Device::flex();
        let batch = two_row_batch(&device);
        let zeros = || Tensor::<2>::zeros([2, 3], &device);
        let run = |loss_type, kept: &[bool]| loss_of(&policy_gradient_loss(zeros(), zeros(), None, &batch, &[1.0, 2.0], kept, options(loss_type)));
        // Ratio 1 everywhere: every reply token contributes its row's advantage.
        assert_eq!(run(LossType::Grpo, &[true, true]), -1.5); // (1/1 + 6/3) / 2
        assert_eq!(run(LossType::DrGrpo, &[true, true]), -0.875); // (1 + 6) / (4 · 2)
        assert_eq!(run(LossType::Dapo, &[true, true]), -1.75); // (1 + 6) / 4 tokens
        // mask_truncated: row 1 dropped.
        assert_eq!(run(LossType::Grpo, &[true, false]), -1.0);
        assert_eq!(run(LossType::Dapo, &[true, false]), -1.0);
    }

    #[test]
    fn padded_positions_cannot_overflow_the_ratio_and_clipping_is_asymmetric() {
        let device = Device::flex();
        let batch = two_row_batch(&device);
        // A log-ratio of 200 at row 0's padded positions would make exp overflow to inf (and
        // inf · 0 = NaN) if the mask came after exp.
        let logp = Tensor::<2>::from_data(TensorData::new(vec![1.5f32.ln(), 200.0, 200.0, 1.5f32.ln(), 1.5f32.ln(), 1.5f32.ln()], [2, 3]), &device);
        let old = Tensor::<2>::zeros([2, 3], &device);
        let mut o = options(LossType::Dapo);
        o.clip_high = 0.28;
        let pg = policy_gradient_loss(logp.clone(), old.clone(), Some(old.clone()), &batch, &[1.0, 1.0], &[true, true], o);
        let loss = loss_of(&pg);
        assert!(loss.is_finite(), "{loss}");
        // Ratio 1.5 > 1 + ε_high: the surrogate uses 1.28 for every counted token.
        assert!((pg.quality.into_scalar::<f32>() + 1.28).abs() < 1e-6);
        assert_eq!(pg.clip_fraction, 1.0);
        // With the symmetric range the clip is at 1.2.
        let pg = policy_gradient_loss(logp, old.clone(), None, &batch, &[1.0, 1.0], &[true, true], options(LossType::Dapo));
        assert!((loss_of(&pg) + 1.2).abs() < 1e-6);
    }

    #[test]
    fn reply_batch_masks_reply_tokens_and_the_end_token() {
        let device = Device::flex();
        let (prompt, reply) = ([5u32, 6, 7], [8u32, 9]);
        let rows: Vec<(&[u32], &[u32], bool)> = vec![(&prompt, &reply, true), (&prompt[..1], &reply[..1], false)];
        let batch = ReplyBatch::new(&rows, 2, 16, &device);
        // Row 0: 5 6 7 8 9 <eos>: targets 6 7 8 9 2, the last three are the reply.
        assert_eq!(batch.reply_tokens, vec![3, 1]);
        let mask: Vec<f32> = batch.tensors.loss_mask.into_data().try_into_vec().unwrap();
        assert_eq!(mask, vec![0., 0., 1., 1., 1., 1., 0., 0., 0., 0.]);
        let targets: Vec<i64> = batch.tensors.targets.into_data().convert::<i64>().try_into_vec().unwrap();
        assert_eq!(targets, vec![6, 7, 8, 9, 2, 8, 0, 0, 0, 0]);
    }

    #[test]
    fn reward_scaling_divides_by_the_group_the_batch_or_nothing() {
        use crate::config::ScaleRewards;
        // Two prompts: one with a wide reward spread, one narrow.
        let groups = vec![vec![0.0, 4.0], vec![1.0, 1.5]];
        assert_eq!(super::scaled_advantages(&groups, ScaleRewards::None), vec![-2.0, 2.0, -0.25, 0.25]);
        assert_eq!(super::scaled_advantages(&groups, ScaleRewards::Group), vec![-1.0, 1.0, -1.0, 1.0]);
        // Batch: mean 1.625, std of all four rewards.
        let all = [0.0f64, 4.0, 1.0, 1.5];
        let std = (all.iter().map(|r| (r - 1.625).powi(2)).sum::<f64>() / 4.0).sqrt();
        let batch = super::scaled_advantages(&groups, ScaleRewards::Batch);
        for (got, want) in batch.iter().zip([-2.0 / std, 2.0 / std, -0.25 / std, 0.25 / std]) {
            assert!((got - want).abs() < 1e-12, "{batch:?}");
        }
        // All rewards equal: no division by zero.
        assert_eq!(super::scaled_advantages(&[vec![1.0, 1.0]], ScaleRewards::Batch), vec![0.0, 0.0]);
    }
}
