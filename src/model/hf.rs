//! Hugging Face model folders (`config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, `tokenizer.json`): resolve, build the matching polyburn
//! model and load its weights. Supported: GPT-2 (`GPT2LMHeadModel`) and the Llama family
//! (`LlamaForCausalLM`, and `Qwen2ForCausalLM`, the same shape with q/k/v biases).
//!
//! GPT-2 maps onto polyburn's own GPT one to one: its Conv1D weights are stored `[in, out]`,
//! which is Burn's `Linear` layout, and its fused `c_attn` packs q, k, v along the output in
//! the order polyburn's `qkv` splits them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use serde::Deserialize;

use super::norm::NormKind;
use super::transformer::{Architecture, Gpt, GptConfig};
use crate::config::{AlphaMode, FfnConfig, FfnUnit, GeluApproximation};
use crate::data::TextTokenizer;
use crate::hub::{TOKENIZER_FILE, resolve, weight_files};
use crate::weights::{Saved, TensorFile, load_params};

/// A pretrained model ready to run.
pub struct PretrainedModel {
    pub dir: PathBuf,
    pub config: GptConfig,
    pub model: Gpt,
    pub tokenizer: TextTokenizer,
    /// `eos_token_id` of config.json: generation stops there.
    pub eos_token_id: Option<u32>,
}

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

/// Loads a Hugging Face model folder or cached hub id onto `device`.
pub fn load_pretrained(id_or_path: &str, device: &Device) -> Result<PretrainedModel> {
    let dir = resolve(id_or_path)?;
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?;
    let architecture = raw["architectures"][0].as_str().or(raw["model_type"].as_str()).unwrap_or("<none>").to_string();
    let files = weight_files(&dir)?;
    let (config, model, eos_token_id) = match architecture.as_str() {
        "GPT2LMHeadModel" | "gpt2" => load_gpt2(&config_path, raw, &files, device)?,
        "LlamaForCausalLM" | "llama" | "Qwen2ForCausalLM" | "qwen2" => load_llama(&config_path, raw, &files, device)?,
        other => bail!(
            "{}: architecture `{other}` is not supported; polyburn loads GPT2LMHeadModel, LlamaForCausalLM \
             and Qwen2ForCausalLM",
            config_path.display()
        ),
    };
    let tokenizer = TextTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
    Ok(PretrainedModel { dir, config, model, tokenizer, eos_token_id })
}

fn load_gpt2(
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

/// Row-major `[rows, cols]` → `[cols, rows]`: PyTorch `Linear` stores `[out, in]`, Burn `[in, out]`.
pub(crate) fn transposed(shape: &[usize], values: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let (rows, cols) = (shape[0], shape[1]);
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    (vec![cols, rows], out)
}

fn load_llama(
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

    // Rename and re-layout the checkpoint into polyburn's parameter names.
    let hf = TensorFile::read(files)?;
    let source = hf.source.clone();
    let mut hf_tensors = hf.tensors;
    let mut take = |name: &str| hf_tensors.remove(name).with_context(|| format!("{source}: tensor `{name}` is missing"));
    let mut ours = std::collections::HashMap::new();
    let put_linear = |ours: &mut std::collections::HashMap<_, _>, to: String, t: (Vec<usize>, Vec<f32>)| {
        if t.0.len() != 2 {
            bail!("{source}: tensor for `{to}` has shape {:?}, expected a matrix", t.0);
        }
        ours.insert(to, transposed(&t.0, &t.1));
        Ok(())
    };
    ours.insert("token_embedding.weight".to_string(), take("model.embed_tokens.weight")?);
    ours.insert("ln_final.gamma".to_string(), take("model.norm.weight")?);
    if !c.tie_word_embeddings {
        put_linear(&mut ours, "lm_head.weight".into(), take("lm_head.weight")?)?;
    }
    for i in 0..c.num_hidden_layers {
        let hf = |n: &str| format!("model.layers.{i}.{n}");
        let pb = |n: &str| format!("blocks.{i}.{n}");
        ours.insert(pb("ln_attn.gamma"), take(&hf("input_layernorm.weight"))?);
        ours.insert(pb("ln_ffn.gamma"), take(&hf("post_attention_layernorm.weight"))?);
        // q, k, v projections fused into one [d_model, q + 2·kv] matrix, in that order.
        let (q, k, v) = (take(&hf("self_attn.q_proj.weight"))?, take(&hf("self_attn.k_proj.weight"))?, take(&hf("self_attn.v_proj.weight"))?);
        let d_in = q.0[1];
        let rows: Vec<f32> = [q.1, k.1, v.1].concat();
        let out_width = q.0[0] + k.0[0] + v.0[0];
        ours.insert(pb("attn.qkv.weight"), transposed(&[out_width, d_in], &rows));
        if qkv_bias {
            let b: Vec<f32> = ["q", "k", "v"]
                .iter()
                .map(|p| take(&hf(&format!("self_attn.{p}_proj.bias"))).map(|t| t.1))
                .collect::<Result<Vec<_>>>()?
                .concat();
            ours.insert(pb("attn.qkv.bias"), (vec![b.len()], b));
        }
        put_linear(&mut ours, pb("attn.out.weight"), take(&hf("self_attn.o_proj.weight"))?)?;
        if config.arch.attn_out_bias {
            ours.insert(pb("attn.out.bias"), take(&hf("self_attn.o_proj.bias"))?);
        }
        for (theirs, mine) in [("gate_proj", "gate"), ("up_proj", "value"), ("down_proj", "down")] {
            put_linear(&mut ours, pb(&format!("ffn.Gated.{mine}.weight")), take(&hf(&format!("mlp.{theirs}.weight")))?)?;
            if c.mlp_bias {
                ours.insert(pb(&format!("ffn.Gated.{mine}.bias")), take(&hf(&format!("mlp.{theirs}.bias")))?);
            }
        }
    }
    let leftover: Vec<String> = hf_tensors.into_keys().filter(|n| !n.ends_with("rotary_emb.inv_freq")).collect();
    if !leftover.is_empty() && !(c.tie_word_embeddings && leftover == ["lm_head.weight"]) {
        bail!("{source}: tensors the model has no place for: {}", leftover.join(", "));
    }
    let file = TensorFile::from_tensors(source, ours);
    let model = load_params(config.init(device), &file, Saved::All, str::to_string, |_| false)?;
    let eos = c.eos_token_id.as_ref().and_then(|e| e.as_u64().or_else(|| e[0].as_u64())).map(|e| e as u32);
    Ok((config, model, eos))
}

/// Writes `model` as a Hugging Face model folder (`config.json`, `model.safetensors` with HF
/// names and layouts, `tokenizer.json` copied from `tokenizer_file`): GPT-2 for polyburn's
/// own GPT shape, Llama (or Qwen2, with q/k/v biases) for the Llama shape.
pub fn export_pretrained(model: &Gpt, config: &GptConfig, tokenizer_file: &Path, eos: Option<u32>, out: &Path) -> Result<()> {
    let (hf_config, tensors) = match (config.arch.norm, config.arch.rope_theta) {
        (NormKind::Layer, None) => gpt2_export(model, config, eos)?,
        (NormKind::Rms, Some(theta)) => llama_export(model, config, theta, eos)?,
        _ => bail!("this model mixes GPT-2 and Llama features; it has no Hugging Face architecture to export to"),
    };
    write_safetensors(&out.join("model.safetensors"), &tensors, out)?;
    crate::weights::write_file_atomic(&out.join("config.json"), serde_json::to_string_pretty(&hf_config)?.as_bytes())?;
    let tokenizer = std::fs::read(tokenizer_file).with_context(|| format!("reading {}", tokenizer_file.display()))?;
    crate::weights::write_file_atomic(&out.join(TOKENIZER_FILE), &tokenizer)
}

type NamedTensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn our_tensors(model: &Gpt) -> Result<std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>> {
    crate::weights::named_parameters(model)
        .into_iter()
        .map(|(name, _, data)| {
            let shape = data.shape().to_vec();
            let values = data.try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("tensor {name}: {e:?}"))?;
            Ok((name, (shape, values)))
        })
        .collect()
}

fn gpt2_export(model: &Gpt, c: &GptConfig, eos: Option<u32>) -> Result<(serde_json::Value, NamedTensors)> {
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

fn llama_export(model: &Gpt, c: &GptConfig, theta: f64, eos: Option<u32>) -> Result<(serde_json::Value, NamedTensors)> {
    let swiglu = c.ffn.unit == FfnUnit::Pasilu && c.ffn.alpha_mode == AlphaMode::Static(1.0) && !c.ffn.gate_norm;
    if !swiglu {
        bail!("model.ffn: this Llama-shaped model's FFN is not SwiGLU (paGating FFNs have no Hugging Face equivalent)");
    }
    let a = c.arch;
    let mut ours = our_tensors(model)?;
    let mut take = |n: &str| ours.remove(n).with_context(|| format!("the model has no `{n}`"));
    let mut t = NamedTensors::new();
    let linear = |x: (Vec<usize>, Vec<f32>)| transposed(&x.0, &x.1);
    t.insert("model.embed_tokens.weight".into(), take("token_embedding.weight")?);
    t.insert("model.norm.weight".into(), take("ln_final.gamma")?);
    if !c.tie_embeddings {
        t.insert("lm_head.weight".into(), linear(take("lm_head.weight")?));
    }
    let (q, kv) = (c.n_heads * a.head_dim, a.n_kv_heads * a.head_dim);
    for i in 0..c.n_layers {
        let pb = |n: &str| format!("blocks.{i}.{n}");
        let hf = |n: &str| format!("model.layers.{i}.{n}");
        t.insert(hf("input_layernorm.weight"), take(&pb("ln_attn.gamma"))?);
        t.insert(hf("post_attention_layernorm.weight"), take(&pb("ln_ffn.gamma"))?);
        // Our fused [d, q + 2kv] qkv → PyTorch [out, in] rows, split into q, k, v.
        let (shape, rows) = linear(take(&pb("attn.qkv.weight"))?);
        let d_in = shape[1];
        for (name, start, len) in [("q", 0, q), ("k", q, kv), ("v", q + kv, kv)] {
            t.insert(hf(&format!("self_attn.{name}_proj.weight")), (vec![len, d_in], rows[start * d_in..(start + len) * d_in].to_vec()));
        }
        if a.qkv_bias {
            let (_, b) = take(&pb("attn.qkv.bias"))?;
            for (name, start, len) in [("q", 0, q), ("k", q, kv), ("v", q + kv, kv)] {
                t.insert(hf(&format!("self_attn.{name}_proj.bias")), (vec![len], b[start..start + len].to_vec()));
            }
        }
        t.insert(hf("self_attn.o_proj.weight"), linear(take(&pb("attn.out.weight"))?));
        if a.attn_out_bias {
            t.insert(hf("self_attn.o_proj.bias"), take(&pb("attn.out.bias"))?);
        }
        for (theirs, mine) in [("gate_proj", "gate"), ("up_proj", "value"), ("down_proj", "down")] {
            t.insert(hf(&format!("mlp.{theirs}.weight")), linear(take(&pb(&format!("ffn.Gated.{mine}.weight")))?));
            if c.bias {
                t.insert(hf(&format!("mlp.{theirs}.bias")), take(&pb(&format!("ffn.Gated.{mine}.bias")))?);
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

/// Writes a LoRA run's adapters alone in the PEFT layout (`adapter_model.safetensors` with
/// `lora_A` [rank, in] / `lora_B` [out, rank] per projection, and `adapter_config.json`).
/// Llama-shaped runs use the Llama module names; GPT-2-shaped runs go through
/// [`export_gpt2_lora_adapters`], which folds the q/k/v adapters into one `c_attn` adapter.
pub fn export_lora_adapters(
    model: &Gpt,
    config: &GptConfig,
    lora: &crate::config::LoraConfig,
    base_model: Option<&str>,
    out: &Path,
) -> Result<()> {
    if config.arch.norm != NormKind::Rms {
        return export_gpt2_lora_adapters(model, config, lora, base_model, out);
    }
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

fn write_safetensors(path: &Path, tensors: &NamedTensors, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let encoded: Vec<(&String, &Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, (shape, values))| (name, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, shape.to_vec(), bytes)
                .map(|v| (name.to_string(), v))
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| anyhow::anyhow!("serialising: {e}"))?;
    crate::weights::write_file_atomic(path, &bytes)
}

/// GPT-2 PEFT adapters. GPT-2 fuses q, k, v into one Conv1D (`c_attn`), so polyburn's
/// separate q/k/v adapters become one block-structured adapter on `c_attn`: `lora_A` stacks
/// the m present `Aᵀ`s ([m·r, d]) and `lora_B` puts each `Bᵀ` in its output rows and rank
/// columns ([3d, m·r]). Its rank is m·r, so `rank_pattern`/`alpha_pattern` keep the scale
/// `alpha / r`. `fan_in_fan_out` is true, as for every GPT-2 Conv1D.
fn export_gpt2_lora_adapters(
    model: &Gpt,
    config: &GptConfig,
    lora: &crate::config::LoraConfig,
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
