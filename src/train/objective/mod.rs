//! Training objectives behind one interface: [`Objective::loss`] turns one micro-batch of a step
//! into a loss (graph attached) and its measurements. `Learner::step` calls it once per
//! micro-batch; which objective runs is decided here alone ([`objective_at`]).
//!
//! - [`sft`]: next-token cross-entropy on the data.
//! - [`sampling`]: the pieces the sampling objectives share: sample replies, score them, the
//!   clipped policy-gradient term.
//! - [`grpo`], [`polychromic`]: `grpo`, `polychromic_rl`, `polychromic_regularized`.

pub mod grpo;
pub mod polychromic;
pub mod rollout;
pub mod sampling;
pub mod set_advantage;
pub mod sft;

use anyhow::Result;
use burn::tensor::{Device, Tensor};

pub use sampling::PolicyTools;
pub use sft::{BatchTensors, sft_loss};

use crate::config::{Config, ObjectiveType};
use crate::data::SampleSource;
use crate::model::Gpt;

/// What one micro-batch of an optimizer step has to work with.
pub struct StepInput<'a> {
    pub config: &'a Config,
    pub model: &'a Gpt,
    pub source: &'a mut SampleSource,
    /// Rewards, tokenizer, encoder and reference policy (sampling objectives only).
    pub tools: Option<&'a mut PolicyTools>,
    /// The micro-batch's first sample (its position in the data order).
    pub first: u64,
    /// The optimizer step (0-based): LR, α, sampling seeds are functions of it.
    pub step: u64,
    pub device: &'a Device,
}

impl StepInput<'_> {
    fn tools(&mut self) -> Result<&mut PolicyTools> {
        self.tools.as_deref_mut().ok_or_else(|| anyhow::anyhow!("a sampling objective needs its policy tools"))
    }
}

/// One micro-batch's loss and what it measured.
pub struct Loss {
    pub loss: Tensor<1>,
    /// Input tokens of the forward passes (padding included).
    pub tokens: usize,
    /// Objective-specific measurements (`train/reward_mean`, `perf/generate_ms`, ...).
    pub metrics: Vec<(&'static str, f64)>,
    /// Sampled replies to record in `samples.jsonl` (sampling objectives).
    pub samples: Vec<sampling::ReplySample>,
    /// Gradients the objective computed itself (`training.gradient_checkpointing`); `loss` is
    /// then detached. `None`: the trainer back-propagates `loss`.
    pub grads: Option<burn::optim::GradientsParams>,
}

pub trait Objective {
    fn loss(&self, input: StepInput) -> Result<Loss>;

    /// Whether the objective samples replies (its steps log their parts' times).
    fn samples(&self) -> bool {
        true
    }
}

/// The objective of `kind`.
pub fn objective(kind: ObjectiveType) -> &'static dyn Objective {
    match kind {
        ObjectiveType::Sft => &sft::Sft,
        ObjectiveType::Grpo => &grpo::Grpo,
        ObjectiveType::PolychromicRl => &polychromic::PolychromicRl,
        ObjectiveType::PolychromicRegularized => &polychromic::PolychromicRegularized,
    }
}

/// The objective that trains optimizer step `step`: `sft` during the shared warm start
/// (`objective.sft_steps`), the configured one after it.
pub fn objective_at(config: &Config, step: u64) -> &'static dyn Objective {
    let kind = config.objective.kind;
    objective(if step < config.objective.sft_steps as u64 { ObjectiveType::Sft } else { kind })
}
