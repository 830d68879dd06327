//! Benchmarks behind `polyburn bench`: each measures every side it reports in the same run.

use std::fmt;
use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Device, Distribution, Tensor};
use serde::Serialize;

use crate::config::Config;
use crate::data::{SampleSource, TokenCorpus};
use crate::device::device_from_name;
use crate::rng::{SplitMix64, Stream, derive_seed};
use crate::train::optim::build_optimizer;
use crate::train::trainer::{Learner, init_model};

pub struct TrainBenchOptions {
    pub timed_steps: usize,
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
}

impl fmt::Display for TrainBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "polyburn bench train ({})", self.device)?;
        writeln!(f, "  tokens/s          {:>12.1}", self.tokens_per_sec)?;
        writeln!(f, "  step              {:>12.1} ms ({} tokens)", self.step_ms, self.tokens_per_step)?;
        writeln!(f, "  matmul params     {:>12}", self.matmul_params)?;
        writeln!(f, "  matmul GFLOP/s    {:>12.1} ({n}x{n} f32)", self.matmul_gflops, n = self.matmul_size)?;
        writeln!(f, "  model-shape GFLOP/s {:>10.1} (the step's linear-layer matmuls alone)", self.model_shape_matmul_gflops)?;
        writeln!(f, "  MFU               {:>12.1} %", self.mfu * 100.0)?;
        write!(f, "  MFU vs model shapes {:>9.1} %", self.mfu_vs_model_shapes * 100.0)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median throughput of an `n × n` f32 matmul on `device`, in GFLOP/s.
pub fn matmul_gflops(device: &Device, n: usize, repeats: usize) -> f64 {
    let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let mut times = Vec::new();
    for i in 0..repeats + 2 {
        let start = Instant::now();
        let c = a.clone().matmul(b.clone());
        let _ = c.into_data();
        if i >= 2 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    2.0 * (n as f64).powi(3) / median(times) / 1e9
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
        for _ in 0..2 {
            let start = Instant::now();
            let _ = x.clone().matmul(w.clone()).into_data();
            let _ = dy.clone().matmul(w.clone().transpose()).into_data();
            let _ = x.clone().transpose().matmul(dy.clone()).into_data();
            secs += start.elapsed().as_secs_f64();
            flops += 3.0 * 2.0 * (m * k * n) as f64;
        }
    }
    flops / secs / 1e9
}

/// Times whole optimizer steps of `config`'s model on random tokens, then the backend's
/// matmul throughput, and relates the two.
pub fn bench_train(config: &Config, options: &TrainBenchOptions) -> Result<TrainBenchReport> {
    const WARMUP_STEPS: usize = 2;
    let vocab = config.model.vocab_size.unwrap_or(8192);
    let gpt = crate::model::GptConfig::from_model_config(&config.model, vocab, config.training.max_steps as u64);
    let device = device_from_name(&config.run.device)?;
    let train_device = device.clone().autodiff();
    let model = init_model(&gpt, config.run.seed, &train_device);
    let optimizer = build_optimizer(&config.optimizer, &model);
    let matmul_params = model.matmul_params();
    let mut learner = Learner { config: config.clone(), device: train_device, model, optimizer };

    let steps = WARMUP_STEPS + options.timed_steps.max(1);
    let n_tokens = steps * learner.samples_per_step() as usize * (gpt.context_length + 1) + gpt.context_length + 1;
    let mut rng = SplitMix64::new(derive_seed(config.run.seed, Stream::Shuffle, u64::MAX));
    let tokens: Vec<u32> = (0..n_tokens).map(|_| rng.below(vocab as u64) as u32).collect();
    let mut source = SampleSource::new(TokenCorpus::Stream(tokens), gpt.context_length, config.run.seed, false)?;

    let mut times = Vec::new();
    let mut tokens_per_step = 0;
    for step in 0..steps {
        let start = Instant::now();
        let stats = learner.step(&mut source, step as u64)?;
        if step >= WARMUP_STEPS {
            times.push(start.elapsed().as_secs_f64());
            tokens_per_step = stats.tokens;
        }
    }
    let step_secs = median(times);
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
    })
}
