//! The Llama family (`LlamaForCausalLM`, and `Qwen2ForCausalLM`: the same shape with q/k/v
//! biases): RMSNorm, RoPE, SwiGLU (polyburn's paSiLU at α = 1), grouped-query attention.
//! Import and export share one name table; only the q/k/v projections, separate in Hugging
//! Face and fused in polyburn's `attn.qkv`, are mapped apart.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use serde::Deserialize;

use super::{NamedTensors, our_tensors, transposed, write_safetensors};
use crate::config::{AlphaMode, FfnConfig, FfnUnit, LoraConfig};
use crate::model::norm::NormKind;
use crate::model::transformer::{Architecture, Gpt, GptConfig};
use crate::weights::{Saved, TensorFile, load_params};

/// How a tensor is stored on each side: Linear weights are `[in, out]` in Burn and
/// `[out, in]` in PyTorch.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Same,
    Transposed,
}

/// polyburn parameter ↔ Llama tensor, per block (under `model.layers.<i>.`); the q/k/v
/// projections are fused in polyburn (`attn.qkv`) and mapped apart. The one table serves
/// import and export.
const LLAMA_BLOCK_NAMES: [(&str, &str, Layout); 10] = [
    ("ln_attn.gamma", "input_layernorm.weight", Layout::Same),
    ("ln_ffn.gamma", "post_attention_layernorm.weight", Layout::Same),
    ("attn.out.weight", "self_attn.o_proj.weight", Layout::Transposed),
    ("attn.out.bias", "self_attn.o_proj.bias", Layout::Same),
    ("ffn.Gated.gate.weight", "mlp.gate_proj.weight", Layout::Transposed),
    ("ffn.Gated.gate.bias", "mlp.gate_proj.bias", Layout::Same),
    ("ffn.Gated.value.weight", "mlp.up_proj.weight", Layout::Transposed),
    ("ffn.Gated.value.bias", "mlp.up_proj.bias", Layout::Same),
    ("ffn.Gated.down.weight", "mlp.down_proj.weight", Layout::Transposed),
    ("ffn.Gated.down.bias", "mlp.down_proj.bias", Layout::Same),
];
const LLAMA_TOP_NAMES: [(&str, &str, Layout); 3] = [
    ("token_embedding.weight", "model.embed_tokens.weight", Layout::Same),
    ("ln_final.gamma", "model.norm.weight", Layout::Same),
    ("lm_head.weight", "lm_head.weight", Layout::Transposed),
];

/// The Llama name (within its block when `in_block`) and layout of a polyburn field.
fn llama_name(field: &str, in_block: bool) -> Option<(&'static str, Layout)> {
    let table: &[(&str, &str, Layout)] = if in_block { &LLAMA_BLOCK_NAMES } else { &LLAMA_TOP_NAMES };
    table.iter().find(|(ours, _, _)| *ours == field).map(|(_, theirs, layout)| (*theirs, *layout))
}

/// `blocks.<i>.<field>` → `(Some(i), field)`; a top-level name → `(None, name)`.
fn split_block(name: &str) -> (Option<usize>, &str) {
    if let Some(rest) = name.strip_prefix("blocks.")
        && let Some((layer, field)) = rest.split_once('.')
        && let Ok(i) = layer.parse()
    {
        return (Some(i), field);
    }
    (None, name)
}

#[derive(Debug, Deserialize)]
struct LlamaConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_silu")]
    hidden_act: String,
    #[serde(default)]
    tie_word_embeddings: bool,
    /// Llama's switch for q/k/v/o biases (Qwen2 has q/k/v biases and no such field).
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    eos_token_id: Option<serde_json::Value>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_silu() -> String {
    "silu".into()
}

pub(super) fn load(
    config_path: &Path,
    raw: serde_json::Value,
    files: &[PathBuf],
    device: &Device,
) -> Result<(GptConfig, Gpt, Option<u32>)> {
    let is_qwen2 = raw["model_type"].as_str() == Some("qwen2");
    let at = config_path.display();
    let c: LlamaConfig = serde_json::from_value(raw).with_context(|| format!("{at}: not a Llama-family config"))?;
    if c.hidden_act != "silu" {
        bail!("{at}: hidden_act `{}` is not supported (SwiGLU needs silu)", c.hidden_act);
    }
    let rope_type = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref()).and_then(|p| p["rope_type"].as_str().map(str::to_string));
    if rope_type.as_deref().is_some_and(|t| t != "default") {
        bail!("{at}: rope_type `{}` is not supported (only default RoPE)", rope_type.unwrap());
    }
    let theta = c
        .rope_theta
        .or_else(|| c.rope_parameters.as_ref().and_then(|p| p["rope_theta"].as_f64()))
        .unwrap_or(10000.0);
    let n_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
    let qkv_bias = c.attention_bias.unwrap_or(is_qwen2);
    let config = GptConfig {
        vocab_size: c.vocab_size,
        d_model: c.hidden_size,
        n_layers: c.num_hidden_layers,
        n_heads: c.num_attention_heads,
        d_ff: c.intermediate_size,
        context_length: c.max_position_embeddings,
        dropout: 0.0,
        bias: c.mlp_bias,
        tie_embeddings: c.tie_word_embeddings,
        // SwiGLU is the paSiLU unit at α = 1: down(up(x) ⊙ silu(gate(x))).
        ffn: FfnConfig { unit: FfnUnit::Pasilu, alpha_mode: AlphaMode::Static(1.0), ..Default::default() },
        total_steps: 1,
        arch: Architecture {
            norm: NormKind::Rms,
            norm_eps: c.rms_norm_eps,
            rope_theta: Some(theta),
            n_kv_heads,
            head_dim,
            qkv_bias,
            attn_out_bias: c.attention_bias.unwrap_or(false),
        },
    };

    // Rename and re-layout the checkpoint into polyburn's parameter names: every parameter
    // the model has, through the name table (q, k, v fused into `attn.qkv`).
    let fresh = config.init(device);
    let hf = TensorFile::read(files)?;
    let source = hf.source.clone();
    let mut hf_tensors = hf.tensors;
    let mut take = |name: &str| hf_tensors.remove(name).with_context(|| format!("{source}: tensor `{name}` is missing"));
    let mut ours = std::collections::HashMap::new();
    for (name, _, _) in crate::weights::named_parameters(&fresh) {
        let (layer, field) = split_block(&name);
        let hf = |n: &str| match layer {
            Some(i) => format!("model.layers.{i}.{n}"),
            None => n.to_string(),
        };
        let tensor = match field {
            // [d_model, q + 2·kv]: q, k, v projections side by side, in that order.
            "attn.qkv.weight" => {
                let parts = ["q", "k", "v"].map(|p| take(&hf(&format!("self_attn.{p}_proj.weight"))));
                let [q, k, v] = parts;
                let (q, k, v) = (q?, k?, v?);
                let rows: Vec<f32> = [q.1, k.1, v.1].concat();
                transposed(&[q.0[0] + k.0[0] + v.0[0], q.0[1]], &rows)
            }
            "attn.qkv.bias" => {
                let b = ["q", "k", "v"]
                    .iter()
                    .map(|p| take(&hf(&format!("self_attn.{p}_proj.bias"))).map(|t| t.1))
                    .collect::<Result<Vec<_>>>()?
                    .concat();
                (vec![b.len()], b)
            }
            _ => {
                let (theirs, layout) = llama_name(field, layer.is_some()).with_context(|| format!("`{name}` has no Llama tensor"))?;
                let t = take(&hf(theirs))?;
                match layout {
                    Layout::Same => t,
                    Layout::Transposed if t.0.len() == 2 => transposed(&t.0, &t.1),
                    Layout::Transposed => bail!("{source}: tensor for `{name}` has shape {:?}, expected a matrix", t.0),
                }
            }
        };
        ours.insert(name, tensor);
    }
    let leftover: Vec<String> = hf_tensors.into_keys().filter(|n| !n.ends_with("rotary_emb.inv_freq")).collect();
    if !leftover.is_empty() && !(c.tie_word_embeddings && leftover == ["lm_head.weight"]) {
        bail!("{source}: tensors the model has no place for: {}", leftover.join(", "));
    }
    let file = TensorFile::from_tensors(source, ours);
    let model = load_params(fresh, &file, Saved::All, str::to_string, |_| false)?;
    let eos = c.eos_token_id.as_ref().and_then(|e| e.as_u64().or_else(|| e[0].as_u64())).map(|e| e as u32);
    Ok((config, model, eos))
}

pub(super) fn export(model: &Gpt, c: &GptConfig, theta: f64, eos: Option<u32>) -> Result<(serde_json::Value, NamedTensors)> {
    let swiglu = c.ffn.unit == FfnUnit::Pasilu && c.ffn.alpha_mode == AlphaMode::Static(1.0) && !c.ffn.gate_norm;
    if !swiglu {
        bail!("model.ffn: this Llama-shaped model's FFN is not SwiGLU (paGating FFNs have no Hugging Face equivalent)");
    }
    let a = c.arch;
    let (q, kv) = (c.n_heads * a.head_dim, a.n_kv_heads * a.head_dim);
    let mut t = NamedTensors::new();
    for (name, (shape, values)) in our_tensors(model)? {
        let (layer, field) = split_block(&name);
        let hf = |n: &str| match layer {
            Some(i) => format!("model.layers.{i}.{n}"),
            None => n.to_string(),
        };
        match field {
            // Our fused [d, q + 2kv] qkv → PyTorch [out, in] rows, split into q, k, v.
            "attn.qkv.weight" => {
                let (shape, rows) = transposed(&shape, &values);
                let d_in = shape[1];
                for (p, start, len) in [("q", 0, q), ("k", q, kv), ("v", q + kv, kv)] {
                    t.insert(hf(&format!("self_attn.{p}_proj.weight")), (vec![len, d_in], rows[start * d_in..(start + len) * d_in].to_vec()));
                }
            }
            "attn.qkv.bias" => {
                for (p, start, len) in [("q", 0, q), ("k", q, kv), ("v", q + kv, kv)] {
                    t.insert(hf(&format!("self_attn.{p}_proj.bias")), (vec![len], values[start..start + len].to_vec()));
                }
            }
            _ => {
                let (theirs, layout) = llama_name(field, layer.is_some()).with_context(|| format!("`{name}` has no Llama tensor"))?;
                let tensor = match layout {
                    Layout::Same => (shape, values),
                    Layout::Transposed => transposed(&shape, &values),
                };
                t.insert(hf(theirs), tensor);
            }
        }
    }
    let qwen2 = a.qkv_bias && !a.attn_out_bias;
    let (arch, model_type) = if qwen2 { ("Qwen2ForCausalLM", "qwen2") } else { ("LlamaForCausalLM", "llama") };
    let mut config = serde_json::json!({
        "architectures": [arch], "model_type": model_type,
        "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length, "rms_norm_eps": a.norm_eps,
        "rope_theta": theta, "hidden_act": "silu", "tie_word_embeddings": c.tie_embeddings,
        "mlp_bias": c.bias, "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "float32",
    });
    if !qwen2 {
        config["attention_bias"] = serde_json::json!(a.qkv_bias);
    }
    Ok((config, t))
}

/// Llama-shaped LoRA adapters in the PEFT layout, under the Llama module names.
pub(super) fn export_lora_adapters(model: &Gpt, lora: &LoraConfig, base_model: Option<&str>, out: &Path) -> Result<()> {
    let module_of = |field: &str| match field {
        "attn.lora_q" => Some("self_attn.q_proj"),
        "attn.lora_k" => Some("self_attn.k_proj"),
        "attn.lora_v" => Some("self_attn.v_proj"),
        "attn.lora_o" => Some("self_attn.o_proj"),
        "ffn.Gated.lora_gate" => Some("mlp.gate_proj"),
        "ffn.Gated.lora_up" => Some("mlp.up_proj"),
        "ffn.Gated.lora_down" => Some("mlp.down_proj"),
        _ => None,
    };
    let mut tensors = NamedTensors::new();
    let mut modules = std::collections::BTreeSet::new();
    for (name, (shape, values)) in our_tensors(model)? {
        let Some(rest) = name.strip_prefix("blocks.") else { continue };
        let (layer, field) = rest.split_once('.').unwrap_or((rest, ""));
        let Some((adapter, which)) = field.rsplit_once('.') else { continue };
        let Some(module) = module_of(adapter) else { continue };
        let matrix = match which {
            "a" => "lora_A",
            "b" => "lora_B",
            _ => continue,
        };
        modules.insert(module.rsplit('.').next().unwrap_or(module).to_string());
        tensors.insert(format!("base_model.model.model.layers.{layer}.{module}.{matrix}.weight"), transposed(&shape, &values));
    }
    if tensors.is_empty() {
        bail!("the run has no LoRA adapters to export");
    }
    let adapter_config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": modules, "bias": "none",
        "fan_in_fan_out": false, "inference_mode": true, "base_model_name_or_path": base_model.unwrap_or(""),
    });
    write_safetensors(&out.join("adapter_model.safetensors"), &tensors, out)?;
    crate::weights::write_file_atomic(&out.join("adapter_config.json"), serde_json::to_string_pretty(&adapter_config)?.as_bytes())
}

