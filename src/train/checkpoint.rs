//! Crash-safe checkpoints: everything needed to continue a run bit-for-bit.
//!
//! `checkpoints/step-<n>/` holds `model.safetensors` (weights, with the parameter ids in its
//! metadata so optimizer state keyed by id stays attached), `optimizer.bpk` (AdamW moments),
//! `config.yaml` (the resolved config) and `state.json` (global step, data cursor, seed,
//! last metrics). LR and α schedules, RNG streams and the data position are functions of the
//! global step, so the step restores them. A checkpoint is written to `step-<n>.tmp/`,
//! fsynced and renamed: a crash mid-write leaves the previous checkpoint intact.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::DataCursor;
use crate::weights::fsync_path;

pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
pub const STATE_FILE: &str = "state.json";
pub const CONFIG_FILE: &str = "config.yaml";
/// The initial policy a KL penalty measures against (sampling objectives with `kl_beta > 0`).
pub const REFERENCE_MODEL_FILE: &str = "reference_model.safetensors";
/// safetensors metadata key holding `{tensor name: ParamId}`.

/// The trainer's own state at a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed; the one owner of LR, α, RNG and data position.
    pub global_step: u64,
    pub data: DataCursor,
    pub seed: u64,
    /// Learning rate used by the last step (derived from the step; stored for inspection).
    pub learning_rate: f64,
    pub last_train_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub best_eval_step: Option<u64>,
    /// Wall-clock seconds spent in optimizer steps, summed over every resume.
    #[serde(default)]
    pub train_seconds: f64,
    /// Evaluations in a row without an improvement of `training.early_stopping_threshold`.
    #[serde(default)]
    pub evals_without_improvement: u64,
    /// `checkpoint.best_metric` of the checkpoint `checkpoints/best` points at.
    #[serde(default)]
    pub best_checkpoint_value: Option<f64>,
}

/// A complete checkpoint on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub step: u64,
    pub dir: PathBuf,
}

impl Checkpoint {
    pub fn state(&self) -> Result<TrainerState> {
        let path = self.dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

/// Complete checkpoints of a run, oldest first. `.tmp` directories (interrupted writes) and
/// anything else are ignored.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<Checkpoint>> {
    let dir = run_dir.join(CHECKPOINTS_DIR);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix("step-")).and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() {
            found.push(Checkpoint { step, dir: entry.path() });
        }
    }
    found.sort_by_key(|c| c.step);
    Ok(found)
}

pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<Checkpoint>> {
    Ok(list_checkpoints(run_dir)?.pop())
}

/// Writes `checkpoints/step-<step>/` atomically: `fill` writes the files into a temp dir,
/// which is fsynced and renamed. Then keeps only the newest `keep_last` (0 = all).
pub fn write_checkpoint(
    run_dir: &Path,
    step: u64,
    keep_last: usize,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<Checkpoint> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let final_dir = root.join(step_dir_name(step));
    let tmp_dir = root.join(format!("{}.tmp", step_dir_name(step)));
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir)?;
    }
    std::fs::create_dir(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
    fill(&tmp_dir)?;
    for entry in std::fs::read_dir(&tmp_dir)? {
        fsync_path(&entry?.path())?;
    }
    fsync_path(&tmp_dir)?;
    if final_dir.exists() {
        // Same step written again (e.g. Ctrl-C right after a periodic save): replace it.
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp_dir, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp_dir.display(), final_dir.display()))?;
    fsync_path(&root)?;
    prune(run_dir, keep_last)?;
    Ok(Checkpoint { step, dir: final_dir })
}

/// Removes all but the newest `keep_last` complete checkpoints (0 keeps all); the one
/// `checkpoints/best` points at is never removed.
pub fn prune(run_dir: &Path, keep_last: usize) -> Result<()> {
    if keep_last == 0 {
        return Ok(());
    }
    let best = best_checkpoint(run_dir)?.map(|c| c.step);
    let all: Vec<Checkpoint> = list_checkpoints(run_dir)?.into_iter().filter(|c| Some(c.step) != best).collect();
    for old in all.iter().take(all.len().saturating_sub(keep_last)) {
        std::fs::remove_dir_all(&old.dir).with_context(|| format!("removing {}", old.dir.display()))?;
    }
    Ok(())
}

/// Name of the link to the best checkpoint, in `checkpoints/`.
pub const BEST_LINK: &str = "best";

/// Points `checkpoints/best` at the complete checkpoint of `step`: a new relative symlink,
/// renamed over the old one, so a crash leaves the old or the new link, never none.
pub fn mark_best(run_dir: &Path, step: u64) -> Result<()> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    let tmp = root.join(format!("{BEST_LINK}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(step_dir_name(step), &tmp).with_context(|| format!("creating {}", tmp.display()))?;
    std::fs::rename(&tmp, root.join(BEST_LINK)).with_context(|| format!("replacing {}", root.join(BEST_LINK).display()))?;
    fsync_path(&root)
}

/// The checkpoint `checkpoints/best` points at, if there is one and it is complete.
pub fn best_checkpoint(run_dir: &Path) -> Result<Option<Checkpoint>> {
    let link = run_dir.join(CHECKPOINTS_DIR).join(BEST_LINK);
    let Ok(target) = std::fs::read_link(&link) else { return Ok(None) };
    let step = target
        .to_str()
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse::<u64>().ok())
        .with_context(|| format!("{} points at {}, not a step-<n> checkpoint", link.display(), target.display()))?;
    Ok(list_checkpoints(run_dir)?.into_iter().find(|c| c.step == step))
}

