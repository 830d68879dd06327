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
