//! A pre-norm decoder-only transformer: token embeddings (+ learned positions or RoPE),
//! causal multi-head attention (grouped-query when asked), FFN, final norm, LM head
//! (optionally tied to the token embedding). GPT-2 and Llama-family models are its two shapes.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::tensor::{Bool, Device, Int, Tensor};
use polyburn_kernels::activation::{ActivationImpl, gelu};
use polyburn_kernels::norm::NormImpl;
use polyburn_kernels::attention::{AttentionImpl, AttentionOptions, attention};
use polyburn_kernels::cross_entropy::CrossEntropyImpl;

use super::gating::{GateSettings, GatedFfn, ffn_cost};
use super::lora::{LoraAdapter, adapted, token_linear};
use crate::config::{LoraConfig, LoraTarget};
use super::norm::{Norm, NormKind};
use crate::config::{FfnConfig, GeluApproximation, ModelConfig};

/// Sizes of a [`Gpt`], resolved from the config (vocabulary known).
#[derive(Debug, Clone, PartialEq)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    pub context_length: usize,
    pub dropout: f64,
    pub bias: bool,
    pub tie_embeddings: bool,
    pub ffn: FfnConfig,
    /// Optimizer steps of the run: the default length of an α schedule.
    pub total_steps: u64,
    pub arch: Architecture,
}

/// Where decoder families differ (GPT-2 vs Llama/Qwen2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Architecture {
    pub norm: NormKind,
    pub norm_eps: f64,
    /// Rotary position embedding base; `None` means learned absolute positions.
    pub rope_theta: Option<f64>,
    /// Key/value heads (fewer than query heads: grouped-query attention).
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub attn_out_bias: bool,
}

impl Architecture {
    /// GPT-2: LayerNorm (ε 1e-5), learned positions, one k/v head per query head.
    pub fn gpt(d_model: usize, n_heads: usize, bias: bool) -> Self {
        Self {
            norm: NormKind::Layer,
            norm_eps: 1e-5,
            rope_theta: None,
            n_kv_heads: n_heads,
            head_dim: d_model / n_heads,
            qkv_bias: bias,
            attn_out_bias: bias,
        }
    }
}

impl GptConfig {
    pub fn from_model_config(m: &ModelConfig, vocab_size: usize, total_steps: u64) -> Self {
        Self {
            vocab_size,
            d_model: m.d_model,
            n_layers: m.n_layers,
            n_heads: m.n_heads,
            d_ff: m.ffn_width(),
            context_length: m.context_length,
            dropout: m.dropout,
            bias: m.bias,
            tie_embeddings: m.tie_embeddings,
            ffn: m.ffn.clone(),
            total_steps,
            arch: Architecture::gpt(m.d_model, m.n_heads, m.bias),
        }
    }

    /// Parameters and forward FLOPs per token of one block's FFN.
    pub fn ffn_cost(&self) -> (usize, usize) {
        ffn_cost(self.ffn.unit, self.d_model, self.d_ff, self.bias, self.ffn.gate_norm)
    }

    fn feed_forward(&self, device: &Device) -> FeedForward {
        if self.ffn.unit.is_gated() {
            let settings = GateSettings::new(&self.ffn, self.total_steps);
            let linear = |i, o, residual| self.linear(i, o, residual, device);
            FeedForward::Gated(GatedFfn::new(
                settings,
                self.d_model,
                self.d_ff,
                self.ffn.gate_norm,
                self.ffn.alpha_init,
                linear,
                device,
            ))
        } else {
            FeedForward::Mlp(Mlp {
                up: self.linear(self.d_model, self.d_ff, false, device),
                down: self.linear(self.d_ff, self.d_model, true, device),
                lora_up: None,
                lora_down: None,
                approximate: self.ffn.approximate,
            })
        }
    }

    /// GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/√(2·layers).
    fn linear(&self, d_in: usize, d_out: usize, residual_out: bool, device: &Device) -> Linear {
        self.linear_with_bias(d_in, d_out, residual_out, self.bias, device)
    }

    fn linear_with_bias(&self, d_in: usize, d_out: usize, residual_out: bool, bias: bool, device: &Device) -> Linear {
        let std = if residual_out { 0.02 / (2.0 * self.n_layers as f64).sqrt() } else { 0.02 };
        LinearConfig::new(d_in, d_out)
            .with_bias(bias)
            .with_initializer(Initializer::Normal { mean: 0.0, std })
            .init(device)
    }

    /// A small random model for unit tests: GPT-2 shape, or Llama shape (RoPE, RMSNorm, GQA).
    #[cfg(test)]
    pub fn tiny_for_tests(vocab_size: usize, llama: bool) -> Self {
        let model = ModelConfig { d_model: 32, n_layers: 2, n_heads: 4, context_length: 24, ..Default::default() };
        let mut c = Self::from_model_config(&model, vocab_size, 10);
        if llama {
            c.arch = Architecture {
                norm: NormKind::Rms,
                rope_theta: Some(10_000.0),
                n_kv_heads: 2,
                qkv_bias: false,
                attn_out_bias: false,
                ..c.arch
            };
        }
        c
    }

    pub fn init(&self, device: &Device) -> Gpt {
        let embedding = |n| {
            EmbeddingConfig::new(n, self.d_model)
                .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
                .init(device)
        };
        let a = self.arch;
        let norm = || Norm::new(a.norm, self.d_model, self.bias, a.norm_eps, device);
        let (q_width, kv_width) = (self.n_heads * a.head_dim, a.n_kv_heads * a.head_dim);
        let blocks = (0..self.n_layers)
            .map(|_| Block {
                ln_attn: norm(),
                attn: SelfAttention {
                    qkv: self.linear_with_bias(self.d_model, q_width + 2 * kv_width, false, a.qkv_bias, device),
                    out: self.linear_with_bias(q_width, self.d_model, true, a.attn_out_bias, device),
                    lora_q: None,
                    lora_k: None,
                    lora_v: None,
                    lora_o: None,
                    shape: HeadShape {
                        n_heads: self.n_heads,
                        n_kv_heads: a.n_kv_heads,
                        head_dim: a.head_dim,
                        rope_theta: a.rope_theta,
                    },
                },
                ln_ffn: norm(),
                ffn: self.feed_forward(device),
                dropout: DropoutConfig::new(self.dropout).init(),
            })
            .collect();
        Gpt {
            token_embedding: embedding(self.vocab_size),
            position_embedding: a.rope_theta.is_none().then(|| embedding(self.context_length)),
            blocks,
            ln_final: norm(),
            lm_head: (!self.tie_embeddings).then(|| {
                LinearConfig::new(self.d_model, self.vocab_size)
                    .with_bias(false)
                    .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
                    .init(device)
            }),
            dropout: DropoutConfig::new(self.dropout).init(),
            context_length: self.context_length,
        }
    }
}

/// Head layout of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: Option<f64>,
}

/// Where the tokens of one forward call sit: their absolute positions, one row shared by the
/// whole batch (training: `0..T`) or one row per sequence (left-padded prompts and KV-cache
/// decoding, where each sequence counts from its own first real token), and for packed rows
/// the document each token belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Positions {
    /// `rows × len` positions, row-major; `rows` is 1 or the batch size.
    pub ids: Vec<usize>,
    pub rows: usize,
    pub len: usize,
    /// Packed rows (`data.pack`): each token's document, `rows × len`; attention stays inside
    /// a document. `None`: one sequence per row.
    pub documents: Option<Vec<u32>>,
}

impl Positions {
    /// `0..len` for every sequence.
    pub fn contiguous(len: usize) -> Self {
        Self { ids: (0..len).collect(), rows: 1, len, documents: None }
    }

    /// Per-sequence positions (`rows × len`), one sequence per row.
    pub fn per_row(ids: Vec<usize>, rows: usize, len: usize) -> Self {
        Self { ids, rows, len, documents: None }
    }

    /// Rows of several documents one after another (`documents`: `rows × len` ids, equal for
    /// the tokens of one document and contiguous): positions restart at 0 with each document.
    pub fn packed(documents: Vec<u32>, rows: usize, len: usize) -> Self {
        assert_eq!(documents.len(), rows * len, "one document id per token");
        let ids = documents
            .chunks(len.max(1))
            .flat_map(|row| {
                let mut start = 0;
                (0..row.len()).map(move |t| {
                    if t > 0 && row[t] != row[t - 1] {
                        start = t;
                    }
                    t - start
                })
            })
            .collect();
        Self { ids, rows, len, documents: Some(documents) }
    }

    /// What attention must hide besides the future, built once per forward for every layer:
    /// `key_padding` and, for packed rows, the documents.
    fn key_masks(&self, batch: usize, key_padding: Option<Tensor<2, Bool>>, device: &Device) -> KeyMasks {
        KeyMasks { padding: key_padding, documents: self.documents_tensor(batch, device) }
    }

    /// The document ids as a `[batch, len]` tensor for the attention masks.
    fn documents_tensor(&self, batch: usize, device: &Device) -> Option<Tensor<2, Int>> {
        let documents = self.documents.as_ref()?;
        let ids: Vec<i64> = documents.iter().map(|&d| d as i64).collect();
        Some(Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(ids, [self.rows, self.len]), device).expand([batch, self.len]))
    }

    fn tensor(&self, batch: usize, device: &Device) -> Tensor<2, Int> {
        let ids: Vec<i64> = self.ids.iter().map(|&p| p as i64).collect();
        Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(ids, [self.rows, self.len]), device)
            .expand([batch, self.len])
    }
}

/// Keys each query may not see besides the future (see [`Positions::key_masks`]).
#[derive(Debug, Clone)]
struct KeyMasks {
    /// `[batch, keys]`, `true` = hidden: the left padding of cached sequences.
    padding: Option<Tensor<2, Bool>>,
    /// `[batch, keys]` document ids of packed rows.
    documents: Option<Tensor<2, Int>>,
}

/// Rotary position embedding in the "rotate half" layout Llama uses: dimension `i` of the
/// first half pairs with `i + head_dim/2`. `x` is `[batch, heads, seq, head_dim]`.
fn rope(x: Tensor<4>, theta: f64, positions: &Positions) -> Tensor<4> {
    let [batch, heads, seq, head_dim] = x.dims();
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(positions.ids.len() * head_dim);
    let mut sin = Vec::with_capacity(positions.ids.len() * head_dim);
    for &pos in &positions.ids {
        for i in 0..head_dim {
            let freq = theta.powf(-((2 * (i % half)) as f64) / head_dim as f64);
            let angle = pos as f64 * freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let device = x.device();
    let rows = positions.rows;
    let table = |v: Vec<f32>| {
        Tensor::<2>::from_data(burn::tensor::TensorData::new(v, [rows * seq, head_dim]), &device)
            .reshape([rows, 1, seq, head_dim])
            .expand([batch, heads, seq, head_dim])
    };
    let (cos, sin) = (table(cos), table(sin));
    let first = x.clone().narrow(3, 0, half);
    let second = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos + rotated * sin
}

/// One layer's preallocated keys and values `[batch, kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone)]
pub struct LayerCache {
    keys: Tensor<4>,
    values: Tensor<4>,
}

/// Keys and values of every layer for incremental decoding. Slots `0..len` are filled; new
/// tokens are written in place at `len..`, so the prefix is never recomputed or concatenated.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Each sequence `i` becomes `copies` consecutive sequences `i·copies ..` (one prompt's
    /// prefill shared by its N replies).
    pub fn repeat_rows(self, copies: usize) -> Self {
        let repeat = |t: Tensor<4>| {
            let [b, h, c, d] = t.dims();
            t.reshape([b, 1, h, c, d]).expand([b, copies, h, c, d]).reshape([b * copies, h, c, d])
        };
        let layers = self
            .layers
            .into_iter()
            .map(|l| LayerCache { keys: repeat(l.keys), values: repeat(l.values) })
            .collect();
        Self { layers, ..self }
    }
}

#[derive(Module, Debug)]
pub struct SelfAttention {
    qkv: Linear,
    out: Linear,
    /// LoRA adapters of the q, k, v slices of `qkv` and of `out`.
    lora_q: Option<LoraAdapter>,
    lora_k: Option<LoraAdapter>,
    lora_v: Option<LoraAdapter>,
    lora_o: Option<LoraAdapter>,
    #[module(skip)]
    shape: HeadShape,
}

impl SelfAttention {
    /// Attention over `x` and, with a cache, over the cached prefix too: the new keys and
    /// values are written into `cache` at its current length. Attention is causal (bottom-right
    /// aligned, so new tokens see the whole prefix) and hides what `masks` name.
    fn forward(
        &self,
        x: Tensor<3>,
        positions: &Positions,
        cache: Option<(&mut LayerCache, usize)>,
        masks: &KeyMasks,
        attention_impl: AttentionImpl,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let HeadShape { n_heads, n_kv_heads, head_dim, rope_theta } = self.shape;
        let heads = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, head_dim]).swap_dims(1, 2);
        let qkv = token_linear(&self.qkv, x.clone());
        let (q_width, kv_width) = (n_heads * head_dim, n_kv_heads * head_dim);
        let q = adapted(qkv.clone().narrow(2, 0, q_width), &self.lora_q, &x);
        let k = adapted(qkv.clone().narrow(2, q_width, kv_width), &self.lora_k, &x);
        let v = adapted(qkv.narrow(2, q_width + kv_width, kv_width), &self.lora_v, &x);
        let (mut q, mut k, mut v) = (heads(q, n_heads), heads(k, n_kv_heads), heads(v, n_kv_heads));
        if let Some(theta) = rope_theta {
            q = rope(q, theta, positions);
            k = rope(k, theta, positions);
        }
        if let Some((cache, filled)) = cache {
            let end = filled + seq;
            let slots = [0..batch, 0..n_kv_heads, filled..end, 0..head_dim];
            // Moved out rather than cloned: a buffer nothing else holds is written where it
            // lies; a cloned (shared) one is copied whole, every layer at every token.
            let device = k.device();
            let take = |t: &mut Tensor<4>| std::mem::replace(t, Tensor::empty([0, 0, 0, 0], &device));
            cache.keys = take(&mut cache.keys).slice_assign(slots.clone(), k);
            cache.values = take(&mut cache.values).slice_assign(slots, v);
            k = cache.keys.clone().narrow(2, 0, end);
            v = cache.values.clone().narrow(2, 0, end);
        }
        let keys = k.dims()[2];
        if n_kv_heads != n_heads {
            // Grouped-query attention: each k/v head serves n_heads / n_kv_heads query heads.
            let group = n_heads / n_kv_heads;
            let repeat = |t: Tensor<4>| {
                t.reshape([batch, n_kv_heads, 1, keys, head_dim])
                    .expand([batch, n_kv_heads, group, keys, head_dim])
                    .reshape([batch, n_heads, keys, head_dim])
            };
            k = repeat(k);
            v = repeat(v);
        }
        let options = AttentionOptions { causal: true, key_padding: masks.padding.clone(), documents: masks.documents.clone(), mask: None };
        let y = attention(q, k, v, options, attention_impl).swap_dims(1, 2).reshape([batch, seq, q_width]);
        adapted(token_linear(&self.out, y.clone()), &self.lora_o, &y)
    }

    fn attach_lora(mut self, c: &LoraConfig, device: &Device) -> Self {
        let [d_model, _] = self.qkv.weight.dims();
        let (q, kv) = (self.shape.n_heads * self.shape.head_dim, self.shape.n_kv_heads * self.shape.head_dim);
        let wants = |t| c.target_modules.contains(&t);
        self.lora_q = wants(LoraTarget::Q).then(|| LoraAdapter::new(c, d_model, q, device));
        self.lora_k = wants(LoraTarget::K).then(|| LoraAdapter::new(c, d_model, kv, device));
        self.lora_v = wants(LoraTarget::V).then(|| LoraAdapter::new(c, d_model, kv, device));
        self.lora_o = wants(LoraTarget::O).then(|| LoraAdapter::new(c, q, d_model, device));
        self
    }

    /// Folds the adapters into `qkv` and `out` and drops them.
    fn merge_lora(mut self) -> Self {
        let [d_model, _] = self.qkv.weight.dims();
        let device = self.qkv.weight.device();
        let (q, kv) = (self.shape.n_heads * self.shape.head_dim, self.shape.n_kv_heads * self.shape.head_dim);
        let delta = |a: &Option<LoraAdapter>, width| a.as_ref().map_or_else(|| Tensor::zeros([d_model, width], &device), |a| a.delta());
        if self.lora_q.is_some() || self.lora_k.is_some() || self.lora_v.is_some() {
            let d = Tensor::cat(vec![delta(&self.lora_q, q), delta(&self.lora_k, kv), delta(&self.lora_v, kv)], 1);
            self.qkv.weight = self.qkv.weight.map(|w| w + d);
        }
        if let Some(o) = self.lora_o.take() {
            self.out.weight = self.out.weight.map(|w| w + o.delta());
        }
        (self.lora_q, self.lora_k, self.lora_v) = (None, None, None);
        self
    }
}

/// The plain GPT MLP: `down(gelu(up(x)))`.
#[derive(Module, Debug)]
pub struct Mlp {
    up: Linear,
    down: Linear,
    lora_up: Option<LoraAdapter>,
    lora_down: Option<LoraAdapter>,
    #[module(skip)]
    approximate: GeluApproximation,
}

/// A block's feed-forward network, chosen by `model.ffn.unit`.
#[derive(Module, Debug)]
pub enum FeedForward {
    Mlp(Mlp),
    Gated(GatedFfn),
}

impl FeedForward {
    fn forward(&self, x: Tensor<3>, context: &ForwardContext) -> Tensor<3> {
        match self {
            FeedForward::Mlp(m) => {
                let up = adapted(token_linear(&m.up, x.clone()), &m.lora_up, &x);
                let h = gelu(up, m.approximate == GeluApproximation::Tanh, context.activation);
                adapted(token_linear(&m.down, h.clone()), &m.lora_down, &h)
            }
            FeedForward::Gated(g) => g.forward(x, context.global_step, context.activation),
        }
    }

    fn attach_lora(self, c: &LoraConfig, device: &Device) -> Self {
        match self {
            FeedForward::Mlp(mut m) => {
                let [d_model, d_ff] = m.up.weight.dims();
                m.lora_up = c.target_modules.contains(&LoraTarget::Up).then(|| LoraAdapter::new(c, d_model, d_ff, device));
                m.lora_down = c.target_modules.contains(&LoraTarget::Down).then(|| LoraAdapter::new(c, d_ff, d_model, device));
                FeedForward::Mlp(m)
            }
            FeedForward::Gated(g) => FeedForward::Gated(g.attach_lora(c, device)),
        }
    }

    fn merge_lora(self) -> Self {
        match self {
            FeedForward::Mlp(mut m) => {
                if let Some(a) = m.lora_up.take() {
                    m.up.weight = m.up.weight.map(|w| w + a.delta());
                }
                if let Some(a) = m.lora_down.take() {
                    m.down.weight = m.down.weight.map(|w| w + a.delta());
                }
                FeedForward::Mlp(m)
            }
            FeedForward::Gated(g) => FeedForward::Gated(g.merge_lora()),
        }
    }

    fn matmul_params(&self) -> usize {
        let linear = |l: &Linear| l.weight.val().dims().iter().product::<usize>();
        match self {
            FeedForward::Mlp(m) => linear(&m.up) + linear(&m.down),
            FeedForward::Gated(g) => g.matmul_params(),
        }
    }
}

#[derive(Module, Debug)]
pub struct Block {
    ln_attn: Norm,
    attn: SelfAttention,
    ln_ffn: Norm,
    ffn: FeedForward,
    dropout: Dropout,
}

impl Block {
    fn forward(
        &self,
        x: Tensor<3>,
        positions: &Positions,
        cache: Option<(&mut LayerCache, usize)>,
        masks: &KeyMasks,
        context: &ForwardContext,
    ) -> Tensor<3> {
        let attn = self.attn.forward(self.ln_attn.forward(x.clone(), context.norm), positions, cache, masks, context.attention);
        let x = x + self.dropout.forward(attn);
        let ffn = self.ffn.forward(self.ln_ffn.forward(x.clone(), context.norm), context);
        x + self.dropout.forward(ffn)
    }
}

/// What a forward pass needs besides the tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardContext {
    /// The trainer's global step: scheduled α values are read from it.
    pub global_step: u64,
    pub attention: AttentionImpl,
    /// The LM head + cross-entropy of the training loss.
    pub cross_entropy: CrossEntropyImpl,
    /// The FFN activation: the plain MLP's GELU or a gated unit's mix.
    pub activation: ActivationImpl,
    /// LayerNorm / RMSNorm.
    pub norm: NormImpl,
}

/// Inference at step 0 ([`ForwardContext::at_step`]).
impl Default for ForwardContext {
    fn default() -> Self {
        Self::at_step(0)
    }
}

impl ForwardContext {
    /// Inference at `global_step` with the fused kernels.
    pub fn at_step(global_step: u64) -> Self {
        Self {
            global_step,
            attention: AttentionImpl::Fused,
            cross_entropy: CrossEntropyImpl::Fused,
            activation: ActivationImpl::Fused,
            norm: NormImpl::Fused,
        }
    }

    /// What a run's config asks for at `global_step`.
    pub fn for_run(config: &crate::config::Config, global_step: u64) -> Self {
        let k = &config.kernels;
        Self { global_step, attention: k.attention, cross_entropy: k.cross_entropy, activation: k.activation, norm: k.norm }
    }
}

#[derive(Module, Debug)]
pub struct Gpt {
    token_embedding: Embedding,
    /// Learned absolute positions (GPT-2); `None` with RoPE.
    position_embedding: Option<Embedding>,
    blocks: Vec<Block>,
    ln_final: Norm,
    /// `None` when the head is tied to the token embedding.
    lm_head: Option<Linear>,
    dropout: Dropout,
    context_length: usize,
}

impl Gpt {
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Token ids `[batch, seq]` → logits `[batch, seq, vocab]`.
    pub fn forward(&self, tokens: Tensor<2, Int>, context: &ForwardContext) -> Tensor<3> {
        self.logits(self.hidden(tokens, context))
    }

    /// Token ids `[batch, seq]` → final (normed) hidden states `[batch, seq, d_model]`.
    pub fn hidden(&self, tokens: Tensor<2, Int>, context: &ForwardContext) -> Tensor<3> {
        let seq = tokens.dims()[1];
        self.hidden_at(tokens, &Positions::contiguous(seq), context)
    }

    /// [`Gpt::hidden`] at the given positions (packed rows: with their documents).
    pub fn hidden_at(&self, tokens: Tensor<2, Int>, positions: &Positions, context: &ForwardContext) -> Tensor<3> {
        self.run_blocks(tokens, positions, None, context)
    }

    /// A cache for `batch` sequences of up to `capacity` tokens (at most the context length).
    pub fn new_cache(&self, batch: usize, capacity: usize, device: &Device) -> KvCache {
        let capacity = capacity.min(self.context_length);
        let layers = self
            .blocks
            .iter()
            .map(|b| {
                let HeadShape { n_kv_heads, head_dim, .. } = b.attn.shape;
                let empty = || Tensor::zeros([batch, n_kv_heads, capacity, head_dim], device);
                LayerCache { keys: empty(), values: empty() }
            })
            .collect();
        KvCache { layers, len: 0, capacity }
    }

    /// Runs `tokens [batch, seq]` after the `cache.len()` cached slots and appends them to the
    /// cache. `positions` are each token's position in its own sequence; `key_padding
    /// [batch, len + seq]` (`true` = hidden) hides the padding keys. Returns logits.
    pub fn forward_cached(
        &self,
        tokens: Tensor<2, Int>,
        positions: &Positions,
        key_padding: Tensor<2, Bool>,
        cache: &mut KvCache,
        context: &ForwardContext,
    ) -> Tensor<3> {
        let seq = tokens.dims()[1];
        assert!(cache.len + seq <= cache.capacity, "KV cache of {} slots overflows", cache.capacity);
        let hidden = self.run_blocks(tokens, positions, Some((cache, key_padding)), context);
        cache.len += seq;
        self.logits(hidden)
    }

    fn run_blocks(
        &self,
        tokens: Tensor<2, Int>,
        positions: &Positions,
        mut cache: Option<(&mut KvCache, Tensor<2, Bool>)>,
        context: &ForwardContext,
    ) -> Tensor<3> {
        let seq = tokens.dims()[1];
        let max_position = positions.ids.iter().copied().max().unwrap_or(0);
        assert!(
            seq <= self.context_length && max_position < self.context_length,
            "sequence of {seq} tokens (positions up to {max_position}) exceeds the model's context_length {}",
            self.context_length
        );
        let (batch, device) = (tokens.dims()[0], tokens.device());
        let masks = positions.key_masks(batch, cache.as_ref().map(|(_, padding)| padding.clone()), &device);
        let mut x = self.embed_at(tokens, positions);
        for (i, block) in self.blocks.iter().enumerate() {
            let layer = cache.as_mut().map(|(c, _)| (&mut c.layers[i], c.len));
            x = block.forward(x, positions, layer, &masks, context);
        }
        self.ln_final.forward(x, context.norm)
    }

    /// Token (and position) embeddings with dropout: the first block's input.
    fn embed_at(&self, tokens: Tensor<2, Int>, positions: &Positions) -> Tensor<3> {
        let (batch, device) = (tokens.dims()[0], tokens.device());
        let mut x = self.token_embedding.forward(tokens);
        if let Some(table) = &self.position_embedding {
            x = x + table.forward(positions.tensor(batch, &device));
        }
        self.dropout.forward(x)
    }

    /// [`Gpt::hidden_at`] in pieces, for recomputing one block at a time in the backward
    /// (`training.gradient_checkpointing`): `final_norm(block(n − 1, … block(0, embed(t))))`.
    pub fn embed(&self, tokens: Tensor<2, Int>, positions: &Positions) -> Tensor<3> {
        self.embed_at(tokens, positions)
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Block `i` over whole sequences (no cache).
    pub fn block(&self, i: usize, x: Tensor<3>, positions: &Positions, context: &ForwardContext) -> Tensor<3> {
        let masks = positions.key_masks(x.dims()[0], None, &x.device());
        self.blocks[i].forward(x, positions, None, &masks, context)
    }

    pub fn final_norm(&self, x: Tensor<3>, context: &ForwardContext) -> Tensor<3> {
        self.ln_final.forward(x, context.norm)
    }

    /// The LM head as `[vocab, d_model]` (the token embedding when tied).
    pub fn lm_head_weight(&self) -> Tensor<2> {
        match &self.lm_head {
            Some(head) => head.weight.val().transpose(), // Burn stores [d_in, d_out]
            None => self.token_embedding.weight.val(),
        }
    }

    /// Final hidden states → logits through the LM head (or the tied embedding).
    pub fn logits(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d_model] = x.dims();
        match &self.lm_head {
            Some(head) => token_linear(head, x),
            None => {
                let table = self.token_embedding.weight.val(); // [vocab, d_model]
                let vocab = table.dims()[0];
                x.reshape([batch * seq, d_model]).matmul(table.transpose()).reshape([batch, seq, vocab])
            }
        }
    }

    /// Parameters that are matrix-multiplied per token (all linear layers and the LM head);
    /// the `6 × N` in the training-FLOPs estimate.
    pub fn matmul_params(&self) -> usize {
        let linear = |l: &Linear| l.weight.val().dims().iter().product::<usize>();
        let per_block: usize = self
            .blocks
            .iter()
            .map(|b| linear(&b.attn.qkv) + linear(&b.attn.out) + b.ffn.matmul_params())
            .sum();
        let head = match &self.lm_head {
            Some(h) => linear(h),
            None => self.token_embedding.weight.val().dims().iter().product(),
        };
        per_block + head
    }
}

impl Gpt {
    /// Each layer's effective α at `global_step` (empty for the plain MLP).
    pub fn alphas(&self, global_step: u64) -> Vec<f64> {
        self.blocks
            .iter()
            .filter_map(|b| match &b.ffn {
                FeedForward::Gated(g) => Some(g.alpha(global_step)),
                FeedForward::Mlp(_) => None,
            })
            .collect()
    }
}

impl Gpt {
    /// Freezes every current parameter and attaches LoRA adapters (B = 0, so outputs are
    /// unchanged) to the targeted projections; only the adapters train afterwards.
    pub fn with_lora(self, config: &LoraConfig, device: &Device) -> Self {
        let mut model = self.no_grad();
        model.blocks = model
            .blocks
            .into_iter()
            .map(|mut b| {
                b.attn = b.attn.attach_lora(config, device);
                b.ffn = b.ffn.attach_lora(config, device);
                b
            })
            .collect();
        model
    }

    /// Folds every adapter into its base weight and removes the adapters.
    pub fn merge_lora(mut self) -> Self {
        self.blocks = self
            .blocks
            .into_iter()
            .map(|mut b| {
                b.attn = b.attn.merge_lora();
                b.ffn = b.ffn.merge_lora();
                b
            })
            .collect();
        self
    }
}
