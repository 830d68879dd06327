//! The YAML run configuration: schema, defaults, `--set` overrides and validation.
//!
//! Every field has a default or a clear "missing field" error; unknown fields, wrong types and
//! out-of-range values are rejected with the field path (`optimizer.learning_rate: must be > 0`).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

/// A configuration problem, always tied to the field (or file) it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Where: a dotted field path, or a file name with a line for syntax errors.
    pub at: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// All problems found in one config, reported together so a user fixes them in one go.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid config:")?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

fn err(at: impl Into<String>, message: impl Into<String>) -> ConfigErrors {
    ConfigErrors(vec![ConfigError { at: at.into(), message: message.into() }])
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub optimizer: OptimizerConfig,
    pub training: TrainingConfig,
    pub checkpoint: CheckpointConfig,
    /// LoRA fine-tuning: only the adapters train; absent = full training.
    pub lora: Option<LoraConfig>,
    /// What the optimizer minimises: cross-entropy, or a sampling objective.
    pub objective: ObjectiveConfig,
    /// Fused or reference implementation of each custom op.
    pub kernels: KernelsConfig,
}

/// `kernels`: which implementation of each op the run uses. `fused` runs polyburn's own kernels:
/// Rust on the `flex` device, CubeCL on `wgpu`/`cuda`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KernelsConfig {
    /// Training attention (generation with a KV cache always uses the reference).
    pub attention: polyburn_kernels::attention::AttentionImpl,
    /// The policy's own diversity D_θ of `polychromic_regularized`.
    pub diversity: polyburn_kernels::diversity::DiversityImpl,
    /// LCS lengths for the `lcs` diversity.
    pub lcs: polyburn_kernels::lcs::LcsImpl,
    /// The LM head and cross-entropy of the training loss.
    pub cross_entropy: polyburn_kernels::cross_entropy::CrossEntropyImpl,
    /// The FFN activation: the plain MLP's GELU, or a gated unit's `A ⊙ (α·g(B) + 1 − α)`
    /// (with `gate_norm` the norm splits it, and the reference runs).
    pub activation: polyburn_kernels::activation::ActivationImpl,
    /// LayerNorm / RMSNorm of the blocks and the final norm.
    pub norm: polyburn_kernels::norm::NormImpl,
    /// The AdamW update of every parameter.
    pub adamw: polyburn_kernels::adamw::AdamWImpl,
    /// Fused LCS batches with fewer dynamic-programming cells (groups · N² · L²) than this run
    /// on the CPU even on a GPU device; larger ones run the CubeCL kernel.
    pub lcs_gpu_min_cells: u64,
}

/// Every op defaults to its kernel's own default (fused).
impl Default for KernelsConfig {
    fn default() -> Self {
        Self {
            attention: Default::default(),
            diversity: Default::default(),
            lcs: Default::default(),
            cross_entropy: Default::default(),
            activation: Default::default(),
            norm: Default::default(),
            adamw: Default::default(),
            lcs_gpu_min_cells: polyburn_kernels::lcs::DEFAULT_GPU_MIN_CELLS,
        }
    }
}

/// `objective.type`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveType {
    /// Cross-entropy on the reference reply (or the text).
    #[default]
    Sft,
    /// `CE − λ · D_θ`: D_θ is the semantic diversity of the policy's own mean-pooled hidden
    /// states of its N sampled replies (differentiable).
    PolychromicRegularized,
    /// Set-level policy gradient: M sets of N replies per prompt, set score
    /// `mean reward × diversity`, advantage against the other sets.
    PolychromicRl,
    /// Group-relative policy gradient: per-reply reward normalised within the prompt's group.
    Grpo,
}

impl ObjectiveType {
    /// Whether the objective samples replies from the policy.
    pub fn samples(self) -> bool {
        self != ObjectiveType::Sft
    }
}

/// A reward function (`objective.rewards[i].type`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// ROUGE-L F1 (over words) to the record's reference reply.
    RougeL,
    /// 1 inside `[min_chars, max_chars]`, else 0.
    Length,
    /// 1 when the reply is one of the record's `answers` (or its `reply`), else 0.
    Verifier,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    #[serde(rename = "type")]
    pub kind: RewardKind,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_chars: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_chars: Option<usize>,
}

fn one() -> f64 {
    1.0
}

/// How replies are sampled during training (`objective.sampling`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub max_new_tokens: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 32 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    #[serde(rename = "type")]
    pub kind: ObjectiveType,
    /// The first `sft_steps` optimizer steps train with `sft` (a shared warm start).
    pub sft_steps: usize,
    /// N: replies sampled per prompt (per set for `polychromic_rl`).
    pub n_samples: usize,
    /// M: sets per prompt for `polychromic_rl`. `grpo` samples `n_sets × n_samples` replies
    /// per prompt as one group, so both draw the same number of replies.
    pub n_sets: usize,
    /// λ of `polychromic_regularized`.
    pub lambda: f64,
    /// The set diversity of `polychromic_rl`: semantic, distinct_2, self_bleu, lcs or distinct.
    pub diversity: DiversityMetric,
    /// How `polychromic_rl` turns set scores into per-reply advantages: `marginal` or `partition`.
    pub set_advantage: SetAdvantage,
    /// Sampled sets per reply for marginal advantages of diversities that are not pairwise.
    pub n_subsets: usize,
    /// Sentence encoder for semantic diversity: hub id (through the HF cache) or folder.
    pub encoder: String,
    /// Divide advantages by their standard deviation (within the group / across sets);
    /// `scale_rewards` says the same more precisely and wins when given.
    pub normalize_advantage: bool,
    /// What advantages are divided by: the group's std (`group`), the whole batch's reward
    /// std (`batch`) or nothing (`none`); absent = `group`, or `none` with
    /// `normalize_advantage: false`.
    pub scale_rewards: Option<ScaleRewards>,
    /// PPO clipping range ε of the ratio to the sampling policy; 0 turns clipping off.
    pub ppo_clip: f64,
    /// Upper clip range ε_high (DAPO's asymmetric clipping); absent = `ppo_clip`.
    pub ppo_clip_high: Option<f64>,
    /// How token terms are averaged: `grpo`, `dr_grpo` or `dapo`.
    pub loss_type: LossType,
    /// Replies cut off by `max_new_tokens` without an end token get no policy-gradient loss.
    pub mask_truncated: bool,
    /// β of the KL penalty to the initial policy (the model when sampling starts); 0 = off.
    pub kl_beta: f64,
    /// μ: optimizer updates per batch of sampled replies (GRPO's inner iterations). With
    /// μ > 1 the ratio to the sampling policy and its clipping take effect from the second
    /// update on; the replies are sampled on the first step of each cycle of μ.
    pub num_iterations: usize,
    pub sampling: SamplingConfig,
    /// Weighted sum of these rewards scores each reply.
    pub rewards: Vec<RewardConfig>,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            kind: ObjectiveType::Sft,
            sft_steps: 0,
            n_samples: 8,
            n_sets: 4,
            lambda: 0.1,
            diversity: DiversityMetric::Semantic,
            set_advantage: SetAdvantage::Marginal,
            n_subsets: 32,
            encoder: DEFAULT_ENCODER.into(),
            normalize_advantage: true,
            scale_rewards: None,
            ppo_clip: 0.2,
            ppo_clip_high: None,
            loss_type: LossType::Grpo,
            mask_truncated: false,
            kl_beta: 0.0,
            num_iterations: 1,
            sampling: SamplingConfig::default(),
            rewards: vec![RewardConfig { kind: RewardKind::Verifier, weight: 1.0, min_chars: None, max_chars: None }],
        }
    }
}

/// A projection LoRA can adapt (`lora.target_modules`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0, dropout: 0.0, target_modules: vec![LoraTarget::Q, LoraTarget::V] }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub name: String,
    /// Where the run writes; `runs/<name>` when not given.
    pub output_dir: Option<PathBuf>,
    pub seed: u64,
    /// `flex` (CPU, always built), `wgpu` or `cuda` (cargo features of the same name).
    pub device: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self { name: "polyburn".into(), output_dir: None, seed: 1337, device: "flex".into() }
    }
}

/// `data.chat_template` values that are not a file.
pub const CHAT_TEMPLATE_AUTO: &str = "auto";
pub const CHAT_TEMPLATE_NONE: &str = "none";

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// `.jsonl` files are prompt/reply records, anything else plain text.
    #[default]
    Auto,
    Text,
    Jsonl,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Training corpus: plain text or JSONL `{"prompt": ..., "reply": ...}`.
    pub train: Option<PathBuf>,
    /// Validation corpus; when absent a `validation_fraction` of `train` is held out.
    pub validation: Option<PathBuf>,
    pub format: DataFormat,
    /// `char` (character-level, built from the corpus), `bpe` (byte-level BPE trained on the
    /// corpus up to `model.vocab_size`, default 1024) or a path to a `tokenizer.json`.
    pub tokenizer: String,
    pub validation_fraction: f64,
    /// Skip (and count) malformed JSONL lines instead of stopping at the first one.
    pub skip_bad_lines: bool,
    /// How JSONL records become text: `auto` (the pretrained model's `chat_template` when its
    /// `tokenizer_config.json` has one, else plain prompt + reply), `none` (plain), or a path
    /// to a Jinja template or a `tokenizer_config.json`. With a template the loss covers the
    /// assistant turns only.
    pub chat_template: String,
    /// JSONL with the `sft` objective: pack several records into each context window, each
    /// attending only to itself with positions from 0, instead of one padded record per row.
    pub pack: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: None,
            validation: None,
            format: DataFormat::Auto,
            tokenizer: "char".into(),
            validation_fraction: 0.1,
            skip_bad_lines: false,
            chat_template: CHAT_TEMPLATE_AUTO.into(),
            pack: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Embedding rows; taken from the tokenizer when absent. Must cover the tokenizer.
    pub vocab_size: Option<usize>,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// FFN hidden width; `4 * d_model` when absent.
    pub d_ff: Option<usize>,
    pub context_length: usize,
    pub dropout: f64,
    /// Biases in linear layers and LayerNorms.
    pub bias: bool,
    /// Share the token embedding with the LM head (as GPT-2 does).
    pub tie_embeddings: bool,
    /// The FFN's activation: plain GELU MLP or a paGating unit.
    pub ffn: FfnConfig,
    /// Start from a Hugging Face model (folder or hub id in the local HF cache): its
    /// architecture, weights and tokenizer replace the sizes above and `data.tokenizer`.
    pub pretrained: Option<String>,
}

/// The FFN activation unit (`model.ffn.unit`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FfnUnit {
    /// Plain MLP: `down(gelu(up(x)))`.
    #[default]
    Gelu,
    Paglu,
    Pagtu,
    Paswishu,
    Pareglu,
    Pagelu,
    Pamishu,
    Pasilu,
}

impl FfnUnit {
    pub fn is_gated(self) -> bool {
        self != FfnUnit::Gelu
    }
}

/// GELU form used by `gelu` and `pagelu` (`model.ffn.approximate`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GeluApproximation {
    /// Exact: `x · Φ(x)` with the error function.
    #[default]
    None,
    /// `0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))`.
    Tanh,
}

/// How a gated unit's α is set (`model.ffn.alpha_mode`), written as `static_<x>`,
/// `learnable`, `scheduler_cosine` or `scheduler_linear`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AlphaMode {
    /// `static_<x>`, 0 ≤ x ≤ 1.
    Static(f64),
    /// α = sigmoid(θ) per layer, θ trained.
    Learnable,
    /// Half cosine from `alpha_max` down to `alpha_min` over `alpha_steps`.
    SchedulerCosine,
    /// Linear ramp from `alpha_min` up to `alpha_max` over `alpha_steps`.
    SchedulerLinear,
}

impl TryFrom<String> for AlphaMode {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl From<AlphaMode> for String {
    fn from(mode: AlphaMode) -> String {
        match mode {
            AlphaMode::Static(x) => format!("static_{x:?}"),
            AlphaMode::Learnable => "learnable".into(),
            AlphaMode::SchedulerCosine => "scheduler_cosine".into(),
            AlphaMode::SchedulerLinear => "scheduler_linear".into(),
        }
    }
}

impl AlphaMode {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "learnable" => Ok(AlphaMode::Learnable),
            "scheduler_cosine" => Ok(AlphaMode::SchedulerCosine),
            "scheduler_linear" => Ok(AlphaMode::SchedulerLinear),
            _ => match text.strip_prefix("static_").map(str::parse::<f64>) {
                Some(Ok(x)) if (0.0..=1.0).contains(&x) => Ok(AlphaMode::Static(x)),
                Some(Ok(x)) => Err(format!("static α must be in [0, 1], got {x}")),
                _ => Err(format!(
                    "unknown mode `{text}`: static_<x> (0 ≤ x ≤ 1), learnable, scheduler_cosine or scheduler_linear"
                )),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FfnConfig {
    pub unit: FfnUnit,
    pub alpha_mode: AlphaMode,
    /// Starting α for `learnable` (default 0.5).
    pub alpha_init: Option<f64>,
    pub alpha_min: f64,
    pub alpha_max: f64,
    /// Schedule length in optimizer steps; the run's `training.max_steps` when absent.
    pub alpha_steps: Option<usize>,
    /// LayerNorm (affine, eps 1e-5) over g(B(h)) before the α mix.
    pub gate_norm: bool,
    pub approximate: GeluApproximation,
}

impl Default for FfnConfig {
    fn default() -> Self {
        Self {
            unit: FfnUnit::Gelu,
            alpha_mode: AlphaMode::Static(1.0),
            alpha_init: None,
            alpha_min: 0.0,
            alpha_max: 1.0,
            alpha_steps: None,
            gate_norm: false,
            approximate: GeluApproximation::None,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: None,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            d_ff: None,
            context_length: 64,
            dropout: 0.0,
            bias: true,
            tie_embeddings: true,
            ffn: FfnConfig::default(),
            pretrained: None,
        }
    }
}

impl ModelConfig {
    pub fn ffn_width(&self) -> usize {
        self.d_ff.unwrap_or(4 * self.d_model)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// Peak learning rate, reached after the warm-up; `schedule` says what follows.
    pub learning_rate: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// Linear warm-up steps (100 when neither this nor `warmup_ratio` is set).
    pub warmup_steps: Option<usize>,
    /// Warm-up as a share of `training.max_steps`, instead of `warmup_steps`.
    pub warmup_ratio: Option<f64>,
    pub schedule: Schedule,
    /// `wsd`: the share of `training.max_steps` spent in the final decay.
    pub decay_fraction: f64,
    pub min_lr: f64,
    /// Global gradient-norm clip over all parameters; 0 turns clipping off.
    pub max_grad_norm: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-3,
            betas: [0.9, 0.99],
            eps: 1e-8,
            weight_decay: 0.1,
            warmup_steps: None,
            warmup_ratio: None,
            schedule: Schedule::Cosine,
            decay_fraction: 0.1,
            min_lr: 1e-4,
            max_grad_norm: 1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Optimizer steps.
    pub max_steps: usize,
    /// Passes over the training data instead of `max_steps` (one of the two): the run
    /// resolves it to `ceil(epochs × samples per epoch / samples per step)` steps and saves
    /// that as `max_steps` in its config.
    pub epochs: Option<f64>,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step; their gradients are averaged.
    pub grad_accum_steps: usize,
    /// Evaluate on the validation split every this many steps (0: only at the end).
    pub eval_every: usize,
    pub eval_batches: usize,
    pub log_every: usize,
    /// End the run (with a checkpoint) after this many evaluations in a row without an
    /// improvement of at least `early_stopping_threshold` in eval loss; 0 = never.
    pub early_stopping_patience: usize,
    pub early_stopping_threshold: f64,
    /// Every this many steps (and at the end), sample `eval_generate_samples` replies to each
    /// held-out prompt and log pass@1, pass@n, coverage@n and diversity under `eval/`
    /// (prompt/reply JSONL data); 0 = off.
    pub eval_generate_every: usize,
    pub eval_generate_samples: usize,
    /// Keep only each block's input in the forward and recompute one block at a time in the
    /// backward (less memory, one more forward of the blocks); `sft` only.
    pub gradient_checkpointing: bool,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            max_steps: 2000,
            epochs: None,
            batch_size: 12,
            grad_accum_steps: 1,
            eval_every: 250,
            eval_batches: 20,
            log_every: 10,
            early_stopping_patience: 0,
            early_stopping_threshold: 0.0,
            eval_generate_every: 0,
            eval_generate_samples: 10,
            gradient_checkpointing: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    pub every_steps: usize,
    /// Complete checkpoints kept on disk (older ones are pruned); 0 keeps all.
    pub keep_last: usize,
    /// Keep the checkpoint of the best evaluation as `checkpoints/best`, outside `keep_last`.
    pub keep_best: bool,
    /// The evaluation metric that decides "best" (`eval_loss`, the one a run logs).
    pub best_metric: String,
    pub best_mode: BestMode,
}

/// Whether a lower (`min`) or higher (`max`) `checkpoint.best_metric` is better.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BestMode {
    #[default]
    Min,
    Max,
}

impl BestMode {
    /// Whether `value` beats `best` (anything beats no best yet).
    pub fn improves(self, value: f64, best: Option<f64>) -> bool {
        match (self, best) {
            (_, None) => true,
            (BestMode::Min, Some(b)) => value < b,
            (BestMode::Max, Some(b)) => value > b,
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every_steps: 1000, keep_last: 3, keep_best: false, best_metric: "eval_loss".into(), best_mode: BestMode::Min }
    }
}

impl Config {
    /// Reads a YAML file, applies `--set a.b=value` overrides and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(path.display().to_string(), format!("cannot read config: {e}")))?;
        Self::from_yaml_str(&text, &path.display().to_string(), overrides)
    }

    /// Parses YAML text (`source` names it in errors), applies overrides, validates.
    pub fn from_yaml_str(text: &str, source: &str, overrides: &[String]) -> Result<Config, ConfigErrors> {
        let mut value: Value = serde_yaml::from_str(text).map_err(|e| {
            let at = match e.location() {
                Some(l) => format!("{source}:{}:{}", l.line(), l.column()),
                None => source.to_string(),
            };
            err(at, format!("YAML syntax error: {e}"))
        })?;
        if value.is_null() {
            value = Value::Mapping(Default::default());
        }
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let training = value.get("training");
        let given = |key: &str| training.and_then(|t| t.get(key)).is_some_and(|v| !v.is_null());
        if given("epochs") && given("max_steps") {
            return Err(err("training.epochs", "set training.epochs or training.max_steps, not both"));
        }
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let at = if path == "." { source.to_string() } else { path };
            err(at, e.into_inner().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Range and consistency checks; every problem is reported with its field path.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, at: &str, message: &str| {
            if !ok {
                errors.push(ConfigError { at: at.into(), message: message.into() });
            }
        };
        let m = &self.model;
        let o = &self.optimizer;
        let t = &self.training;
        check(!self.run.name.is_empty(), "run.name", "must not be empty");
        check(
            matches!(self.run.device.as_str(), "flex" | "wgpu" | "cuda"),
            "run.device",
            "must be one of flex, wgpu, cuda",
        );
        check(self.data.train.is_some(), "data.train", "missing field: path to a text or JSONL corpus");
        check(
            self.data.validation_fraction > 0.0 && self.data.validation_fraction < 1.0,
            "data.validation_fraction",
            "must be in (0, 1)",
        );
        check(!self.data.tokenizer.is_empty(), "data.tokenizer", "must be `char`, `bpe` or a path to tokenizer.json");
        let template = self.data.chat_template.as_str();
        check(
            [CHAT_TEMPLATE_AUTO, CHAT_TEMPLATE_NONE].contains(&template) || std::path::Path::new(template).is_file(),
            "data.chat_template",
            &format!("must be `auto`, `none` or a path to a Jinja template or tokenizer_config.json (no file `{template}`)"),
        );
        check(
            !self.data.pack || !self.objective.kind.samples(),
            "data.pack",
            "packs records for the sft objective; sampling objectives (polychromic_rl, polychromic_regularized, grpo) read one prompt at a time",
        );
        check(m.vocab_size != Some(0), "model.vocab_size", "must be > 0");
        check(m.d_model > 0, "model.d_model", "must be > 0");
        check(m.n_layers > 0, "model.n_layers", "must be > 0");
        check(m.n_heads > 0, "model.n_heads", "must be > 0");
        check(m.n_heads == 0 || m.d_model % m.n_heads == 0, "model.n_heads", "must divide model.d_model");
        check(m.d_ff != Some(0), "model.d_ff", "must be > 0");
        check(m.context_length > 0, "model.context_length", "must be > 0");
        check((0.0..1.0).contains(&m.dropout), "model.dropout", "must be in [0, 1)");
        let f = &m.ffn;
        check(f.alpha_init.is_none_or(|a| a > 0.0 && a < 1.0), "model.ffn.alpha_init", "must be in (0, 1)");
        check((0.0..=1.0).contains(&f.alpha_min), "model.ffn.alpha_min", "must be in [0, 1]");
        check((0.0..=1.0).contains(&f.alpha_max), "model.ffn.alpha_max", "must be in [0, 1]");
        check(f.alpha_steps != Some(0), "model.ffn.alpha_steps", "must be > 0");
        if let Some(l) = &self.lora {
            check(l.rank > 0, "lora.rank", "must be > 0");
            check(l.alpha > 0.0, "lora.alpha", "must be > 0");
            check((0.0..1.0).contains(&l.dropout), "lora.dropout", "must be in [0, 1)");
            check(!l.target_modules.is_empty(), "lora.target_modules", "must name at least one of q, k, v, o, gate, up, down");
        }
        check(o.learning_rate > 0.0 && o.learning_rate.is_finite(), "optimizer.learning_rate", "must be > 0");
        check(o.betas.iter().all(|b| (0.0..1.0).contains(b)), "optimizer.betas", "each must be in [0, 1)");
        check(o.eps > 0.0, "optimizer.eps", "must be > 0");
        check(o.weight_decay >= 0.0, "optimizer.weight_decay", "must be >= 0");
        check(o.min_lr >= 0.0 && (o.learning_rate <= 0.0 || o.min_lr <= o.learning_rate), "optimizer.min_lr", "must be in [0, learning_rate]");
        check(
            o.warmup_steps.is_none() || o.warmup_ratio.is_none(),
            "optimizer.warmup_ratio",
            "set optimizer.warmup_steps or optimizer.warmup_ratio, not both",
        );
        check(o.warmup_ratio.is_none_or(|r| (0.0..1.0).contains(&r)), "optimizer.warmup_ratio", "must be in [0, 1)");
        check(o.decay_fraction > 0.0 && o.decay_fraction <= 1.0, "optimizer.decay_fraction", "must be in (0, 1]");
        check(self.training.early_stopping_threshold >= 0.0, "training.early_stopping_threshold", "must be >= 0");
        check(
            self.checkpoint.best_metric == "eval_loss",
            "checkpoint.best_metric",
            &format!("`{}` is not an evaluation metric a run logs (eval_loss)", self.checkpoint.best_metric),
        );
        check(o.max_grad_norm >= 0.0, "optimizer.max_grad_norm", "must be >= 0 (0 turns clipping off)");
        check(t.max_steps > 0, "training.max_steps", "must be > 0");
        check(t.epochs.is_none_or(|e| e.is_finite() && e > 0.0), "training.epochs", "must be > 0");
        check(t.batch_size > 0, "training.batch_size", "must be > 0");
        check(t.grad_accum_steps > 0, "training.grad_accum_steps", "must be > 0");
        check(t.eval_batches > 0, "training.eval_batches", "must be > 0");
        check(t.log_every > 0, "training.log_every", "must be > 0");
        check(t.eval_generate_samples > 0, "training.eval_generate_samples", "must be > 0");
        check(self.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be > 0");
        let ob = &self.objective;
        check(
            !t.gradient_checkpointing || ob.kind == ObjectiveType::Sft,
            "training.gradient_checkpointing",
            &format!("only the sft objective recomputes activations; objective.type is {:?}", ob.kind),
        );
        if ob.kind.samples() {
            check(ob.n_samples >= 2, "objective.n_samples", "must be >= 2 (diversity and group baselines need pairs)");
            check(
                ob.kind != ObjectiveType::PolychromicRl || ob.n_sets >= 2,
                "objective.n_sets",
                "must be >= 2 (a set's advantage is relative to the other sets)",
            );
            // Every reward kind scores in [0, 1]; a negative weight makes rewards negative,
            // and f = mean reward × diversity with a negative mean rewards sameness.
            let negative = ob.rewards.iter().find(|r| r.weight < 0.0);
            check(
                ob.kind != ObjectiveType::PolychromicRl || negative.is_none(),
                "objective.rewards",
                &format!(
                    "polychromic_rl needs rewards >= 0 (f = mean reward × diversity would reward sameness), \
                     but a weight is {}",
                    negative.map_or(0.0, |r| r.weight)
                ),
            );
            check(ob.n_subsets >= 1, "objective.n_subsets", "must be >= 1");
            check(ob.num_iterations >= 1, "objective.num_iterations", "must be >= 1 (optimizer updates per batch of sampled replies)");
            check(
                t.grad_accum_steps == 1,
                "training.grad_accum_steps",
                "must be 1 for sampling objectives (a step's prompts are sampled and scored together)",
            );
            check(ob.sft_steps < t.max_steps, "objective.sft_steps", "must be < training.max_steps");
            check(ob.sampling.max_new_tokens > 0, "objective.sampling.max_new_tokens", "must be > 0");
            check(ob.sampling.temperature > 0.0, "objective.sampling.temperature", "must be > 0 (replies are sampled)");
            check(ob.sampling.top_p > 0.0 && ob.sampling.top_p <= 1.0, "objective.sampling.top_p", "must be in (0, 1]");
        }
        check(ob.lambda >= 0.0 && ob.lambda.is_finite(), "objective.lambda", "must be >= 0");
        check(ob.ppo_clip >= 0.0, "objective.ppo_clip", "must be >= 0 (0 turns clipping off)");
        check(ob.ppo_clip_high.is_none_or(|h| h >= 0.0), "objective.ppo_clip_high", "must be >= 0");
        check(ob.kl_beta >= 0.0, "objective.kl_beta", "must be >= 0");
        check(!ob.rewards.is_empty(), "objective.rewards", "must list at least one reward");
        for (i, r) in ob.rewards.iter().enumerate() {
            let at = format!("objective.rewards[{i}]");
            check(r.weight.is_finite(), &format!("{at}.weight"), "must be finite");
            let window = r.kind == RewardKind::Length;
            check(
                !window || matches!((r.min_chars, r.max_chars), (Some(a), Some(b)) if a <= b),
                &at,
                "a length reward needs min_chars <= max_chars",
            );
            check(window || (r.min_chars.is_none() && r.max_chars.is_none()), &at, "min_chars/max_chars belong to a length reward");
        }
        if errors.is_empty() { Ok(()) } else { Err(ConfigErrors(errors)) }
    }

    pub fn output_dir(&self) -> PathBuf {
        self.run.output_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&self.run.name))
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a Config always serialises")
    }
}

/// Applies one `a.b.c=value` override; the value is parsed as YAML so `1e-3`, `true` and
/// `[0.9, 0.95]` get their natural types. Unknown paths are caught by deserialisation.
pub fn apply_override(root: &mut Value, assignment: &str) -> Result<(), ConfigErrors> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| err(format!("--set {assignment}"), "expected `field.path=value`"))?;
    let path = path.trim();
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(err(format!("--set {assignment}"), "empty field name in path"));
    }
    let new_value: Value = serde_yaml::from_str(raw)
        .map_err(|e| err(path, format!("cannot parse override value `{raw}`: {e}")))?;
    let keys: Vec<&str> = path.split('.').collect();
    let mut node = root;
    for (i, key) in keys.iter().enumerate() {
        let map = match node {
            Value::Mapping(map) => map,
            Value::Null => {
                *node = Value::Mapping(Default::default());
                node.as_mapping_mut().expect("just set")
            }
            _ => return Err(err(keys[..i].join("."), "is not a section, cannot set a field inside it")),
        };
        let k = Value::String((*key).to_string());
        if i + 1 == keys.len() {
            map.insert(k, new_value);
            return Ok(());
        }
        node = map.entry(k).or_insert(Value::Null);
    }
    unreachable!("the loop returns at the last key")
}

/// The encoder used for semantic diversity when none is named.
pub const DEFAULT_ENCODER: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// Which diversity a polychromic objective multiplies into its set score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiversityMetric {
    /// Mean pairwise cosine distance of sentence-encoder embeddings.
    #[default]
    Semantic,
    /// Distinct bigrams over all bigrams of the group.
    Distinct2,
    /// 1 − self-BLEU.
    SelfBleu,
    /// 1 − mean pairwise LCS length / longer length, over tokens.
    Lcs,
    /// Distinct replies (trimmed, lower-cased, whitespace collapsed) / N, in [1/N, 1]: a set
    /// of N copies of one right answer keeps a score of 1/N instead of 0.
    Distinct,
}

impl DiversityMetric {
    /// Whether a set's diversity is the mean of a distance over its pairs (then the exact
    /// marginal set advantages apply).
    pub fn is_pairwise(self) -> bool {
        matches!(self, DiversityMetric::Semantic | DiversityMetric::Lcs)
    }
}


/// `objective.set_advantage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetAdvantage {
    /// Mean score of the size-n sets containing the reply, minus the mean over all sets.
    #[default]
    Marginal,
    /// Consecutive disjoint sets of n; every reply gets its set's (centred) score.
    Partition,
}


/// `objective.scale_rewards`: what centred advantages are divided by.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Each group's (prompt's) own standard deviation.
    Group,
    /// The standard deviation of every reward of the batch (robust to groups of equal rewards).
    Batch,
    /// Nothing: advantages are rewards minus the group mean (Dr. GRPO).
    None,
}

impl ObjectiveConfig {
    /// Optimizer updates per batch of data: μ for the sampling objective's steps, 1 for
    /// `sft` and the warm start.
    fn updates_per_batch(&self) -> u64 {
        if self.kind.samples() { self.num_iterations.max(1) as u64 } else { 1 }
    }

    /// The step that drew the data (and sampled the replies) that step `step` trains on: the
    /// first step of its cycle of `num_iterations` updates.
    pub fn batch_step(&self, step: u64) -> u64 {
        let (sft, mu) = (self.sft_steps as u64, self.updates_per_batch());
        if step < sft { step } else { sft + (step - sft) / mu * mu }
    }

    /// Batches of data drawn by the steps before `step`.
    pub fn batches_before(&self, step: u64) -> u64 {
        let (sft, mu) = (self.sft_steps as u64, self.updates_per_batch());
        if step <= sft { step } else { sft + (step - sft).div_ceil(mu) }
    }

    /// The effective `scale_rewards`.
    pub fn reward_scaling(&self) -> ScaleRewards {
        self.scale_rewards.unwrap_or(if self.normalize_advantage { ScaleRewards::Group } else { ScaleRewards::None })
    }

    /// Settings that are valid but probably not what the user wants.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let two_per_group = match self.kind {
            ObjectiveType::PolychromicRl => self.n_sets == 2 && self.set_advantage == SetAdvantage::Partition,
            ObjectiveType::Grpo => self.n_sets * self.n_samples == 2,
            _ => false,
        };
        if self.kind.samples() && self.num_iterations > 1 && self.ppo_clip == 0.0 {
            out.push(format!(
                "objective.num_iterations: {} updates per sample batch with objective.ppo_clip 0 leave the ratio to the \
                 sampling policy unclipped",
                self.num_iterations
            ));
        }
        if self.kind.samples() && two_per_group && self.reward_scaling() == ScaleRewards::Group {
            out.push(
                "objective.scale_rewards: `group` with two scores per prompt makes every advantage ±1 \
                 (or 0), whatever the reward gap; consider `batch` or `none`"
                    .to_string(),
            );
        }
        out
    }
}

/// `objective.loss_type`: how the policy-gradient token terms of a batch are averaged.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each reply's tokens, then over replies (GRPO's original form).
    #[default]
    Grpo,
    /// Sum over each reply's tokens divided by a constant (`max_new_tokens` + 1), then the mean
    /// over replies (Dr. GRPO: no length bias).
    DrGrpo,
    /// Mean over every reply token of the batch (DAPO's token-level loss).
    Dapo,
}

/// `optimizer.schedule`: the learning rate after the warm-up.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Half cosine from `learning_rate` to `min_lr` at `training.max_steps`.
    #[default]
    Cosine,
    /// Straight line from `learning_rate` to `min_lr` at `training.max_steps`.
    Linear,
    /// `learning_rate` from the first step (no warm-up).
    Constant,
    /// Warm-up, then `learning_rate`.
    ConstantWithWarmup,
    /// Warm-up, stable at `learning_rate`, then a linear decay to `min_lr` over the last
    /// `decay_fraction` of the steps.
    Wsd,
}

impl OptimizerConfig {
    /// Warm-up steps for a run of `max_steps`.
    pub fn warmup(&self, max_steps: u64) -> u64 {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(steps), _) => steps as u64,
            (None, Some(ratio)) => (ratio * max_steps as f64).round() as u64,
            (None, None) => 100,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str, sets: &[&str]) -> Result<Config, ConfigErrors> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_yaml_str(yaml, "test.yaml", &sets)
    }

    #[test]
    fn num_iterations_cycles_start_after_the_warm_start_and_draw_one_batch_each() {
        let ob = ObjectiveConfig { kind: ObjectiveType::Grpo, sft_steps: 2, num_iterations: 3, ..Default::default() };
        let batch_steps: Vec<u64> = (0..9).map(|s| ob.batch_step(s)).collect();
        assert_eq!(batch_steps, vec![0, 1, 2, 2, 2, 5, 5, 5, 8]);
        let drawn: Vec<u64> = (0..10).map(|s| ob.batches_before(s)).collect();
        assert_eq!(drawn, vec![0, 1, 2, 3, 3, 3, 4, 4, 4, 5]);
        // sft draws a batch every step whatever num_iterations says.
        let sft = ObjectiveConfig { num_iterations: 3, ..Default::default() };
        assert_eq!((0..5).map(|s| sft.batches_before(s)).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        let e = parse("data: {train: x.txt}\nobjective: {type: grpo, num_iterations: 0}", &[]).unwrap_err();
        assert!(e.to_string().contains("objective.num_iterations"), "{e}");
    }

    #[test]
    fn defaults_fill_everything_but_the_corpus() {
        let e = parse("", &[]).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].at, "data.train");
        let c = parse("data: {train: x.txt}", &[]).unwrap();
        assert_eq!(c.checkpoint.every_steps, 1000);
        assert_eq!(c.model.ffn_width(), 512);
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let e = parse("data: {train: x}\noptimizer: {learning_rate: 0}", &[]).unwrap_err();
        assert_eq!(e.to_string().trim(), "invalid config:\n  optimizer.learning_rate: must be > 0");
    }

    #[test]
    fn unknown_fields_and_wrong_types_name_the_path() {
        let e = parse("data: {train: x}\noptimizer: {lerning_rate: 1}", &[]).unwrap_err();
        assert!(e.0[0].at.starts_with("optimizer"), "{e}");
        assert!(e.0[0].message.contains("lerning_rate"), "{e}");
        let e = parse("data: {train: x}\ntraining: {batch_size: many}", &[]).unwrap_err();
        assert_eq!(e.0[0].at, "training.batch_size", "{e}");
    }

    #[test]
    fn yaml_syntax_errors_name_file_and_line() {
        let e = parse("data:\n  train: [unclosed\nmodel: {}\n", &[]).unwrap_err();
        assert!(e.0[0].at.starts_with("test.yaml:"), "{e}");
    }

    #[test]
    fn overrides_set_nested_fields_with_natural_types() {
        let c = parse(
            "data: {train: x}",
            &["optimizer.learning_rate=3e-4", "optimizer.betas=[0.9, 0.95]", "model.dropout=0.1"],
        )
        .unwrap();
        assert_eq!(c.optimizer.learning_rate, 3e-4);
        assert_eq!(c.optimizer.betas, [0.9, 0.95]);
        assert_eq!(c.model.dropout, 0.1);
        let e = parse("data: {train: x}", &["model.nope=1"]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert!(parse("data: {train: x}", &["novalue"]).is_err());
    }

    #[test]
    fn alpha_modes_parse_and_bad_ones_name_the_field() {
        assert_eq!(AlphaMode::parse("static_0.25"), Ok(AlphaMode::Static(0.25)));
        assert_eq!(AlphaMode::parse("learnable"), Ok(AlphaMode::Learnable));
        for mode in [AlphaMode::Static(0.0), AlphaMode::Static(0.25), AlphaMode::Static(1.0), AlphaMode::Learnable, AlphaMode::SchedulerLinear] {
            assert_eq!(AlphaMode::parse(&String::from(mode)), Ok(mode), "{mode:?} round-trips through its name");
        }
        for bad in ["static_1.5", "static_x", "cosine"] {
            let e = parse("data: {train: x}", &[&format!("model.ffn.alpha_mode={bad}")]).unwrap_err();
            assert_eq!(e.0[0].at, "model.ffn.alpha_mode", "{e}");
        }
        let e = parse("data: {train: x}", &["model.ffn.unit=paxyz"]).unwrap_err();
        assert_eq!(e.0[0].at, "model.ffn.unit", "{e}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = parse("data: {train: x}\nmodel: {d_ff: 100}", &[]).unwrap();
        let again = parse(&c.to_yaml(), &[]).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn group_scaling_of_two_scores_per_prompt_is_warned_about() {
        let mut ob = ObjectiveConfig { kind: ObjectiveType::PolychromicRl, n_sets: 2, set_advantage: SetAdvantage::Partition, ..Default::default() };
        assert_eq!(ob.warnings().len(), 1);
        assert!(ob.warnings()[0].contains("objective.scale_rewards"));
        ob.scale_rewards = Some(ScaleRewards::Batch);
        assert!(ob.warnings().is_empty());
        ob.scale_rewards = None;
        ob.normalize_advantage = false;
        assert_eq!(ob.reward_scaling(), ScaleRewards::None);
        assert!(ob.warnings().is_empty());
        ob = ObjectiveConfig { kind: ObjectiveType::PolychromicRl, n_sets: 4, set_advantage: SetAdvantage::Partition, ..Default::default() };
        assert!(ob.warnings().is_empty());
    }
}
