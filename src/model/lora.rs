//! LoRA adapters: a frozen projection `W` gains a trainable low-rank update
//! `ΔW = A·B · alpha/rank` (`A` [in, rank], `B` [rank, out], B starts at zero so the adapted
//! model starts equal to the base).

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear};
use burn::tensor::{Device, Tensor};

use crate::config::LoraConfig;

#[derive(Module, Debug)]
pub struct LoraAdapter {
    pub a: Param<Tensor<2>>,
    pub b: Param<Tensor<2>>,
    scale: f64,
    dropout: Dropout,
}

impl LoraAdapter {
    pub fn new(config: &LoraConfig, d_in: usize, d_out: usize, device: &Device) -> Self {
        let std = 1.0 / (d_in as f64).sqrt();
        Self {
            a: Initializer::Normal { mean: 0.0, std }.init([d_in, config.rank], device),
            b: Initializer::Zeros.init([config.rank, d_out], device),
            scale: config.alpha / config.rank as f64,
            dropout: DropoutConfig::new(config.dropout).init(),
        }
    }

    /// `dropout(x)·A·B·scale` for `x` [batch, seq, in].
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d_in] = x.dims();
        let flat = self.dropout.forward(x).reshape([batch * seq, d_in]);
        let y = flat.matmul(self.a.val()).matmul(self.b.val()).mul_scalar(self.scale);
        let d_out = y.dims()[1];
        y.reshape([batch, seq, d_out])
    }

    /// The weight update in Burn's `[in, out]` layout.
    pub fn delta(&self) -> Tensor<2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }
}

/// `base + adapter(x)` when an adapter is attached.
pub fn adapted(base: Tensor<3>, adapter: &Option<LoraAdapter>, x: &Tensor<3>) -> Tensor<3> {
    match adapter {
        Some(a) => base + a.forward(x.clone()),
        None => base,
    }
}

/// A linear layer over the tokens of `x` [batch, seq, in] as one `[batch·seq, in]` matmul.
/// Given the 3-D input, Burn keeps `batch` separate gemms whenever `seq` is a multiple of 32
/// (its tiling heuristic), each too small to keep the cores busy; one tall gemm is faster
/// (shakespeare-char: 12 gemms of 64 rows per projection). The reshapes are views.
pub fn token_linear(linear: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [batch, seq, d_in] = x.dims();
    let y = linear.forward(x.reshape([batch * seq, d_in]));
    let d_out = y.dims()[1];
    y.reshape([batch, seq, d_out])
}
