//! A BERT sentence encoder (all-MiniLM-L6-v2 by default): loads a Hugging Face model folder
//! (`config.json`, `model.safetensors`, `tokenizer.json`), mean-pools the last hidden states
//! over the attention mask and L2-normalises, as sentence-transformers does.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use polyburn_kernels::activation::{ActivationImpl, gelu};
use polyburn_kernels::attention::{AttentionImpl, AttentionOptions, attention};
use serde::Deserialize;

use crate::weights::{Saved, TensorFile, load_params};

pub use crate::config::DEFAULT_ENCODER;

/// Texts per forward pass.
const ENCODE_BATCH: usize = 64;

#[derive(Debug, Clone, Deserialize)]
struct BertConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    model_type: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

#[derive(Module, Debug)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    #[module(skip)]
    heads: usize,
}

impl BertLayer {
    fn forward(&self, x: Tensor<3>, padding: Tensor<2, Bool>) -> Tensor<3> {
        let [batch, seq, width] = x.dims();
        let head_dim = width / self.heads;
        let split = |t: Tensor<3>| t.reshape([batch, seq, self.heads, head_dim]).swap_dims(1, 2);
        let (q, k, v) = (split(self.query.forward(x.clone())), split(self.key.forward(x.clone())), split(self.value.forward(x.clone())));
        let options = AttentionOptions { causal: false, key_padding: Some(padding), documents: None, mask: None };
        // The fused kernels (the encoder is frozen and only runs forward): measured on the
        // polychromic step, Burn's erf-based GELU and the reference attention's copies were
        // ~15 % of the encoder's time.
        let context = attention(q, k, v, options, AttentionImpl::Fused).swap_dims(1, 2).reshape([batch, seq, width]);
        let x = self.attention_norm.forward(x + self.attention_out.forward(context));
        let h = gelu(self.intermediate.forward(x.clone()), false, ActivationImpl::Fused);
        self.output_norm.forward(x + self.output.forward(h))
    }
}

#[derive(Module, Debug)]
struct Bert {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    embedding_norm: LayerNorm,
    layers: Vec<BertLayer>,
}

impl Bert {
    fn init(c: &BertConfig, device: &Device) -> Self {
        let (d, ff) = (c.hidden_size, c.intermediate_size);
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        let norm = || LayerNormConfig::new(d).with_epsilon(c.layer_norm_eps).init(device);
        Self {
            word_embeddings: EmbeddingConfig::new(c.vocab_size, d).init(device),
            position_embeddings: EmbeddingConfig::new(c.max_position_embeddings, d).init(device),
            token_type_embeddings: EmbeddingConfig::new(c.type_vocab_size, d).init(device),
            embedding_norm: norm(),
            layers: (0..c.num_hidden_layers)
                .map(|_| BertLayer {
                    query: linear(d, d),
                    key: linear(d, d),
                    value: linear(d, d),
                    attention_out: linear(d, d),
                    attention_norm: norm(),
                    intermediate: linear(d, ff),
                    output: linear(ff, d),
                    output_norm: norm(),
                    heads: c.num_attention_heads,
                })
                .collect(),
        }
    }

    /// `ids [B, T]`, `mask [B, T]` (1 = token) → last hidden states `[B, T, D]`.
    fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<3> {
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device).reshape([1, seq]).expand([batch, seq]);
        let types = Tensor::<2, Int>::zeros([batch, seq], &device);
        let x = self.word_embeddings.forward(ids)
            + self.position_embeddings.forward(positions)
            + self.token_type_embeddings.forward(types);
        let mut x = self.embedding_norm.forward(x);
        let padding = mask.equal_elem(0.0);
        for layer in &self.layers {
            x = layer.forward(x, padding.clone());
        }
        x
    }
}

/// A sentence encoder ready to embed text.
pub struct SentenceEncoder {
    model: Bert,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    pub dim: usize,
}

impl SentenceEncoder {
    /// Loads a model folder, or a hub id through the Hugging Face cache (see [`crate::hub::resolve`]).
    pub fn load(id_or_path: &str, device: &Device) -> Result<Self> {
        let dir = crate::hub::resolve(id_or_path).with_context(|| format!("sentence encoder `{id_or_path}`"))?;
        Self::from_folder(&dir, device)
    }

    fn from_folder(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
        let c: BertConfig = serde_json::from_str(&text).with_context(|| format!("{}: not a BERT config", config_path.display()))?;
        if !c.model_type.is_empty() && c.model_type != "bert" {
            bail!("{}: model_type `{}` is not a BERT encoder", config_path.display(), c.model_type);
        }
        if c.hidden_act != "gelu" {
            bail!("{}: hidden_act `{}` is not supported (gelu only)", config_path.display(), c.hidden_act);
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
        // sentence-transformers truncates at the model's max_seq_length and pads per batch.
        let max_len = sentence_max_len(dir).unwrap_or(c.max_position_embeddings).min(c.max_position_embeddings);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| anyhow::anyhow!("tokenizer truncation: {e}"))?;
        let files = crate::hub::weight_files(dir)?;
        let file = TensorFile::read(&files)?;
        let prefix = if file.tensors.contains_key("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let tensors = hf_to_ours(&file, &c, prefix)?;
        let ours = TensorFile::from_tensors(file.source.clone(), tensors);
        let model = load_params(Bert::init(&c, device), &ours, Saved::All, str::to_string, |_| false)?;
        Ok(Self { model, tokenizer, device: device.clone(), dim: c.hidden_size })
    }

    /// One L2-normalised embedding per text. Repeated texts (common among sampled replies)
    /// are encoded once.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut slot_of: HashMap<&str, usize> = HashMap::new();
        let mut unique: Vec<&str> = Vec::new();
        let slots: Vec<usize> = texts
            .iter()
            .map(|&t| {
                *slot_of.entry(t).or_insert_with(|| {
                    unique.push(t);
                    unique.len() - 1
                })
            })
            .collect();
        let mut embedded = Vec::with_capacity(unique.len());
        for chunk in unique.chunks(ENCODE_BATCH) {
            embedded.extend(self.embed_batch(chunk)?);
        }
        Ok(slots.into_iter().map(|s| embedded[s].clone()).collect())
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing for the sentence encoder: {e}"))?;
        let batch = encodings.len();
        let seq = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0i64; batch * seq];
        let mut mask = vec![0f32; batch * seq];
        for (b, e) in encodings.iter().enumerate() {
            for (t, &id) in e.get_ids().iter().enumerate() {
                ids[b * seq + t] = id as i64;
                mask[b * seq + t] = 1.0;
            }
        }
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, seq]), &self.device);
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [batch, seq]), &self.device);
        let hidden = self.model.forward(ids, mask.clone());
        let pooled = mean_pool_normalized(hidden, mask);
        let width = pooled.dims()[1];
        let values = pooled.into_data().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        if values.iter().any(|v| !v.is_finite()) {
            bail!("the sentence encoder produced non-finite embeddings");
        }
        Ok(values.chunks(width).map(<[f32]>::to_vec).collect())
    }
}

/// Mean over the masked-in positions of `[B, T, D]`, then L2 normalisation (ε 1e-12, as
/// `torch.nn.functional.normalize`).
pub fn mean_pool_normalized(hidden: Tensor<3>, mask: Tensor<2>) -> Tensor<2> {
    let [batch, seq, width] = hidden.dims();
    let mask = mask.reshape([batch, seq, 1]);
    let summed = (hidden * mask.clone()).sum_dim(1).reshape([batch, width]);
    let counts = mask.sum_dim(1).reshape([batch, 1]).clamp_min(1e-9);
    let mean = summed / counts;
    let norm = mean.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    mean / norm
}

fn sentence_max_len(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("sentence_bert_config.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["max_seq_length"].as_u64().map(|v| v as usize)
}

/// Renames HF BERT tensors to this module's parameter paths; linear weights are transposed
/// (HF stores `[out, in]`, Burn `[in, out]`). Pooler and buffers are not used.
fn hf_to_ours(file: &TensorFile, c: &BertConfig, prefix: &str) -> Result<HashMap<String, (Vec<usize>, Vec<f32>)>> {
    let get = |name: &str| {
        file.tensors.get(&format!("{prefix}{name}")).cloned().with_context(|| format!("{}: tensor `{prefix}{name}` is missing", file.source))
    };
    let mut ours = HashMap::new();
    let norm = |ours: &mut HashMap<_, _>, to: &str, from: &str| -> Result<()> {
        ours.insert(format!("{to}.gamma"), get(&format!("{from}.weight"))?);
        ours.insert(format!("{to}.beta"), get(&format!("{from}.bias"))?);
        Ok(())
    };
    for (to, from) in [("word_embeddings", "word_embeddings"), ("position_embeddings", "position_embeddings"), ("token_type_embeddings", "token_type_embeddings")] {
        ours.insert(format!("{to}.weight"), get(&format!("embeddings.{from}.weight"))?);
    }
    norm(&mut ours, "embedding_norm", "embeddings.LayerNorm")?;
    for i in 0..c.num_hidden_layers {
        let from = |n: &str| format!("encoder.layer.{i}.{n}");
        for (to, hf) in [
            ("query", "attention.self.query"),
            ("key", "attention.self.key"),
            ("value", "attention.self.value"),
            ("attention_out", "attention.output.dense"),
            ("intermediate", "intermediate.dense"),
            ("output", "output.dense"),
        ] {
            let (shape, values) = get(&from(&format!("{hf}.weight")))?;
            if shape.len() != 2 {
                bail!("{}: `{}` is not a matrix", file.source, from(hf));
            }
            ours.insert(format!("layers.{i}.{to}.weight"), super::hf::transposed(&shape, &values));
            ours.insert(format!("layers.{i}.{to}.bias"), get(&from(&format!("{hf}.bias")))?);
        }
        norm(&mut ours, &format!("layers.{i}.attention_norm"), &from("attention.output.LayerNorm"))?;
        norm(&mut ours, &format!("layers.{i}.output_norm"), &from("output.LayerNorm"))?;
    }
    Ok(ours)
}
