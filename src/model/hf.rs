//! Hugging Face model folders (`config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, `tokenizer.json`): resolve, build the matching polyburn
//! model and load its weights. Supported: GPT-2 (`GPT2LMHeadModel`).
//!
//! GPT-2 maps onto polyburn's own GPT one to one: its Conv1D weights are stored `[in, out]`,
//! which is Burn's `Linear` layout, and its fused `c_attn` packs q, k, v along the output in
//! the order polyburn's `qkv` splits them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use serde::Deserialize;

use super::transformer::{Gpt, GptConfig};
use crate::config::{FfnConfig, GeluApproximation};
use crate::data::TextTokenizer;
use crate::train::checkpoint::{TensorFile, load_params};

/// A pretrained model ready to run.
pub struct PretrainedModel {
    pub dir: PathBuf,
    pub config: GptConfig,
    pub model: Gpt,
    pub tokenizer: TextTokenizer,
    /// `eos_token_id` of config.json: generation stops there.
    pub eos_token_id: Option<u32>,
}

/// A local folder, or a hub id found in the local Hugging Face cache (`HF_HOME`,
/// `HF_HUB_CACHE`). This build does not download: fetch the model first
/// (e.g. `huggingface-cli download <id>`) or pass its folder.
pub fn resolve(id_or_path: &str) -> Result<PathBuf> {
    let path = Path::new(id_or_path);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let cache = hf_hub::Cache::from_env();
    if let Some(config) = cache.model(id_or_path.to_string()).get("config.json") {
        return Ok(config.parent().expect("a file in a folder").to_path_buf());
    }
    bail!(
        "`{id_or_path}` is neither a model folder nor a model in the Hugging Face cache ({}); \
         download it first or pass a local folder",
        cache.path().display()
    )
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

/// The weight files of a model folder: one file, or the shards an index lists.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(&index)?;
        let idx: Index = serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let mut shards: Vec<PathBuf> = idx.weight_map.values().map(|f| dir.join(f)).collect();
        shards.sort();
        shards.dedup();
        return Ok(shards);
    }
    bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
}

/// Loads a Hugging Face model folder or cached hub id onto `device`.
pub fn load_pretrained(id_or_path: &str, device: &Device) -> Result<PretrainedModel> {
    let dir = resolve(id_or_path)?;
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?;
    let architecture = raw["architectures"][0].as_str().or(raw["model_type"].as_str()).unwrap_or("<none>");
    if !matches!(architecture, "GPT2LMHeadModel" | "gpt2") {
        bail!(
            "{}: architecture `{architecture}` is not supported; polyburn loads GPT2LMHeadModel",
            config_path.display()
        );
    }
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
    };
    let file = TensorFile::read(&weight_files(&dir)?)?;
    let prefix = if file.tensors.contains_key("transformer.wte.weight") { "transformer." } else { "" };
    // Buffers some GPT-2 checkpoints carry (causal masks), and the tied head.
    let ignorable = |name: &str| {
        name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || (c.tie_word_embeddings && name == "lm_head.weight")
    };
    let name_of = |ours: &str| if ours == "lm_head.weight" { ours.to_string() } else { gpt2_name(ours, prefix) };
    let model = load_params(config.init(device), &file, name_of, ignorable)?;
    let tokenizer = TextTokenizer::from_file(&dir.join(crate::data::TOKENIZER_FILE))?;
    Ok(PretrainedModel { dir, config, model, tokenizer, eos_token_id: c.eos_token_id })
}
