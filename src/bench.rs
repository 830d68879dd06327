//! Benchmarks behind `polyburn bench`: each measures every side it reports in the same run.

use std::fmt;

use anyhow::{Context, Result};
use burn::tensor::{Device, Distribution, Tensor};
use serde::Serialize;

use crate::config::Config;
use crate::data::{SampleSource, TokenCorpus};
use crate::device::device_from_name;
use crate::rng::{SplitMix64, Stream, derive_seed};
use crate::timing::{median, time_infallible, time_runs};
use crate::train::trainer::{Learner, init_model};

pub struct TrainBenchOptions {
    pub timed_steps: usize,
    /// Also time the same steps with `training.gradient_checkpointing` on (the other side off).
    pub compare_gradient_checkpointing: bool,
    /// Also time steps on the config's JSONL `data.train`, one record per row and packed
    /// (`data.pack`).
    pub compare_packing: bool,
}

/// `bench train --pack`: the same model trained on the config's JSONL corpus, one record per
/// row (padded to the batch's longest) and packed. Tokens count real tokens, not padding.
#[derive(Debug, Clone, Serialize)]
pub struct PackingComparison {
    pub corpus: String,
    pub records: usize,
    pub unpacked_tokens_per_sec: f64,
    pub unpacked_step_ms: f64,
    /// Share of the batch positions that hold a token, over the timed steps.
    pub unpacked_fill: f64,
    pub packed_tokens_per_sec: f64,
    pub packed_step_ms: f64,
    pub packed_fill: f64,
    /// Packed tokens/s ÷ unpacked tokens/s.
    pub speedup: f64,
}

/// The same benchmark steps with per-block recomputation (`bench train --gradient-checkpointing`).
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointingComparison {
    pub tokens_per_sec: f64,
    pub step_ms: f64,
    pub peak_bytes: Option<usize>,
    /// Its step time ÷ the step time without recomputation.
    pub time_ratio: f64,
}

/// `polyburn bench train` results (`--json` prints this object).
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchReport {
    pub device: String,
    pub tokens_per_sec: f64,
    pub step_ms: f64,
    /// Backend matmul throughput on a large square f32 matmul (median of 5 after warm-up).
    pub matmul_gflops: f64,
    /// Model-FLOPs utilisation: 6 × matmul params × tokens/s ÷ measured matmul FLOP/s.
    pub mfu: f64,
    /// The step's own linear-layer matmuls (forward and both backward products) alone.
    pub model_shape_matmul_gflops: f64,
    /// `mfu` relative to `model_shape_matmul_gflops`: the share of the attainable matmul rate.
    pub mfu_vs_model_shapes: f64,
    pub matmul_params: usize,
    pub tokens_per_step: usize,
    pub matmul_size: usize,
    /// `reference` or `fused` (`kernels.attention`).
    pub attention: String,
    /// `reference` or `fused` (`kernels.cross_entropy`).
    pub cross_entropy: String,
    pub context_length: usize,
    /// Peak live heap bytes during the timed steps above the level before them (the
    /// `polyburn` binary's counting allocator; absent in library use).
    pub peak_bytes: Option<usize>,
    /// `training.gradient_checkpointing` of the steps above.
    pub gradient_checkpointing: bool,
    pub with_gradient_checkpointing: Option<CheckpointingComparison>,
    pub packing: Option<PackingComparison>,
}

impl fmt::Display for TrainBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "polyburn bench train ({}, {} attention, {} cross-entropy, context {})",
            self.device, self.attention, self.cross_entropy, self.context_length
        )?;
        writeln!(f, "  tokens/s          {:>12.1}", self.tokens_per_sec)?;
        writeln!(f, "  step              {:>12.1} ms ({} tokens)", self.step_ms, self.tokens_per_step)?;
        writeln!(f, "  matmul params     {:>12}", self.matmul_params)?;
        writeln!(f, "  matmul GFLOP/s    {:>12.1} ({n}x{n} f32)", self.matmul_gflops, n = self.matmul_size)?;
        writeln!(f, "  model-shape GFLOP/s {:>10.1} (the step's linear-layer matmuls alone)", self.model_shape_matmul_gflops)?;
        if let Some(p) = self.peak_bytes {
            writeln!(f, "  peak memory       {:>12.1} MiB (above the model and optimizer)", p as f64 / (1 << 20) as f64)?;
        }
        writeln!(f, "  MFU               {:>12.1} %", self.mfu * 100.0)?;
        write!(f, "  MFU vs model shapes {:>9.1} %", self.mfu_vs_model_shapes * 100.0)?;
        if let Some(c) = &self.with_gradient_checkpointing {
            let mib = |p: Option<usize>| p.map_or("-".to_string(), |p| format!("{:.1} MiB", p as f64 / (1 << 20) as f64));
            write!(
                f,
                "\n  with gradient checkpointing: {:.1} tokens/s, {:.1} ms/step ({:.2}x the time), peak {} (vs {})",
                c.tokens_per_sec,
                c.step_ms,
                c.time_ratio,
                mib(c.peak_bytes),
                mib(self.peak_bytes)
            )?;
        }
        if let Some(p) = &self.packing {
            write!(
                f,
                "\n  on {} ({} records), tokens excluding padding:\
                 \n    one record per row {:>10.1} tokens/s, {:.1} ms/step, {:.1}% of positions filled\
                 \n    packed (data.pack) {:>10.1} tokens/s, {:.1} ms/step, {:.1}% of positions filled ({:.2}x)",
                p.corpus,
                p.records,
                p.unpacked_tokens_per_sec,
                p.unpacked_step_ms,
                100.0 * p.unpacked_fill,
                p.packed_tokens_per_sec,
                p.packed_step_ms,
                100.0 * p.packed_fill,
                p.speedup
            )?;
        }
        Ok(())
    }
}

/// Median throughput of an `n × n` f32 matmul on `device`, in GFLOP/s.
pub fn matmul_gflops(device: &Device, n: usize, repeats: usize) -> f64 {
    let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let timed = time_infallible(2, repeats, |_| drop(a.clone().matmul(b.clone()).into_data()));
    2.0 * (n as f64).powi(3) / (timed.median_ms() / 1e3) / 1e9
}

/// Throughput of the matmuls one training step of `gpt` runs for its linear layers, at their
/// real shapes: per layer `X·W` (forward), `dY·Wᵀ` and `Xᵀ·dY` (backward), with `m` tokens.
/// This is the ceiling MFU could reach if everything but these matmuls took no time.
pub fn model_shape_matmul_gflops(gpt: &crate::model::GptConfig, m: usize, device: &Device) -> f64 {
    let (d, ff) = (gpt.d_model, gpt.d_ff);
    let per_layer = [(d, 3 * d), (d, d), (d, ff), (ff, d)];
    let mut shapes: Vec<(usize, usize)> = (0..gpt.n_layers).flat_map(|_| per_layer).collect();
    shapes.push((d, gpt.vocab_size));
    let normal = Distribution::Normal(0.0, 1.0);
    let (mut flops, mut secs) = (0.0, 0.0);
    for (k, n) in shapes {
        let x = Tensor::<2>::random([m, k], normal, device);
        let w = Tensor::<2>::random([k, n], normal, device);
        let dy = Tensor::<2>::random([m, n], normal, device);
        let timed = time_infallible(0, 2, |_| {
            let _ = x.clone().matmul(w.clone()).into_data();
            let _ = dy.clone().matmul(w.clone().transpose()).into_data();
            let _ = x.clone().transpose().matmul(dy.clone()).into_data();
        });
        secs += timed.ms.iter().sum::<f64>() / 1e3;
        flops += timed.ms.len() as f64 * 3.0 * 2.0 * (m * k * n) as f64;
    }
    flops / secs / 1e9
}

/// The timed steps of one learner: tokens per step, median step seconds, peak heap bytes.
struct TimedSteps {
    tokens_per_step: usize,
    step_secs: f64,
    peak_bytes: Option<usize>,
}

const WARMUP_STEPS: usize = 2;

/// Times `timed_steps` optimizer steps (after warm-up) of a fresh model of `config` on
/// `source` (`None`: random tokens).
fn time_train_steps(config: &Config, gpt: &crate::model::GptConfig, timed_steps: usize, source: Option<&mut SampleSource>) -> Result<TimedSteps> {
    let vocab = gpt.vocab_size;
    let train_device = device_from_name(&config.run.device)?.autodiff();
    let model = init_model(gpt, config.run.seed, &train_device);
    let mut learner = Learner::new(config.clone(), train_device, model, None)?;
    let steps = WARMUP_STEPS + timed_steps;
    let mut random;
    let source = match source {
        Some(source) => source,
        None => {
            let n_tokens = steps * learner.samples_per_step() as usize * (gpt.context_length + 1) + gpt.context_length + 1;
            let mut rng = SplitMix64::new(derive_seed(config.run.seed, Stream::Shuffle, u64::MAX));
            let tokens: Vec<u32> = (0..n_tokens).map(|_| rng.below(vocab as u64) as u32).collect();
            random = SampleSource::new(TokenCorpus::Stream(tokens), gpt.context_length, config.run.seed, false)?;
            &mut random
        }
    };
    let timed = time_runs(WARMUP_STEPS, timed_steps, |step| {
        let (stats, peak) = crate::memory::measure_peak(|| learner.step(source, step as u64));
        stats.map(|s| (s.tokens, peak))
    })?;
    Ok(TimedSteps {
        // The mean over the timed steps: with real data each step holds other records.
        tokens_per_step: timed.results.iter().map(|r| r.0).sum::<usize>() / timed.results.len().max(1),
        peak_bytes: timed.results.iter().map(|r| r.1).max().flatten(),
        step_secs: timed.median_ms() / 1e3,
    })
}

/// Share of the batch positions holding a token over the timed steps' batches of `source`.
fn fill(source: &mut SampleSource, config: &Config, timed_steps: usize) -> f64 {
    let t = &config.training;
    let per_step = (t.batch_size * t.grad_accum_steps) as u64;
    let (mut filled, mut positions) = (0, 0);
    for step in WARMUP_STEPS..WARMUP_STEPS + timed_steps {
        for micro in 0..t.grad_accum_steps {
            let batch = source.batch(step as u64 * per_step + (micro * t.batch_size) as u64, t.batch_size);
            filled += batch.filled;
            positions += batch.batch_size * batch.seq_len;
        }
    }
    filled as f64 / positions.max(1) as f64
}

/// `bench train --pack`: the config's JSONL corpus, one record per row and packed.
fn compare_packing(config: &Config, gpt: &crate::model::GptConfig, timed_steps: usize) -> Result<PackingComparison> {
    let corpus = config.data.train.clone().context("data.train: `bench train --pack` trains on a JSONL corpus")?;
    let scratch = std::env::temp_dir().join(format!("polyburn-bench-pack-{}", std::process::id()));
    let mut one_per_row = config.clone();
    one_per_row.data.pack = false;
    let prepared = crate::data::prepare(&one_per_row, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let prepared = prepared?;
    if prepared.tokenizer.vocab_size() > gpt.vocab_size {
        anyhow::bail!("model.vocab_size: {} is smaller than the tokenizer's {}", gpt.vocab_size, prepared.tokenizer.vocab_size());
    }
    let mut unpacked = prepared.train;
    let records = unpacked.examples().len();
    if records == 0 {
        anyhow::bail!("data.train: `bench train --pack` needs a JSONL corpus, {} is plain text", corpus.display());
    }
    let mut packed = unpacked.clone().with_packing()?;
    let a = time_train_steps(config, gpt, timed_steps, Some(&mut unpacked))?;
    let b = time_train_steps(config, gpt, timed_steps, Some(&mut packed))?;
    let (unpacked_tokens_per_sec, packed_tokens_per_sec) = (a.tokens_per_step as f64 / a.step_secs, b.tokens_per_step as f64 / b.step_secs);
    Ok(PackingComparison {
        corpus: corpus.display().to_string(),
        records,
        unpacked_tokens_per_sec,
        unpacked_step_ms: a.step_secs * 1e3,
        unpacked_fill: fill(&mut unpacked, config, timed_steps),
        packed_tokens_per_sec,
        packed_step_ms: b.step_secs * 1e3,
        packed_fill: fill(&mut packed, config, timed_steps),
        speedup: packed_tokens_per_sec / unpacked_tokens_per_sec,
    })
}

/// Times whole optimizer steps of `config`'s model on random tokens, then the backend's
/// matmul throughput, and relates the two.
pub fn bench_train(config: &Config, options: &TrainBenchOptions) -> Result<TrainBenchReport> {
    let vocab = config.model.vocab_size.unwrap_or(8192);
    let gpt = crate::model::GptConfig::from_model_config(&config.model, vocab, config.training.max_steps as u64);
    let device = device_from_name(&config.run.device)?;
    let matmul_params = init_model(&gpt, config.run.seed, &device).matmul_params();
    let timed_steps = options.timed_steps.max(1);
    let mut plain = config.clone();
    if options.compare_gradient_checkpointing {
        plain.training.gradient_checkpointing = false;
    }
    // First, so a corpus that cannot be packed fails before minutes of timing.
    let packing = match options.compare_packing {
        true => Some(compare_packing(&plain, &gpt, timed_steps)?),
        false => None,
    };
    let main = time_train_steps(&plain, &gpt, timed_steps, None)?;
    let with_gradient_checkpointing = match options.compare_gradient_checkpointing {
        false => None,
        true => {
            let mut recomputing = config.clone();
            recomputing.training.gradient_checkpointing = true;
            let c = time_train_steps(&recomputing, &gpt, timed_steps, None)?;
            Some(CheckpointingComparison {
                tokens_per_sec: c.tokens_per_step as f64 / c.step_secs,
                step_ms: c.step_secs * 1e3,
                peak_bytes: c.peak_bytes,
                time_ratio: c.step_secs / main.step_secs,
            })
        }
    };
    let TimedSteps { tokens_per_step, step_secs, peak_bytes } = main;
    let tokens_per_sec = tokens_per_step as f64 / step_secs;
    let matmul_size = 2048;
    let gflops = matmul_gflops(&device, matmul_size, 5);
    let model_shapes = model_shape_matmul_gflops(&gpt, tokens_per_step, &device);
    let achieved = 6.0 * matmul_params as f64 * tokens_per_sec / 1e9;
    Ok(TrainBenchReport {
        model_shape_matmul_gflops: model_shapes,
        mfu_vs_model_shapes: achieved / model_shapes,
        device: config.run.device.clone(),
        tokens_per_sec,
        step_ms: step_secs * 1e3,
        matmul_gflops: gflops,
        mfu: achieved / gflops,
        matmul_params,
        tokens_per_step,
        matmul_size,
        attention: serde_yaml::to_string(&config.kernels.attention)?.trim().to_string(),
        cross_entropy: serde_yaml::to_string(&config.kernels.cross_entropy)?.trim().to_string(),
        context_length: gpt.context_length,
        peak_bytes,
        gradient_checkpointing: plain.training.gradient_checkpointing,
        with_gradient_checkpointing,
        packing,
    })
}

/// `polyburn bench generate` results: the same batch decoded with the KV cache and by full
/// recomputation, in one run.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBenchReport {
    pub device: String,
    pub prompts: usize,
    pub replies_per_prompt: usize,
    pub new_tokens: usize,
    pub kv_cache_tokens_per_sec: f64,
    pub recompute_tokens_per_sec: f64,
    pub speedup: f64,
    /// Both decodings produced the same greedy tokens.
    pub outputs_match: bool,
}

impl fmt::Display for GenerateBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "polyburn bench generate ({}): {} prompts × {} replies × {} new tokens",
            self.device, self.prompts, self.replies_per_prompt, self.new_tokens
        )?;
        writeln!(f, "  KV cache    {:>10.1} tokens/s", self.kv_cache_tokens_per_sec)?;
        writeln!(f, "  recompute   {:>10.1} tokens/s", self.recompute_tokens_per_sec)?;
        write!(f, "  speedup     {:>10.2}x (same greedy tokens: {})", self.speedup, self.outputs_match)
    }
}

/// Decodes `prompts × replies` sequences of `new_tokens` greedy tokens from a randomly
/// initialised model of `config`'s shape, once with the KV cache and once recomputing.
/// Prompts have different lengths (8 to 8 + 4·prompts tokens).
pub fn bench_generate(config: &Config, prompts: usize, replies: usize, new_tokens: usize) -> Result<GenerateBenchReport> {
    use crate::model::generate::{Decoding, SamplingOptions, generate_batch};
    let vocab = config.model.vocab_size.unwrap_or(8192);
    let gpt = crate::model::GptConfig::from_model_config(&config.model, vocab, 1);
    let device = device_from_name(&config.run.device)?;
    let model = init_model(&gpt, config.run.seed, &device);
    let mut rng = SplitMix64::new(derive_seed(config.run.seed, Stream::Sampling, u64::MAX));
    let batch: Vec<Vec<u32>> =
        (0..prompts).map(|i| (0..8 + 4 * i).map(|_| rng.below(vocab as u64) as u32).collect()).collect();
    // Greedy, no stop token: every sequence decodes exactly `new_tokens`, so both sides do
    // the same work and must agree token for token.
    let options = SamplingOptions { temperature: 0.0, max_new_tokens: new_tokens, stop_token: None, ..Default::default() };
    let context = crate::model::ForwardContext::default();
    let run = |warmup, decoding| -> Result<(f64, Vec<Vec<Vec<u32>>>)> {
        let mut timed = time_runs(warmup, 1, |_| generate_batch(&model, &batch, replies, &options, &context, decoding, &device))?;
        Ok((timed.median_ms() / 1e3, timed.results.pop().expect("one timed run")))
    };
    let (cached_secs, cached) = run(1, Decoding::KvCache)?;
    let (recompute_secs, recomputed) = run(0, Decoding::Recompute)?;
    let tokens = (prompts * replies * new_tokens) as f64;
    Ok(GenerateBenchReport {
        device: config.run.device.clone(),
        prompts,
        replies_per_prompt: replies,
        new_tokens,
        kv_cache_tokens_per_sec: tokens / cached_secs,
        recompute_tokens_per_sec: tokens / recompute_secs,
        speedup: recompute_secs / cached_secs,
        outputs_match: cached == recomputed,
    })
}

/// `polyburn bench polychromic` results: median milliseconds of each part of a sampling step.
#[derive(Debug, Clone, Serialize)]
pub struct PolychromicBenchReport {
    pub objective: String,
    pub steps: usize,
    pub step_ms: f64,
    /// Median ms per part: generate, encode, diversity, forward, backward.
    pub parts_ms: std::collections::BTreeMap<String, f64>,
    /// Share of the step spent generating.
    pub generate_share: f64,
}

impl fmt::Display for PolychromicBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "polyburn bench polychromic ({}, median of {} steps)", self.objective, self.steps)?;
        for part in ["generate", "encode", "diversity", "forward", "backward"] {
            if let Some(ms) = self.parts_ms.get(part) {
                writeln!(f, "  {part:<10} {ms:>9.1} ms  ({:>4.1} %)", 100.0 * ms / self.step_ms)?;
            }
        }
        write!(f, "  step       {:>9.1} ms  (generation {:.1} % of the step)", self.step_ms, 100.0 * self.generate_share)
    }
}

/// Times optimizer steps of `config`'s sampling objective (from its first sampling step, on its
/// own data, from a fresh model) and splits them into their parts.
pub fn bench_polychromic(config: &Config, timed_steps: usize) -> Result<PolychromicBenchReport> {
    const WARMUP_STEPS: usize = 1;
    if !config.objective.kind.samples() {
        anyhow::bail!("objective.type: `bench polychromic` needs a sampling objective (polychromic_rl, polychromic_regularized or grpo)");
    }
    let dir = tempfile::tempdir()?;
    let data = crate::data::prepare(config, dir.path())?;
    let train_device = device_from_name(&config.run.device)?.autodiff();
    let (_, model) = crate::train::trainer::build_model(config, data.tokenizer.vocab_size(), &train_device)?;
    let mut learner = Learner::new(config.clone(), train_device, model, Some(&data.tokenizer))?;
    let mut source = data.train;
    let first_step = config.objective.sft_steps as u64;
    let timed = time_runs(WARMUP_STEPS, timed_steps.max(1), |i| learner.step(&mut source, first_step + i as u64))?;
    let mut parts: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for (name, value) in timed.results.into_iter().flat_map(|stats| stats.metrics) {
        if let Some(part) = name.strip_prefix("perf/").and_then(|n| n.strip_suffix("_ms")) {
            parts.entry(part.to_string()).or_default().push(value);
        }
    }
    drop(dir);
    let step_ms = median(&timed.ms);
    let steps = timed.ms;
    let parts_ms: std::collections::BTreeMap<String, f64> = parts.into_iter().map(|(k, v)| (k, median(&v))).collect();
    Ok(PolychromicBenchReport {
        objective: serde_yaml::to_string(&config.objective.kind)?.trim().to_string(),
        steps: steps.len(),
        step_ms,
        generate_share: parts_ms.get("generate").copied().unwrap_or(0.0) / step_ms,
        parts_ms,
    })
}
