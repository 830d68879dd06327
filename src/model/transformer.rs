//! A GPT-style pre-LayerNorm decoder: token + position embeddings, causal multi-head
//! attention, FFN, final norm, LM head (optionally tied to the token embedding).

use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear,
    LinearConfig,
};
use burn::tensor::{Device, Int, Tensor};
use polyburn_kernels::attention::{AttentionImpl, AttentionOptions, attention};

use super::gating::{GateSettings, GatedFfn, ffn_cost, gelu_with};
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
                approximate: self.ffn.approximate,
            })
        }
    }

    /// GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/√(2·layers).
    fn linear(&self, d_in: usize, d_out: usize, residual_out: bool, device: &Device) -> Linear {
        let std = if residual_out { 0.02 / (2.0 * self.n_layers as f64).sqrt() } else { 0.02 };
        LinearConfig::new(d_in, d_out)
            .with_bias(self.bias)
            .with_initializer(Initializer::Normal { mean: 0.0, std })
            .init(device)
    }

    pub fn init(&self, device: &Device) -> Gpt {
        let embedding = |n| {
            EmbeddingConfig::new(n, self.d_model)
                .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
                .init(device)
        };
        let norm = || LayerNormConfig::new(self.d_model).with_bias(self.bias).init(device);
        let blocks = (0..self.n_layers)
            .map(|_| Block {
                ln_attn: norm(),
                attn: SelfAttention {
                    qkv: self.linear(self.d_model, 3 * self.d_model, false, device),
                    out: self.linear(self.d_model, self.d_model, true, device),
                    n_heads: self.n_heads,
                },
                ln_ffn: norm(),
                ffn: self.feed_forward(device),
                dropout: DropoutConfig::new(self.dropout).init(),
            })
            .collect();
        Gpt {
            token_embedding: embedding(self.vocab_size),
            position_embedding: embedding(self.context_length),
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

#[derive(Module, Debug)]
pub struct SelfAttention {
    qkv: Linear,
    out: Linear,
    n_heads: usize,
}

impl SelfAttention {
    fn forward(&self, x: Tensor<3>, attention_impl: AttentionImpl) -> Tensor<3> {
        let [batch, seq, d_model] = x.dims();
        let head_dim = d_model / self.n_heads;
        let heads = |t: Tensor<3>| t.reshape([batch, seq, self.n_heads, head_dim]).swap_dims(1, 2);
        let mut qkv = self.qkv.forward(x).chunk(3, 2).into_iter();
        let (q, k, v) = (qkv.next().unwrap(), qkv.next().unwrap(), qkv.next().unwrap());
        let options = AttentionOptions { causal: true, mask: None };
        let y = attention(heads(q), heads(k), heads(v), options, attention_impl);
        self.out.forward(y.swap_dims(1, 2).reshape([batch, seq, d_model]))
    }
}

/// The plain GPT MLP: `down(gelu(up(x)))`.
#[derive(Module, Debug)]
pub struct Mlp {
    up: Linear,
    down: Linear,
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
    fn forward(&self, x: Tensor<3>, global_step: u64) -> Tensor<3> {
        match self {
            FeedForward::Mlp(m) => m.down.forward(gelu_with(m.up.forward(x), m.approximate)),
            FeedForward::Gated(g) => g.forward(x, global_step),
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
    ln_attn: LayerNorm,
    attn: SelfAttention,
    ln_ffn: LayerNorm,
    ffn: FeedForward,
    dropout: Dropout,
}

impl Block {
    fn forward(&self, x: Tensor<3>, context: &ForwardContext) -> Tensor<3> {
        let attn = self.attn.forward(self.ln_attn.forward(x.clone()), context.attention);
        let x = x + self.dropout.forward(attn);
        let ffn = self.ffn.forward(self.ln_ffn.forward(x.clone()), context.global_step);
        x + self.dropout.forward(ffn)
    }
}

/// What a forward pass needs besides the tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ForwardContext {
    /// The trainer's global step: scheduled α values are read from it.
    pub global_step: u64,
    pub attention: AttentionImpl,
}

impl ForwardContext {
    pub fn at_step(global_step: u64) -> Self {
        Self { global_step, attention: AttentionImpl::default() }
    }
}

#[derive(Module, Debug)]
pub struct Gpt {
    token_embedding: Embedding,
    position_embedding: Embedding,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
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
        let [batch, seq] = tokens.dims();
        assert!(
            seq <= self.context_length,
            "sequence of {seq} tokens exceeds the model's context_length {}",
            self.context_length
        );
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device).reshape([1, seq]).expand([batch, seq]);
        let mut x = self.dropout.forward(self.token_embedding.forward(tokens) + self.position_embedding.forward(positions));
        for block in &self.blocks {
            x = block.forward(x, context);
        }
        let x = self.ln_final.forward(x);
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => {
                let [_, _, d_model] = x.dims();
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
