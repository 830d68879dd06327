//! Hugging Face import: outputs equal the transformers reference (`tests/fixtures`).

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::*;
use polyburn::model::ForwardContext;
use polyburn::model::hf::load_pretrained;

fn fixture(name: &str) -> std::path::PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

fn reference(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Logits within 1e-4 of transformers' and the same 16-token greedy continuation.
fn assert_matches_transformers(name: &str) {
    let device = Device::flex();
    let r = reference(name);
    let p = load_pretrained(fixture(name).to_str().unwrap(), &device).unwrap();
    let prompt_ids = p.tokenizer.encode(r["prompt"].as_str().unwrap()).unwrap();
    assert_eq!(prompt_ids, ids(&r["input_ids"]), "tokenizer agrees with transformers");

    let input: Vec<i64> = prompt_ids.iter().map(|&t| t as i64).collect();
    let n = input.len();
    let logits = p.model.forward(Tensor::<2, Int>::from_data(TensorData::new(input, [1, n]), &device), &ForwardContext::default());
    let got = logits.into_data().try_to_vec::<f32>().unwrap();
    let expected: Vec<f32> = r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
        .collect();
    assert_eq!(got.len(), expected.len());
    let worst = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "{name}: max |logit difference| {worst}");

    let out = run(&[
        "generate", "--model", fixture(name).to_str().unwrap(), "--prompt", r["prompt"].as_str().unwrap(),
        "--max-new-tokens", "16", "--greedy", "--json",
    ])
    .ok();
    let v: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
    assert_eq!(ids(&v["ids"]), ids(&r["greedy_continuation_ids"]));
    assert_eq!(ids(&v["prompt_ids"]), ids(&r["input_ids"]));
    assert!(v["text"].is_string());
}

#[test]
fn gpt2_logits_and_greedy_continuation_match_transformers() {
    assert_matches_transformers("tiny-gpt2");
}

#[test]
fn llama_logits_and_greedy_continuation_match_transformers() {
    // RMSNorm, RoPE, SwiGLU, grouped-query attention (4 query / 2 kv heads), untied head.
    assert_matches_transformers("tiny-llama");
}

#[test]
fn bad_pretrained_folders_are_errors_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny-gpt2").join(f), dir.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(fixture("tiny-gpt2").join("config.json")).unwrap();
    let device = Device::flex();
    let load = |config: &str| {
        std::fs::write(dir.join("config.json"), config).unwrap();
        load_pretrained(dir.to_str().unwrap(), &device).err().map(|e| format!("{e:#}"))
    };
    let e = load(&config.replace("\"n_inner\": null", "\"n_inner\": 128")).unwrap();
    assert!(e.contains("transformer.h.0.mlp.c_fc.weight") && e.contains("shape"), "{e}");
    let e = load(&config.replace("GPT2LMHeadModel", "BertModel")).unwrap();
    assert!(e.contains("BertModel"), "{e}");
    let r = Run {
        output: polyburn()
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", tmp.path().join("empty-hf-home"))
            .args(["generate", "--model", "no-such-org/no-such-model", "--prompt", "x"])
            .output()
            .unwrap(),
    }
    .fails();
    assert!(r.stderr().contains("no-such-org/no-such-model") && r.stderr().contains("HF_HUB_OFFLINE"), "{}", r.stderr());
}

#[test]
fn hub_ids_resolve_through_the_hugging_face_cache_offline() {
    // The cache layout the Hugging Face tools write: refs/main names a snapshot folder.
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--polyburn-test--tiny-llama");
    let snapshot = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), snapshot.join(f)).unwrap();
    }
    let r = reference("tiny-llama");
    let out = Run {
        output: polyburn()
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .args(["generate", "--model", "polyburn-test/tiny-llama", "--prompt", r["prompt"].as_str().unwrap()])
            .args(["--max-new-tokens", "16", "--greedy", "--json"])
            .output()
            .unwrap(),
    }
    .ok();
    let v: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
    assert_eq!(ids(&v["ids"]), ids(&r["greedy_continuation_ids"]));
}

#[test]
fn fine_tuned_runs_keep_the_pretrained_architecture_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ft");
    let cfg = write_config(tmp.path(), "ft.yaml", &tiny_text_config(&out));
    let gpt2 = fixture("tiny-gpt2");
    run(&["train", "--config", cfg.to_str().unwrap(), "--quiet", "--set", &format!("model.pretrained={}", gpt2.display())]).ok();
    let saved = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(saved.contains("d_model: 64") && saved.contains("vocab_size: 384"), "{saved}");
    let losses = logged_losses(&out);
    // Starting from trained-looking weights on unrelated text, the loss moves but stays finite.
    assert!(losses.iter().all(|(_, l)| l.is_finite()));
    let r = run(&["generate", "--run", out.to_str().unwrap(), "--prompt", "The quick", "--greedy", "--max-new-tokens", "4", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert_eq!(ids(&v["prompt_ids"]), load_pretrained(gpt2.to_str().unwrap(), &Device::flex()).unwrap().tokenizer.encode("The quick").unwrap());
    let r = run(&["train", "--config", cfg.to_str().unwrap(), "--set", "model.pretrained=/nonexistent/model", "--set", &format!("run.output_dir={}", tmp.path().join("x").display())]).fails();
    assert!(r.stderr().contains("model.pretrained") && r.stderr().contains("/nonexistent/model"), "{}", r.stderr());
}

/// Trains a few steps, exports, re-imports: the imported model computes the same logits.
fn assert_export_round_trips(sets: &[String]) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), "c.yaml", &tiny_text_config(&out));
    let mut args = vec!["train".to_string(), "--config".into(), cfg.display().to_string(), "--quiet".into()];
    for s in sets {
        args.extend(["--set".to_string(), s.clone()]);
    }
    run(&args.iter().map(String::as_str).collect::<Vec<_>>()).ok();
    let exported = tmp.path().join("hf");
    run(&["export", "--run", out.to_str().unwrap(), "--out", exported.to_str().unwrap()]).ok();
    let trained = polyburn::train::trainer::load_checkpointed_model(&out, None).unwrap();
    let back = load_pretrained(exported.to_str().unwrap(), &Device::flex()).unwrap();
    let tokens: Vec<i64> = (0..12).map(|i| (i * 7 % 50) as i64).collect();
    let (a, b) = (logits_of(&trained.model, &tokens), logits_of(&back.model, &tokens));
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-5, "{sets:?}: max |logit difference| after export/import {worst}");
}

#[test]
fn export_then_import_gives_the_same_logits() {
    // polyburn's own GPT (char tokenizer) exports as GPT-2; a fine-tuned Llama as Llama.
    assert_export_round_trips(&["model.dropout=0.0".into()]);
    let llama = fixture("tiny-llama");
    assert_export_round_trips(&[format!("model.pretrained={}", llama.display())]);
}

#[test]
fn pagating_models_do_not_export() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), "c.yaml", &tiny_text_config(&out));
    run(&["train", "--config", cfg.to_str().unwrap(), "--quiet", "--set", "model.ffn.unit=paglu", "--set", "training.max_steps=2"]).ok();
    let r = run(&["export", "--run", out.to_str().unwrap(), "--out", tmp.path().join("hf").to_str().unwrap()]).fails();
    assert!(r.stderr().contains("paGating FFNs have no Hugging Face equivalent"), "{}", r.stderr());
}

#[test]
fn sharded_checkpoints_load_through_their_index() {
    // Split the tiny Llama into two shards plus model.safetensors.index.json.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sharded");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(fixture("tiny-llama").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        std::fs::write(dir.join(&file), safetensors::serialize(views, None).unwrap()).unwrap();
        for n in part {
            weight_map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let device = Device::flex();
    let sharded = load_pretrained(dir.to_str().unwrap(), &device).unwrap();
    let single = load_pretrained(fixture("tiny-llama").to_str().unwrap(), &device).unwrap();
    let tokens: Vec<i64> = (0..9).collect();
    assert_eq!(logits_of(&sharded.model, &tokens), logits_of(&single.model, &tokens));
}

#[test]
fn qwen2_shaped_models_round_trip_with_qkv_biases() {
    use polyburn::model::norm::NormKind;
    use polyburn::model::transformer::Architecture;
    let device = Device::flex();
    device.seed(5);
    let config = polyburn::model::GptConfig {
        vocab_size: 384,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        d_ff: 48,
        context_length: 64,
        dropout: 0.0,
        bias: false,
        tie_embeddings: true,
        ffn: polyburn::config::FfnConfig {
            unit: polyburn::config::FfnUnit::Pasilu,
            alpha_mode: polyburn::config::AlphaMode::Static(1.0),
            ..Default::default()
        },
        total_steps: 1,
        arch: Architecture {
            norm: NormKind::Rms,
            norm_eps: 1e-6,
            rope_theta: Some(1_000_000.0),
            n_kv_heads: 2,
            head_dim: 8,
            qkv_bias: true,
            attn_out_bias: false,
        },
    };
    let model = config.init(&device);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qwen");
    polyburn::model::hf::export_pretrained(&model, &config, &polyburn::data::TextTokenizer::from_folder(&fixture("tiny-llama")).unwrap(), &out).unwrap();
    let exported: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(exported["architectures"][0], "Qwen2ForCausalLM");
    let back = load_pretrained(out.to_str().unwrap(), &device).unwrap();
    assert!(back.config.arch.qkv_bias && !back.config.arch.attn_out_bias);
    let tokens: Vec<i64> = (0..11).map(|i| i * 31 % 384).collect();
    assert_eq!(logits_of(&model, &tokens), logits_of(&back.model, &tokens));
}
