//! Sampling objectives end to end through the binary: generation of N replies, grpo /
//! polychromic_rl / polychromic_regularized training (exact resume included), `eval`.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A small demo-task config: 2 supervised steps, then the objective under test.
fn demo_config(dir: &Path, name: &str, objective: &str, extra: &str) -> (PathBuf, PathBuf) {
    let out = dir.join(name);
    let root = repo_root();
    let yaml = format!(
        "run: {{name: {name}, output_dir: {out}, seed: 5}}\n\
         data: {{train: {root}/data/category_letters/train.jsonl, validation: {root}/data/category_letters/validation.jsonl, tokenizer: char}}\n\
         model: {{d_model: 32, n_layers: 2, n_heads: 2, context_length: 32}}\n\
         optimizer: {{learning_rate: 3.0e-3, warmup_steps: 1}}\n\
         training: {{max_steps: 6, batch_size: 3, eval_every: 3, eval_batches: 1, log_every: 1}}\n\
         checkpoint: {{every_steps: 2, keep_last: 0}}\n\
         objective: {{type: {objective}, sft_steps: 2, n_samples: 3, n_sets: 2, diversity: lcs, \
                      sampling: {{max_new_tokens: 8}}{extra}}}\n",
        out = out.display(),
        root = root.display(),
    );
    (write_config(dir, &format!("{name}.yaml"), &yaml), out)
}

fn metric_series(run_dir: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap().get(key)?.as_f64())
        .collect()
}

#[test]
fn grpo_with_kl_penalty_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = ", kl_beta: 0.1, rewards: [{type: verifier}, {type: length, min_chars: 2, max_chars: 8, weight: 0.5}]";
    let (straight_cfg, straight) = demo_config(tmp.path(), "straight", "grpo", extra);
    let (resumed_cfg, resumed) = demo_config(tmp.path(), "resumed", "grpo", extra);
    run(&["train", "--config", straight_cfg.to_str().unwrap(), "--quiet"]).ok();
    run(&["train", "--config", resumed_cfg.to_str().unwrap(), "--quiet", "--stop-at-step", "3"]).ok();
    run(&["resume", resumed.to_str().unwrap(), "--quiet"]).ok();
    // The initial policy (for the KL penalty) is checkpointed once sampling has started.
    assert!(straight.join("checkpoints/step-4/reference_model.safetensors").exists());
    assert!(!straight.join("checkpoints/step-2/reference_model.safetensors").exists());
    let (a, b) = (tensors(&straight.join("checkpoints/step-6/model.safetensors")), tensors(&resumed.join("checkpoints/step-6/model.safetensors")));
    assert!(a == b, "weights differ after resume");
    for key in ["loss", "train/reward_mean", "train/kl", "train/diversity", "train/quality_loss"] {
        let s = metric_series(&straight, key);
        assert_eq!(s, metric_series(&resumed, key), "{key} differs after resume");
        if key != "loss" {
            assert_eq!(s.len(), 4, "{key}: logged at each sampling step");
        }
    }
    let kl = metric_series(&straight, "train/kl");
    assert_eq!(kl[0], 0.0, "the first sampling step is the reference policy itself");
    assert!(kl[1..].iter().any(|&k| k > 0.0), "the policy moves away from the reference: {kl:?}");
    for key in ["perf/generate_ms", "perf/forward_ms", "perf/backward_ms", "perf/diversity_ms"] {
        assert_eq!(metric_series(&straight, key).len(), 4, "{key}");
    }
    // samples.jsonl: a few replies per sampling step with their rewards, the same after a
    // resume (the resumed process drops what the first logged past its checkpoint).
    let samples = |dir: &std::path::Path| std::fs::read_to_string(dir.join("samples.jsonl")).unwrap();
    let written = samples(&straight);
    assert_eq!(written, samples(&resumed), "samples.jsonl differs after resume");
    let records: Vec<serde_json::Value> = written.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: std::collections::BTreeSet<u64> = records.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps.len(), 4, "one group of samples per sampling step: {steps:?}");
    for r in &records {
        assert!(r["prompt"].as_str().is_some_and(|p| !p.is_empty()), "{r}");
        assert!(r["reply"].is_string() && r["reward"].as_f64().is_some_and(f64::is_finite), "{r}");
    }
}

/// `objective.num_iterations: 2`: every sample batch trains two updates (the second with a
/// real ratio, so a tiny clip range clips), and a run stopped inside a cycle resumes on the
/// saved replies bit for bit.
#[test]
fn num_iterations_reuses_each_sample_batch_and_resumes_inside_a_cycle() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = ", num_iterations: 2, ppo_clip: 1.0e-4, kl_beta: 0.05";
    let (straight_cfg, straight) = demo_config(tmp.path(), "straight", "polychromic_rl", extra);
    let (resumed_cfg, resumed) = demo_config(tmp.path(), "resumed", "polychromic_rl", extra);
    run(&["train", "--config", straight_cfg.to_str().unwrap(), "--quiet"]).ok();
    run(&["train", "--config", resumed_cfg.to_str().unwrap(), "--quiet", "--stop-at-step", "3"]).ok();
    assert!(resumed.join("checkpoints/step-3/rollouts.json").exists(), "the cycle sampled at step 3 continues at step 4");
    assert!(!straight.join("checkpoints/step-4/rollouts.json").exists(), "step 5 starts a new cycle");
    run(&["resume", resumed.to_str().unwrap(), "--quiet"]).ok();
    let (a, b) = (tensors(&straight.join("checkpoints/step-6/model.safetensors")), tensors(&resumed.join("checkpoints/step-6/model.safetensors")));
    assert!(a == b, "weights differ after resume");
    for key in ["loss", "train/reward_mean", "train/kl", "train/clip_fraction", "train/entropy", "train/rollout_iteration"] {
        assert_eq!(metric_series(&straight, key), metric_series(&resumed, key), "{key} differs after resume");
    }
    assert_eq!(metric_series(&straight, "train/rollout_iteration"), vec![0.0, 1.0, 0.0, 1.0]);
    assert_eq!(metric_series(&straight, "perf/generate_ms").len(), 2, "one sampling pass per cycle");
    assert_eq!(metric_series(&straight, "train/reward_mean").len(), 4, "every update logs the rewards it trains on");
    let clip = metric_series(&straight, "train/clip_fraction");
    assert!(clip[0] == 0.0 && clip[2] == 0.0, "the first update's ratio is 1: {clip:?}");
    assert!(clip[1] > 0.0 && clip[3] > 0.0, "the second update's ratio has moved past 1 ± 1e-4: {clip:?}");
    let entropy = metric_series(&straight, "train/entropy");
    assert!(entropy.iter().all(|&e| e > 0.0 && e.is_finite()), "{entropy:?}");
    // Both updates of a cycle train on the same replies (logged under their own steps).
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(straight.join("samples.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let of_step = |step: u64| records.iter().filter(|r| r["step"] == step).map(|r| (r["prompt"].clone(), r["reply"].clone())).collect::<Vec<_>>();
    assert!(!of_step(3).is_empty());
    assert_eq!(of_step(3), of_step(4));
    assert_eq!(of_step(5), of_step(6));
    assert_ne!(of_step(3), of_step(5), "a new cycle samples new prompts");
}

#[test]
fn polychromic_rl_with_semantic_diversity_and_regularized_objective_train() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, out) = demo_config(tmp.path(), "rl", "polychromic_rl", "");
    let sets = ["--set", "training.max_steps=4", "--set", "objective.diversity=semantic"];
    run(&[&["train", "--config", cfg.to_str().unwrap(), "--quiet"][..], &sets].concat()).ok();
    let scores = metric_series(&out, "train/set_score");
    let diversity = metric_series(&out, "train/diversity");
    assert_eq!(scores.len(), 2);
    assert!(diversity.iter().all(|d| (0.0..=2.0).contains(d) && *d > 0.0), "{diversity:?}");
    assert_eq!(metric_series(&out, "perf/encode_ms").len(), 2);

    let (cfg, out) = demo_config(tmp.path(), "reg", "polychromic_regularized", ", lambda: 0.5");
    run(&["train", "--config", cfg.to_str().unwrap(), "--quiet", "--set", "training.max_steps=4"]).ok();
    let quality = metric_series(&out, "train/quality_loss");
    let loss: Vec<f64> = logged_losses(&out).iter().map(|(_, l)| *l).collect();
    let d = metric_series(&out, "train/diversity");
    assert_eq!(quality.len(), 2);
    for i in 0..2 {
        // loss = CE − λ · D_θ as logged.
        assert!((loss[2 + i] - (quality[i] - 0.5 * d[i])).abs() < 1e-4, "{loss:?} {quality:?} {d:?}");
    }
}

#[test]
fn sampling_objective_config_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, _) = demo_config(tmp.path(), "bad", "grpo", "");
    let r = run(&["train", "--config", cfg.to_str().unwrap(), "--set", "objective.n_samples=1"]).fails();
    assert!(r.stderr().contains("objective.n_samples"), "{}", r.stderr());
    let r = run(&["train", "--config", cfg.to_str().unwrap(), "--set", "objective.type=ppo"]).fails();
    assert!(r.stderr().contains("objective.type"), "{}", r.stderr());
    let r = run(&["train", "--config", cfg.to_str().unwrap(), "--set", "objective.rewards=[{type: length}]"]).fails();
    assert!(r.stderr().contains("objective.rewards[0]"), "{}", r.stderr());
    // Sampling objectives need prompt/reply records, not plain text.
    let text = repo_root().join("data/shakespeare_excerpt.txt");
    let r = run(&[
        "train", "--config", cfg.to_str().unwrap(), "--set", &format!("data.train={}", text.display()),
        "--set", "data.validation=null", "--set", "model.context_length=32",
    ])
    .fails();
    assert!(r.stderr().contains("JSONL"), "{}", r.stderr());
}

#[test]
fn generate_n_replies_and_eval_report() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, out) = demo_config(tmp.path(), "sft", "sft", "");
    let sets = ["training.max_steps=4", "training.eval_generate_every=2", "training.eval_generate_samples=4"];
    run(&["train", "--config", cfg.to_str().unwrap(), "--quiet", "--set", sets[0], "--set", sets[1], "--set", sets[2]]).ok();
    // The held-out sampling evaluation during training, logged at steps 2 and 4.
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval/pass@1").is_some())
        .collect();
    assert_eq!(evals.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 4], "{evals:?}");
    for v in &evals {
        let (p1, pn, cov) = (v["eval/pass@1"].as_f64().unwrap(), v["eval/pass@4"].as_f64().unwrap(), v["eval/coverage@4"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&p1) && p1 <= pn && pn <= 1.0 && cov >= 0.0, "{v}");
        assert!(v["eval/distinct_2"].as_f64().is_some() && v["eval/reward_mean"].as_f64().is_some(), "{v}");
    }
    let tb = polyburn::train::logging::read_tensorboard(&out).unwrap();
    let tb_steps: Vec<u64> = tb
        .iter()
        .filter_map(|e| match e {
            polyburn::train::logging::LoggedEvent::Scalar { tag, step, .. } if tag == "eval/pass@1" => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(tb_steps, [2, 4]);
    let dir = out.to_str().unwrap();
    let sample = |seed: &str| {
        run(&["generate", "--run", dir, "--prompt", "animal b:", "--n", "4", "--max-new-tokens", "6", "--temperature", "1.5", "--seed", seed, "--json"])
            .ok()
            .stdout()
    };
    let a = sample("1");
    let lines: Vec<serde_json::Value> = a.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines.iter().map(|v| v["reply"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert!(lines.iter().all(|v| v["ids"].as_array().unwrap().len() <= 6));
    assert_eq!(a, sample("1"), "same seed, same replies");
    assert_ne!(a, sample("2"));

    let report = run(&["eval", "--run", dir, "--k", "1,2,4", "--samples", "4", "--json", "--encoder", "none"]).ok().stdout();
    let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    let pass: Vec<f64> = ["1", "2", "4"].iter().map(|k| v["pass_at"][k].as_f64().unwrap()).collect();
    let coverage: Vec<f64> = ["1", "2", "4"].iter().map(|k| v["coverage_at"][k].as_f64().unwrap()).collect();
    assert!(pass.windows(2).all(|w| w[0] <= w[1]) && pass.iter().all(|p| (0.0..=1.0).contains(p)), "{pass:?}");
    assert!(coverage.windows(2).all(|w| w[0] <= w[1]), "{coverage:?}");
    for key in ["distinct_2", "self_bleu", "reward_mean"] {
        assert!(v[key].as_f64().is_some(), "{key} in {v}");
    }
    assert!(v["semantic_diversity"].is_null());
    assert_eq!(v["prompts"], 23);
    // Every metric has its standard error over the prompts under the same key in `stderr`.
    let se = &v["stderr"];
    let mut errors: Vec<f64> = ["distinct_2", "self_bleu", "reward_mean"].iter().map(|k| se[k].as_f64().unwrap()).collect();
    errors.extend(["1", "2", "4"].iter().flat_map(|k| [se["pass_at"][k].as_f64().unwrap(), se["coverage_at"][k].as_f64().unwrap()]));
    assert!(errors.iter().all(|e| e.is_finite() && *e >= 0.0), "{se}");
    assert!(errors.iter().any(|&e| e > 0.0), "23 prompts do not all score alike: {se}");
    assert!(se["semantic_diversity"].is_null());
    let with_encoder = run(&["eval", "--run", dir, "--k", "1", "--samples", "2", "--json"]).ok().stdout();
    let s = serde_json::from_str::<serde_json::Value>(with_encoder.trim()).unwrap()["semantic_diversity"].as_f64().unwrap();
    assert!((0.0..=2.0).contains(&s), "{s}");
    let markdown = run(&["eval", "--run", dir, "--k", "1,4", "--samples", "4", "--encoder", "none"]).ok().stdout();
    assert!(markdown.contains("| pass@4 |") && markdown.contains("coverage@1") && markdown.contains(" ± "), "{markdown}");
    let bad = run(&["eval", "--run", dir, "--k", "5", "--samples", "4"]).fails();
    assert!(bad.stderr().contains("--k 5"), "{}", bad.stderr());
}
