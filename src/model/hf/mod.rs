//! Hugging Face model folders (`config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, `tokenizer.json`): resolve, build the matching polyburn
//! model and load its weights. Supported: GPT-2 (`GPT2LMHeadModel`) and the Llama family
//! (`LlamaForCausalLM`, and `Qwen2ForCausalLM`, the same shape with q/k/v biases).
//! One module per format: [`gpt2`] and [`llama`] (import, export, PEFT adapters); the
//! cache and downloads are [`crate::hub`]'s.

mod gpt2;
mod llama;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;

use super::norm::NormKind;
use super::transformer::{Gpt, GptConfig};
use crate::config::LoraConfig;
use crate::data::TextTokenizer;
use crate::hub::{resolve, weight_files};
pub use gpt2::gpt2_name;

/// A pretrained model ready to run.
pub struct PretrainedModel {
    pub dir: PathBuf,
    pub config: GptConfig,
    pub model: Gpt,
    pub tokenizer: TextTokenizer,
    /// `eos_token_id` of config.json: generation stops there.
    pub eos_token_id: Option<u32>,
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
        "GPT2LMHeadModel" | "gpt2" => gpt2::load(&config_path, raw, &files, device)?,
        "LlamaForCausalLM" | "llama" | "Qwen2ForCausalLM" | "qwen2" => llama::load(&config_path, raw, &files, device)?,
        other => bail!(
            "{}: architecture `{other}` is not supported; polyburn loads GPT2LMHeadModel, LlamaForCausalLM \
             and Qwen2ForCausalLM",
            config_path.display()
        ),
    };
    let tokenizer = TextTokenizer::from_folder(&dir)?;
    Ok(PretrainedModel { dir, config, model, tokenizer, eos_token_id })
}

/// Writes `model` as a Hugging Face model folder (`config.json`, `model.safetensors` with HF
/// names and layouts, `tokenizer.json` and, with an end token or chat template,
/// `tokenizer_config.json`): GPT-2 for polyburn's own GPT shape, Llama (or Qwen2, with q/k/v
/// biases) for the Llama shape.
pub fn export_pretrained(model: &Gpt, config: &GptConfig, tokenizer: &TextTokenizer, out: &Path) -> Result<()> {
    let eos = tokenizer.eos_id();
    let (hf_config, tensors) = match (config.arch.norm, config.arch.rope_theta) {
        (NormKind::Layer, None) => gpt2::export(model, config, eos)?,
        (NormKind::Rms, Some(theta)) => llama::export(model, config, theta, eos)?,
        _ => bail!("this model mixes GPT-2 and Llama features; it has no Hugging Face architecture to export to"),
    };
    write_safetensors(&out.join("model.safetensors"), &tensors, out)?;
    crate::weights::write_file_atomic(&out.join("config.json"), serde_json::to_string_pretty(&hf_config)?.as_bytes())?;
    tokenizer.save_folder(out)
}

pub(crate) type NamedTensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

pub(crate) fn our_tensors(model: &Gpt) -> Result<std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>> {
    crate::weights::named_parameters(model)
        .into_iter()
        .map(|(name, _, data)| {
            let shape = data.shape().to_vec();
            let values = data.try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("tensor {name}: {e:?}"))?;
            Ok((name, (shape, values)))
        })
        .collect()
}

/// Writes a LoRA run's adapters alone in the PEFT layout (`adapter_model.safetensors` with
/// `lora_A` [rank, in] / `lora_B` [out, rank] per projection, and `adapter_config.json`).
/// Llama-shaped runs use the Llama module names; GPT-2-shaped runs go through
/// [`gpt2::export_lora_adapters`], which folds the q/k/v adapters into one `c_attn` adapter.
pub fn export_lora_adapters(
    model: &Gpt,
    config: &GptConfig,
    lora: &LoraConfig,
    base_model: Option<&str>,
    out: &Path,
) -> Result<()> {
    match config.arch.norm {
        NormKind::Rms => llama::export_lora_adapters(model, lora, base_model, out),
        NormKind::Layer => gpt2::export_lora_adapters(model, config, lora, base_model, out),
    }
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

pub(crate) fn write_safetensors(path: &Path, tensors: &NamedTensors, dir: &Path) -> Result<()> {
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

