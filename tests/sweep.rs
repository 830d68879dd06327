//! `polyburn sweep`: grid expansion, run naming, resumability, parallel jobs and the report.

mod common;

use common::*;

#[test]
fn sweep_runs_the_grid_resumes_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let base = write_config(tmp.path(), "base.yaml", &tiny_text_config(&tmp.path().join("unused")));
    let sweep_file = write_config(
        tmp.path(),
        "grid.yaml",
        &format!(
            "base: {}\nset:\n  model.ffn.unit: paglu\n  training.max_steps: 4\n  checkpoint.keep_last: 0\n\
             grid:\n  model.ffn.alpha_mode: [static_0.5, scheduler_cosine]\n  optimizer.learning_rate: [5.0e-4, 1.0e-3]\n",
            base.display()
        ),
    );
    let out = tmp.path().join("sweep-out");
    let sweep = |extra: &[&str]| {
        let mut args = vec!["sweep", sweep_file.to_str().unwrap(), "--output-dir", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        run(&args).ok()
    };
    sweep(&["--jobs", "2", "--set", "model.dropout=0.0"]);
    let names = ["static_0.5_lr0.0005", "static_0.5_lr0.001", "scheduler_cosine_lr0.0005", "scheduler_cosine_lr0.001"];
    for name in names {
        assert_eq!(checkpoint_steps(&out.join(name)).last(), Some(&4), "{name} finished");
        let config = std::fs::read_to_string(out.join(name).join("config.yaml")).unwrap();
        assert!(config.contains("dropout: 0.0"), "--set applies to every run");
    }
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(csv.starts_with("run,model.ffn.alpha_mode,optimizer.learning_rate,"), "{csv}");
    let cosine = csv.lines().find(|l| l.starts_with("scheduler_cosine_lr0.001,")).unwrap();
    // α after 4 of 4 cosine steps is alpha_min = 0 in both layers.
    assert!(cosine.ends_with(",0.000 0.000"), "{cosine}");
    assert!(std::fs::read_to_string(out.join("summary.md")).unwrap().contains("| static_0.5_lr0.001 |"));
    let png = std::fs::read(out.join("eval_loss.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");

    // Interrupt one run (its last checkpoint lost): the next sweep skips the finished runs
    // and resumes that one from its checkpoint.
    let victim = out.join("static_0.5_lr0.001");
    std::fs::remove_dir_all(victim.join("checkpoints/step-4")).unwrap();
    let r = run(&["sweep", sweep_file.to_str().unwrap(), "--output-dir", out.to_str().unwrap(), "--set", "model.dropout=0.0"]).ok();
    assert_eq!(r.stderr().matches("finished earlier, skipped").count(), 3, "{}", r.stderr());
    assert!(r.stderr().contains("static_0.5_lr0.001: resumes from step 2"), "{}", r.stderr());
    assert_eq!(checkpoint_steps(&victim).last(), Some(&4));
    let steps: Vec<u64> = logged_losses(&victim).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);

    std::fs::remove_file(out.join("summary.md")).unwrap();
    sweep(&["--report", "--set", "model.dropout=0.0"]);
    assert!(out.join("summary.md").exists());
}

#[test]
fn bad_grid_values_fail_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let base = write_config(tmp.path(), "base.yaml", &tiny_text_config(&tmp.path().join("unused")));
    let sweep_file = write_config(
        tmp.path(),
        "grid.yaml",
        &format!("base: {}\ngrid:\n  model.ffn.alpha_mode: [static_0.5, static_7]\n", base.display()),
    );
    let out = tmp.path().join("o");
    let r = run(&["sweep", sweep_file.to_str().unwrap(), "--output-dir", out.to_str().unwrap()]).fails();
    assert!(r.stderr().contains("model.ffn.alpha_mode"), "{}", r.stderr());
    assert!(!out.exists());
}

/// A 3-run grid of `steps` steps each in `tmp`; returns (sweep file, output dir, run names).
fn small_grid(tmp: &std::path::Path, steps: u64) -> (std::path::PathBuf, std::path::PathBuf, [&'static str; 3]) {
    let base = write_config(tmp, "base.yaml", &tiny_text_config(&tmp.join("unused")));
    let sweep_file = write_config(
        tmp,
        "grid.yaml",
        &format!(
            "base: {}\nset:\n  training.max_steps: {steps}\n  training.eval_every: 0\n  checkpoint.every_steps: 2\n\
             grid:\n  optimizer.learning_rate: [1.0e-3, 2.0e-3, 3.0e-3]\n",
            base.display()
        ),
    );
    (sweep_file, tmp.join("out"), ["lr0.001", "lr0.002", "lr0.003"])
}

/// Logged training steps of a run, in file order.
fn logged_steps(run_dir: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn two_sweeps_started_together_train_every_run_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (sweep_file, out, names) = small_grid(tmp.path(), 6);
    let start = || {
        polyburn()
            .args(["sweep", sweep_file.to_str().unwrap(), "--output-dir", out.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    for child in [a, b] {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    for name in names {
        let dir = out.join(name);
        assert_eq!(checkpoint_steps(&dir).last(), Some(&6), "{name} finished");
        assert_eq!(logged_steps(&dir), (1..=6).collect::<Vec<u64>>(), "{name}: every step trained and logged once");
    }
}

#[test]
fn a_locked_run_refuses_a_second_trainer_with_status_75() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let held = polyburn::train::trainer::lock_run(&run_dir).unwrap();
    let config = write_config(tmp.path(), "c.yaml", &tiny_text_config(&run_dir));
    let r = run(&["train", "--config", config.to_str().unwrap(), "--quiet"]).fails();
    assert_eq!(r.output.status.code(), Some(75));
    assert!(r.stderr().contains("another polyburn process is training this run"), "{}", r.stderr());
    drop(held);
    run(&["train", "--config", config.to_str().unwrap(), "--quiet"]).ok();
}

#[test]
fn sweep_list_prints_one_command_per_unfinished_run_and_each_trains_its_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (sweep_file, out, names) = small_grid(tmp.path(), 2);
    let list = || {
        let r = run(&["sweep", sweep_file.to_str().unwrap(), "--output-dir", out.to_str().unwrap(), "--list"]).ok();
        r.stdout().lines().map(str::to_string).collect::<Vec<_>>()
    };
    let lines = list();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines.iter().all(|l| l.contains(" train --config ") && l.contains(" --resume ")), "{lines:?}");
    assert!(!out.join(names[0]).join("checkpoints").exists(), "--list trains nothing");
    let status = std::process::Command::new("sh").arg("-c").arg(&lines[0]).status().unwrap();
    assert!(status.success());
    assert_eq!(checkpoint_steps(&out.join(names[0])).last(), Some(&2));
    assert_eq!(list().len(), 2, "the finished run is no longer listed");
}
