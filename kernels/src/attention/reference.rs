use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor};

use super::AttentionOptions;

/// The definition: materialises the `[B, H, Tq, Tk]` score matrix.
pub fn attention_reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, options: AttentionOptions) -> Tensor<4> {
    let [batch, heads, tq, head_dim] = q.dims();
    let tk = k.dims()[2];
    let device = q.device();
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    let mut mask: Option<Tensor<4, Bool>> = None;
    if options.causal {
        // true above the (bottom-right aligned) diagonal = future keys.
        let future = Tensor::<2, Bool>::triu_mask([tq, tk], 1 + tk as i64 - tq as i64, &device);
        mask = Some(future.reshape([1, 1, tq, tk]).expand([batch, heads, tq, tk]));
    }
    if let Some(extra) = options.mask {
        let extra = extra.expand([batch, heads, tq, tk]);
        mask = Some(match mask {
            Some(m) => m.bool_or(extra),
            None => extra,
        });
    }
    if let Some(mask) = mask {
        scores = scores.mask_fill(mask, f32::NEG_INFINITY);
    }
    softmax(scores, 3).matmul(v)
}
