//! GPT-2 (`GPT2LMHeadModel`): import, export and PEFT adapters. GPT-2 maps onto polyburn's
//! own GPT one to one: its Conv1D weights are stored `[in, out]`, which is Burn's `Linear`
//! layout, and its fused `c_attn` packs q, k, v along the output in the order polyburn's `qkv`
//! splits them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use serde::Deserialize;

use super::{NamedTensors, our_tensors, transposed, write_safetensors};
use crate::config::{FfnConfig, GeluApproximation, LoraConfig};
use crate::model::transformer::{Architecture, Gpt, GptConfig};
use crate::weights::{Saved, TensorFile, load_params};

#[derive(Debug, Deserialize)]
struct Gpt2Config {
    n_embd: usize,
    n_head: usize,
    n_layer: usize,
    n_positions: usize,
    vocab_size: usize,
    n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    activation_function: String,
    #[serde(default = "default_ln_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
    eos_token_id: Option<u32>,
}

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// polyburn parameter path ↔ GPT-2 tensor name, per block (`{}` is the layer index) and
/// top level. The one table serves import and export.
const GPT2_BLOCK_NAMES: [(&str, &str); 12] = [
    ("ln_attn.gamma", "ln_1.weight"),
    ("ln_attn.beta", "ln_1.bias"),
    ("attn.qkv.weight", "attn.c_attn.weight"),
    ("attn.qkv.bias", "attn.c_attn.bias"),
    ("attn.out.weight", "attn.c_proj.weight"),
    ("attn.out.bias", "attn.c_proj.bias"),
    ("ln_ffn.gamma", "ln_2.weight"),
    ("ln_ffn.beta", "ln_2.bias"),
    ("ffn.Mlp.up.weight", "mlp.c_fc.weight"),
    ("ffn.Mlp.up.bias", "mlp.c_fc.bias"),
    ("ffn.Mlp.down.weight", "mlp.c_proj.weight"),
    ("ffn.Mlp.down.bias", "mlp.c_proj.bias"),
];
const GPT2_TOP_NAMES: [(&str, &str); 4] = [
    ("token_embedding.weight", "wte.weight"),
    ("position_embedding.weight", "wpe.weight"),
    ("ln_final.gamma", "ln_f.weight"),
    ("ln_final.beta", "ln_f.bias"),
];

/// The GPT-2 tensor name of a polyburn parameter (`prefix` is `transformer.` or empty).
pub fn gpt2_name(ours: &str, prefix: &str) -> String {
    if let Some(rest) = ours.strip_prefix("blocks.") {
        let (layer, field) = rest.split_once('.').unwrap_or((rest, ""));
        if let Some((_, theirs)) = GPT2_BLOCK_NAMES.iter().find(|(o, _)| *o == field) {
            return format!("{prefix}h.{layer}.{theirs}");
        }
    } else if let Some((_, theirs)) = GPT2_TOP_NAMES.iter().find(|(o, _)| *o == ours) {
        return format!("{prefix}{theirs}");
    }
    // No GPT-2 counterpart (e.g. a paGating unit): reported as missing by the loader.
    format!("<no GPT-2 tensor for `{ours}`>")
}

pub(super) fn load(
    config_path: &Path,
    raw: serde_json::Value,
    files: &[PathBuf],
    device: &Device,
) -> Result<(GptConfig, Gpt, Option<u32>)> {
    let c: Gpt2Config =
        serde_json::from_value(raw).with_context(|| format!("{}: not a GPT-2 config", config_path.display()))?;
    let approximate = match c.activation_function.as_str() {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => GeluApproximation::Tanh,
        "gelu" => GeluApproximation::None,
        other => bail!("{}: activation_function `{other}` is not supported", config_path.display()),
    };
    if (c.layer_norm_epsilon - 1e-5).abs() > 1e-12 {
        bail!("{}: layer_norm_epsilon {} is not supported (polyburn uses 1e-5)", config_path.display(), c.layer_norm_epsilon);
    }
    let config = GptConfig {
        vocab_size: c.vocab_size,
        d_model: c.n_embd,
        n_layers: c.n_layer,
        n_heads: c.n_head,
        d_ff: c.n_inner.unwrap_or(4 * c.n_embd),
        context_length: c.n_positions,
        dropout: 0.0,
        bias: true,
        tie_embeddings: c.tie_word_embeddings,
        ffn: FfnConfig { approximate, ..Default::default() },
        total_steps: 1,
        arch: Architecture::gpt(c.n_embd, c.n_head, true),
    };
    let file = TensorFile::read(files)?;
    let prefix = if file.tensors.contains_key("transformer.wte.weight") { "transformer." } else { "" };
    // Buffers some GPT-2 checkpoints carry (causal masks), and the tied head.
    let ignorable = |name: &str| {
        name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || (c.tie_word_embeddings && name == "lm_head.weight")
    };
    let name_of = |ours: &str| if ours == "lm_head.weight" { ours.to_string() } else { gpt2_name(ours, prefix) };
    let model = load_params(config.init(device), &file, Saved::All, name_of, ignorable)?;
    Ok((config, model, c.eos_token_id))
}

pub(super) fn export(model: &Gpt, c: &GptConfig, eos: Option<u32>) -> Result<(serde_json::Value, NamedTensors)> {
    if c.ffn.unit.is_gated() {
        bail!("model.ffn.unit `{:?}`: paGating FFNs have no Hugging Face equivalent; only the plain GELU MLP exports as GPT-2", c.ffn.unit);
    }
    if !c.bias {
        bail!("model.bias: false has no GPT-2 equivalent (GPT-2 layers always have biases)");
    }
    let mut tensors = NamedTensors::new();
    for (ours, (shape, values)) in our_tensors(model)? {
        if ours == "lm_head.weight" {
            let (shape, values) = transposed(&shape, &values);
            tensors.insert(ours, (shape, values));
        } else {
            tensors.insert(gpt2_name(&ours, "transformer."), (shape, values));
        }
    }
    let activation = match c.ffn.approximate {
        GeluApproximation::Tanh => "gelu_new",
        GeluApproximation::None => "gelu",
    };
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_embd": c.d_model, "n_head": c.n_heads, "n_layer": c.n_layers, "n_positions": c.context_length,
        "n_inner": c.d_ff, "vocab_size": c.vocab_size, "activation_function": activation,
        "layer_norm_epsilon": 1e-5, "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "float32",
    });
    Ok((config, tensors))
}

/// GPT-2 PEFT adapters. GPT-2 fuses q, k, v into one Conv1D (`c_attn`), so polyburn's
/// separate q/k/v adapters become one block-structured adapter on `c_attn`: `lora_A` stacks
/// the m present `Aᵀ`s ([m·r, d]) and `lora_B` puts each `Bᵀ` in its output rows and rank
/// columns ([3d, m·r]). Its rank is m·r, so `rank_pattern`/`alpha_pattern` keep the scale
/// `alpha / r`. `fan_in_fan_out` is true, as for every GPT-2 Conv1D.
pub(super) fn export_lora_adapters(
    model: &Gpt,
    config: &GptConfig,
    lora: &LoraConfig,
    base_model: Option<&str>,
    out: &Path,
) -> Result<()> {
    let mut ours = our_tensors(model)?;
    let r = lora.rank;
    let d = config.d_model;
    let mut tensors = NamedTensors::new();
    let mut modules = Vec::new();
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    let put = |tensors: &mut NamedTensors, module: &str, a: (Vec<usize>, Vec<f32>), b: (Vec<usize>, Vec<f32>)| {
        tensors.insert(format!("base_model.model.transformer.{module}.lora_A.weight"), transposed(&a.0, &a.1));
        tensors.insert(format!("base_model.model.transformer.{module}.lora_B.weight"), transposed(&b.0, &b.1));
    };
    for i in 0..config.n_layers {
        let mut take = |n: &str| ours.remove(&format!("blocks.{i}.{n}"));
        // c_attn: q, k, v blocks at output offsets 0, d, 2d.
        let present: Vec<(usize, (Vec<usize>, Vec<f32>), (Vec<usize>, Vec<f32>))> = [("q", 0), ("k", d), ("v", 2 * d)]
            .into_iter()
            .filter_map(|(x, offset)| Some((offset, take(&format!("attn.lora_{x}.a"))?, take(&format!("attn.lora_{x}.b"))?)))
            .collect();
        if !present.is_empty() {
            let m = present.len();
            let mut a_rows = Vec::with_capacity(m * r * d); // [m·r, d]
            let mut b_full = vec![0.0f32; 3 * d * m * r]; // [3d, m·r]
            for (j, (offset, (a_shape, a), (_, b))) in present.iter().enumerate() {
                a_rows.extend(transposed(a_shape, a).1);
                // b is [r, d_out] (Burn layout); Bᵀ[o][k] = b[k][o] goes to row offset+o, column j·r+k.
                for k in 0..r {
                    for o in 0..d {
                        b_full[(offset + o) * m * r + j * r + k] = b[k * d + o];
                    }
                }
            }
            let module = format!("h.{i}.attn.c_attn");
            tensors.insert(format!("base_model.model.transformer.{module}.lora_A.weight"), (vec![m * r, d], a_rows));
            tensors.insert(format!("base_model.model.transformer.{module}.lora_B.weight"), (vec![3 * d, m * r], b_full));
            rank_pattern.insert(module.clone(), serde_json::json!(m * r));
            alpha_pattern.insert(module.clone(), serde_json::json!(lora.alpha * m as f64));
            modules.push(module);
        }
        for (adapter, module) in [("attn.lora_o", "attn.c_proj"), ("ffn.Mlp.lora_up", "mlp.c_fc"), ("ffn.Mlp.lora_down", "mlp.c_proj")] {
            if let (Some(a), Some(b)) = (take(&format!("{adapter}.a")), take(&format!("{adapter}.b"))) {
                let module = format!("h.{i}.{module}");
                put(&mut tensors, &module, a, b);
                modules.push(module);
            }
        }
    }
    if tensors.is_empty() {
        bail!("the run has no LoRA adapters to export");
    }
    let adapter_config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": modules, "bias": "none",
        "fan_in_fan_out": true, "inference_mode": true, "base_model_name_or_path": base_model.unwrap_or(""),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
    });
    write_safetensors(&out.join("adapter_model.safetensors"), &tensors, out)?;
    crate::weights::write_file_atomic(&out.join("adapter_config.json"), serde_json::to_string_pretty(&adapter_config)?.as_bytes())
}
