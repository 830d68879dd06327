//! `polyburn eval`: the held-out sampling evaluation ([`crate::train::heldout`]) of a run's
//! checkpoint.

use std::path::Path;

use anyhow::{Context, Result};

pub use crate::train::heldout::{EvalReport, HeldOutOptions, coverage_at_k, pass_at_k};
use crate::model::encoder::SentenceEncoder;
use crate::train::heldout::evaluate_held_out;
use crate::train::trainer::load_checkpointed_model;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub sampling: HeldOutOptions,
    /// Checkpoint step (latest when `None`).
    pub step: Option<u64>,
    /// Sentence encoder for semantic diversity; `None` skips it.
    pub encoder: Option<String>,
}

/// Samples replies for every distinct held-out prompt of `run_dir` and scores them.
pub fn evaluate_run(run_dir: &Path, options: &EvalOptions) -> Result<EvalReport> {
    options.sampling.validate()?;
    let run = load_checkpointed_model(run_dir, options.step)?;
    let data = crate::data::prepare(&run.config, run_dir)?;
    let encoder = match &options.encoder {
        Some(id) => Some(SentenceEncoder::load(id, &burn::tensor::Device::flex()).with_context(|| {
            "--encoder: run .ci/fetch-minilm to cache all-MiniLM-L6-v2, or pass --encoder none"
        })?),
        None => None,
    };
    let step = run.checkpoint.state()?.global_step;
    evaluate_held_out(&run.model, &run.tokenizer, &run.config, &data.validation, encoder.as_ref(), &options.sampling, step, &run.device)
        .with_context(|| run_dir.display().to_string())
}
