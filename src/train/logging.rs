//! Where training reports go: TensorBoard event files (`tb/`), `metrics.jsonl` (one JSON
//! object per log or eval step) and a progress bar that turns into plain lines off a TTY.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use tensorboard_proto::event::{Event, SessionLog, SessionLog_SessionStatus};
use tensorboard_proto::summary::{Summary, SummaryMetadata, SummaryMetadata_PluginData, Summary_Value};
use tensorboard_proto::tensor::TensorProto;
use tensorboard_proto::tensor_shape::{TensorShapeProto, TensorShapeProto_Dim};
use tensorboard_proto::types::DataType;
use tensorboard_rs::summary::scalar;
use tensorboard_rs::summary_writer::FileWriter;

pub const METRICS_FILE: &str = "metrics.jsonl";
/// Sampled replies with their rewards, a few per log step (sampling objectives only).
pub const SAMPLES_FILE: &str = "samples.jsonl";
pub const TENSORBOARD_DIR: &str = "tb";

pub struct RunLogger {
    tensorboard: FileWriter,
    metrics: File,
    /// Opened at the first sample (SFT runs write none).
    samples: Option<File>,
    samples_path: PathBuf,
    progress: ProgressBar,
    /// Plain progress lines instead of a bar (stderr is not a terminal).
    plain: bool,
    /// Nothing on stderr at all (tests, sweeps running in parallel); files are still written.
    quiet: bool,
}

/// Keeps only the records at or before `step`: a run resumed from an earlier checkpoint
/// re-logs the later steps, and each step must appear once.
fn truncate_jsonl(path: &Path, step: u64) -> Result<()> {
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
        truncate_jsonl(&metrics_path, start_step)?;
        let samples_path = run_dir.join(SAMPLES_FILE);
        truncate_jsonl(&samples_path, start_step)?;
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
        let mut tensorboard = FileWriter::new(&tb_dir);
        if start_step > 0 {
            // The previous process may have logged steps past the checkpoint before it died;
            // they are logged again now. TensorBoard drops every earlier point at or after
            // a SessionLog START's step (its "purge orphaned data"), so each step shows once.
            tensorboard.add_event(&session_start(), start_step as usize + 1);
            tensorboard.flush();
        }
        Ok(Self { tensorboard, metrics, samples: None, samples_path, progress, plain, quiet })
    }

    pub fn scalar(&mut self, tag: &str, value: f64, step: u64) {
        self.tensorboard.add_summary(scalar(tag, value as f32), step as usize);
    }

    /// A text summary (TensorBoard's Text tab renders it as Markdown).
    pub fn text(&mut self, tag: &str, text: &str, step: u64) {
        self.tensorboard.add_summary(text_summary(tag, text), step as usize);
    }

    /// Appends one JSON object to `metrics.jsonl` and flushes it (nothing lost on a crash).
    pub fn record(&mut self, record: Value) -> Result<()> {
        writeln!(self.metrics, "{record}").context("writing metrics.jsonl")?;
        self.metrics.flush().context("flushing metrics.jsonl")
    }

    /// Appends `samples` to `samples.jsonl` as `{"step", "prompt", "reply", "reward"}` lines.
    pub fn samples(&mut self, step: u64, samples: &[crate::train::objective::sampling::ReplySample]) -> Result<()> {
        if samples.is_empty() {
            return Ok(());
        }
        if self.samples.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.samples_path)
                .with_context(|| format!("opening {}", self.samples_path.display()))?;
            self.samples = Some(file);
        }
        let file = self.samples.as_mut().expect("just opened");
        for s in samples {
            let line = serde_json::json!({"step": step, "prompt": s.prompt, "reply": s.reply, "reward": s.reward});
            writeln!(file, "{line}").context("writing samples.jsonl")?;
        }
        file.flush().context("flushing samples.jsonl")
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

fn session_start() -> Event {
    let mut log = SessionLog::new();
    log.set_status(SessionLog_SessionStatus::START);
    let mut event = Event::new();
    event.set_session_log(log);
    event
}

/// The text plugin's summary: a string tensor of one element, tagged `<tag>/text_summary`
/// as PyTorch's `SummaryWriter.add_text` writes it.
fn text_summary(tag: &str, text: &str) -> Summary {
    let mut plugin = SummaryMetadata_PluginData::new();
    plugin.set_plugin_name("text".into());
    let mut metadata = SummaryMetadata::new();
    metadata.set_plugin_data(plugin);
    let mut dim = TensorShapeProto_Dim::new();
    dim.set_size(1);
    let mut shape = TensorShapeProto::new();
    shape.mut_dim().push(dim);
    let mut tensor = TensorProto::new();
    tensor.set_dtype(DataType::DT_STRING);
    tensor.set_tensor_shape(shape);
    tensor.mut_string_val().push(text.as_bytes().to_vec());
    let mut value = Summary_Value::new();
    value.set_tag(format!("{tag}/text_summary"));
    value.set_metadata(metadata);
    value.set_tensor(tensor);
    let mut summary = Summary::new();
    summary.mut_value().push(value);
    summary
}

/// One event read back from a run's `tb/` files.
#[derive(Debug, Clone, PartialEq)]
pub enum LoggedEvent {
    Scalar { tag: String, step: u64, value: f32 },
    Text { tag: String, step: u64, text: String },
}

/// What TensorBoard shows for a run directory's `tb/`: every event file in name order (the
/// order TensorBoard loads them), a SessionLog START at step s discarding the points before it
/// with step ≥ s (`EventAccumulator`'s purge for file version 2).
pub fn read_tensorboard(run_dir: &Path) -> Result<Vec<LoggedEvent>> {
    use protobuf::Message;
    let dir = run_dir.join(TENSORBOARD_DIR);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains("tfevents")))
        .collect();
    files.sort();
    let mut shown: Vec<LoggedEvent> = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let mut at = 0;
        // TFRecord framing: u64 length, u32 crc of it, the bytes, u32 crc of them.
        while at + 12 <= bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let Some(data) = bytes.get(at + 12..at + 12 + len) else { break };
            at += 16 + len;
            let event = Event::parse_from_bytes(data).with_context(|| format!("a corrupt record in {}", file.display()))?;
            let step = event.get_step().max(0) as u64;
            if event.has_session_log() && event.get_session_log().get_status() == SessionLog_SessionStatus::START {
                shown.retain(|e| match e {
                    LoggedEvent::Scalar { step: s, .. } | LoggedEvent::Text { step: s, .. } => *s < step,
                });
            }
            for v in event.get_summary().get_value() {
                let tag = v.get_tag().to_string();
                if v.has_tensor() {
                    let text = v.get_tensor().get_string_val().iter().map(|b| String::from_utf8_lossy(b)).collect();
                    shown.push(LoggedEvent::Text { tag, step, text });
                } else {
                    shown.push(LoggedEvent::Scalar { tag, step, value: v.get_simple_value() });
                }
            }
        }
    }
    Ok(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_drops_records_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        std::fs::write(&path, "{\"step\":1,\"loss\":3}\n{\"step\":2,\"eval_loss\":2}\n{\"step\":3,\"loss\":1}\n").unwrap();
        truncate_jsonl(&path, 2).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(!text.contains("\"step\":3"));
    }
}
