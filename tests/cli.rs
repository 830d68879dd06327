//! End-to-end CLI behaviour: bad input is a clear error that loses nothing; the shipped
//! configs parse; generate, tokenizer and bench commands work.

mod common;

use common::*;

#[test]
fn bad_yaml_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "bad.yaml", "run:\n  name: x\ndata: [unclosed\n");
    let r = run(&["train", "--config", cfg.to_str().unwrap()]).fails();
    assert!(r.stderr().contains("bad.yaml:"), "{}", r.stderr());
    assert!(r.stderr().contains("YAML syntax error"), "{}", r.stderr());
}

#[test]
fn config_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "c.yaml", &tiny_text_config(&tmp.path().join("out")));
    let cfg = cfg.to_str().unwrap();
    let r = run(&["train", "--config", cfg, "--set", "optimizer.learning_rate=-1"]).fails();
    assert!(r.stderr().contains("optimizer.learning_rate: must be > 0"), "{}", r.stderr());
    let r = run(&["train", "--config", cfg, "--set", "model.n_layer=3"]).fails();
    assert!(r.stderr().contains("n_layer"), "{}", r.stderr());
    let r = run(&["train", "--config", cfg, "--set", "training.batch_size=lots"]).fails();
    assert!(r.stderr().contains("training.batch_size"), "{}", r.stderr());
    assert!(!tmp.path().join("out").exists(), "nothing is written for an invalid config");
}

#[test]
fn missing_corpus_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "c.yaml", &tiny_text_config(&tmp.path().join("out")));
    let r = run(&["train", "--config", cfg.to_str().unwrap(), "--set", "data.train=/nonexistent/corpus.txt"]).fails();
    assert!(r.stderr().contains("/nonexistent/corpus.txt"), "{}", r.stderr());
    let r = run(&["train", "--config", "/nonexistent/config.yaml"]).fails();
    assert!(r.stderr().contains("/nonexistent/config.yaml"), "{}", r.stderr());
}

fn jsonl_config(dir: &std::path::Path, corpus: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("out");
    let yaml = tiny_text_config(&out)
        .replace(&repo_root().join("data/shakespeare_excerpt.txt").display().to_string(), &corpus.display().to_string());
    write_config(dir, "j.yaml", &yaml)
}

#[test]
fn bad_jsonl_line_is_an_error_unless_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(repo_root().join("data/arithmetic.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().take(60).collect();
    lines.insert(10, "{\"prompt\": \"1+1=\"");
    let corpus = tmp.path().join("qa.jsonl");
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let cfg = jsonl_config(tmp.path(), &corpus);
    let r = run(&["train", "--config", cfg.to_str().unwrap(), "--set", "training.max_steps=2"]).fails();
    assert!(r.stderr().contains(&format!("{}:11:", corpus.display())), "{}", r.stderr());
    let r = run(&["train", "--config", cfg.to_str().unwrap(), "--set", "training.max_steps=2", "--set", "data.skip_bad_lines=true"])
        .ok();
    assert!(r.stderr().contains("skipped 1 bad JSONL lines"), "{}", r.stderr());
}

#[test]
fn packing_fills_rows_and_refuses_what_it_cannot_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = jsonl_config(tmp.path(), &repo_root().join("data/arithmetic.jsonl"));
    let cfg = cfg.to_str().unwrap();
    let r = run(&["train", "--config", cfg, "--set", "training.max_steps=2", "--set", "model.context_length=64", "--set", "data.pack=true"]).ok();
    let output = r.stdout() + &r.stderr();
    let line = output.lines().find(|l| l.contains("packed into")).map(str::to_string);
    let line = line.unwrap_or_else(|| panic!("no packing summary in:\n{output}"));
    let fill: f64 = line.split("rows (").nth(1).and_then(|s| s.split('%').next()).and_then(|s| s.parse().ok()).expect(&line);
    assert!(fill > 90.0, "{line}");
    // Plain text has nothing to pack; sampling objectives read one prompt at a time.
    let text = write_config(tmp.path(), "t.yaml", &tiny_text_config(&tmp.path().join("text")));
    let r = run(&["train", "--config", text.to_str().unwrap(), "--set", "data.pack=true"]).fails();
    assert!(r.stderr().contains("data.pack"), "{}", r.stderr());
    let r = run(&["train", "--config", cfg, "--set", "data.pack=true", "--set", "objective.type=grpo"]).fails();
    assert!(r.stderr().contains("data.pack: packs records for the sft objective"), "{}", r.stderr());
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cfg = write_config(tmp.path(), "c.yaml", &tiny_text_config(&out));
    // An absurd learning rate blows the weights up after the first update.
    let r = run(&[
        "train", "--config", cfg.to_str().unwrap(),
        "--set", "optimizer.learning_rate=1e30", "--set", "optimizer.min_lr=0", "--set", "optimizer.warmup_steps=0",
        "--set", "optimizer.max_grad_norm=0", "--set", "checkpoint.every_steps=1", "--set", "training.max_steps=50",
    ])
    .fails();
    assert!(r.stderr().contains("non-finite"), "{}", r.stderr());
    let steps = checkpoint_steps(&out);
    assert!(!steps.is_empty() && *steps.last().unwrap() < 50, "{steps:?}");
    // The last checkpoint is complete and loadable: generate from it.
    run(&["generate", "--run", out.to_str().unwrap(), "--prompt", "A", "--max-new-tokens", "3", "--greedy"]).ok();
}

#[test]
fn shipped_configs_are_valid() {
    for entry in std::fs::read_dir(repo_root().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // Sweep configs have their own schema; training configs start with sections.
        if text.contains("\nbase:") || text.starts_with("base:") {
            continue;
        }
        let overrides = ["data.train=data/shakespeare_excerpt.txt".to_string()];
        let overrides: &[String] = if text.contains("train:") { &[] } else { &overrides };
        polyburn::config::Config::load(&path, overrides).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn train_generate_and_tokenizer_commands_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cfg = write_config(tmp.path(), "c.yaml", &tiny_text_config(&out));
    let r = run(&["train", "--config", cfg.to_str().unwrap()]).ok();
    assert!(r.stdout().contains("step 8: train loss"), "{}", r.stdout());
    for file in ["config.yaml", "metrics.jsonl", "tokenizer.json", "checkpoints/step-8/model.safetensors"] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    let tb: Vec<_> = std::fs::read_dir(out.join("tb")).unwrap().collect();
    assert_eq!(tb.len(), 1);
    let events = std::fs::read(tb[0].as_ref().unwrap().path()).unwrap();
    for tag in ["train/loss", "train/lr", "train/grad_norm", "eval/loss", "perf/tokens_per_sec", "perf/step_ms"] {
        assert!(events.windows(tag.len()).any(|w| w == tag.as_bytes()), "TensorBoard tag {tag} missing");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"eval_loss\""));

    let greedy = |seed: &str| {
        run(&["generate", "--run", out.to_str().unwrap(), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--greedy", "--seed", seed])
            .ok()
            .stdout()
    };
    assert_eq!(greedy("1"), greedy("2"), "greedy decoding ignores the seed");
    assert!(greedy("1").starts_with("ROMEO:"));
    let sample = |seed: &str| {
        run(&["generate", "--run", out.to_str().unwrap(), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "1.5", "--top-k", "20", "--top-p", "0.95", "--seed", seed])
            .ok()
            .stdout()
    };
    assert_eq!(sample("3"), sample("3"), "sampling is reproducible from the seed");
    assert_ne!(sample("3"), sample("4"));

    let tok = tmp.path().join("tok.json");
    let r = run(&["tokenizer", "train", "--input", "data/shakespeare_excerpt.txt", "--vocab-size", "400", "--output", tok.to_str().unwrap()])
        .ok();
    assert!(r.stdout().contains("400 tokens"), "{}", r.stdout());
    let r = run(&["train", "--config", cfg.to_str().unwrap(), "--set", &format!("data.tokenizer={}", tok.display())]).fails();
    assert!(r.stderr().contains("already holds checkpoints"), "{}", r.stderr());
}

#[test]
fn bench_train_reports_json() {
    let r = run(&[
        "bench", "train", "--config", "configs/bench.yaml", "--json", "--steps", "1",
        "--set", "model.n_layers=1", "--set", "model.context_length=32", "--set", "training.batch_size=2",
    ])
    .ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    for key in ["tokens_per_sec", "matmul_gflops", "mfu"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
}

#[test]
fn bench_train_pack_compares_one_record_per_row_with_packed_rows() {
    let corpus = repo_root().join("data/shakespeare_dialogue.jsonl");
    let r = run(&[
        "bench", "train", "--config", "configs/bench.yaml", "--json", "--steps", "1", "--pack",
        "--set", &format!("data.train={}", corpus.display()), "--set", "data.tokenizer=char",
        "--set", "model.n_layers=1", "--set", "model.context_length=128", "--set", "training.batch_size=2",
        "--set", "model.vocab_size=256",
    ])
    .ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    let p = &v["packing"];
    let (unpacked, packed) = (p["unpacked_fill"].as_f64().unwrap(), p["packed_fill"].as_f64().unwrap());
    assert!(packed > 0.9 && packed > unpacked, "{p}");
    for key in ["unpacked_tokens_per_sec", "packed_tokens_per_sec", "speedup"] {
        assert!(p[key].as_f64().unwrap() > 0.0, "{key}: {p}");
    }
    // Plain text has nothing to pack.
    let r = run(&["bench", "train", "--json", "--steps", "1", "--pack", "--set", "model.n_layers=1", "--set", "model.context_length=32"]).fails();
    assert!(r.stderr().contains("data.pack") || r.stderr().contains("JSONL"), "{}", r.stderr());
}

#[test]
fn bench_train_compares_attention_implementations_with_peak_memory() {
    let peak = |attention: &str| {
        let r = run(&[
            "bench", "train", "--config", "configs/bench.yaml", "--json", "--steps", "1", "--attention", attention,
            "--set", "model.n_layers=1", "--set", "model.context_length=256", "--set", "training.batch_size=2",
            "--set", "model.vocab_size=256",
        ])
        .ok();
        let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
        assert_eq!(v["attention"], attention);
        v["peak_bytes"].as_u64().unwrap()
    };
    let (fused, reference) = (peak("fused"), peak("reference"));
    assert!(fused > 0 && fused < reference, "fused {fused} vs reference {reference} bytes");
}

#[test]
fn bench_kernels_json_records() {
    let r = run(&["bench", "kernels", "--json", "--attention-t", "33", "--diversity-g", "5", "--lcs-l", "9", "--repeats", "1"]).ok();
    let records: Vec<serde_json::Value> = serde_json::from_str(r.stdout().trim()).unwrap();
    let ops: Vec<&str> = records.iter().map(|v| v["op"].as_str().unwrap()).collect();
    let expected_ops = ["pairwise_cosine_diversity", "lcs_similarity", "flash_attention_fwd_bwd", "flash_attention_vs_burn", "linear_cross_entropy", "gelu", "pagating_paglu", "layer_norm", "rms_norm", "adamw"];
    for op in expected_ops {
        assert!(ops.contains(&op), "{op} missing from {ops:?}");
    }
    for v in &records {
        let (f, r) = (v["fused_ms"].as_f64().unwrap(), v["reference_ms"].as_f64().unwrap());
        assert!(f > 0.0 && r > 0.0 && (v["ratio"].as_f64().unwrap() - r / f).abs() < 1e-9, "{v}");
        assert!(v["size"].as_str().unwrap().contains('='), "{v}");
        // Host peaks are measured on flex; a GPU device's buffers are not host memory.
        let host = v["device"] == "flex";
        assert!(host || v["device"] == "wgpu" || v["device"] == "cuda", "{v}");
        assert_eq!(v["fused_peak_bytes"].as_u64().is_some(), host, "{v}");
        assert_eq!(v["reference_peak_bytes"].as_u64().is_some(), host, "{v}");
    }
    let devices: std::collections::BTreeSet<&str> = records.iter().map(|v| v["device"].as_str().unwrap()).collect();
    let expected = if cfg!(feature = "wgpu") { vec!["flex", "wgpu"] } else { vec!["flex"] };
    assert!(expected.iter().all(|d| devices.contains(d)), "devices {devices:?}, expected {expected:?}");
    if cfg!(feature = "wgpu") {
        assert!(ops.contains(&"lcs_gpu_vs_cpu"), "the LCS placement measurement runs on GPU devices: {ops:?}");
    }
}

#[test]
fn early_stopping_ends_the_run_with_a_checkpoint_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let config = write_config(tmp.path(), "c.yaml", &tiny_text_config(&out));
    let config = config.to_str().unwrap();
    // The first evaluation sets the best; no later one can improve on it by 100.
    let sets = ["training.eval_every=1", "training.early_stopping_patience=2", "training.early_stopping_threshold=100"];
    let mut args = vec!["train", "--config", config, "--quiet"];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let r = run(&args).ok();
    assert!(r.stdout().contains("early stopping at step 3"), "{}", r.stdout());
    assert_eq!(checkpoint_steps(&out).last(), Some(&3), "a checkpoint at the stop");
    // Resuming an early-stopped run trains nothing more.
    let r = run(&["resume", out.to_str().unwrap(), "--quiet"]).ok();
    assert!(r.stdout().contains("early stopping at step 3"), "{}", r.stdout());
    assert_eq!(checkpoint_steps(&out).last(), Some(&3));
}

#[test]
fn keep_best_keeps_the_best_evaluation_outside_keep_last_and_best_loads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let config = write_config(tmp.path(), "c.yaml", &tiny_text_config(&out));
    // best_mode max: the highest eval loss, usually an early step, so keeping it while
    // keep_last = 1 prunes the steps in between.
    let sets = ["checkpoint.keep_best=true", "checkpoint.best_mode=max", "checkpoint.keep_last=1", "checkpoint.every_steps=100", "training.eval_every=1"];
    let mut args = vec!["train", "--config", config.to_str().unwrap(), "--quiet"];
    for s in &sets {
        args.extend(["--set", s]);
    }
    run(&args).ok();
    // The best evaluation, from the log.
    let evals: Vec<(u64, f64)> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("eval_loss")?.as_f64()?)))
        .collect();
    assert_eq!(evals.len(), 8, "{evals:?}");
    let best = evals.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
    let link = std::fs::read_link(out.join("checkpoints/best")).unwrap();
    assert_eq!(link.to_str().unwrap(), format!("step-{best}"));
    let steps = checkpoint_steps(&out);
    assert!(steps.contains(&best) && steps.contains(&8) && steps.len() <= 2, "latest and best only: {steps:?}");
    let exported = tmp.path().join("hf");
    let r = run(&["export", "--run", out.to_str().unwrap(), "--out", exported.to_str().unwrap(), "--best"]).ok();
    assert!(r.stdout().contains(&format!("(step {best})")), "{}", r.stdout());
    // Without keep_best there is nothing to ask for.
    let plain = tmp.path().join("plain");
    let config = write_config(tmp.path(), "p.yaml", &tiny_text_config(&plain));
    run(&["train", "--config", config.to_str().unwrap(), "--quiet", "--set", "training.max_steps=2"]).ok();
    let r = run(&["export", "--run", plain.to_str().unwrap(), "--out", exported.to_str().unwrap(), "--best"]).fails();
    assert!(r.stderr().contains("no best checkpoint"), "{}", r.stderr());
}

#[test]
fn training_epochs_resolves_to_steps_and_logs_the_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let text = tiny_text_config(&out).replace("max_steps: 8, ", "epochs: 0.005, ");
    let config = write_config(tmp.path(), "c.yaml", &text);
    let r = run(&["train", "--config", config.to_str().unwrap()]).ok();
    assert!(r.stderr().contains("training.epochs 0.005:"), "{}", r.stderr());
    let records: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("epoch").is_some())
        .collect();
    let last = records.last().unwrap();
    let (steps, epoch) = (last["step"].as_u64().unwrap(), last["epoch"].as_f64().unwrap());
    // The fewest steps that cover 0.005 epochs: one step fewer would not.
    let per_step = epoch / steps as f64;
    assert!(epoch >= 0.005 && epoch - per_step < 0.005, "{steps} steps reached epoch {epoch}");
    assert!(steps > 1, "the test needs a run of several steps ({steps})");
    let saved = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(saved.contains(&format!("max_steps: {steps}")), "{saved}");

    // Both set is an error naming the fields.
    let both = write_config(tmp.path(), "d.yaml", &tiny_text_config(&tmp.path().join("other")));
    let r = run(&["train", "--config", both.to_str().unwrap(), "--set", "training.epochs=1"]).fails();
    assert!(r.stderr().contains("training.epochs: set training.epochs or training.max_steps, not both"), "{}", r.stderr());
}
