//! Grid sweeps: one training run per combination of config values, each in its own run
//! directory, resumable, optionally in parallel, with a summary report and an eval-loss plot.
//!
//! ```yaml
//! base: tiny.yaml                 # training config, relative to this file
//! name: pagating_sweep            # optional (default: this file's stem)
//! output_dir: runs/pagating_sweep # optional (default: runs/<name>)
//! set: {model.ffn.unit: paglu}    # optional overrides for every run
//! grid:                           # any config fields; runs are the cartesian product
//!   model.ffn.alpha_mode: [static_0.0, learnable, scheduler_cosine]
//!   optimizer.learning_rate: [5.0e-4, 1.0e-3]
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_yaml::Value;

use crate::config::Config;
use crate::plot::{Series, eval_loss_plot};
use crate::train::checkpoint;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    base: PathBuf,
    name: Option<String>,
    output_dir: Option<PathBuf>,
    #[serde(default)]
    set: serde_yaml::Mapping,
    grid: serde_yaml::Mapping,
}

/// One combination of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRun {
    /// Directory name, built from the grid values (`scheduler_cosine_lr0.001`).
    pub name: String,
    pub dir: PathBuf,
    /// Every `field=value` override of this run, sweep-wide ones first.
    pub overrides: Vec<String>,
    pub max_steps: u64,
}

#[derive(Debug, Clone)]
pub struct Sweep {
    pub base: PathBuf,
    pub output_dir: PathBuf,
    /// Grid field names in file order (the report's columns).
    pub axes: Vec<String>,
    pub runs: Vec<SweepRun>,
}

/// YAML scalar as it should appear after `--set field=`.
fn scalar_text(value: &Value) -> Result<String> {
    Ok(match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => serde_yaml::to_string(other)?.trim().replace('\n', " "),
    })
}

/// The part of a run name one grid value contributes: strings stand for themselves, other
/// values get a short field prefix (`lr0.001`, `batch_size16`).
fn label(field: &str, value: &Value, text: &str) -> String {
    let key = field.rsplit('.').next().unwrap_or(field);
    let short = match key {
        "learning_rate" => "lr",
        "weight_decay" => "wd",
        other => other,
    };
    let raw = match value {
        Value::String(_) => text.to_string(),
        _ => format!("{short}{text}"),
    };
    raw.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}

impl Sweep {
    /// Reads a sweep file and expands its grid; every run's config is validated up front so
    /// a bad grid value fails before anything trains.
    pub fn load(path: &Path, cli_overrides: &[String], output_dir: Option<&Path>) -> Result<Sweep> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading sweep file {}", path.display()))?;
        let file: SweepFile =
            serde_yaml::from_str(&text).with_context(|| format!("parsing sweep file {}", path.display()))?;
        let here = path.parent().unwrap_or(Path::new("."));
        // `base` is relative to the sweep file (an absolute path stays as it is).
        let base = here.join(&file.base);
        let name = file
            .name
            .clone()
            .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or("sweep".into()));
        let output_dir = output_dir
            .map(Path::to_path_buf)
            .or(file.output_dir.clone())
            .unwrap_or_else(|| PathBuf::from("runs").join(&name));

        let mut shared = Vec::new();
        for (k, v) in &file.set {
            shared.push(format!("{}={}", scalar_text(k)?, scalar_text(v)?));
        }
        shared.extend(cli_overrides.iter().cloned());

        let mut axes: Vec<(String, Vec<Value>)> = Vec::new();
        for (k, v) in &file.grid {
            let field = scalar_text(k)?;
            let values = match v {
                Value::Sequence(values) if !values.is_empty() => values.clone(),
                _ => bail!("{}: grid.{field}: expected a non-empty list of values", path.display()),
            };
            axes.push((field, values));
        }
        if axes.is_empty() {
            bail!("{}: grid: expected at least one field", path.display());
        }

        // Cartesian product, first axis outermost.
        let mut combos: Vec<Vec<(String, Value)>> = vec![Vec::new()];
        for (field, values) in &axes {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((field.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        let mut runs = Vec::new();
        for combo in combos {
            let mut overrides = shared.clone();
            let mut labels = Vec::new();
            for (field, value) in &combo {
                let text = scalar_text(value)?;
                labels.push(label(field, value, &text));
                overrides.push(format!("{field}={text}"));
            }
            let name = labels.join("_");
            let dir = output_dir.join(&name);
            overrides.push(format!("run.name={name}"));
            overrides.push(format!("run.output_dir={}", dir.display()));
            let config = Config::load(&base, &overrides).with_context(|| format!("sweep run `{name}`"))?;
            runs.push(SweepRun { name, dir, overrides, max_steps: config.training.max_steps as u64 });
        }
        let mut names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        names.sort();
        if names.windows(2).any(|w| w[0] == w[1]) {
            bail!("{}: two grid combinations give the same run name", path.display());
        }
        Ok(Sweep { base, output_dir, axes: axes.into_iter().map(|(f, _)| f).collect(), runs })
    }
}

/// Where a run stands before the sweep starts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Finished,
    /// Has a checkpoint before its last step: it resumes from there.
    Interrupted(u64),
    New,
}

pub fn run_status(run: &SweepRun) -> Result<RunStatus> {
    Ok(match checkpoint::latest_checkpoint(&run.dir)? {
        Some(c) if c.step >= run.max_steps => RunStatus::Finished,
        Some(c) => RunStatus::Interrupted(c.step),
        None => RunStatus::New,
    })
}

/// The `polyburn train` arguments that train (or resume) `run` on its own.
fn train_args(sweep: &Sweep, run: &SweepRun) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["train".into(), "--config".into(), sweep.base.clone().into(), "--resume".into(), "--quiet".into()];
    for o in &run.overrides {
        args.push("--set".into());
        args.push(o.into());
    }
    args
}

fn spawn(exe: &Path, sweep: &Sweep, run: &SweepRun) -> Result<Child> {
    std::fs::create_dir_all(&run.dir).with_context(|| format!("creating {}", run.dir.display()))?;
    // Appended, not truncated: a second sweep on the same directory must not wipe the log of
    // a run another process is training.
    let log = std::fs::OpenOptions::new().create(true).append(true).open(run.dir.join("train.log"))?;
    let mut cmd = Command::new(exe);
    cmd.args(train_args(sweep, run));
    cmd.stdout(log.try_clone()?).stderr(log).stdin(Stdio::null());
    cmd.spawn().with_context(|| format!("starting run {}", run.name))
}

/// `'…'`-quoted for a POSIX shell.
fn shell_quote(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// One self-contained shell command per unfinished run (`sweep --list`): each trains or
/// resumes its run with absolute paths, so a scheduler can start them anywhere that sees the
/// same files. Runs that two schedulers start twice are safe: the second waits for nothing and
/// exits with status 75 while the first holds the run's lock.
pub fn pending_commands(sweep: &Sweep, exe: &Path) -> Result<Vec<String>> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let mut lines = Vec::new();
    for run in &sweep.runs {
        if run_status(run)? == RunStatus::Finished {
            continue;
        }
        let mut words = vec![shell_quote(&exe.to_string_lossy())];
        words.extend(train_args(sweep, run).iter().map(|a| shell_quote(&a.to_string_lossy())));
        lines.push(format!("cd {} && {}", shell_quote(&cwd.to_string_lossy()), words.join(" ")));
    }
    Ok(lines)
}

/// Runs every unfinished combination, `jobs` at a time, each as its own `polyburn train`
/// process (separate processes keep their RNG streams apart). Returns the failed runs' names.
pub fn run_sweep(sweep: &Sweep, jobs: usize) -> Result<Vec<String>> {
    let exe = std::env::current_exe().context("locating the polyburn executable")?;
    let total = sweep.runs.len();
    let mut pending = Vec::new();
    for (i, run) in sweep.runs.iter().enumerate() {
        match run_status(run)? {
            RunStatus::Finished => eprintln!("[{}/{total}] {}: finished earlier, skipped", i + 1, run.name),
            RunStatus::Interrupted(step) => {
                eprintln!("[{}/{total}] {}: resumes from step {step}", i + 1, run.name);
                pending.push(i);
            }
            RunStatus::New => pending.push(i),
        }
    }
    let mut running: Vec<(usize, Child)> = Vec::new();
    let mut failed = Vec::new();
    let mut next = pending.into_iter();
    loop {
        while running.len() < jobs.max(1) && !crate::train::interrupted() {
            let Some(i) = next.next() else { break };
            // Another process sharing the directory may have finished it meanwhile.
            if run_status(&sweep.runs[i])? == RunStatus::Finished {
                eprintln!("[{}/{total}] {}: finished elsewhere, skipped", i + 1, sweep.runs[i].name);
                continue;
            }
            eprintln!("[{}/{total}] {}: started", i + 1, sweep.runs[i].name);
            running.push((i, spawn(&exe, sweep, &sweep.runs[i])?));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut still = Vec::new();
        for (i, mut child) in running {
            match child.try_wait()? {
                None => still.push((i, child)),
                Some(status) => {
                    let run = &sweep.runs[i];
                    if status.success() {
                        eprintln!("[{}/{total}] {}: done", i + 1, run.name);
                    } else if status.code() == Some(crate::train::trainer::RUN_LOCKED_EXIT as i32) {
                        eprintln!("[{}/{total}] {}: being trained by another process, skipped", i + 1, run.name);
                    } else {
                        eprintln!("[{}/{total}] {}: FAILED ({status}); see {}", i + 1, run.name, run.dir.join("train.log").display());
                        failed.push(run.name.clone());
                    }
                }
            }
        }
        running = still;
    }
    Ok(failed)
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub name: String,
    pub values: Vec<String>,
    pub steps: u64,
    pub final_train_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub best_eval_step: Option<u64>,
    pub tokens_per_sec: Option<f64>,
    pub wall_seconds: Option<f64>,
    pub final_alpha: Vec<f64>,
    /// `(step, eval_loss)` for the plot.
    pub eval_curve: Vec<(u64, f64)>,
    /// The last held-out sampling evaluation (`training.eval_generate_every`): `eval/pass@1`,
    /// `eval/coverage@10`, ... in logged order.
    pub final_generation_eval: Vec<(String, f64)>,
}

fn summarize(run: &SweepRun, axes: &[String]) -> Result<RunSummary> {
    let values = axes
        .iter()
        .map(|a| {
            run.overrides.iter().rev().find_map(|o| o.strip_prefix(&format!("{a}="))).unwrap_or("").to_string()
        })
        .collect();
    let mut s = RunSummary {
        name: run.name.clone(),
        values,
        steps: 0,
        final_train_loss: None,
        final_eval_loss: None,
        best_eval_loss: None,
        best_eval_step: None,
        tokens_per_sec: None,
        wall_seconds: None,
        final_alpha: Vec::new(),
        eval_curve: Vec::new(),
        final_generation_eval: Vec::new(),
    };
    let metrics = run.dir.join(crate::train::logging::METRICS_FILE);
    let mut tps = Vec::new();
    if let Ok(text) = std::fs::read_to_string(&metrics) {
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let step = v["step"].as_u64().unwrap_or(0);
            if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
                s.final_train_loss = Some(l);
                s.steps = s.steps.max(step);
            }
            if let Some(t) = v.get("tokens_per_sec").and_then(|t| t.as_f64()) {
                tps.push(t);
            }
            if let Some(a) = v.get("alpha").and_then(|a| a.as_array()) {
                s.final_alpha = a.iter().filter_map(|x| x.as_f64()).collect();
            }
            if let Some(record) = v.as_object().filter(|o| o.contains_key("eval/pass@1")) {
                s.final_generation_eval =
                    record.iter().filter(|(k, _)| k.starts_with("eval/")).filter_map(|(k, x)| Some((k.clone(), x.as_f64()?))).collect();
            }
            if let Some(e) = v.get("eval_loss").and_then(|e| e.as_f64()) {
                s.final_eval_loss = Some(e);
                s.eval_curve.push((step, e));
                if s.best_eval_loss.is_none_or(|b| e < b) {
                    s.best_eval_loss = Some(e);
                    s.best_eval_step = Some(step);
                }
            }
        }
    }
    if !tps.is_empty() {
        s.tokens_per_sec = Some(tps.iter().sum::<f64>() / tps.len() as f64);
    }
    if let Some(c) = checkpoint::latest_checkpoint(&run.dir)? {
        s.wall_seconds = Some(c.state()?.train_seconds);
    }
    Ok(s)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// Writes `summary.md`, `summary.csv` and `eval_loss.png` into the sweep directory.
pub fn write_report(sweep: &Sweep) -> Result<Vec<RunSummary>> {
    let rows: Vec<RunSummary> = sweep.runs.iter().map(|r| summarize(r, &sweep.axes)).collect::<Result<_>>()?;
    std::fs::create_dir_all(&sweep.output_dir)?;
    let alphas = |r: &RunSummary| r.final_alpha.iter().map(|a| format!("{a:.3}")).collect::<Vec<_>>().join(" ");

    // One list of cells per run, shared by the CSV (full precision) and the markdown table.
    let cells = |r: &RunSummary, digits: usize| {
        let mut c = vec![r.name.clone()];
        c.extend(r.values.iter().cloned());
        c.extend([
            r.steps.to_string(),
            opt(r.final_train_loss, digits),
            opt(r.final_eval_loss, digits),
            opt(r.best_eval_loss, digits),
            r.best_eval_step.map_or("-".into(), |s| s.to_string()),
            opt(r.tokens_per_sec, 1),
            opt(r.wall_seconds, 1),
            alphas(r),
        ]);
        c
    };
    // The held-out sampling metrics any run logged, each a column.
    let mut eval_keys: Vec<String> = Vec::new();
    for (k, _) in rows.iter().flat_map(|r| &r.final_generation_eval) {
        if !eval_keys.contains(k) {
            eval_keys.push(k.clone());
        }
    }
    let eval_value = |r: &RunSummary, key: &str| r.final_generation_eval.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
    let cells = |r: &RunSummary, digits: usize| {
        let mut c = cells(r, digits);
        c.extend(eval_keys.iter().map(|k| opt(eval_value(r, k), digits)));
        c
    };
    let columns = ["steps", "final_train_loss", "final_eval_loss", "best_eval_loss", "best_eval_step", "tokens_per_sec", "wall_seconds", "final_alpha"];
    let header: Vec<String> = std::iter::once("run".to_string())
        .chain(sweep.axes.iter().cloned())
        .chain(columns.iter().map(|c| c.to_string()))
        .chain(eval_keys.iter().cloned())
        .collect();

    let mut csv = header.join(",") + "\n";
    for r in &rows {
        csv.push_str(&(cells(r, 6).join(",") + "\n"));
    }
    crate::weights::write_file_atomic(&sweep.output_dir.join("summary.csv"), csv.as_bytes())?;

    let mut md = format!(
        "# Sweep `{}`\n\nBase config: `{}`. Sorted by best eval loss (lower is better). `final_alpha` lists each layer's α at the end (gated FFNs only).\n\n",
        sweep.output_dir.display(),
        sweep.base.display()
    );
    md.push_str(&format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len())));
    let mut sorted: Vec<&RunSummary> = rows.iter().collect();
    sorted.sort_by(|a, b| a.best_eval_loss.unwrap_or(f64::INFINITY).total_cmp(&b.best_eval_loss.unwrap_or(f64::INFINITY)));
    for r in sorted {
        md.push_str(&format!("| {} |\n", cells(r, 4).join(" | ")));
    }
    md.push_str(&over_seeds(sweep, &rows, &eval_keys));
    md.push_str("\nEval-loss curves: `eval_loss.png`. Per-run logs: `<run>/metrics.jsonl`, `<run>/tb/`, `<run>/train.log`.\n");
    crate::weights::write_file_atomic(&sweep.output_dir.join("summary.md"), md.as_bytes())?;
    let curves: Vec<Series> = rows.iter().map(|r| Series { name: r.name.clone(), points: r.eval_curve.clone() }).collect();
    eval_loss_plot(&curves, &sweep.output_dir.join("eval_loss.png"))?;
    Ok(rows)
}

/// With `run.seed` on the grid: per combination of the other axes, mean ± std over the seeds
/// of the final eval loss and of each held-out sampling metric (empty without a seed axis).
fn over_seeds(sweep: &Sweep, rows: &[RunSummary], eval_keys: &[String]) -> String {
    let Some(seed_axis) = sweep.axes.iter().position(|a| a == "run.seed") else { return String::new() };
    let others: Vec<usize> = (0..sweep.axes.len()).filter(|&i| i != seed_axis).collect();
    let mut groups: Vec<(Vec<String>, Vec<&RunSummary>)> = Vec::new();
    for r in rows {
        let key: Vec<String> = others.iter().map(|&i| r.values[i].clone()).collect();
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    let metrics: Vec<String> = std::iter::once("final_eval_loss".to_string()).chain(eval_keys.iter().cloned()).collect();
    let value = |r: &RunSummary, m: &str| match m {
        "final_eval_loss" => r.final_eval_loss,
        key => r.final_generation_eval.iter().find(|(k, _)| k == key).map(|(_, v)| *v),
    };
    let mut header: Vec<String> = others.iter().map(|&i| sweep.axes[i].clone()).collect();
    header.push("seeds".into());
    header.extend(metrics.iter().cloned());
    let mut md = format!(
        "\n## Over seeds\n\nMean ± standard deviation over the `run.seed` values of each run's final evaluation \
         (runs that have not logged a metric are left out of its cell).\n\n| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for (key, members) in &groups {
        let mut cells = key.clone();
        cells.push(members.len().to_string());
        for m in &metrics {
            let v: Vec<f64> = members.iter().filter_map(|r| value(r, m)).collect();
            cells.push(match v.len() {
                0 => "-".into(),
                n => {
                    let mean = v.iter().sum::<f64>() / n as f64;
                    let std = if n > 1 { (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt() } else { 0.0 };
                    format!("{mean:.3} ± {std:.3} (n={n})")
                }
            });
        }
        md.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(name: &str, objective: &str, seed: &str, pass1: Option<f64>) -> RunSummary {
        RunSummary {
            name: name.into(),
            values: vec![objective.into(), seed.into()],
            steps: 10,
            final_train_loss: None,
            final_eval_loss: Some(1.0),
            best_eval_loss: None,
            best_eval_step: None,
            tokens_per_sec: None,
            wall_seconds: None,
            final_alpha: Vec::new(),
            eval_curve: Vec::new(),
            final_generation_eval: pass1.map(|p| vec![("eval/pass@1".to_string(), p)]).unwrap_or_default(),
        }
    }

    #[test]
    fn report_over_seeds_gives_mean_and_std_per_objective() {
        let sweep = Sweep { base: "b.yaml".into(), output_dir: "out".into(), axes: vec!["objective.type".into(), "run.seed".into()], runs: vec![] };
        let rows = vec![
            summary("a1", "grpo", "1", Some(0.2)),
            summary("a2", "grpo", "2", Some(0.4)),
            summary("b1", "polychromic_rl", "1", Some(0.5)),
            summary("b2", "polychromic_rl", "2", None),
        ];
        let md = over_seeds(&sweep, &rows, &["eval/pass@1".to_string()]);
        // grpo: mean 0.3, sample std √0.02 = 0.141.
        assert!(md.contains("| grpo | 2 | 1.000 ± 0.000 (n=2) | 0.300 ± 0.141 (n=2) |"), "{md}");
        assert!(md.contains("| polychromic_rl | 2 | 1.000 ± 0.000 (n=2) | 0.500 ± 0.000 (n=1) |"), "{md}");
        let no_seeds = Sweep { axes: vec!["objective.type".into()], ..sweep };
        assert_eq!(over_seeds(&no_seeds, &rows, &[]), "");
    }

    #[test]
    fn run_names_follow_grid_values() {
        let lr = Value::Number(serde_yaml::Number::from(0.001));
        assert_eq!(label("optimizer.learning_rate", &lr, "0.001"), "lr0.001");
        let mode = Value::String("scheduler_cosine".into());
        assert_eq!(label("model.ffn.alpha_mode", &mode, "scheduler_cosine"), "scheduler_cosine");
        let bs = Value::Number(serde_yaml::Number::from(16));
        assert_eq!(label("training.batch_size", &bs, "16"), "batch_size16");
    }
}
