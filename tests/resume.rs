//! Checkpoint and resume: N + resume + N steps equals 2N straight, bit for bit.

mod common;

use common::*;

/// Trains 8 steps straight and 3 + resume + 5 with the same extra `--set`s; asserts
/// bit-identical final weights and identical metrics records (losses, α values).
fn assert_resume_is_exact(sets: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let resumed = tmp.path().join("resumed");
    let cfg_straight = write_config(tmp.path(), "a.yaml", &tiny_text_config(&straight));
    let cfg_resumed = write_config(tmp.path(), "b.yaml", &tiny_text_config(&resumed));
    let with_sets = |mut args: Vec<String>| {
        for s in sets {
            args.extend(["--set".to_string(), s.to_string()]);
        }
        args
    };
    let args = |v: &[&str]| with_sets(v.iter().map(|s| s.to_string()).collect());
    let run_args = |a: Vec<String>| run(&a.iter().map(String::as_str).collect::<Vec<_>>()).ok();

    run_args(args(&["train", "--config", cfg_straight.to_str().unwrap(), "--quiet"]));
    // Stop at step 3: between checkpoints, so the resumed run must restore mid-schedule
    // state (LR and α schedules, dropout RNG and data cursor mid-epoch).
    run_args(args(&["train", "--config", cfg_resumed.to_str().unwrap(), "--quiet", "--stop-at-step", "3"]));
    assert_eq!(checkpoint_steps(&resumed), vec![2, 3]);
    run_args(args(&["resume", resumed.to_str().unwrap(), "--quiet"]));

    assert_eq!(checkpoint_steps(&straight), vec![2, 4, 6, 8]);
    let final_straight = tensors(&straight.join("checkpoints/step-8/model.safetensors"));
    let final_resumed = tensors(&resumed.join("checkpoints/step-8/model.safetensors"));
    assert_eq!(final_straight.len(), final_resumed.len());
    for ((name_a, a), (name_b, b)) in final_straight.iter().zip(&final_resumed) {
        assert_eq!(name_a, name_b);
        assert!(a == b, "tensor {name_a} differs after resume");
    }
    let losses = logged_losses(&straight);
    assert_eq!(losses.len(), 8);
    assert_eq!(losses, logged_losses(&resumed), "logged losses differ after resume");
    assert_eq!(logged_alphas(&straight), logged_alphas(&resumed), "α sequence differs after resume");
    // Something was learned and it was not a constant: the test can fail.
    assert!(losses.first().unwrap().1 > losses.last().unwrap().1);
}

#[test]
fn resumed_run_matches_uninterrupted_run_bit_for_bit() {
    assert_resume_is_exact(&[]);
}

#[test]
fn resumed_run_continues_the_alpha_schedule() {
    assert_resume_is_exact(&["model.ffn.unit=paglu", "model.ffn.alpha_mode=scheduler_cosine", "model.ffn.gate_norm=true"]);
    // And the learnable mode, whose α lives in the weights and the optimizer state.
    assert_resume_is_exact(&["model.ffn.unit=pamishu", "model.ffn.alpha_mode=learnable"]);
}

#[test]
fn gradient_checkpointing_resumes_exactly_and_trains_like_the_stored_activation_backward() {
    assert_resume_is_exact(&["training.gradient_checkpointing=true"]);
    // Without dropout both backwards compute the same function's gradient: the same losses
    // over 8 steps up to float rounding.
    let tmp = tempfile::tempdir().unwrap();
    let losses = |name: &str, checkpointing: bool| {
        let out = tmp.path().join(name);
        let cfg = write_config(tmp.path(), &format!("{name}.yaml"), &tiny_text_config(&out));
        let flag = format!("training.gradient_checkpointing={checkpointing}");
        run(&["train", "--config", cfg.to_str().unwrap(), "--quiet", "--set", "model.dropout=0.0", "--set", &flag]).ok();
        logged_losses(&out)
    };
    let (plain, recomputed) = (losses("plain", false), losses("recomputed", true));
    assert_eq!(plain.len(), 8);
    for ((step, a), (_, b)) in plain.iter().zip(&recomputed) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "step {step}: {a} vs {b}");
    }
}

#[test]
fn fine_tuning_a_pretrained_llama_resumes_exactly() {
    let llama = repo_root().join("tests/fixtures/tiny-llama");
    assert_resume_is_exact(&[&format!("model.pretrained={}", llama.display())]);
}

#[test]
fn chat_template_fine_tuning_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_chat_corpus(tmp.path());
    assert_resume_is_exact(&[
        &format!("data.train={}", corpus.display()),
        &format!("data.chat_template={}", qwen2_template().display()),
        "model.context_length=96",
    ]);
}

#[test]
fn packed_fine_tuning_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_chat_corpus(tmp.path());
    assert_resume_is_exact(&[
        &format!("data.train={}", corpus.display()),
        &format!("data.chat_template={}", qwen2_template().display()),
        "data.pack=true",
        "model.context_length=96",
    ]);
    // Prompt/reply records, with the backward recomputing each block over packed rows.
    let arithmetic = repo_root().join("data/arithmetic.jsonl");
    assert_resume_is_exact(&[
        &format!("data.train={}", arithmetic.display()),
        "data.pack=true",
        "training.gradient_checkpointing=true",
        "model.context_length=48",
    ]);
}

#[test]
fn lora_fine_tuning_resumes_exactly() {
    let llama = repo_root().join("tests/fixtures/tiny-llama");
    assert_resume_is_exact(&[
        &format!("model.pretrained={}", llama.display()),
        "lora.rank=4",
        "lora.dropout=0.1",
        "lora.target_modules=[q, v, gate]",
        "optimizer.learning_rate=1e-2",
    ]);
}

#[test]
fn resume_from_an_earlier_checkpoint_relogs_each_step_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), "c.yaml", &tiny_text_config(&out));
    run(&["train", "--config", cfg.to_str().unwrap(), "--quiet", "--stop-at-step", "5"]).ok();
    // Lose the step-5 checkpoint (as if the machine died before writing it).
    std::fs::remove_dir_all(out.join("checkpoints/step-5")).unwrap();
    run(&["train", "--config", cfg.to_str().unwrap(), "--quiet", "--resume"]).ok();
    let steps: Vec<u64> = logged_losses(&out).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());

    // TensorBoard too: the first process's step-5 points are in its event file, the resumed
    // process logs step 5 again; read as TensorBoard reads (SessionLog START purges), each
    // step shows once, with the resumed run's value.
    use polyburn::train::logging::{LoggedEvent, read_tensorboard};
    let shown = read_tensorboard(&out).unwrap();
    let loss_points: Vec<(u64, f32)> = shown
        .iter()
        .filter_map(|e| match e {
            LoggedEvent::Scalar { tag, step, value } if tag == "train/loss" => Some((*step, *value)),
            _ => None,
        })
        .collect();
    assert_eq!(loss_points.iter().map(|p| p.0).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    for ((step, shown), (logged_step, logged)) in loss_points.iter().zip(logged_losses(&out)) {
        assert_eq!(*step, logged_step);
        assert_eq!(*shown, logged as f32, "TensorBoard's step {step} is not the resumed run's");
    }
    // The resolved config and the model summary, once, at step 0.
    let texts: Vec<(&str, u64, &str)> = shown
        .iter()
        .filter_map(|e| match e {
            LoggedEvent::Text { tag, step, text } => Some((tag.as_str(), *step, text.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(texts.iter().any(|(tag, step, text)| *tag == "config/text_summary" && *step == 0 && text.contains("d_model")));
    assert!(texts.iter().any(|(tag, step, text)| *tag == "model/text_summary" && *step == 0 && text.contains("params")));
}

#[test]
fn interrupted_checkpoint_write_is_ignored_and_keep_last_prunes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), "d.yaml", &tiny_text_config(&out));
    run(&["train", "--config", cfg.to_str().unwrap(), "--quiet", "--stop-at-step", "4", "--set", "checkpoint.keep_last=1"])
        .ok();
    assert_eq!(checkpoint_steps(&out), vec![4]);
    // A crash while writing step 6: a half-written temp dir, and a final-looking dir without
    // its state.json. Neither counts as a checkpoint.
    let ckpts = out.join("checkpoints");
    std::fs::create_dir_all(ckpts.join("step-6.tmp")).unwrap();
    std::fs::write(ckpts.join("step-6.tmp/model.safetensors"), b"partial").unwrap();
    std::fs::create_dir_all(ckpts.join("step-7")).unwrap();
    std::fs::write(ckpts.join("step-7/model.safetensors"), b"partial").unwrap();
    let r = run(&["resume", out.to_str().unwrap(), "--set", "checkpoint.keep_last=1"]).ok();
    assert!(r.stderr().contains("resuming from step 4"), "{}", r.stderr());
    assert!(checkpoint_steps(&out).contains(&8));
    assert!(!out.join("checkpoints/step-4").exists(), "keep_last=1 prunes older checkpoints");
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), "e.yaml", &tiny_text_config(&out));
    let child = polyburn()
        .args(["train", "--config", cfg.to_str().unwrap(), "--set", "training.max_steps=100000"])
        .args(["--set", "checkpoint.every_steps=100000"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until training is under way (metrics appear), then interrupt.
    let metrics = out.join("metrics.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map(|s| s.lines().count()).unwrap_or(0) < 3 {
        assert!(start.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", String::from_utf8_lossy(&output.stderr));
    let steps = checkpoint_steps(&out);
    assert_eq!(steps.len(), 1, "one checkpoint written on interrupt");
    assert!(steps[0] >= 3);
    let logged = logged_losses(&out).last().unwrap().0;
    assert_eq!(logged, steps[0], "the checkpoint is at the last completed step");
}
