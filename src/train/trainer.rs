//! The training loop. One owner for the global step: the LR, the data position and the
//! per-step RNG are all read from it, so a resumed run is the same run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use serde_json::json;

use super::objective::sampling::ReplySample;
use super::objective::rollout::{ROLLOUTS_FILE, Rollouts};
use super::checkpoint::{self, CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, REFERENCE_MODEL_FILE, STATE_FILE, TrainerState};
use super::heldout::{HeldOutOptions, evaluate_held_out};
use super::logging::RunLogger;
use super::objective::{BatchTensors, PolicyTools, StepInput, objective_at, sft_loss};
use super::optim::{GradientSum, ParamOptimizer, learning_rate};
use crate::config::Config;
use crate::data::{self, PreparedData, SampleSource};
use crate::device::device_from_name;
use crate::model::{ForwardContext, Gpt, GptConfig};
use crate::rng::{Stream, derive_seed};

/// How a call to [`train`] ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    pub global_step: u64,
    pub final_train_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    /// Stopped early (Ctrl-C or `stop_at_step`) with a checkpoint to resume from.
    pub interrupted: bool,
    /// Why early stopping ended the run (`training.early_stopping_patience`).
    pub early_stopped: Option<String>,
}

/// Options of one invocation that are not part of the run's config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the latest checkpoint in the run directory if there is one.
    pub resume: bool,
    /// Stop (with a checkpoint) once the global step reaches this, as if interrupted.
    pub stop_at_step: Option<u64>,
    /// No progress output (tests, sweeps).
    pub quiet: bool,
}

/// Model sizes for a config once the tokenizer is known.
pub fn model_config(config: &Config, tokenizer_vocab: usize) -> Result<GptConfig> {
    let vocab = match config.model.vocab_size {
        Some(v) if v < tokenizer_vocab => {
            bail!("model.vocab_size: {v} is smaller than the tokenizer's vocabulary ({tokenizer_vocab})")
        }
        Some(v) => v,
        None => tokenizer_vocab,
    };
    Ok(GptConfig::from_model_config(&config.model, vocab, config.training.max_steps as u64))
}

/// The model a run starts from: the `model.pretrained` checkpoint, or a fresh one sized by
/// the config and initialised from the run seed.
pub fn build_model(config: &Config, tokenizer_vocab: usize, device: &Device) -> Result<(GptConfig, Gpt)> {
    let (gpt, model) = build_base_model(config, tokenizer_vocab, device)?;
    let Some(lora) = &config.lora else { return Ok((gpt, model)) };
    // Adapters are drawn from their own seed so the base initialisation is unaffected.
    device.seed(derive_seed(config.run.seed, Stream::Init, 1));
    let model = model.with_lora(lora, device);
    crate::model::initialize_parameters(&model);
    Ok((gpt, model))
}

/// What a run's weight files hold: LoRA runs store only their adapters.
pub fn saved_weights(config: &Config) -> crate::weights::Saved {
    if config.lora.is_some() { crate::weights::Saved::AdaptersOnly } else { crate::weights::Saved::All }
}

fn build_base_model(config: &Config, tokenizer_vocab: usize, device: &Device) -> Result<(GptConfig, Gpt)> {
    let Some(id) = &config.model.pretrained else {
        let gpt = model_config(config, tokenizer_vocab)?;
        let model = init_model(&gpt, config.run.seed, device);
        return Ok((gpt, model));
    };
    let p = crate::model::hf::load_pretrained(id, device).context("model.pretrained")?;
    if config.model.context_length > p.config.context_length {
        bail!(
            "model.context_length: {} exceeds the pretrained model's {} positions",
            config.model.context_length,
            p.config.context_length
        );
    }
    if tokenizer_vocab > p.config.vocab_size {
        bail!("data.tokenizer: {tokenizer_vocab} tokens do not fit the pretrained model's {} embeddings", p.config.vocab_size);
    }
    let mut gpt = p.config;
    gpt.dropout = config.model.dropout;
    gpt.total_steps = config.training.max_steps as u64;
    Ok((gpt, p.model))
}

/// A fresh model for `config`, initialised from the run seed on `device`.
pub fn init_model(gpt: &GptConfig, seed: u64, device: &Device) -> Gpt {
    device.seed(derive_seed(seed, Stream::Init, 0));
    let model = gpt.init(device);
    crate::model::initialize_parameters(&model);
    model
}

/// What one optimizer step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// Input tokens processed (padding included).
    pub tokens: usize,
    /// Objective-specific measurements (`train/reward_mean`, `perf/generate_ms`, ...).
    pub metrics: Vec<(&'static str, f64)>,
    /// A few sampled replies with their rewards (sampling objectives).
    pub samples: Vec<ReplySample>,
}

/// The model and its optimizer: one optimizer step at a time. Shared by the training loop
/// and the benchmarks so both measure the same code.
pub struct Learner {
    pub config: Config,
    pub device: Device,
    pub model: Gpt,
    pub optimizer: ParamOptimizer,
    /// Rewards, tokenizer, encoder and reference policy of sampling objectives.
    pub policy: Option<PolicyTools>,
}

impl Learner {
    /// The learner for `model`: AdamW over its parameters (fresh state) and, for a sampling
    /// objective, its policy tools (which decode with `tokenizer`).
    pub fn new(config: Config, device: Device, model: Gpt, tokenizer: Option<&crate::data::TextTokenizer>) -> Result<Self> {
        let optimizer = ParamOptimizer::new(&config.optimizer, config.kernels.adamw, &model);
        let policy = match (config.objective.kind.samples(), tokenizer) {
            (false, _) => None,
            (true, Some(tokenizer)) => Some(PolicyTools::new(&config, tokenizer.clone())?),
            (true, None) => bail!("objective.type: a sampling objective needs the run's tokenizer"),
        };
        Ok(Self { config, device, model, optimizer, policy })
    }

    /// Samples one step's batch draws from the data.
    pub fn samples_per_step(&self) -> u64 {
        (self.config.training.batch_size * self.config.training.grad_accum_steps) as u64
    }

    /// Samples drawn by the first `steps` optimizer steps (the data position after them). A
    /// sampling objective's μ updates on one sample batch draw it once.
    pub fn samples_seen(&self, steps: u64) -> u64 {
        self.config.objective.batches_before(steps) * self.samples_per_step()
    }

    /// Optimizer step number `step` (0-based) over `grad_accum_steps` micro-batches of `source`.
    pub fn step(&mut self, source: &mut SampleSource, step: u64) -> Result<StepStats> {
        let t = &self.config.training;
        // Dropout masks come from the backend RNG: reseed it from the step so a resumed run
        // draws the same masks.
        self.device.seed(derive_seed(self.config.run.seed, Stream::StepNoise, step));
        let first_sample = self.samples_seen(self.config.objective.batch_step(step));
        let mut sum = GradientSum::default();
        let mut loss_total = 0.0;
        let mut tokens = 0;
        let mut metrics = Vec::new();
        let mut samples = Vec::new();
        let objective = objective_at(&self.config, step);
        let sampling = objective.samples();
        for micro in 0..t.grad_accum_steps {
            let first = first_sample + (micro * t.batch_size) as u64;
            let input = StepInput {
                config: &self.config,
                model: &self.model,
                source,
                tools: self.policy.as_mut(),
                first,
                step,
                device: &self.device,
            };
            let out = objective.loss(input)?;
            metrics.extend(out.metrics);
            samples.extend(out.samples);
            tokens += out.tokens;
            let loss = out.loss;
            let value = loss.clone().into_scalar::<f32>() as f64;
            if !value.is_finite() {
                bail!("non-finite loss ({value}) at step {}", step + 1);
            }
            loss_total += value;
            let started = Instant::now();
            let grads = match out.grads {
                Some(grads) => grads,
                None => GradientsParams::from_grads(loss.backward(), &self.model),
            };
            if sampling {
                metrics.push(("perf/backward_ms", started.elapsed().as_secs_f64() * 1e3));
            }
            sum.add(&self.model, grads);
        }
        let grads = sum.finish(&self.model, self.config.optimizer.max_grad_norm);
        if !grads.grad_norm.is_finite() {
            bail!("non-finite gradient norm ({}) at step {}", grads.grad_norm, step + 1);
        }
        let learning_rate = learning_rate(&self.config.optimizer, step, t.max_steps as u64);
        let grad_norm = grads.grad_norm;
        self.model = self.optimizer.step(learning_rate, self.model.clone(), grads);
        Ok(StepStats {
            loss: loss_total / t.grad_accum_steps as f64,
            grad_norm,
            learning_rate,
            tokens,
            metrics,
            samples,
        })
    }
}

struct Loop {
    /// Held for the whole run (see [`lock_run`]).
    _lock: std::fs::File,
    learner: Learner,
    run_dir: PathBuf,
    data: PreparedData,
    state: TrainerState,
    logger: Option<RunLogger>,
}

/// File in a run directory that the process training it holds an exclusive lock on.
pub const LOCK_FILE: &str = "train.lock";

/// Exit status of `polyburn train` when another process holds the run's lock (EX_TEMPFAIL):
/// sweeps sharing a directory treat it as "taken elsewhere", not as a failure.
pub const RUN_LOCKED_EXIT: u8 = 75;

/// Why a run could not start: another process is training it.
#[derive(Debug)]
pub struct RunLocked(pub PathBuf);

impl std::fmt::Display for RunLocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: another polyburn process is training this run (it holds {}); wait for it to finish, or choose another run.output_dir",
            self.0.display(),
            self.0.join(LOCK_FILE).display()
        )
    }
}

impl std::error::Error for RunLocked {}

/// Takes the run directory's exclusive lock, so two processes never train one run into the
/// same files (two sweeps sharing a directory, say). The operating system releases it when
/// the process ends, however it ends, so a crashed run can be resumed at once.
pub fn lock_run(run_dir: &Path) -> Result<std::fs::File> {
    let path = run_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RunLocked(run_dir.to_path_buf()).into()),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::Error::new(e).context(format!("locking {}", path.display()))),
    }
}

/// Trains (or resumes) the run described by `config` in `config.output_dir()`.
pub fn train(mut config: Config, options: &TrainOptions) -> Result<TrainOutcome> {
    let run_dir = config.output_dir();
    let latest = checkpoint::latest_checkpoint(&run_dir)?;
    if latest.is_some() && !options.resume {
        bail!(
            "{} already holds checkpoints; continue it with `polyburn resume {}` (or `train --resume`), \
             or choose another run.output_dir",
            run_dir.display(),
            run_dir.display()
        );
    }
    let device = device_from_name(&config.run.device)?.autodiff();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let lock = lock_run(&run_dir)?;
    let data = data::prepare(&config, &run_dir)?;
    if config.objective.kind.samples() && data.train.examples().is_empty() {
        bail!(
            "objective.type: sampling objectives need prompt/reply JSONL data; {} is plain text",
            config.data.train.as_ref().map_or(String::new(), |p| p.display().to_string())
        );
    }
    let epochs_note = match config.training.epochs.take() {
        Some(epochs) => {
            let t = &config.training;
            let per_step = (t.batch_size * t.grad_accum_steps) as f64;
            let per_epoch = data.train.samples_per_epoch();
            let steps = ((epochs * per_epoch as f64) / per_step).ceil().max(1.0) as usize;
            config.training.max_steps = steps;
            config.validate()?;
            Some(format!("training.epochs {epochs}: {steps} steps of {per_step} samples ({per_epoch} samples per epoch)"))
        }
        None => None,
    };
    let (gpt, mut model) = build_model(&config, data.tokenizer.vocab_size(), &device)?;
    // The saved config is fully resolved: what the tokenizer, defaults (and a pretrained
    // model) decided is written out.
    config.model.vocab_size = Some(gpt.vocab_size);
    config.model.d_ff = Some(gpt.d_ff);
    config.model.d_model = gpt.d_model;
    config.model.n_layers = gpt.n_layers;
    config.model.n_heads = gpt.n_heads;
    config.run.output_dir = Some(run_dir.clone());

    let state = match &latest {
        Some(ckpt) => {
            model = crate::weights::load_weights(model, &ckpt.dir.join(MODEL_FILE), saved_weights(&config))?;
            ckpt.state()?
        }
        None => TrainerState {
            global_step: 0,
            data: data.train.cursor(0),
            seed: config.run.seed,
            learning_rate: 0.0,
            last_train_loss: None,
            last_eval_loss: None,
            best_eval_loss: None,
            best_eval_step: None,
            train_seconds: 0.0,
            evals_without_improvement: 0,
            best_checkpoint_value: None,
        },
    };
    if state.seed != config.run.seed {
        bail!("run.seed: the checkpoint was trained with seed {}, the config says {}", state.seed, config.run.seed);
    }
    crate::weights::write_file_atomic(&run_dir.join(CONFIG_FILE), config.to_yaml().as_bytes())?;

    let max_steps = config.training.max_steps as u64;
    let logger = Some(RunLogger::open(&run_dir, state.global_step, max_steps, options.quiet)?);
    let reference_device = device.clone().inner();
    let mut learner = Learner::new(config, device, model, Some(&data.tokenizer))?;
    if let Some(ckpt) = &latest {
        let path = ckpt.dir.join(OPTIMIZER_FILE);
        learner.optimizer = learner.optimizer.load(&path)?;
        let rollouts = ckpt.dir.join(ROLLOUTS_FILE);
        if let Some(tools) = learner.policy.as_mut().filter(|_| rollouts.exists()) {
            tools.rollouts = Rollouts::load(&rollouts)?;
        }
        if let Some(tools) = learner.policy.as_mut().filter(|_| ckpt.dir.join(REFERENCE_MODEL_FILE).exists()) {
            let (_, fresh) = build_model(&learner.config, data.tokenizer.vocab_size(), &reference_device)?;
            tools.reference = Some(crate::weights::load_weights(fresh, &ckpt.dir.join(REFERENCE_MODEL_FILE), crate::weights::Saved::All)?);
        }
    }
    if learner.config.training.eval_generate_every > 0 && super::heldout::held_out_prompts(&data.validation).is_empty() {
        bail!("training.eval_generate_every: the held-out split has no prompt/reply records to sample for (it needs JSONL data)");
    }
    let mut run = Loop { _lock: lock, learner, run_dir, data, state, logger };
    run.announce(latest.as_ref().map(|c| c.step), &gpt);
    if let Some(note) = epochs_note {
        run.logger().message(&note);
    }
    for warning in run.learner.config.objective.warnings() {
        run.logger().message(&format!("warning: {warning}"));
    }
    run.run(options.stop_at_step)
}

impl Loop {
    fn logger(&mut self) -> &mut RunLogger {
        self.logger.as_mut().expect("logger opened before the loop")
    }

    fn announce(&mut self, resumed_from: Option<u64>, gpt: &GptConfig) {
        let params: usize = self.learner.model.num_params();
        let text = format!(
            "polyburn: {} | {} params ({} layers, d={}, heads={}, ctx={}, vocab={}) | train {} tokens, validation {} tokens{}{}{}",
            self.run_dir.display(),
            params,
            gpt.n_layers,
            gpt.d_model,
            gpt.n_heads,
            gpt.context_length,
            gpt.vocab_size,
            self.data.train_tokens,
            self.data.validation_tokens,
            match self.learner.config.data.pack {
                true => format!(
                    " | packed into {} rows ({:.1}% filled)",
                    self.data.train.samples_per_epoch(),
                    100.0 * self.data.train.packing_fill()
                ),
                false => String::new(),
            },
            match self.data.skipped_lines {
                0 => String::new(),
                n => format!(" | skipped {n} bad JSONL lines"),
            },
            match resumed_from {
                Some(step) => format!(" | resuming from step {step}"),
                None => String::new(),
            },
        );
        self.logger().message(&text);
        let (ffn_params, ffn_flops) = gpt.ffn_cost();
        let (mlp_params, _) =
            crate::model::gating::ffn_cost(crate::config::FfnUnit::Gelu, gpt.d_model, gpt.d_ff, gpt.bias, false);
        let ffn = format!(
            "FFN `{}`: {ffn_params} params and {ffn_flops} forward FLOPs per token per layer ({:+} params per layer vs the plain GELU MLP)",
            serde_yaml::to_string(&gpt.ffn.unit).unwrap_or_default().trim(),
            ffn_params as i64 - mlp_params as i64,
        );
        self.logger().message(&ffn);
        if resumed_from.is_none() {
            // TensorBoard's Text tab at step 0: what this run is, beside its curves.
            let flops = 6 * self.learner.model.matmul_params();
            let summary = format!("{text}\n\n{ffn}\n\ntraining FLOPs per token (6 × matmul parameters): {flops}");
            let config = format!("```yaml\n{}```", self.learner.config.to_yaml());
            let logger = self.logger();
            logger.text("config", &config, 0);
            logger.text("model", &summary, 0);
            logger.flush();
        }
    }

    /// Early stopping's verdict: why the run should end now, if it should.
    fn early_stop_reason(&self) -> Option<String> {
        let t = &self.learner.config.training;
        let patience = t.early_stopping_patience as u64;
        (patience > 0 && self.state.evals_without_improvement >= patience).then(|| {
            format!(
                "early stopping at step {}: eval loss has not improved by at least {} for {patience} evaluations (best {:.4} at step {})",
                self.state.global_step,
                t.early_stopping_threshold,
                self.state.best_eval_loss.unwrap_or(f64::NAN),
                self.state.best_eval_step.unwrap_or(0)
            )
        })
    }

    fn run(mut self, stop_at_step: Option<u64>) -> Result<TrainOutcome> {
        let t = self.learner.config.training.clone();
        let max_steps = t.max_steps as u64;
        let mut interrupted = false;
        let mut stopped_early = self.early_stop_reason();
        while self.state.global_step < max_steps && stopped_early.is_none() {
            if stop_at_step.is_some_and(|s| self.state.global_step >= s) {
                interrupted = true;
                break;
            }
            let step = self.state.global_step;
            let started = Instant::now();
            let StepStats { loss, grad_norm, learning_rate: lr, tokens, metrics, samples } =
                self.learner.step(&mut self.data.train, step).map_err(|e| {
                    e.context(format!(
                        "stopping without writing a checkpoint; the last good one is kept. Lower \
                         optimizer.learning_rate or check the data, then `polyburn resume {}`",
                        self.run_dir.display()
                    ))
                })?;
            let step_secs = started.elapsed().as_secs_f64();
            self.state.train_seconds += step_secs;
            self.state.global_step += 1;
            self.state.learning_rate = lr;
            self.state.last_train_loss = Some(loss);
            self.state.data = self.data.train.cursor(self.learner.samples_seen(self.state.global_step));
            let done = self.state.global_step;

            if done % t.log_every as u64 == 0 || done == max_steps {
                let tokens_per_sec = tokens as f64 / step_secs;
                let epoch = self.learner.samples_seen(done) as f64 / self.data.train.samples_per_epoch().max(1) as f64;
                let logger = self.logger();
                logger.scalar("train/epoch", epoch, done);
                logger.scalar("train/loss", loss, done);
                logger.scalar("train/lr", lr, done);
                logger.scalar("train/grad_norm", grad_norm, done);
                logger.scalar("perf/tokens_per_sec", tokens_per_sec, done);
                logger.scalar("perf/step_ms", step_secs * 1e3, done);
                let mut record = json!({
                    "step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_sec": tokens_per_sec, "step_ms": step_secs * 1e3, "epoch": epoch,
                });
                // α in effect for the next step, i.e. after `done` steps.
                let alphas = self.learner.model.alphas(done);
                let logger = self.logger.as_mut().expect("logger");
                for (i, a) in alphas.iter().enumerate() {
                    logger.scalar(&format!("alpha/layer_{i}"), *a, done);
                }
                if !alphas.is_empty() {
                    record["alpha"] = json!(alphas);
                }
                for (name, value) in &metrics {
                    logger.scalar(name, *value, done);
                    record[*name] = json!(value);
                }
                logger.record(record)?;
                logger.samples(done, &samples)?;
                logger.progress(done, max_steps, &format!("loss {loss:.4}  {tokens_per_sec:.0} tok/s"));
            } else {
                self.logger().tick(done);
            }
            let mut new_best = false;
            if (t.eval_every > 0 && done % t.eval_every as u64 == 0) || done == max_steps {
                new_best = self.evaluate()?;
                stopped_early = self.early_stop_reason();
            }
            let generate_every = t.eval_generate_every as u64;
            if generate_every > 0 && (done % generate_every == 0 || done == max_steps || stopped_early.is_some()) {
                self.evaluate_generation()?;
            }
            interrupted = super::interrupted() || stop_at_step.is_some_and(|s| done >= s);
            let periodic = done % self.learner.config.checkpoint.every_steps as u64 == 0;
            if periodic || done == max_steps || interrupted || stopped_early.is_some() || new_best {
                self.save_checkpoint()?;
            }
            if new_best {
                // After the save (so the link never points at a missing directory), then prune
                // the previous best if it is now outside `keep_last`.
                checkpoint::mark_best(&self.run_dir, done)?;
                checkpoint::prune(&self.run_dir, self.learner.config.checkpoint.keep_last)?;
            }
            if interrupted {
                break;
            }
        }
        let logger = self.logger.take().expect("logger");
        if let Some(reason) = &stopped_early {
            logger.message(reason);
        }
        if interrupted {
            logger.message(&format!(
                "stopped at step {}; continue with `polyburn resume {}`",
                self.state.global_step,
                self.run_dir.display()
            ));
        }
        logger.finish();
        Ok(TrainOutcome {
            run_dir: self.run_dir,
            global_step: self.state.global_step,
            final_train_loss: self.state.last_train_loss,
            final_eval_loss: self.state.last_eval_loss,
            interrupted,
            early_stopped: stopped_early,
        })
    }

    /// Evaluates; returns whether the result is a new best for `checkpoint.keep_best`.
    fn evaluate(&mut self) -> Result<bool> {
        let l = &self.learner;
        let loss = evaluate(&l.model, &mut self.data.validation, &l.config, &l.device, self.state.global_step)?;
        let step = self.state.global_step;
        self.state.last_eval_loss = Some(loss);
        let threshold = l.config.training.early_stopping_threshold;
        if self.state.best_eval_loss.is_none_or(|b| loss < b - threshold) {
            self.state.evals_without_improvement = 0;
        } else {
            self.state.evals_without_improvement += 1;
        }
        if self.state.best_eval_loss.is_none_or(|b| loss < b) {
            self.state.best_eval_loss = Some(loss);
            self.state.best_eval_step = Some(step);
        }
        let logger = self.logger();
        logger.scalar("eval/loss", loss, step);
        logger.record(json!({"step": step, "eval_loss": loss}))?;
        logger.message(&format!("step {step}: eval loss {loss:.4}"));
        let c = &self.learner.config.checkpoint;
        let new_best = c.keep_best && c.best_mode.improves(loss, self.state.best_checkpoint_value);
        if new_best {
            self.state.best_checkpoint_value = Some(loss);
        }
        Ok(new_best)
    }

    /// `training.eval_generate_every`: the held-out sampling evaluation, logged under `eval/`.
    fn evaluate_generation(&mut self) -> Result<()> {
        let (l, step) = (&self.learner, self.state.global_step);
        let n = l.config.training.eval_generate_samples;
        let options = HeldOutOptions {
            k: if n > 1 { vec![1, n] } else { vec![1] },
            samples: n,
            temperature: None,
            seed: derive_seed(l.config.run.seed, Stream::EvalSampling, 0),
        };
        let model = l.model.valid();
        let report = evaluate_held_out(&model, &self.data.tokenizer, &l.config, &self.data.validation, None, &options, step, &l.device.clone().inner())
            .context("training.eval_generate_every")?;
        let mut record = json!({"step": step});
        let logger = self.logger();
        for (name, value) in report.mean.named() {
            logger.scalar(&format!("eval/{name}"), value, step);
            record[format!("eval/{name}")] = json!(value);
        }
        logger.record(record)?;
        let (m, e) = (&report.mean, &report.stderr);
        let (k, pass) = *m.pass_at.last().expect("k = 1 at least");
        logger.message(&format!(
            "step {step}: held-out pass@1 {:.3} ± {:.3}, pass@{k} {pass:.3}, coverage@{k} {:.2} ± {:.2} ({} prompts × {n})",
            m.pass_at[0].1, e.pass_at[0].1, m.coverage_at.last().map_or(0.0, |c| c.1), e.coverage_at.last().map_or(0.0, |c| c.1), report.prompts
        ));
        Ok(())
    }

    fn save_checkpoint(&mut self) -> Result<()> {
        let state = serde_json::to_vec_pretty(&self.state)?;
        let config = self.learner.config.to_yaml();
        let (model, optimizer) = (&self.learner.model, &self.learner.optimizer);
        let keep_last = self.learner.config.checkpoint.keep_last;
        let saved = saved_weights(&self.learner.config);
        let reference = self.learner.policy.as_ref().and_then(|p| p.reference.as_ref());
        // A cycle of objective.num_iterations updates that continues past this checkpoint.
        let next = self.state.global_step;
        let batch_step = self.learner.config.objective.batch_step(next);
        let rollouts = self.learner.policy.as_ref().and_then(|p| p.rollouts.needed_from(next, batch_step));
        checkpoint::write_checkpoint(&self.run_dir, self.state.global_step, keep_last, |dir| {
            crate::weights::save_weights(model, &dir.join(MODEL_FILE), saved)?;
            if let Some(reference) = reference {
                crate::weights::save_weights(reference, &dir.join(REFERENCE_MODEL_FILE), crate::weights::Saved::All)?;
            }
            if let Some(rollouts) = rollouts {
                rollouts.save(&dir.join(ROLLOUTS_FILE))?;
            }
            optimizer.save(dir.join(OPTIMIZER_FILE))?;
            crate::weights::write_file_synced(&dir.join(CONFIG_FILE), config.as_bytes())?;
            // Written last: a directory with state.json is complete.
            crate::weights::write_file_synced(&dir.join(STATE_FILE), &state)
        })?;
        self.logger().flush();
        Ok(())
    }
}

/// Mean `sft` loss over the first `eval_batches` batches of `source`, without autodiff.
pub fn evaluate(
    model: &Gpt,
    source: &mut SampleSource,
    config: &Config,
    device: &Device,
    global_step: u64,
) -> Result<f64> {
    let model = model.valid();
    let device = device.clone().inner();
    let t = &config.training;
    let mut total = 0.0;
    for i in 0..t.eval_batches {
        let batch = source.batch((i * t.batch_size) as u64, t.batch_size);
        let context = ForwardContext::for_run(config, global_step);
        total += sft_loss(&model, &BatchTensors::new(&batch, &device), &context).into_scalar::<f32>() as f64;
    }
    Ok(total / t.eval_batches as f64)
}

/// A run's model as saved in one of its checkpoints.
pub struct CheckpointedModel {
    pub config: Config,
    pub model_config: GptConfig,
    pub model: Gpt,
    pub tokenizer: crate::data::TextTokenizer,
    pub checkpoint: checkpoint::Checkpoint,
    pub device: Device,
}

/// Loads the latest (or `step`) checkpoint of `run_dir` for inference.
/// The checkpoint step a command asks for: `--step N`, `--best` (`checkpoints/best`), or the
/// latest (`None`).
pub fn requested_step(run_dir: &Path, step: Option<u64>, best: bool) -> Result<Option<u64>> {
    if !best {
        return Ok(step);
    }
    let best = checkpoint::best_checkpoint(run_dir)?.with_context(|| {
        format!("{} has no best checkpoint (train with checkpoint.keep_best: true)", run_dir.display())
    })?;
    Ok(Some(best.step))
}

pub fn load_checkpointed_model(run_dir: &Path, step: Option<u64>) -> Result<CheckpointedModel> {
    let config = saved_config(run_dir, &[])?;
    let tokenizer = crate::data::TextTokenizer::from_folder(run_dir)?;
    let ckpt = match step {
        Some(step) => checkpoint::list_checkpoints(run_dir)?
            .into_iter()
            .find(|c| c.step == step)
            .with_context(|| format!("{} has no checkpoint for step {step}", run_dir.display()))?,
        None => checkpoint::latest_checkpoint(run_dir)?
            .with_context(|| format!("{} has no checkpoint yet", run_dir.display()))?,
    };
    let device = device_from_name(&config.run.device)?;
    let (model_config, model) = build_model(&config, tokenizer.vocab_size(), &device)?;
    let model = crate::weights::load_weights(model, &ckpt.dir.join(MODEL_FILE), saved_weights(&config))?;
    Ok(CheckpointedModel { config, model_config, model, tokenizer, checkpoint: ckpt, device })
}

/// The config saved in a run directory (what `polyburn resume` continues).
pub fn saved_config(run_dir: &Path, overrides: &[String]) -> Result<Config> {
    let path = run_dir.join(CONFIG_FILE);
    if !path.exists() {
        bail!("{} has no {CONFIG_FILE}: is it a polyburn run directory?", run_dir.display());
    }
    let mut config = Config::load(&path, overrides)?;
    // The run lives where it is now, even if the directory was moved.
    config.run.output_dir = Some(run_dir.to_path_buf());
    Ok(config)
}
