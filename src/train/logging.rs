//! Where training reports go: TensorBoard event files (`tb/`), `metrics.jsonl` (one JSON
//! object per log or eval step) and a progress bar that turns into plain lines off a TTY.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use tensorboard_rs::summary_writer::SummaryWriter;

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const TENSORBOARD_DIR: &str = "tb";

pub struct RunLogger {
    tensorboard: SummaryWriter,
    metrics: File,
    progress: ProgressBar,
    /// Plain progress lines instead of a bar (stderr is not a terminal).
    plain: bool,
    /// Nothing on stderr at all (tests, sweeps running in parallel); files are still written.
    quiet: bool,
}

/// Keeps only the records at or before `step`: a run resumed from an earlier checkpoint
/// re-logs the later steps, and each step must appear once.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let reader = BufReader::new(File::open(path).with_context(|| format!("reading {}", path.display()))?);
    let mut kept = String::new();
    for line in reader.lines() {
        let line = line?;
        let at = serde_json::from_str::<Value>(&line).ok().and_then(|v| v.get("step").and_then(Value::as_u64));
        if at.is_some_and(|s| s <= step) {
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    crate::weights::write_file_atomic(path, kept.as_bytes())
}

impl RunLogger {
    /// Opens the logs of `run_dir` for a run that starts (or resumes) at `start_step`.
    pub fn open(run_dir: &Path, start_step: u64, max_steps: u64, quiet: bool) -> Result<Self> {
        let metrics_path = run_dir.join(METRICS_FILE);
        truncate_metrics(&metrics_path, start_step)?;
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("opening {}", metrics_path.display()))?;
        let tb_dir: PathBuf = run_dir.join(TENSORBOARD_DIR);
        std::fs::create_dir_all(&tb_dir).with_context(|| format!("creating {}", tb_dir.display()))?;
        let plain = !std::io::stderr().is_terminal();
        let progress = if plain || quiet {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::with_draw_target(Some(max_steps), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                    .expect("valid template"),
            );
            bar.set_position(start_step);
            bar.reset_eta();
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        };
        Ok(Self { tensorboard: SummaryWriter::new(&tb_dir), metrics, progress, plain, quiet })
    }

    pub fn scalar(&mut self, tag: &str, value: f64, step: u64) {
        self.tensorboard.add_scalar(tag, value as f32, step as usize);
    }

    /// Appends one JSON object to `metrics.jsonl` and flushes it (nothing lost on a crash).
    pub fn record(&mut self, record: Value) -> Result<()> {
        writeln!(self.metrics, "{record}").context("writing metrics.jsonl")?;
        self.metrics.flush().context("flushing metrics.jsonl")
    }

    /// Advances the bar; off a terminal, prints one line per call instead.
    pub fn progress(&mut self, step: u64, max_steps: u64, summary: &str) {
        if self.quiet {
        } else if self.plain {
            eprintln!("step {step}/{max_steps}  {summary}");
        } else {
            self.progress.set_position(step);
            self.progress.set_message(summary.to_string());
        }
    }

    pub fn tick(&self, step: u64) {
        if !self.plain && !self.quiet {
            self.progress.set_position(step);
        }
    }

    /// Prints a line without tearing the bar.
    pub fn message(&self, text: &str) {
        if self.quiet {
        } else if self.plain {
            eprintln!("{text}")
        } else {
            self.progress.println(text)
        }
    }

    pub fn flush(&mut self) {
        self.tensorboard.flush();
        let _ = self.metrics.flush();
    }

    pub fn finish(mut self) {
        self.flush();
        self.progress.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_drops_records_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        std::fs::write(&path, "{\"step\":1,\"loss\":3}\n{\"step\":2,\"eval_loss\":2}\n{\"step\":3,\"loss\":1}\n").unwrap();
        truncate_metrics(&path, 2).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(!text.contains("\"step\":3"));
    }
}
