//! LoRA: starts equal to the base, trains only adapters (and stores only them), merges
//! exactly, resumes exactly, exports merged or as PEFT adapters.

mod common;

use burn::tensor::Device;
use common::*;
use polyburn::config::Config;
use polyburn::train::trainer::{build_model, load_checkpointed_model};

const ALL_TARGETS: &str = "lora.target_modules=[q, k, v, o, gate, up, down]";

fn llama() -> String {
    repo_root().join("tests/fixtures/tiny-llama").display().to_string()
}

fn logits(model: &polyburn::model::Gpt) -> Vec<f32> {
    let tokens: Vec<i64> = (0..10).map(|i| (i * 13 % 300) as i64).collect();
    logits_of(model, &tokens)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Trains a LoRA run on the tiny Llama and returns its directory.
fn train_lora(tmp: &std::path::Path) -> std::path::PathBuf {
    let out = tmp.join("run");
    let cfg = write_config(tmp, "c.yaml", &tiny_text_config(&out));
    run(&[
        "train", "--config", cfg.to_str().unwrap(), "--quiet", "--set", &format!("model.pretrained={}", llama()),
        "--set", "lora.rank=4", "--set", ALL_TARGETS, "--set", "optimizer.learning_rate=1e-2",
    ])
    .ok();
    out
}

#[test]
fn lora_starts_equal_to_the_base_model() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "c.yaml", &tiny_text_config(&tmp.path().join("x")));
    let base_cfg = Config::load(&cfg, &[format!("model.pretrained={}", llama())]).unwrap();
    let lora_cfg = Config::load(&cfg, &[format!("model.pretrained={}", llama()), "lora.rank=4".into(), ALL_TARGETS.into()]).unwrap();
    let device = Device::flex();
    let (_, base) = build_model(&base_cfg, 384, &device).unwrap();
    let (_, adapted) = build_model(&lora_cfg, 384, &device).unwrap();
    assert_eq!(logits(&base), logits(&adapted));
}

#[test]
fn only_adapters_train_are_stored_and_merge_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train_lora(tmp.path());
    let names: Vec<String> = tensors(&out.join("checkpoints/step-8/model.safetensors")).into_iter().map(|(n, _)| n).collect();
    assert!(!names.is_empty() && names.iter().all(|n| n.contains(".lora_")), "{names:?}");
    assert_eq!(names.len(), 2 * 7 * 2, "A and B for 7 projections in 2 layers");

    let trained = load_checkpointed_model(&out, None).unwrap();
    let base = polyburn::model::hf::load_pretrained(&llama(), &Device::flex()).unwrap();
    let unmerged = logits(&trained.model);
    assert!(max_diff(&unmerged, &logits(&base.model)) > 1e-3, "the adapters changed the model");
    // Base weights are untouched: merging a zero update would give the base back, and the
    // trained model's non-adapter tensors equal the pretrained ones.
    let frozen: std::collections::HashMap<String, Vec<u8>> = polyburn::weights::named_parameters(&trained.model)
        .into_iter()
        .filter(|(n, _, _)| !n.contains(".lora_"))
        .map(|(n, _, d)| (n, d.as_bytes().to_vec()))
        .collect();
    for (n, _, d) in polyburn::weights::named_parameters(&base.model) {
        assert_eq!(frozen[&n], d.as_bytes(), "base tensor {n} changed");
    }
    let merged = logits(&trained.model.merge_lora());
    assert!(max_diff(&unmerged, &merged) <= 1e-4, "merged differs by {}", max_diff(&unmerged, &merged));
}

#[test]
fn exports_peft_adapters_or_a_merged_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train_lora(tmp.path());
    let peft = tmp.path().join("peft");
    run(&["export", "--run", out.to_str().unwrap(), "--out", peft.to_str().unwrap()]).ok();
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(adapter["peft_type"], "LORA");
    assert_eq!(adapter["r"], 4);
    assert_eq!(adapter["target_modules"].as_array().unwrap().len(), 7);
    let bytes = std::fs::read(peft.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a = st.tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight").unwrap();
    let b = st.tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight").unwrap();
    assert_eq!(a.shape(), &[4, 64]);
    assert_eq!(b.shape(), &[32, 4], "k_proj outputs 2 kv heads × 16");

    let merged_dir = tmp.path().join("merged");
    run(&["export", "--run", out.to_str().unwrap(), "--out", merged_dir.to_str().unwrap(), "--merge"]).ok();
    let back = polyburn::model::hf::load_pretrained(merged_dir.to_str().unwrap(), &Device::flex()).unwrap();
    let trained = load_checkpointed_model(&out, None).unwrap();
    let d = max_diff(&logits(&trained.model), &logits(&back.model));
    assert!(d <= 1e-4, "merged export differs by {d}");
}

#[test]
fn gpt2_shaped_peft_adapters_reproduce_the_merged_update() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), "c.yaml", &tiny_text_config(&out));
    run(&[
        "train", "--config", cfg.to_str().unwrap(), "--quiet", "--set", "lora.target_modules=[q, v, o, up, down]",
        "--set", "lora.rank=2", "--set", "optimizer.learning_rate=1e-2",
    ])
    .ok();
    let peft = tmp.path().join("peft");
    run(&["export", "--run", out.to_str().unwrap(), "--out", peft.to_str().unwrap()]).ok();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["fan_in_fan_out"], true);
    let module = "h.0.attn.c_attn";
    let rank = config["rank_pattern"][module].as_f64().unwrap();
    let alpha = config["alpha_pattern"][module].as_f64().unwrap();
    assert_eq!(rank, 4.0, "q and v adapters of rank 2 stack to rank 4");
    let bytes = std::fs::read(peft.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let read = |n: &str| {
        let t = st.tensor(&format!("base_model.model.transformer.{module}.{n}.weight")).unwrap();
        let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        (t.shape().to_vec(), v)
    };
    let ((a_shape, a), (b_shape, b)) = (read("lora_A"), read("lora_B"));
    let (r, d_in, d_out) = (a_shape[0], a_shape[1], b_shape[0]);
    // PEFT's update for a fan_in_fan_out layer: (B·A)ᵀ · alpha/r, in the Conv1D [in, out] layout.
    let mut peft_delta = vec![0.0f32; d_in * d_out];
    for o in 0..d_out {
        for i in 0..d_in {
            let dot: f32 = (0..r).map(|k| b[o * r + k] * a[k * d_in + i]).sum();
            peft_delta[i * d_out + o] = dot * (alpha / rank) as f32;
        }
    }
    let trained = load_checkpointed_model(&out, None).unwrap();
    let weight = |m: &polyburn::model::Gpt| {
        polyburn::weights::named_parameters(m)
            .into_iter()
            .find(|(n, _, _)| n == "blocks.0.attn.qkv.weight")
            .map(|(_, _, d)| d.try_to_vec::<f32>().unwrap())
            .unwrap()
    };
    let before = weight(&trained.model);
    let after = weight(&trained.model.clone().merge_lora());
    let ours: Vec<f32> = after.iter().zip(&before).map(|(x, y)| x - y).collect();
    assert!(ours.iter().any(|v| v.abs() > 1e-6), "training moved the adapters");
    assert!(max_diff(&ours, &peft_delta) <= 1e-5, "PEFT update differs by {}", max_diff(&ours, &peft_delta));
    run(&["export", "--run", out.to_str().unwrap(), "--out", tmp.path().join("m").to_str().unwrap(), "--merge"]).ok();
}
